"""Triton kernels for ``block_attention``: flash-style block-diagonal attention for SBA
(``himnet_fast.ops.block_attention``).

Layout: q, k (G, M, d), v (G, M, dv) contiguous with G = B*P (one program column per part of
one sample), key/query mask (G, M) int8 (1 = real node). Forward: online softmax over key
blocks, writes O and the per-row log-sum-exp L (+inf on rows that must output 0: padded queries
and parts without a real key). Backward: ``dK, dV`` per key block looping over query blocks,
``dQ`` per query block looping over key blocks, with ``P = exp(S - L)`` recomputed and
``dS = P * (dO Vᵀ - delta)``, ``delta = rowsum(dO * O)`` given by the caller.

The module reads top to bottom: kernels, then launchers (``block_attention_forward`` /
``block_attention_backward``), which ``himnet_fast.ops.block_attention`` registers as the op's
"triton" forward and backward.
"""
import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, acc_torch_dtype

__all__ = ["block_attention_forward", "block_attention_backward"]

NEG = -1.0e30


@triton.jit
def _block_attention_fwd_kernel(Q, K, V, MSK, O, L, M, D, DV, scale,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    qmask = tl.load(MSK + g * M + rm, mask=rm < M, other=0) != 0
    q = tl.load(Q + g * M * D + rm[:, None] * D + rd[None, :], mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], NEG, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kmask = tl.load(MSK + g * M + rn, mask=rn < M, other=0) != 0
        k = tl.load(K + g * M * D + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < M) & (rd[None, :] < D), other=0.0)
        v = tl.load(V + g * M * DV + rn[:, None] * DV + rdv[None, :], mask=(rn[:, None] < M) & (rdv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(kmask[None, :], s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # masked keys contribute exactly 0 even while every key so far was masked (m_new = NEG)
        p = tl.where(kmask[None, :], tl.exp(s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    ok = qmask & (l_i > 0)
    l_safe = tl.where(ok, l_i, 1.0)
    out = tl.where(ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(ok, m_i + tl.log(l_safe), float("inf"))
    tl.store(O + g * M * DV + rm[:, None] * DV + rdv[None, :], out.to(O.dtype.element_ty),
             mask=(rm[:, None] < M) & (rdv[None, :] < DV))
    tl.store(L + g * M + rm, lse, mask=rm < M)


@triton.jit
def _block_attention_bwd_dkdv_kernel(Q, K, V, MSK, DO, L, DELTA, DK, DVV, M, D, DV, scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    kmask = tl.load(MSK + g * M + rn, mask=rn < M, other=0) != 0
    k = tl.load(K + g * M * D + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < M) & (rd[None, :] < D), other=0.0)
    v = tl.load(V + g * M * DV + rn[:, None] * DV + rdv[None, :], mask=(rn[:, None] < M) & (rdv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        q = tl.load(Q + g * M * D + rm[:, None] * D + rd[None, :], mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
        do = tl.load(DO + g * M * DV + rm[:, None] * DV + rdv[None, :], mask=(rm[:, None] < M) & (rdv[None, :] < DV), other=0.0)
        lse = tl.load(L + g * M + rm, mask=rm < M, other=float("inf"))
        delta = tl.load(DELTA + g * M + rm, mask=rm < M, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        # +inf lse (rows that output 0) and masked keys give exactly 0
        p = tl.where(kmask[None, :] & (lse[:, None] < float("inf")), tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None]) * scale
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    tl.store(DK + g * M * D + rn[:, None] * D + rd[None, :], dk.to(DK.dtype.element_ty),
             mask=(rn[:, None] < M) & (rd[None, :] < D))
    tl.store(DVV + g * M * DV + rn[:, None] * DV + rdv[None, :], dv.to(DVV.dtype.element_ty),
             mask=(rn[:, None] < M) & (rdv[None, :] < DV))


@triton.jit
def _block_attention_bwd_dq_kernel(Q, K, V, MSK, DO, L, DELTA, DQ, M, D, DV, scale,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rdv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + g * M * D + rm[:, None] * D + rd[None, :], mask=(rm[:, None] < M) & (rd[None, :] < D), other=0.0)
    do = tl.load(DO + g * M * DV + rm[:, None] * DV + rdv[None, :], mask=(rm[:, None] < M) & (rdv[None, :] < DV), other=0.0)
    lse = tl.load(L + g * M + rm, mask=rm < M, other=float("inf"))
    delta = tl.load(DELTA + g * M + rm, mask=rm < M, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, M, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kmask = tl.load(MSK + g * M + rn, mask=rn < M, other=0) != 0
        k = tl.load(K + g * M * D + rn[:, None] * D + rd[None, :], mask=(rn[:, None] < M) & (rd[None, :] < D), other=0.0)
        v = tl.load(V + g * M * DV + rn[:, None] * DV + rdv[None, :], mask=(rn[:, None] < M) & (rdv[None, :] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        p = tl.where(kmask[None, :] & (lse[:, None] < float("inf")), tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None]) * scale
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + g * M * D + rm[:, None] * D + rd[None, :], dq.to(DQ.dtype.element_ty),
             mask=(rm[:, None] < M) & (rd[None, :] < D))


def _blocks(M, d, dv):
    bd = max(16, triton.next_power_of_2(d))
    bdv = max(16, triton.next_power_of_2(dv))
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    return bm, bm, bd, bdv


def block_attention_forward(q, k, v, mask, scale):
    """q, k (G, M, d), v (G, M, dv), mask (G, M) int8 -> O (G, M, dv), L (G, M) (fp32; fp64 for fp64)."""
    G, M, d = q.shape
    dv = v.shape[-1]
    o = torch.empty(G, M, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(G, M, device=q.device, dtype=acc_torch_dtype(q.dtype))
    bm, bn, bd, bdv = _blocks(M, d, dv)
    _block_attention_fwd_kernel[(triton.cdiv(M, bm), G)](
        q, k, v, mask, o, lse, M, d, dv, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc_dtype(q.dtype))
    return o, lse


def block_attention_backward(q, k, v, mask, do, lse, delta, scale):
    """Gradients (dq, dk, dv) of :func:`block_attention_forward`; ``delta = rowsum(do * o)``
    (G, M) in ``acc_torch_dtype(q.dtype)``."""
    G, M, d = q.shape
    dv_ = v.shape[-1]
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn, bd, bdv = _blocks(M, d, dv_)
    _block_attention_bwd_dkdv_kernel[(triton.cdiv(M, bn), G)](
        q, k, v, mask, do, lse, delta, dk, dvv, M, d, dv_, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc_dtype(q.dtype))
    _block_attention_bwd_dq_kernel[(triton.cdiv(M, bm), G)](
        q, k, v, mask, do, lse, delta, dq, M, d, dv_, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc_dtype(q.dtype))
    return dq, dk, dvv
