"""HimGCRU and the encoder/decoder stacks (drop-ins for the originals).

A cell's two graph convolutions are turned, once per forward, into the weights of the
recurrent cell ops (:func:`cell_weights`); a step is then one :func:`~himnet_fast.ops.gcru_cell`
op (:func:`run_step`) and a whole sequence from a zero state one ``himnet_fast::gcru_sequence``
op (:func:`run_sequence`, through :func:`~himnet_fast.ops.gcru_cell.gcru_sequence`); the
decoder's whole autoregressive run, with its output projection, one ``himnet_fast::gcru_decoder``
op (:meth:`HimDecoder.run`). Other
models' cells (AGCRN, HyperST-GCGRU) compose the same functions with their own maps.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import _backend
from .._checks import check_tensor
from ..ops._common import cast, compute_dtype
from ..ops.gcru_cell import CellWeights, cell_step, gcru_sequence
from ..ops.gcru_decoder import gcru_decoder
from ..ops.gcru_pair import gcru_sequence_pair
from ..ops.graph import AdaptiveGraph
from .gcn import GeneratedLinear, HimGCN, Support, as_graph

__all__ = ["HimGCRU", "HimEncoder", "HimDecoder", "cell_weights", "run_step", "run_sequence", "encode_pair"]


def cell_weights(gate: GeneratedLinear, update: GeneratedLinear, input_dim: int, cheb_k: int,
                 like: Tensor) -> CellWeights:
    """The cell op's weights from a cell's gate and candidate maps (one form for both): each
    map split into the rows of the input and of the state, in the compute dtype of ``like``
    (the autocast dtype under autocast), cast once here rather than at every step."""
    if gate.form != update.form:
        raise ValueError(f"a cell's gate and update maps must take one form, got {gate.form!r} and {update.form!r}")
    gx, gh = gate.split(cheb_k, input_dim)
    ux, uh = update.split(cheb_k, input_dim)
    # The query of "T"/"S" maps is already in their generated weights; only the pooled forms
    # (their query) and "scaled" (its per-node scale) take an aux input.
    takes_aux = gate.form in ("S-pooled", "ST", "scaled")
    aux_g, aux_u = (gate.aux, update.aux) if takes_aux else (None, None)
    tensors = (gx.weight, gh.weight, gate.bias, ux.weight, uh.weight, update.bias, aux_g, aux_u)
    dtype = compute_dtype(like.device, like, *tensors)
    return CellWeights(gate.form, *(cast(t, dtype) for t in tensors))


def run_step(x: Tensor, state: Tensor, graph: AdaptiveGraph, weights: CellWeights, cheb_k: int,
             backend: Optional[str], recompute: bool = True) -> Tensor:
    """One step from x (B, N, C) and state (B, N, H) with prepared weights: the input is
    propagated here, the rest of the step is one :func:`~himnet_fast.ops.gcru_cell` op."""
    dtype = weights.wgh.dtype
    graph = graph.cast(dtype)
    zx = graph.propagate(x, cheb_k)
    return cell_step(cast(state, dtype), cast(zx, dtype), graph, weights, cheb_k, backend, recompute)


def run_sequence(xs: Tensor, graph: AdaptiveGraph, weights: CellWeights, cheb_k: int, hidden: int,
                 backend: Optional[str], recompute: bool = True):
    """(states (B, T, N, H), last state (B, N, H)) of one cell over xs (B, T, N, C) from a zero
    state (:func:`~himnet_fast.ops.gcru_cell.gcru_sequence`)."""
    dtype = weights.wgh.dtype
    return gcru_sequence(cast(xs, dtype), graph.cast(dtype), weights, cheb_k, hidden, backend, recompute)


class HimGCRU(nn.Module):
    """Graph convolutional GRU cell with meta-parameters (docs/spec.md, "Recurrent cell").

    Its steps run in the recurrent cell ops (one ``gcru_sequence`` op for a sequence from a zero
    state, one :func:`~himnet_fast.ops.gcru_cell` op per step otherwise), which save only their
    inputs and states and recompute each step in backward (``recompute = True``, the default;
    set the attribute to False for plain autograd: faster backward, every gate activation kept
    until backward).
    """

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis="S", *,
                 backend: Optional[str] = None):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.hidden_dim = output_dim
        self.backend = _backend.check_backend_arg(backend)
        self.gate = HimGCN(input_dim + self.hidden_dim, 2 * output_dim, cheb_k, embed_dim, meta_axis,
                           backend=backend)
        self.update = HimGCN(input_dim + self.hidden_dim, output_dim, cheb_k, embed_dim, meta_axis,
                             backend=backend)
        self.recompute = True

    @property
    def cheb_k(self) -> int:
        return self.gate.cheb_k

    def init_hidden_state(self, batch_size):
        return torch.zeros(batch_size, self.num_nodes, self.hidden_dim)

    def generate_maps(self, embeddings):
        """(gate, update) linear maps for ``embeddings``, in the same form.

        The cell op takes one query for both maps, so per-node ("S") weights are either built
        for both or streamed for both. The gate's pool is the larger (2H outputs against H), so
        its budget decision is the one both follow: otherwise, at graph sizes between the two
        thresholds, the gate would stream while the update built its weights.
        """
        gate = self.gate.generate(embeddings)
        streamed = gate.streamed if self.gate.meta_axis == "S" else None
        return gate, self.update.generate(embeddings, streamed=streamed)

    def weights(self, embeddings, like: Tensor) -> CellWeights:
        """The cell op's weights for ``embeddings`` (:func:`cell_weights`), to reuse at every step."""
        return cell_weights(*self.generate_maps(embeddings), self.input_dim, self.cheb_k, like)

    def forward(self, x, state, support: Support, embeddings=None):
        """One step: x (B, N, input_dim), state (B, N, H) -> new state (B, N, H)."""
        check_tensor("x", x, 3)
        check_tensor("state", state, 3)
        if state.shape[-1] != self.hidden_dim or state.shape[:2] != x.shape[:2]:
            raise ValueError(f"state must have shape {tuple(x.shape[:2]) + (self.hidden_dim,)}, "
                             f"got {tuple(state.shape)}")
        return self.step(x, state, as_graph(support), self.weights(embeddings, x))

    def step(self, x: Tensor, state: Tensor, graph: AdaptiveGraph, weights: CellWeights) -> Tensor:
        """One step with weights from :meth:`weights` (:func:`run_step`)."""
        return run_step(x, state, graph, weights, self.cheb_k, self.backend, self.recompute)

    def run_sequence(self, xs: Tensor, graph, embeddings=None) -> Tensor:
        """All T steps from a zero state: xs (B, T, N, C) -> states (B, T, N, H)."""
        return self.sequence(xs, graph, embeddings)[0]

    def sequence(self, xs: Tensor, graph, embeddings=None):
        """(states (B, T, N, H), last state (B, N, H)) from a zero state, the weights generated
        once for the sequence (:func:`run_sequence`)."""
        return run_sequence(xs, as_graph(graph), self.weights(embeddings, xs), self.cheb_k, self.hidden_dim,
                            self.backend, self.recompute)


class _Stack(nn.Module):
    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis, backend):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.backend = _backend.check_backend_arg(backend)
        self.cells = nn.ModuleList([HimGCRU(num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis,
                                            backend=backend)])
        for _ in range(1, num_layers):
            self.cells.append(HimGCRU(num_nodes, output_dim, output_dim, cheb_k, embed_dim, meta_axis,
                                      backend=backend))


class HimEncoder(_Stack):
    """Stack of HimGCRU layers run over all input steps (docs/spec.md)."""

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="S", *,
                 backend: Optional[str] = None):
        super().__init__(num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis, backend)

    def forward(self, x, support: Support, embeddings=None):
        """x (B, T, N, input_dim) -> (outputs of the last layer (B, T, N, H), [last state per layer])."""
        check_tensor("x", x, 4)
        if x.shape[-1] != self.input_dim or x.shape[2] != self.num_nodes:
            raise ValueError(f"x must have shape (B, T, N={self.num_nodes}, C={self.input_dim}), "
                             f"got {tuple(x.shape)}")
        graph = as_graph(support)
        current, last = x, []
        for cell in self.cells:
            current, state = cell.sequence(current, graph, embeddings)
            last.append(state)
        return current, last


def encode_pair(enc_a: HimEncoder, enc_b: HimEncoder, x: Tensor, support: Support, emb_a: Tensor,
                emb_b: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
    """The last state per layer of two encoders over the same input and graph (HimNet's "S"
    and "T" encoders): each layer's two cells run as one op
    (:func:`~himnet_fast.ops.gcru_pair.gcru_sequence_pair`: on the fused Triton step one
    launch per kernel for both). Equal to ``enc_a(x, support, emb_a)[1], enc_b(x, support,
    emb_b)[1]``."""
    if len(enc_a.cells) != len(enc_b.cells):
        raise ValueError(f"the encoders must have as many layers, got {len(enc_a.cells)} and {len(enc_b.cells)}")
    for enc in (enc_a, enc_b):
        check_tensor("x", x, 4)
        if x.shape[-1] != enc.input_dim or x.shape[2] != enc.num_nodes:
            raise ValueError(f"x must have shape (B, T, N={enc.num_nodes}, C={enc.input_dim}), got {tuple(x.shape)}")
    graph = as_graph(support)
    current, last_a, last_b = x, [], []
    for ca, cb in zip(enc_a.cells, enc_b.cells):
        wa, wb = ca.weights(emb_a, x), cb.weights(emb_b, x)
        dtype = wa.wgh.dtype
        (sa, la), (sb, lb) = gcru_sequence_pair(current, graph.cast(dtype), wa, wb, ca.cheb_k, ca.hidden_dim,
                                                ca.backend, ca.recompute and cb.recompute)
        last_a.append(la)
        last_b.append(lb)
        current = (sa, sb)
    return last_a, last_b


class HimDecoder(_Stack):
    """Stack of HimGCRU layers run for one step (docs/spec.md)."""

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="ST", *,
                 backend: Optional[str] = None):
        super().__init__(num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis, backend)

    def weights(self, embeddings, like: Tensor) -> List[CellWeights]:
        """Per-layer cell weights for ``embeddings``, generated once and reused by every step."""
        return [c.weights(embeddings, like) for c in self.cells]

    def forward(self, xt, init_state, support: Support, embeddings=None, weights: Optional[List[CellWeights]] = None):
        """xt (B, N, input_dim), init_state: per-layer (B, N, H) ->
        (last layer's new state, [new state per layer]). ``weights`` (from :meth:`weights`)
        skips regenerating them."""
        check_tensor("xt", xt, 3)
        if len(init_state) != self.num_layers:
            raise ValueError(f"init_state must hold {self.num_layers} states, got {len(init_state)}")
        graph = as_graph(support)
        if weights is None:
            weights = self.weights(embeddings, xt)
        current, out = xt, []
        for cell, state, w in zip(self.cells, init_state, weights):
            current = cell.step(current, state, graph, w)
            out.append(current)
        return current, out

    def run(self, h0: Tensor, y_cov: Tensor, labels: Optional[Tensor], teacher: Optional[Tensor], support: Support,
            weights: List[CellWeights], proj: nn.Linear) -> Tensor:
        """Every decoder step of HimNet (:func:`~himnet_fast.ops.gcru_decoder.gcru_decoder`):
        from h0 (B, N, H) for every layer, y_cov (B, T, N, Cy), the teacher-forcing ``labels``
        (B, T, N, O) and coins ``teacher`` (T,) bool (None without), ``weights`` from
        :meth:`weights` and the output projection ``proj`` -> forecasts (B, T, N, O)."""
        return gcru_decoder(h0, y_cov, labels, teacher, as_graph(support), weights, proj.weight, proj.bias,
                            self.cells[0].cheb_k, self.backend, self.cells[0].recompute)
