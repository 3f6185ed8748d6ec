"""Two recurrent cells advanced together over one graph, as one op (``himnet_fast::gcru_sequence_pair``).

HimNet's two encoders run the same input over the same graph, with per-node ("S") and
per-sample ("T") weights of the same shapes. This op runs both whole sequences (as
:mod:`himnet_fast.ops.gcru_cell`'s ``gcru_sequence`` runs one): on the fused Triton step every
kernel is launched once for both cells -- the graph products over the 2B samples of both, the
linear maps with part 0's rows grouped by node and part 1's by sample in one grid, the weights
of both in one tensor -- so a step costs the launches of one cell, not two. Elsewhere (other
backends, streamed or partitioned graphs) the two cells' steps run one after the other inside
the op, with the same results.

Arguments: ``zx`` the propagated input, (T, B, N, K*C) when both cells read the same one (an
encoder's first layer), else (T, 2, B, N, K*C); the two cells' weights concatenated along their
first dimension (part 0's ``split`` groups first: N for "S", B for "T"), their biases likewise;
``forms`` each "S" or "T". Returns the states (T, 2, B, N, H) and the last (2, B, N, H).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._common import cast, custom_op, empty_like, no_autocast
from .gcru_cell import (CellWeights, _Acc, _fused_step, _make_step, fuses, gcru_sequence, run_states,
                        run_states_backward, sequence_grads)
from .graph import AdaptiveGraph

__all__ = ["gcru_sequence_pair", "PAIR_FORMS"]

PAIR_FORMS = ("S", "T")
_KEYS = ("wgx", "wgh", "bg", "wux", "wuh", "bu")


class _StepPair:
    """Two cells' steps on the halves of (2, B, N, .) tensors, one after the other (any backend
    and graph mode): the step interface of ``ops/gcru_cell.py`` for the pair. The two cells'
    weight gradients accumulate apart and are concatenated by :meth:`finish`; the graph's
    gradient is one buffer for both."""

    def __init__(self, steps, g: Tensor):
        self.steps, self.g = steps, g
        self.accs = [_Acc(), _Acc()]

    @staticmethod
    def _x(zx: Tensor, p: int) -> Tensor:
        return zx if zx.dim() == 3 else zx[p]

    def forward(self, h, zx):
        return torch.stack([s.forward(h[p], self._x(zx, p)) for p, s in enumerate(self.steps)])

    def first_forward(self, zx, zeros):
        return torch.stack([s.first_forward(self._x(zx, p), zeros[p]) for p, s in enumerate(self.steps)])

    def _share_graph(self, acc, needs_g: bool) -> None:
        if needs_g:
            g_acc = acc.get("g", self.g)
            for sub in self.accs:
                sub.buf["g"] = g_acc

    def backward(self, h, zx, dout, needs, acc, dzx_out=None):
        self._share_graph(acc, needs[2])
        dh = [s.backward(h[p], self._x(zx, p), dout[p], needs, sub, None if dzx_out is None else dzx_out[p])[0]
              for p, (s, sub) in enumerate(zip(self.steps, self.accs))]
        return [torch.stack(dh) if needs[0] else None] + [None] * 10

    def first_backward(self, zx, zeros, dout, needs, acc, dzx):
        for p, (s, sub) in enumerate(zip(self.steps, self.accs)):
            s.first_backward(self._x(zx, p), zeros[p], dout[p], needs, sub, None if dzx is None else dzx[p])

    def finish(self, acc) -> None:
        for s, sub in zip(self.steps, self.accs):
            s.finish(sub)
        a, b = (sub.buf for sub in self.accs)
        for key in _KEYS:
            if key in a and key in b:  # (a map no step reached, in both: the sequence zero-fills it)
                acc.buf[key] = torch.cat([a[key], b[key]])


def _fuses(g: Tensor, mode: str, backend: Optional[str]) -> bool:
    """Whether the pair runs on the fused step: a shared graph where a grouped step fuses."""
    return g.dim() == 2 and fuses(g, mode, "T", backend or None)


def _make_pair_step(g, mode, layout, forms, weights, split, cheb_k, backend, shape):
    """The fused pair step (one launch per kernel for both cells) where the fused step applies
    to a shared dense graph, else the two cells' own steps one after the other."""
    B, N, H = shape
    backend = backend or None
    if _fuses(g, mode, backend):
        return _fused_step(g, (tuple(forms), *weights, None), cheb_k, B, N, H)
    halves = [CellWeights(f, *(w[:split] if p == 0 else w[split:] for w in weights)) for p, f in enumerate(forms)]
    return _StepPair([_make_step(g, mode, layout, w, cheb_k, backend, shape) for w in halves], g)


def _pair_forward(zx, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split, mode, cheb_k, hidden, backend):
    with no_autocast(zx.device):
        B, N = zx.shape[-3], zx.shape[-2]
        step = _make_pair_step(g, mode, layout, (form_a, form_b), (wgx, wgh, bg, wux, wuh, bu), split, cheb_k,
                               backend, (B, N, hidden))
        return run_states(step, zx, zx.new_zeros(2, B, N, hidden))


def _pair_backward(dstates, dlast, zx, states, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split, mode,
                   cheb_k, backend, needs):
    """Gradients of (zx, g, wgx, wgh, bg, wux, wuh, bu)."""
    with no_autocast(zx.device):
        B, N, H = states.shape[-3:]
        weights = (wgx, wgh, bg, wux, wuh, bu)
        step = _make_pair_step(g, mode, layout, (form_a, form_b), weights, split, cheb_k, backend, (B, N, H))
        shared = zx.dim() == 4
        # a shared input still gets one gradient per cell (both write it), summed at the end
        dzx = zx.new_empty(zx.shape[0], 2, *zx.shape[1:]) if (needs[0] and shared) else (
            torch.empty_like(zx) if needs[0] else None)
        acc = run_states_backward(step, dstates, dlast, zx, states, [*needs, False, False], dzx)
        out = sequence_grads(acc, dzx, (zx, g, *weights, None, None), [*needs, False, False])[:8]
        if needs[0] and shared:
            out[0] = dzx.sum(1)
        return out


@custom_op("gcru_sequence_pair")
def _gcru_sequence_pair(zx: Tensor, g: Tensor, layout: List[Tensor], wgx: Tensor, wgh: Tensor, bg: Tensor,
                        wux: Tensor, wuh: Tensor, bu: Tensor, form_a: str, form_b: str, split: int, mode: str,
                        cheb_k: int, hidden: int, backend: str) -> Tuple[Tensor, Tensor]:
    states, last = _pair_forward(zx, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split, mode, cheb_k,
                                 hidden, backend)
    return states.contiguous(), last.contiguous()


@_gcru_sequence_pair.register_fake
def _(zx, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split, mode, cheb_k, hidden, backend):
    T, B, N = zx.shape[0], zx.shape[-3], zx.shape[-2]
    return zx.new_empty(T, 2, B, N, hidden), zx.new_empty(2, B, N, hidden)


@custom_op("gcru_sequence_pair_backward")
def _gcru_sequence_pair_backward(dstates: Optional[Tensor], dlast: Optional[Tensor], zx: Tensor, states: Tensor,
                                 g: Tensor, layout: List[Tensor], wgx: Tensor, wgh: Tensor, bg: Tensor, wux: Tensor,
                                 wuh: Tensor, bu: Tensor, form_a: str, form_b: str, split: int, mode: str,
                                 cheb_k: int, backend: str, needs: List[bool]) -> List[Tensor]:
    grads = _pair_backward(dstates, dlast, zx, states, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split,
                           mode, cheb_k, backend, needs)
    return [t.contiguous() for t, n in zip(grads, needs) if n]


@_gcru_sequence_pair_backward.register_fake
def _(dstates, dlast, zx, states, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split, mode, cheb_k,
      backend, needs):
    return [empty_like(t) for t, n in zip((zx, g, wgx, wgh, bg, wux, wuh, bu), needs) if n]


_DIFF = (0, 1, 3, 4, 5, 6, 7, 8)  # positions of the differentiable inputs


def _setup(ctx, inputs, output):
    zx, g, layout, wgx, wgh, bg, wux, wuh, bu, form_a, form_b, split, mode, cheb_k, hidden, backend = inputs
    ctx.save_for_backward(zx, output[0], g, wgx, wgh, bg, wux, wuh, bu, *layout)
    ctx.args = (form_a, form_b, split, mode, cheb_k, backend)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros, no adds


def _backward(ctx, dstates, dlast):
    zx, states, g, wgx, wgh, bg, wux, wuh, bu, *layout = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _DIFF]
    grads = iter(_gcru_sequence_pair_backward(None if dstates is None else dstates.contiguous(),
                                              None if dlast is None else dlast.contiguous(), zx, states, g, layout,
                                              wgx, wgh, bg, wux, wuh, bu, *ctx.args, needs))
    d_zx, d_g, *d_w = (next(grads) if n else None for n in needs)
    return (d_zx, d_g, [None] * len(layout), *d_w) + (None,) * 7


_gcru_sequence_pair.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- front-end

def _propagated(xs: Tensor, graph: AdaptiveGraph, cheb_k: int) -> Tensor:
    """cat_k(T_k x) of every step at once, time-major: xs ([2,] B, T, N, C) -> (T, [2,] B, N, K*C)."""
    lead = xs.shape[:-3]
    T, N, C = xs.shape[-3:]
    flat = xs.reshape(-1, T, N, C)
    terms = graph.terms(flat.permute(0, 2, 1, 3).reshape(flat.shape[0], N, T * C), cheb_k)
    zx = torch.cat([z.reshape(-1, N, T, C) for z in terms], -1)            # (G, N, T, K*C)
    zx = zx.reshape(*lead, N, T, cheb_k * C)
    return zx.movedim(-2, 0).contiguous()                                   # (T, [2,] B, N, K*C)


def gcru_sequence_pair(xs, graph: AdaptiveGraph, weights_a: CellWeights, weights_b: CellWeights, cheb_k: int,
                       hidden: int, backend: Optional[str], recompute: bool = True):
    """Two cells over all T steps from zero states, for the modules: ``xs`` one input (B, T, N, C)
    both read, or a pair of inputs (each (B, T, N, C)); each cell's weights in the compute
    dtype. Returns ((states_a (B, T, N, H), last_a), (states_b, last_b)).

    One op runs both cells where that saves launches: their forms are "S"/"T" and the fused
    step runs (a shared dense graph, backend "triton"), with ``recompute`` (the op's backward
    recomputes, as ``gcru_sequence``'s). Otherwise each cell runs its own
    :func:`~himnet_fast.ops.gcru_cell.gcru_sequence`: running them in turn inside one op would
    save nothing and cost a copy of both cells' weights (the concatenation)."""
    forms = (weights_a.form, weights_b.form)
    first = xs if isinstance(xs, Tensor) else xs[0]
    pairable = (all(f in PAIR_FORMS for f in forms) and recompute and weights_a.wgx.dtype == weights_b.wgx.dtype
                and first.numel() > 0 and _fuses(graph.tensor, graph.mode, backend))
    if not pairable:
        xa, xb = (xs, xs) if isinstance(xs, Tensor) else xs
        return (gcru_sequence(xa, graph, weights_a, cheb_k, hidden, backend, recompute),
                gcru_sequence(xb, graph, weights_b, cheb_k, hidden, backend, recompute))
    dtype = weights_a.wgx.dtype
    graph = graph.cast(dtype)
    x = cast(xs, dtype) if isinstance(xs, Tensor) else torch.stack([cast(t, dtype) for t in xs])
    zx = _propagated(x, graph, cheb_k)
    joint = [torch.cat([a, b]) for a, b in zip(weights_a.tensors()[:6], weights_b.tensors()[:6])]
    layout = list(graph.layout) if graph.layout is not None else []
    states, last = _gcru_sequence_pair(zx, graph.tensor, layout, *joint, forms[0], forms[1], weights_a.wgx.shape[0],
                                       graph.mode, cheb_k, hidden, backend or "")
    states = states.movedim(0, 2)  # (2, B, T, N, H)
    return (states[0], last[0]), (states[1], last[1])
