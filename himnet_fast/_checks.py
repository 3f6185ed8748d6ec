"""Argument checks shared by ops and modules: clear errors naming the argument, never a
device-side assert or a silent broadcast."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, ndim: Optional[Sequence[int] | int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got dtype {t.dtype}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    return t


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has {t.shape[dim]} {what} (dim {dim} of shape {tuple(t.shape)}), "
                         f"expected {expected}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"tensors must be on one device, got {desc}")


def check_cheb_k(cheb_k) -> int:
    if isinstance(cheb_k, bool) or not isinstance(cheb_k, int):
        raise TypeError(f"cheb_k must be an int, got {type(cheb_k).__name__}")
    if cheb_k < 2:
        raise ValueError(f"cheb_k must be >= 2 (T_0 = I and T_1 = A are always used), got {cheb_k}")
    return cheb_k


AXES = ("T", "S", "ST")


def check_axis(axis) -> str:
    if not isinstance(axis, str) or axis.upper() not in AXES:
        raise ValueError(f"axis must be one of {AXES} (case-insensitive), got {axis!r}")
    return axis.upper()

