"""Triton kernels for ``adaptive_matmul``, the adaptive-graph product
``out[g] = softmax(relu(E[g] E[g]ᵀ), -1) @ V[g]``.

E (G, N, D) is both query and key; V (G, N, W). The static graph arrives as G = 1 with the
batch folded into the value columns (W = B*C, e.g. 16*64 = 1024); the per-sample decoder graph
as G = B. The scores are ``relu(q·k)`` with no scaling.

Forward (flash-attention style): one program per (row block, W tile, g) loops over key
blocks, keeps the online-softmax running max ``m`` and sum ``l`` in fp32 and accumulates
``p @ V_block`` into an fp32 (BLOCK_M, BLOCK_W) tile. Scores are never stored; W wider than
one tile is split over programs (each recomputes the cheap D-wide scores). It saves the
per-row ``lse = m + log(l)`` (fp32) for backward. Since relu makes every valid score >= 0,
``m`` starts at 0 instead of -inf: no inf - inf, and a row whose scores are all <= 0 gets
``p = exp(0 - log N) = 1/N`` exactly as softmax of zeros.

Backward (the flash-attention backward with the ReLU mask), three passes, no atomics:
* delta[i] = <dO_i, O_i> (the softmax backward's row term), fp32.
* dV: per (key block, W tile): ``dV_j = sum_i P_ijᵀ dO_i`` with P recomputed from lse.
* dE, query side: per (row block i, split of the key blocks): ``dE_i = sum_j dS_ij E_j``;
  key side: per (key block j, split of the query blocks): ``dE_j += sum_i dS_ijᵀ E_i``, adding
  into the query-side partial of the same split; the splits' fp32 partials are summed in a fixed
  order. ``dS = P ⊙ (dO Vᵀ - delta) ⊙ [s > 0]``; ``dO Vᵀ`` is reduced over all W inside the
  program. The split only exists to give the GPU enough programs (see ``de_splits``).
No buffer of size N×N exists at any point; extra memory is O(splits·G·N·D + G·N).

Offsets are int32 unless a tensor spans more than 2^31 - 1 elements (``OFF64``, see
``_utils.needs_int64``).

This is the ``adaptive_matmul`` primitive; the Chebyshev terms (``himnet_fast.ops.graph``) are
built on it. The module reads top to bottom: kernels, then launchers (``adaptive_matmul_forward``
/ ``adaptive_matmul_backward``), which ``himnet_fast.ops.adaptive_matmul`` registers as the op's
"triton" forward and backward (its autograd formula lives there).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._utils import (INTERPRET_BLOCK, MIN_DOT, acc_dtype, acc_torch_dtype, dot_dtype, dot_precision, interpreting,
                     needs_int64, num_sms, pow2_block, round_in_interpreter, to_storage, whole_block)

__all__ = ["adaptive_matmul_forward", "adaptive_matmul_backward"]


@triton.jit
def _adaptive_matmul_fwd_kernel(
    e_ptr, v_ptr, o_ptr, lse_ptr,
    N, D, W,
    se_g, se_n, se_d,
    sv_g, sv_n, sv_w,
    so_g, so_n, so_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n_w = tl.cdiv(W, BLOCK_W)
    pid_w = pid % n_w
    pid_m = pid // n_w
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rw = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    rd = tl.arange(0, BLOCK_D)
    m_mask = rm < N
    w_mask = rw < W
    d_mask = rd < D
    if OFF64:  # g * stride_g + row * stride_n can pass 2^31 (see needs_int64)
        g = g.to(tl.int64)
        rm = rm.to(tl.int64)
    e_g = e_ptr + g * se_g
    v_g = v_ptr + g * sv_g

    # Query rows: zero-padded to BLOCK_D >= 16 (tl.dot's minimum), which leaves q·k unchanged.
    eq = tl.load(e_g + rm[:, None] * se_n + rd[None, :] * se_d, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.zeros((BLOCK_M,), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        if OFF64:
            rn = rn.to(tl.int64)
        ek_t = tl.load(e_g + rn[None, :] * se_n + rd[:, None] * se_d, mask=d_mask[:, None] & n_mask[None, :],
                       other=0.0)
        s = tl.maximum(tl.dot(eq.to(DOT), ek_t.to(DOT), input_precision=PRECISION, out_dtype=ACC), 0.0)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Online softmax: rescale what was accumulated under the old running max.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_g + rn[:, None] * sv_n + rw[None, :] * sv_w, mask=n_mask[:, None] & w_mask[None, :],
                     other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(to_storage(p, vb.dtype, RNE).to(DOT), vb.to(DOT), acc, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_ptr + g * so_g + rm[:, None] * so_n + rw[None, :] * so_w, to_storage(out, o_ptr.dtype.element_ty, RNE),
             mask=m_mask[:, None] & w_mask[None, :])
    if pid_w == 0:
        tl.store(lse_ptr + g * N + rm, m_i + tl.log(l_i), mask=m_mask)


@triton.jit
def _adaptive_matmul_bwd_delta_kernel(
    do_ptr, o_ptr, delta_ptr,
    N, W,
    sdo_g, sdo_n, sdo_w,
    so_g, so_n, so_w,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr, OFF64: tl.constexpr,
):
    """delta[g, i] = sum_w dO[g, i, w] * O[g, i, w] in fp32.

    The launcher keeps BLOCK_M * BLOCK_W small (<= 16 elements per thread and tensor), so
    neither tile spills, and BLOCK_M small enough that the grid fills the GPU."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < N
    delta_out = delta_ptr + g * N + rm
    if OFF64:  # see _adaptive_matmul_fwd_kernel
        g = g.to(tl.int64)
        rm = rm.to(tl.int64)
    do_rows = do_ptr + g * sdo_g + rm * sdo_n
    o_rows = o_ptr + g * so_g + rm * so_n
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=ACC)
    for w0 in range(0, W, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        mask = m_mask[:, None] & (rw[None, :] < W)
        do = tl.load(do_rows[:, None] + rw[None, :] * sdo_w, mask=mask, other=0.0)
        o = tl.load(o_rows[:, None] + rw[None, :] * so_w, mask=mask, other=0.0)
        acc += do.to(ACC) * o.to(ACC)
    tl.store(delta_out, tl.sum(acc, axis=1), mask=m_mask)


@triton.jit
def _adaptive_matmul_bwd_dv_kernel(
    e_ptr, do_ptr, lse_ptr, dv_ptr,
    N, D, W,
    se_g, se_n, se_d,
    sdo_g, sdo_n, sdo_w,
    sdv_g, sdv_n, sdv_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr,
):
    """dV[g, j-block, w-tile] = sum over query blocks i of P_ijᵀ dO_i."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n_w = tl.cdiv(W, BLOCK_W)
    pid_w = pid % n_w
    pid_n = pid // n_w
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    rd = tl.arange(0, BLOCK_D)
    n_mask = rn < N
    w_mask = rw < W
    d_mask = rd < D
    lse_g = lse_ptr + g * N
    if OFF64:  # see _adaptive_matmul_fwd_kernel
        g = g.to(tl.int64)
        rn = rn.to(tl.int64)
    e_g = e_ptr + g * se_g

    ek = tl.load(e_g + rn[:, None] * se_n + rd[None, :] * se_d, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    dv = tl.zeros((BLOCK_N, BLOCK_W), dtype=ACC)
    for m0 in range(0, N, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < N
        lse = tl.load(lse_g + rm, mask=m_mask, other=0.0)
        if OFF64:
            rm = rm.to(tl.int64)
        eq_t = tl.load(e_g + rm[None, :] * se_n + rd[:, None] * se_d, mask=d_mask[:, None] & m_mask[None, :],
                       other=0.0)
        # sᵀ block (keys x queries); recomputed, never stored.
        s_t = tl.maximum(tl.dot(ek.to(DOT), eq_t.to(DOT), input_precision=PRECISION, out_dtype=ACC), 0.0)
        p_t = tl.where(m_mask[None, :], tl.exp(s_t - lse[None, :]), 0.0)
        do = tl.load(do_ptr + g * sdo_g + rm[:, None] * sdo_n + rw[None, :] * sdo_w,
                     mask=m_mask[:, None] & w_mask[None, :], other=0.0)
        dv = tl.dot(to_storage(p_t, do.dtype, RNE).to(DOT), do.to(DOT), dv, input_precision=PRECISION)
    tl.store(dv_ptr + g * sdv_g + rn[:, None] * sdv_n + rw[None, :] * sdv_w, to_storage(dv, dv_ptr.dtype.element_ty, RNE),
             mask=n_mask[:, None] & w_mask[None, :])


@triton.jit
def _adaptive_matmul_bwd_de_kernel(
    e_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, part_ptr,
    N, D, W, blocks_per_split,
    se_g, se_n, se_d,
    sv_g, sv_n, sv_w,
    sdo_g, sdo_n, sdo_w,
    KEY_SIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr,
    EB_FIRST: tl.constexpr,
):
    """dE contribution of E as query (KEY_SIDE False: own block = query rows i, loop over keys j,
    dE_i = sum_j dS_ij E_j) or as key (KEY_SIDE True: own block = key rows j, loop over
    queries i, dE_j = sum_i dS_ijᵀ E_i), over the ``blocks_per_split`` other-row blocks of
    split ``program_id(2)`` only.

    ``part_ptr`` is a contiguous (splits, G, N, D) buffer in the accumulation dtype: the query
    side writes split s's partial to ``part[s]``, the key side (the next launch, so ordered on
    the stream) adds its own to it, and the launcher sums the splits in a fixed order: the
    result is deterministic without atomics. Splitting the other rows gives the GPU enough
    programs when G * N / BLOCK_M alone does not (N = 883, G = 1: 14 row blocks for 132 SMs).
    Both sides use the same (own rows x other rows) orientation; only which of them plays
    query changes."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    n_graphs = tl.num_programs(1)
    ra = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # own rows
    rd = tl.arange(0, BLOCK_D)
    a_mask = ra < N
    d_mask = rd < D
    lse_g = lse_ptr + g * N
    delta_g = delta_ptr + g * N
    out = part_ptr + ((split * n_graphs + g) * N + ra[:, None]) * D + rd[None, :]
    if OFF64:  # see _adaptive_matmul_fwd_kernel
        g = g.to(tl.int64)
        ra = ra.to(tl.int64)
    e_g = e_ptr + g * se_g
    v_g = v_ptr + g * sv_g
    do_g = do_ptr + g * sdo_g

    ea = tl.load(e_g + ra[:, None] * se_n + rd[None, :] * se_d, mask=a_mask[:, None] & d_mask[None, :], other=0.0)
    if not KEY_SIDE:
        lse_a = tl.load(lse_g + ra, mask=a_mask, other=0.0)
        delta_a = tl.load(delta_g + ra, mask=a_mask, other=0.0)
    de = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    b_start = split * blocks_per_split * BLOCK_N
    b_end = tl.minimum(b_start + blocks_per_split * BLOCK_N, N)
    for b0 in range(b_start, b_end, BLOCK_N):
        rb = b0 + tl.arange(0, BLOCK_N)  # other rows
        b_mask = rb < N
        if KEY_SIDE:
            lse_b = tl.load(lse_g + rb, mask=b_mask, other=0.0)
            delta_b = tl.load(delta_g + rb, mask=b_mask, other=0.0)
        if OFF64:
            rb = rb.to(tl.int64)
        if EB_FIRST:
            # 16-bit inputs: E of the other rows is loaded before the W loop on purpose. Loaded
            # after it, Triton 3.6 (sm_90, W not a multiple of BLOCK_W) read its shared-memory
            # copy out of bounds (compute-sanitizer: invalid __shared__ read; an illegal memory
            # access on an H100 at G=16, N=883, W=67). fp32 ran correctly there and keeps the
            # later load, which spills nothing (held across the loop it costs 16 B of spill).
            eb = tl.load(e_g + rb[:, None] * se_n + rd[None, :] * se_d, mask=b_mask[:, None] & d_mask[None, :],
                         other=0.0)
        # dP (own x other) = dO_query · V_key, reduced over all W columns here; the scores are
        # formed after this loop so that only dp is live inside it (fewer registers).
        dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for w0 in range(0, W, BLOCK_W):
            rw = w0 + tl.arange(0, BLOCK_W)
            w_mask = rw < W
            if KEY_SIDE:
                va = tl.load(v_g + ra[:, None] * sv_n + rw[None, :] * sv_w, mask=a_mask[:, None] & w_mask[None, :],
                             other=0.0)
                do_t = tl.load(do_g + rb[None, :] * sdo_n + rw[:, None] * sdo_w,
                               mask=w_mask[:, None] & b_mask[None, :], other=0.0)
                dp = tl.dot(va.to(DOT), do_t.to(DOT), dp, input_precision=PRECISION)
            else:
                do = tl.load(do_g + ra[:, None] * sdo_n + rw[None, :] * sdo_w, mask=a_mask[:, None] & w_mask[None, :],
                             other=0.0)
                vb_t = tl.load(v_g + rb[None, :] * sv_n + rw[:, None] * sv_w, mask=w_mask[:, None] & b_mask[None, :],
                               other=0.0)
                dp = tl.dot(do.to(DOT), vb_t.to(DOT), dp, input_precision=PRECISION)
        eb_t = tl.load(e_g + rb[None, :] * se_n + rd[:, None] * se_d, mask=d_mask[:, None] & b_mask[None, :],
                       other=0.0)
        # s is symmetric (E Eᵀ), so own x other is s[i, j] on the query side and sᵀ on the key side.
        s = tl.dot(ea.to(DOT), eb_t.to(DOT), input_precision=PRECISION, out_dtype=ACC)
        if KEY_SIDE:
            p = tl.exp(tl.maximum(s, 0.0) - lse_b[None, :])
            ds = p * (dp - delta_b[None, :])
        else:
            p = tl.exp(tl.maximum(s, 0.0) - lse_a[:, None])
            ds = p * (dp - delta_a[:, None])
        # ReLU mask: relu'(s) = 0 for s <= 0 (torch's convention); padded rows/cols drop out too.
        ds = tl.where((s > 0) & a_mask[:, None] & b_mask[None, :], ds, 0.0)
        if not EB_FIRST:
            eb = tl.load(e_g + rb[:, None] * se_n + rd[None, :] * se_d, mask=b_mask[:, None] & d_mask[None, :],
                         other=0.0)
        de = tl.dot(to_storage(ds, eb.dtype, RNE).to(DOT), eb.to(DOT), de, input_precision=PRECISION)

    o_mask = a_mask[:, None] & d_mask[None, :]
    if KEY_SIDE:
        de += tl.load(out, mask=o_mask, other=0.0)
    tl.store(out, de, mask=o_mask)


# --------------------------------------------------------------------------- launchers

def _blocks(N: int, D: int, W: int, w_cap: int) -> Tuple[int, int, int, int]:
    block_m = pow2_block(N, 64)
    block_n = pow2_block(N, 64)
    return block_m, block_n, whole_block(D), pow2_block(W, w_cap)


def w_tile(W: int, cap: int) -> int:
    """Width of the W tiles of a loop over W inside one program (dE, delta).

    The widest power of two in [16, cap] whose padding (W rounded up to the tile) costs at
    most 25 % extra columns, else the one with the least padding: W = 67 gets 16 (80
    columns, 1.19x) instead of 64 (128 columns, 1.91x), W = 1024 gets ``cap``. Narrow tiles
    only cost more loop iterations here, since nothing is recomputed per tile."""
    cap = pow2_block(W, cap)
    best, b = cap, cap
    while b >= MIN_DOT:
        padded = triton.cdiv(W, b) * b
        if padded * 4 <= W * 5:
            return b
        if padded < triton.cdiv(W, best) * best:
            best = b
        b //= 2
    return best


def de_splits(G: int, N: int, D: int, block_m: int, block_n: int, device: torch.device) -> int:
    """Splits of the other-row loop of the dE kernels: about 4 programs per SM when the row
    blocks alone give fewer (N = 883, G = 1: 14 row blocks, so 14 splits of one key block each
    on an H100), at most one per other-row block, and the fp32 partials under 64 MB."""
    rows = triton.cdiv(N, block_m) * G
    want = triton.cdiv(4 * num_sms(device), rows)
    most = triton.cdiv(N, block_n)
    by_mem = max(1, (64 << 20) // max(G * N * D * 4, 1))
    return max(1, min(want, most, by_mem))


def _delta_blocks(G: int, N: int, W: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_W) of the delta kernel: at most 2048 elements per tile (16 per thread
    per tensor with 4 warps: no spills), and fewer rows per program until the grid has two
    programs per SM or the tile is 4 rows high."""
    block_w = w_tile(W, 128)
    block_m = max(1, min(64, 2048 // block_w))
    while block_m > 4 and triton.cdiv(N, block_m) * G < 2 * num_sms(device):
        block_m //= 2
    if interpreting():
        block_m = min(block_m, INTERPRET_BLOCK)
    return block_m, block_w


def _check(e: torch.Tensor, v: torch.Tensor) -> None:
    if e.shape[0] > 65535:
        raise ValueError(f"embedding has {e.shape[0]} graphs (dim 0 of shape {tuple(e.shape)}); the Triton "
                         "kernels launch one grid row per graph, at most 65535")


def adaptive_matmul_forward(e: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """e (G, N, D), v (G, N, W) -> (out (G, N, W) in v's dtype, lse (G, N) fp32 row logsumexp).

    Inputs may be non-contiguous (read through strides)."""
    G, N, D = e.shape
    W = v.shape[-1]
    out = torch.empty(G, N, W, device=v.device, dtype=v.dtype)
    lse = torch.empty(G, N, device=v.device, dtype=acc_torch_dtype(v.dtype))
    if out.numel() == 0:
        lse.fill_(math.log(max(N, 1)))  # softmax of zeros over N columns
        return out, lse
    _check(e, v)
    off64 = needs_int64(embedding=e, v=v, out=out)
    block_m, block_n, block_d, block_w = _blocks(N, D, W, 128)
    grid = (triton.cdiv(N, block_m) * triton.cdiv(W, block_w), G)
    _adaptive_matmul_fwd_kernel[grid](
        e, v, out, lse, N, D, W,
        *e.stride(), *v.stride(), *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_W=block_w,
        PRECISION=dot_precision(v.dtype), ACC=acc_dtype(v.dtype), DOT=dot_dtype(v.dtype),
        RNE=round_in_interpreter(v.dtype), OFF64=off64, num_warps=4 if block_w <= 64 else 8,
    )
    return out, lse


def adaptive_matmul_backward(dout: torch.Tensor, e: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, need_e: bool = True, need_v: bool = True):
    """Gradients of :func:`adaptive_matmul_forward` from what it saved (E, V, out, lse).

    Returns (de (G, N, D) in e's dtype or None, dv (G, N, W) in v's dtype or None)."""
    G, N, D = e.shape
    W = v.shape[-1]
    de = dv = None
    acc_t, acc_tl = acc_torch_dtype(v.dtype), acc_dtype(v.dtype)
    precision = dot_precision(v.dtype)
    if G * N == 0 or W == 0 or D == 0:
        return (torch.zeros_like(e) if need_e else None), (torch.zeros_like(v) if need_v else None)
    _check(e, v)
    off64 = needs_int64(embedding=e, v=v, dout=dout, out=out)
    block_m, block_n, block_d, block_w = _blocks(N, D, W, 64)
    dot_dt, rne = dot_dtype(v.dtype), round_in_interpreter(v.dtype)
    # Exact fp32 dots run on FMA units and hold their operands in registers: with 4 warps the
    # dV and dE kernels spill on sm_90 (bench/results/aot/), so they get 8 warps and dE
    # 32 x 16 blocks. TF32/bf16 (tensor cores) keep 4 warps.
    exact_fp32 = v.dtype == torch.float32 and precision == "ieee"
    warps = 8 if exact_fp32 else 4

    if need_v:
        dv = torch.empty(G, N, W, device=v.device, dtype=v.dtype)
        _adaptive_matmul_bwd_dv_kernel[(triton.cdiv(N, block_n) * triton.cdiv(W, block_w), G)](
            e, dout, lse, dv, N, D, W,
            *e.stride(), *dout.stride(), *dv.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_W=block_w,
            PRECISION=precision, ACC=acc_tl, DOT=dot_dt, RNE=rne, OFF64=off64, num_warps=warps,
        )
    if need_e and N == 1:
        # softmax over one column is identically 1: dE is exactly 0 (the general formula gives
        # dO·V - dO·O, zero only up to the round-off of two different summation orders).
        de = torch.zeros_like(e)
    elif need_e:
        delta = torch.empty(G, N, device=v.device, dtype=acc_t)
        dm, dw = _delta_blocks(G, N, W, v.device)
        _adaptive_matmul_bwd_delta_kernel[(triton.cdiv(N, dm), G)](
            dout, out, delta, N, W, *dout.stride(), *out.stride(),
            # 8 warps for the larger tiles: at 4 warps the 32 x 64 tile spilled 8 B in two of its
            # integer specialisations (bench/results/aot/).
            BLOCK_M=dm, BLOCK_W=dw, ACC=acc_tl, OFF64=off64, num_warps=8 if dm * dw >= 2048 else 4,
        )
        # Own x other rows 64 x 32 (32 x 16 for exact fp32), W tiles <= 32 wide: the dE
        # kernels' live tiles (dp, s, p, ds: own x other, fp32) fit in registers without
        # spilling at any model shape (bench/results/aot/).
        de_m, de_n = (pow2_block(N, 32), pow2_block(N, 16)) if exact_fp32 else (block_m, pow2_block(N, 32))
        de_w = w_tile(W, 32)
        n_split = de_splits(G, N, D, de_m, de_n, e.device)
        per_split = triton.cdiv(triton.cdiv(N, de_n), n_split)
        n_split = triton.cdiv(triton.cdiv(N, de_n), per_split)
        part = torch.empty(n_split, G, N, D, device=e.device, dtype=acc_t)
        # Query side writes, then key side adds: two ordered passes instead of atomics.
        for key_side in (False, True):
            _adaptive_matmul_bwd_de_kernel[(triton.cdiv(N, de_m), G, n_split)](
                e, v, dout, lse, delta, part, N, D, W, per_split,
                *e.stride(), *v.stride(), *dout.stride(),
                KEY_SIDE=key_side,
                BLOCK_M=de_m, BLOCK_N=de_n, BLOCK_D=block_d, BLOCK_W=de_w,
                PRECISION=precision, ACC=acc_tl, DOT=dot_dt, RNE=rne, OFF64=off64,
                EB_FIRST=v.dtype in (torch.float16, torch.bfloat16), num_warps=warps,
            )
        # Fixed-order sum over the splits: deterministic.
        de = (part[0] if n_split == 1 else part.sum(0)).to(e.dtype)
    return de, dv
