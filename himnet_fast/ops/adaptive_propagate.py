"""Adaptive graph propagation: ``xg = cat_k(T_k x)`` over ``A = softmax(relu(E Eᵀ))``.

``T_0 = I``, ``T_1 = A``, ``T_k = 2 A T_{k-1} - T_{k-2}`` (Chebyshev-style polynomials of A
itself, as HimNet defines them). We never build an identity or a ``T_k`` matrix: the terms are
``Z_0 = x``, ``Z_1 = A x``, ``Z_k = 2 A Z_{k-1} - Z_{k-2}``.

``A v`` is attention with query = key = E, value = v, score ``relu(q·k)`` and no scaling. Two
ways to compute it, chosen by size (``dense=None``) or by the caller:

* dense: materialise ``A`` once (N×N, or B×N×N for a per-sample graph) and reuse it for every
  step of a forward pass. Fast for small graphs; memory O(N²).
* streamed: the backend's ``adaptive_matmul`` works on blocks of rows and recomputes the
  scores in backward (flash-attention style): O(block·N) extra memory.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from .._checks import check_cheb_k, check_same_device, check_tensor
from ._common import (GradSink, cast, compute_dtype, dense_budget_bytes, needs_grad, no_autocast,
                      rows_per_chunk)

__all__ = ["adaptive_graph", "adaptive_matmul", "adaptive_propagate", "AdaptiveGraph"]


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype: fp32 for half types, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _softmax_relu_scores(eq: torch.Tensor, ek: torch.Tensor) -> torch.Tensor:
    """softmax(relu(eq @ ekᵀ)) with the softmax statistics never in low precision."""
    s = torch.matmul(eq, ek.transpose(-1, -2))
    return torch.softmax(_acc(torch.relu(s)), dim=-1)


class _DenseAdaptiveGraph(torch.autograd.Function):
    """``softmax(relu(E Eᵀ), -1)`` for E (G, N, D) -> (G, N, N) in the accumulation dtype,
    a block of rows at a time, saving only E and the probabilities.

    The dense graph is the largest tensor a training step keeps (G*N*N for the decoder's
    per-sample graph: 48 MiB at PEMS07, B = 16). Plain autograd kept the scores, their ReLU and
    the probabilities, and its backward built three more (G, N, N) temporaries; here the
    scores and the ReLU mask are recomputed per block in backward (N*D FLOPs per entry, cheap
    next to the propagations), the softmax backward and ``dE = dS E + dSᵀ E`` are done per block,
    so the extra memory is O(block*N) in both directions."""

    @staticmethod
    def forward(ctx, e):
        G, N, _ = e.shape
        ef = _acc(e)
        p = torch.empty(G, N, N, dtype=ef.dtype, device=e.device)
        # ~3 live (G, rows, N) temporaries: scores, ReLU, exponentials.
        step = rows_per_chunk(G * N * ef.element_size() * 3, N)
        for s in range(0, N, step):
            sc = torch.matmul(ef[:, s:s + step], ef.transpose(1, 2))
            p[:, s:s + step] = torch.softmax(sc.relu_(), dim=-1)
        ctx.save_for_backward(e, p)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, dp):
        e, p = ctx.saved_tensors
        G, N, _ = e.shape
        ef = _acc(e)
        dp = dp.to(p.dtype)
        de = torch.zeros_like(ef)
        step = rows_per_chunk(G * N * ef.element_size() * 3, N)
        for s in range(0, N, step):
            eq = ef[:, s:s + step]
            ps, dps = p[:, s:s + step], dp[:, s:s + step]
            # softmax backward: dR = P * (dP - rowsum(dP * P))
            ds = (dps - (dps * ps).sum(-1, keepdim=True)).mul_(ps)
            # relu'(s) = 0 for s <= 0 (torch convention); the scores are recomputed
            ds.masked_fill_(torch.matmul(eq, ef.transpose(1, 2)) <= 0, 0.0)
            de[:, s:s + step] += torch.bmm(ds, ef)       # E as the query
            de.baddbmm_(ds.transpose(1, 2), eq)          # E as the key
        return de.to(e.dtype)


class GraphGradAccumulator:
    """One in-place gradient buffer for a dense adaptive graph shared by many products.

    A training step uses the decoder's per-sample graph (B, N, N) in two propagations per
    step and cell; autograd gives each product its own (B, N, N) gradient and then adds it to
    the running sum (two such tensors live at once, more inside a recomputed step). With this
    buffer each product's backward adds ``dY Vᵀ`` into it in place (``_DenseMatmulAcc``) and
    hands no gradient to the matrix; ``GradSink`` passes the sum on once, after the
    last product's backward (autograd runs it after every consumer of its output)."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = None

    def add(self, dy: torch.Tensor, v: torch.Tensor, like: torch.Tensor) -> None:
        """buf (like's shape and dtype) += dy @ vᵀ, summed over the batch for a shared graph."""
        dy, v = dy.to(like.dtype), v.to(like.dtype)
        if like.dim() == 2:   # shared (N, N): the batch becomes extra columns
            B, N, W = v.shape
            dy2 = dy.permute(1, 0, 2).reshape(N, B * W)
            v2 = v.permute(1, 0, 2).reshape(N, B * W)
            if self.buf is None:
                self.buf = dy2 @ v2.t()
            else:
                self.buf.addmm_(dy2, v2.t())
        elif self.buf is None:
            self.buf = torch.bmm(dy, v.transpose(1, 2))
        else:
            self.buf.baddbmm_(dy, v.transpose(1, 2))


class _DenseMatmulAcc(torch.autograd.Function):
    """``A @ v`` (A (N, N) or (B, N, N), v (B, N, W)) whose gradient for A goes into
    ``acc.buf`` in place; returns None for A."""

    @staticmethod
    def forward(ctx, a, v, acc):
        ctx.acc = acc
        ctx.save_for_backward(a, v)
        return torch.matmul(a.to(v.dtype), v)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        a, v = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            ctx.acc.add(dy, v, a)
        dv = torch.matmul(a.to(dy.dtype).transpose(-1, -2), dy) if ctx.needs_input_grad[1] else None
        return None, dv, None


def _check_embedding(embedding) -> torch.Tensor:
    return check_tensor("embedding", embedding, (2, 3))


def adaptive_graph(embedding: torch.Tensor) -> torch.Tensor:
    """Dense ``softmax(relu(E Eᵀ), -1)``: (N, N) for E (N, D), (B, N, N) for E (B, N, D).

    For inspection and small graphs; the propagation ops never need it.
    """
    _check_embedding(embedding)
    dtype = compute_dtype(embedding.device, embedding)
    with no_autocast(embedding.device):
        e = cast(embedding, dtype)
        g = e if e.dim() == 3 else e.unsqueeze(0)
        a = _DenseAdaptiveGraph.apply(g)
        return (a if e.dim() == 3 else a.squeeze(0)).to(dtype)


# --------------------------------------------------------------------------- streamed (torch)

class _BlockedAdaptiveMatmul(torch.autograd.Function):
    """``out[g] = softmax(relu(E[g] E[g]ᵀ)) @ V[g]`` for E (G, N, D), V (G, N, W), one block
    of query rows at a time. Backward recomputes each block's probabilities (the
    flash-attention backward with the ReLU mask) and adds both the query-side and key-side
    gradients into dE, since E plays both roles."""

    @staticmethod
    def forward(ctx, e, v):
        G, N, _ = e.shape
        out = torch.empty(G, N, v.shape[-1], dtype=v.dtype, device=v.device)
        # ~4 live (G, rows, N) fp32 temporaries: scores, relu, exp, probabilities.
        step = rows_per_chunk(G * N * 4 * 4, N)
        for s in range(0, N, step):
            p = _softmax_relu_scores(e[:, s:s + step], e).to(v.dtype)
            torch.bmm(p, v, out=out[:, s:s + step])
        ctx.save_for_backward(e, v, out)
        return out

    @staticmethod
    def backward(ctx, dout):
        e, v, out = ctx.saved_tensors
        G, N, _ = e.shape
        dout = dout.contiguous()
        ef, vf = _acc(e), _acc(v)
        de, dv = torch.zeros_like(ef), torch.zeros_like(vf)
        # delta_i = <dO_i, O_i> = sum_j P_ij dP_ij: the softmax backward's row term.
        delta = (_acc(dout) * _acc(out)).sum(-1, keepdim=True)
        step = rows_per_chunk(G * N * 4 * 6, N)
        for s in range(0, N, step):
            eq = ef[:, s:s + step]
            sc = torch.bmm(eq, ef.transpose(1, 2))
            p = torch.softmax(torch.relu(sc), dim=-1)
            do = _acc(dout[:, s:s + step])
            dv += torch.bmm(p.transpose(1, 2), do)
            ds = p * (torch.bmm(do, vf.transpose(1, 2)) - delta[:, s:s + step])
            ds = ds.masked_fill_(sc <= 0, 0.0)  # relu'(s) = 0 for s <= 0 (torch convention)
            de[:, s:s + step] += torch.bmm(ds, ef)
            de += torch.bmm(ds.transpose(1, 2), eq)
        return de.to(e.dtype), dv.to(v.dtype)


def _torch_adaptive_matmul(e, v):
    return _BlockedAdaptiveMatmul.apply(e, v)


_backend.register("adaptive_matmul", "torch", _torch_adaptive_matmul)


def adaptive_matmul(embedding: torch.Tensor, v: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Streamed ``softmax(relu(E Eᵀ)) @ v`` without an N×N buffer.

    Args:
        embedding: (N, D) static graph or (B, N, D) per-sample graph.
        v: (B, N, W). For the static graph every sample shares A.

    Returns:
        (B, N, W)
    """
    _check_embedding(embedding)
    check_tensor("v", v, 3)
    return AdaptiveGraph(embedding, dense=False, backend=backend).apply(v)


# --------------------------------------------------------------------------- graph holder

class AdaptiveGraph:
    """The adaptive graph of one forward pass, held as its embedding (and, when dense, as A).

    Build it once per forward and call :meth:`propagate` for every step and cell: the dense
    matrix (if any) and the backend choice are made once.

    Args:
        embedding: (N, D) for the static graph, (B, N, D) for a per-sample graph.
        dense: True materialises A; False streams; None picks dense when the matrix fits
            ``$HIMNET_FAST_DENSE_BUDGET_MB`` (default 256) and the backend is "torch" or automatic.
        backend: backend for the streamed product (see ``himnet_fast.available_backends``).
        partition: optional :class:`~himnet_fast.sba.Partition` of the N nodes: the graph is
            then the partitioned one (``softmax(relu(E Eᵀ))`` inside each part plus pooled
            inter-part terms, :mod:`himnet_fast.sba.adaptive`), never dense, torch only.
    """

    # Class default: graphs from from_support (and copies made from __dict__) have none.
    partition = None

    def __init__(self, embedding: torch.Tensor, *, dense: Optional[bool] = None,
                 backend: Optional[str] = None, partition=None):
        _check_embedding(embedding)
        self.embedding = embedding
        self.per_sample = embedding.dim() == 3
        self.num_nodes = embedding.shape[-2]
        self.backend = backend
        if partition is not None:
            from ..sba.adaptive import check_partition_options

            self.partition = check_partition_options(partition, self.num_nodes, dense, backend)
            dense = False
        if dense is None:
            g = embedding.shape[0] if self.per_sample else 1
            fits = g * self.num_nodes * self.num_nodes * 4 <= dense_budget_bytes()
            # A dense A is torch's path; an explicit triton/cuda request means the fused kernels.
            name = _backend.normalize_backend(backend)
            dense = fits and name in (None, "torch")
        self.dense = bool(dense)
        self.matrix = adaptive_graph(embedding) if self.dense else None
        # Training on a dense graph: its products add their gradient into one buffer in place
        # (GraphGradAccumulator) instead of one (B, N, N) gradient per product.
        self.grad_acc = None
        if self.dense and needs_grad(self.matrix):
            self.grad_acc = GraphGradAccumulator()
            self.matrix = GradSink.apply(self.matrix, self.grad_acc)

    @classmethod
    def from_support(cls, support: torch.Tensor) -> "AdaptiveGraph":
        """Wrap a dense support matrix (N, N) or (B, N, N) given by a caller, as the original
        modules accept one."""
        check_tensor("support", support, (2, 3))
        if support.shape[-1] != support.shape[-2]:
            raise ValueError(f"support must be square in its last two dims, got {tuple(support.shape)}")
        g = cls.__new__(cls)
        g.embedding, g.per_sample, g.num_nodes = None, support.dim() == 3, support.shape[-1]
        g.backend, g.dense, g.matrix, g.grad_acc = None, True, support, None
        return g

    def _check_v(self, v: torch.Tensor) -> None:
        check_tensor("x", v, 3)
        if v.shape[1] != self.num_nodes:
            raise ValueError(f"x has {v.shape[1]} nodes (dim 1 of shape {tuple(v.shape)}), "
                             f"expected {self.num_nodes} (the graph's node count)")
        if self.per_sample:
            b = (self.matrix if self.dense else self.embedding).shape[0]
            if v.shape[0] != b:
                raise ValueError(f"x has batch {v.shape[0]} (dim 0 of shape {tuple(v.shape)}), "
                                 f"expected {b} (the per-sample graph's batch)")

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for v (B, N, W) -> (B, N, W) in the compute dtype."""
        self._check_v(v)
        ref = self.matrix if self.dense else self.embedding
        check_same_device(x=v, embedding=ref)
        dtype = compute_dtype(v.device, v, ref)
        with no_autocast(v.device):
            v = cast(v, dtype)
            if v.numel() == 0:
                return v.clone()
            if self.dense:
                if self.grad_acc is not None and needs_grad(self.matrix):
                    return _DenseMatmulAcc.apply(self.matrix, v, self.grad_acc)
                return torch.matmul(cast(self.matrix, dtype), v)
            e = cast(self.embedding, dtype)
            if self.partition is not None:
                from ..sba.adaptive import partitioned_adaptive_matmul

                return partitioned_adaptive_matmul(e, v, self.partition)
            _, impl = _backend.resolve("adaptive_matmul", self.backend, v.device, needs_grad(e, v))
            if self.per_sample:
                return impl.fn(e, v)
            # Static graph: every sample shares A, so the batch becomes extra value columns.
            B, N, W = v.shape
            vf = v.permute(1, 0, 2).reshape(1, N, B * W)
            return impl.fn(e.unsqueeze(0), vf).reshape(N, B, W).permute(1, 0, 2)

    def terms(self, x: torch.Tensor, cheb_k: int) -> List[torch.Tensor]:
        """``[Z_0, ..., Z_{K-1}]`` with ``Z_k = T_k x``, each (B, N, C)."""
        check_cheb_k(cheb_k)
        z1 = self.apply(x)
        z = [x.to(z1.dtype), z1]  # under autocast every term is in the compute dtype
        for _ in range(2, cheb_k):
            z.append(2 * self.apply(z[-1]) - z[-2])
        return z

    def propagate(self, x: torch.Tensor, cheb_k: int) -> torch.Tensor:
        """``cat([T_0 x, ..., T_{K-1} x], -1)``: (B, N, K*C), channel index ``k*C + c``."""
        return torch.cat(self.terms(x, cheb_k), dim=-1)


def adaptive_propagate(x: torch.Tensor, embedding: torch.Tensor, cheb_k: int = 2, *,
                       backend: Optional[str] = None, dense: Optional[bool] = None) -> torch.Tensor:
    """Graph convolution input of HimNet: ``cat_k(T_k x)`` over ``A = softmax(relu(E Eᵀ))``.

    Args:
        x: (B, N, C).
        embedding: (N, D) static graph (shared by the batch) or (B, N, D) per-sample graph.
        cheb_k: number of terms K >= 2.
        backend: None/"auto", "torch", "triton" or "cuda" (the streamed product).
        dense: force (True) or forbid (False) materialising A; None decides by size.

    Returns:
        (B, N, K*C), k-major: channel ``k*C + c`` is ``(T_k x)[..., c]``.
    """
    check_tensor("x", x, 3)
    _check_embedding(embedding)
    check_cheb_k(cheb_k)
    return AdaptiveGraph(embedding, dense=dense, backend=backend).propagate(x, cheb_k)
