"""HyperST-Net (Pan et al., AAAI 2019) on the library's ops.

HyperST-Net has three parts: a *spatial module* embeds each location's static attributes
(``e_n = MLP(a_n)``), a *deduction module* turns the embedding into the weights of the *temporal
module*, which forecasts from the series. The paper has no public code; the equations
implemented here (and, step by step, in ``himnet_fast.reference_models``) are:

* spatial module (shared by all layers): ``e = relu(relu(a W_1 + b_1) W_2 + b_2)``, (N, S).
* **HyperST-LSTM-G** (the general layer: every LSTM weight generated). Per layer,
  ``q = e W_q + b_q`` (N, D) and ``W_n = sum_d q_nd P_d``, ``b_n = q_n P_b``, so
  ``[i, f, g, o] = [x_t, h_{t-1}] W_n + b_n`` is ``meta_linear`` with axis "S" and query q (the
  deduction module is ``e -> q -> W``, its last layer the pool P). Standard LSTM update.
* **HyperST-LSTM-D** (HyperST-Dense: ``W_n = W' diag(z_n)``, one scale per output unit). Per
  layer ``z = e W_z + b_z`` (N, 4H) and ``[i, f, g, o] = z ⊙ ([x_t, h_{t-1}] W') + b``.
* **HyperST-GCGRU** (location-based HyperST-Conv on a graph: a graph convolution, then a
  channel-wise scaling generated per node). ``pre = z ⊙ (cat_k(T_k [x, h]) W) + b`` with
  ``z = e W_z + b_z``, inside the GRU of HimNet/AGCRN. The graph is the library's adaptive
  graph ``softmax(relu(E Eᵀ))`` over a learned node embedding E (the paper used a road graph).

All three forecast every horizon from the last hidden state with one linear head
``h_T -> (horizon * output_dim)`` per node, as AGCRN does. The ``z`` deductions start at
``b_z = 1`` (each layer starts as its shared-weight counterpart).

Lean computation: no per-node weight tensor is built where it would be large (``meta_linear``'s
streamed form for "S" above ``$HIMNET_FAST_DENSE_BUDGET_MB``; the diagonal forms never build
``W_n`` at all), the weights are generated once per forward, and the input half of every layer is
computed for all steps in one product.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import _backend
from .._checks import check_cheb_k, check_tensor
from ..nn.gcn import GeneratedLinear
from ..nn.gcru import cell_weights, run_sequence
from ..ops.graph import AdaptiveGraph

__all__ = ["HyperSTLSTMG", "HyperSTLSTMD", "HyperSTGCGRU", "SpatialModule"]


class SpatialModule(nn.Sequential):
    """Two-layer ReLU MLP: attributes (N, A) -> spatial embedding (N, S)."""

    def __init__(self, attr_dim: int, spatial_dim: int):
        super().__init__(nn.Linear(attr_dim, spatial_dim), nn.ReLU(), nn.Linear(spatial_dim, spatial_dim), nn.ReLU())


def _deduction(spatial_dim: int, out: int) -> nn.Linear:
    """Linear deduction ``z = e W + b`` with ``b = 1``: the scaling starts near identity."""
    lin = nn.Linear(spatial_dim, out)
    nn.init.ones_(lin.bias)
    return lin


def _lstm_step(pre, c):
    """PyTorch's gate order i, f, g, o. pre (..., 4H), c (..., H) -> (h, c)."""
    i, f, g, o = pre.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class _HyperSTBase(nn.Module):
    """Attributes buffer, spatial module, head, input checks and the common forward."""

    def __init__(self, num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, num_layers,
                 spatial_dim, backend):
        super().__init__()
        for k, v in dict(num_nodes=num_nodes, input_dim=input_dim, hidden_dim=hidden_dim, output_dim=output_dim,
                         horizon=horizon, num_layers=num_layers, spatial_dim=spatial_dim).items():
            _positive_int(k, v)
        check_tensor("attributes", attributes, 2)
        if attributes.shape[0] != num_nodes:
            raise ValueError(f"attributes must have shape (num_nodes={num_nodes}, A), got {tuple(attributes.shape)}")
        self.num_nodes, self.input_dim, self.hidden_dim = num_nodes, input_dim, hidden_dim
        self.output_dim, self.horizon, self.num_layers = output_dim, horizon, num_layers
        self.backend = _backend.check_backend_arg(backend)
        # Persistent: a checkpoint carries the attributes the model was trained with.
        self.register_buffer("attributes", attributes.detach().clone().float())
        self.spatial = SpatialModule(attributes.shape[1], spatial_dim)

    def _source(self, x):
        check_tensor("x", x, 4)
        if x.shape[2] != self.num_nodes or x.shape[3] < self.input_dim:
            raise ValueError(f"x must have shape (B, T, N={self.num_nodes}, C>={self.input_dim}), "
                             f"got {tuple(x.shape)}")
        return x[..., :self.input_dim]

    def _head(self, h_last):
        """(B, N, H) -> (B, horizon, N, output_dim); output unit ``t * output_dim + c``."""
        B, N, _ = h_last.shape
        y = self.head(h_last).reshape(B, N, self.horizon, self.output_dim)
        return y.permute(0, 2, 1, 3)

    def forward(self, x, y_cov=None, labels=None, batches_seen=None):
        """x (B, T, N, C) with C >= input_dim (the first input_dim channels are used) ->
        (B, horizon, N, output_dim). y_cov, labels, batches_seen: the library's common
        forecaster signature; unused (no decoder, no teacher forcing)."""
        cur = self._source(x)
        e = self.spatial(self.attributes)       # (N, S), once per forward for all layers
        graph = self._graph()                   # GCGRU's adaptive graph, built once per forward
        for cell in self.cells:
            cur = cell.run_sequence(cur, e, graph)
        return self._head(cur[:, -1])

    def _graph(self):
        return None


# --------------------------------------------------------------------------- HyperST-LSTM-G

class HyperSTLSTMGCell(nn.Module):
    """LSTM layer with every weight generated per location: meta_linear axis "S"."""

    def __init__(self, input_dim, hidden_dim, spatial_dim, query_dim, backend=None):
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.backend = backend
        self.deduction = nn.Linear(spatial_dim, query_dim)
        self.weights_pool = nn.init.xavier_normal_(nn.Parameter(torch.empty(query_dim, input_dim + hidden_dim,
                                                                            4 * hidden_dim)))
        self.bias_pool = nn.init.xavier_normal_(nn.Parameter(torch.empty(query_dim, 4 * hidden_dim)))

    def run_sequence(self, xs, e, graph=None):
        """xs (B, T, N, input_dim), e (N, S) -> hidden states (B, T, N, H), from zero states."""
        B, T, N, C = xs.shape
        q = self.deduction(e)                                          # (N, D)
        lin = GeneratedLinear.from_pool(self.weights_pool, self.bias_pool, q, "S", self.backend)
        lin_x, lin_h = lin.split(1, C)                                 # W_n built once (or streamed)
        pre_x = lin_x(xs)                                              # (B, T, N, 4H), b_n included
        h = c = xs.new_zeros(B, N, self.hidden_dim, dtype=pre_x.dtype)
        out = []
        for t in range(T):
            pre = pre_x[:, t] if t == 0 else pre_x[:, t] + lin_h.matmul(h)  # h == 0 at t == 0
            h, c = _lstm_step(pre, c)
            out.append(h)
        return torch.stack(out, dim=1)


class HyperSTLSTMG(_HyperSTBase):
    """HyperST-LSTM-G: ``HyperSTLSTMG(num_nodes, attributes (N, A), ...)``, forward as
    :meth:`_HyperSTBase.forward`. ``query_dim`` is D, the rank of the weight generation."""

    def __init__(self, num_nodes, attributes, input_dim=1, hidden_dim=64, output_dim=1, horizon=12,
                 num_layers=1, spatial_dim=16, query_dim=8, *, backend: Optional[str] = None):
        super().__init__(num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, num_layers,
                         spatial_dim, backend)
        _positive_int("query_dim", query_dim)
        self.cells = nn.ModuleList([HyperSTLSTMGCell(input_dim if i == 0 else hidden_dim, hidden_dim, spatial_dim,
                                                     query_dim, self.backend) for i in range(num_layers)])
        self.head = nn.Linear(hidden_dim, horizon * output_dim)


# --------------------------------------------------------------------------- HyperST-LSTM-D

class HyperSTLSTMDCell(nn.Module):
    """LSTM layer with ``W_n = W' diag(z_n)``: shared W', a scale per location and gate unit."""

    def __init__(self, input_dim, hidden_dim, spatial_dim):
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.deduction = _deduction(spatial_dim, 4 * hidden_dim)
        self.weight = nn.init.xavier_normal_(nn.Parameter(torch.empty(input_dim + hidden_dim, 4 * hidden_dim)))
        self.bias = nn.Parameter(torch.zeros(4 * hidden_dim))

    def run_sequence(self, xs, e, graph=None):
        """xs (B, T, N, input_dim), e (N, S) -> hidden states (B, T, N, H)."""
        B, T, N, C = xs.shape
        z = self.deduction(e)                                          # (N, 4H)
        w_x, w_h = self.weight[:C], self.weight[C:]
        # diag(z) is linear: z ⊙ ([x, h] W') = z ⊙ (x W'_x) + z ⊙ (h W'_h); the x half for all T.
        pre_x = (xs @ w_x) * z + self.bias                             # (B, T, N, 4H)
        h = c = xs.new_zeros(B, N, self.hidden_dim, dtype=pre_x.dtype)
        out = []
        for t in range(T):
            pre = pre_x[:, t] if t == 0 else pre_x[:, t] + (h @ w_h) * z
            h, c = _lstm_step(pre, c)
            out.append(h)
        return torch.stack(out, dim=1)


class HyperSTLSTMD(_HyperSTBase):
    """HyperST-LSTM-D: ``HyperSTLSTMD(num_nodes, attributes (N, A), ...)``."""

    def __init__(self, num_nodes, attributes, input_dim=1, hidden_dim=64, output_dim=1, horizon=12,
                 num_layers=1, spatial_dim=16, *, backend: Optional[str] = None):
        super().__init__(num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, num_layers,
                         spatial_dim, backend)
        self.cells = nn.ModuleList([HyperSTLSTMDCell(input_dim if i == 0 else hidden_dim, hidden_dim, spatial_dim)
                                    for i in range(num_layers)])
        self.head = nn.Linear(hidden_dim, horizon * output_dim)


# --------------------------------------------------------------------------- HyperST-GCGRU

class HyperSTGCN(nn.Module):
    """Graph convolution ``z ⊙ (cat_k(T_k x) W) + b`` with z deduced per node from the spatial
    embedding. W (cheb_k * dim_in, dim_out) is k-major, as ``adaptive_propagate``'s output."""

    def __init__(self, dim_in, dim_out, cheb_k, spatial_dim):
        super().__init__()
        self.cheb_k = check_cheb_k(cheb_k)
        self.deduction = _deduction(spatial_dim, dim_out)
        self.weight = nn.init.xavier_normal_(nn.Parameter(torch.empty(cheb_k * dim_in, dim_out)))
        self.bias = nn.Parameter(torch.zeros(dim_out))

    def generate(self, e):
        """e (N, S) -> the node-scaled linear map ``z ⊙ (x W) + b``, built once per forward."""
        return GeneratedLinear.scaled(self.weight, self.bias, self.deduction(e))

    def forward(self, x, graph: AdaptiveGraph, e):
        """x (B, N, dim_in), e (N, S) -> (B, N, dim_out)."""
        return self.generate(e)(graph.propagate(x, self.cheb_k))


class HyperSTGCGRUCell(nn.Module):
    """GCGRU cell (HimNet/AGCRN equations) whose two graph convolutions are :class:`HyperSTGCN`:
    the library's recurrent sequence op runs all steps with the node-scaled ("scaled") weight
    form (:func:`himnet_fast.nn.gcru.run_sequence`). ``recompute`` as in
    :class:`~himnet_fast.HimGCRU`."""

    def __init__(self, num_nodes, input_dim, hidden_dim, cheb_k, spatial_dim, backend=None):
        super().__init__()
        self.num_nodes, self.input_dim, self.hidden_dim = num_nodes, input_dim, hidden_dim
        self.backend = backend
        self.gate = HyperSTGCN(input_dim + hidden_dim, 2 * hidden_dim, cheb_k, spatial_dim)
        self.update = HyperSTGCN(input_dim + hidden_dim, hidden_dim, cheb_k, spatial_dim)
        self.recompute = True

    def run_sequence(self, xs, e, graph):
        """xs (B, T, N, input_dim), e (N, S) -> hidden states (B, T, N, H), from zero states."""
        weights = cell_weights(self.gate.generate(e), self.update.generate(e), self.input_dim, self.gate.cheb_k, xs)
        return run_sequence(xs, graph, weights, self.gate.cheb_k, self.hidden_dim, self.backend, self.recompute)[0]


class HyperSTGCGRU(_HyperSTBase):
    """HyperST-GCGRU: ``HyperSTGCGRU(num_nodes, attributes (N, A), ...)``; ``embed_dim`` is the
    width of the adaptive graph's node embedding, ``dense_graph`` as in :class:`HimNet`."""

    def __init__(self, num_nodes, attributes, input_dim=1, hidden_dim=64, output_dim=1, horizon=12,
                 num_layers=1, spatial_dim=16, embed_dim=10, cheb_k=2, *, backend: Optional[str] = None,
                 dense_graph: Optional[bool] = None):
        super().__init__(num_nodes, attributes, input_dim, hidden_dim, output_dim, horizon, num_layers,
                         spatial_dim, backend)
        _positive_int("embed_dim", embed_dim)
        self.dense_graph = dense_graph
        self.node_embeddings = nn.Parameter(torch.randn(num_nodes, embed_dim))
        self.cells = nn.ModuleList([HyperSTGCGRUCell(num_nodes, input_dim if i == 0 else hidden_dim, hidden_dim,
                                                     cheb_k, spatial_dim, self.backend) for i in range(num_layers)])
        self.head = nn.Linear(hidden_dim, horizon * output_dim)

    def _graph(self):
        return AdaptiveGraph(self.node_embeddings, dense=self.dense_graph, backend=self.backend)
