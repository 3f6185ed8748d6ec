"""Helpers shared by the op front-ends: autocast handling and memory budgets."""
from __future__ import annotations

import contextlib
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


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
