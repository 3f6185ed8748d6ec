"""Every op is a registered PyTorch custom op: ``torch.library.opcheck`` (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes) passes for each op on each backend
that runs here, and ``torch.compile(fullgraph=True)`` traces HimNet's training step with zero
graph breaks, giving the eager result."""
import numpy as np
import pytest
import torch

import himnet_fast as hf
from himnet_fast.partition import partition_graph

from conftest import parity_backends

ops = torch.ops.himnet_fast
F64 = dict(dtype=torch.float64)


def _leaf(*shape):
    return torch.randn(*shape, **F64).requires_grad_(True)


def _opcheck(op, args, **kw):
    result = torch.library.opcheck(op, args, **kw)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("backend", parity_backends())
@pytest.mark.parametrize("axis,bias", [("T", True), ("S", True), ("ST", True), ("ST", False)])
def test_meta_linear(backend, axis, bias):
    B, N, I, O, D = 2, 5, 3, 4, 3
    q = {"T": _leaf(B, D), "S": _leaf(N, D), "ST": _leaf(B, N, D)}[axis]
    _opcheck(ops.meta_linear.default, (_leaf(B, N, I), q, _leaf(D, I, O), _leaf(D, O) if bias else None, axis,
                                       backend))


@pytest.mark.parametrize("backend", parity_backends())
def test_adaptive_matmul(backend):
    _opcheck(ops.adaptive_matmul.default, (_leaf(2, 7, 3), _leaf(2, 7, 4), backend))


def test_adaptive_graph():
    _opcheck(ops.adaptive_graph.default, (_leaf(2, 6, 3), "torch"))


@pytest.mark.parametrize("backend", parity_backends())
def test_gcru_gate_and_update(backend):
    _opcheck(ops.gcru_gate.default, (_leaf(2, 5, 8), _leaf(2, 5, 4), backend))
    _opcheck(ops.gcru_update.default, (_leaf(2, 5, 4), torch.rand(2, 5, 4, **F64).requires_grad_(True),
                                       _leaf(2, 5, 4), backend))


@pytest.mark.parametrize("backend", parity_backends())
def test_block_attention(backend):
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _opcheck(ops.block_attention.default, (_leaf(2, 2, 3, 4), _leaf(2, 2, 3, 4), _leaf(2, 2, 3, 5), mask, 0.5,
                                           backend))


def test_partitioned_adaptive_matmul():
    part = partition_graph(3, num_nodes=10, method="chunks")
    _opcheck(ops.partitioned_adaptive_matmul.default, (_leaf(2, 10, 3), _leaf(2, 10, 4), *part.layout("cpu"),
                                                       "torch"))


def _cell_args(form, mode, backend, B=2, N=6, C=2, H=3, D=2, k=2):
    """Arguments of himnet_fast::gcru_cell for a weight form and a graph mode."""
    rows_x, rows_h = k * C, k * H
    lead = {"plain": (), "T": (B,), "S": (N,), "S-pooled": (D,), "ST": (D,), "scaled": ()}[form]
    bias_lead = {"plain": (), "T": (B,), "S": (N,), "S-pooled": (N,), "ST": (B, N), "scaled": ()}[form]
    w = [(_leaf(*lead, rows, o)) for o in (2 * H, H) for rows in (rows_x, rows_h)]
    wgx, wgh, wux, wuh = w
    bg, bu = _leaf(*bias_lead, 2 * H), _leaf(*bias_lead, H)
    aux_g = aux_u = None
    if form == "ST":
        aux_g = aux_u = _leaf(B, N, D)
    elif form == "S-pooled":
        aux_g = aux_u = _leaf(N, D)
    elif form == "scaled":
        aux_g, aux_u = _leaf(N, 2 * H), _leaf(N, H)
    layout = []
    if mode == "dense":
        g = torch.softmax(torch.randn(N, N, **F64), -1).requires_grad_(True)
    else:
        g = _leaf(N, 3)
        if mode == "partitioned":
            layout = list(partition_graph(2, num_nodes=N, method="chunks").layout("cpu"))
    return (_leaf(B, N, H), _leaf(B, N, rows_x), g, layout, wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u, form, mode, k,
            backend)


@pytest.mark.parametrize("form", ["plain", "T", "S", "S-pooled", "ST", "scaled"])
@pytest.mark.parametrize("mode", ["dense", "streamed", "partitioned"])
def test_gcru_cell(form, mode):
    _opcheck(ops.gcru_cell.default, _cell_args(form, mode, "torch"))


@pytest.mark.parametrize("form", ["plain", "T", "S", "S-pooled", "ST", "scaled"])
@pytest.mark.parametrize("mode", ["dense", "streamed"])
def test_gcru_sequence(form, mode):
    """The whole-sequence op (a zero initial state, three steps; its backward adds the steps'
    weight and graph gradients into one buffer each)."""
    h, zx, g, layout, *weights, form_, mode_, k, backend = _cell_args(form, mode, "torch")
    zx_seq = torch.randn(3, *zx.shape, **F64).requires_grad_(True)
    _opcheck(ops.gcru_sequence.default, (zx_seq, g, layout, *weights, form_, mode_, k, h.shape[-1], backend))


def _decoder_args(form, mode, layers=2, teacher=True, T=3, O=1, Cy=2, k=2):
    """Arguments of himnet_fast::gcru_decoder: ``layers`` cells of one form (layer 0 on the
    O + Cy wide input, the others on the state), h0, y_cov, labels and coins time-major."""
    h, zx, g, layout, *w0, form_, mode_, k_, backend = _cell_args(form, mode, "torch", C=O + Cy, k=k)
    weights, aux = list(w0[:6]), [t for t in w0[6:] if t is not None]
    for _ in range(1, layers):
        _, _, _, _, *wl, _, _, _, _ = _cell_args(form, mode, "torch", C=h.shape[-1], k=k)
        weights += wl[:6]
        aux += [t for t in wl[6:] if t is not None]
    B, N, H = h.shape
    labels = torch.randn(T, B, N, O, **F64) if teacher else None
    coins = torch.tensor([True, False, True][:T]) if teacher else None
    return (h, torch.rand(T, B, N, Cy, **F64), labels, coins, g, layout, weights, aux, _leaf(O, H), _leaf(O), form_,
            mode_, k_, backend)


@pytest.mark.parametrize("form,mode,layers", [("ST", "dense", 2), ("T", "streamed", 1), ("S-pooled", "dense", 1),
                                              ("plain", "partitioned", 1)])
def test_gcru_decoder(form, mode, layers):
    """The whole decoder (steps x layers, the projection and the teacher-forcing coins)."""
    _opcheck(ops.gcru_decoder.default, _decoder_args(form, mode, layers))


@pytest.mark.parametrize("teacher", [True, False])
def test_gcru_decoder_gradcheck(teacher):
    """float64 gradcheck of the decoder op through two layers, cheb_k 3: h0, the graph, every
    weight and the projection (the query tied across both maps, as the modules pass it)."""
    h0, y_cov, labels, coins, g, layout, weights, aux, pw, pb, form, mode, k, backend = _decoder_args(
        "ST", "dense", 2, teacher, k=3)
    queries = aux[::2]  # each layer's query, passed for both maps

    def f(h0, g, pw, pb, *ts):
        ws, qs = list(ts[:12]), ts[12:]
        outs, _, _ = ops.gcru_decoder.default(h0, y_cov, labels, coins, g, layout, ws, [q for q in qs for _ in (0, 1)],
                                              pw, pb, form, mode, k, backend)
        return outs
    assert torch.autograd.gradcheck(f, (h0, g, pw, pb, *weights, *queries), fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in parity_backends() if b != "torch"])
def test_gcru_cell_other_backends(backend):
    _opcheck(ops.gcru_cell.default, _cell_args("ST", "streamed", backend))


def test_teacher_forcing_mask():
    """The host op that draws the decoder's coins: schema and fake (the AOT check compares two
    runs' outputs, which differ by design: every run draws new coins)."""
    _opcheck(ops.teacher_forcing_mask.default, (torch.empty(0), 100, 4, 4000.0),
             test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------- torch.compile

def _himnet_batch(N=9, B=2, steps=3):
    torch.manual_seed(0)
    x = torch.randn(B, 12, N, 3)
    x[..., 1] = torch.rand(B, 12, N) * 0.9
    x[..., 2] = torch.randint(0, 7, (B, 12, N)).float()
    return x, torch.zeros(B, steps, N, 2), torch.randn(B, steps, N, 1)


@pytest.mark.parametrize("dense", [None, False])
def test_training_step_traces_with_zero_graph_breaks(dense):
    """Forward (teacher forcing from batches_seen: the coins are a host op inside the graph) and
    L1 loss as one graph; the backward is then traced by AOTAutograd from it."""
    torch.manual_seed(0)
    m = hf.HimNet(9, hidden_dim=8, out_steps=3, dense_graph=dense, check_inputs=False).train()
    x, y_cov, labels = _himnet_batch()

    def step(x, y_cov, labels, batches_seen):
        return m(x, y_cov, labels, batches_seen).abs().mean()
    explanation = torch._dynamo.explain(step)(x, y_cov, labels, 100)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_equals_eager():
    """torch.compile(fullgraph=True) of the training step (forward, loss, backward through the
    registered autograd formulas): the same loss and gradients as eager, and the same numpy
    coins drawn at run time (two steps from the same seed agree; the RNG advances alike)."""
    torch.manual_seed(0)
    m = hf.HimNet(9, hidden_dim=8, out_steps=4, check_inputs=False, tf_decay_steps=3).train()
    x, y_cov, labels = _himnet_batch(steps=4)

    def step(x, y_cov, labels, batches_seen):
        return m(x, y_cov, labels, batches_seen).abs().mean()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")

    def run(fn, seed):
        np.random.seed(seed)
        out = []
        for batches_seen in (3, 4):  # threshold ~0.5: the coins decide
            m.zero_grad()
            loss = fn(x, y_cov, labels, batches_seen)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        return out, np.random.get_state()[2]
    got, pos_got = run(compiled, 7)
    want, pos_want = run(step, 7)
    assert pos_got == pos_want
    for (lg, gg), (lw, gw) in zip(got, want):
        torch.testing.assert_close(lg, lw, rtol=0, atol=0)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_inductor_compiled_training_step_equals_eager():
    """The same with inductor (generated C++ on CPU: about a minute to compile)."""
    torch.manual_seed(0)
    m = hf.HimNet(9, hidden_dim=8, out_steps=3, check_inputs=False).train()
    x, y_cov, labels = _himnet_batch()

    def step(x, y_cov, labels, batches_seen):
        return m(x, y_cov, labels, batches_seen).abs().mean()
    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        np.random.seed(1)
        m.zero_grad()
        loss = fn(x, y_cov, labels, 100)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (lc, gc), (le, ge) = results
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("form", ["plain", "T", "S", "S-pooled", "ST", "scaled"])
@pytest.mark.parametrize("mode", ["dense", "streamed"])
def test_gcru_sequence_gradcheck(form, mode):
    """float64 gradcheck of the whole-sequence op: every input's gradient, the pooled forms'
    query passed as both maps' aux (as the modules do), cheb_k 3."""
    h, zx, g, layout, *weights, form_, mode_, k, backend = _cell_args(form, mode, "torch", B=2, N=4, C=2, H=2, k=3)
    wgx, wgh, bg, wux, wuh, bu, aux_g, aux_u = weights
    zx_seq = torch.randn(3, *zx.shape, **F64).requires_grad_(True)
    tied = form in ("ST", "S-pooled")

    def f(zx_seq, g, wgx, wgh, bg, wux, wuh, bu, *aux):
        a_g, a_u = (aux[0], aux[0]) if tied else (aux + (None, None))[:2]
        return ops.gcru_sequence.default(zx_seq, g, layout, wgx, wgh, bg, wux, wuh, bu, a_g, a_u, form_, mode_, k,
                                         h.shape[-1], backend)
    aux = (aux_g,) if tied else tuple(a for a in (aux_g, aux_u) if a is not None)
    assert torch.autograd.gradcheck(f, (zx_seq, g, wgx, wgh, bg, wux, wuh, bu, *aux), fast_mode=True)
