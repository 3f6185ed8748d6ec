"""The elementwise tail of a HimGCRU step, split at the second graph convolution.

HimNet's cell (names swapped relative to the textbook GRU, as in the original)::

    zr = sigmoid(gate(cat(x, h)));  z, r = zr[..., :H], zr[..., H:]
    hc = tanh(update(cat(x, z * h)))
    h' = r * h + (1 - r) * hc

``gcru_gate(pre_zr, h) -> (z * h, r)`` and ``gcru_update(pre_c, r, h) -> h'`` are the two
fusable pieces around the graph convolutions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _backend
from .._checks import check_same_device, check_tensor
from ._common import cast, compute_dtype, needs_grad, no_autocast

__all__ = ["gcru_gate", "gcru_update"]


def gcru_gate(pre_zr: torch.Tensor, h: torch.Tensor, *, backend: Optional[str] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """pre_zr (..., 2H) gate pre-activation, h (..., H) state -> (z * h, r), each (..., H)."""
    check_tensor("pre_zr", pre_zr)
    check_tensor("h", h)
    if pre_zr.shape[:-1] != h.shape[:-1] or pre_zr.shape[-1] != 2 * h.shape[-1]:
        raise ValueError(f"pre_zr must have shape (..., 2H) = {tuple(h.shape[:-1]) + (2 * h.shape[-1],)} "
                         f"for h of shape {tuple(h.shape)}, got {tuple(pre_zr.shape)}")
    check_same_device(pre_zr=pre_zr, h=h)
    dtype = compute_dtype(h.device, pre_zr, h)
    _, impl = _backend.resolve("gcru_gate", backend, h.device, needs_grad(pre_zr, h))
    with no_autocast(h.device):
        return impl.fn(cast(pre_zr, dtype), cast(h, dtype))


def gcru_update(pre_c: torch.Tensor, r: torch.Tensor, h: torch.Tensor, *,
                backend: Optional[str] = None) -> torch.Tensor:
    """pre_c, r, h (..., H) -> r * h + (1 - r) * tanh(pre_c)."""
    for name, t in (("pre_c", pre_c), ("r", r), ("h", h)):
        check_tensor(name, t)
        if t.shape != h.shape:
            raise ValueError(f"{name} must have the shape of h {tuple(h.shape)}, got {tuple(t.shape)}")
    check_same_device(pre_c=pre_c, r=r, h=h)
    dtype = compute_dtype(h.device, pre_c, r, h)
    _, impl = _backend.resolve("gcru_update", backend, h.device, needs_grad(pre_c, r, h))
    with no_autocast(h.device):
        return impl.fn(cast(pre_c, dtype), cast(r, dtype), cast(h, dtype))


def _torch_gcru_gate(pre_zr, h):
    H = h.shape[-1]
    zr = torch.sigmoid(pre_zr)
    return zr[..., :H] * h, zr[..., H:]


def _torch_gcru_update(pre_c, r, h):
    return r * h + (1 - r) * torch.tanh(pre_c)


_backend.register("gcru_gate", "torch", _torch_gcru_gate)
_backend.register("gcru_update", "torch", _torch_gcru_update)
