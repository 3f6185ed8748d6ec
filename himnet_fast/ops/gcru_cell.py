"""One whole HimGCRU step as a single autograd op that recomputes its intermediates in backward.

The cell (docs/spec.md, "Recurrent cell"), with the input propagated once outside
(``zx = cat_k(T_k x)``, (B, N, K*C): it does not depend on the state)::

    zr  = sigmoid(zx @ Wg_x + cat_k(T_k h) @ Wg_h + bg);   z, r = zr[..., :H], zr[..., H:]
    hc  = tanh(zx @ Wu_x + cat_k(T_k (z * h)) @ Wu_h + bu)
    h'  = r * h + (1 - r) * hc

(``W_x``/``W_h`` are the rows of the original k-major ``cat(x, h)`` weight that multiply the
input and the state, so this is the original step exactly, reassociated.)

Why an op: run through plain autograd, every step of a 24-step sequence keeps its propagated
state, gate activations, the Khatri-Rao operands of the "ST" meta-linear, ... alive until
backward (about 10 tensors of B*N*H per step and cell). :class:`_GCRUCellRecompute` saves only
its inputs -- ``h``, ``zx`` (a view of one per-sequence tensor of width K*C, small), the graph
tensor, the weights, biases and query, all of which exist anyway -- and reruns the step under
autograd in backward, one step at a time (activation checkpointing by hand). Saved memory per
step is the new state, O(B*N*H); the cost is one extra forward per step in backward.

The weights are inputs, not rebuilt per step: for axis "S" the caller generates the per-node
weights ``W_s = E @ pool`` (N, I, O) once per sequence, so autograd sums their gradient across
the steps and pushes it into the pool once per sequence, not once per step.

The recompute runs the registered ops (``adaptive_matmul``, ``meta_linear``, ``gcru_gate``,
``gcru_update``) with the caller's backend, so the same Function serves the torch backend and
composes the Triton/CUDA kernels where those are picked.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from .._checks import check_axis, check_cheb_k, check_same_device, check_tensor
from ._common import (GradSink, autocast_dtype, cast, compute_dtype, needs_grad, no_autocast,
                      release_cpu_heap)
from .adaptive_propagate import AdaptiveGraph
from .gcru import gcru_gate, gcru_update
from .meta_linear import apply_generated

__all__ = ["gcru_cell"]


# Largest Khatri-Rao block (rows, d*I) one GEMM of :class:`_PoolLinear` builds.
_KR_BLOCK_BYTES = 4 << 20


def _pool_chunks(x: torch.Tensor, num_d: int):
    """Slices of the pool axis whose Khatri-Rao block (rows, len*I) stays within
    ``_KR_BLOCK_BYTES`` (one d at least)."""
    rows = max(1, x.numel() // max(1, x.shape[-1]))
    step = max(1, min(num_d, _KR_BLOCK_BYTES // max(1, rows * x.shape[-1] * x.element_size())))
    return [slice(d, min(d + step, num_d)) for d in range(0, num_d, step)]


def _kr_block(x: torch.Tensor, q: torch.Tensor, sl: slice) -> torch.Tensor:
    """(B, N, len(sl)*I): ``q[..., d] * x`` for d in ``sl``, d-major (q (B, N, D) or (N, D))."""
    qs = q[..., sl, None]
    return (x.unsqueeze(-2) * qs).flatten(-2)


class _PoolLinear(torch.autograd.Function):
    """``y = sum_d q[..., d] * (x @ P[d])`` for x (B, N, I), q (B, N, D) or (N, D), P (D, I, O):
    the pooled meta-linear as a few Khatri-Rao GEMMs accumulated in place, over slices of the
    pool axis whose (rows, d*I) block stays within ``_KR_BLOCK_BYTES`` (4 MiB). Same FLOPs as
    the whole Khatri-Rao form of ``meta_linear``, whose one (rows, D*I) block is 29 MB per call
    at PEMS07 B=4: inside a recurrent loop such large short-lived blocks fragment the CPU heap
    and show up as resident memory. Small blocks still give narrow inputs (the K*C input rows
    of a GCRU, I = 6) one GEMM for all D instead of D GEMMs of inner size 6. Saves x, q, P.

    Backward is two GEMMs per slice, not three: with ``G = dy @ P[sl]ᵀ`` (B, N, d, I),
    ``dx = sum_d q_d G_d`` and ``dq_d = sum_i x * G_d`` (the same contraction as
    ``sum_o (x @ P[d]) * dy``, reassociated), so ``x @ P[d]`` is never recomputed; the other
    GEMM is ``dP[sl] = KR(x, q[sl])ᵀ dy``."""

    @staticmethod
    def forward(ctx, x, q, pool):
        # Sums over d accumulate in fp32 (or fp64) even for bf16/fp16 inputs, as one GEMM would.
        acc = torch.promote_types(x.dtype, torch.float32)
        num_d, i, o = pool.shape
        y = torch.zeros(*x.shape[:-1], o, dtype=acc, device=x.device)
        for sl in _pool_chunks(x, num_d):
            y.add_(torch.matmul(_kr_block(x, q, sl), pool[sl].reshape(-1, o)))
        ctx.save_for_backward(x, q, pool)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, q, pool = ctx.saved_tensors
        need_x, need_q, need_p = ctx.needs_input_grad
        acc = torch.promote_types(x.dtype, torch.float32)
        num_d, i, o = pool.shape
        dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        dq = torch.empty_like(q) if need_q else None
        dp = torch.empty_like(pool) if need_p else None
        dy = dy.to(x.dtype)
        dy2 = dy.reshape(-1, o)
        for sl in _pool_chunks(x, num_d):
            p2 = pool[sl].reshape(-1, o)  # (d*I, O)
            if need_x or need_q:
                g = torch.matmul(dy, p2.t()).unflatten(-1, (-1, i))  # (B, N, d, I)
                if need_x:
                    dx.add_(torch.matmul(q[..., sl].unsqueeze(-2).to(g.dtype), g).squeeze(-2))
                if need_q:
                    s = (g.to(acc) * x.unsqueeze(-2)).sum(-1)  # (B, N, d)
                    dq[..., sl] = s if q.dim() == x.dim() else s.sum(0)
            if need_p:
                kr = _kr_block(x, q, sl).reshape(-1, p2.shape[0])
                torch.mm(kr.t(), dy2, out=dp[sl].view(-1, o))
        return (dx.to(x.dtype) if need_x else None), dq, dp


class NodeWeightGrad:
    """One gradient buffer for a per-node weight (N, I, O) shared by the steps of a sequence.

    Plain autograd gives every step its own (N, I, O) weight gradient and then adds it to the
    running sum: two such tensors live at once (58 MB each for the PEMS07 gate). With this
    buffer, each step's backward adds ``x_nᵀ dy_n`` into it in place (``_NodeLinearAcc``) and
    the step op returns no weight gradient; :func:`sink_node_weight` hands the sum to autograd
    once, after the last step's backward."""

    __slots__ = ("buf",)

    def __init__(self):
        self.buf = None


def sink_node_weight(w: torch.Tensor):
    """(w for the steps, its accumulator): see :class:`NodeWeightGrad`."""
    acc = NodeWeightGrad()
    return GradSink.apply(w, acc), acc


class _NodeLinearAcc(torch.autograd.Function):
    """Per-node ``y[:, n] = x[:, n] @ W[n]`` (x (B, N, I), W (N, I, O)) whose weight gradient
    goes into ``acc.buf`` in place; returns None for W."""

    @staticmethod
    def forward(ctx, x, w, acc):
        # x arrives in the compute dtype (autocast's, if on); the gradient buffer stays in the
        # weight's own dtype, as autograd would hand it to the weight.
        ctx.acc = acc
        ctx.save_for_backward(x, w)
        return torch.bmm(x.transpose(0, 1), w.to(x.dtype)).transpose(0, 1)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy = dy.to(x.dtype)
        dyt = dy.transpose(0, 1)                 # (N, B, O)
        xt = x.transpose(0, 1).transpose(1, 2)   # (N, I, B)
        if ctx.acc.buf is None:
            ctx.acc.buf = torch.bmm(xt, dyt).to(w.dtype)
        else:
            ctx.acc.buf.baddbmm_(xt.to(w.dtype), dyt.to(w.dtype))
        dx = torch.bmm(dyt, w.to(x.dtype).transpose(1, 2)).transpose(0, 1) if ctx.needs_input_grad[0] else None
        return dx, None, None


def _matmul(axis, weight, query, backend, x):
    """``x @ W`` without bias for the weight forms of :func:`gcru_cell`: plain (I, O), "T"
    (B, I, O), "S" (N, I, O), or a pool (D, I, O) with a query ("ST", streamed "S")."""
    if query is None:
        return apply_generated(x, weight, axis or "")
    name, _ = _backend.resolve("meta_linear", backend, x.device, needs_grad(x, query, weight))
    # D accumulated GEMMs on CPU only (their reason is the CPU heap, below). On CUDA they are
    # D small launches per call and direction; a whole H100 training step took 249 ms after
    # they came in (with recompute) against 91 ms before (bench/results/gpu-h100/after-gcru-cell/;
    # how much of that is theirs is not measured).
    if name == "torch" and x.device.type == "cpu":
        # Like the op front-ends: one compute dtype (autocast's, if on) and no autocast inside.
        dt = compute_dtype(x.device, x, query, weight)
        with no_autocast(x.device):
            return _PoolLinear.apply(cast(x, dt), cast(query, dt), cast(weight, dt))
    from .meta_linear import meta_linear

    return meta_linear(x, query, weight, None, axis, backend=backend)


def _add_bias(axis, y, bias):
    """bias (O,), (B, O) for "T", (N, O) for "S", (B, N, O) for "ST" onto y (B, N, O)."""
    return y + (bias[:, None, :] if axis == "T" else bias)


def _graph_tensor(graph: AdaptiveGraph) -> torch.Tensor:
    return graph.matrix if graph.dense else graph.embedding


def _rebuild_graph(graph: AdaptiveGraph, t) -> AdaptiveGraph:
    """``graph`` with its tensor swapped for ``t`` (a detached copy in backward)."""
    g = AdaptiveGraph.__new__(AdaptiveGraph)
    g.__dict__.update(graph.__dict__)
    if graph.dense:
        g.matrix = t
    else:
        g.embedding = t
    return g


def _step(spec, h, zx, gt, wgx, wgh, bg, wux, wuh, bu, q):
    """The cell's math from tensors; ``spec`` = (graph without tensor, cheb_k, axis, backend,
    accumulators of the two state-row weights or None)."""
    graph, k, axis, backend, accs = spec
    graph = _rebuild_graph(graph, gt)

    def hmat(w, acc, v):
        if acc is not None and torch.is_grad_enabled():
            dt = compute_dtype(v.device, v, w)
            with no_autocast(v.device):
                return _NodeLinearAcc.apply(cast(v, dt), w, acc)
        return _matmul(axis, w, q, backend, v)
    acc_g, acc_u = accs if accs is not None else (None, None)
    pre = _matmul(axis, wgx, q, backend, zx) + hmat(wgh, acc_g, graph.propagate(h, k))
    zh, r = gcru_gate(_add_bias(axis, pre, bg), h, backend=backend)
    pre_c = _matmul(axis, wux, q, backend, zx) + hmat(wuh, acc_u, graph.propagate(zh, k))
    return gcru_update(_add_bias(axis, pre_c, bu), r, h, backend=backend)


class _GCRUCellRecompute(torch.autograd.Function):
    """Saves the step's inputs only; backward reruns :func:`_step` under autograd."""

    @staticmethod
    def forward(ctx, spec, *args):
        ctx.spec = spec
        # Backward runs outside the caller's autocast region: remember it to recompute alike.
        ctx.autocast = {dev: autocast_dtype(torch.device(dev)) for dev in ("cpu", "cuda")}
        ctx.save_for_backward(*args)
        release_cpu_heap(args[0].device)
        return _step(spec, *args)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        release_cpu_heap(saved[0].device)
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


def cell_step(h, zx, graph: AdaptiveGraph, cheb_k: int, axis, gate: Sequence, update: Sequence,
              query, backend, recompute: bool = True, accs=None) -> torch.Tensor:
    """Unchecked :func:`gcru_cell` for the modules (the arguments are built there). ``accs``:
    (gate, update) :class:`NodeWeightGrad` of the per-node ("S") state-row weights, which then
    come from :func:`sink_node_weight` (recompute only)."""
    if not recompute or axis != "S" or query is not None:
        accs = None
    # The spec keeps the graph's settings, not its tensor (that one is a saved input).
    spec = (_rebuild_graph(graph, None), cheb_k, axis, backend, accs)
    args = (h, zx, _graph_tensor(graph), *gate, *update, query)
    if recompute and needs_grad(*args):
        return _GCRUCellRecompute.apply(spec, *args)
    return _step(spec, *args)


def gcru_cell(zx: torch.Tensor, h: torch.Tensor, graph, gate: Sequence[torch.Tensor],
              update: Sequence[torch.Tensor], *, cheb_k: int = 2, axis: Optional[str] = None,
              query: Optional[torch.Tensor] = None, backend: Optional[str] = None,
              recompute: bool = True) -> torch.Tensor:
    """One HimGCRU step from the propagated input and the state.

    Args:
        zx: (B, N, K*C) propagated input ``cat_k(T_k x)`` (k-major; ``adaptive_propagate(x)``).
        h: (B, N, H) state.
        graph: :class:`~himnet_fast.ops.AdaptiveGraph`, or a dense support (N, N) / (B, N, N).
        gate: ``(w_x, w_h, bias)`` of the gate (O = 2H), update: the same for the candidate
            (O = H). ``w_x`` / ``w_h`` are the K*C input rows / K*H state rows of the original
            ``cat(x, h)`` weight: (rows, O) with ``axis=None``; (B, rows, O) for "T"; (N, rows, O)
            for "S"; the pool slice (D, rows, O) with ``query`` for "ST" (or a streamed "S").
            ``bias``: (O,) / (B, O) / (N, O) / (B, N, O) for None / "T" / "S" / "ST"
            (``query @ bias_pool``).
        cheb_k: number of propagation terms K >= 2.
        axis: None, "T", "S" or "ST".
        query: (B, N, D) for "ST"; (N, D) for "S" given as pools; else None.
        backend: backend of the ops run inside (None/"auto", "torch", "triton", "cuda").
        recompute: True (default) saves only the inputs and recomputes the step in backward;
            False runs plain autograd (every intermediate saved; faster backward).

    Returns:
        (B, N, H) new state.
    """
    from ..nn.gcn import as_graph

    check_cheb_k(cheb_k)
    axis = check_axis(axis) if axis else None
    check_tensor("h", h, 3)
    check_tensor("zx", zx, 3)
    B, N, H = h.shape
    if tuple(zx.shape[:2]) != (B, N) or zx.shape[-1] % cheb_k:
        raise ValueError(f"zx must have shape (B={B}, N={N}, cheb_k*C) with cheb_k={cheb_k}, got {tuple(zx.shape)}")
    graph = as_graph(graph)
    if graph.num_nodes != N:
        raise ValueError(f"graph has {graph.num_nodes} nodes, expected N={N} (h.shape[1])")
    pooled = query is not None
    if axis == "ST" and not pooled:
        raise ValueError("axis 'ST' needs query (B, N, D): its weights are pools (D, rows, O)")
    if pooled and axis not in ("S", "ST"):
        raise ValueError(f"query is only used with axis 'S' or 'ST', got axis={axis!r}")
    if pooled:
        check_tensor("query", query, 3 if axis == "ST" else 2)
        lead = (B, N) if axis == "ST" else (N,)
        if tuple(query.shape[:-1]) != lead:
            raise ValueError(f"query for axis {axis!r} must have shape {lead + ('D',)}, got {tuple(query.shape)}")
    for gname, triple, o in (("gate", gate, 2 * H), ("update", update, H)):
        if len(triple) != 3:
            raise ValueError(f"{gname} must be (w_x, w_h, bias), got {len(triple)} items")
        for part, w, rows in (("w_x", triple[0], zx.shape[-1]), ("w_h", triple[1], cheb_k * H)):
            name = f"{gname}[{part}]"
            if pooled:
                want = (query.shape[-1], rows, o)
            elif axis is None:
                want = (rows, o)
            else:
                want = ((B if axis == "T" else N), rows, o)
            check_tensor(name, w, len(want))
            if tuple(w.shape) != want:
                raise ValueError(f"{name} must have shape {want} for axis={axis!r}"
                                 f"{' with a query' if pooled else ''}, cheb_k={cheb_k}, H={H}; "
                                 f"got {tuple(w.shape)}")
        bias = triple[2]
        want = {None: (o,), "T": (B, o), "S": (N, o), "ST": (B, N, o)}[axis]
        check_tensor(f"{gname}[bias]", bias, len(want))
        if tuple(bias.shape) != want:
            raise ValueError(f"{gname}[bias] must have shape {want} for axis={axis!r}, got {tuple(bias.shape)}")
    check_same_device(zx=zx, h=h, query=query, **{f"gate{i}": t for i, t in enumerate(gate)},
                      **{f"update{i}": t for i, t in enumerate(update)})
    return cell_step(h, zx, graph, cheb_k, axis, tuple(gate), tuple(update), query, backend, recompute)
