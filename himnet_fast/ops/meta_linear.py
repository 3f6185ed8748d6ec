"""Pool-weighted meta-parameter linear: ``y = x @ W(q) + q @ Pb`` with ``W(q) = sum_d q_d P_d``.

Shapes (B batch, N nodes, I input width, O output width, D pool size):

========  ===============  ================================================
axis      query            generated weight (never built for "ST")
========  ===============  ================================================
"T"       (B, D)           (B, I, O)
"S"       (N, D)           (N, I, O)
"ST"      (B, N, D)        (B, N, I, O)  -- 1.45 GB per call on PEMS07
========  ===============  ================================================

This module is the whole op: the front-end :func:`meta_linear` (validation, dtype, backend
choice), the registered PyTorch custom op ``himnet_fast::meta_linear`` with its fake and its
autograd formula (the custom op ``himnet_fast::meta_linear_backward``), and the backends it
dispatches to: torch (here), triton (``kernels/meta_linear.py``), cuda (``csrc/meta_linear.cu``,
forward only).

The torch backend builds the small "T"/"S" weights and, for "ST" (and "S" on large graphs),
uses the reassociation ``y = (q ⊗ x) @ P.reshape(D*I, O)``: Khatri-Rao row products and GEMMs
over blocks of the pool axis and of rows (:func:`pooled_forward`), recomputed in backward, so
memory is O(block) instead of O(B * N * I * O).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_axis, check_dim, check_same_device, check_tensor
from . import _cuda, _triton
from .._dtypes import acc_dtype
from ._common import cast, chunk_bytes, compute_dtype, contiguous, custom_op, dense_budget_bytes, empty_like, needs_grad, no_autocast

__all__ = ["meta_linear", "apply_meta_linear", "generate_weights", "materialize_node_weights", "pooled_forward", "pooled_backward"]


def meta_linear(x: Tensor, query: Tensor, weight_pool: Tensor, bias_pool: Optional[Tensor] = None,
                axis: str = "ST", *, backend: Optional[str] = None) -> Tensor:
    """Apply per-sample / per-node / per-(sample, node) generated weights.

    Args:
        x: (B, N, I) input rows.
        query: (B, D) for axis "T", (N, D) for "S", (B, N, D) for "ST".
        weight_pool: (D, I, O).
        bias_pool: (D, O) or None.
        axis: "T", "S" or "ST" (case-insensitive).
        backend: None/"auto", "torch", "triton" or "cuda".

    Returns:
        y: (B, N, O) in the compute dtype (the autocast dtype under autocast).
    """
    axis = check_axis(axis)
    check_tensor("x", x, 3)
    check_tensor("weight_pool", weight_pool, 3)
    check_tensor("query", query, {"T": 2, "S": 2, "ST": 3}[axis])
    B, N, I = x.shape
    D, _, O = weight_pool.shape
    check_dim("weight_pool", weight_pool, 1, I, "input rows (must equal x.shape[-1])")
    if axis == "T":
        check_dim("query", query, 0, B, f"rows for axis 'T' (expected (B={B}, D={D}))")
    elif axis == "S":
        check_dim("query", query, 0, N, f"rows for axis 'S' (expected (N={N}, D={D}))")
    else:
        if tuple(query.shape[:2]) != (B, N):
            raise ValueError(f"query for axis 'ST' must have shape (B={B}, N={N}, D={D}), "
                             f"got {tuple(query.shape)}")
    check_dim("query", query, -1, D, "embedding columns (must equal weight_pool.shape[0])")
    if bias_pool is not None:
        check_tensor("bias_pool", bias_pool, 2)
        if tuple(bias_pool.shape) != (D, O):
            raise ValueError(f"bias_pool must have shape (D={D}, O={O}), got {tuple(bias_pool.shape)}")
    check_same_device(x=x, query=query, weight_pool=weight_pool, bias_pool=bias_pool)

    dtype = compute_dtype(x.device, x, query, weight_pool, bias_pool)
    with no_autocast(x.device):
        return apply_meta_linear(cast(x, dtype), cast(query, dtype), cast(weight_pool, dtype),
                                 cast(bias_pool, dtype), axis, backend)


def apply_meta_linear(x: Tensor, query: Tensor, weight_pool: Tensor, bias_pool: Optional[Tensor], axis: str,
                      backend: Optional[str]) -> Tensor:
    """:func:`meta_linear` on validated inputs of one dtype (the entry of the layers above):
    the backend is resolved and the registered op runs."""
    name = _backend.resolve("meta_linear", backend, x.device, needs_grad(x, query, weight_pool, bias_pool))
    return _meta_linear(x, query, weight_pool, bias_pool, axis, name)


def generate_weights(query: Tensor, weight_pool: Tensor, axis: str) -> Tensor:
    """Materialise the generated weights of axis "T" ((B, I, O)) or "S" ((N, I, O)).

    Used where the weights are small and reused for many steps (the encoders build them once
    per forward, not once per step and cell call as the original does).
    """
    axis = check_axis(axis)
    if axis == "ST":
        raise ValueError("axis 'ST' weights are (B, N, I, O) and are never materialised; "
                         "use meta_linear")
    D, I, O = weight_pool.shape
    return (query @ weight_pool.reshape(D, I * O)).reshape(query.shape[0], I, O)


def materialize_node_weights(num_nodes: int, weight_pool: Tensor) -> bool:
    """Whether axis "S" builds its (N, I, O) weights (fast for small graphs) or streams the
    Khatri-Rao form like "ST" (needed for large graphs: 1.4 GB at N = 20,000, I = 134, O = 128).
    The limit is ``$HIMNET_FAST_DENSE_BUDGET_MB``, the same budget as the dense graph."""
    _, i, o = weight_pool.shape
    return num_nodes * i * o * weight_pool.element_size() <= dense_budget_bytes()


# --------------------------------------------------------------------------- torch backend

# Largest Khatri-Rao block (rows, d*I) one GEMM of the pooled product builds on CPU. Inside a
# recurrent loop large short-lived blocks fragment glibc's heap (its mmap threshold rises to
# 32 MiB after the first large free) and stay resident; 4 MiB blocks still give the narrow
# K*C input rows of a GCRU (I = 6) one GEMM for all D instead of D GEMMs of inner size 6. On
# CUDA the caching allocator has no such cost and fewer, larger GEMMs mean fewer launches:
# blocks there are bounded by ``$HIMNET_FAST_CHUNK_MB`` only.
_CPU_KR_BLOCK_BYTES = 4 << 20


def _kr_budget(device: torch.device) -> int:
    return _CPU_KR_BLOCK_BYTES if device.type == "cpu" else chunk_bytes()


def _pooled_blocks(x: Tensor, num_d: int) -> List[Tuple[slice, slice]]:
    """(node slice, pool slice) blocks whose Khatri-Rao block (rows, len(pool slice) * I)
    stays within the budget: slices of the pool axis over all rows while one pool slice of all
    rows fits, else one pool entry at a time over chunks of nodes."""
    B, N, I = x.shape
    budget = _kr_budget(x.device)
    per_d = max(1, B * N * I * x.element_size())
    if per_d <= budget:
        step = max(1, min(num_d, budget // per_d))
        return [(slice(0, N), slice(d, min(d + step, num_d))) for d in range(0, num_d, step)]
    nodes = max(1, budget // max(1, B * I * x.element_size()))
    return [(slice(n, min(n + nodes, N)), slice(d, d + 1)) for d in range(num_d) for n in range(0, N, nodes)]


def _kr_block(x: Tensor, q: Tensor, sl: slice) -> Tensor:
    """(B, N, len(sl)*I): ``q[..., d] * x`` for d in ``sl``, d-major (q (B, N, D) or (N, D))."""
    return (x.unsqueeze(-2) * q[..., sl, None]).flatten(-2)


def pooled_forward(x: Tensor, q: Tensor, pool: Tensor) -> Tensor:
    """``y = sum_d q[..., d] * (x @ P[d])``, no bias, for x (B, N, I), q (B, N, D) ("ST") or
    (N, D) (streamed "S"), P (D, I, O) -> (B, N, O) in x's dtype.

    Khatri-Rao GEMMs over blocks of (nodes, pool slice) (:func:`_pooled_blocks`), accumulated
    in fp32 (float64 stays float64) even for bf16/fp16 inputs, as one GEMM would."""
    acc = acc_dtype(x.dtype)
    num_d, _, o = pool.shape
    blocks = _pooled_blocks(x, num_d)
    # The first block of each node slice writes its product; later ones add to it (no zero fill).
    written = set()
    y = (torch.empty if blocks else torch.zeros)(*x.shape[:-1], o, dtype=acc, device=x.device)
    for ns, sl in blocks:
        qs = q[:, ns] if q.dim() == 3 else q[ns]
        part = torch.matmul(_kr_block(x[:, ns], qs, sl), pool[sl].reshape(-1, o))
        if ns.start in written:
            y[:, ns] += part
        else:
            y[:, ns] = part
            written.add(ns.start)
    return y.to(x.dtype)


def pooled_backward(dy: Tensor, x: Tensor, q: Tensor, pool: Tensor,
                    needs: Sequence[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients (dx, dq, dpool) of :func:`pooled_forward`, each None when not in ``needs``.

    Two GEMMs per block, not three: with ``G = dy @ P[sl]ᵀ`` (B, N, d, I),
    ``dx = sum_d q_d G_d`` and ``dq_d = sum_i x * G_d`` (the same contraction as
    ``sum_o (x @ P[d]) * dy``, reassociated), so ``x @ P[d]`` is never recomputed; the other
    GEMM is ``dP[sl] = KR(x, q[sl])ᵀ dy``."""
    need_x, need_q, need_p = needs
    acc = acc_dtype(x.dtype)
    num_d, i, o = pool.shape
    dy = dy.to(x.dtype)
    per_row = q.dim() == 3
    blocks = _pooled_blocks(x, num_d)
    dx = (torch.empty if blocks else torch.zeros)(x.shape, dtype=acc, device=x.device) if need_x else None
    dx_written = set()
    # Each pool slice is visited once when the blocks span all nodes: write, do not add.
    whole = len(blocks) == 0 or blocks[0][0] == slice(0, x.shape[1])
    dq = (torch.empty_like(q) if whole else torch.zeros_like(q)) if need_q else None
    dp = (torch.empty_like(pool) if whole else torch.zeros_like(pool)) if need_p else None
    for ns, sl in blocks:
        xs, dys = x[:, ns], dy[:, ns]
        qs = q[:, ns] if per_row else q[ns]
        p2 = pool[sl].reshape(-1, o)  # (d*I, O)
        if need_x or need_q:
            g = torch.matmul(dys, p2.t()).unflatten(-1, (-1, i))  # (B, n, d, I)
            if need_x:
                part = torch.matmul(qs[..., sl].unsqueeze(-2).to(g.dtype), g).squeeze(-2)
                if ns.start in dx_written:
                    dx[:, ns] += part
                else:
                    dx[:, ns] = part
                    dx_written.add(ns.start)
            if need_q:
                s = (g.to(acc) * xs.unsqueeze(-2)).sum(-1)  # (B, n, d)
                target = dq[:, ns, sl] if per_row else dq[ns, sl]
                s = s if per_row else s.sum(0)
                if whole:
                    target.copy_(s)
                else:
                    target += s.to(dq.dtype)
        if need_p:
            kr = _kr_block(xs, qs, sl).reshape(-1, p2.shape[0])
            if whole:
                torch.mm(kr.t(), dys.reshape(-1, o), out=dp[sl].view(-1, o))
            else:
                dp[sl] += torch.mm(kr.t(), dys.reshape(-1, o)).view(-1, i, o)
    return (dx.to(x.dtype) if need_x else None), dq, dp


def _apply_generated(x: Tensor, w: Tensor, axis: str) -> Tensor:
    """x (B, N, I) @ generated weights: (B, I, O) for "T", (N, I, O) for "S"."""
    if axis == "T":
        return torch.bmm(x, w)
    return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)


def _streams(axis: str, x: Tensor, pool: Tensor) -> bool:
    return axis == "ST" or (axis == "S" and not materialize_node_weights(x.shape[1], pool))


def _bias_rows(query: Tensor, bias_pool: Tensor, axis: str) -> Tensor:
    b = query @ bias_pool
    return b[:, None, :] if axis == "T" else b


def _row_sums(dy: Tensor, axis: str) -> Tensor:
    """dy (B, N, O) summed over the rows that share a query: (B, O), (N, O) or (B, N, O)."""
    if axis == "T":
        return dy.sum(1)
    if axis == "S":
        return dy.sum(0)
    return dy


def torch_forward(x, query, pool, bias_pool, axis):
    """The torch backend: x (B, N, I), query, pool (D, I, O), bias_pool (D, O) or None -> (B, N, O)."""
    if _streams(axis, x, pool):
        y = pooled_forward(x, query, pool)
    else:
        y = _apply_generated(x, generate_weights(query, pool, axis), axis)
    if bias_pool is not None:
        y = y + _bias_rows(query, bias_pool, axis)
    return y


def torch_backward(dy, x, query, pool, bias_pool, axis, needs):
    """Gradients (dx, dquery, dpool, dbias_pool) of :func:`torch_forward`; None where not in
    ``needs``."""
    need_x, need_q, need_p, need_pb = needs
    need_pb = need_pb and bias_pool is not None
    D, I, O = pool.shape
    if _streams(axis, x, pool):
        dx, dq, dp = pooled_backward(dy, x, query, pool, (need_x, need_q, need_p))
    else:
        # The generated weight's gradient dW (G, I, O), then the two GEMMs of W = q @ P.
        w = generate_weights(query, pool, axis)
        dx = _apply_generated(dy, w.transpose(1, 2), axis) if need_x else None
        dq = dp = None
        if need_q or need_p:
            if axis == "T":
                dw = torch.bmm(x.transpose(1, 2), dy)
            else:
                dw = torch.bmm(x.permute(1, 2, 0), dy.transpose(0, 1))
            dw = dw.reshape(dw.shape[0], I * O)
            dq = dw @ pool.reshape(D, I * O).t() if need_q else None
            dp = (query.t() @ dw).reshape(D, I, O) if need_p else None
    dpb = None
    if need_q and bias_pool is not None:
        dq = dq + _row_sums(dy, axis) @ bias_pool.t()
    if need_pb:
        dpb = query.reshape(-1, D).t() @ _row_sums(dy, axis).reshape(-1, O)
    return dx, dq, dp, dpb


# --------------------------------------------------------------------------- cuda backend

def cuda_forward(x, query, pool, bias_pool, axis):
    """The extension's forward (csrc/meta_linear.cu): y (B, N, O) = sum_d q_d (x @ P_d) + q @ Pb."""
    B, N, I = x.shape
    D, _, O = pool.shape
    code, index, stream = _cuda.launch_args(x, query, pool, bias_pool)
    x, query, pool = x.contiguous(), query.contiguous(), pool.contiguous()
    bias_pool = None if bias_pool is None else bias_pool.contiguous()
    y = torch.empty((B, N, O), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _cuda.ext().meta_linear(_cuda.ptr(x), _cuda.ptr(query), _cuda.ptr(pool), _cuda.ptr(bias_pool), _cuda.ptr(y),
                            B * N, N, I, O, D, _cuda.AXIS_CODES[axis], code, index, stream)
    return y


_backend.register("meta_linear", "torch", torch_forward, torch_backward)
_backend.register("meta_linear", "triton", _triton.launcher("meta_linear", "meta_linear_forward"),
                  _triton.launcher("meta_linear", "meta_linear_backward"), check=_triton.check)
_backend.register("meta_linear", "cuda", cuda_forward, check=_cuda.check)


# --------------------------------------------------------------------------- the custom op

@custom_op("meta_linear")
def _meta_linear(x: Tensor, query: Tensor, weight_pool: Tensor, bias_pool: Optional[Tensor], axis: str,
                 backend: str) -> Tensor:
    with no_autocast(x.device):
        return contiguous(_backend.impl("meta_linear", backend).forward(x, query, weight_pool, bias_pool, axis))


@_meta_linear.register_fake
def _(x, query, weight_pool, bias_pool, axis, backend):
    return x.new_empty(x.shape[0], x.shape[1], weight_pool.shape[-1])


@custom_op("meta_linear_backward")
def _meta_linear_backward(dy: Tensor, x: Tensor, query: Tensor, weight_pool: Tensor, bias_pool: Optional[Tensor],
                          axis: str, backend: str, needs: List[bool]) -> List[Tensor]:
    with no_autocast(x.device):
        grads = _backend.impl("meta_linear", backend).backward(dy, x, query, weight_pool, bias_pool, axis,
                                                               tuple(needs))
    return [g.contiguous() for g, n in zip(grads, needs) if n]


@_meta_linear_backward.register_fake
def _(dy, x, query, weight_pool, bias_pool, axis, backend, needs):
    return [empty_like(t) for t, n in zip((x, query, weight_pool, bias_pool), needs) if n]


def _setup(ctx, inputs, output):
    x, query, weight_pool, bias_pool, axis, backend = inputs
    ctx.save_for_backward(x, query, weight_pool, bias_pool)
    ctx.axis, ctx.backend = axis, backend


def _backward(ctx, dy):
    x, query, weight_pool, bias_pool = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    needs[3] = needs[3] and bias_pool is not None
    grads = iter(_meta_linear_backward(dy, x, query, weight_pool, bias_pool, ctx.axis, ctx.backend, needs))
    return (*(next(grads) if n else None for n in needs), None, None)


_meta_linear.register_autograd(_backward, setup_context=_setup)
