"""AGCRN on the library ops against the original algorithm (himnet_fast.reference_models)."""
import types

import pytest
import torch

from himnet_fast.models import AGCRN, AGCRNCell, AVWDCRNN, AVWGCN, build_model
from himnet_fast.reference_models import RefAGCRN, RefAGCRNCell, RefAVWDCRNN, RefAVWGCN

from conftest import HAS_TRITON, rel_err as _rel

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_grads(ref, fast, tol=1e-4):
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in fast.named_parameters()]
    assert sorted(names) == sorted(ref_params), "parameter names differ"
    for name, p in fast.named_parameters():
        r = ref_params[name].grad
        assert r is not None and p.grad is not None, name
        assert _rel(p.grad, r) < tol, (name, _rel(p.grad, r))


def pair(backend=None, **kw):
    torch.manual_seed(1)
    ref = RefAGCRN(**kw)
    fast = AGCRN(**kw, backend=backend)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def run_both(ref, fast, x):
    y_ref = ref(x)
    y_fast = fast(x)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (y_fast * g).sum().backward()
    return y_ref, y_fast


# Odd shapes: one node, one sample, one step, cheb_k 2/3, 1 and 2 layers, output_dim > 1.
CASES = [
    dict(B=1, T=1, num_nodes=1, input_dim=1, rnn_units=3, output_dim=1, horizon=2, num_layers=1, embed_dim=2, cheb_k=2),
    dict(B=3, T=5, num_nodes=2, input_dim=1, rnn_units=4, output_dim=1, horizon=3, num_layers=2, embed_dim=3, cheb_k=3),
    dict(B=2, T=4, num_nodes=13, input_dim=2, rnn_units=6, output_dim=2, horizon=5, num_layers=2, embed_dim=4, cheb_k=2),
    dict(B=2, T=3, num_nodes=9, input_dim=3, rnn_units=5, output_dim=3, horizon=2, num_layers=1, embed_dim=3, cheb_k=4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c['B']}T{c['T']}N{c['num_nodes']}K{c['cheb_k']}L{c['num_layers']}")
def test_agcrn_outputs_and_grads_match_original(case):
    case = dict(case)
    B, T = case.pop("B"), case.pop("T")
    ref, fast = pair(**case)
    x = torch.randn(B, T, case["num_nodes"], case["input_dim"])
    y_ref, y_fast = run_both(ref, fast, x)
    assert y_fast.shape == (B, case["horizon"], case["num_nodes"], case["output_dim"])
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    assert_same_grads(ref, fast)


@pytest.mark.parametrize("dense_graph,budget_mb", [(False, "256"), (False, "0")])
def test_agcrn_streamed_paths_match(monkeypatch, dense_graph, budget_mb):
    """No N×N graph (streamed adaptive product) and, with a zero budget, no (N, K*I, O) weights
    either (the Khatri-Rao meta-linear): the large-graph paths, checked on a small graph."""
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", budget_mb)
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", "0.001")  # several chunks even at this size
    kw = dict(num_nodes=11, input_dim=1, rnn_units=4, output_dim=1, horizon=3, num_layers=2, embed_dim=3, cheb_k=3)
    ref, fast = pair(**kw)
    fast.dense_graph = dense_graph
    x = torch.randn(2, 4, 11, 1)
    y_ref, y_fast = run_both(ref, fast, x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    assert_same_grads(ref, fast)


def test_agcrn_state_dict_both_ways_and_args_constructor():
    kw = dict(num_nodes=6, input_dim=1, rnn_units=4, output_dim=1, horizon=3, num_layers=2, embed_dim=3, cheb_k=2)
    args = types.SimpleNamespace(**kw, default_graph=True)
    torch.manual_seed(3)
    fast = AGCRN(args)  # the original's constructor form
    ref = RefAGCRN(**kw)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(2, 5, 6, 1)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    # and a mismatched layout is refused
    bad = dict(ref.state_dict())
    bad["encoder.dcrnn_cells.0.gate.weights_pool"] = bad["encoder.dcrnn_cells.0.gate.weights_pool"].flatten(1, 2)
    with pytest.raises(RuntimeError, match="weights_pool"):
        fast.load_state_dict(bad, strict=True)


def test_agcrn_extra_input_channels_are_ignored():
    """The common forecaster signature: x may carry time features after the first input_dim
    channels; y_cov, labels and batches_seen are accepted and unused."""
    kw = dict(num_nodes=5, input_dim=1, rnn_units=3, output_dim=1, horizon=2, num_layers=1, embed_dim=2, cheb_k=2)
    ref, fast = pair(**kw)
    x = torch.randn(2, 3, 5, 3)
    torch.testing.assert_close(fast(x, torch.rand(2, 2, 5, 2), torch.randn(2, 2, 5, 1), 7), ref(x[..., :1]),
                               atol=1e-5, rtol=1e-5)


def test_cell_encoder_and_gcn_modules_match_original():
    torch.manual_seed(0)
    N, B, D, K = 7, 3, 3, 3
    e = torch.randn(N, D, requires_grad=True)
    # AVWGCN
    r, f = RefAVWGCN(4, 5, K, D), AVWGCN(4, 5, K, D)
    torch.nn.init.normal_(r.weights_pool), torch.nn.init.normal_(r.bias_pool)
    f.load_state_dict(r.state_dict(), strict=True)
    x = torch.randn(B, N, 4)
    torch.testing.assert_close(f(x, e), r(x, e), atol=1e-5, rtol=1e-5)
    # one cell step from a non-zero state, and the encoder with a given initial state
    rc, fc = RefAGCRNCell(N, 2, 4, K, D), AGCRNCell(N, 2, 4, K, D)
    for p in rc.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fc.load_state_dict(rc.state_dict(), strict=True)
    x, h = torch.randn(B, N, 2), torch.randn(B, N, 4)
    torch.testing.assert_close(fc(x, h, e), rc(x, h, e), atol=1e-5, rtol=1e-5)
    re_, fe = RefAVWDCRNN(N, 2, 4, K, D, 2), AVWDCRNN(N, 2, 4, K, D, 2)
    for p in re_.parameters():
        torch.nn.init.normal_(p, std=0.3)
    fe.load_state_dict(re_.state_dict(), strict=True)
    xs, h0 = torch.randn(B, 4, N, 2), torch.randn(2, B, N, 4)
    out_r, last_r = re_(xs, h0, e)
    out_f, last_f = fe(xs, h0, e)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    for a, b in zip(last_f, last_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    gr = torch.autograd.grad(out_r.square().sum(), [e, *re_.parameters()])
    gf = torch.autograd.grad(out_f.square().sum(), [e, *fe.parameters()])
    for a, b in zip(gf, gr):
        assert _rel(a, b) < 1e-4


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_agcrn_triton_backend_tiny():
    kw = dict(num_nodes=4, input_dim=1, rnn_units=2, output_dim=1, horizon=2, num_layers=1, embed_dim=2, cheb_k=2)
    ref, fast = pair(backend="triton", **kw)
    x = torch.randn(1, 2, 4, 1)
    y_ref, y_fast = run_both(ref, fast, x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    assert_same_grads(ref, fast)


def test_agcrn_bad_input_raises_clearly():
    m = AGCRN(num_nodes=5, input_dim=2, rnn_units=3, horizon=2, num_layers=1, embed_dim=2)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 3, 4, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 3, 5, 1))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        m(torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="needs num_nodes"):
        AGCRN(input_dim=1)
    with pytest.raises(ValueError, match="rnn_units must be a positive int"):
        AGCRN(num_nodes=3, rnn_units=0)
    with pytest.raises(ValueError, match="embed_dim=2"):
        m.encoder.dcrnn_cells[0](torch.randn(1, 5, 2), torch.zeros(1, 5, 3), torch.randn(5, 4))


def test_end_conv_gradient_is_right_at_16_wide_states():
    """The output head's weight gradient at hidden 16 (the width where PyTorch's CPU oneDNN
    convolution returns garbage weight gradients) equals the float64 computation, run after run."""
    torch.manual_seed(0)
    m = build_model("agcrn", 29, hidden_dim=16, horizon=12)
    x = torch.randn(2, 12, 29, 1)
    grads = []
    for _ in range(3):
        m.zero_grad()
        m(x).square().mean().backward()
        grads.append(m.end_conv.weight.grad.clone())
    m64 = build_model("agcrn", 29, hidden_dim=16, horizon=12).double()
    m64.load_state_dict(m.state_dict())
    m64(x.double()).square().mean().backward()
    for g in grads:
        torch.testing.assert_close(g, m64.end_conv.weight.grad.float(), rtol=1e-4, atol=1e-6)
