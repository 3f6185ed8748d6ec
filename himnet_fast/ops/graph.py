"""Adaptive graph propagation: ``xg = cat_k(T_k x)`` over ``A = softmax(relu(E Eᵀ))``.

``T_0 = I``, ``T_1 = A``, ``T_k = 2 A T_{k-1} - T_{k-2}`` (Chebyshev-style polynomials of A
itself, as HimNet defines them). We never build an identity or a ``T_k`` matrix: the terms are
``Z_0 = x``, ``Z_1 = A x``, ``Z_k = 2 A Z_{k-1} - Z_{k-2}``.

An :class:`AdaptiveGraph` holds the graph of one forward pass in one of three forms, decided
once (by size, or by the caller):

* dense: ``A`` materialised once (N×N, or B×N×N for a per-sample graph, the
  ``adaptive_graph`` op) and reused by every step; products are plain matmuls. Fast for small
  graphs; memory O(N²).
* streamed: the ``adaptive_matmul`` op, blocks of rows recomputed in backward
  (flash-attention style): O(block·N) extra memory.
* partitioned: the ``partitioned_adaptive_matmul`` op over a
  :class:`~himnet_fast.partition.Partition` (large graphs; O(N·(M+P)) per product).

:meth:`AdaptiveGraph.apply` runs the products as autograd ops. :class:`GraphProducts` runs the
same products without autograd, with their backward, for the recurrent cell op
(:mod:`himnet_fast.ops.gcru_cell`), which recomputes a step inside its own backward.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_cheb_k, check_same_device, check_tensor
from ..partition import PartitionLayout
from ._common import cast, compute_dtype, dense_budget_bytes, no_autocast
from .adaptive_matmul import apply_streamed, build_dense
from .partitioned_adaptive import apply_partitioned, check_partition_options

__all__ = ["AdaptiveGraph", "adaptive_propagate", "GraphProducts", "chebyshev_terms"]

MODES = ("dense", "streamed", "partitioned")


def chebyshev_terms(x: Tensor, cheb_k: int, product) -> List[Tensor]:
    """``[Z_0, ..., Z_{K-1}]`` with ``Z_0 = x``, ``Z_1 = A x``, ``Z_k = 2 A Z_{k-1} - Z_{k-2}``,
    for ``product(v) = A v``."""
    z1 = product(x)
    z = [x.to(z1.dtype), z1]  # under autocast every term is in the compute dtype
    for _ in range(2, cheb_k):
        z.append(2 * product(z[-1]) - z[-2])
    return z


class AdaptiveGraph:
    """The adaptive graph of one forward pass, held as its embedding (and, when dense, as A).

    Build it once per forward and call :meth:`propagate` for every step and cell: the dense
    matrix (if any) and the form are decided once.

    Args:
        embedding: (N, D) for the static graph, (B, N, D) for a per-sample graph.
        dense: True materialises A; False streams; None picks dense when the matrix fits
            ``$HIMNET_FAST_DENSE_BUDGET_MB`` (default 256) and the backend is not "cuda".
        backend: backend for the streamed product (see ``himnet_fast.available_backends``).
        partition: optional :class:`~himnet_fast.partition.Partition` of the N nodes: the graph
            is then the partitioned one (``softmax(relu(E Eᵀ))`` inside each part plus pooled
            inter-part terms, :mod:`himnet_fast.ops.partitioned_adaptive`), never dense, torch only.
    """

    def __init__(self, embedding: Tensor, *, dense: Optional[bool] = None, backend: Optional[str] = None,
                 partition=None):
        # ``tensor`` is what the products read: A when dense, else the embedding (``embedding``
        # is kept either way; None for a support given as a matrix).
        check_tensor("embedding", embedding, (2, 3))
        self.embedding = embedding
        self.per_sample = embedding.dim() == 3
        self.num_nodes = embedding.shape[-2]
        self.backend = backend
        self.layout: Optional[PartitionLayout] = None
        if partition is not None:
            check_partition_options(partition, self.num_nodes, dense, backend)
            self.mode, self.tensor = "partitioned", embedding
            self.layout = partition.layout(embedding.device)
            return
        if dense is None:
            g = embedding.shape[0] if self.per_sample else 1
            fits = g * self.num_nodes * self.num_nodes * 4 <= dense_budget_bytes()
            # Where A fits it is built once and its products are GEMMs: torch's path, and the
            # fused Triton step's (ops/gcru_cell.py). The CUDA extension streams (its fused kernels).
            dense = fits and _backend.normalize_backend(backend) in (None, "torch", "triton")
        if dense:
            dtype = compute_dtype(embedding.device, embedding)
            with no_autocast(embedding.device):
                self.mode, self.tensor = "dense", build_dense(cast(embedding, dtype))
        else:
            self.mode, self.tensor = "streamed", embedding

    @classmethod
    def from_support(cls, support: Tensor) -> "AdaptiveGraph":
        """Wrap a dense support matrix (N, N) or (B, N, N) given by a caller, as the original
        modules accept one."""
        check_tensor("support", support, (2, 3))
        if support.shape[-1] != support.shape[-2]:
            raise ValueError(f"support must be square in its last two dims, got {tuple(support.shape)}")
        g = cls.__new__(cls)
        g.embedding, g.per_sample, g.num_nodes, g.backend, g.layout = None, support.dim() == 3, support.shape[-1], None, None
        g.mode, g.tensor = "dense", support
        return g

    def cast(self, dtype: torch.dtype) -> "AdaptiveGraph":
        """This graph with its tensor in ``dtype`` (itself when it already is): a caller that runs
        many products in a low-precision dtype casts a dense A once, not once per product."""
        if self.tensor.dtype == dtype:
            return self
        g = AdaptiveGraph.__new__(AdaptiveGraph)
        g.__dict__.update(self.__dict__)
        g.tensor = self.tensor.to(dtype)
        return g

    @property
    def dense(self) -> bool:
        return self.mode == "dense"

    @property
    def matrix(self) -> Optional[Tensor]:
        """The dense A, or None for a streamed or partitioned graph."""
        return self.tensor if self.dense else None

    def check_values(self, v: Tensor) -> None:
        """``v`` must be (B, N, W) on the graph's device, with the graph's batch if per-sample."""
        check_tensor("x", v, 3)
        if v.shape[1] != self.num_nodes:
            raise ValueError(f"x has {v.shape[1]} nodes (dim 1 of shape {tuple(v.shape)}), "
                             f"expected {self.num_nodes} (the graph's node count)")
        if self.per_sample and v.shape[0] != self.tensor.shape[0]:
            raise ValueError(f"x has batch {v.shape[0]} (dim 0 of shape {tuple(v.shape)}), "
                             f"expected {self.tensor.shape[0]} (the per-sample graph's batch)")
        check_same_device(x=v, embedding=self.tensor)

    def apply(self, v: Tensor) -> Tensor:
        """``A @ v`` for v (B, N, W) -> (B, N, W) in the compute dtype."""
        self.check_values(v)
        dtype = compute_dtype(v.device, v, self.tensor)
        with no_autocast(v.device):
            v, g = cast(v, dtype), cast(self.tensor, dtype)
            if v.numel() == 0:
                return v.clone()
            if self.mode == "dense":
                return torch.matmul(g, v)
            if self.mode == "partitioned":
                return apply_partitioned(g, v, self.layout)
            return apply_streamed(g, v, self.backend)

    def terms(self, x: Tensor, cheb_k: int) -> List[Tensor]:
        """``[Z_0, ..., Z_{K-1}]`` with ``Z_k = T_k x``, each (B, N, C)."""
        check_cheb_k(cheb_k)
        return chebyshev_terms(x, cheb_k, self.apply)

    def propagate(self, x: Tensor, cheb_k: int) -> Tensor:
        """``cat([T_0 x, ..., T_{K-1} x], -1)``: (B, N, K*C), channel index ``k*C + c``."""
        return torch.cat(self.terms(x, cheb_k), dim=-1)

    def products(self, backend: Optional[str], needs_grad: bool) -> "GraphProducts":
        """The graph's products without autograd (for the cell op), on ``self.tensor``."""
        return GraphProducts(self.mode, self.tensor, self.layout, backend if backend is not None else self.backend,
                             needs_grad)


def adaptive_propagate(x: Tensor, embedding: Tensor, cheb_k: int = 2, *, backend: Optional[str] = None,
                       dense: Optional[bool] = None) -> Tensor:
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
    check_tensor("embedding", embedding, (2, 3))
    check_cheb_k(cheb_k)
    return AdaptiveGraph(embedding, dense=dense, backend=backend).propagate(x, cheb_k)


# --------------------------------------------------------------------------- without autograd

class GraphProducts:
    """``A v`` and its backward for one graph tensor, without autograd: what the recurrent cell
    op runs inside its forward and (recomputing) inside its backward.

    ``g`` is A (N, N) / (B, N, N) for "dense", the embedding (N, D) / (B, N, D) otherwise, in the
    values' dtype. A shared graph folds the batch into value columns for the streamed and
    partitioned ops (one (1, N, B*W) product)."""

    def __init__(self, mode: str, g: Tensor, layout: Optional[PartitionLayout], backend: Optional[str],
                 needs_grad: bool):
        self.mode, self.g, self.layout = mode, g, layout
        self.shared = g.dim() == 2
        if mode == "streamed":
            self.op, self.name = "adaptive_matmul", _backend.resolve("adaptive_matmul", backend, g.device, needs_grad)
        elif mode == "partitioned":
            self.op, self.name = "partitioned_adaptive_matmul", "torch"
        else:
            self.op = self.name = None

    def _fold(self, v: Tensor) -> Tensor:
        B, N, W = v.shape
        return v.permute(1, 0, 2).reshape(1, N, B * W)

    @staticmethod
    def _unfold(t: Tensor, like: Tensor) -> Tensor:
        B, N, W = like.shape
        return t.reshape(N, B, W).permute(1, 0, 2)

    def forward(self, v: Tensor) -> Tuple[Tensor, tuple]:
        """(A v, what :meth:`backward` needs)."""
        if self.mode == "dense":
            return torch.matmul(self.g, v), ()
        impl = _backend.impl(self.op, self.name)
        g = self.g.unsqueeze(0) if self.shared else self.g
        vf = self._fold(v) if self.shared else v
        if self.mode == "partitioned":
            out, extra = impl.forward(g, vf, *self.layout)
        else:
            out, extra = impl.forward(g, vf)
        return (self._unfold(out, v) if self.shared else out), (vf, out, extra)

    def backward(self, dout: Tensor, v: Tensor, saved: tuple, need_v: bool, need_g: bool,
                 g_acc: Optional[Tensor] = None, dv_into: Optional[Tensor] = None
                 ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(dv, dg) of :meth:`forward` (dg for ``self.g``: dA, or dE of the embedding). With
        ``g_acc`` the graph's gradient is added into it in place (for a dense graph by the GEMM
        itself) and dg is None. With ``dv_into`` a dense graph adds dv into that tensor by the
        GEMM itself and returns dv None (other modes return dv)."""
        dg = None
        if self.mode == "dense":
            dv = None
            if need_v:
                At = self.g.transpose(-1, -2)
                if dv_into is None:
                    dv = torch.matmul(At, dout)
                elif dv_into.dim() == 3:
                    dv_into.baddbmm_(At.expand(dv_into.shape[0], *At.shape) if At.dim() == 2 else At, dout)
                else:
                    dv_into.add_(torch.matmul(At, dout))
            if need_g:
                if self.shared:  # one (N, N) for the batch: the batch becomes extra columns
                    a, b = self._fold(dout)[0], self._fold(v)[0].t()
                    if g_acc is None:
                        dg = a @ b
                    else:
                        g_acc.addmm_(a, b)
                elif g_acc is None:
                    dg = torch.bmm(dout, v.transpose(1, 2))
                else:
                    g_acc.baddbmm_(dout, v.transpose(1, 2))
            return dv, dg
        impl = _backend.impl(self.op, self.name)
        vf, out, extra = saved
        g = self.g.unsqueeze(0) if self.shared else self.g
        do = self._fold(dout) if self.shared else dout.contiguous()
        if self.mode == "partitioned":
            dg, dv = impl.backward(do, g, vf, *self.layout, extra, (need_g, need_v))
        else:
            dg, dv = impl.backward(do, g, vf, out, extra, need_g, need_v)
        if self.shared:
            dg = None if dg is None else dg[0]
            dv = None if dv is None else self._unfold(dv, v)
        if dg is not None and g_acc is not None:
            g_acc.add_(dg)
            dg = None
        return dv, dg

    def terms(self, x: Tensor, cheb_k: int) -> Tuple[List[Tensor], list]:
        """(``[Z_0, ..., Z_{K-1}]``, the products' saved state for :meth:`terms_backward`)."""
        saved = []

        def product(v):
            out, s = self.forward(v)
            saved.append((v, s))
            return out
        return chebyshev_terms(x, cheb_k, product), saved

    def saved_of(self, z: List[Tensor]) -> Optional[list]:
        """What :meth:`terms` saved, rebuilt from its terms ``z`` where the products keep only
        their inputs (dense: a caller that kept the terms needs no rerun); else None."""
        return [(v, ()) for v in z[:-1]] if self.mode == "dense" else None

    def terms_backward(self, dz: List[Tensor], saved: list, need_x: bool, need_g: bool,
                       g_acc: Optional[Tensor] = None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(dx, dg) from the gradients ``dz`` of the K terms (the recursion in reverse:
        ``Z_k = 2 P_k - Z_{k-2}`` with ``P_k = A Z_{k-1}``, then ``Z_1 = A Z_0``). With ``g_acc``
        the graph's gradient is added into it in place (dg is then None). ``dz`` is consumed:
        over a dense graph the products' input gradients are added into its tensors in place
        (one GEMM each, no separate add)."""
        g = list(dz)
        dgraph = None
        for k in range(len(g) - 1, 0, -1):
            v, s = saved[k - 1]
            dp = g[k] if k == 1 else 2 * g[k]
            if k >= 2:
                g[k - 2] = g[k - 2] - g[k]
            dv, dgk = self.backward(dp, v, s, need_x or k > 1, need_g, g_acc, dv_into=g[k - 1])
            if dv is not None:
                g[k - 1] = g[k - 1] + dv
            if dgk is not None:
                dgraph = dgk if dgraph is None else dgraph + dgk
        return (g[0] if need_x else None), dgraph
