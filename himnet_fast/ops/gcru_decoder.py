"""The whole autoregressive decoder as one registered op that recomputes its steps in backward.

HimNet's decoder (docs/spec.md, "Decoder") runs T steps; at step t every layer l advances its
state with the recurrent cell, layer 0 on the input ``x_t = [go_{t-1}, y_cov_t]`` (its
previous forecast, or the label where teacher forcing drew the step; zeros at t = 0), layer
l > 0 on the new state of layer l - 1, and the top layer's state is projected to the forecast::

    x_t      = cat(go'_{t-1}, y_cov_t)                 go'_t = where(teacher_t, label_t, go_t)
    h^l_t    = cell_l(h^l_{t-1}, cat_k(T_k x^l_t))     x^0_t = x_t, x^l_t = h^{l-1}_t
    go_t     = h^{L-1}_t @ Wpᵀ + bp                    h^l_{-1} = h0 for every layer

Why an op: run step by step through autograd, every step's cell op returns its own gradient
of every weight, bias, query and of the (B, N, N) per-sample graph, and autograd adds them up:
about 15 extra kernels and a graph-sized temporary per step. ``himnet_fast::gcru_decoder``
saves its inputs, layer 0's propagated inputs ``cat_k(T_k x_t)`` (narrow) and the states (B*N*H per step and layer, what
the step-by-step cell ops saved too), and its backward (``himnet_fast::gcru_decoder_backward``)
walks the steps in reverse, reruns each layer's step from its saved state and adds the
gradients of the weights, the graph and the projection into one buffer each, as the encoder's
sequence op (:mod:`himnet_fast.ops.gcru_cell`) does. Each step runs through that module's step
implementations (the fused Triton step where it applies), so the decoder and the encoders
share one step and one backward.

The teacher-forcing coins arrive as a (T,) bool tensor on the device (drawn before the step):
the op reads them with ``torch.where``, never on the host, so the step can be captured.
No gradient flows into ``y_cov`` or ``labels`` (data); :func:`gcru_decoder` runs the steps
through autograd instead when either requires one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import cast, custom_op, empty_like, needs_grad, no_autocast, release_cpu_heap
from .gcru_cell import CellWeights, _Acc, _layout_or_none, _make_step, cell_step, runs_as_op
from .graph import AdaptiveGraph, GraphProducts

__all__ = ["gcru_decoder"]

_PER_LAYER = 8  # wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u


def _layers(weights: Sequence[Tensor], aux: Sequence[Tensor], form: str) -> List[CellWeights]:
    """The layers' CellWeights from the op's lists: 6 weights per layer, and 2 aux per layer or
    none (a list of optional tensors would hide its tensors from autograd)."""
    L = len(weights) // 6
    return [CellWeights(form, *weights[6 * l:6 * l + 6], *(aux[2 * l:2 * l + 2] if aux else (None, None)))
            for l in range(L)]


def _flat(layers: Sequence[CellWeights]) -> Tuple[List[Tensor], List[Tensor]]:
    weights = [t for w in layers for t in w.tensors()[:6]]
    aux = [t for w in layers for t in w.tensors()[6:]] if layers[0].aux_g is not None else []
    return weights, aux


def _inputs(outs_prev: Optional[Tensor], y_cov_t: Tensor, labels: Optional[Tensor], teacher: Optional[Tensor],
            t: int, out: Tensor) -> Tensor:
    """x_t = cat(go'_{t-1}, y_cov_t) into ``out`` (go'_{-1} = 0)."""
    if outs_prev is None:
        out.zero_()
        out[..., out.shape[-1] - y_cov_t.shape[-1]:].copy_(y_cov_t)
        return out
    go = outs_prev if teacher is None else torch.where(teacher[t - 1], labels[t - 1], outs_prev)
    return torch.cat([go, y_cov_t], dim=-1, out=out)


def _decoder_forward(h0, y_cov, labels, teacher, g, layout, weights, aux, proj_w, proj_b, form, mode, cheb_k,
                     backend):
    """(forecasts (T, B, N, O), states (T, L, B, N, H), layer 0's propagated inputs
    cat_k(T_k x_t) (T, B, N, K*(O + Cy))), time-major."""
    with no_autocast(h0.device):
        layers = _layers(weights, aux, form)
        T = y_cov.shape[0]
        B, N, H = h0.shape
        steps = [_make_step(g, mode, layout, w, cheb_k, backend, (B, N, H)) for w in layers]
        products = GraphProducts(mode, g, _layout_or_none(layout), backend or None, False)
        C = proj_w.shape[0] + y_cov.shape[-1]
        x_t = h0.new_empty(B, N, C)
        zx0 = h0.new_empty(T, B, N, cheb_k * C)  # narrow (C = O + Cy): kept for backward
        outs, states, state = [], [], [h0] * len(layers)
        for t in range(T):
            release_cpu_heap(h0.device)  # before each step, as in backward (ops/_common.py: why)
            x = _inputs(outs[-1] if outs else None, y_cov[t], labels, teacher, t, x_t)
            for l, step in enumerate(steps):
                zs = products.terms(x, cheb_k)[0]
                zx = torch.cat(zs, dim=-1, out=zx0[t]) if l == 0 else torch.cat(zs, dim=-1)
                x = step.forward(state[l], zx)
                state[l] = x
                states.append(x)
            outs.append(F.linear(x, proj_w, proj_b))
        return torch.stack(outs), torch.stack(states).view(T, len(layers), B, N, H), zx0


def _decoder_backward(douts, h0, labels, teacher, g, layout, weights, aux, proj_w, proj_b, states, zx0, form, mode,
                      cheb_k, backend, needs):
    """Gradients of (h0, g, every layer's 8 weights (aux None where the form has none), proj_w,
    proj_b), None where not needed; ``needs`` in that order."""
    n_h0, n_g, n_pw, n_pb = needs[0], needs[1], needs[-2], needs[-1]
    n_w = needs[2:-2]
    with no_autocast(h0.device):
        layers = _layers(weights, aux, form)
        L = len(layers)
        T, B, N, O = douts.shape
        H = h0.shape[-1]
        steps = [_make_step(g, mode, layout, w, cheb_k, backend, (B, N, H)) for w in layers]
        products = GraphProducts(mode, g, _layout_or_none(layout), backend or None, True)
        accs = [_Acc() for _ in layers]
        g_acc = None
        if n_g:
            g_acc = torch.zeros_like(g, memory_format=torch.contiguous_format)
            for acc in accs:  # one graph gradient for every layer and the input propagation
                acc.buf["g"] = g_acc
        # go_t's gradient: its own, plus where the forecast (not the label) fed x_{t+1}, that
        # input's; one buffer for all steps, so the projection's gradients are one GEMM and one
        # sum at the end. ``keep`` (1 where the forecast was fed back) avoids host reads.
        dgos = douts.clone()
        keep = None if teacher is None else (~teacher).to(douts.dtype)
        carry: List[Optional[Tensor]] = [None] * L   # d h^l_t from step t + 1 (as its state)
        dx_next = None                               # d x_{t+1}
        for t in range(T - 1, -1, -1):
            release_cpu_heap(h0.device)
            dgo = dgos[t]
            if dx_next is not None:
                d_in = dx_next[..., :O]
                dgo.add_(d_in) if keep is None else dgo.addcmul_(d_in, keep[t])
            if carry[L - 1] is None:
                d_state = torch.matmul(dgo, proj_w)
            else:
                d_state = torch.addmm(carry[L - 1].reshape(-1, H), dgo.reshape(-1, O), proj_w).view(B, N, H)
            for l in range(L - 1, -1, -1):
                prev = states[t - 1, l] if t > 0 else h0
                if l == 0:
                    zs = list(zx0[t].chunk(cheb_k, dim=-1))
                    saved = products.saved_of(zs)
                    if saved is None:  # products that keep more than their inputs: rerun them
                        zs, saved = products.terms(zs[0], cheb_k)
                else:
                    zs, saved = products.terms(states[t, l - 1], cheb_k)
                w_needs = n_w[l * _PER_LAYER:(l + 1) * _PER_LAYER]
                aux_needs = [bool(n) and a is not None for n, a in zip(w_needs[6:], layers[l].tensors()[6:])]
                zx = zx0[t] if l == 0 else torch.cat(zs, dim=-1)
                grads = steps[l].backward(prev, zx, d_state, [True, True, n_g, *w_needs[:6], *aux_needs], accs[l])
                carry[l] = grads[0]
                need_x = l > 0 or t > 0
                dx, _ = products.terms_backward(list(grads[1].chunk(cheb_k, dim=-1)), saved, need_x, n_g, g_acc)
                if l > 0:
                    d_state = dx if carry[l - 1] is None else dx + carry[l - 1]
                else:
                    dx_next = dx
        for step, acc in zip(steps, accs):
            step.finish(acc)
        out: List[Optional[Tensor]] = [None] * len(needs)
        if n_h0:
            d_h0 = carry[0]
            for c in carry[1:]:
                d_h0 = d_h0 + c
            out[0] = d_h0
        out[1] = g_acc
        keys = ("wgx", "wgh", "bg", "wux", "wuh", "bu", "aux_g", "aux_u")
        for l, (w, acc) in enumerate(zip(layers, accs)):
            for i, key in enumerate(keys):
                j = 2 + l * _PER_LAYER + i
                if needs[j]:
                    like = w.tensors()[i]
                    got = acc.buf.get(key)
                    out[j] = got if got is not None else torch.zeros_like(like)
        if n_pw:
            top = states[:, L - 1].reshape(-1, H)
            out[-2] = dgos.reshape(-1, O).t().mm(top)
        out[-1] = dgos.sum((0, 1, 2)) if n_pb else None
        return out


@custom_op("gcru_decoder")
def _gcru_decoder(h0: Tensor, y_cov: Tensor, labels: Optional[Tensor], teacher: Optional[Tensor], g: Tensor,
                  layout: List[Tensor], weights: List[Tensor], aux: List[Tensor], proj_w: Tensor, proj_b: Tensor,
                  form: str, mode: str, cheb_k: int, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    outs, states, zx0 = _decoder_forward(h0, y_cov, labels, teacher, g, layout, weights, aux, proj_w, proj_b, form,
                                        mode, cheb_k, backend)
    return outs.contiguous(), states.contiguous(), zx0.contiguous()


@_gcru_decoder.register_fake
def _(h0, y_cov, labels, teacher, g, layout, weights, aux, proj_w, proj_b, form, mode, cheb_k, backend):
    T, (B, N, H), O = y_cov.shape[0], h0.shape, proj_w.shape[0]
    L = len(weights) // 6
    return (h0.new_empty(T, B, N, O), h0.new_empty(T, L, B, N, H), h0.new_empty(T, B, N, cheb_k * (O + y_cov.shape[-1])))


def _needs_order(needs: Sequence[bool], L: int, has_aux: bool) -> List[bool]:
    """The op's ``needs`` (h0, g, 6 weights per layer, 2 aux per layer if any, proj_w, proj_b)
    as :func:`_decoder_backward` takes them (8 per layer)."""
    w, a = needs[2:2 + 6 * L], needs[2 + 6 * L:len(needs) - 2]
    per = [list(w[6 * l:6 * l + 6]) + (list(a[2 * l:2 * l + 2]) if has_aux else [False, False]) for l in range(L)]
    return list(needs[:2]) + [n for p in per for n in p] + list(needs[-2:])


@custom_op("gcru_decoder_backward")
def _gcru_decoder_backward(douts: Tensor, h0: Tensor, labels: Optional[Tensor], teacher: Optional[Tensor],
                           g: Tensor, layout: List[Tensor], weights: List[Tensor], aux: List[Tensor], proj_w: Tensor,
                           proj_b: Tensor, states: Tensor, zx0: Tensor, form: str, mode: str, cheb_k: int,
                           backend: str, needs: List[bool]) -> List[Tensor]:
    """The gradients ``needs`` asks for, in the order (h0, g, weights, aux, proj_w, proj_b)."""
    L = len(weights) // 6
    grads = _decoder_backward(douts, h0, labels, teacher, g, layout, weights, aux, proj_w, proj_b, states, zx0, form,
                              mode, cheb_k, backend, _needs_order(needs, L, bool(aux)))
    h0g, gg, per, pw, pb = grads[0], grads[1], grads[2:-2], grads[-2], grads[-1]
    wg = [t for l in range(L) for t in per[8 * l:8 * l + 6]]
    ag = [t for l in range(L) for t in per[8 * l + 6:8 * l + 8]] if aux else []
    return [t.contiguous() for t, n in zip([h0g, gg, *wg, *ag, pw, pb], needs) if n]


@_gcru_decoder_backward.register_fake
def _(douts, h0, labels, teacher, g, layout, weights, aux, proj_w, proj_b, states, zx0, form, mode, cheb_k, backend,
      needs):
    inputs = [h0, g, *weights, *aux, proj_w, proj_b]
    return [empty_like(t) for t, n in zip(inputs, needs) if n]


def _setup(ctx, inputs, output):
    h0, y_cov, labels, teacher, g, layout, weights, aux, proj_w, proj_b, form, mode, cheb_k, backend = inputs
    _, states, zx0 = output
    ctx.sizes = (len(layout), len(weights), len(aux))
    ctx.save_for_backward(h0, labels, teacher, g, proj_w, proj_b, states, zx0, *layout, *weights, *aux)
    ctx.args = (form, mode, cheb_k, backend)


def _backward(ctx, douts, _dstates, _dxs):
    h0, labels, teacher, g, proj_w, proj_b, states, zx0, *rest = ctx.saved_tensors
    n_l, n_w, n_a = ctx.sizes
    layout, weights, aux = rest[:n_l], rest[n_l:n_l + n_w], rest[n_l + n_w:]
    nig = ctx.needs_input_grad
    needs = [bool(nig[0]), bool(nig[4]), *map(bool, nig[6]), *map(bool, nig[7]), bool(nig[8]), bool(nig[9])]
    grads = iter(_gcru_decoder_backward(douts.contiguous(), h0, labels, teacher, g, layout, weights, aux, proj_w,
                                        proj_b, states, zx0, *ctx.args, needs))
    d_h0, d_g, *rest = (next(grads) if n else None for n in needs)
    return (d_h0, None, None, None, d_g, [None] * n_l, rest[:n_w], rest[n_w:n_w + n_a], rest[-2], rest[-1],
            None, None, None, None)


_gcru_decoder.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- front-end

def gcru_decoder(h0: Tensor, y_cov: Tensor, labels: Optional[Tensor], teacher: Optional[Tensor],
                 graph: AdaptiveGraph, weights: Sequence[CellWeights], proj_w: Tensor, proj_b: Tensor,
                 cheb_k: int, backend: Optional[str], recompute: bool = True) -> Tensor:
    """The decoder's forecasts (B, T, N, O) (module docstring) for the modules, which build and
    check the arguments: h0 (B, N, H) every layer's initial state, y_cov (B, T, N, Cy),
    ``labels`` (B, T, N, O) and ``teacher`` (T,) bool (both None without teacher forcing),
    ``weights`` one :class:`CellWeights` per layer (one form, in the compute dtype), the
    projection ``proj_w`` (O, H), ``proj_b`` (O,).

    With gradients needed (and ``recompute``) one op runs every step; otherwise the steps run
    one by one (:func:`~himnet_fast.ops.gcru_cell.cell_step`), as they also do when ``y_cov``
    or ``labels`` need a gradient (the op gives none to data)."""
    dtype = weights[0].wgh.dtype
    T = y_cov.shape[1]
    graph = graph.cast(dtype)
    h0, y_cov, proj_w, proj_b = (cast(t, dtype) for t in (h0, y_cov, proj_w, proj_b))
    labels = None if labels is None else cast(labels[:, :T], dtype)
    flat, aux = _flat(weights)
    form = weights[0].form
    if (runs_as_op(recompute, needs_grad(h0, graph.tensor, proj_w, proj_b, *flat, *aux), backend, h0.device)
            and not needs_grad(y_cov, labels)
            and h0.numel() > 0):
        layout = list(graph.layout) if graph.layout is not None else []
        outs, _, _ = _gcru_decoder(h0, y_cov.transpose(0, 1).contiguous(),
                                   None if labels is None else labels.transpose(0, 1).contiguous(), teacher,
                                   graph.tensor, layout, flat, aux, proj_w, proj_b, form, graph.mode, cheb_k,
                                   backend or "")
        return outs.transpose(0, 1)
    go = h0.new_zeros(*h0.shape[:2], proj_w.shape[0])
    state, out = [h0] * len(weights), []
    for t in range(T):
        x = torch.cat([go, y_cov[:, t]], dim=-1)
        for l, w in enumerate(weights):
            x = cell_step(state[l], graph.propagate(x, cheb_k), graph, w, cheb_k, backend, recompute)
            state[l] = x
        go = F.linear(x, proj_w, proj_b)
        out.append(go)
        if teacher is not None:
            go = torch.where(teacher[t], labels[:, t], go)
    return torch.stack(out, dim=1)
