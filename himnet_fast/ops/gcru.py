"""The elementwise tail of a HimGCRU step, split at the second graph convolution.

HimNet's cell (names swapped relative to the textbook GRU, as in the original)::

    zr = sigmoid(gate(cat(x, h)));  z, r = zr[..., :H], zr[..., H:]
    hc = tanh(update(cat(x, z * h)))
    h' = r * h + (1 - r) * hc

``gcru_gate(pre_zr, h) -> (z * h, r)`` and ``gcru_update(pre_c, r, h) -> h'`` are the two
fusable pieces around the graph convolutions: registered custom ops
(``himnet_fast::gcru_gate``, ``himnet_fast::gcru_update``) whose backward recomputes the
activations from the saved inputs. Backends: torch (here), triton (``kernels/gcru.py``), cuda
(``csrc/gcru.cu``, forward only).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_same_device, check_tensor
from . import _cuda, _triton
from ._common import cast, compute_dtype, contiguous, custom_op, empty_like, needs_grad, no_autocast

__all__ = ["gcru_gate", "gcru_update", "apply_gate", "apply_update"]


def gcru_gate(pre_zr: Tensor, h: Tensor, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """pre_zr (..., 2H) gate pre-activation, h (..., H) state -> (z * h, r), each (..., H)."""
    check_tensor("pre_zr", pre_zr)
    check_tensor("h", h)
    if pre_zr.shape[:-1] != h.shape[:-1] or pre_zr.shape[-1] != 2 * h.shape[-1]:
        raise ValueError(f"pre_zr must have shape (..., 2H) = {tuple(h.shape[:-1]) + (2 * h.shape[-1],)} "
                         f"for h of shape {tuple(h.shape)}, got {tuple(pre_zr.shape)}")
    check_same_device(pre_zr=pre_zr, h=h)
    dtype = compute_dtype(h.device, pre_zr, h)
    with no_autocast(h.device):
        return apply_gate(cast(pre_zr, dtype), cast(h, dtype), backend)


def gcru_update(pre_c: Tensor, r: Tensor, h: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """pre_c, r, h (..., H) -> r * h + (1 - r) * tanh(pre_c)."""
    for name, t in (("pre_c", pre_c), ("r", r), ("h", h)):
        check_tensor(name, t)
        if t.shape != h.shape:
            raise ValueError(f"{name} must have the shape of h {tuple(h.shape)}, got {tuple(t.shape)}")
    check_same_device(pre_c=pre_c, r=r, h=h)
    dtype = compute_dtype(h.device, pre_c, r, h)
    with no_autocast(h.device):
        return apply_update(cast(pre_c, dtype), cast(r, dtype), cast(h, dtype), backend)


def apply_gate(pre_zr: Tensor, h: Tensor, backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    """:func:`gcru_gate` on validated inputs of one dtype (the entry of the layers above)."""
    zh, r = _gcru_gate(pre_zr, h, _backend.resolve("gcru_gate", backend, h.device, needs_grad(pre_zr, h)))
    return zh, r


def apply_update(pre_c: Tensor, r: Tensor, h: Tensor, backend: Optional[str]) -> Tensor:
    """:func:`gcru_update` on validated inputs of one dtype (the entry of the layers above)."""
    return _gcru_update(pre_c, r, h, _backend.resolve("gcru_update", backend, h.device, needs_grad(pre_c, r, h)))


# --------------------------------------------------------------------------- torch backend

# The backward formulas are autograd's own (aten's sigmoid/tanh backward, the same products in
# the same order), so the torch backend gives bitwise the gradients plain autograd would.

def gate_forward(pre: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
    # One sigmoid over the contiguous pre-activation (a strided half takes another CPU code path
    # with other rounding), then r copied out of it: op outputs are contiguous.
    H = h.shape[-1]
    zr = torch.sigmoid(pre)
    return zr[..., :H] * h, zr[..., H:].contiguous()


def gate_backward(pre: Tensor, h: Tensor, dzh: Tensor, dr: Tensor) -> Tuple[Tensor, Tensor]:
    """(dpre (..., 2H), dh (..., H)) from the gradients of (z * h, r)."""
    H = h.shape[-1]
    zr = torch.sigmoid(pre)
    dzr = torch.cat([dzh * h, dr], dim=-1)
    return torch.ops.aten.sigmoid_backward(dzr, zr), dzh * zr[..., :H]


def update_forward(pre_c: Tensor, r: Tensor, h: Tensor) -> Tensor:
    return r * h + (1 - r) * torch.tanh(pre_c)


def update_backward(pre_c: Tensor, r: Tensor, h: Tensor, dout: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(dpre_c, dr, dh) from the gradient of the new state."""
    hc = torch.tanh(pre_c)
    dpre = torch.ops.aten.tanh_backward(dout * (1 - r), hc)
    return dpre, dout * h - dout * hc, dout * r


# --------------------------------------------------------------------------- cuda backend

def cuda_gate_forward(pre: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
    """csrc/gcru.cu: (sigmoid(pre[..., :H]) * h, sigmoid(pre[..., H:])), each (..., H)."""
    code, index, stream = _cuda.launch_args(h, pre)
    pre, h = pre.contiguous(), h.contiguous()
    zh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    r = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    H = h.shape[-1] if h.dim() else 1
    if h.numel() == 0:
        return zh, r
    _cuda.ext().gcru_gate(_cuda.ptr(pre), _cuda.ptr(h), _cuda.ptr(zh), _cuda.ptr(r), h.numel() // H, H, code,
                          index, stream)
    return zh, r


def cuda_update_forward(pre_c: Tensor, r: Tensor, h: Tensor) -> Tensor:
    """csrc/gcru.cu: r * h + (1 - r) * tanh(pre_c)."""
    code, index, stream = _cuda.launch_args(h, pre_c, r)
    pre_c, r, h = pre_c.contiguous(), r.contiguous(), h.contiguous()
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    _cuda.ext().gcru_update(_cuda.ptr(pre_c), _cuda.ptr(r), _cuda.ptr(h), _cuda.ptr(out), h.numel(), code, index,
                            stream)
    return out


_backend.register("gcru_gate", "torch", gate_forward, gate_backward)
_backend.register("gcru_gate", "triton", _triton.launcher("gcru", "gcru_gate_forward"),
                  _triton.launcher("gcru", "gcru_gate_backward"), check=_triton.check)
_backend.register("gcru_gate", "cuda", cuda_gate_forward, check=_cuda.check)
_backend.register("gcru_update", "torch", update_forward, update_backward)
_backend.register("gcru_update", "triton", _triton.launcher("gcru", "gcru_update_forward"),
                  _triton.launcher("gcru", "gcru_update_backward"), check=_triton.check)
_backend.register("gcru_update", "cuda", cuda_update_forward, check=_cuda.check)


# --------------------------------------------------------------------------- the custom ops

@custom_op("gcru_gate")
def _gcru_gate(pre: Tensor, h: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    with no_autocast(h.device):
        return contiguous(_backend.impl("gcru_gate", backend).forward(pre, h))


@_gcru_gate.register_fake
def _(pre, h, backend):
    return empty_like(h), empty_like(h)


@custom_op("gcru_gate_backward")
def _gcru_gate_backward(pre: Tensor, h: Tensor, dzh: Tensor, dr: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    with no_autocast(h.device):
        dpre, dh = _backend.impl("gcru_gate", backend).backward(pre, h, dzh, dr)
    return dpre.reshape(pre.shape).contiguous(), dh.reshape(h.shape).contiguous()


@_gcru_gate_backward.register_fake
def _(pre, h, dzh, dr, backend):
    return empty_like(pre), empty_like(h)


def _setup_gate(ctx, inputs, output):
    pre, h, backend = inputs
    ctx.save_for_backward(pre, h)
    ctx.backend = backend


def _backward_gate(ctx, dzh, dr):
    pre, h = ctx.saved_tensors
    dzh = torch.zeros_like(h) if dzh is None else dzh
    dr = torch.zeros_like(h) if dr is None else dr
    dpre, dh = _gcru_gate_backward(pre, h, dzh, dr, ctx.backend)
    return dpre, dh, None


_gcru_gate.register_autograd(_backward_gate, setup_context=_setup_gate)


@custom_op("gcru_update")
def _gcru_update(pre_c: Tensor, r: Tensor, h: Tensor, backend: str) -> Tensor:
    with no_autocast(h.device):
        return contiguous(_backend.impl("gcru_update", backend).forward(pre_c, r, h))


@_gcru_update.register_fake
def _(pre_c, r, h, backend):
    return empty_like(h)


@custom_op("gcru_update_backward")
def _gcru_update_backward(pre_c: Tensor, r: Tensor, h: Tensor, dout: Tensor, backend: str) -> List[Tensor]:
    with no_autocast(h.device):
        return list(contiguous(_backend.impl("gcru_update", backend).backward(pre_c, r, h, dout)))


@_gcru_update_backward.register_fake
def _(pre_c, r, h, dout, backend):
    return [empty_like(h), empty_like(h), empty_like(h)]


def _setup_update(ctx, inputs, output):
    pre_c, r, h, backend = inputs
    ctx.save_for_backward(pre_c, r, h)
    ctx.backend = backend


def _backward_update(ctx, dout):
    pre_c, r, h = ctx.saved_tensors
    dpre, dr, dh = _gcru_update_backward(pre_c, r, h, dout.contiguous(), ctx.backend)
    return dpre, dr, dh, None


_gcru_update.register_autograd(_backward_update, setup_context=_setup_update)
