"""Timing, memory and environment measurements for the benchmark runner.

* Time: CUDA events around each call on a GPU; ``time.perf_counter`` on CPU. Reported as the
  20th/50th/80th percentiles in milliseconds.
* Memory: on a GPU ``torch.cuda.max_memory_allocated`` after a reset; on CPU the peak resident
  set (``VmHWM``) of the worker process, whose high-water mark is reset through
  ``/proc/self/clear_refs`` just before the measured calls, so imports, model construction and
  the agreement check do not count. Both the increase over the baseline (memory held once the
  model and inputs exist) and the absolute peak are reported.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import subprocess
import time
from typing import Callable, Dict, Optional, Sequence

import torch

MiB = float(1 << 20)

# Dense fp32 peaks (TF32 is off by default for torch matmuls) and memory bandwidth, by a
# substring of torch.cuda.get_device_name(). Used only for the "% of peak" roofline columns;
# $HIMNET_FAST_PEAK_TFLOPS / $HIMNET_FAST_PEAK_GBPS override them.
_GPU_PEAKS = (
    ("H200", 66.9, 4800.0),
    ("H100 PCIe", 51.2, 2000.0),
    ("H100", 66.9, 3350.0),
    ("A100-SXM4-80GB", 19.5, 2039.0),
    ("A100", 19.5, 1555.0),
    ("RTX 4090", 82.6, 1008.0),
    ("RTX 3090", 35.6, 936.0),
    ("L40S", 91.6, 864.0),
    ("A10", 31.2, 600.0),
    ("L4", 30.3, 300.0),
    ("V100", 15.7, 900.0),
    ("T4", 8.1, 320.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"


def device_peaks(device: torch.device) -> tuple:
    """(peak TFLOP/s, peak GB/s) of the device, None where unknown (always on CPU unless set
    through the environment)."""
    tf = os.environ.get("HIMNET_FAST_PEAK_TFLOPS")
    bw = os.environ.get("HIMNET_FAST_PEAK_GBPS")
    peak_tf = float(tf) if tf else None
    peak_bw = float(bw) if bw else None
    if device.type == "cuda" and (peak_tf is None or peak_bw is None):
        name = torch.cuda.get_device_name(device)
        for key, t, b in _GPU_PEAKS:
            if key in name:
                peak_tf = t if peak_tf is None else peak_tf
                peak_bw = b if peak_bw is None else peak_bw
                break
    return peak_tf, peak_bw


def git_commit() -> str:
    """Short commit of the source tree the package runs from ("-dirty" if modified), or "".

    ``$HIMNET_FAST_GIT_COMMIT`` overrides it, for a copy of the tree without its ``.git``
    (``bench/gpu_run.sh`` on a lent machine)."""
    if os.environ.get("HIMNET_FAST_GIT_COMMIT"):
        return os.environ["HIMNET_FAST_GIT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> Dict[str, str]:
    """Columns identifying where and with what a measurement was taken."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


# --------------------------------------------------------------------------- memory

def _status_kb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _release_heap() -> None:
    gc.collect()
    try:  # hand freed glibc heap pages back so the baseline counts live memory only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """Peak memory of the calls made between :meth:`start` and :meth:`stop`, in MiB.

    ``stop()`` returns ``(baseline, peak_absolute, peak_increase)``; ``kind`` says what was
    measured: "cuda_allocated" or "rss" (resident set of this process).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self.baseline = None

    def start(self) -> None:
        _release_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / MiB
            return
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        rss = _status_kb("VmRSS")
        self.baseline = None if rss is None else rss / 1024.0

    def stop(self) -> tuple:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / MiB
        else:
            hwm = _status_kb("VmHWM")
            peak = None if hwm is None else hwm / 1024.0
        if peak is None or self.baseline is None:
            return self.baseline, peak, None
        return self.baseline, peak, max(0.0, peak - self.baseline)


# --------------------------------------------------------------------------- time

def time_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> list:
    """Run ``fn`` ``repeats`` times; the duration of each call in milliseconds."""
    out = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        return out
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def quantiles(samples: Sequence[float]) -> tuple:
    """(p20, p50, p80) by linear interpolation (numpy's default)."""
    import numpy as np

    q = np.percentile(np.asarray(samples, dtype=float), [20, 50, 80])
    return float(q[0]), float(q[1]), float(q[2])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
