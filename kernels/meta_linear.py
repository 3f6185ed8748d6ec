"""Triton kernels for the pool-weighted meta-parameter linear.

``y[r] = sum_d q[r, d] * (x[r] @ P[d]) + q[r] @ Pb`` for rows ``r = (b, n)`` of x (B, N, I),
pool P (D, I, O), bias pool Pb (D, O), where the query row of ``r`` is ``q[b]`` (axis "T"),
``q[n]`` ("S") or ``q[b, n]`` ("ST").

Rows are addressed as (group g, member m) with two strides, so the three axes and
non-contiguous inputs share one kernel without copies:

=====  ============  ============  ==========================================
axis   group g       member m      query row
=====  ============  ============  ==========================================
"T"    b  (G = B)    n  (M = N)    q[g]       (shared by the group)
"S"    n  (G = N)    b  (M = B)    q[g]       (shared by the group)
"ST"   b  (G = B)    n  (M = N)    q[g, m]    (one per row: PER_ROW)
=====  ============  ============  ==========================================

Forward, shared query ("T"/"S"): per (group, row tile, O tile) the kernel forms the weight
tile ``W = sum_d q[g, d] P[d]`` in registers (fp32) K-slice by K-slice and multiplies.
Forward, PER_ROW ("ST"): the Khatri-Rao form ``y = (q ⊗ x) @ P.reshape(D*I, O)``; for each
K-slice of x and each d the x tile is scaled by its rows' ``q[:, d]`` and fed to one
accumulating ``tl.dot`` with ``P[d]``. Neither reads or writes anything but x, q, P, Pb, y:
the (B, N, I, O) generated weight never exists.

Backward (``meta_linear_backward``):
* ``dx = sum_d q_d (dy @ P_dᵀ)``: the forward kernel with P's I/O strides swapped (shared
  query), or fused into the dq kernel (PER_ROW), which already forms ``dy @ P_dᵀ``.
* ``dq[r, d] = <x[r], dy[r] @ P_dᵀ>`` per row, summed over the group for "T"/"S".
* ``dP_d = (q_d ⊙ x)ᵀ dy`` with split-K over rows: every split writes its own fp32 partial
  and torch sums them in a fixed order. No atomics anywhere, so the result is bitwise
  deterministic, with or without ``torch.use_deterministic_algorithms(True)``.
* Bias terms (``dPb = qᵀ dy``, ``dq += dy @ Pbᵀ``) are (rows, D) x (D, O) products: torch.

The module reads top to bottom: kernels, then launchers (``meta_linear_forward`` /
``meta_linear_backward``: allocation, grids, block sizes), which ``himnet_fast.ops.meta_linear``
registers as the op's "triton" forward and backward (its autograd formula lives there).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (acc_dtype, acc_torch_dtype, check_rows, dot_dtype, dot_precision, interpreting, needs_int64,
                     num_sms, pow2_block, round_in_interpreter, to_storage, whole_block)

__all__ = ["meta_linear_forward", "meta_linear_backward"]


@triton.jit
def _meta_linear_fwd_kernel(
    x_ptr, q_ptr, p_ptr, pb_ptr, y_ptr,
    G, M, K, O, D,
    sx_g, sx_m, sx_k,
    sq_g, sq_m, sq_d,
    sp_d, sp_k, sp_o,
    spb_d, spb_o,
    sy_g, sy_m, sy_o,
    PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr,
):
    """y (rows, O) = sum_d q_d * (x (rows, K) @ P_d (K, O)) [+ q @ Pb]."""
    pid = tl.program_id(0)
    n_o = tl.cdiv(O, BLOCK_O)
    pid_o = pid % n_o
    pid_r = pid // n_o
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = ro < O
    rk = tl.arange(0, BLOCK_K)

    # Row addressing: PER_ROW tiles run over all G*M rows (each row has its own query);
    # shared-query tiles stay inside one group so that one weight tile serves the whole tile.
    if PER_ROW:
        rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = rr < G * M
        gi = rr // M  # row counts stay far below 2^31: divide in int32 (cheap)...
        mi = rr % M
        if OFF64:  # ...but g * stride_g + m * stride_m can pass 2^31: 64-bit products
            gi = gi.to(tl.int64)
            mi = mi.to(tl.int64)
        q_rows = q_ptr + gi * sq_g + mi * sq_m
    else:
        n_m = tl.cdiv(M, BLOCK_M)
        gi = pid_r // n_m
        mi = (pid_r % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_mask = mi < M
        if OFF64:
            gi = gi.to(tl.int64)
            mi = mi.to(tl.int64)
        q_grp = q_ptr + gi * sq_g
    x_rows = x_ptr + gi * sx_g + mi * sx_m

    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        # The x tile is loaded once per K-slice and reused for all D pool slices.
        x = tl.load(x_rows[:, None] + kk[None, :] * sx_k, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        p_tile = p_ptr + kk[:, None] * sp_k + ro[None, :] * sp_o
        p_mask = k_mask[:, None] & o_mask[None, :]
        if PER_ROW:
            xf = x.to(ACC)
            for d in range(D):
                qd = tl.load(q_rows + d * sq_d, mask=r_mask, other=0.0).to(ACC)
                p = tl.load(p_tile + d * sp_d, mask=p_mask, other=0.0)
                # (q_d ⊙ x) @ P_d: one K-slice of the Khatri-Rao GEMM.
                acc = tl.dot(to_storage(xf * qd[:, None], p.dtype, RNE).to(DOT), p.to(DOT), acc,
                             input_precision=PRECISION)
        else:
            w = tl.zeros((BLOCK_K, BLOCK_O), dtype=ACC)
            for d in range(D):
                qd = tl.load(q_grp + d * sq_d).to(ACC)
                w += qd * tl.load(p_tile + d * sp_d, mask=p_mask, other=0.0).to(ACC)
            acc = tl.dot(x.to(DOT), to_storage(w, x.dtype, RNE).to(DOT), acc, input_precision=PRECISION)

    if HAS_BIAS:
        for d in range(D):
            pb = tl.load(pb_ptr + d * spb_d + ro * spb_o, mask=o_mask, other=0.0).to(ACC)
            if PER_ROW:
                qd = tl.load(q_rows + d * sq_d, mask=r_mask, other=0.0).to(ACC)
                acc += qd[:, None] * pb[None, :]
            else:
                acc += tl.load(q_grp + d * sq_d).to(ACC) * pb[None, :]

    y_rows = y_ptr + gi * sy_g + mi * sy_m
    tl.store(y_rows[:, None] + ro[None, :] * sy_o, to_storage(acc, y_ptr.dtype.element_ty, RNE),
             mask=r_mask[:, None] & o_mask[None, :])


@triton.jit
def _meta_linear_bwd_kernel(
    dy_ptr, x_ptr, q_ptr, p_ptr, dx_ptr, dq_ptr,
    R, M, I, O, D,
    sdy_g, sdy_m, sdy_o,
    sx_g, sx_m, sx_i,
    sq_g, sq_m, sq_d,
    sp_d, sp_i, sp_o,
    sdx_g, sdx_m, sdx_i,
    COMPUTE_DX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr,
):
    """Per row r: t_d = dy[r] @ P_dᵀ (I,); dq[r, d] = <t_d, x[r]>; dx[r] = sum_d q[r, d] t_d.

    dq is written as (R, D) fp32, row-major over the flattened rows. dx only when
    COMPUTE_DX (PER_ROW queries)."""
    pid = tl.program_id(0)
    rr = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rr < R
    gi = rr // M
    mi = rr % M
    if OFF64:  # see _meta_linear_fwd_kernel
        rr = rr.to(tl.int64)
        gi = gi.to(tl.int64)
        mi = mi.to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    ri = tl.arange(0, BLOCK_I)
    ro = tl.arange(0, BLOCK_O)
    dy_rows = dy_ptr + gi * sdy_g + mi * sdy_m
    x_rows = x_ptr + gi * sx_g + mi * sx_m
    q_rows = q_ptr + gi * sq_g + mi * sq_m

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for i0 in range(0, I, BLOCK_I):
        ii = i0 + ri
        i_mask = ii < I
        x = tl.load(x_rows[:, None] + ii[None, :] * sx_i, mask=r_mask[:, None] & i_mask[None, :],
                    other=0.0).to(ACC)
        dx = tl.zeros((BLOCK_M, BLOCK_I), dtype=ACC)
        for d in range(D):
            t = tl.zeros((BLOCK_M, BLOCK_I), dtype=ACC)
            for o0 in range(0, O, BLOCK_O):
                oo = o0 + ro
                o_mask = oo < O
                dy = tl.load(dy_rows[:, None] + oo[None, :] * sdy_o, mask=r_mask[:, None] & o_mask[None, :],
                             other=0.0)
                # P_dᵀ tile (O-slice, I-slice), read through strides: no transposed copy.
                p_t = tl.load(p_ptr + d * sp_d + oo[:, None] * sp_o + ii[None, :] * sp_i,
                              mask=o_mask[:, None] & i_mask[None, :], other=0.0)
                t = tl.dot(dy.to(DOT), p_t.to(DOT), t, input_precision=PRECISION)
            dq_d = tl.sum(t * x, axis=1)
            dq += tl.where(rd[None, :] == d, dq_d[:, None], 0.0)
            if COMPUTE_DX:
                qd = tl.load(q_rows + d * sq_d, mask=r_mask, other=0.0).to(ACC)
                dx += qd[:, None] * t
        if COMPUTE_DX:
            dx_rows = dx_ptr + gi * sdx_g + mi * sdx_m
            tl.store(dx_rows[:, None] + ii[None, :] * sdx_i, to_storage(dx, dx_ptr.dtype.element_ty, RNE),
                     mask=r_mask[:, None] & i_mask[None, :])
    tl.store(dq_ptr + rr[:, None] * D + rd[None, :], dq, mask=r_mask[:, None] & (rd[None, :] < D))


@triton.jit
def _meta_linear_bwd_dp_kernel(
    x_ptr, q_ptr, dy_ptr, dp_ptr,
    R, M, I, O, D, rows_per_split,
    sx_g, sx_m, sx_i,
    sq_g, sq_m, sq_d,
    sdy_g, sdy_m, sdy_o,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr, OFF64: tl.constexpr,
):
    """Partial dP[split, d, I-tile, O-tile] = sum over the split's rows of (q_d ⊙ x)ᵀ dy (fp32)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_i = tl.cdiv(I, BLOCK_I)
    n_o = tl.cdiv(O, BLOCK_O)
    pid_o = pid % n_o
    pid_i = (pid // n_o) % n_i
    d = pid // (n_o * n_i)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i_mask = ii < I
    o_mask = oo < O

    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < end
        gi = rr // M
        mi = rr % M
        if OFF64:  # see _meta_linear_fwd_kernel
            gi = gi.to(tl.int64)
            mi = mi.to(tl.int64)
        x = tl.load(x_ptr + gi[:, None] * sx_g + mi[:, None] * sx_m + ii[None, :] * sx_i,
                    mask=r_mask[:, None] & i_mask[None, :], other=0.0)
        qd = tl.load(q_ptr + gi * sq_g + mi * sq_m + d * sq_d, mask=r_mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + gi[:, None] * sdy_g + mi[:, None] * sdy_m + oo[None, :] * sdy_o,
                     mask=r_mask[:, None] & o_mask[None, :], other=0.0)
        a = to_storage(x.to(ACC) * qd[:, None], dy.dtype, RNE)
        acc = tl.dot(tl.trans(a).to(DOT), dy.to(DOT), acc, input_precision=PRECISION)
    out = dp_ptr + ((split * D + d) * I + ii[:, None]) * O + oo[None, :]
    tl.store(out, acc, mask=i_mask[:, None] & o_mask[None, :])


# --------------------------------------------------------------------------- launchers

def _layout(t: torch.Tensor, axis: str) -> Tuple[int, int, int]:
    """(group, member, column) strides of a (B, N, C) tensor for ``axis``."""
    s0, s1, s2 = t.stride()
    return (s1, s0, s2) if axis == "S" else (s0, s1, s2)


def _query_layout(q: torch.Tensor, axis: str) -> Tuple[int, int, int]:
    """(group, member, d) strides of the query: members share their group's row unless "ST"."""
    if axis == "ST":
        return q.stride()
    return (q.stride(0), 0, q.stride(1))


def _groups(x: torch.Tensor, axis: str) -> Tuple[int, int]:
    B, N, _ = x.shape
    return (N, B) if axis == "S" else (B, N)


def _warps(block_a: int, block_b: int, per_row: bool = False) -> int:
    """8 warps for 64x128 output tiles; also for 64x64 PER_ROW tiles, whose scaled x slice is
    one more live fp32 tile: with 4 warps the exact fp32 variant spills on sm_90 even with
    16-wide K slices (bench/results/aot/)."""
    return 8 if block_a * block_b >= (64 * 64 if per_row else 64 * 128) else 4


def meta_linear_forward(x: torch.Tensor, query: torch.Tensor, pool: torch.Tensor,
                        bias_pool: Optional[torch.Tensor], axis: str) -> torch.Tensor:
    """x (B, N, I), query (B, D) | (N, D) | (B, N, D), pool (D, I, O), bias_pool (D, O) or None
    -> y (B, N, O) in x's dtype. Inputs may be non-contiguous (read through strides)."""
    return _fwd(x, query, pool, pool.stride(), bias_pool, axis, pool.shape[-1])


def _fwd(x, query, pool, pool_strides, bias_pool, axis, out_cols):
    """Shared by forward (pool strides (d, i, o)) and dx (strides (d, o, i): P transposed)."""
    B, N, K = x.shape
    D = pool.shape[0]
    O = out_cols
    y = torch.empty(B, N, O, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    if K == 0 or D == 0:
        y.zero_()
        if bias_pool is not None and D > 0:
            y += _bias(query, bias_pool, axis)
        return y
    check_rows(x.shape[0] * x.shape[1], "x")
    off64 = needs_int64(x=x, query=query, pool=pool, y=y)
    G, M = _groups(x, axis)
    per_row = axis == "ST"
    block_m = pow2_block(G * M if per_row else M, 64)
    # Exact fp32 "ST" (FMA dot: no tensor cores) with 32-wide K slices spills 8-32 B/thread
    # on sm_90 (bench/results/aot/); 16-wide slices do not.
    exact_fp32 = per_row and x.dtype == torch.float32 and dot_precision(x.dtype) == "ieee"
    block_k = pow2_block(K, 16 if exact_fp32 else 32)
    block_o = pow2_block(O, 128)
    n_rows = triton.cdiv(G * M, block_m) if per_row else G * triton.cdiv(M, block_m)
    grid = (n_rows * triton.cdiv(O, block_o),)
    pb = bias_pool if bias_pool is not None else pool  # dummy pointer when HAS_BIAS is False
    _meta_linear_fwd_kernel[grid](
        x, query, pool, pb, y,
        G, M, K, O, D,
        *_layout(x, axis), *_query_layout(query, axis), *pool_strides,
        pb.stride(0), pb.stride(-1),
        *_layout(y, axis),
        PER_ROW=per_row, HAS_BIAS=bias_pool is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_O=block_o,
        PRECISION=dot_precision(x.dtype), ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype),
        RNE=round_in_interpreter(x.dtype), OFF64=off64, num_warps=_warps(block_m, block_o, per_row),
    )
    return y


def _bias(query, bias_pool, axis):
    b = query @ bias_pool
    return b[:, None, :] if axis == "T" else b


def _split_count(R: int, tiles: int, block_r: int, device: torch.device, dp_bytes: int) -> int:
    """Row splits for dP: enough programs to fill the GPU (~4 per SM), each with at least four
    row blocks, and the fp32 partials capped at 256 MB."""
    if interpreting():
        return max(1, min(2, triton.cdiv(R, 4 * block_r)))
    want = triton.cdiv(4 * num_sms(device), max(tiles, 1))
    most = max(1, triton.cdiv(R, 4 * block_r))
    by_mem = max(1, (256 << 20) // max(dp_bytes, 1))
    return max(1, min(want, most, by_mem))


def meta_linear_backward(dy: torch.Tensor, x: torch.Tensor, query: torch.Tensor, pool: torch.Tensor,
                         bias_pool: Optional[torch.Tensor], axis: str,
                         needs: Tuple[bool, bool, bool, bool] = (True, True, True, True),
                         split: Optional[int] = None):
    """Gradients of :func:`meta_linear_forward`.

    Args:
        dy: (B, N, O) upstream gradient.
        needs: which of (dx, dquery, dpool, dbias_pool) to compute.
        split: row splits of the dP reduction (None: chosen for the device); any value gives
            the same result up to fp32 summation order, and the same value gives bitwise the
            same result on every run.

    Returns:
        (dx (B, N, I), dquery (query's shape), dpool (D, I, O), dbias_pool (D, O)), each None
        when not needed, in the inputs' dtypes.
    """
    need_x, need_q, need_p, need_pb = needs
    need_pb = need_pb and bias_pool is not None
    B, N, I = x.shape
    D, _, O = pool.shape
    dx = dq = dp = dpb = None
    G, M = _groups(x, axis)
    R = G * M
    per_row = axis == "ST"
    precision = dot_precision(x.dtype)
    acc = acc_torch_dtype(x.dtype)
    empty = R == 0 or I == 0 or O == 0 or D == 0
    # dx (when computed) has x's shape; contiguous, so it never spans more than x.
    check_rows(R, "x")
    off64 = not empty and needs_int64(dy=dy, x=x, query=query, pool=pool)

    if need_x and not per_row:
        # Shared query: dx = dy @ W_gᵀ, the forward kernel with P's I/O strides swapped.
        sd, si, so = pool.stride()
        dx = _fwd(dy, query, pool, (sd, so, si), None, axis, I) if not empty else torch.zeros_like(x)

    if need_q or (need_x and per_row):
        dq_rows = torch.zeros(R, D, device=x.device, dtype=acc)
        if per_row and need_x:
            dx = torch.empty(B, N, I, device=x.device, dtype=x.dtype)
            if empty:
                dx.zero_()
        if not empty:
            block_m = pow2_block(R, 32)
            block_i = pow2_block(I, 64)
            block_o = pow2_block(O, 64)
            dxt = dx if (per_row and need_x) else x  # dummy pointer when COMPUTE_DX is False
            _meta_linear_bwd_kernel[(triton.cdiv(R, block_m),)](
                dy, x, query, pool, dxt, dq_rows,
                R, M, I, O, D,
                *_layout(dy, axis), *_layout(x, axis), *_query_layout(query, axis),
                *pool.stride(), *_layout(dxt, axis),
                COMPUTE_DX=per_row and need_x,
                BLOCK_M=block_m, BLOCK_I=block_i, BLOCK_O=block_o, BLOCK_D=whole_block(D, 1),
                PRECISION=precision, ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype),
                RNE=round_in_interpreter(x.dtype), OFF64=off64, num_warps=4,
            )
        if need_q:
            # Rows are ordered (g, m); shared queries sum over their group's members.
            dq = dq_rows.view(G, M, D)
            dq = dq.reshape(B, N, D) if per_row else dq.sum(1)
            if bias_pool is not None:
                dq = dq + _bias_dq(dy, bias_pool, axis, acc)
            dq = dq.to(query.dtype)

    if need_p:
        if empty:
            dp = torch.zeros_like(pool)
        else:
            block_r = pow2_block(R, 64)
            block_i = pow2_block(I, 64)
            block_o = pow2_block(O, 64)
            tiles = D * triton.cdiv(I, block_i) * triton.cdiv(O, block_o)
            n_split = split or _split_count(R, tiles, block_r, x.device, D * I * O * 4)
            rows_per_split = triton.cdiv(triton.cdiv(R, n_split), block_r) * block_r
            n_split = triton.cdiv(R, rows_per_split)
            partial = torch.empty(n_split, D, I, O, device=x.device, dtype=acc)
            _meta_linear_bwd_dp_kernel[(tiles, n_split)](
                x, query, dy, partial,
                R, M, I, O, D, rows_per_split,
                *_layout(x, axis), *_query_layout(query, axis), *_layout(dy, axis),
                BLOCK_R=block_r, BLOCK_I=block_i, BLOCK_O=block_o,
                PRECISION=precision, ACC=acc_dtype(x.dtype), DOT=dot_dtype(x.dtype),
                RNE=round_in_interpreter(x.dtype), OFF64=off64, num_warps=4,
            )
            # Fixed-order reduction of the split partials: deterministic.
            dp = (partial[0] if n_split == 1 else partial.sum(0)).to(pool.dtype)

    if need_pb:
        dys = _row_sums(dy, axis, acc).reshape(-1, O)
        dpb = (query.reshape(-1, D).to(acc).t() @ dys).to(bias_pool.dtype)
    return dx, dq, dp, dpb


def _row_sums(dy, axis, acc):
    """dy (B, N, O) summed over the rows that share a query: (B, O), (N, O) or (B, N, O)."""
    if axis == "T":
        return dy.sum(1, dtype=acc)
    if axis == "S":
        return dy.sum(0, dtype=acc)
    return dy.to(acc)


def _bias_dq(dy, bias_pool, axis, acc):
    """d(q @ Pb)/dq = (dy summed over the rows sharing q) @ Pbᵀ."""
    return _row_sums(dy, axis, acc) @ bias_pool.to(acc).t()
