"""Pool-weighted meta-parameter linear: ``y = x @ W(q) + q @ Pb`` with ``W(q) = sum_d q_d P_d``.

Shapes (B batch, N nodes, I input width, O output width, D pool size):

========  ===============  ================================================
axis      query            generated weight (never built for "ST")
========  ===============  ================================================
"T"       (B, D)           (B, I, O)
"S"       (N, D)           (N, I, O)
"ST"      (B, N, D)        (B, N, I, O)  -- 1.45 GB per call on PEMS07
========  ===============  ================================================

The torch backend builds the small "T"/"S" weights and, for "ST", uses the reassociation
``y = (q ⊗ x) @ P.reshape(D*I, O)``: a Khatri-Rao row product followed by one GEMM, streamed
over chunks of rows and recomputed in backward, so memory is O(chunk * D * I) instead of
O(B * N * I * O).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import check_axis, check_dim, check_same_device, check_tensor
from ._common import cast, compute_dtype, dense_budget_bytes, needs_grad, no_autocast, rows_per_chunk

__all__ = ["meta_linear", "generate_weights", "materialize_node_weights"]


def meta_linear(x: torch.Tensor, query: torch.Tensor, weight_pool: torch.Tensor,
                bias_pool: Optional[torch.Tensor] = None, axis: str = "ST", *,
                backend: Optional[str] = None) -> torch.Tensor:
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
    name, impl = _backend.resolve("meta_linear", backend, x.device,
                                  needs_grad(x, query, weight_pool, bias_pool))
    with no_autocast(x.device):
        return impl.fn(cast(x, dtype), cast(query, dtype), cast(weight_pool, dtype),
                       cast(bias_pool, dtype), axis)


def generate_weights(query: torch.Tensor, weight_pool: torch.Tensor, axis: str) -> torch.Tensor:
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


def materialize_node_weights(num_nodes: int, weight_pool: torch.Tensor) -> bool:
    """Whether axis "S" builds its (N, I, O) weights (fast for small graphs) or streams the
    Khatri-Rao form like "ST" (needed for large graphs: 1.4 GB at N = 20,000, I = 134, O = 128).
    The limit is ``$HIMNET_FAST_DENSE_BUDGET_MB``, the same budget as the dense graph."""
    _, i, o = weight_pool.shape
    return num_nodes * i * o * weight_pool.element_size() <= dense_budget_bytes()


# --------------------------------------------------------------------------- torch backend

def apply_generated(x: torch.Tensor, weight: torch.Tensor, axis: str) -> torch.Tensor:
    """``x @ W`` for materialised weights. x (B, M, I); weight (B, I, O) for "T" (M any
    multiple of nodes), (N, I, O) for "S" (M == N), (I, O) for a plain linear."""
    if weight.dim() == 2:
        return x @ weight
    if axis == "T":
        return torch.bmm(x, weight)
    # "S": one (B, I) x (I, O) product per node.
    return torch.bmm(x.transpose(0, 1), weight).transpose(0, 1)


class _KhatriRaoLinear(torch.autograd.Function):
    """``y[r] = sum_d q[r, d] * (x[r] @ P[d])`` for rows r, computed as
    ``(q[r] ⊗ x[r]) @ P.reshape(D*I, O)`` in chunks of rows. Saves only x, q and P; the
    (rows, D*I) Khatri-Rao block is rebuilt chunk by chunk in backward."""

    @staticmethod
    def forward(ctx, x2, q2, pool):
        R, I = x2.shape
        D, _, O = pool.shape
        pflat = pool.reshape(D * I, O)
        y = x2.new_empty(R, O)
        step = rows_per_chunk(D * I * x2.element_size(), R)
        for s in range(0, R, step):
            z = (q2[s:s + step, :, None] * x2[s:s + step, None, :]).reshape(-1, D * I)
            torch.mm(z, pflat, out=y[s:s + step])
        ctx.save_for_backward(x2, q2, pool)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, q2, pool = ctx.saved_tensors
        R, I = x2.shape
        D, _, O = pool.shape
        pflat = pool.reshape(D * I, O)
        dy = dy.contiguous()
        need_x, need_q, need_p = ctx.needs_input_grad
        dx = torch.empty_like(x2) if need_x else None
        dq = torch.empty_like(q2) if need_q else None
        dp = torch.zeros_like(pflat) if need_p else None
        step = rows_per_chunk(D * I * x2.element_size() * 2, R)
        for s in range(0, R, step):
            xs, qs, dys = x2[s:s + step], q2[s:s + step], dy[s:s + step]
            if need_p:
                z = (qs[:, :, None] * xs[:, None, :]).reshape(-1, D * I)
                dp.addmm_(z.t(), dys)
            if need_x or need_q:
                dz = (dys @ pflat.t()).reshape(-1, D, I)
                if need_x:
                    dx[s:s + step] = torch.einsum("rd,rdi->ri", qs, dz)
                if need_q:
                    dq[s:s + step] = torch.einsum("rdi,ri->rd", dz, xs)
        return dx, dq, (dp.reshape(D, I, O) if need_p else None)


def khatri_rao_linear(x: torch.Tensor, query: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The "ST" product without its bias. x (..., I), query (..., D) with the same leading
    shape, pool (D, I, O) -> (..., O)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    q2 = query.reshape(-1, query.shape[-1])
    y = _KhatriRaoLinear.apply(x2, q2, pool)
    return y.reshape(*lead, pool.shape[-1])


def _torch_meta_linear(x, query, weight_pool, bias_pool, axis):
    if axis == "ST":
        y = khatri_rao_linear(x, query, weight_pool)
    elif axis == "S" and not materialize_node_weights(x.shape[1], weight_pool):
        y = khatri_rao_linear(x, query.expand(x.shape[0], *query.shape), weight_pool)
    else:
        y = apply_generated(x, generate_weights(query, weight_pool, axis), axis)
    if bias_pool is not None:
        bias = query @ bias_pool
        y = y + (bias[:, None, :] if axis == "T" else bias)
    return y


_backend.register("meta_linear", "torch", _torch_meta_linear)
