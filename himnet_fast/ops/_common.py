"""Helpers shared by the ops: dtypes under autocast, memory budgets, the CPU heap."""
from __future__ import annotations

import contextlib
import ctypes
import os

import torch


# Extra memory one chunk of a streamed torch computation may take. The torch backend splits
# row-wise work into chunks no larger than this, so peak memory does not grow with B*N.
_CHUNK_BYTES_DEFAULT = 64 << 20


def chunk_bytes() -> int:
    return int(float(os.environ.get("HIMNET_FAST_CHUNK_MB", "64")) * (1 << 20)) or _CHUNK_BYTES_DEFAULT


def dense_budget_bytes() -> int:
    """Largest dense adaptive graph (N*N, or B*N*N per-sample) the torch path materialises."""
    return int(float(os.environ.get("HIMNET_FAST_DENSE_BUDGET_MB", "256")) * (1 << 20))


def rows_per_chunk(row_bytes: int, total_rows: int) -> int:
    return max(1, min(total_rows, chunk_bytes() // max(1, row_bytes)))


def autocast_dtype(device: torch.device):
    """The autocast dtype active for ``device``, or None when autocast is off there."""
    dev = device.type
    if dev not in ("cuda", "cpu"):
        return None
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def compute_dtype(device: torch.device, *tensors: torch.Tensor) -> torch.dtype:
    """Autocast dtype if autocast is on for ``device``; else the tensors' promoted dtype."""
    ac = autocast_dtype(device)
    if ac is not None:
        return ac
    dt = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def no_autocast(device: torch.device):
    """Backends receive tensors already in the compute dtype and must not be re-cast inside."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def cast(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


def custom_op(name: str):
    """Decorator: register ``fn`` as the PyTorch custom op ``himnet_fast::<name>`` (schema from
    its annotations, no input mutated), for every device.

    Meta tensors run ``fn`` itself rather than the op's fake: the implementations are shape
    generic, and ahead-of-time compilation (:mod:`himnet_fast.aot`) drives the real Triton
    launchers with meta tensors. Fake tensors (``torch.compile``, ``opcheck``) use the fake the
    op module registers."""
    def wrap(fn):
        op = torch.library.custom_op(f"himnet_fast::{name}", fn, mutates_args=())
        op.register_kernel("meta")(fn)
        return op
    return wrap


def contiguous(out):
    """An op's output(s) made contiguous. Every custom op of the library returns contiguous
    tensors and its fake says so: ``torch.compile`` plans views from the fake's strides, so a
    strided real output (a transposed product, a slice of a gate) would break them at run time."""
    if isinstance(out, (tuple, list)):
        return type(out)(t.contiguous() for t in out)
    return out.contiguous()


def empty_like(t):
    """A contiguous fake (or buffer) with ``t``'s shape, dtype and device."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- CPU heap release

class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


_CALLS = 0     # calls of release_cpu_heap in this process (it trims on every period-th)
_LIBC = None   # (malloc_trim, mallinfo2) once looked up; False where glibc lacks them


def _glibc():
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            info = libc.mallinfo2      # glibc >= 2.33
            info.restype = _MallInfo2
            _LIBC = (libc.malloc_trim, info)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def heap_release_threshold() -> int:
    """Free heap bytes above which :func:`release_cpu_heap` trims; 0 disables it."""
    return int(float(os.environ.get("HIMNET_FAST_CPU_HEAP_RELEASE_MB", "64")) * (1 << 20))


def heap_release_period() -> int:
    """:func:`release_cpu_heap` trims on every this-many-th call (default 4)."""
    return max(1, int(os.environ.get("HIMNET_FAST_CPU_HEAP_RELEASE_EVERY", "4")))


def release_cpu_heap(device: torch.device) -> bool:
    """Give freed glibc heap pages back to the OS when many have piled up (CPU only).

    Why: PyTorch's CPU tensors come from glibc malloc, whose mmap threshold rises to the size
    of the largest block freed (up to 32 MiB). After the first large activation is freed, every
    per-step tensor of a recurrent training step lands in the heap, the heap fragments, and
    pages freed in its middle stay resident: at PEMS07 B=16 the process held about 1 GB for
    about 450 MiB of live tensors. A recomputed recurrent step calls this before it runs (in
    forward and in backward); on every ``$HIMNET_FAST_CPU_HEAP_RELEASE_EVERY``-th call (default
    4) with more than ``$HIMNET_FAST_CPU_HEAP_RELEASE_MB`` (default 64; 0 disables) free in the
    heap, ``malloc_trim(0)`` returns those pages (``MADV_DONTNEED``). Results are unchanged; the
    cost is the trim and the page faults of reusing the pages. Measured at PEMS07 B=16 on a
    2-core CPU: trimming on every call cut the peak RSS growth from ~1,020 to ~600 MiB for 17%
    more step time, every 4th call to ~645 MiB for 6%, every 12th to ~735 MiB for ~1%. A
    no-op off glibc. Returns whether it trimmed."""
    if device.type != "cpu":
        return False
    limit = heap_release_threshold()
    if limit <= 0:
        return False
    libc = _glibc()
    if not libc:
        return False
    global _CALLS
    _CALLS += 1
    if _CALLS % heap_release_period():
        return False
    trim, info = libc
    if info().fordblks < limit:
        return False
    trim(0)
    return True
