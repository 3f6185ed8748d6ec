"""Drop-in modules against the original algorithm (himnet_fast.reference), end to end."""
import itertools

import numpy as np
import pytest
import torch

import himnet_fast as hf
from himnet_fast.reference import (RefHimDecoder, RefHimEncoder, RefHimGCN, RefHimGCRU, RefHimNet,
                                   ref_adaptive_graph)

from conftest import parity_backends, rel_err as _rel


def make_inputs(B, N, T=12, out_steps=12, seed=0, input_dim=3, ycov_dim=2, output_dim=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, N, input_dim, generator=g)
    x[..., 1] = torch.randint(0, 288, (B, T, N), generator=g) / 288.0
    x[..., 2] = torch.randint(0, 7, (B, T, N), generator=g).float()
    y_cov = torch.rand(B, out_steps, N, ycov_dim, generator=g)
    labels = torch.randn(B, out_steps, N, output_dim, generator=g)
    return x, y_cov, labels


def pair(N, backend=None, dense_graph=None, **kw):
    torch.manual_seed(1)
    ref = RefHimNet(N, **kw)
    fast = hf.HimNet(N, **kw, backend=backend, dense_graph=dense_graph)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def assert_same_grads(ref, fast, tol=1e-4):
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        r = ref_params[name].grad
        if r is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
            continue
        assert p.grad is not None, name
        if r.norm() == 0:
            assert p.grad.norm() < 1e-6, name
        else:
            assert _rel(p.grad, r) < tol, (name, _rel(p.grad, r))


# Small sizes against the reference, edge cases included (one sample; one or two nodes):
# B in {1, 3}, N in {1, 2, 37}, cheb_k in {2, 3}, num_layers in {1, 2}.
GRID = list(itertools.product([1, 3], [1, 2, 37], [2, 3], [1, 2]))


@pytest.mark.parametrize("B,N,cheb_k,num_layers", GRID)
def test_himnet_eval_and_grads_match_reference(B, N, cheb_k, num_layers):
    kw = dict(hidden_dim=8, cheb_k=cheb_k, num_layers=num_layers, out_steps=4,
              tod_embedding_dim=3, dow_embedding_dim=2, node_embedding_dim=5, st_embedding_dim=4)
    ref, fast = pair(N, **kw)
    x, y_cov, labels = make_inputs(B, N, T=5, out_steps=4)
    ref.eval(), fast.eval()
    y_ref, y = ref(x, y_cov), fast(x, y_cov)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    (y_ref.square().mean()).backward()
    (y.square().mean()).backward()
    assert_same_grads(ref, fast)


@pytest.mark.parametrize("cfg", [
    dict(hidden_dim=96, tod_embedding_dim=10, dow_embedding_dim=2, node_embedding_dim=14, st_embedding_dim=10),
    dict(hidden_dim=13, tod_embedding_dim=12, dow_embedding_dim=4, node_embedding_dim=16, st_embedding_dim=16,
         cheb_k=3, num_layers=2),
    dict(hidden_dim=7, input_dim=4, output_dim=2, ycov_dim=3, out_steps=3, cheb_k=4),
])
@pytest.mark.parametrize("dense_graph", [None, False])
def test_odd_sizes(cfg, dense_graph):
    N = B = 6  # batch size equal to the node count
    ref, fast = pair(N, dense_graph=dense_graph, **cfg)
    x, y_cov, labels = make_inputs(B, N, T=4, out_steps=cfg.get("out_steps", 12),
                                   input_dim=cfg.get("input_dim", 3), ycov_dim=cfg.get("ycov_dim", 2),
                                   output_dim=cfg.get("output_dim", 1))
    ref.eval(), fast.eval()
    y_ref, y = ref(x, y_cov), fast(x, y_cov)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y_ref.sum().backward(), y.sum().backward()
    assert_same_grads(ref, fast)


@pytest.mark.parametrize("backend", parity_backends())
def test_training_mode_teacher_forcing_identical(backend):
    """Same numpy seed -> same teacher-forcing draws -> same outputs, as the original."""
    N, B = 9, 2
    ref, fast = pair(N, backend=backend, hidden_dim=6, out_steps=6, tf_decay_steps=10)
    x, y_cov, labels = make_inputs(B, N, T=3, out_steps=6)
    ref.train(), fast.train()
    for batches_seen in (0, 25, 60):
        np.random.seed(3)
        y_ref = ref(x, y_cov, labels, batches_seen)
        state_ref = np.random.get_state()[1].copy()
        np.random.seed(3)
        y = fast(x, y_cov, labels, batches_seen)
        assert np.array_equal(np.random.get_state()[1], state_ref)  # one draw per step, no more
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_teacher_forcing_off_draws_nothing():
    _, fast = pair(4, hidden_dim=4, out_steps=3, use_teacher_forcing=False)
    x, y_cov, _ = make_inputs(1, 4, T=2, out_steps=3)
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    fast.train()
    fast(x, y_cov)
    assert np.array_equal(np.random.get_state()[1], before)


def test_state_dict_round_trip_and_param_count():
    ref = RefHimNet(883)
    fast = hf.HimNet(883)
    assert sum(p.numel() for p in fast.parameters()) == 1_261_753
    assert sum(p.numel() for p in hf.HimNet(207).parameters()) == 1_250_937
    assert list(fast.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(ref.state_dict(), strict=True)


def test_same_seed_same_initial_weights():
    torch.manual_seed(5)
    ref = RefHimNet(11, hidden_dim=5)
    torch.manual_seed(5)
    fast = hf.HimNet(11, hidden_dim=5)
    for (n, a), (_, b) in zip(ref.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), n


def test_dense_and_streamed_graph_agree():
    ref, fast = pair(37, hidden_dim=8, cheb_k=3, out_steps=3)
    _, streamed = pair(37, hidden_dim=8, cheb_k=3, out_steps=3, dense_graph=False)
    x, y_cov, _ = make_inputs(3, 37, T=4, out_steps=3)
    fast.eval(), streamed.eval()
    torch.testing.assert_close(streamed(x, y_cov), fast(x, y_cov), atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs():
    ref, fast = pair(5, hidden_dim=4, out_steps=3)
    x, y_cov, _ = make_inputs(2, 5, T=3, out_steps=3)
    xt = x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # same values, other strides
    assert not xt.is_contiguous()
    ref.eval(), fast.eval()
    torch.testing.assert_close(fast(xt, y_cov.transpose(1, 2).contiguous().transpose(1, 2)), ref(x, y_cov),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ submodules on their own

def _copy(ref_mod, fast_mod):
    fast_mod.load_state_dict(ref_mod.state_dict(), strict=True)
    return ref_mod, fast_mod


@pytest.mark.parametrize("axis", [None, "T", "S", "ST", "st"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gcn_with_dense_support(axis, per_sample):
    B, N, C, O, D, K = 3, 7, 5, 6, 4, 3
    ref, fast = _copy(RefHimGCN(C, O, K, D, axis), hf.HimGCN(C, O, K, D, axis))
    x = torch.randn(B, N, C)
    e = torch.randn(B, N, 3) if per_sample else torch.randn(N, 3)
    support = ref_adaptive_graph(e)
    q = {None: None, "T": torch.randn(B, D), "S": torch.randn(N, D)}.get(
        axis.upper() if axis else None, torch.randn(B, N, D))
    torch.testing.assert_close(fast(x, support, q), ref(x, support, q), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_gcru_encoder_decoder(axis):
    B, N, C, H, D, K, L, T = 2, 6, 3, 5, 4, 2, 2, 4
    q = {"T": torch.randn(B, D), "S": torch.randn(N, D), "ST": torch.randn(B, N, D)}[axis]
    support = ref_adaptive_graph(torch.randn(B, N, 3) if axis == "ST" else torch.randn(N, 3))
    ref_cell, cell = _copy(RefHimGCRU(N, C, H, K, D, axis), hf.HimGCRU(N, C, H, K, D, axis))
    x, h = torch.randn(B, N, C), torch.randn(B, N, H)
    torch.testing.assert_close(cell(x, h, support, q), ref_cell(x, h, support, q), atol=1e-5, rtol=1e-5)
    assert cell.init_hidden_state(B).shape == (B, N, H)

    ref_enc, enc = _copy(RefHimEncoder(N, C, H, K, L, D, axis), hf.HimEncoder(N, C, H, K, L, D, axis))
    xs = torch.randn(B, T, N, C)
    (o_ref, s_ref), (o, s) = ref_enc(xs, support, q), enc(xs, support, q)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(s, s_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    ref_dec, dec = _copy(RefHimDecoder(N, C, H, K, L, D, axis), hf.HimDecoder(N, C, H, K, L, D, axis))
    states = [torch.randn(B, N, H) for _ in range(L)]
    (o_ref, s_ref), (o, s) = ref_dec(x, states, support, q), dec(x, states, support, q)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(s, s_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_large_graph_mode_matches_reference(monkeypatch):
    """With a tiny dense budget every large-graph path is taken (streamed graphs, streamed "S"
    weights) and the model still equals the reference, gradients included."""
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0.0001")
    ref, fast = pair(11, hidden_dim=6, cheb_k=3, num_layers=2, out_steps=3)
    x, y_cov, _ = make_inputs(2, 11, T=4, out_steps=3)
    ref.eval(), fast.eval()
    gen = fast.encoder_s.cells[0].gate.generate(fast.node_embedding)
    assert gen.streamed
    y_ref, y = ref(x, y_cov), fast(x, y_cov)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y_ref.sum().backward(), y.sum().backward()
    assert_same_grads(ref, fast)


def test_gate_and_update_weights_take_one_form(monkeypatch):
    """At a budget between the update's (N, I, H) and the gate's (N, I, 2H) per-node weights the
    budget alone would stream the gate and build the update; the cell op takes one query for
    both, so the update follows the gate, and the model still equals the reference."""
    N = 11
    ref, fast = pair(N, hidden_dim=6, cheb_k=3, num_layers=2, out_steps=3)
    cell = fast.encoder_s.cells[0]
    _, i, o = cell.gate.weights_pool.shape
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", str(N * i * (o * 3 // 4) * 4 / 2 ** 20))
    assert not cell.update.generate(fast.node_embedding).streamed  # the mix the budget alone gives
    gate, update = cell.generate_maps(fast.node_embedding)
    assert gate.streamed and update.streamed
    x, y_cov, _ = make_inputs(2, N, T=4, out_steps=3)
    ref.eval(), fast.eval()
    y_ref, y = ref(x, y_cov), fast(x, y_cov)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y_ref.sum().backward(), y.sum().backward()
    assert_same_grads(ref, fast)
