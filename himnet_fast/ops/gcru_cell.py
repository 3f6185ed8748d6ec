"""One whole HimGCRU step as a single autograd op that recomputes its intermediates in backward.

The cell (HIMNET_SPEC.md, "Recurrent cell"), with the input half of both graph convolutions
given pre-computed (``pre_gate_x = cat_k(T_k x) @ Wg[x rows] + bg``, likewise ``pre_update_x``)::

    zr  = sigmoid(pre_gate_x + cat_k(T_k h) @ Wg[h rows]);   z, r = zr[..., :H], zr[..., H:]
    hc  = tanh(pre_update_x + cat_k(T_k (z * h)) @ Wu[h rows])
    h'  = r * h + (1 - r) * hc

Why an op: run through plain autograd, every step of a 24-step sequence keeps its propagated
inputs, gate activations, the Khatri-Rao operands of the "ST" meta-linear, ... alive until
backward (about 10 tensors of B*N*H per step and cell). :class:`_GCRUCellRecompute` saves only
its inputs -- ``h``, the two pre-activation slices (views of one per-sequence tensor, so no
copy), the graph tensor, the two weights and the query, all of which exist anyway -- and reruns
the step under autograd in backward, one step at a time (activation checkpointing by hand).
Saved memory per step is the new state, O(B*N*H); the cost is one extra forward per step.

The weights are inputs, not rebuilt per step: for axis "S" the caller generates the per-node
weight ``W_s = E @ pool`` (N, kH, O) once per sequence, so autograd sums its gradient across
the steps and pushes it into the pool once (one (D,I,O) product per sequence, not per step).

The recompute runs the registered ops (``adaptive_matmul``, ``meta_linear``, ``gcru_gate``,
``gcru_update``) with the caller's backend, so the same Function serves the torch backend and
composes the Triton/CUDA kernels where those are picked.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .._checks import check_cheb_k, check_same_device, check_tensor
from .adaptive_propagate import AdaptiveGraph
from .gcru import gcru_gate, gcru_update
from .meta_linear import apply_generated
from ._common import autocast_dtype, needs_grad

__all__ = ["gcru_cell"]


class _HPart:
    """The h-rows half of one meta-linear: ``x @ W`` without bias, for the weight forms of
    :func:`gcru_cell` (plain (I, O), "T" (B, I, O), "S" (N, I, O), or a pool (D, I, O) with a
    query for "ST" and streamed "S")."""

    __slots__ = ("axis", "weight", "query", "backend")

    def __init__(self, axis, weight, query, backend):
        self.axis, self.weight, self.query, self.backend = axis, weight, query, backend

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.query is None:
            return apply_generated(x, self.weight, self.axis or "")
        from .meta_linear import meta_linear

        return meta_linear(x, self.query, self.weight, None, self.axis, backend=self.backend)


def _graph_tensor(graph: AdaptiveGraph) -> torch.Tensor:
    return graph.matrix if graph.dense else graph.embedding


def _rebuild_graph(graph: AdaptiveGraph, t: torch.Tensor) -> AdaptiveGraph:
    """``graph`` with its tensor swapped for ``t`` (a detached copy in backward)."""
    g = AdaptiveGraph.__new__(AdaptiveGraph)
    g.__dict__.update(graph.__dict__)
    if graph.dense:
        g.matrix = t
    else:
        g.embedding = t
    return g


def _step(spec, h, pgx, pux, gt, wg, wu, q):
    """The cell's math from tensors; ``spec`` = (graph, cheb_k, axis, backend)."""
    graph, k, axis, backend = spec
    graph = _rebuild_graph(graph, gt)
    gate, upd = _HPart(axis, wg, q, backend), _HPart(axis, wu, q, backend)
    pre = pgx + gate.matmul(graph.propagate(h, k))
    zh, r = gcru_gate(pre, h, backend=backend)
    pre_c = pux + upd.matmul(graph.propagate(zh, k))
    return gcru_update(pre_c, r, h, backend=backend)


class _GCRUCellRecompute(torch.autograd.Function):
    """Saves the step's inputs only; backward reruns :func:`_step` under autograd."""

    @staticmethod
    def forward(ctx, spec, h, pgx, pux, gt, wg, wu, q):
        ctx.spec = spec
        # Backward runs outside the caller's autocast region: remember it to recompute alike.
        ctx.autocast = {dev: autocast_dtype(torch.device(dev)) for dev in ("cpu", "cuda")}
        ctx.save_for_backward(h, pgx, pux, gt, wg, wu, q)
        return _step(spec, h, pgx, pux, gt, wg, wu, q)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        inputs = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(saved, needs)]
        with torch.enable_grad(), _autocast_like(ctx.autocast):
            out = _step(ctx.spec, *inputs)
        wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, [inputs[i] for i in wanted], dout, allow_unused=True)
        result = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, *result)


class _autocast_like:
    """Re-enter the autocast state recorded in forward (a no-op when autocast was off)."""

    def __init__(self, state):
        self.ctxs = [torch.autocast(dev, dtype=dt) for dev, dt in state.items() if dt is not None]

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)
        return False


def cell_step(h, pre_gate_x, pre_update_x, graph: AdaptiveGraph, cheb_k: int, axis, gate_weight,
              update_weight, query, backend, recompute: bool = True) -> torch.Tensor:
    """Unchecked :func:`gcru_cell` for the modules (the arguments are built there)."""
    # The spec keeps the graph's settings, not its tensor (that one is a saved input).
    spec = (_rebuild_graph(graph, None), cheb_k, axis, backend)
    args = (h, pre_gate_x, pre_update_x, _graph_tensor(graph), gate_weight, update_weight, query)
    if recompute and needs_grad(*args):
        return _GCRUCellRecompute.apply(spec, *args)
    return _step(spec, *args)


def gcru_cell(h: torch.Tensor, pre_gate_x: torch.Tensor, pre_update_x: torch.Tensor, graph,
              gate_weight: torch.Tensor, update_weight: torch.Tensor, *, cheb_k: int = 2,
              axis: Optional[str] = None, query: Optional[torch.Tensor] = None,
              backend: Optional[str] = None, recompute: bool = True) -> torch.Tensor:
    """One HimGCRU step with the input half of both graph convolutions pre-computed.

    Args:
        h: (B, N, H) state.
        pre_gate_x: (B, N, 2H) ``cat_k(T_k x) @ Wg[x rows] + bg`` (bias included).
        pre_update_x: (B, N, H) ``cat_k(T_k x) @ Wu[x rows] + bu``.
        graph: :class:`~himnet_fast.ops.AdaptiveGraph`, or a dense support (N, N) / (B, N, N).
        gate_weight, update_weight: the h rows (k-major, K*H of them) of the two weights:
            (K*H, O) with ``axis=None``; (B, K*H, O) for "T"; (N, K*H, O) for "S"; the pool
            (D, K*H, O) with ``query`` for "ST" (query (B, N, D)) or a streamed "S" (query (N, D)).
            O is 2H for the gate and H for the update.
        cheb_k: number of propagation terms K >= 2.
        axis: None, "T", "S" or "ST".
        backend: backend of the ops run inside (None/"auto", "torch", "triton", "cuda").
        recompute: True (default) saves only the inputs and recomputes the step in backward;
            False runs plain autograd (every intermediate saved).

    Returns:
        (B, N, H) new state.
    """
    from .._checks import check_axis
    from ..nn.gcn import as_graph

    check_cheb_k(cheb_k)
    axis = check_axis(axis) if axis else None
    check_tensor("h", h, 3)
    B, N, H = h.shape
    for name, t, o in (("pre_gate_x", pre_gate_x, 2 * H), ("pre_update_x", pre_update_x, H)):
        check_tensor(name, t, 3)
        if tuple(t.shape) != (B, N, o):
            raise ValueError(f"{name} must have shape (B={B}, N={N}, {o}) for h of shape {tuple(h.shape)}, "
                             f"got {tuple(t.shape)}")
    graph = as_graph(graph)
    if graph.num_nodes != N:
        raise ValueError(f"graph has {graph.num_nodes} nodes, expected N={N} (h.shape[1])")
    pooled = query is not None
    if axis == "ST" and not pooled:
        raise ValueError("axis 'ST' needs query (B, N, D): its weights are pools (D, K*H, O)")
    if pooled and axis not in ("S", "ST"):
        raise ValueError(f"query is only used with axis 'S' or 'ST', got axis={axis!r}")
    rows = cheb_k * H
    for name, w, o in (("gate_weight", gate_weight, 2 * H), ("update_weight", update_weight, H)):
        if pooled:
            check_tensor(name, w, 3)
            want = (query.shape[-1], rows, o)
        elif axis is None:
            check_tensor(name, w, 2)
            want = (rows, o)
        else:
            check_tensor(name, w, 3)
            want = ((B if axis == "T" else N), rows, o)
        if tuple(w.shape) != want:
            raise ValueError(f"{name} must have shape {want} for axis={axis!r}"
                             f"{' with a query' if pooled else ''}, cheb_k={cheb_k}, H={H}; "
                             f"got {tuple(w.shape)}")
    if pooled:
        check_tensor("query", query, 3 if axis == "ST" else 2)
        lead = (B, N) if axis == "ST" else (N,)
        if tuple(query.shape[:-1]) != lead:
            raise ValueError(f"query for axis {axis!r} must have shape {lead + ('D',)}, got {tuple(query.shape)}")
    check_same_device(h=h, pre_gate_x=pre_gate_x, pre_update_x=pre_update_x, gate_weight=gate_weight,
                      update_weight=update_weight, query=query)
    return cell_step(h, pre_gate_x, pre_update_x, graph, cheb_k, axis, gate_weight, update_weight,
                     query, backend, recompute)
