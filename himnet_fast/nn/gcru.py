"""HimGCRU and the encoder/decoder stacks (drop-ins for the originals)."""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn as nn

from .. import _backend
from .._checks import check_tensor
from ..ops.gcru import gcru_gate, gcru_update
from ..ops.gcru_cell import cell_step, sink_node_weight
from .gcn import GeneratedLinear, HimGCN, Support, as_graph


@functools.lru_cache(maxsize=64)
def _split_rows(cheb_k: int, c: int, h: int, device) -> tuple:
    """Rows of a k-major ``cat(x, h)`` graph-conv weight that multiply x and h respectively.

    The propagated input is ``cat_k(T_k cat(x, h)) = cat_k(cat(T_k x, T_k h))``: row
    ``k*(c+h) + j`` multiplies ``T_k x`` for ``j < c`` and ``T_k h`` otherwise. Cached: building
    them on a GPU is a host-to-device copy that would synchronise every encoder call.
    """
    ix = [k * (c + h) + j for k in range(cheb_k) for j in range(c)]
    ih = [k * (c + h) + c + j for k in range(cheb_k) for j in range(h)]
    return (torch.tensor(ix, dtype=torch.long, device=device),
            torch.tensor(ih, dtype=torch.long, device=device))


class HimGCRU(nn.Module):
    """Graph convolutional GRU cell with meta-parameters (docs/spec.md, "Recurrent cell").

    Each step runs as one :func:`~himnet_fast.ops.gcru_cell` op that saves only its inputs and
    recomputes the step in backward (``recompute = True``, the default; set the attribute to
    False for plain autograd: faster backward, every gate activation kept until backward).
    """

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, embed_dim, meta_axis="S", *,
                 backend: Optional[str] = None):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.hidden_dim = output_dim
        self.backend = _backend.normalize_backend(backend) if backend is not None else None
        self.gate = HimGCN(input_dim + self.hidden_dim, 2 * output_dim, cheb_k, embed_dim, meta_axis,
                           backend=backend)
        self.update = HimGCN(input_dim + self.hidden_dim, output_dim, cheb_k, embed_dim, meta_axis,
                             backend=backend)
        self.recompute = True

    def init_hidden_state(self, batch_size):
        return torch.zeros(batch_size, self.num_nodes, self.hidden_dim)

    def forward(self, x, state, support: Support, embeddings=None):
        """One step: x (B, N, input_dim), state (B, N, H) -> new state (B, N, H)."""
        check_tensor("x", x, 3)
        check_tensor("state", state, 3)
        if state.shape[-1] != self.hidden_dim or state.shape[:2] != x.shape[:2]:
            raise ValueError(f"state must have shape {tuple(x.shape[:2]) + (self.hidden_dim,)}, "
                             f"got {tuple(state.shape)}")
        graph = as_graph(support)
        gate, update = self.generate_maps(embeddings)
        return self._step(x, state, graph, gate, update)

    def generate_maps(self, embeddings):
        """(gate, update) linear maps for ``embeddings``, in the same form.

        The cell op takes one query for both maps, so per-node ("S") weights are either built
        for both or streamed for both. The gate's pool is the larger (2H outputs against H), so
        its budget decision is the one both follow: otherwise, at graph sizes between the two
        thresholds, the gate would stream while the update built its weights.
        """
        gate = self.gate.generate(embeddings)
        if not isinstance(gate, GeneratedLinear) or gate.axis != "S":
            return gate, self.update.generate(embeddings)  # one form already ("T", "ST", models' own maps)
        return gate, self.update.generate(embeddings, streamed=gate.streamed)

    def _step(self, x, state, graph, gate: GeneratedLinear, update: GeneratedLinear):
        """One step from x (B, N, C) and state (B, N, H): the input is propagated here, the
        rest of the step runs in :func:`~himnet_fast.ops.gcru_cell`."""
        return self._cell(graph.propagate(x, self.gate.cheb_k), state, graph, gate, update)

    def _cell(self, zx, state, graph, gate: GeneratedLinear, update: GeneratedLinear,
              sunk=None) -> torch.Tensor:
        """:func:`~himnet_fast.ops.gcru_cell` on zx (B, N, K*C) with the weight rows of x and h
        split once per generated map (cached on it, so a decoder's steps reuse them).
        ``sunk``: ((gate_h weight, acc), (update_h weight, acc)) from :meth:`_sink`."""
        k = self.gate.cheb_k
        ix, ih = _split_rows(k, zx.shape[-1] // k, self.hidden_dim, zx.device)
        gx, gh = gate.split_rows(ix, ih)
        ux, uh = update.split_rows(ix, ih)
        query = gh.query if gh.streamed else None
        wgh, wuh, accs = gh.weight, uh.weight, None
        if sunk is not None:
            (wgh, acc_g), (wuh, acc_u) = sunk
            accs = (acc_g, acc_u)
        return cell_step(state, zx, graph, k, gh.axis, (gx.weight, wgh, gate.bias),
                         (ux.weight, wuh, update.bias), query, self.backend, self.recompute, accs)

    def _sink(self, gate: GeneratedLinear, update: GeneratedLinear, c: int):
        """For a recomputed sequence on materialised per-node ("S") weights: the state-row
        weights wrapped so that the steps accumulate their gradient in one buffer each
        (:class:`~himnet_fast.ops.gcru_cell.NodeWeightGrad`); None otherwise."""
        if not (self.recompute and gate.axis == "S" and not gate.streamed and torch.is_grad_enabled()):
            return None
        ix, ih = _split_rows(self.gate.cheb_k, c, self.hidden_dim, gate.query.device)
        ws = (gate.split_rows(ix, ih)[1].weight, update.split_rows(ix, ih)[1].weight)
        if not all(w.requires_grad for w in ws):
            return None
        return tuple(sink_node_weight(w) for w in ws)

    def run_sequence(self, xs: torch.Tensor, graph, embeddings=None) -> torch.Tensor:
        """All T steps from a zero state: xs (B, T, N, C) -> states (B, T, N, H).

        Weights are generated once per sequence (so the per-node "S" weight gradient is summed
        over the steps by autograd and pushed into the pool once); the input is propagated for
        all T steps in one call per term; each later step is one
        :func:`~himnet_fast.ops.gcru_cell` (recomputed in backward); the first step, with its
        all-zero state, needs no graph product on the state.
        """
        return self._run_sequence(xs, graph, embeddings)[0]

    def _run_sequence(self, xs, graph, embeddings=None):
        """(states (B, T, N, H), last state (B, N, H)): the last state as its own tensor, so a
        caller that only needs it sends no gradient through the stack (whose backward would
        scatter it into a zero (B, T, N, H) buffer)."""
        B, T, N, C = xs.shape
        H, k = self.hidden_dim, self.gate.cheb_k
        graph = as_graph(graph)
        gate, update = self.generate_maps(embeddings)
        ix, ih = _split_rows(k, C, H, xs.device)
        # T_k applies to every step alike: fold the steps into value columns, one call per term.
        terms = graph.terms(xs.permute(0, 2, 1, 3).reshape(B, N, T * C), k)
        zx = torch.cat([z.reshape(B, N, T, C) for z in terms], -1).permute(0, 2, 1, 3)  # (B, T, N, K*C)
        # unbind, not [:, t]: its backward stacks the T step gradients once instead of
        # scattering each into a fresh zero (B, T, N, K*C) buffer.
        zxs = zx.unbind(1)
        # Step 0 (h = 0): only the input rows and the bias act; plain autograd, it saves little.
        z0 = zxs[0]
        state = xs.new_zeros(B, N, H, dtype=z0.dtype)
        zh, r = gcru_gate(gate.split_rows(ix, ih)[0](z0), state, backend=self.backend)
        state = gcru_update(update.split_rows(ix, ih)[0](z0), r, state, backend=self.backend)
        states = [state]
        sunk = self._sink(gate, update, C) if T > 1 else None
        for t in range(1, T):
            state = self._cell(zxs[t], state, graph, gate, update, sunk)
            states.append(state)
        return torch.stack(states, dim=1), state


class _Stack(nn.Module):
    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis, backend):
        super().__init__()
        self.num_nodes = num_nodes
        self.input_dim = input_dim
        self.num_layers = num_layers
        self.backend = _backend.normalize_backend(backend) if backend is not None else None
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
            current, state = cell._run_sequence(current, graph, embeddings)
            last.append(state)
        return current, last


class HimDecoder(_Stack):
    """Stack of HimGCRU layers run for one step (docs/spec.md)."""

    def __init__(self, num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis="ST", *,
                 backend: Optional[str] = None):
        super().__init__(num_nodes, input_dim, output_dim, cheb_k, num_layers, embed_dim, meta_axis, backend)

    def generate(self, embeddings) -> List[tuple]:
        """Per-layer (gate, update) linear maps for ``embeddings``, reusable across steps."""
        return [c.generate_maps(embeddings) for c in self.cells]

    def forward(self, xt, init_state, support: Support, embeddings=None, linears=None):
        """xt (B, N, input_dim), init_state: per-layer (B, N, H) ->
        (last layer's new state, [new state per layer])."""
        check_tensor("xt", xt, 3)
        if len(init_state) != self.num_layers:
            raise ValueError(f"init_state must hold {self.num_layers} states, got {len(init_state)}")
        graph = as_graph(support)
        if linears is None:
            linears = self.generate(embeddings)
        current, out = xt, []
        for cell, state, (gate, update) in zip(self.cells, init_state, linears):
            current = cell._step(current, state, graph, gate, update)
            out.append(current)
        return current, out
