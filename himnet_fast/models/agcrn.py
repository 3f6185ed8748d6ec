"""AGCRN (Bai et al., NeurIPS 2020) on the library's ops.

Node-adaptive parameter learning is ``meta_linear`` with axis "S" (per-node weights
``W_n = sum_d E[n, d] P_d`` from the node embedding E (N, D) and a pool P), and the graph
convolution input is ``adaptive_propagate`` over ``A = softmax(relu(E Eᵀ))`` with the same
Chebyshev recursion ``[I, A, 2 A T_{k-1} - T_{k-2}]`` as the original. The cell is HimNet's GCRU
(HimNet was built on AGCRN's cell), so a sequence from a zero state is the library's recurrent
sequence op and each step otherwise its cell op (:func:`himnet_fast.nn.gcru.run_sequence`,
:func:`~himnet_fast.nn.gcru.run_step`), with AGCRN's own maps.

Module layout, parameter names and shapes equal the original release (LeiBAI/AGCRN,
``model/AGCRN.py``, ``AGCRNCell.py``, ``AGCN.py``), so an original ``state_dict`` loads with
``strict=True``::

    node_embeddings                              (N, embed_dim)
    encoder.dcrnn_cells.{l}.gate.weights_pool    (embed_dim, cheb_k, dim_in + H, 2H)
    encoder.dcrnn_cells.{l}.gate.bias_pool       (embed_dim, 2H)
    encoder.dcrnn_cells.{l}.update.weights_pool  (embed_dim, cheb_k, dim_in + H, H)
    encoder.dcrnn_cells.{l}.update.bias_pool     (embed_dim, H)
    end_conv.weight                              (horizon * output_dim, 1, 1, H)
    end_conv.bias                                (horizon * output_dim,)

What differs from the original is only how it computes: no N×N Chebyshev matrices (a vector
recursion, streamed for large graphs), the per-node weights generated once per forward instead
of at every step and cell call (and never materialised as (N, K, I, O) when that exceeds
``$HIMNET_FAST_DENSE_BUDGET_MB``: the Khatri-Rao form streams them), and the input half of both
graph convolutions computed for all steps at once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import _backend
from .._checks import check_cheb_k, check_tensor
from ..nn.gcn import GeneratedLinear
from ..nn.gcru import cell_weights, run_sequence, run_step
from ..ops.gcru_cell import CellWeights
from ..ops.graph import AdaptiveGraph

__all__ = ["AVWGCN", "AGCRNCell", "AVWDCRNN", "AGCRN"]


def _check_embeddings(node_embeddings, embed_dim: int, num_nodes: Optional[int] = None) -> None:
    check_tensor("node_embeddings", node_embeddings, 2)
    if node_embeddings.shape[1] != embed_dim:
        raise ValueError(f"node_embeddings has {node_embeddings.shape[1]} columns (shape "
                         f"{tuple(node_embeddings.shape)}), expected embed_dim={embed_dim}")
    if num_nodes is not None and node_embeddings.shape[0] != num_nodes:
        raise ValueError(f"node_embeddings has {node_embeddings.shape[0]} rows (shape "
                         f"{tuple(node_embeddings.shape)}), expected num_nodes={num_nodes}")


class AVWGCN(nn.Module):
    """Adaptive graph convolution with node-adaptive weights (the original ``AVWGCN``).

    ``x (B, N, dim_in), node_embeddings (N, embed_dim) -> (B, N, dim_out)``:
    ``cat_k(T_k x) @ W_n + E_n @ bias_pool`` with ``W_n = einsum('d,dkio->kio', E_n, weights_pool)``.

    ``weights_pool`` keeps the original layout (embed_dim, cheb_k, dim_in, dim_out). Viewed as
    (embed_dim, cheb_k * dim_in, dim_out) its row ``k * dim_in + i`` multiplies channel ``i`` of
    ``T_k x``, which is exactly the k-major column order of ``adaptive_propagate``; the view is
    free (the parameter is contiguous) and gradients flow through it to the 4-d parameter.
    """

    def __init__(self, dim_in, dim_out, cheb_k, embed_dim, *, backend: Optional[str] = None):
        super().__init__()
        self.dim_in, self.dim_out, self.embed_dim = dim_in, dim_out, embed_dim
        self.cheb_k = check_cheb_k(cheb_k)
        self.backend = _backend.check_backend_arg(backend)
        # The original leaves these uninitialised (torch.FloatTensor) and its training script
        # re-initialises every parameter; AGCRN.__init__ does the same, this is a fallback for
        # the module used on its own.
        self.weights_pool = nn.Parameter(torch.empty(embed_dim, cheb_k, dim_in, dim_out))
        self.bias_pool = nn.Parameter(torch.empty(embed_dim, dim_out))
        nn.init.xavier_uniform_(self.weights_pool)
        nn.init.xavier_uniform_(self.bias_pool)

    def generate(self, node_embeddings: torch.Tensor, streamed: Optional[bool] = None) -> GeneratedLinear:
        """The per-node linear map for ``node_embeddings`` (N, D), built once per forward, from the
        pool viewed as (embed_dim, cheb_k * dim_in, dim_out) (k-major rows)."""
        _check_embeddings(node_embeddings, self.embed_dim)
        d, k, i, o = self.weights_pool.shape
        return GeneratedLinear.from_pool(self.weights_pool.view(d, k * i, o), self.bias_pool, node_embeddings, "S",
                                         self.backend, streamed)

    def forward(self, x: torch.Tensor, node_embeddings: torch.Tensor, *,
                graph: Optional[AdaptiveGraph] = None) -> torch.Tensor:
        """x (B, N, dim_in), node_embeddings (N, embed_dim) -> (B, N, dim_out).

        ``graph`` reuses an :class:`AdaptiveGraph` of ``node_embeddings`` built by the caller.
        """
        check_tensor("x", x, 3)
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"x has {x.shape[-1]} channels (shape {tuple(x.shape)}), expected dim_in={self.dim_in}")
        _check_embeddings(node_embeddings, self.embed_dim, x.shape[1])
        if graph is None:
            graph = AdaptiveGraph(node_embeddings, backend=self.backend)
        return self.generate(node_embeddings)(graph.propagate(x, self.cheb_k))

    def extra_repr(self) -> str:
        return f"{self.dim_in}, {self.dim_out}, cheb_k={self.cheb_k}, embed_dim={self.embed_dim}"


class AGCRNCell(nn.Module):
    """The original ``AGCRNCell``: a GRU whose two linear maps are :class:`AVWGCN`.

    ``z, r = split(sigmoid(gate(cat(x, h))))``; ``hc = tanh(update(cat(x, z * h)))``;
    ``h' = r * h + (1 - r) * hc`` -- HimNet's GCRU equations, so a step is the library's cell op
    (:func:`~himnet_fast.nn.gcru.run_step`) with this cell's maps; ``recompute`` as in
    :class:`~himnet_fast.HimGCRU`.
    """

    def __init__(self, node_num, dim_in, dim_out, cheb_k, embed_dim, *, backend: Optional[str] = None):
        super().__init__()
        self.node_num = self.num_nodes = node_num
        self.input_dim = dim_in
        self.hidden_dim = dim_out
        self.backend = _backend.check_backend_arg(backend)
        self.gate = AVWGCN(dim_in + dim_out, 2 * dim_out, cheb_k, embed_dim, backend=backend)
        self.update = AVWGCN(dim_in + dim_out, dim_out, cheb_k, embed_dim, backend=backend)
        self.recompute = True

    def init_hidden_state(self, batch_size):
        return torch.zeros(batch_size, self.node_num, self.hidden_dim)

    def weights(self, node_embeddings: torch.Tensor, like: torch.Tensor) -> CellWeights:
        """The cell op's weights, generated once per forward; the update map takes the gate's
        choice between built and streamed per-node weights (one form for both)."""
        gate = self.gate.generate(node_embeddings)
        update = self.update.generate(node_embeddings, streamed=gate.streamed)
        return cell_weights(gate, update, self.input_dim, self.gate.cheb_k, like)

    def forward(self, x, state, node_embeddings, *, graph: Optional[AdaptiveGraph] = None):
        """One step: x (B, N, dim_in), state (B, N, H), node_embeddings (N, D) -> (B, N, H)."""
        check_tensor("x", x, 3)
        check_tensor("state", state, 3)
        if state.shape[-1] != self.hidden_dim or state.shape[:2] != x.shape[:2]:
            raise ValueError(f"state must have shape {tuple(x.shape[:2]) + (self.hidden_dim,)}, "
                             f"got {tuple(state.shape)}")
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"x has {x.shape[-1]} channels (shape {tuple(x.shape)}), "
                             f"expected dim_in={self.input_dim}")
        _check_embeddings(node_embeddings, self.gate.embed_dim, x.shape[1])
        if graph is None:
            graph = AdaptiveGraph(node_embeddings, backend=self.backend)
        return self.step(x, state.to(x.device), graph, self.weights(node_embeddings, x))

    def step(self, x, state, graph: AdaptiveGraph, weights: CellWeights):
        return run_step(x, state, graph, weights, self.gate.cheb_k, self.backend, self.recompute)

    def sequence(self, xs, graph: AdaptiveGraph, node_embeddings):
        """(states (B, T, N, H), last state) over xs (B, T, N, dim_in) from a zero state."""
        return run_sequence(xs, graph, self.weights(node_embeddings, xs), self.gate.cheb_k, self.hidden_dim,
                            self.backend, self.recompute)


class AVWDCRNN(nn.Module):
    """The original encoder: ``num_layers`` :class:`AGCRNCell` run over all input steps."""

    def __init__(self, node_num, dim_in, dim_out, cheb_k, embed_dim, num_layers=1, *,
                 backend: Optional[str] = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 (at least one layer in the encoder), got {num_layers}")
        self.node_num = node_num
        self.input_dim = dim_in
        self.num_layers = num_layers
        self.dcrnn_cells = nn.ModuleList([AGCRNCell(node_num, dim_in, dim_out, cheb_k, embed_dim, backend=backend)])
        for _ in range(1, num_layers):
            self.dcrnn_cells.append(AGCRNCell(node_num, dim_out, dim_out, cheb_k, embed_dim, backend=backend))

    def init_hidden(self, batch_size):
        return torch.stack([c.init_hidden_state(batch_size) for c in self.dcrnn_cells], dim=0)

    def forward(self, x, init_state, node_embeddings, *, graph: Optional[AdaptiveGraph] = None):
        """x (B, T, N, dim_in); init_state (num_layers, B, N, H) or a list of (B, N, H), or None
        for zeros -> (last layer's states (B, T, N, H), [last state per layer]).

        A zero initial state (None, as :class:`AGCRN` passes) takes the lean sequence loop; a
        given state runs step by step with the weights still generated once per layer.
        """
        check_tensor("x", x, 4)
        if x.shape[2] != self.node_num or x.shape[3] != self.input_dim:
            raise ValueError(f"x must have shape (B, T, N={self.node_num}, C={self.input_dim}), "
                             f"got {tuple(x.shape)}")
        _check_embeddings(node_embeddings, self.dcrnn_cells[0].gate.embed_dim, self.node_num)
        if init_state is not None and len(init_state) != self.num_layers:
            raise ValueError(f"init_state must hold {self.num_layers} states, got {len(init_state)}")
        if graph is None:
            graph = AdaptiveGraph(node_embeddings, backend=self.dcrnn_cells[0].backend)
        current, last = x, []
        for i, cell in enumerate(self.dcrnn_cells):
            if init_state is None:
                current, state = cell.sequence(current, graph, node_embeddings)
            else:
                weights = cell.weights(node_embeddings, current)
                state = init_state[i].to(x.device)
                states = []
                for t in range(current.shape[1]):
                    state = cell.step(current[:, t], state, graph, weights)
                    states.append(state)
                current = torch.stack(states, dim=1)
            last.append(state)
        return current, last


def _arg(args, name, value):
    """A keyword wins; else the attribute of the original's ``args`` object, if it has one."""
    return getattr(args, name, None) if args is not None and value is None else value


class AGCRN(nn.Module):
    """AGCRN forecaster: encoder over the input window, last state -> all horizons at once.

    Construct as the original, ``AGCRN(args)`` with an object carrying ``num_nodes, input_dim,
    rnn_units, output_dim, horizon, num_layers, embed_dim, cheb_k`` (``default_graph`` is read
    and unused, as in the original), or with keywords. Keyword-only extras: ``backend`` (see
    ``himnet_fast.available_backends``) and ``dense_graph`` (True/False forces/forbids
    materialising the N×N graph; None decides by size).

    Parameters are initialised as the original training script does (xavier-uniform for
    matrices, uniform(0, 1) for vectors), so a fresh model starts as an original run.
    """

    def __init__(self, args=None, *, num_nodes=None, input_dim=None, rnn_units=None, output_dim=None,
                 horizon=None, num_layers=None, embed_dim=None, cheb_k=None, default_graph=True,
                 backend: Optional[str] = None, dense_graph: Optional[bool] = None):
        super().__init__()
        defaults = dict(input_dim=1, rnn_units=64, output_dim=1, horizon=12, num_layers=2, embed_dim=10, cheb_k=2)
        given = dict(num_nodes=num_nodes, input_dim=input_dim, rnn_units=rnn_units, output_dim=output_dim,
                     horizon=horizon, num_layers=num_layers, embed_dim=embed_dim, cheb_k=cheb_k)
        cfg = {}
        for k, v in given.items():
            v = _arg(args, k, v)
            if v is None:
                if k not in defaults:
                    raise ValueError(f"AGCRN needs {k} (as a keyword or an attribute of args)")
                v = defaults[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AGCRN {k} must be a positive int, got {v!r}")
            cfg[k] = v
        self.num_node = cfg["num_nodes"]
        self.input_dim = cfg["input_dim"]
        self.hidden_dim = cfg["rnn_units"]
        self.output_dim = cfg["output_dim"]
        self.horizon = cfg["horizon"]
        self.num_layers = cfg["num_layers"]
        self.default_graph = getattr(args, "default_graph", default_graph)
        self.backend = _backend.check_backend_arg(backend)
        self.dense_graph = dense_graph
        self.node_embeddings = nn.Parameter(torch.randn(self.num_node, cfg["embed_dim"]), requires_grad=True)
        self.encoder = AVWDCRNN(self.num_node, self.input_dim, self.hidden_dim, cfg["cheb_k"], cfg["embed_dim"],
                                self.num_layers, backend=backend)
        self.end_conv = nn.Conv2d(1, self.horizon * self.output_dim, kernel_size=(1, self.hidden_dim), bias=True)
        for p in self.parameters():  # the original train script's initialisation
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.uniform_(p)

    def forward(self, x, y_cov=None, labels=None, batches_seen=None):
        """x (B, T, N, C) with C >= input_dim -> (B, horizon, N, output_dim).

        The first ``input_dim`` channels of x are the model's input (the original's ``source``;
        with the library's [signal, time of day, day of week] windows and input_dim=1 that is the
        signal). The other arguments follow the library's common forecaster signature and are
        ignored: AGCRN has no decoder and no teacher forcing (the original's ``targets`` and
        ``teacher_forcing_ratio`` were unused too, so ``model(source, targets, 0.5)`` still works).
        """
        check_tensor("x", x, 4)
        if x.shape[2] != self.num_node or x.shape[3] < self.input_dim:
            raise ValueError(f"x must have shape (B, T, N={self.num_node}, C>={self.input_dim}), "
                             f"got {tuple(x.shape)}")
        source = x[..., :self.input_dim]
        graph = AdaptiveGraph(self.node_embeddings, dense=self.dense_graph, backend=self.backend)
        _, last = self.encoder(source, None, self.node_embeddings, graph=graph)
        # end_conv, a (1, H) convolution over the last state (B, 1, N, H), is a linear map of each
        # node's state: computed as one, with the conv's own parameters (the checkpoint layout
        # stays). On CPU, PyTorch's oneDNN convolution backward returns wrong weight gradients
        # for 16-wide kernels at B >= 2 (up to 1e35, different at every run, at B = 2, N = 29,
        # H = 16; also wrong at N = 207; tests/test_models_agcrn.py).
        w = self.end_conv.weight.flatten(1)                                        # (horizon*C, H)
        output = torch.nn.functional.linear(last[-1], w, self.end_conv.bias)       # (B, N, horizon*C)
        output = output.reshape(-1, self.num_node, self.horizon, self.output_dim)
        return output.permute(0, 2, 1, 3)                                          # (B, horizon, N, C)
