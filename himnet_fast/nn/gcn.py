"""HimGCN: adaptive graph convolution with meta-parameters (drop-in for the original)."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from .. import _backend
from .._checks import check_axis, check_cheb_k, check_tensor
from ..ops._common import cast, compute_dtype, needs_grad, no_autocast
from ..ops.adaptive_propagate import AdaptiveGraph
from ..ops.meta_linear import apply_generated, generate_weights, materialize_node_weights

Support = Union[torch.Tensor, AdaptiveGraph]


def as_graph(support: Support) -> AdaptiveGraph:
    """Accept the original's dense support (N, N) / (B, N, N) or an :class:`AdaptiveGraph`."""
    if isinstance(support, AdaptiveGraph):
        return support
    return AdaptiveGraph.from_support(support)


class GeneratedLinear:
    """The linear map of one HimGCN for a fixed query, built once and applied many times.

    "T"/plain weights are materialised ((B, I, O), (I, O): small), and so are "S" weights
    (N, I, O) while they fit the dense budget; "ST" (and "S" on large graphs) keeps the query
    and the pool and applies them through the backend's ``meta_linear``, so neither the
    (B, N, I, O) nor a large (N, I, O) tensor is built. ``rows`` selects a subset of the input rows of the
    weight (the part of a k-major ``cat(x, h)`` input that belongs to x or to h).
    """

    def __init__(self, gcn: "HimGCN", embeddings: Optional[torch.Tensor], backend: Optional[str],
                 streamed: Optional[bool] = None):
        self.axis = gcn.meta_axis
        self.backend = backend
        if self.axis is None:
            self.weight, self.bias, self.query, self.streamed = gcn.weights, gcn.bias, None, False
            return
        gcn._check_query(embeddings)
        self.query = embeddings
        self.bias = embeddings @ gcn.bias_pool  # (B, O), (N, O) or (B, N, O)
        if self.axis == "S" and streamed is not None:
            # A GCRU's two maps must take the same form: its cell op receives one query for both.
            self.streamed = bool(streamed)
        else:
            self.streamed = self.axis == "ST" or (
                self.axis == "S" and not materialize_node_weights(embeddings.shape[0], gcn.weights_pool))
        if self.streamed:
            self.weight = gcn.weights_pool
        else:
            # Generated on first use (__getattr__): a caller that splits the rows (the GCRU
            # cell: input rows / state rows) generates each half from its pool slice and never
            # builds the whole (N, I, O) weight, nor, in backward, its zero-filled gradient.
            self.pool = gcn.weights_pool

    def __getattr__(self, name):
        # Only reached when ``name`` is not set: the lazily generated "T"/"S" weight.
        if name == "weight" and self.__dict__.get("pool") is not None:
            w = generate_weights(self.query, self.pool, self.axis)
            self.__dict__["weight"] = w
            return w
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def select_rows(self, rows: torch.Tensor) -> "GeneratedLinear":
        out = GeneratedLinear.__new__(GeneratedLinear)
        out.__dict__.update(self.__dict__)
        out.__dict__.pop("_splits", None)
        if self.__dict__.get("pool") is not None and "weight" not in self.__dict__:
            out.pool = self.pool.index_select(-2, rows)  # (D, rows, O): small
        else:
            out.weight = self.weight.index_select(-2, rows)
        return out

    def split_rows(self, rows_x: torch.Tensor, rows_h: torch.Tensor) -> tuple:
        """``(select_rows(rows_x), select_rows(rows_h))``, cached on this object: a decoder
        reuses one generated map for every step and must not copy its weight rows each time."""
        key = (rows_x.data_ptr(), rows_x.numel(), rows_h.data_ptr(), rows_h.numel())
        cache = self.__dict__.setdefault("_splits", {})
        if key not in cache:
            cache[key] = (self.select_rows(rows_x), self.select_rows(rows_h))
        return cache[key]

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, [T,] N, O) + bias broadcast along the axes the query does not cover."""
        b = self.bias
        if self.axis == "T":
            b = b.reshape(b.shape[0], *([1] * (y.dim() - 2)), b.shape[-1])
        elif self.axis == "ST" and y.dim() == 4:
            b = b.unsqueeze(1)
        return y + b

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, I) or (B, T, N, I) -> x @ W without bias."""
        lead = x.shape[:-1]
        if self.axis is None:
            return x @ self.weight
        if self.axis == "T":
            y = apply_generated(x.reshape(x.shape[0], -1, x.shape[-1]), self.weight, "T")
        elif not self.streamed:
            y = apply_generated(x.reshape(-1, x.shape[-2], x.shape[-1]), self.weight, "S")
        else:
            q = self.query
            if self.axis == "ST" and x.dim() == 4:  # one query per (sample, node), shared by the T steps
                q = q.unsqueeze(1).expand(*lead, q.shape[-1])
            x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
            q3 = q if self.axis == "S" else q.reshape(-1, q.shape[-2], q.shape[-1])
            _, impl = _backend.resolve("meta_linear", self.backend, x.device,
                                       needs_grad(x3, q3, self.weight))
            # Backends take one dtype: under autocast the fp32 pool meets bf16/fp16 activations.
            dt = compute_dtype(x.device, x3, q3, self.weight)
            with no_autocast(x.device):
                y = impl.fn(cast(x3, dt), cast(q3, dt), cast(self.weight, dt), None, self.axis)
        return y.reshape(*lead, y.shape[-1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.matmul(x))


class HimGCN(nn.Module):
    """Graph convolution ``cat_k(T_k x) @ W(embeddings) + b(embeddings)``.

    Same constructor, parameters and forward as the original HimGCN; ``backend`` (keyword-only)
    picks the kernels. ``support`` may be the original's dense matrix or an
    :class:`~himnet_fast.ops.AdaptiveGraph` (lean: no N×N matrix for large graphs).
    """

    def __init__(self, input_dim, output_dim, cheb_k, embed_dim, meta_axis=None, *,
                 backend: Optional[str] = None):
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        self.cheb_k = check_cheb_k(cheb_k)
        self.embed_dim = embed_dim
        self.meta_axis = check_axis(meta_axis) if meta_axis else None
        self.backend = _backend.normalize_backend(backend) if backend is not None else None
        # Same creation order and initialisation as the original, so a seed gives equal weights.
        if meta_axis:
            self.weights_pool = nn.init.xavier_normal_(
                nn.Parameter(torch.empty(embed_dim, cheb_k * input_dim, output_dim)))
            self.bias_pool = nn.init.xavier_normal_(nn.Parameter(torch.empty(embed_dim, output_dim)))
        else:
            self.weights = nn.init.xavier_normal_(nn.Parameter(torch.empty(cheb_k * input_dim, output_dim)))
            self.bias = nn.init.constant_(nn.Parameter(torch.empty(output_dim)), val=0)

    def _check_query(self, q) -> None:
        want = {"T": 2, "S": 2, "ST": 3}[self.meta_axis]
        check_tensor("embeddings", q, want)
        if q.shape[-1] != self.embed_dim:
            raise ValueError(f"embeddings has {q.shape[-1]} columns (shape {tuple(q.shape)}), "
                             f"expected embed_dim={self.embed_dim} for meta_axis {self.meta_axis!r}")

    def generate(self, embeddings: Optional[torch.Tensor], streamed: Optional[bool] = None) -> GeneratedLinear:
        """Build the generated linear map for ``embeddings`` once, to apply at many steps.

        ``streamed`` (axis "S" only) overrides the budget's choice between building the (N, I, O)
        weights and streaming them from the pool; None lets the budget decide."""
        return GeneratedLinear(self, embeddings, self.backend, streamed)

    def forward(self, x: torch.Tensor, support: Support, embeddings: Optional[torch.Tensor] = None,
                linear: Optional[GeneratedLinear] = None) -> torch.Tensor:
        """x (B, N, input_dim) -> (B, N, output_dim).

        embeddings: (B, D) for "T", (N, D) for "S", (B, N, D) for "ST", ignored without axis.
        ``linear`` (from :meth:`generate`) skips regenerating the weights.
        """
        check_tensor("x", x, 3)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"x has {x.shape[-1]} channels (shape {tuple(x.shape)}), "
                             f"expected input_dim={self.input_dim}")
        graph = as_graph(support)
        xg = graph.propagate(x, self.cheb_k)
        if linear is None:
            linear = self.generate(embeddings)
        return linear(xg)

    def extra_repr(self) -> str:
        return (f"{self.input_dim}, {self.output_dim}, cheb_k={self.cheb_k}, embed_dim={self.embed_dim}, "
                f"meta_axis={self.meta_axis!r}")
