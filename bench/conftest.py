"""Shared fixtures of the pytest-benchmark suites.

Configuration by environment (so the suites run unchanged on any machine):

* ``HIMNET_BENCH_PRESET`` (default ``metrla``) and ``HIMNET_BENCH_NODES`` (comma-separated graph
  sizes; default the preset's own) choose the shapes, ``HIMNET_BENCH_BATCH`` the batch (16).
* The device is CUDA when available, else CPU. Triton on CPU (interpreter) is skipped: it is a
  correctness tool, not a speed.

What is timed is defined once, in ``himnet_fast.benchmark.steps.prepare``, for these suites and
for ``himnet-fast bench`` / ``scale`` alike: :func:`prepared_step` builds the inputs, checks
agreement with the reference (himnet_fast.reference) at the same shape (above 1024 nodes on a
256-node graph, as the runner) and fails the case if the provider disagrees; an out-of-memory
error skips the case with the reason (an OOM is a data point, not a crash). The per-process
peak-memory measurements and the CSV/markdown/plots are in ``himnet-fast bench`` / ``scale``.
"""
import os

import pytest
import torch

from himnet_fast.benchmark import providers as P
from himnet_fast.benchmark import steps
from himnet_fast.benchmark.worker import is_oom
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
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if is_oom(exc):
            pytest.skip(f"out of memory: {type(exc).__name__}: {str(exc)[:200]}")
        raise


def prepared_step(what: str, provider: str, mode: str, n: int) -> steps.Step:
    """The runner's step for one case (``steps.prepare`` of the job spec ``himnet-fast bench``
    would run), after its agreement check; skips on out-of-memory or a mode the provider
    cannot run here, fails on disagreement."""
    spec = dict(what=what, provider=provider, modes=[mode], preset=PRESET.name, num_nodes=n, batch_size=BATCH,
                device=str(DEVICE))
    try:
        prepared = skip_on_oom(steps.prepare, spec)
    except steps.PrepareFailed as exc:
        if is_oom(exc.error):
            pytest.skip(f"out of memory {exc.during}: {type(exc.error).__name__}: {str(exc.error)[:200]}")
        raise
    except steps.Disagreement as exc:
        pytest.fail(f"{provider} {exc}")
    if mode in prepared.skipped:
        pytest.skip(prepared.skipped[mode])
    return skip_on_oom(prepared.step, mode)


def time_step(benchmark, step: steps.Step, rounds=None, **info) -> None:
    """Time ``step.fn`` (synchronised on CUDA) with pytest-benchmark: ``rounds`` rounds after one
    warm-up (for steps of seconds), or as many as pytest-benchmark calibrates when None.
    ``info`` and the step's cost go into the benchmark's extra_info."""
    def run():
        step.fn()
        sync()

    benchmark.extra_info.update(mode=step.mode, batch=BATCH, device=str(DEVICE),
                                tflop=step.flops / 1e12 if step.flops else None, **info)
    if rounds is None:
        skip_on_oom(benchmark, run)
    else:
        skip_on_oom(benchmark.pedantic, run, rounds=rounds, warmup_rounds=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
