"""Triton kernels for the elementwise tail of a HimGCRU step.

``gcru_gate``:   pre (R, 2H), h (R, H) -> zh = sigmoid(pre[:, :H]) * h, r = sigmoid(pre[:, H:])
``gcru_update``: pre_c, r, h (R, H)    -> h' = r * h + (1 - r) * tanh(pre_c)

One program per block of R*H elements; element ``(row, col)`` reads ``pre[row, col]`` and
``pre[row, H + col]`` so the split of the gate never makes a copy. Activations are computed
in fp32 (or fp64 for fp64 inputs) and rounded once on store. Backward recomputes sigmoid /
tanh from the saved pre-activations instead of saving the activations: the ops keep only
(pre, h) resp. (pre_c, r, h), which exist anyway.

The module reads top to bottom: kernels, then launchers (``gcru_{gate,update}_{forward,backward}``),
which ``himnet_fast.ops.gcru`` registers as the ops' "triton" forward and backward.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, interpreting, needs_int64, round_in_interpreter, to_storage

__all__ = ["gcru_gate_forward", "gcru_gate_backward", "gcru_update_forward", "gcru_update_backward"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _offsets(BLOCK: tl.constexpr, OFF64: tl.constexpr):
    """This program's element indices; int64 when the tensors pass 2^31 elements (OFF64)."""
    pid = tl.program_id(0)
    if OFF64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _gcru_gate_fwd_kernel(pre_ptr, h_ptr, zh_ptr, r_ptr, total, H,
                          BLOCK: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr):
    offs = _offsets(BLOCK, OFF64)
    mask = offs < total
    row = offs // H
    col = offs % H
    pz = tl.load(pre_ptr + row * 2 * H + col, mask=mask, other=0.0).to(ACC)
    pr = tl.load(pre_ptr + row * 2 * H + H + col, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(zh_ptr + offs, to_storage(_sigmoid(pz) * h, zh_ptr.dtype.element_ty, RNE), mask=mask)
    tl.store(r_ptr + offs, to_storage(_sigmoid(pr), r_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _gcru_gate_bwd_kernel(pre_ptr, h_ptr, dzh_ptr, dr_ptr, dpre_ptr, dh_ptr, total, H,
                          BLOCK: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr):
    offs = _offsets(BLOCK, OFF64)
    mask = offs < total
    row = offs // H
    col = offs % H
    pz = tl.load(pre_ptr + row * 2 * H + col, mask=mask, other=0.0).to(ACC)
    pr = tl.load(pre_ptr + row * 2 * H + H + col, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    dzh = tl.load(dzh_ptr + offs, mask=mask, other=0.0).to(ACC)
    dr = tl.load(dr_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = _sigmoid(pz)
    r = _sigmoid(pr)
    dty = dpre_ptr.dtype.element_ty
    tl.store(dpre_ptr + row * 2 * H + col, to_storage(dzh * h * z * (1.0 - z), dty, RNE), mask=mask)
    tl.store(dpre_ptr + row * 2 * H + H + col, to_storage(dr * r * (1.0 - r), dty, RNE), mask=mask)
    tl.store(dh_ptr + offs, to_storage(dzh * z, dh_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _gcru_update_fwd_kernel(pre_ptr, r_ptr, h_ptr, out_ptr, total,
                            BLOCK: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr):
    offs = _offsets(BLOCK, OFF64)
    mask = offs < total
    c = _tanh(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(ACC))
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, to_storage(r * h + (1.0 - r) * c, out_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _gcru_update_bwd_kernel(pre_ptr, r_ptr, h_ptr, dout_ptr, dpre_ptr, dr_ptr, dh_ptr, total,
                            BLOCK: tl.constexpr, ACC: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr):
    offs = _offsets(BLOCK, OFF64)
    mask = offs < total
    c = _tanh(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(ACC))
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dpre_ptr + offs, to_storage(g * (1.0 - r) * (1.0 - c * c), dpre_ptr.dtype.element_ty, RNE), mask=mask)
    tl.store(dr_ptr + offs, to_storage(g * (h - c), dr_ptr.dtype.element_ty, RNE), mask=mask)
    tl.store(dh_ptr + offs, to_storage(g * r, dh_ptr.dtype.element_ty, RNE), mask=mask)


# --------------------------------------------------------------------------- launchers

def _block() -> Tuple[int, int]:
    """(BLOCK, num_warps): 1024 elements per program on GPU (4 per thread with 8 warps); the
    interpreter gets whole small tensors in few programs since its cost is per program."""
    if interpreting():
        return 4096, 1
    return 1024, 8


def _grid(total: int, block: int):
    return (triton.cdiv(total, block),)


def gcru_gate_forward(pre: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """pre (..., 2H), h (..., H) -> (zh, r), each (..., H) contiguous in h's dtype."""
    H = h.shape[-1]
    pre, h = pre.contiguous(), h.contiguous()
    zh, r = torch.empty_like(h), torch.empty_like(h)
    total = h.numel()
    if total:
        block, warps = _block()
        _gcru_gate_fwd_kernel[_grid(total, block)](pre, h, zh, r, total, H, BLOCK=block,
                                                   ACC=acc_dtype(h.dtype), RNE=round_in_interpreter(h.dtype),
                                                   OFF64=needs_int64(pre=pre), num_warps=warps)
    return zh, r


def gcru_gate_backward(pre: torch.Tensor, h: torch.Tensor, dzh: torch.Tensor, dr: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (dpre (..., 2H), dh (..., H))."""
    H = h.shape[-1]
    pre, h, dzh, dr = pre.contiguous(), h.contiguous(), dzh.contiguous(), dr.contiguous()
    dpre, dh = torch.empty_like(pre), torch.empty_like(h)
    total = h.numel()
    if total:
        block, warps = _block()
        _gcru_gate_bwd_kernel[_grid(total, block)](pre, h, dzh, dr, dpre, dh, total, H, BLOCK=block,
                                                   ACC=acc_dtype(h.dtype), RNE=round_in_interpreter(h.dtype),
                                                   OFF64=needs_int64(pre=pre), num_warps=warps)
    return dpre, dh


def gcru_update_forward(pre_c: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """pre_c, r, h (..., H) -> r * h + (1 - r) * tanh(pre_c), contiguous, h's dtype."""
    pre_c, r, h = pre_c.contiguous(), r.contiguous(), h.contiguous()
    out = torch.empty_like(h)
    total = h.numel()
    if total:
        block, warps = _block()
        _gcru_update_fwd_kernel[_grid(total, block)](pre_c, r, h, out, total, BLOCK=block,
                                                     ACC=acc_dtype(h.dtype), RNE=round_in_interpreter(h.dtype),
                                                     OFF64=needs_int64(h=h), num_warps=warps)
    return out


def gcru_update_backward(pre_c: torch.Tensor, r: torch.Tensor, h: torch.Tensor, dout: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dpre_c, dr, dh), each (..., H)."""
    pre_c, r, h, dout = pre_c.contiguous(), r.contiguous(), h.contiguous(), dout.contiguous()
    dpre, dr, dh = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
    total = h.numel()
    if total:
        block, warps = _block()
        _gcru_update_bwd_kernel[_grid(total, block)](pre_c, r, h, dout, dpre, dr, dh, total, BLOCK=block,
                                                     ACC=acc_dtype(h.dtype), RNE=round_in_interpreter(h.dtype),
                                                     OFF64=needs_int64(h=h), num_warps=warps)
    return dpre, dr, dh
