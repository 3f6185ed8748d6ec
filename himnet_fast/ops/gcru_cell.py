"""One whole HimGCRU step as a single registered op that recomputes its intermediates in backward.

The cell (docs/spec.md, "Recurrent cell"), with the input propagated once outside
(``zx = cat_k(T_k x)``, (B, N, K*C): it does not depend on the state)::

    zr  = sigmoid(zx @ Wg_x + cat_k(T_k h) @ Wg_h + bg);   z, r = zr[..., :H], zr[..., H:]
    hc  = tanh(zx @ Wu_x + cat_k(T_k (z * h)) @ Wu_h + bu)
    h'  = r * h + (1 - r) * hc

(``W_x``/``W_h`` are the rows of the original k-major ``cat(x, h)`` weight that multiply the
input and the state, so this is the original step exactly, reassociated.)

Why an op: run through plain autograd, every step of a 24-step sequence keeps its propagated
state, gate activations, the Khatri-Rao operands of the "ST" meta-linear, ... alive until
backward (about 10 tensors of B*N*H per step and cell). ``himnet_fast::gcru_cell`` saves only
its inputs -- ``h``, ``zx`` (a view of one per-sequence tensor of width K*C, small), the graph
tensor, the weights, biases and query, all of which exist anyway -- and its backward
(``himnet_fast::gcru_cell_backward``) reruns the step and applies the step's derivative by
hand, one step at a time (activation checkpointing without autograd). Saved memory per step
is the new state, O(B*N*H); the cost is one extra forward per step in backward. As a custom op
with a fake, the step is one node to ``torch.compile`` and one recorded piece of a CUDA graph.

The weights are inputs, not rebuilt per step, in one of these forms (:data:`FORMS`):

=========  ========================  ============  ==========================
form       weight (rows, O)          aux           bias
=========  ========================  ============  ==========================
plain      (rows, O)                 --            (O,)
T          (B, rows, O)              --            (B, O)
S          (N, rows, O)              --            (N, O)
S-pooled   pool (D, rows, O)         query (N, D)  (N, O)
ST         pool (D, rows, O)         query (B, N, D)  (B, N, O)
scaled     (rows, O)                 scale (N, O)  (O,)   ``y = (x @ W) * scale``
=========  ========================  ============  ==========================

For "S" the caller generates the per-node weights ``W_s = E @ pool`` once per sequence: the
sequence op adds every step's gradient of them into one buffer, which autograd pushes into the
pool once.

A step runs through one of two implementations with one interface (:func:`_make_step`):
:class:`_ComposedStep`, the library's ops run without autograd -- the graph products
(:class:`~himnet_fast.ops.graph.GraphProducts`: dense matmuls, ``adaptive_matmul``,
``partitioned_adaptive_matmul``), ``meta_linear`` for the pooled forms, ``gcru_gate`` and
``gcru_update``, each through the backend the caller chose -- or, where the step's ops run on
Triton over a dense graph, the fused step of ``kernels/gcru_cell.py`` (about 2K kernels
forward, 14 backward). :func:`cell_math` is the step written once; with ``recompute=False``
and gradients needed the caller runs the same function on the autograd ops instead.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_axis, check_cheb_k, check_same_device, check_tensor
from ..partition import PartitionLayout
from . import _triton
from ._common import cast, compute_dtype, custom_op, empty_like, needs_grad, no_autocast, release_cpu_heap
from .gcru import apply_gate, apply_update
from .graph import AdaptiveGraph, GraphProducts
from .meta_linear import apply_meta_linear

__all__ = ["gcru_cell", "gcru_sequence", "CellWeights", "FORMS", "linear", "add_bias"]

FORMS = ("plain", "T", "S", "S-pooled", "ST", "scaled")
_POOLED = ("S-pooled", "ST")


class CellWeights(NamedTuple):
    """The weights of one cell in one form (module docstring): the input rows ``wgx``/``wux``
    and state rows ``wgh``/``wuh`` of the gate and candidate maps, their biases, and the
    per-map ``aux`` (the query of the pooled forms, the same tensor for both maps; the
    per-node scale of "scaled")."""

    form: str
    wgx: Tensor
    wgh: Tensor
    bg: Tensor
    wux: Tensor
    wuh: Tensor
    bu: Tensor
    aux_g: Optional[Tensor] = None
    aux_u: Optional[Tensor] = None

    def tensors(self) -> tuple:
        return (self.wgx, self.wgh, self.bg, self.wux, self.wuh, self.bu, self.aux_g, self.aux_u)


# --------------------------------------------------------------------------- the step, once

def _pooled_query(form: str, aux: Tensor, x: Tensor) -> Tensor:
    """The pooled forms run meta_linear's "ST" path: a per-node query is broadcast over the
    batch (a stride-0 view, no copy), so "S-pooled" streams like "ST" whatever the budget
    says for the state-row slice alone."""
    return aux if form == "ST" else aux.expand(x.shape[0], *aux.shape)


def linear(form: str, x: Tensor, w: Tensor, aux: Optional[Tensor], pooled) -> Tensor:
    """``x @ W`` (no bias) for x (B, N, I) in ``form``; ``pooled(x, q, pool)`` is the pooled
    product (the autograd op, or a backend's forward inside the cell op)."""
    if form == "plain":
        return x @ w
    if form == "T":
        return torch.bmm(x, w)
    if form == "S":
        return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)
    if form == "scaled":
        return (x @ w) * aux
    return pooled(x, _pooled_query(form, aux, x), w)


def add_bias(form: str, y: Tensor, bias: Tensor) -> Tensor:
    """y (B, N, O) + bias: (O,), (B, O) for "T", (N, O) for "S"/"S-pooled", (B, N, O) for "ST"."""
    return y + (bias[:, None, :] if form == "T" else bias)


def cell_math(h: Tensor, zx: Tensor, w: CellWeights, cheb_k: int, terms, pooled, gate, update,
              record: Optional[dict] = None) -> Tensor:
    """The step (module docstring) from its pieces: ``terms(v, K)`` the K propagation terms,
    ``pooled`` the pooled product, ``gate(pre, h) -> (z * h, r)``, ``update(pre_c, r, h)``.
    ``record`` receives the intermediates the backward needs."""
    ph = torch.cat(terms(h, cheb_k), dim=-1)
    pre_g = add_bias(w.form, linear(w.form, zx, w.wgx, w.aux_g, pooled) + linear(w.form, ph, w.wgh, w.aux_g, pooled),
                     w.bg)
    zh, r = gate(pre_g, h)
    pz = torch.cat(terms(zh, cheb_k), dim=-1)
    pre_u = add_bias(w.form, linear(w.form, zx, w.wux, w.aux_u, pooled) + linear(w.form, pz, w.wuh, w.aux_u, pooled),
                     w.bu)
    if record is not None:
        record.update(ph=ph, pre_g=pre_g, zh=zh, r=r, pz=pz, pre_u=pre_u)
    return update(pre_u, r, h)


# --------------------------------------------------------------------------- without autograd

class _Pieces:
    """The step's pieces as the backends' forward/backward functions (no autograd)."""

    def __init__(self, g: Tensor, mode: str, layout: Sequence[Tensor], backend: Optional[str], device):
        self.products = GraphProducts(mode, g, _layout_or_none(layout), backend, True)
        self.ml = _backend.impl("meta_linear", _backend.resolve("meta_linear", backend, device, True))
        self.gate = _backend.impl("gcru_gate", _backend.resolve("gcru_gate", backend, device, True))
        self.update = _backend.impl("gcru_update", _backend.resolve("gcru_update", backend, device, True))
        self.saved: List[list] = []

    def terms(self, v: Tensor, cheb_k: int) -> List[Tensor]:
        z, saved = self.products.terms(v, cheb_k)
        self.saved.append(saved)
        return z

    def pooled(self, x: Tensor, q: Tensor, pool: Tensor) -> Tensor:
        return self.ml.forward(x, q, pool, None, "ST")

    def linear_backward(self, form: str, dy: Tensor, x: Tensor, w: Tensor, aux: Optional[Tensor],
                        need_x: bool, need_w: bool, need_aux: bool, acc: Optional["_Acc"] = None,
                        w_key: str = "", aux_key: str = ""):
        """(dx, dW, daux) of :func:`linear`, each None when not needed. With ``acc`` the weight
        and aux gradients are added into its buffers ``w_key`` / ``aux_key`` (by the GEMMs
        themselves where they can accumulate) and returned as None."""
        dx = dw = daux = None
        buf = acc.get(w_key, w) if (acc is not None and need_w) else None
        if form in ("plain", "scaled"):
            t = dy * aux if form == "scaled" else dy
            dx = t.matmul(w.t()) if need_x else None
            if need_w:
                a, b = x.reshape(-1, x.shape[-1]).t(), t.reshape(-1, t.shape[-1])
                if buf is None:
                    dw = a.mm(b)
                else:
                    buf.addmm_(a, b)
            if form == "scaled" and need_aux:
                daux = (dy * (x @ w)).sum(0)
        elif form in ("T", "S"):
            # "T": one weight per sample (bmm over B); "S": one per node (bmm over N).
            xb, dyb = (x, dy) if form == "T" else (x.transpose(0, 1), dy.transpose(0, 1))
            if need_x:
                dx = torch.bmm(dyb, w.transpose(1, 2))
                dx = dx if form == "T" else dx.transpose(0, 1)
            if need_w:
                if buf is None:
                    dw = torch.bmm(xb.transpose(1, 2), dyb)
                else:
                    buf.baddbmm_(xb.transpose(1, 2), dyb)
        else:
            q = _pooled_query(form, aux, x)
            dx, dq, dw, _ = self.ml.backward(dy, x, q, w, None, "ST", (need_x, need_aux, need_w, False))
            if dq is not None:
                daux = dq if form == "ST" else dq.sum(0)
            if buf is not None:
                buf.add_(dw)
                dw = None
        if daux is not None and acc is not None:
            acc.get(aux_key, aux).add_(daux)
            daux = None
        return dx, dw, daux


class _Acc:
    """Gradient buffers a sequence's steps add into in place (created on first use, in the
    dtype and shape of what they accumulate for)."""

    def __init__(self):
        self.buf = {}

    def get(self, key: str, like: Tensor) -> Tensor:
        if key not in self.buf:
            self.buf[key] = torch.zeros_like(like, memory_format=torch.contiguous_format)
        return self.buf[key]


def _layout_or_none(layout: Sequence[Tensor]) -> Optional[PartitionLayout]:
    return PartitionLayout(*layout) if len(layout) else None


def _bias_grad(form: str, dy: Tensor) -> Tensor:
    """The gradient of :func:`add_bias`'s bias: dy summed over the dimensions it broadcasts on."""
    if form in ("plain", "scaled"):
        return dy.sum((0, 1))
    if form == "T":
        return dy.sum(1)
    if form in ("S", "S-pooled"):
        return dy.sum(0)
    return dy


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a + b)


def fuses(g: Tensor, mode: str, form: str, backend: Optional[str]) -> bool:
    """Whether a step in ``form`` runs on the fused Triton step: the graph is dense, the form is
    not "scaled" and the step's own ops run on Triton (the pooled forms' meta_linear too)."""
    device = g.device
    return (mode == "dense" and form != "scaled"
            and _backend.resolve("gcru_gate", backend, device, True) == "triton"
            and (form not in _POOLED or _backend.resolve("meta_linear", backend, device, True) == "triton"))


def _make_step(g: Tensor, mode: str, layout: Sequence[Tensor], w: CellWeights, cheb_k: int, backend: str,
               shape: Sequence[int]):
    """The step's implementation: the fused Triton step (``kernels/gcru_cell.py``: about 2K
    kernels forward, 15 backward) where :func:`fuses`; else the composition of the backends'
    ops."""
    device = g.device
    backend = backend or None
    if fuses(g, mode, w.form, backend):
        B, N, H = shape
        return _fused_step(g, (w.form, w.wgx, w.wgh, w.bg, w.wux, w.wuh, w.bu, w.aux_g), cheb_k, B, N, H)
    return _ComposedStep(g, mode, layout, w, cheb_k, backend, device)


_fused_step = _triton.launcher("gcru_cell", "FusedStep")


def _forward_impl(h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend):
    release_cpu_heap(h.device)
    with no_autocast(h.device):
        w = CellWeights(form, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)
        return _make_step(g, mode, layout, w, cheb_k, backend, h.shape).forward(h, zx)


class _ComposedStep:
    """The step composed of the backends' ops (:class:`_Pieces`): any graph mode and form.
    The interface the cell and sequence ops run a step through (the fused Triton step,
    ``himnet_fast.kernels.gcru_cell.FusedStep``, has the same): ``forward(h, zx)``,
    ``backward(h, zx, dout, needs, acc=None, dzx_out=None)``, ``first_forward(zx, zeros)`` /
    ``first_backward(zx, zeros, dout, needs, acc, dzx)`` for a sequence's first step from the
    zero state (only the input rows and the biases act: no graph product), and
    ``finish(acc)``, which turns what a sequence's backward steps accumulated into gradients."""

    def __init__(self, g: Tensor, mode: str, layout: Sequence[Tensor], w: CellWeights, cheb_k: int,
                 backend: Optional[str], device):
        self.p = _Pieces(g, mode, layout, backend, device)
        self.w, self.cheb_k = w, cheb_k

    def forward(self, h: Tensor, zx: Tensor) -> Tensor:
        p = self.p
        p.saved = []  # the products' saved state is for a backward pass, not needed here
        return cell_math(h, zx, self.w, self.cheb_k, p.terms, p.pooled, p.gate.forward, p.update.forward)

    def first_forward(self, zx: Tensor, zeros: Tensor, record: Optional[dict] = None) -> Tensor:
        p, w = self.p, self.w
        pre_g = add_bias(w.form, linear(w.form, zx, w.wgx, w.aux_g, p.pooled), w.bg)
        _, r = p.gate.forward(pre_g, zeros)
        pre_u = add_bias(w.form, linear(w.form, zx, w.wux, w.aux_u, p.pooled), w.bu)
        if record is not None:
            record.update(pre_g=pre_g, r=r, pre_u=pre_u)
        return p.update.forward(pre_u, r, zeros)

    def first_backward(self, zx: Tensor, zeros: Tensor, dout: Tensor, needs, acc: "_Acc", dzx: Optional[Tensor]):
        """The gradient of zx into ``dzx`` (when needed); the input rows', biases' and aux
        gradients added into ``acc`` (the biases' as their pre-activation gradients, like
        :meth:`backward`). ``needs``: (zx, wgx, bg, wux, bu, aux_g, aux_u)."""
        n_zx, n_wgx, n_bg, n_wux, n_bu, n_ag, n_au = needs
        p, w = self.p, self.w
        rec: dict = {}
        self.first_forward(zx, zeros, rec)
        dpre_u, dr, _ = p.update.backward(rec["pre_u"], rec["r"], zeros, dout)
        dpre_g, _ = p.gate.backward(rec["pre_g"], zeros, zeros, dr)
        if n_bu:
            acc.get("dpre_u", dpre_u).add_(dpre_u)
        if n_bg:
            acc.get("dpre_g", dpre_g).add_(dpre_g)
        d0, _, _ = p.linear_backward(w.form, dpre_u, zx, w.wux, w.aux_u, n_zx, n_wux, n_au, acc, "wux", "aux_u")
        d1, _, _ = p.linear_backward(w.form, dpre_g, zx, w.wgx, w.aux_g, n_zx, n_wgx, n_ag, acc, "wgx", "aux_g")
        if n_zx:
            torch.add(d0, d1, out=dzx)

    def finish(self, acc: "_Acc") -> None:
        """After a sequence's last backward: the biases' gradients from the running sums of
        their pre-activation gradients."""
        for key, dkey in (("bg", "dpre_g"), ("bu", "dpre_u")):
            if dkey in acc.buf:
                acc.buf[key] = _bias_grad(self.w.form, acc.buf.pop(dkey))

    def backward(self, h: Tensor, zx: Tensor, dout: Tensor, needs, acc: Optional["_Acc"] = None,
                 dzx_out: Optional[Tensor] = None) -> list:
        """Gradients of the step's 11 differentiable inputs (h, zx, g, wgx, wgh, bg, wux, wuh,
        bu, aux_g, aux_u), None where ``needs`` says so: the step rerun, then its derivative in
        reverse. With ``acc`` (a sequence's buffers) the graph, weight and aux gradients are
        added into it, and the biases' into the running sums of the pre-activation gradients
        ("dpre_g", "dpre_u": a bias gradient is a sum of those, taken once at the end); they
        are returned as None. ``dzx_out``: where zx's gradient goes (else a new tensor)."""
        n_h, n_zx, n_g, n_wgx, n_wgh, n_bg, n_wux, n_wuh, n_bu, n_ag, n_au = needs
        p, w, K = self.p, self.w, self.cheb_k
        form = w.form
        rec: dict = {}
        p.saved = []
        cell_math(h, zx, w, K, p.terms, p.pooled, p.gate.forward, p.update.forward, record=rec)
        saved_h, saved_zh = p.saved
        g_acc = acc.get("g", p.products.g) if (acc is not None and n_g) else None

        def bias_grad(key, dpre, needed):
            if not needed:
                return None
            if acc is None:
                return _bias_grad(form, dpre)
            acc.get(key, dpre).add_(dpre)
            return None

        # h' = update(pre_u, r, h)
        dpre_u, dr, dh = p.update.backward(rec["pre_u"], rec["r"], h, dout)
        dbu = bias_grad("dpre_u", dpre_u, n_bu)
        dpz, dwuh, dau = p.linear_backward(form, dpre_u, rec["pz"], w.wuh, w.aux_u, True, n_wuh, n_au, acc, "wuh", "aux_u")
        dzx, dwux, dau2 = p.linear_backward(form, dpre_u, zx, w.wux, w.aux_u, n_zx, n_wux, n_au, acc, "wux", "aux_u")
        dau = _add(dau, dau2)
        # pz = cat_k(T_k (z * h))
        dzh, dgraph = p.products.terms_backward(list(dpz.chunk(K, dim=-1)), saved_zh, True, n_g, g_acc)
        # (z * h, r) = gate(pre_g, h)
        dpre_g, dh2 = p.gate.backward(rec["pre_g"], h, dzh, dr)
        dh = dh + dh2
        dbg = bias_grad("dpre_g", dpre_g, n_bg)
        dph, dwgh, dag = p.linear_backward(form, dpre_g, rec["ph"], w.wgh, w.aux_g, True, n_wgh, n_ag, acc, "wgh", "aux_g")
        dzx2, dwgx, dag2 = p.linear_backward(form, dpre_g, zx, w.wgx, w.aux_g, n_zx, n_wgx, n_ag, acc, "wgx", "aux_g")
        dzx, dag = _add(dzx, dzx2), _add(dag, dag2)
        # ph = cat_k(T_k h)
        dh3, dgraph2 = p.products.terms_backward(list(dph.chunk(K, dim=-1)), saved_h, n_h, n_g, g_acc)
        dh = dh + dh3 if n_h else None
        dgraph = _add(dgraph, dgraph2)
        if dzx_out is not None and dzx is not None:
            dzx = dzx_out.copy_(dzx)
        return [dh, dzx, dgraph, dwgx, dwgh, dbg, dwux, dwuh, dbu, dag, dau]


def _backward_impl(dout, h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend,
                   needs):
    release_cpu_heap(h.device)
    with no_autocast(h.device):
        w = CellWeights(form, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)
        return _make_step(g, mode, layout, w, cheb_k, backend, h.shape).backward(h, zx, dout, needs)


@custom_op("gcru_cell")
def _gcru_cell(h: Tensor, zx: Tensor, g: Tensor, layout: List[Tensor], wgx: Tensor, wgh: Tensor, bg: Tensor,
               wux: Tensor, wuh: Tensor, bu: Tensor, aux_g: Optional[Tensor], aux_u: Optional[Tensor], form: str,
               mode: str, cheb_k: int, backend: str) -> Tensor:
    return _forward_impl(h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend).contiguous()


@_gcru_cell.register_fake
def _(h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend):
    return empty_like(h)


@custom_op("gcru_cell_backward")
def _gcru_cell_backward(dout: Tensor, h: Tensor, zx: Tensor, g: Tensor, layout: List[Tensor], wgx: Tensor,
                        wgh: Tensor, bg: Tensor, wux: Tensor, wuh: Tensor, bu: Tensor, aux_g: Optional[Tensor],
                        aux_u: Optional[Tensor], form: str, mode: str, cheb_k: int, backend: str,
                        needs: List[bool]) -> List[Tensor]:
    grads = _backward_impl(dout, h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k,
                           backend, needs)
    missing = [i for i, (t, n) in enumerate(zip(grads, needs)) if n and t is None]
    assert not missing, (missing, needs, form, mode)
    return [t.contiguous() for t, n in zip(grads, needs) if n]


@_gcru_cell_backward.register_fake
def _(dout, h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend, needs):
    inputs = (h, zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)
    return [empty_like(t) for t, n in zip(inputs, needs) if n]


_DIFF = (0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11)  # positions of the differentiable inputs


def _setup(ctx, inputs, output):
    h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend = inputs
    ctx.save_for_backward(h, zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, *layout)
    ctx.args = (form, mode, cheb_k, backend)


def _backward(ctx, dout):
    h, zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, *layout = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _DIFF]
    needs[9] = needs[9] and aux_g is not None
    needs[10] = needs[10] and aux_u is not None
    grads = iter(_gcru_cell_backward(dout.contiguous(), h, zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u,
                                     *ctx.args, needs))
    g_h, g_zx, g_g, g_wgx, g_wgh, g_bg, g_wux, g_wuh, g_bu, g_ag, g_au = (next(grads) if n else None for n in needs)
    return (g_h, g_zx, g_g, [None] * len(layout), g_wgx, g_wgh, g_bg, g_wux, g_wuh, g_bu, g_ag, g_au,
            None, None, None, None)


_gcru_cell.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- a whole sequence

def run_states(step, zx: Tensor, zeros: Tensor) -> Tuple[Tensor, Tensor]:
    """(The states of every step of ``step`` from the zero state ``zeros``, the last one as
    its own tensor); zx time-major (T, ...)."""
    states = [step.first_forward(zx[0], zeros)]
    for t in range(1, zx.shape[0]):
        release_cpu_heap(zx.device)  # before each step, as in backward (ops/_common.py: why)
        states.append(step.forward(states[-1], zx[t]))
    return torch.stack(states), states[-1]


def run_states_backward(step, dstates: Optional[Tensor], dlast: Optional[Tensor], zx: Tensor, states: Tensor,
                        needs, dzx: Optional[Tensor]) -> "_Acc":
    """The steps of :func:`run_states` in reverse, each rerun from its saved input state, their
    weight and graph gradients added into one buffer each (no per-step gradient tensors),
    from the gradients of the states and of the last state (either None when unused: a caller
    of the last state alone adds nothing per step). zx's gradient goes into ``dzx`` (T, ...)
    when given; the rest are in the returned buffers after ``step.finish``. ``needs``: (zx, g,
    wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)."""
    n_zx, n_g, n_wgx, n_wgh, n_bg, n_wux, n_wuh, n_bu, n_ag, n_au = needs
    acc = _Acc()
    step_needs = [True, n_zx, n_g, n_wgx, n_wgh, n_bg, n_wux, n_wuh, n_bu, n_ag, n_au]
    if dstates is None and dlast is None:
        dlast = torch.zeros_like(states[0])
    carry = dlast  # the gradient of the state after step t
    for t in range(zx.shape[0] - 1, 0, -1):
        release_cpu_heap(zx.device)
        dh = _add(None if dstates is None else dstates[t], carry)
        carry = step.backward(states[t - 1], zx[t], dh, step_needs, acc, None if dzx is None else dzx[t])[0]
    # the first step: from the zero state, through its input rows and biases only
    dh = _add(None if dstates is None else dstates[0], carry)
    step.first_backward(zx[0], torch.zeros_like(states[0]), dh, (n_zx, n_wgx, n_bg, n_wux, n_bu, n_ag, n_au), acc,
                        None if dzx is None else dzx[0])
    step.finish(acc)
    return acc


def sequence_grads(acc: "_Acc", dzx: Optional[Tensor], inputs: Sequence[Optional[Tensor]], needs) -> list:
    """The gradients of (zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u) (``inputs``) from a
    sequence's buffers: zero for one that no step produced (e.g. the state rows when T = 1)."""
    buf = acc.buf
    out = [dzx] + [buf.get(k) for k in ("g", "wgx", "wgh", "bg", "wux", "wuh", "bu", "aux_g", "aux_u")]
    # (the pooled forms pass one query as both aux inputs: autograd adds the two gradients)
    out = [t if n else None for t, n in zip(out, needs)]
    return [torch.zeros_like(like) if (n and t is None) else t for t, n, like in zip(out, needs, inputs)]


def _sequence_forward(zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, hidden, backend):
    """(States (T, B, N, H) of every step from a zero state, the last one as its own tensor),
    zx (T, B, N, K*C) time-major."""
    with no_autocast(zx.device):
        T, B, N, _ = zx.shape
        w = CellWeights(form, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)
        step = _make_step(g, mode, layout, w, cheb_k, backend, (B, N, hidden))
        return run_states(step, zx, zx.new_zeros(B, N, hidden))


def _sequence_backward(dstates, dlast, zx, states, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode,
                       cheb_k, backend, needs):
    """Gradients of the sequence op's 10 differentiable inputs (zx, g, wgx, wgh, bg, wux, wuh,
    bu, aux_g, aux_u) (:func:`run_states_backward`)."""
    T, B, N, _ = zx.shape
    with no_autocast(zx.device):
        w = CellWeights(form, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)
        step = _make_step(g, mode, layout, w, cheb_k, backend, (B, N, states.shape[-1]))
        dzx = torch.empty_like(zx) if needs[0] else None
        acc = run_states_backward(step, dstates, dlast, zx, states, needs, dzx)
        return sequence_grads(acc, dzx, (zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u), needs)


@custom_op("gcru_sequence")
def _gcru_sequence(zx: Tensor, g: Tensor, layout: List[Tensor], wgx: Tensor, wgh: Tensor, bg: Tensor, wux: Tensor,
                   wuh: Tensor, bu: Tensor, aux_g: Optional[Tensor], aux_u: Optional[Tensor], form: str, mode: str,
                   cheb_k: int, hidden: int, backend: str) -> Tuple[Tensor, Tensor]:
    states, last = _sequence_forward(zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k,
                                     hidden, backend)
    return states.contiguous(), last.contiguous()


@_gcru_sequence.register_fake
def _(zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, hidden, backend):
    return zx.new_empty(zx.shape[0], zx.shape[1], zx.shape[2], hidden), zx.new_empty(zx.shape[1], zx.shape[2], hidden)


@custom_op("gcru_sequence_backward")
def _gcru_sequence_backward(dstates: Optional[Tensor], dlast: Optional[Tensor], zx: Tensor, states: Tensor, g: Tensor,
                            layout: List[Tensor], wgx: Tensor, wgh: Tensor, bg: Tensor, wux: Tensor, wuh: Tensor,
                            bu: Tensor, aux_g: Optional[Tensor], aux_u: Optional[Tensor], form: str, mode: str,
                            cheb_k: int, backend: str, needs: List[bool]) -> List[Tensor]:
    grads = _sequence_backward(dstates, dlast, zx, states, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form,
                               mode, cheb_k, backend, needs)
    return [t.contiguous() for t, n in zip(grads, needs) if n]


@_gcru_sequence_backward.register_fake
def _(dstates, dlast, zx, states, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, backend,
      needs):
    inputs = (zx, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u)
    return [empty_like(t) for t, n in zip(inputs, needs) if n]


_SEQ_DIFF = (0, 1, 3, 4, 5, 6, 7, 8, 9, 10)  # positions of the differentiable inputs


def _setup_sequence(ctx, inputs, output):
    zx, g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, cheb_k, hidden, backend = inputs
    ctx.save_for_backward(zx, output[0], g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, *layout)
    ctx.args = (form, mode, cheb_k, backend)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros, no adds


def _backward_sequence(ctx, dstates, dlast):
    zx, states, g, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, *layout = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _SEQ_DIFF]
    needs[8] = needs[8] and aux_g is not None
    needs[9] = needs[9] and aux_u is not None
    grads = iter(_gcru_sequence_backward(None if dstates is None else dstates.contiguous(),
                                         None if dlast is None else dlast.contiguous(), zx, states, g, layout, wgx,
                                         wgh, bg, wux, wuh, bu, aux_g, aux_u, *ctx.args, needs))
    g_zx, g_g, g_wgx, g_wgh, g_bg, g_wux, g_wuh, g_bu, g_ag, g_au = (next(grads) if n else None for n in needs)
    return (g_zx, g_g, [None] * len(layout), g_wgx, g_wgh, g_bg, g_wux, g_wuh, g_bu, g_ag, g_au,
            None, None, None, None, None)


_gcru_sequence.register_autograd(_backward_sequence, setup_context=_setup_sequence)


# --------------------------------------------------------------------------- front-ends

def runs_as_op(recompute: bool, grad: bool, backend: Optional[str], device) -> bool:
    """Whether a step or sequence runs as the recomputing op: with gradients when ``recompute``;
    without gradients (inference: one node per step or sequence, the fused step where it
    applies) unless a piece's backend is forward-only (the CUDA extension), whose kernels run
    only outside the op: the op resolves its pieces as if gradients were needed."""
    if grad:
        return recompute
    for op in ("gcru_gate", "gcru_update", "meta_linear", "adaptive_matmul"):
        if not _backend.impl(op, _backend.resolve(op, backend or None, device, False)).has_backward:
            return False
    return True


def _autograd_pieces(graph: AdaptiveGraph, backend: Optional[str]):
    """The step's pieces as autograd ops (plain autograd: ``recompute=False``, inference)."""
    def pooled(x, q, pool):
        return apply_meta_linear(x, q, pool, None, "ST", backend)

    def gate(pre, h):
        return apply_gate(pre, h, backend)

    def update(pre_c, r, h):
        return apply_update(pre_c, r, h, backend)
    return graph.terms, pooled, gate, update


def cell_step(h: Tensor, zx: Tensor, graph: AdaptiveGraph, weights: CellWeights, cheb_k: int,
              backend: Optional[str], recompute: bool = True) -> Tensor:
    """Unchecked :func:`gcru_cell` for the modules (they build the arguments): h (B, N, H),
    zx (B, N, K*C) -> (B, N, H). All tensors in one dtype (the modules cast once per sequence)."""
    tensors = (h, zx, graph.tensor) + weights.tensors()
    if runs_as_op(recompute, needs_grad(*tensors), backend, h.device) and h.numel() > 0:
        layout = list(graph.layout) if graph.layout is not None else []
        return _gcru_cell(h, zx, graph.tensor, layout, *weights.tensors(), weights.form, graph.mode, cheb_k,
                          backend or "")
    return cell_math(h, zx, weights, cheb_k, *_autograd_pieces(graph, backend))


def gcru_sequence(xs: Tensor, graph: AdaptiveGraph, weights: CellWeights, cheb_k: int, hidden: int,
                  backend: Optional[str], recompute: bool = True) -> Tuple[Tensor, Tensor]:
    """All T steps of one cell from a zero state: xs (B, T, N, C) -> (states (B, T, N, H), the
    last state (B, N, H) as its own tensor, so a caller that only needs it sends no gradient
    through the stack).

    The input is propagated for all T steps in one call per term (the steps folded into value
    columns); the first step, with its all-zero state, needs only the input rows and the
    biases. With ``recompute`` (or without gradients) all steps are one
    ``himnet_fast::gcru_sequence`` op; with ``recompute=False`` and gradients, each later step
    is one :func:`cell_step` through autograd. ``weights`` must already be in the compute dtype.
    """
    B, T, N, C = xs.shape
    terms = graph.terms(xs.permute(0, 2, 1, 3).reshape(B, N, T * C), cheb_k)
    zx = torch.cat([z.reshape(B, N, T, C) for z in terms], -1).permute(0, 2, 1, 3)  # (B, T, N, K*C)
    tensors = (zx, graph.tensor) + weights.tensors()
    if runs_as_op(recompute, needs_grad(*tensors), backend, zx.device) and zx.numel() > 0:
        # One op for the whole sequence: its backward reruns each step and adds the steps'
        # weight and graph gradients into one buffer each.
        layout = list(graph.layout) if graph.layout is not None else []
        states, last = _gcru_sequence(zx.transpose(0, 1).contiguous(), graph.tensor, layout, *weights.tensors(),
                                      weights.form, graph.mode, cheb_k, hidden, backend or "")
        return states.transpose(0, 1), last
    # unbind, not [:, t]: its backward stacks the T step gradients once instead of
    # scattering each into a fresh zero (B, T, N, K*C) buffer.
    zxs = zx.unbind(1)
    _, pooled, gate, update = _autograd_pieces(graph, backend)
    z0 = zxs[0]
    state = z0.new_zeros(B, N, hidden)
    w = weights
    zh, r = gate(add_bias(w.form, linear(w.form, z0, w.wgx, w.aux_g, pooled), w.bg), state)
    state = update(add_bias(w.form, linear(w.form, z0, w.wux, w.aux_u, pooled), w.bu), r, state)
    states = [state]
    for t in range(1, T):
        state = cell_step(state, zxs[t], graph, weights, cheb_k, backend, recompute)
        states.append(state)
    return torch.stack(states, dim=1), state


def gcru_cell(zx: Tensor, h: Tensor, graph, gate: Sequence[Tensor], update: Sequence[Tensor], *,
              cheb_k: int = 2, axis: Optional[str] = None, query: Optional[Tensor] = None,
              backend: Optional[str] = None, recompute: bool = True) -> Tensor:
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
    check_cheb_k(cheb_k)
    axis = check_axis(axis) if axis else None
    check_tensor("h", h, 3)
    check_tensor("zx", zx, 3)
    B, N, H = h.shape
    if tuple(zx.shape[:2]) != (B, N) or zx.shape[-1] % cheb_k:
        raise ValueError(f"zx must have shape (B={B}, N={N}, cheb_k*C) with cheb_k={cheb_k}, got {tuple(zx.shape)}")
    graph = graph if isinstance(graph, AdaptiveGraph) else AdaptiveGraph.from_support(graph)
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
    form = ("S-pooled" if axis == "S" else "ST") if pooled else (axis or "plain")
    weights = CellWeights(form, gate[0], gate[1], gate[2], update[0], update[1], update[2], query, query)
    dtype = compute_dtype(h.device, h, zx, graph.tensor, *gate, *update, query)
    with no_autocast(h.device):
        weights = CellWeights(form, *(cast(t, dtype) for t in weights.tensors()))
        graph = graph.cast(dtype)
        return cell_step(cast(h, dtype), cast(zx, dtype), graph, weights, cheb_k, backend, recompute)
