"""Triton kernels for the fused HimGCRU step (``himnet_fast.ops.gcru_cell``, backend "triton").

A step over a dense graph (A, N x N, or B x N x N per sample), K Chebyshev terms
``Z_0 = h, Z_1 = A h, Z_k = 2 A Z_{k-1} - Z_{k-2}`` of the state::

    pre_g = zx @ Wg_x + sum_k Z_k(h) @ Wg_h[k] + bg     zr = sigmoid(pre_g), zh = z * h
    pre_u = zx @ Wu_x + sum_k Z_k(zh) @ Wu_h[k] + bu    h' = r * h + (1 - r) * tanh(pre_u)

The graph products are cuBLAS GEMMs (the launchers below run them with ``out=`` into one
buffer of the terms, the recursion's axpy folded into ``baddbmm``); everything else is one of
these kernels, so a forward step is 2K launches and its backward about 15:

* ``_cell_fwd_kernel``: the linear map of the K+1 inputs (zx and the terms) for a tile of
  rows and output columns, plus the bias, with the gate's or the update's activation as the
  epilogue (``EPI``): the gate writes ``z * h`` and ``r``; the update writes ``h'``; the
  update's backward writes ``dpre``, ``dr`` and ``dh = dh' * r`` from the recomputed ``pre``.
* ``_cell_bwd_dx_kernel``: the gradients of the K+1 inputs, ``dX_j = dY @ W_jᵀ``, for a tile of
  rows (and, for pooled weights, the query's gradient, which needs all of them at once).
* ``_cell_bwd_dw_kernel``: the weights' gradients ``dW_j = X_jᵀ dY`` summed over the rows that
  share a weight (a node for "S", a sample for "T", every row for a shared or pooled weight;
  long sums split over programs into fp32 partials, added in a fixed order), and the bias's.
* ``_cell_gate_bwd_kernel``: the gate's derivative (``dpre_g`` from ``dzh`` and ``dr``) with
  ``dh += dzh * z``.
* ``_graph_grad_kernel``: a shared graph's gradient ``dA += sum_b dZ_b Z_bᵀ`` (a GEMM whose
  reduction runs over the batch and the channels), accumulated in place.

Weight forms (``FORM``): GROUPED, one weight per group of rows (``T``: a sample's nodes;
``S``: a node's samples; a shared weight is one group of all rows); POOLED, ``sum_d q_d P_d``
per row (``ST``, and ``S`` streamed with its per-node query broadcast over the batch). Rows
are addressed as (group g, member m) through strides, as in ``kernels/meta_linear.py``, so the
same kernels serve every form and layout without copies. Accumulation is in fp32 (fp64 for
fp64 inputs); fp32 dots follow PyTorch's TF32 switch; backward passes use no atomics.

The module reads top to bottom: kernels, then the launchers, which ``himnet_fast.ops.gcru_cell``
composes into the step's forward and backward (its "triton" implementation).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (acc_dtype, acc_torch_dtype, dot_dtype, dot_precision, interpreting, num_sms, pow2_block,
                     round_in_interpreter, to_storage, whole_block)
from .gcru import _sigmoid, _tanh

__all__ = ["Rows", "Partials", "dw_partials", "cell_linear", "cell_linear_dx", "cell_linear_dw", "cell_gate_backward", "shared_graph_grad",
           "GROUPED", "POOLED", "EPI_NONE", "EPI_GATE", "EPI_UPDATE", "EPI_UPDATE_BWD"]

GROUPED, POOLED = 0, 1
EPI_NONE, EPI_GATE, EPI_UPDATE, EPI_UPDATE_BWD = 0, 1, 2, 3


# --------------------------------------------------------------------------- kernels

@triton.jit
def _rows(pid_r, G0, M0, M1, N, BY0: tl.constexpr, BY1: tl.constexpr, BLOCK_M: tl.constexpr,
          PER_ROW: tl.constexpr):
    """This program's rows as (part, b, n, mask, w): the part (0, or 1 of a pair), the rows'
    sample b and node n, and the index w of their weight. PER_ROW (POOLED, one part): BLOCK_M
    consecutive rows of the (b, n) grid (G0 = B samples of M0 = N nodes). Else (GROUPED):
    BLOCK_M members of one group, part 0's groups first (G0 groups of M0 members; per node
    when BY0, i.e. b is the member), then part 1's (M1 members, per node when BY1); w counts
    part 0's groups, then part 1's. Arithmetic, not branches, selects the part."""
    if PER_ROW:
        rr = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = rr < G0 * M0
        b = rr // N
        n = rr % N
        part = 0
        w = 0
    else:
        n0 = G0 * tl.cdiv(M0, BLOCK_M)
        part = (pid_r >= n0).to(tl.int32)
        local = pid_r - part * n0
        M = M0 + part * (M1 - M0)
        by = BY0 + part * (BY1 - BY0)
        n_m = tl.cdiv(M, BLOCK_M)
        g = local // n_m
        m = (local % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = m < M
        gv = g + tl.zeros((BLOCK_M,), dtype=tl.int32)
        b = tl.where(by == 1, m, gv)
        n = tl.where(by == 1, gv, m)
        w = part * G0 + g
    return part, b, n, mask, w


@triton.jit
def _cell_fwd_kernel(
    x_ptr, t0_ptr, t_ptr, wx_ptr, wh_ptr, b_ptr, q_ptr, h_ptr, r_ptr, d_ptr, o1_ptr, o2_ptr, o3_ptr, ob_ptr,
    G0, M0, M1, N, C0, H, O, D,
    sx_p, sx_b, sx_n, sx_c, s0_p, s0_b, s0_n, s0_c, st_k, st_p, st_b, st_n, st_c,
    swx_w, swx_i, swx_o, swh_w, swh_i, swh_o,
    sb_w, sb_b, sb_n, sb_o, sq_b, sq_n, sq_d,
    sh_p, sh_b, sh_n, sh_c, sr_p, sr_b, sr_n, sr_c, sd_p, sd_b, sd_n, sd_c,
    s1_p, s1_b, s1_n, s1_c, s2_p, s2_b, s2_n, s2_c, s3_p, s3_b, s3_n, s3_c, sob_b, sob_n, sob_o,
    K: tl.constexpr, FORM: tl.constexpr, BY0: tl.constexpr, BY1: tl.constexpr, EPI: tl.constexpr,
    SAVE_PRE: tl.constexpr, HAS_X: tl.constexpr, ACC_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr,
):
    """pre = zx @ Wx + sum_k Z_k @ Wh[k] + b for a tile of rows and columns, then EPI. With
    ACC_B (EPI_UPDATE_BWD, one bias per row) dpre is also added into ob[b, n, o], a sequence's
    running bias gradient."""
    pid = tl.program_id(0)
    n_o = tl.cdiv(O, BLOCK_O)
    pid_o = pid % n_o
    pid_r = pid // n_o
    p, b, n, r_mask, w_idx = _rows(pid_r, G0, M0, M1, N, BY0, BY1, BLOCK_M, FORM == 1)
    ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = ro < O
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=ACC)
    # inputs j = 0 (zx, C0 columns: x weight rows) and j = 1..K (the terms, H columns each:
    # rows (j-1)*H.. of the state weight)
    for j in tl.static_range(0 if HAS_X else 1, K + 1):
        if j == 0:
            width = C0
            rows_ptr = x_ptr + p * sx_p + b * sx_b + n * sx_n
            s_c = sx_c
            w_base = wx_ptr
            sw_w, sw_i, sw_o = swx_w, swx_i, swx_o
            i0 = 0
        else:
            width = H
            if j == 1:
                rows_ptr = t0_ptr + p * s0_p + b * s0_b + n * s0_n
                s_c = s0_c
            else:
                rows_ptr = t_ptr + (j - 2) * st_k + p * st_p + b * st_b + n * st_n
                s_c = st_c
            w_base = wh_ptr
            sw_w, sw_i, sw_o = swh_w, swh_i, swh_o
            i0 = (j - 1) * H
        for c0 in range(0, width, BLOCK_K):
            kk = c0 + rk
            k_mask = kk < width
            xt = tl.load(rows_ptr[:, None] + kk[None, :] * s_c, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = w_base + (i0 + kk)[:, None] * sw_i + ro[None, :] * sw_o
            w_mask = k_mask[:, None] & o_mask[None, :]
            if FORM == 0:
                w = tl.load(w_tile + w_idx * sw_w, mask=w_mask, other=0.0)
                acc = tl.dot(xt.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
            else:
                xf = xt.to(ACC)
                for d in range(D):
                    qd = tl.load(q_ptr + b * sq_b + n * sq_n + d * sq_d, mask=r_mask, other=0.0).to(ACC)
                    w = tl.load(w_tile + d * sw_w, mask=w_mask, other=0.0)
                    acc = tl.dot(to_storage(xf * qd[:, None], w.dtype, RNE).to(DOT), w.to(DOT), acc,
                                 input_precision=PRECISION)
    mask2 = r_mask[:, None] & o_mask[None, :]
    acc += tl.load(b_ptr + w_idx * sb_w + b[:, None] * sb_b + n[:, None] * sb_n + ro[None, :] * sb_o, mask=mask2,
                   other=0.0).to(ACC)
    B2 = b[:, None]
    N2 = n[:, None]
    if EPI == 0:
        tl.store(o1_ptr + p * s1_p + B2 * s1_b + N2 * s1_n + ro[None, :] * s1_c,
                 to_storage(acc, o1_ptr.dtype.element_ty, RNE), mask=mask2)
    elif EPI == 1:
        # gate: columns [0, H) are z (write z * h), [H, 2H) are r
        s = _sigmoid(acc)
        is_z = ro < H
        cz = tl.where(is_z, ro, 0)
        cr = tl.where(is_z, 0, ro - H)
        zmask = mask2 & is_z[None, :]
        rmask = mask2 & (~is_z)[None, :]
        h = tl.load(h_ptr + p * sh_p + B2 * sh_b + N2 * sh_n + cz[None, :] * sh_c, mask=zmask, other=0.0).to(ACC)
        tl.store(o1_ptr + p * s1_p + B2 * s1_b + N2 * s1_n + cz[None, :] * s1_c,
                 to_storage(s * h, o1_ptr.dtype.element_ty, RNE), mask=zmask)
        tl.store(o2_ptr + p * s2_p + B2 * s2_b + N2 * s2_n + cr[None, :] * s2_c,
                 to_storage(s, o2_ptr.dtype.element_ty, RNE), mask=rmask)
        if SAVE_PRE:
            tl.store(o3_ptr + p * s3_p + B2 * s3_b + N2 * s3_n + ro[None, :] * s3_c,
                     to_storage(acc, o3_ptr.dtype.element_ty, RNE), mask=mask2)
    else:
        c = _tanh(acc)
        r = tl.load(r_ptr + p * sr_p + B2 * sr_b + N2 * sr_n + ro[None, :] * sr_c, mask=mask2, other=0.0).to(ACC)
        h = tl.load(h_ptr + p * sh_p + B2 * sh_b + N2 * sh_n + ro[None, :] * sh_c, mask=mask2, other=0.0).to(ACC)
        if EPI == 2:
            tl.store(o1_ptr + p * s1_p + B2 * s1_b + N2 * s1_n + ro[None, :] * s1_c,
                     to_storage(r * h + (1.0 - r) * c, o1_ptr.dtype.element_ty, RNE), mask=mask2)
        else:
            # the update's backward from dh' (d): dpre, dr and the direct dh = dh' * r
            dout = tl.load(d_ptr + p * sd_p + B2 * sd_b + N2 * sd_n + ro[None, :] * sd_c, mask=mask2,
                           other=0.0).to(ACC)
            dpre = dout * (1.0 - r) * (1.0 - c * c)
            tl.store(o1_ptr + p * s1_p + B2 * s1_b + N2 * s1_n + ro[None, :] * s1_c,
                     to_storage(dpre, o1_ptr.dtype.element_ty, RNE), mask=mask2)
            if ACC_B:
                ob = ob_ptr + B2 * sob_b + N2 * sob_n + ro[None, :] * sob_o
                dpre = to_storage(dpre, o1_ptr.dtype.element_ty, RNE).to(ACC)  # what was stored
                tl.store(ob, to_storage(dpre + tl.load(ob, mask=mask2, other=0.0).to(ACC), ob_ptr.dtype.element_ty,
                                        RNE), mask=mask2)
            tl.store(o2_ptr + p * s2_p + B2 * s2_b + N2 * s2_n + ro[None, :] * s2_c,
                     to_storage(dout * (h - c), o2_ptr.dtype.element_ty, RNE), mask=mask2)
            tl.store(o3_ptr + p * s3_p + B2 * s3_b + N2 * s3_n + ro[None, :] * s3_c,
                     to_storage(dout * r, o3_ptr.dtype.element_ty, RNE), mask=mask2)


@triton.jit
def _cell_bwd_dx_kernel(
    dy_ptr, x_ptr, t0_ptr, t_ptr, wx_ptr, wh_ptr, q_ptr, dx_ptr, d0_ptr, dt_ptr, dq_ptr,
    G0, M0, M1, N, C0, H, O, D,
    sdy_p, sdy_b, sdy_n, sdy_o, sx_p, sx_b, sx_n, sx_c, s0_p, s0_b, s0_n, s0_c, st_k, st_p, st_b, st_n, st_c,
    swx_w, swx_i, swx_o, swh_w, swh_i, swh_o, sq_b, sq_n, sq_d,
    sdx_p, sdx_b, sdx_n, sdx_c, sd0_p, sd0_b, sd0_n, sd0_c, sdt_k, sdt_p, sdt_b, sdt_n, sdt_c, sdq_b, sdq_n, sdq_d,
    K: tl.constexpr, FORM: tl.constexpr, BY0: tl.constexpr, BY1: tl.constexpr, NEED_X: tl.constexpr,
    ADD_X: tl.constexpr, ADD_0: tl.constexpr, NEED_Q: tl.constexpr, ADD_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr,
):
    """dX_j = dY @ W_jᵀ for the K+1 inputs of a tile of rows (zx -> dx, Z_0 -> d0, Z_k -> dt[k-1])
    and, for pooled weights, dq[r, d] = sum_j <X_j[r], (dY @ P_{j,d}ᵀ)[r]>."""
    pid_r = tl.program_id(0)
    p, b, n, r_mask, w_idx = _rows(pid_r, G0, M0, M1, N, BY0, BY1, BLOCK_M, FORM == 1)
    rc = tl.arange(0, BLOCK_C)
    ro = tl.arange(0, BLOCK_O)
    rd = tl.arange(0, BLOCK_D)
    dy_rows = dy_ptr + p * sdy_p + b * sdy_b + n * sdy_n
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for j in tl.static_range(0 if NEED_X else 1, K + 1):
        if j == 0:
            width = C0
            w_base, sw_w, sw_i, sw_o, i0 = wx_ptr, swx_w, swx_i, swx_o, 0
            in_rows = x_ptr + p * sx_p + b * sx_b + n * sx_n
            s_in = sx_c
            out_rows = dx_ptr + p * sdx_p + b * sdx_b + n * sdx_n
            s_out = sdx_c
            add = ADD_X
        else:
            width = H
            w_base, sw_w, sw_i, sw_o, i0 = wh_ptr, swh_w, swh_i, swh_o, (j - 1) * H
            if j == 1:
                in_rows = t0_ptr + p * s0_p + b * s0_b + n * s0_n
                s_in = s0_c
                out_rows = d0_ptr + p * sd0_p + b * sd0_b + n * sd0_n
                s_out = sd0_c
                add = ADD_0
            else:
                in_rows = t_ptr + (j - 2) * st_k + p * st_p + b * st_b + n * st_n
                s_in = st_c
                out_rows = dt_ptr + (j - 2) * sdt_k + p * sdt_p + b * sdt_b + n * sdt_n
                s_out = sdt_c
                add = False
        for c0 in range(0, width, BLOCK_C):
            cc = c0 + rc
            c_mask = cc < width
            mask_c = r_mask[:, None] & c_mask[None, :]
            dx = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
            if FORM == 1 and NEED_Q:
                xin = tl.load(in_rows[:, None] + cc[None, :] * s_in, mask=mask_c, other=0.0).to(ACC)
            for d in range(D):
                t = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
                for o0 in range(0, O, BLOCK_O):
                    oo = o0 + ro
                    o_mask = oo < O
                    dy = tl.load(dy_rows[:, None] + oo[None, :] * sdy_o, mask=r_mask[:, None] & o_mask[None, :],
                                 other=0.0)
                    # W_jᵀ tile (O-slice, C-slice) read through strides: no transposed copy
                    w_t = w_base + oo[:, None] * sw_o + (i0 + cc)[None, :] * sw_i
                    wmask = o_mask[:, None] & c_mask[None, :]
                    if FORM == 0:
                        w = tl.load(w_t + w_idx * sw_w, mask=wmask, other=0.0)
                    else:
                        w = tl.load(w_t + d * sw_w, mask=wmask, other=0.0)
                    t = tl.dot(dy.to(DOT), w.to(DOT), t, input_precision=PRECISION)
                if FORM == 1:
                    qd = tl.load(q_ptr + b * sq_b + n * sq_n + d * sq_d, mask=r_mask, other=0.0).to(ACC)
                    dx += qd[:, None] * t
                    if NEED_Q:
                        dq += tl.where(rd[None, :] == d, tl.sum(t * xin, axis=1)[:, None], 0.0)
                else:
                    dx += t
            out = out_rows[:, None] + cc[None, :] * s_out
            if add:
                dx += tl.load(out, mask=mask_c, other=0.0).to(ACC)
            tl.store(out, to_storage(dx, dx_ptr.dtype.element_ty, RNE), mask=mask_c)
    if FORM == 1 and NEED_Q:
        qout = dq_ptr + b[:, None] * sdq_b + n[:, None] * sdq_n + rd[None, :] * sdq_d
        qmask = r_mask[:, None] & (rd[None, :] < D)
        if ADD_Q:
            dq += tl.load(qout, mask=qmask, other=0.0).to(ACC)
        tl.store(qout, to_storage(dq, dq_ptr.dtype.element_ty, RNE), mask=qmask)


@triton.jit
def _cell_bwd_dw_kernel(
    dy_ptr, x_ptr, t0_ptr, t_ptr, q_ptr, px_ptr, ph_ptr, pb_ptr,
    G0, M0, M1, N, C0, H, O, D, K, n_split,
    sdy_p, sdy_b, sdy_n, sdy_o, sx_p, sx_b, sx_n, sx_c, s0_p, s0_b, s0_n, s0_c, st_k, st_p, st_b, st_n, st_c,
    sq_b, sq_n, sq_d,
    FORM: tl.constexpr, BY0: tl.constexpr, BY1: tl.constexpr, NEED_B: tl.constexpr, ADD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr,
):
    """Partial weight gradients over one split of a weight's rows -- a group's members
    (GROUPED: w = the group, counted over the parts as in :func:`_rows`) or all rows (POOLED:
    w = d) -- fp32, for the stacked input rows i (zx's C0, then the K terms' H each): zx's rows
    into px[split, w, i, o], the terms' into ph[split, w, i - C0, o]. With NEED_B the programs
    of the first input tile also write the bias partial pb[split, w, o] = sum of dY over the
    rows. ADD adds into the partials (a sequence's steps, each program owning its cells: no
    atomics). A split owns ceil(rows / n_split) rows rounded up to BLOCK_R (possibly none:
    it then writes zeros)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    wsel = tl.program_id(2)
    I = C0 + K * H
    n_o = tl.cdiv(O, BLOCK_O)
    pid_o = pid % n_o
    pid_i = pid // n_o
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i_mask = ii < I
    o_mask = oo < O
    # which input each row i of the stacked inputs comes from, and its column there
    j = tl.where(ii < C0, 0, (ii - C0) // H + 1)
    col = tl.where(ii < C0, ii, (ii - C0) % H)
    if FORM == 0:
        part = (wsel >= G0).to(tl.int32)
        g = wsel - part * G0
        total = M0 + part * (M1 - M0)
        by = BY0 + part * (BY1 - BY0)
    else:
        part = 0
        g = 0
        total = G0 * M0
        by = 0
    per_split = tl.cdiv(tl.cdiv(total, n_split), BLOCK_R) * BLOCK_R
    start = split * per_split
    end = tl.minimum(start + per_split, total)
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=ACC)
    bacc = tl.zeros((BLOCK_O,), dtype=ACC)
    for r0 in range(start, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_mask = rr < end
        if FORM == 0:
            gv = g + tl.zeros((BLOCK_R,), dtype=tl.int32)
            b = tl.where(by == 1, rr, gv)
            n = tl.where(by == 1, gv, rr)
        else:
            b = rr // N
            n = rr % N
        dy = tl.load(dy_ptr + part * sdy_p + b[:, None] * sdy_b + n[:, None] * sdy_n + oo[None, :] * sdy_o,
                     mask=r_mask[:, None] & o_mask[None, :], other=0.0)
        # the (rows, I-tile) block of the stacked inputs, gathered from zx and the terms
        jj = j[None, :]
        cc = col[None, :]
        B2 = b[:, None]
        N2 = n[:, None]
        base = tl.where(jj == 0, part * sx_p + B2 * sx_b + N2 * sx_n + cc * sx_c,
                        tl.where(jj == 1, part * s0_p + B2 * s0_b + N2 * s0_n + cc * s0_c,
                                 (jj - 2) * st_k + part * st_p + B2 * st_b + N2 * st_n + cc * st_c))
        lmask = r_mask[:, None] & i_mask[None, :]
        xa = tl.load(x_ptr + base, mask=lmask & (jj == 0), other=0.0)
        xa += tl.load(t0_ptr + base, mask=lmask & (jj == 1), other=0.0)
        xa += tl.load(t_ptr + base, mask=lmask & (jj >= 2), other=0.0)
        if FORM == 1:
            qd = tl.load(q_ptr + b * sq_b + n * sq_n + wsel * sq_d, mask=r_mask, other=0.0).to(ACC)
            xa = to_storage(xa.to(ACC) * qd[:, None], dy.dtype, RNE)
        acc = tl.dot(tl.trans(xa).to(DOT), dy.to(DOT), acc, input_precision=PRECISION)
        if NEED_B:
            bacc += tl.sum(dy.to(ACC), axis=0)
    cell = split * tl.num_programs(2) + wsel
    in_x = (ii < C0)[:, None] & o_mask[None, :]
    in_h = ((ii >= C0) & i_mask)[:, None] & o_mask[None, :]
    out_x = px_ptr + (cell * C0 + ii[:, None]) * O + oo[None, :]
    out_h = ph_ptr + (cell * (I - C0) + (ii[:, None] - C0)) * O + oo[None, :]
    if ADD:
        tl.store(out_x, acc + tl.load(out_x, mask=in_x, other=0.0), mask=in_x)
        tl.store(out_h, acc + tl.load(out_h, mask=in_h, other=0.0), mask=in_h)
    else:
        tl.store(out_x, acc, mask=in_x)
        tl.store(out_h, acc, mask=in_h)
    if NEED_B:
        if pid_i == 0:
            out_b = pb_ptr + cell * O + oo
            if ADD:
                bacc += tl.load(out_b, mask=o_mask, other=0.0)
            tl.store(out_b, bacc, mask=o_mask)


@triton.jit
def _cell_gate_bwd_kernel(
    pre_ptr, h_ptr, dzh_ptr, dr_ptr, dpre_ptr, dh_ptr, ob_ptr, G, M, H,
    sp_g, sp_m, sp_c, sh_g, sh_m, sh_c, sz_g, sz_m, sz_c, sr_g, sr_m, sr_c, sdp_g, sdp_m, sdp_c, sdh_g, sdh_m, sdh_c,
    sob_g, sob_m, sob_c,
    ADD_H: tl.constexpr, ACC_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr,
    RNE: tl.constexpr,
):
    """dpre = [dzh * h, dr] * sigmoid'(pre) and dh (+)= dzh * z, z = sigmoid(pre[:, :H]); with
    ACC_B dpre is also added into ob (a sequence's running per-row bias gradient)."""
    pid = tl.program_id(0)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_h = pid % n_h
    rr = (pid // n_h) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rr < G * M
    g = rr // M
    m = rr % M
    cc = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = r_mask[:, None] & (cc < H)[None, :]
    G2 = g[:, None]
    M2 = m[:, None]
    C2 = cc[None, :]
    pz = tl.load(pre_ptr + G2 * sp_g + M2 * sp_m + C2 * sp_c, mask=mask, other=0.0).to(ACC)
    pr = tl.load(pre_ptr + G2 * sp_g + M2 * sp_m + (C2 + H) * sp_c, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + G2 * sh_g + M2 * sh_m + C2 * sh_c, mask=mask, other=0.0).to(ACC)
    dzh = tl.load(dzh_ptr + G2 * sz_g + M2 * sz_m + C2 * sz_c, mask=mask, other=0.0).to(ACC)
    dr = tl.load(dr_ptr + G2 * sr_g + M2 * sr_m + C2 * sr_c, mask=mask, other=0.0).to(ACC)
    z = _sigmoid(pz)
    r = _sigmoid(pr)
    dty = dpre_ptr.dtype.element_ty
    dpz = to_storage(dzh * h * z * (1.0 - z), dty, RNE)
    dpr = to_storage(dr * r * (1.0 - r), dty, RNE)
    tl.store(dpre_ptr + G2 * sdp_g + M2 * sdp_m + C2 * sdp_c, dpz, mask=mask)
    tl.store(dpre_ptr + G2 * sdp_g + M2 * sdp_m + (C2 + H) * sdp_c, dpr, mask=mask)
    if ACC_B:
        oty = ob_ptr.dtype.element_ty
        obz = ob_ptr + G2 * sob_g + M2 * sob_m + C2 * sob_c
        obr = ob_ptr + G2 * sob_g + M2 * sob_m + (C2 + H) * sob_c
        tl.store(obz, to_storage(dpz.to(ACC) + tl.load(obz, mask=mask, other=0.0).to(ACC), oty, RNE), mask=mask)
        tl.store(obr, to_storage(dpr.to(ACC) + tl.load(obr, mask=mask, other=0.0).to(ACC), oty, RNE), mask=mask)
    dh = dzh * z
    out = dh_ptr + G2 * sdh_g + M2 * sdh_m + C2 * sdh_c
    if ADD_H:
        dh += tl.load(out, mask=mask, other=0.0).to(ACC)
    tl.store(out, to_storage(dh, dh_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _graph_grad_kernel(
    dz_ptr, z_ptr, da_ptr, B, N, C,
    sdz_b, sdz_n, sdz_c, sz_b, sz_n, sz_c, sda_n, sda_m,
    ALPHA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr,
):
    """dA[n, m] += ALPHA * sum_b sum_c dZ[b, n, c] Z[b, m, c]: a shared graph's gradient from
    batch-major products, the batch folded into the reduction (no transposed copy)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    rn = (pid // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < N
    rc = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    for b in range(B):
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + rc
            c_mask = cc < C
            dz = tl.load(dz_ptr + b * sdz_b + rn[:, None] * sdz_n + cc[None, :] * sdz_c,
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0)
            zt = tl.load(z_ptr + b * sz_b + rm[None, :] * sz_n + cc[:, None] * sz_c,
                         mask=c_mask[:, None] & m_mask[None, :], other=0.0)
            acc = tl.dot(dz.to(DOT), zt.to(DOT), acc, input_precision=PRECISION)
    out = da_ptr + rn[:, None] * sda_n + rm[None, :] * sda_m
    mask = n_mask[:, None] & m_mask[None, :]
    acc = acc * ALPHA + tl.load(out, mask=mask, other=0.0).to(ACC)
    tl.store(out, to_storage(acc, da_ptr.dtype.element_ty, RNE), mask=mask)


# --------------------------------------------------------------------------- launchers

class Rows:
    """How a linear map's rows are laid out and which weight each uses. ``form`` GROUPED: one
    weight per group of rows, the groups being the nodes ("S": a node's B samples are its
    members) or the samples ("T", and a shared weight over a (1, B*N) view); ``by_node`` holds
    that choice per part: one part, or two for a pair of maps run as one launch (two cells
    advanced together: part 1's weights follow part 0's in one (G0 + G1, I, O) tensor). POOLED:
    every row its own mix of the pool (one part). Activations are (B, N, C), or (P, B, N, C)
    for a pair; :meth:`strides` gives their (part, b, n, c) strides."""

    def __init__(self, form: int, B: int, N: int, by_node: Sequence[bool] = (False,)):
        self.form, self.B, self.N = form, B, N
        self.by_node = tuple(bool(v) for v in by_node)
        gm = [(N, B) if bn else (B, N) for bn in self.by_node]
        self.G0, self.M0 = gm[0]
        self.G1, self.M1 = gm[1] if len(gm) > 1 else (0, 0)
        self.groups = self.G0 + self.G1

    @property
    def per_row(self) -> bool:
        return self.form == POOLED

    def block_m(self, cap: int) -> int:
        if self.per_row:
            return pow2_block(self.B * self.N, cap)
        # one BLOCK_M for both parts of a pair: the smaller group (a node's B samples for "S")
        return pow2_block(min(self.M0, self.M1) if self.M1 else self.M0, cap)

    def programs(self, block_m: int) -> int:
        if self.per_row:
            return triton.cdiv(self.B * self.N, block_m)
        return self.G0 * triton.cdiv(self.M0, block_m) + self.G1 * triton.cdiv(self.M1, block_m)

    def geometry(self) -> Tuple[int, int, int, int]:
        return (self.B, self.N, 0, self.N) if self.per_row else (self.G0, self.M0, self.M1, self.N)

    def consts(self) -> dict:
        return dict(FORM=self.form, BY0=int(self.by_node[0]), BY1=int(self.by_node[-1]))

    @staticmethod
    def strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
        if t is None:
            return 0, 0, 0, 0
        return tuple(t.stride()) if t.dim() == 4 else (0, *t.stride())


def _bias_strides(t: Optional[torch.Tensor], per_group: bool) -> Tuple[int, int, int, int]:
    """(w, b, n, o) strides of a bias: (O,) shared, (W, O) per weight (``per_group``) or (N, O)
    per node, (B, N, O) per row."""
    if t is None:
        return 0, 0, 0, 0
    if t.dim() == 1:
        return 0, 0, 0, t.stride(0)
    if t.dim() == 2:
        return (t.stride(0), 0, 0, t.stride(1)) if per_group else (0, 0, t.stride(0), t.stride(1))
    return (0, *t.stride())


def _query_strides(q: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """(b, n, d) strides of a query (B, N, D), or (N, D) broadcast over the batch."""
    if q is None:
        return 0, 0, 0
    return (0, *q.stride()) if q.dim() == 2 else tuple(q.stride())


def _precision(t: torch.Tensor) -> dict:
    return dict(PRECISION=dot_precision(t.dtype), ACC=acc_dtype(t.dtype), DOT=dot_dtype(t.dtype),
                RNE=round_in_interpreter(t.dtype))


def _term_args(terms: Sequence[torch.Tensor]):
    """(t0, the stacked terms 1.. (a (K-1, [P,] B, N, H) tensor, or t0 again), their strides)."""
    t0 = terms[0]
    rest = terms[1] if len(terms) > 1 else None
    if rest is not None and rest.dim() == t0.dim():
        rest = rest.unsqueeze(0)
    st = (rest.stride(0), *Rows.strides(rest[0])) if rest is not None else (0, 0, 0, 0, 0)
    return t0, (rest if rest is not None else t0), Rows.strides(t0), st


def _weight_strides(w: torch.Tensor) -> Tuple[int, int, int]:
    """(w, i, o) strides of a (W, I, O) weight, or a shared (I, O) one (w stride 0)."""
    if w.dim() == 2:
        return 0, w.stride(0), w.stride(1)
    return w.stride(0), w.stride(1), w.stride(2)


def cell_linear(rows: Rows, x: Optional[torch.Tensor], terms: Sequence[torch.Tensor], wx: torch.Tensor,
                wh: torch.Tensor, bias: torch.Tensor, query: Optional[torch.Tensor], K: int, epi: int, *,
                h: Optional[torch.Tensor] = None, r: Optional[torch.Tensor] = None,
                dout: Optional[torch.Tensor] = None, outs: Sequence[torch.Tensor] = (),
                save_pre: Optional[torch.Tensor] = None, bias_per_group: bool = True,
                bias_acc: Optional[torch.Tensor] = None) -> None:
    """``pre = x @ wx + sum_k Z_k @ wh[k*H:(k+1)*H] + bias`` ([P,] B, N, O) with the epilogue
    ``epi`` writing ``outs``: EPI_NONE (pre,); EPI_GATE (z * h, r), and ``pre`` into
    ``save_pre`` when given; EPI_UPDATE (h',); EPI_UPDATE_BWD (dpre, dr, dh) from ``dout``.
    ``terms``: [Z_0, the stacked Z_1.. (K-1, [P,] B, N, H)]; ``x`` None skips zx. ``bias_acc``
    (EPI_UPDATE_BWD, a per-row (B, N, O) bias): dpre is also added into it."""
    t0 = terms[0]
    H = t0.shape[-1]
    O = wh.shape[-1]
    C0 = x.shape[-1] if x is not None else 0
    D = query.shape[-1] if query is not None and rows.per_row else 1
    if rows.B * rows.N == 0 or O == 0:
        return
    t0, rest, s0, st = _term_args(terms)
    # (pooled rows also hold their query and a scaled copy of the input tile: 32 rows, where
    # 64 spilled in the sm_90 AOT table)
    block_m = rows.block_m(32 if rows.per_row else 64)
    block_o = pow2_block(O, 64)
    block_k = pow2_block(max(C0, H), 32)
    outs = list(outs) + ([save_pre] if save_pre is not None else [])
    outs = outs + [t0] * (3 - len(outs))
    xs = x if x is not None else t0
    _cell_fwd_kernel[(rows.programs(block_m) * triton.cdiv(O, block_o),)](
        xs, t0, rest, wx, wh, bias, query if query is not None else t0, h if h is not None else t0,
        r if r is not None else t0, dout if dout is not None else t0, outs[0], outs[1], outs[2],
        bias_acc if bias_acc is not None else t0, *rows.geometry(), C0, H, O, D,
        *Rows.strides(x), *s0, *st, *_weight_strides(wx), *_weight_strides(wh),
        *_bias_strides(bias, bias_per_group), *_query_strides(query),
        *Rows.strides(h), *Rows.strides(r), *Rows.strides(dout),
        *Rows.strides(outs[0]), *Rows.strides(outs[1]), *Rows.strides(outs[2]),
        *(bias_acc.stride() if bias_acc is not None else (0, 0, 0)),
        K=K, **rows.consts(), EPI=epi, SAVE_PRE=save_pre is not None, HAS_X=x is not None,
        ACC_B=bias_acc is not None, BLOCK_M=block_m,
        BLOCK_K=block_k, BLOCK_O=block_o, **_precision(t0), num_warps=4 if block_m * block_o < 64 * 64 else 8,
    )


def cell_linear_dx(rows: Rows, dy: torch.Tensor, x: Optional[torch.Tensor], terms: Sequence[torch.Tensor],
                   wx: torch.Tensor, wh: torch.Tensor, query: Optional[torch.Tensor], K: int, *,
                   dx: Optional[torch.Tensor], d0: torch.Tensor, dt: Optional[torch.Tensor],
                   dq: Optional[torch.Tensor], add_x: bool = False, add_0: bool = False,
                   add_q: bool = False) -> None:
    """dX_j = dY @ W_jᵀ into ``dx`` (zx's; skipped when None), ``d0`` (Z_0's) and ``dt``
    (the stacked Z_1..'s, (K-1, [P,] B, N, H)); with a query, its gradient into ``dq`` (when
    not None). ``add_*``: add into the buffer instead of writing it."""
    H = terms[0].shape[-1]
    O = dy.shape[-1]
    C0 = x.shape[-1] if x is not None else 0
    D = query.shape[-1] if query is not None and rows.per_row else 1
    if rows.B * rows.N == 0:
        return
    t0, rest, s0, st = _term_args(terms)
    # dY and W tiles beside dX, its partial and (pooled) the query's gradient (the sm_90 AOT
    # table still shows 8-56 B of spills for this kernel: docs/triton.md)
    block_m = rows.block_m(32)
    block_c = pow2_block(max(C0, H), 32)
    block_o = pow2_block(O, 32)
    dt_ = dt if dt is not None else d0.unsqueeze(0)
    _cell_bwd_dx_kernel[(rows.programs(block_m),)](
        dy, x if x is not None else t0, t0, rest, wx, wh, query if query is not None else t0,
        dx if dx is not None else d0, d0, dt_, dq if dq is not None else d0,
        *rows.geometry(), C0, H, O, D,
        *Rows.strides(dy), *Rows.strides(x), *s0, *st, *_weight_strides(wx), *_weight_strides(wh),
        *_query_strides(query),
        *Rows.strides(dx), *Rows.strides(d0), dt_.stride(0), *Rows.strides(dt_[0]), *_query_strides(dq),
        K=K, **rows.consts(), NEED_X=dx is not None and x is not None, ADD_X=add_x, ADD_0=add_0,
        NEED_Q=dq is not None and rows.per_row, ADD_Q=add_q,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_O=block_o, BLOCK_D=whole_block(D, 1), **_precision(dy),
        num_warps=8,
    )


def _splits(total: int, tiles: int, block_r: int, device: torch.device) -> int:
    """Row splits of a weight gradient's sum: enough programs to fill the GPU (~4 per SM),
    each with at least four row blocks."""
    if interpreting():
        return max(1, min(2, triton.cdiv(total, 4 * block_r)))
    want = triton.cdiv(4 * num_sms(device), max(tiles, 1))
    return max(1, min(want, triton.cdiv(total, 4 * block_r)))


class Partials(NamedTuple):
    """fp32 partial sums of one map's weight gradients, split over rows: zx's rows ``x``
    (S, W, C0, O), the state terms' ``h`` (S, W, K*H, O), the bias's ``b`` (S, W, O) or None.
    :func:`cell_linear_dw` writes or adds into them; :meth:`total` sums the splits."""

    x: torch.Tensor
    h: torch.Tensor
    b: Optional[torch.Tensor]

    @property
    def splits(self) -> int:
        return self.x.shape[0]

    def total(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(dW_x, dW_h, db) summed over the splits in a fixed order (deterministic); the first
        split itself, no kernel, when there is one."""
        return tuple(None if t is None else (t[0] if t.shape[0] == 1 else t.sum(0)) for t in self)


def _dw_tiling(rows: Rows, C0: int, KH: int, O: int):
    """(the most rows one weight sums, BLOCK_R, BLOCK_I, BLOCK_O)."""
    total = rows.B * rows.N if rows.per_row else max(rows.M0, rows.M1)
    return total, pow2_block(total, 32), pow2_block(C0 + KH, 64), pow2_block(O, 64)


def dw_partials(rows: Rows, C0: int, KH: int, O: int, W: int, bias: bool, like: torch.Tensor) -> Partials:
    """Uninitialised :class:`Partials` for a map with inputs of C0 + KH columns and O outputs
    (``bias``: the bias's too, GROUPED only), split for this device."""
    total, block_r, block_i, block_o = _dw_tiling(rows, C0, KH, O)
    tiles = triton.cdiv(C0 + KH, block_i) * triton.cdiv(O, block_o)
    n_split = _splits(total, tiles * W, block_r, like.device)
    new = functools.partial(torch.empty, device=like.device, dtype=acc_torch_dtype(like.dtype))
    return Partials(new(n_split, W, C0, O), new(n_split, W, KH, O),
                    new(n_split, W, O) if bias and not rows.per_row else None)


def cell_linear_dw(rows: Rows, dy: torch.Tensor, x: Optional[torch.Tensor], terms: Sequence[torch.Tensor],
                   query: Optional[torch.Tensor], K: int, part: Partials, *, add: bool = False) -> None:
    """The weight gradients ``dW_j = X_jᵀ dY`` over each weight's rows, as the split partial
    sums ``part`` (:func:`dw_partials`; W: the groups of every part, or the pool's D; the
    bias's, summed over each group's rows, when ``part.b`` is given). ``add``: add into them
    (a sequence's steps; ``K`` may then be 0 for its first step, which has no state terms).
    Each split's partial is one program's: no atomics, deterministic."""
    H = terms[0].shape[-1]
    O = dy.shape[-1]
    C0 = x.shape[-1] if x is not None else 0
    if rows.B * rows.N == 0:
        return
    W = part.x.shape[1]
    t0, rest, s0, st = _term_args(terms)
    _, block_r, block_i, block_o = _dw_tiling(rows, C0, part.h.shape[2], O)
    tiles = triton.cdiv(C0 + K * H, block_i) * triton.cdiv(O, block_o)
    _cell_bwd_dw_kernel[(tiles, part.splits, W)](
        dy, x if x is not None else t0, t0, rest, query if query is not None else t0, part.x, part.h,
        part.b if part.b is not None else part.x,
        *rows.geometry(), C0, H, O, query.shape[-1] if query is not None else 1, K, part.splits,
        *Rows.strides(dy), *Rows.strides(x), *s0, *st, *_query_strides(query),
        **rows.consts(), NEED_B=part.b is not None, ADD=add, BLOCK_R=block_r, BLOCK_I=block_i, BLOCK_O=block_o,
        **_precision(dy), num_warps=8 if block_i * block_o >= 64 * 64 else 4,
    )


def cell_gate_backward(pre: torch.Tensor, h: torch.Tensor, dzh: torch.Tensor, dr: torch.Tensor,
                       dpre: torch.Tensor, dh: torch.Tensor, add_h: bool, bias_acc: Optional[torch.Tensor] = None) -> None:
    """dpre = [dzh * h, dr] * sigmoid'(pre) (.., 2H); dh (+)= dzh * z (``add_h``: add), for
    (B, N, H) or a pair's (P, B, N, H) tensors, each contiguous in its rows; dpre also added
    into ``bias_acc`` (B, N, 2H) when given."""
    H = h.shape[-1]
    ob = bias_acc if bias_acc is not None else dpre
    pre, h, dzh, dr, dpre, dh = (t.view(-1, t.shape[-2], t.shape[-1]) for t in (pre, h, dzh, dr, dpre, dh))
    B, N, _ = h.shape
    if B * N * H == 0:
        return
    block_m, block_h = (16, 16) if interpreting() else (32, pow2_block(H, 64))
    grid = (triton.cdiv(B * N, block_m) * triton.cdiv(H, block_h),)
    _cell_gate_bwd_kernel[grid](
        pre, h, dzh, dr, dpre, dh, ob.view(B, N, 2 * H), B, N, H,
        *pre.stride(), *h.stride(), *dzh.stride(), *dr.stride(), *dpre.stride(),
        *dh.stride(), *ob.view(B, N, 2 * H).stride(), ADD_H=add_h, ACC_B=bias_acc is not None, BLOCK_M=block_m, BLOCK_H=block_h, ACC=acc_dtype(h.dtype),
        RNE=round_in_interpreter(h.dtype), num_warps=4,
    )


def shared_graph_grad(dz: torch.Tensor, z: torch.Tensor, da: torch.Tensor, alpha: float = 1.0) -> None:
    """da (N, N) += alpha * sum_b dz[b] @ z[b]ᵀ for dz, z (B, N, C)."""
    B, N, C = z.shape
    if B * N * C == 0:
        return
    block = pow2_block(N, 64)
    block_c = pow2_block(C, 32)
    grid = (triton.cdiv(N, block) * triton.cdiv(N, block),)
    _graph_grad_kernel[grid](
        dz, z, da, B, N, C, *dz.stride(), *z.stride(), *da.stride(),
        ALPHA=float(alpha), BLOCK_N=block, BLOCK_M=block, BLOCK_C=block_c, **_precision(z),
        num_warps=8 if block * block >= 64 * 64 else 4,
    )


# --------------------------------------------------------------------------- the step

class FusedStep:
    """A HimGCRU step over a dense graph on these kernels: :meth:`forward` (2K launches),
    :meth:`backward` (the step rerun, then its derivative in reverse), :meth:`first_forward`
    / :meth:`first_backward` for a sequence's first step from the zero state (no graph
    product). ``weights``: (form, wgx, wgh, bg, wux, wuh, bu, aux) with the cell op's form
    names ("plain", "T", "S", "S-pooled", "ST"); ``graph``: A (N, N) or (B, N, N).

    A pair (``form`` a tuple of two of "T" and "S", a shared graph): two cells advanced as one,
    each kernel launched once for both (e.g. HimNet's two encoders). States and their
    gradients are then (2, B, N, H); the input ``zx`` is (2, B, N, C) or one (B, N, C) both
    cells read (its gradient is still (2, B, N, C), one per cell); the weights and biases are
    the two cells' concatenated along their first dimension, part 0's first.

    Gradients go into fresh tensors, or with ``acc`` (a sequence's buffers: ``acc.get(key,
    like)`` returns the buffer of ``key``, zero-filled on first use) added in place (keys "g", "wgx", "wgh", "wux", "wuh", "bg",
    "bu", "aux_g", "aux_u")."""

    def __init__(self, graph: torch.Tensor, weights, cheb_k: int, B: int, N: int, H: int):
        form, self.wgx, self.wgh, self.bg, self.wux, self.wuh, self.bu, self.q = weights
        self.form, self.K, self.B, self.N, self.H = form, cheb_k, B, N, H
        self.A = graph
        self._parts: dict = {}    # a sequence's weight-gradient partials, per map ("wgx", "wux")
        self._has_h: dict = {}    # whether a step with state terms added into them
        self.shared = graph.dim() == 2
        pair = isinstance(form, tuple)
        self.lead = (2, B) if pair else (B,)
        if pair and not self.shared:
            raise ValueError("a pair of cells needs one shared graph (N, N)")
        # a stride-0 batch over every sample (of both cells): no copy
        self.Ab = graph.expand(2 * B if pair else B, N, N) if self.shared else graph
        self.flat = form == "plain"   # one shared weight: all rows are one group
        if pair:
            self.rows = Rows(GROUPED, B, N, tuple(f == "S" for f in form))
            self.W = self.rows.groups
        elif form in ("ST", "S-pooled"):
            self.rows = Rows(POOLED, B, N)
            self.W = self.wgx.shape[0]
        elif self.flat:
            self.rows = Rows(GROUPED, 1, B * N)
            self.W = 1
        else:
            self.rows = Rows(GROUPED, B, N, (form == "S",))
            self.W = self.wgx.shape[0]

    # views of (B, N, C) tensors as the rows' layout: one group of all rows for a shared weight
    def _v(self, t):
        return None if t is None else (t.reshape(1, self.B * self.N, t.shape[-1]) if self.flat else t)

    def _terms_v(self, terms):
        z0, rest = terms
        if not self.flat:
            return [z0, rest]
        return [self._v(z0), None if rest is None else rest.reshape(rest.shape[0], 1, self.B * self.N, self.H)]

    def _w(self, w):
        return w.unsqueeze(0) if self.flat else w

    def _b(self, t):
        """A ([2,] B, N, C) tensor as the batch of the graph products (the pair's samples as one)."""
        return t.view(-1, self.N, t.shape[-1])

    def terms(self, v: torch.Tensor):
        """[Z_0 = v, the stacked Z_1..Z_{K-1} (K-1, [2,] B, N, H)]: GEMMs into one buffer, the
        recursion's ``2 A Z - Z`` as one ``baddbmm``."""
        T = torch.empty(self.K - 1, *self.lead, self.N, self.H, device=v.device, dtype=v.dtype)
        b = self._b
        torch.bmm(self.Ab, b(v), out=b(T[0]))
        for k in range(2, self.K):
            prev2 = v if k == 2 else T[k - 3]
            torch.baddbmm(b(prev2), self.Ab, b(T[k - 2]), beta=-1, alpha=2, out=b(T[k - 1]))
        return [v, T]

    def _linear(self, x, terms, wx, wh, b, K, epi, outs, **tensors):
        """:func:`cell_linear` of one map, every (B, N, .) tensor in the rows' layout."""
        cell_linear(self.rows, self._v(x), self._terms_v(terms), self._w(wx), self._w(wh), b, self.q, K, epi,
                    outs=[self._v(o) for o in outs], **{k: self._v(v) for k, v in tensors.items()},
                    bias_per_group=self.form in ("T", "S") or self.rows.G1 > 0)

    def _new(self, ref, width=None):
        return torch.empty(*self.lead, self.N, width or self.H, device=ref.device, dtype=ref.dtype)

    def forward(self, h: torch.Tensor, zx: torch.Tensor, rec: Optional[dict] = None) -> torch.Tensor:
        th = self.terms(h)
        zh, r = self._new(h), self._new(h)
        pre_g = self._new(h, 2 * self.H) if rec is not None else None
        self._linear(zx, th, self.wgx, self.wgh, self.bg, self.K, EPI_GATE, h=h, outs=[zh, r], save_pre=pre_g)
        tz = self.terms(zh)
        if rec is not None:
            rec.update(th=th, zh=zh, r=r, pre_g=pre_g, tz=tz)
            return None
        out = self._new(h)
        self._linear(zx, tz, self.wux, self.wuh, self.bu, self.K, EPI_UPDATE, h=h, r=r, outs=[out])
        return out

    def first_forward(self, zx: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        zh, r, out = self._new(zeros), self._new(zeros), self._new(zeros)
        self._linear(zx, [zeros, None], self.wgx, self.wgh, self.bg, 0, EPI_GATE, h=zeros, outs=[zh, r])
        self._linear(zx, [zeros, None], self.wux, self.wuh, self.bu, 0, EPI_UPDATE, h=zeros, r=r, outs=[out])
        return out

    def _map_backward(self, dy, zx, terms, wx, wh, bias, K, keys, needs, acc, grads, *, dzx, d0, add):
        """One map's gradients from dy, its pre-activation's: the inputs' (zx's into ``dzx``,
        Z_0's into ``d0``, added when ``add``; returns the other terms' (K-1, B, N, H)), and the
        weights', bias's and query's (keys ``keys`` = (wx, wh, bias, query); ``needs`` says
        which) into ``grads`` or, with ``acc``, added into its buffers."""
        kx, kh, kb, kq = keys
        need_wx, need_wh, need_b, need_q = needs
        pooled = self.rows.form == POOLED
        flat_terms = self._terms_v(terms)
        dT = torch.empty_like(terms[1]) if K >= 2 else None
        dq, add_q = None, False
        if pooled and need_q:
            if acc is not None and self.form == "ST":  # per-row query: the kernel adds into the sum
                dq, add_q = acc.get(kq, self.q), True
            else:
                dq = torch.empty(self.B, self.N, self.q.shape[-1], device=dy.device, dtype=dy.dtype)
        dt_rows = None if dT is None else (dT.reshape(dT.shape[0], 1, self.B * self.N, self.H) if self.flat else dT)
        cell_linear_dx(self.rows, self._v(dy), self._v(zx), flat_terms, self._w(wx), self._w(wh), self.q, K,
                       dx=self._v(dzx), d0=self._v(d0), dt=dt_rows, dq=dq, add_x=add, add_0=add, add_q=add_q)
        if dq is not None and not add_q:
            self._put(kq, dq if self.form == "ST" else dq.sum(0), acc, grads, self.q)
        grouped_bias = need_b and not pooled
        if need_wx or need_wh or grouped_bias:
            # one kernel for the map's input rows, state rows and bias (computed together even
            # where only some are needed: they share every load of dY)
            part = self._parts.get(kx) if acc is not None else None
            add = part is not None
            if part is None:
                part = dw_partials(self.rows, wx.shape[-2], wh.shape[-2], wx.shape[-1], self.W, grouped_bias, dy)
            cell_linear_dw(self.rows, self._v(dy), self._v(zx), flat_terms, self.q, K, part, add=add)
            if acc is not None:
                self._parts[kx] = part
                self._has_h[kx] = self._has_h.get(kx, False) or K >= 1
            else:
                dwx, dwh, db = part.total()
                for key, val, like, need in ((kx, dwx, wx, need_wx), (kh, dwh, wh, need_wh), (kb, db, bias, grouped_bias)):
                    if need:
                        grads[key] = val.reshape(like.shape).to(like.dtype)
        if need_b and pooled:
            self._put(kb, dy if self.form == "ST" else dy.sum(0), acc, grads, bias)
        return dT

    def finish(self, acc) -> None:
        """After a sequence's last :meth:`backward` / :meth:`first_backward`: the weight and
        bias gradients the steps summed as fp32 partials, into ``acc`` (its buffers ``buf``)."""
        for kx, part in self._parts.items():
            m = kx[1]  # "g" or "u"
            wx, wh, bias = (self.wgx, self.wgh, self.bg) if m == "g" else (self.wux, self.wuh, self.bu)
            dwx, dwh, db = part.total()
            out = [(kx, dwx, wx)] + ([(f"w{m}h", dwh, wh)] if self._has_h[kx] else [])
            out += [(f"b{m}", db, bias)] if db is not None else []
            for key, val, like in out:
                acc.buf[key] = val.reshape(like.shape).to(like.dtype)

    def _put(self, key, value, acc, grads, like):
        if acc is not None:
            acc.get(key, like).add_(value)
        else:
            grads[key] = value.contiguous()

    def _terms_backward(self, d0, dT, terms, g_acc):
        """Z_k = 2 A Z_{k-1} - Z_{k-2} (k >= 2), Z_1 = A Z_0, in reverse: d0 (the gradient of
        Z_0, updated in place) += the products' input gradients; g_acc += the graph's."""
        v, T = terms
        At = self.Ab.transpose(1, 2)
        for k in range(self.K - 1, 0, -1):
            dk = dT[k - 1]
            alpha = 2.0 if k >= 2 else 1.0
            if k >= 2:
                (d0 if k == 2 else dT[k - 3]).sub_(dk)
            self._b(d0 if k == 1 else dT[k - 2]).baddbmm_(At, self._b(dk), alpha=alpha)
            if g_acc is not None:
                zk = v if k == 1 else T[k - 2]
                if self.shared:
                    shared_graph_grad(self._b(dk), self._b(zk), g_acc, alpha)
                else:
                    g_acc.baddbmm_(dk, zk.transpose(1, 2), alpha=alpha)

    def _bias_acc(self, acc, key, need):
        """A sequence's per-row ("ST") bias gradient, which the epilogues add into; else None."""
        return acc.get(key, self.bg if key == "bg" else self.bu) if (acc is not None and need
                                                                    and self.form == "ST") else None

    def backward(self, h, zx, dout, needs, acc=None, dzx_out=None) -> list:
        """The gradients of (h, zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u) (None where
        ``needs`` is False, or where ``acc`` took them); zx's into ``dzx_out`` when given."""
        n_h, n_zx, n_g, n_wgx, n_wgh, n_bg, n_wux, n_wuh, n_bu, n_ag, n_au = needs
        rec: dict = {}
        self.forward(h, zx, rec)
        grads: dict = {}
        dpre_u, dr, dh = self._new(h), self._new(h), self._new(h)
        bu_acc, bg_acc = self._bias_acc(acc, "bu", n_bu), self._bias_acc(acc, "bg", n_bg)
        self._linear(zx, rec["tz"], self.wux, self.wuh, self.bu, self.K, EPI_UPDATE_BWD, h=h, r=rec["r"],
                     dout=dout, outs=[dpre_u, dr, dh], bias_acc=bu_acc)
        dzx = (dzx_out if dzx_out is not None else self._new(zx, zx.shape[-1])) if n_zx else None
        dzh = self._new(h)
        g_acc = None
        if n_g:
            g_acc = acc.get("g", self.A) if acc is not None else torch.zeros_like(self.A)
        dT = self._map_backward(dpre_u, zx, rec["tz"], self.wux, self.wuh, self.bu, self.K,
                                ("wux", "wuh", "bu", "aux_u"), (n_wux, n_wuh, n_bu and bu_acc is None, n_au), acc,
                                grads, dzx=dzx, d0=dzh, add=False)
        self._terms_backward(dzh, dT, rec["tz"], g_acc)
        dpre_g = self._new(h, 2 * self.H)
        cell_gate_backward(rec["pre_g"], h, dzh, dr, dpre_g, dh, add_h=True, bias_acc=bg_acc)
        dT = self._map_backward(dpre_g, zx, rec["th"], self.wgx, self.wgh, self.bg, self.K,
                                ("wgx", "wgh", "bg", "aux_g"), (n_wgx, n_wgh, n_bg and bg_acc is None, n_ag), acc,
                                grads, dzx=dzx, d0=dh, add=True)
        self._terms_backward(dh, dT, rec["th"], g_acc)
        graph_grad = g_acc if (n_g and acc is None) else None
        return [dh if n_h else None, dzx, graph_grad, grads.get("wgx"), grads.get("wgh"), grads.get("bg"),
                grads.get("wux"), grads.get("wuh"), grads.get("bu"), grads.get("aux_g"), grads.get("aux_u")]

    def first_backward(self, zx, zeros, dout, needs, acc, dzx) -> None:
        """The first step's backward (the zero state): the gradient of zx into ``dzx`` (when
        needed), the x-rows' weight, bias and query gradients added into ``acc``. ``needs``:
        (zx, wgx, bg, wux, bu, aux_g, aux_u)."""
        n_zx, n_wgx, n_bg, n_wux, n_bu, n_ag, n_au = needs
        zh, r, pre_g = self._new(zeros), self._new(zeros), self._new(zeros, 2 * self.H)
        self._linear(zx, [zeros, None], self.wgx, self.wgh, self.bg, 0, EPI_GATE, h=zeros, outs=[zh, r],
                     save_pre=pre_g)
        dpre_u, dr, dh = self._new(zeros), self._new(zeros), self._new(zeros)
        bu_acc, bg_acc = self._bias_acc(acc, "bu", n_bu), self._bias_acc(acc, "bg", n_bg)
        self._linear(zx, [zeros, None], self.wux, self.wuh, self.bu, 0, EPI_UPDATE_BWD, h=zeros, r=r, dout=dout,
                     outs=[dpre_u, dr, dh], bias_acc=bu_acc)
        dzx = dzx if n_zx else None
        self._map_backward(dpre_u, zx, [zeros, None], self.wux, self.wuh, self.bu, 0, ("wux", "wuh", "bu", "aux_u"),
                           (n_wux, False, n_bu and bu_acc is None, n_au), acc, {}, dzx=dzx, d0=dh, add=False)
        dpre_g = self._new(zeros, 2 * self.H)
        cell_gate_backward(pre_g, zeros, zeros, dr, dpre_g, dh, add_h=False, bias_acc=bg_acc)
        self._map_backward(dpre_g, zx, [zeros, None], self.wgx, self.wgh, self.bg, 0, ("wgx", "wgh", "bg", "aux_g"),
                           (n_wgx, False, n_bg and bg_acc is None, n_ag), acc, {}, dzx=dzx, d0=dh, add=True)
