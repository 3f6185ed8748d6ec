"""Shared fixtures of the pytest-benchmark suites.

Configuration by environment (so the suites run unchanged on any machine):

* ``HIMNET_BENCH_PRESET`` (default ``metrla``) and ``HIMNET_BENCH_NODES`` (comma-separated graph
  sizes; default the preset's own) choose the shapes, ``HIMNET_BENCH_BATCH`` the batch (16).
* The device is CUDA when available, else CPU. Triton on CPU (interpreter) is skipped: it is a
  correctness tool, not a speed.

Every benchmark first checks agreement with the reference (himnet_fast.reference) at the same
shape and fails if the provider disagrees; an out-of-memory error skips the case with the
reason (an OOM is a data point, not a crash). The per-process peak-memory measurements and
the CSV/markdown/plots are in ``himnet-fast bench`` / ``himnet-fast scale``.
"""
import os

import pytest
import torch

from himnet_fast.benchmark import providers as P
from himnet_fast.presets import get_preset

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESET = get_preset(os.environ.get("HIMNET_BENCH_PRESET", "metrla"))
NODES = [int(n) for n in os.environ.get("HIMNET_BENCH_NODES", str(PRESET.num_nodes)).split(",") if n.strip()]
BATCH = int(os.environ.get("HIMNET_BENCH_BATCH", "16"))


def providers_for(what: str):
    """pytest params of every provider, unavailable ones marked skip with their reason."""
    out = []
    for p in P.OP_PROVIDERS:
        if p == "flex" and not what.startswith("adaptive_propagate"):
            continue  # FlexAttention computes the propagation only
        reason = P.unavailable_reason(p, DEVICE, what)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(p, id=p, marks=marks))
    return out


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def skip_on_oom(fn, *args, **kwargs):
    """Run ``fn``; an out-of-memory error skips the benchmark with the reason."""
    from himnet_fast.benchmark.worker import is_oom

    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            pytest.skip(f"out of memory: {type(exc).__name__}: {str(exc)[:200]}")
        raise


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
