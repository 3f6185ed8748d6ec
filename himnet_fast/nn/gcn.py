"""HimGCN: adaptive graph convolution with meta-parameters (drop-in for the original), and the
generated linear map it applies."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .. import _backend
from .._checks import check_axis, check_cheb_k, check_tensor
from ..ops._common import cast, compute_dtype, no_autocast
from ..ops.gcru_cell import linear
from ..ops.graph import AdaptiveGraph
from ..ops.meta_linear import apply_meta_linear, generate_weights, materialize_node_weights

Support = Union[Tensor, AdaptiveGraph]

__all__ = ["HimGCN", "GeneratedLinear", "as_graph"]


def as_graph(support: Support) -> AdaptiveGraph:
    """Accept the original's dense support (N, N) / (B, N, N) or an :class:`AdaptiveGraph`."""
    if isinstance(support, AdaptiveGraph):
        return support
    return AdaptiveGraph.from_support(support)


class GeneratedLinear:
    """``x -> x @ W + b`` for a fixed query: the linear map of one graph convolution, built once
    per forward and applied at many steps, in one of the recurrent cell op's weight forms
    (:data:`~himnet_fast.ops.gcru_cell.FORMS`).

    Build it with :meth:`from_pool` (HimNet's meta-parameters: "T" and "S" weights are
    generated, on first use, from the pool; "ST" -- and "S" above the dense budget -- keep the
    pool and the query and stream them through ``meta_linear``, so neither the (B, N, I, O) nor
    a large (N, I, O) tensor is built), :meth:`plain` or :meth:`scaled`. :meth:`split` gives
    the maps of the input and state rows of a k-major ``cat(x, h)`` input, each generated from
    its slice of the pool: the whole (N, I, O) weight, and its zero-filled gradient, never exist.
    """

    def __init__(self, form: str, bias: Tensor, *, weight: Optional[Tensor] = None, pool: Optional[Tensor] = None,
                 aux: Optional[Tensor] = None, backend: Optional[str] = None):
        self.form, self.bias, self.pool, self.aux, self.backend = form, bias, pool, aux, backend
        self._weight = weight

    @classmethod
    def from_pool(cls, pool: Tensor, bias_pool: Tensor, query: Tensor, axis: str, backend: Optional[str] = None,
                  streamed: Optional[bool] = None) -> "GeneratedLinear":
        """The map ``W = sum_d q_d P_d``, ``b = q @ Pb`` for pool (D, I, O), bias pool (D, O) and
        query (B, D) "T" / (N, D) "S" / (B, N, D) "ST". ``streamed`` (axis "S" only) overrides
        the budget's choice between building the (N, I, O) weights and streaming the pool."""
        bias = query @ bias_pool  # (B, O), (N, O) or (B, N, O)
        if axis == "S":
            if streamed is None:
                streamed = not materialize_node_weights(query.shape[0], pool)
            form = "S-pooled" if streamed else "S"
        else:
            form = axis
        return cls(form, bias, pool=pool, aux=query, backend=backend)

    @classmethod
    def plain(cls, weight: Tensor, bias: Tensor) -> "GeneratedLinear":
        """A shared weight (I, O) and bias (O,)."""
        return cls("plain", bias, weight=weight)

    @classmethod
    def scaled(cls, weight: Tensor, bias: Tensor, scale: Tensor) -> "GeneratedLinear":
        """``y = (x @ W) * scale + b``: a shared weight (I, O) scaled per node, scale (N, O)."""
        return cls("scaled", bias, weight=weight, aux=scale)

    @property
    def streamed(self) -> bool:
        """Whether the map streams a pool with its query ("ST", "S-pooled")."""
        return self.form in ("ST", "S-pooled")

    @property
    def weight(self) -> Tensor:
        """The weight of the cell op's form: the generated (B, I, O) / (N, I, O) weight for "T" /
        "S" (generated on first use), the pool for the pooled forms, else the shared weight."""
        if self._weight is None:
            self._weight = self.pool if self.streamed else generate_weights(self.aux, self.pool, self.form)
        return self._weight

    def _rows(self, t: Tensor, cheb_k: int, lo: int, hi: int, width: int) -> Tensor:
        """Rows ``k * width + j`` for j in [lo, hi) of every k of t (..., cheb_k * width, O)."""
        lead = t.shape[:-2]
        return t.reshape(*lead, cheb_k, width, t.shape[-1])[..., lo:hi, :].reshape(*lead, -1, t.shape[-1])

    def split(self, cheb_k: int, c: int) -> Tuple["GeneratedLinear", "GeneratedLinear"]:
        """(the map of the input rows, the map of the state rows) of a k-major ``cat(x, h)``
        input with x of width c: row ``k*(c+h) + j`` multiplies ``T_k x`` for ``j < c`` and
        ``T_k h`` otherwise (``A cat(x, h) = cat(A x, A h)``)."""
        src = self.pool if self._weight is None else self._weight
        width = src.shape[-2] // cheb_k
        halves = []
        for lo, hi in ((0, c), (c, width)):
            rows = self._rows(src, cheb_k, lo, hi, width)
            if self._weight is None:
                halves.append(GeneratedLinear(self.form, self.bias, pool=rows, aux=self.aux, backend=self.backend))
            else:
                halves.append(GeneratedLinear(self.form, self.bias, weight=rows, aux=self.aux, backend=self.backend))
        return halves[0], halves[1]

    def matmul(self, x: Tensor) -> Tensor:
        """x (B, N, I) or (B, T, N, I) -> x @ W without bias."""
        w, aux = self.weight, self.aux
        dt = compute_dtype(x.device, x, w, aux)
        with no_autocast(x.device):
            x, w, aux = cast(x, dt), cast(w, dt), cast(aux, dt)
            if x.dim() == 3:
                return linear(self.form, x, w, aux, self._pooled_product)
            B, T, N, I = x.shape
            if self.form == "T":  # one weight per sample, shared by the steps
                return torch.bmm(x.reshape(B, T * N, I), w).reshape(B, T, N, -1)
            if self.form == "ST":  # one query per (sample, node), shared by the steps
                aux = aux.unsqueeze(1).expand(B, T, N, aux.shape[-1]).reshape(B * T, N, -1)
            y = linear(self.form, x.reshape(B * T, N, I), w, aux, self._pooled_product)
            return y.reshape(B, T, N, -1)

    def _pooled_product(self, x: Tensor, q: Tensor, pool: Tensor) -> Tensor:
        return apply_meta_linear(x, q, pool, None, "ST", self.backend)

    def __call__(self, x: Tensor) -> Tensor:
        """x (B, N, I) or (B, T, N, I) -> x @ W + b."""
        y = self.matmul(x)
        b = self.bias
        if self.form == "T":  # (B, O): one per sample, over the nodes (and steps)
            b = b.reshape(b.shape[0], *([1] * (y.dim() - 2)), b.shape[-1])
        elif self.form == "ST" and y.dim() == 4:  # (B, N, O): the same at every step
            b = b.unsqueeze(1)
        return y + b


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
        self.backend = _backend.check_backend_arg(backend)
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

    def generate(self, embeddings: Optional[Tensor], streamed: Optional[bool] = None) -> GeneratedLinear:
        """Build the generated linear map for ``embeddings`` once, to apply at many steps.

        ``streamed`` (axis "S" only) overrides the budget's choice between building the (N, I, O)
        weights and streaming them from the pool; None lets the budget decide."""
        if self.meta_axis is None:
            return GeneratedLinear.plain(self.weights, self.bias)
        self._check_query(embeddings)
        return GeneratedLinear.from_pool(self.weights_pool, self.bias_pool, embeddings, self.meta_axis, self.backend,
                                         streamed)

    def forward(self, x: Tensor, support: Support, embeddings: Optional[Tensor] = None,
                linear: Optional[GeneratedLinear] = None) -> Tensor:
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
