"""Block-diagonal (intra-subgraph) attention and inter-subgraph attention for SBA.

Layout: after :meth:`Partition.to_parts`, node features are ``(B, P, M, d)``: ``P`` parts of
at most ``M`` nodes, padding slots flagged False in a ``(P, M)`` (or ``(B, P, M)``) mask. Heads
are folded into ``B`` by the caller.

:func:`block_attention` computes, for every part independently,
``softmax(q kᵀ * scale + key_padding_bias) v`` with padded query rows set to zero. The torch
backend is flash-style: it streams over chunks of parts (and, when one part alone is too big,
over blocks of query rows) so the ``M x M`` score block of only one chunk exists at a time,
keeps just the per-row log-sum-exp for backward, and recomputes the probabilities there. The
chunk working set is bounded by ``HIMNET_FAST_CHUNK_MB`` (default 64 MiB), like the other
streamed ops of the library. No ``P x M x M`` buffer is held across the op.

The op is the registered custom op ``himnet_fast::block_attention`` (outputs and per-row
log-sum-exp; its backward is ``himnet_fast::block_attention_backward``), dispatched like every
op of the library: torch (here) or triton (``kernels/block_attention.py``: opt-in, never chosen
automatically, since its kernels have been checked in the interpreter only).

Padding never enters a softmax: padded keys get probability exactly 0, a query row whose part
has no real key (an empty part) and every padded query row output exactly 0 and pass no
gradient, so there is no NaN anywhere.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from . import _triton
from ._common import chunk_bytes, contiguous, custom_op, empty_like, rows_per_chunk

__all__ = ["block_attention", "inter_attention", "part_mean"]


def _check(q, k, v, mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, P, M, d) tensor, got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, P, M, dv) with (B, P, M)={tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, P, M, _ = q.shape
    if mask is None:
        return torch.ones(1, P, M, dtype=torch.bool, device=q.device)
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor (True = real node, False = padding)")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or mask.shape[1:] != (P, M) or mask.shape[0] not in (1, B):
        raise ValueError(f"mask must be (P, M)=({P}, {M}) or (B, P, M), got {tuple(mask.shape)}")
    return mask.to(q.device)


def _chunks(B, P, M, d, dv, elsize):
    """(parts per chunk, query rows per chunk) so one chunk's working set fits the budget.

    The working set of a chunk of ``pc`` parts and ``mq`` query rows is at most three
    ``B*pc*mq*M`` score-sized buffers (the scores are turned into probabilities in place; in
    backward, probabilities and their gradient, plus one matmul output) plus row stats.
    """
    per_part = 3 * B * M * M * elsize + B * M * (2 * d + 2 * dv + 4) * elsize
    if per_part <= chunk_bytes():
        return rows_per_chunk(per_part, P), M
    per_row = 3 * B * M * elsize + B * (2 * d + 2 * dv + 4) * elsize
    return 1, rows_per_chunk(per_row, M)


def _scores(q, k, kmask, scale):
    """(B, pc, mq, M) scores with -inf on padded keys."""
    # in place: one score-sized buffer, not three
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    return s.masked_fill_(~kmask.unsqueeze(-2), float("-inf"))


def torch_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(out (B, P, M, dv), lse (B, P, M)): chunks of parts (and of query rows when one part is
    too big), each row's log-sum-exp kept for backward (+inf on rows without a real key)."""
    B, P, M, d = q.shape
    dv = v.shape[-1]
    mask = mask.expand(B, P, M)
    pc, qc = _chunks(B, P, M, d, dv, q.element_size())
    out = q.new_zeros(B, P, M, dv)
    lse = q.new_full((B, P, M), float("inf"))
    for p0 in range(0, P, pc):
        p1 = min(P, p0 + pc)
        km = mask[:, p0:p1]
        kk, vv = k[:, p0:p1], v[:, p0:p1]
        for r0 in range(0, M, qc):
            r1 = min(M, r0 + qc)
            s = _scores(q[:, p0:p1, r0:r1], kk, km, scale)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = s.sub_(m).exp_()          # in place: the scores are not needed again
            l = e.sum(-1, keepdim=True)
            qm = mask[:, p0:p1, r0:r1].unsqueeze(-1)
            ok = qm & (l > 0)     # real query with at least one real key
            e.div_(torch.where(ok, l, torch.ones_like(l))).mul_(ok)
            out[:, p0:p1, r0:r1] = torch.matmul(e, vv)
            # +inf log-sum-exp makes the recomputed probabilities exactly 0 on such rows
            lse[:, p0:p1, r0:r1] = torch.where(ok, m + torch.log(torch.where(ok, l, torch.ones_like(l))),
                                               torch.full_like(l, float("inf"))).squeeze(-1)
    return out, lse


def torch_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor, lse: Tensor,
               scale: float, needs) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dq, dk, dv) of :func:`torch_forward`, the probabilities recomputed chunk by chunk."""
    B, P, M, _ = q.shape
    mask = mask.expand(B, P, M)
    pc, qc = _chunks(B, P, M, q.shape[-1], v.shape[-1], q.element_size())
    dout = dout.contiguous()
    # D_i = sum_j P_ij dP_ij = <dO_i, O_i> (flash-attention identity)
    delta = (dout * out).sum(-1)
    dq = torch.zeros_like(q) if needs[0] else None
    dk = torch.zeros_like(k) if needs[1] else None
    dvv = torch.zeros_like(v) if needs[2] else None
    for p0 in range(0, P, pc):
        p1 = min(P, p0 + pc)
        km = mask[:, p0:p1]
        kk, vv = k[:, p0:p1], v[:, p0:p1]
        for r0 in range(0, M, qc):
            r1 = min(M, r0 + qc)
            qq = q[:, p0:p1, r0:r1]
            do = dout[:, p0:p1, r0:r1]
            s = _scores(qq, kk, km, scale)
            pr = s.sub_(lse[:, p0:p1, r0:r1].unsqueeze(-1)).exp_()   # 0 on masked rows/keys
            if dvv is not None:
                dvv[:, p0:p1] += torch.matmul(pr.transpose(-1, -2), do)
            dp = torch.matmul(do, vv.transpose(-1, -2))
            ds = dp.sub_(delta[:, p0:p1, r0:r1].unsqueeze(-1)).mul_(pr).mul_(scale)
            if dq is not None:
                dq[:, p0:p1, r0:r1] = torch.matmul(ds, kk)
            if dk is not None:
                dk[:, p0:p1] += torch.matmul(ds.transpose(-1, -2), qq)
    return dq, dk, dvv


_launch_forward = _triton.launcher("block_attention", "block_attention_forward")
_launch_backward = _triton.launcher("block_attention", "block_attention_backward")


def _stat_dtype(q: Tensor) -> torch.dtype:
    # fp64 inputs keep the statistics in fp64 so gradcheck holds; else fp32
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _triton_forward(q, k, v, mask, scale):
    """The triton launchers on (B, P, M, *) tensors: the parts are flattened to G = B*P
    contiguous rows and the mask to int8 for the kernels."""
    B, P, M, _ = q.shape
    o, lse = _launch_forward(*(_flat(t) for t in (q, k, v)), _flat_mask(mask, B, P, M), scale)
    return o.reshape(B, P, M, -1), lse.reshape(B, P, M)


def _triton_backward(dout, q, k, v, mask, out, lse, scale, needs):
    B, P, M, _ = q.shape
    qf, kf, vf, do, of = (_flat(t) for t in (q, k, v, dout, out))
    sd = _stat_dtype(qf)
    delta = (do.to(sd) * of.to(sd)).sum(-1).contiguous()
    grads = _launch_backward(qf, kf, vf, _flat_mask(mask, B, P, M), do, lse.reshape(B * P, M).contiguous(), delta,
                             scale)
    return tuple(g.reshape(B, P, M, -1) if n else None for g, n in zip(grads, needs))


def _flat(t: Tensor) -> Tensor:
    B, P, M, d = t.shape
    return t.reshape(B * P, M, d).contiguous()


def _flat_mask(mask: Tensor, B: int, P: int, M: int) -> Tensor:
    return mask.expand(B, P, M).reshape(B * P, M).to(torch.int8).contiguous()


_backend.register("block_attention", "torch", torch_forward, torch_backward)
_backend.register("block_attention", "triton", _triton_forward, _triton_backward, check=_triton.check)
# Opt-in only: the Triton kernels are validated in the interpreter, never measured on a GPU.
_AUTO = "torch"


@custom_op("block_attention")
def _block_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                     backend: str) -> Tuple[Tensor, Tensor]:
    return contiguous(_backend.impl("block_attention", backend).forward(q, k, v, mask, scale))


@_block_attention.register_fake
def _(q, k, v, mask, scale, backend):
    B, P, M, _ = q.shape
    return q.new_empty(B, P, M, v.shape[-1]), q.new_empty(B, P, M, dtype=_stat_dtype(q) if backend == "triton" else q.dtype)


@custom_op("block_attention_backward")
def _block_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor,
                              lse: Tensor, scale: float, backend: str, needs: List[bool]) -> List[Tensor]:
    grads = _backend.impl("block_attention", backend).backward(dout, q, k, v, mask, out, lse, scale, needs)
    return [g.contiguous() for g, n in zip(grads, needs) if n]


@_block_attention_backward.register_fake
def _(dout, q, k, v, mask, out, lse, scale, backend, needs):
    return [empty_like(t) for t, n in zip((q, k, v), needs) if n]


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = iter(_block_attention_backward(dout.contiguous(), q, k, v, mask, out, lse, ctx.scale, ctx.backend,
                                           needs))
    return (*(next(grads) if n else None for n in needs), None, None, None)


_block_attention.register_autograd(_backward, setup_context=_setup)


def block_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                    scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """Intra-part attention, independently in each of the P parts.

    Args:
        q, k: (B, P, M, d). v: (B, P, M, dv).
        mask: (P, M) or (B, P, M) bool, True on real nodes; None = no padding.
        scale: score scale, default 1/sqrt(d).
        backend: None/"auto" or "torch" (the streamed torch path), or "triton" (opt-in; CUDA,
            or CPU under TRITON_INTERPRET=1: slow, for tests). "cuda" has no implementation.

    Returns:
        (B, P, M, dv); exactly zero on padded query slots and in parts without a real node.
    """
    mask = _check(q, k, v, mask)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = _backend.normalize_backend(backend) or _AUTO
    name = _backend.resolve("block_attention", name, q.device, False)
    return _block_attention(q, k, v, mask, float(scale), name)[0]


def part_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-aware mean over the nodes of each part: (B, P, M, d) -> (B, P, d); 0 for an empty part."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, P, M, d), got {tuple(x.shape)}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    w = mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)          # (B|1, P, M, 1)
    cnt = w.sum(-2).clamp_min(1.0)
    return (x * w).sum(-2) / cnt


def inter_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    part_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """Attention among the P part tokens: (B, P, d) -> (B, P, dv).

    ``part_mask`` (P,) or (B, P) bool flags non-empty parts; empty parts are neither keys nor
    (non-zero) queries. P is small, so this is the same op with a single block of P tokens.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (B, P, d), got {tuple(q.shape)}")
    if part_mask is not None:
        part_mask = part_mask.reshape(-1, 1, q.shape[1])
    return block_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), part_mask, scale).squeeze(1)
