"""HyperST-Net models on the library ops against the step-by-step paper reference."""
import numpy as np
import pytest
import torch

from himnet_fast.models import (HyperSTGCGRU, HyperSTLSTMD, HyperSTLSTMG, build_model, load_sensor_coordinates,
                                spatial_attributes)
from himnet_fast.reference_models import RefHyperSTGCGRU, RefHyperSTLSTMD, RefHyperSTLSTMG
from conftest import rel_err as _rel

pytestmark = pytest.mark.usefixtures("one_thread")


MODELS = {
    "lstm-g": (HyperSTLSTMG, RefHyperSTLSTMG, dict(query_dim=3)),
    "lstm-d": (HyperSTLSTMD, RefHyperSTLSTMD, {}),
    "gcgru": (HyperSTGCGRU, RefHyperSTGCGRU, dict(cheb_k=3, embed_dim=3)),
}
SHAPES = [  # (B, T, N, input_dim, num_layers): one node / one step, and a multi-layer case
    (1, 1, 1, 1, 1),
    (3, 4, 7, 2, 2),
]


def make(kind, N, input_dim, num_layers, seed=0, **extra):
    fast_cls, ref_cls, kw = MODELS[kind]
    torch.manual_seed(seed)
    attrs = torch.randn(N, 6)
    kw = dict(input_dim=input_dim, hidden_dim=4, output_dim=2, horizon=3, num_layers=num_layers, spatial_dim=5,
              **kw, **extra)
    fast = fast_cls(N, attrs, **kw)
    ref = ref_cls(N, attrs, **{k: v for k, v in kw.items() if k not in ("backend", "dense_graph")})
    ref.load_state_dict(fast.state_dict(), strict=True)
    return fast, ref


def check_parity(fast, ref, x):
    y_fast, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ref)
    (y_fast * g).sum().backward()
    (y_ref * g).sum().backward()
    ref_params = dict(ref.named_parameters())
    assert sorted(ref_params) == sorted(n for n, _ in fast.named_parameters())
    for name, p in fast.named_parameters():
        r = ref_params[name].grad
        assert p.grad is not None and r is not None, name
        assert _rel(p.grad, r) < 1e-4, (name, _rel(p.grad, r))
    return y_fast


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("B,T,N,C,L", SHAPES)
def test_hyperst_outputs_and_grads_match_reference(kind, B, T, N, C, L):
    fast, ref = make(kind, N, C, L)
    y = check_parity(fast, ref, torch.randn(B, T, N, C))
    assert y.shape == (B, 3, N, 2)


def test_hyperst_lstm_g_streamed_weights_match(monkeypatch):
    """Zero dense budget: the per-node LSTM weights are never built (meta_linear's streamed
    "S" form), as on a large graph."""
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0")
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", "0.001")
    fast, ref = make("lstm-g", 9, 2, 2)
    check_parity(fast, ref, torch.randn(2, 3, 9, 2))


def test_hyperst_gcgru_streamed_graph_matches(monkeypatch):
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", "0.001")
    fast, ref = make("gcgru", 9, 1, 1, dense_graph=False)
    check_parity(fast, ref, torch.randn(2, 3, 9, 1))


def test_hyperst_attributes_change_the_forecast():
    """The spatial module is live: other attributes, other weights, other forecast."""
    fast, _ = make("lstm-g", 5, 1, 1)
    x = torch.randn(2, 3, 5, 1)
    y1 = fast(x)
    fast.attributes.add_(1.0)
    assert not torch.allclose(fast(x), y1)


def test_hyperst_bad_input():
    with pytest.raises(ValueError, match="attributes must have shape"):
        HyperSTLSTMD(5, torch.randn(4, 6))
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        HyperSTLSTMG(5, torch.randn(5, 6), hidden_dim=0)
    m = HyperSTGCGRU(5, torch.randn(5, 6), hidden_dim=3, horizon=2)
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 3, 4, 1))


# --------------------------------------------------------------------------- attributes

def test_spatial_attributes_recovers_kernel_distances():
    # a path graph 0 - 1 - 2 - 3 - 4 - 5 with known road distances, as a Gaussian kernel
    d = np.full((6, 6), np.inf)
    for i in range(5):
        d[i, i + 1] = d[i + 1, i] = 0.3 * (i + 1)
    w = np.exp(-np.square(d))
    np.fill_diagonal(w, 1.0)
    coords = np.stack([np.arange(6.0), np.arange(6.0) * 2], 1)
    a = spatial_attributes(coords, w, num_neighbors=2).numpy()
    assert a.shape == (6, 4)
    np.testing.assert_allclose(a[:, :2].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(a[:, :2].std(0), 1, atol=1e-6)
    # node 2 neighbours: 1 (0.6) and 3 (0.9); node 0 has one neighbour, the other is "far" (1.5 = max)
    np.testing.assert_allclose(a[2, 2:], [0.6, 0.9], rtol=1e-5)
    np.testing.assert_allclose(a[0, 2:], [0.3, 1.5], rtol=1e-5)
    # distances given directly (kernel=False) give the same
    dd = np.where(np.isfinite(d), d, 0.0)
    np.testing.assert_allclose(spatial_attributes(coords, dd, 2, kernel=False).numpy(), a, rtol=1e-5)


def test_spatial_attributes_bad_input():
    with pytest.raises(ValueError, match="adjacency must have shape"):
        spatial_attributes(np.zeros((3, 2)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="coords must have shape"):
        spatial_attributes(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="Gaussian-kernel weights"):
        spatial_attributes(np.zeros((3, 2)), np.full((3, 3), 2.0))


def test_los_loop_attributes(tmp_path):
    """The Los-loop builder path on a 3-sensor file of the same format."""
    p = tmp_path / "graph_sensor_locations.csv"
    p.write_text("0,773869,34.15497,-118.31829\n1,767541,34.11621,-118.23799\n2,767542,34.11641,-118.23819")
    xy = load_sensor_coordinates(str(p))
    assert xy.shape == (3, 2) and xy[0, 0] == pytest.approx(34.15497)
    a = spatial_attributes(xy, np.array([[1, 0.5, 0], [0.5, 1, 0.9], [0, 0.9, 1]]), 4)
    assert a.shape == (3, 6) and torch.isfinite(a).all()


# --------------------------------------------------------------------------- factory

@pytest.mark.parametrize("name", ["agcrn", "hyperst-lstm-g", "hyperst-lstm-d", "hyperst-gcgru"])
def test_build_model_common_signature(name):
    from himnet_fast.models import needs_attributes
    N = 4
    attrs = torch.randn(N, 6) if needs_attributes(name) else None
    m = build_model(name, N, attributes=attrs, input_dim=1, output_dim=1, out_steps=3, hidden_dim=4, num_layers=1)
    x = torch.randn(2, 5, N, 3)  # [signal, time of day, day of week]
    y = m(x, torch.rand(2, 3, N, 2), torch.randn(2, 3, N, 1), 10)
    assert y.shape == (2, 3, N, 1)
    # only the first input_dim channels are read
    x2 = x.clone()
    x2[..., 1:] = 0
    torch.testing.assert_close(m(x2), y)


def test_build_model_bad_arguments():
    with pytest.raises(ValueError, match="model name must be one of"):
        build_model("lstm", 3)
    with pytest.raises(ValueError, match="needs attributes"):
        build_model("hyperst-gcgru", 3)
    with pytest.raises(ValueError, match="takes no attributes"):
        build_model("agcrn", 3, attributes=torch.randn(3, 6))


@pytest.mark.parametrize("kind,budget", [("gcgru", "256"), ("lstm-g", "0")])
def test_hyperst_triton_backend_tiny(monkeypatch, kind, budget):
    """Triton kernels (the interpreter on CPU): GCGRU's streamed graph product and gate/update,
    LSTM-G's streamed per-node meta-linear (zero dense budget)."""
    from conftest import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", budget)
    fast, ref = make(kind, 4, 1, 1, backend="triton")
    check_parity(fast, ref, torch.randn(1, 2, 4, 1))


@pytest.mark.parametrize("name", ["agcrn", "hyperst-lstm-g", "hyperst-gcgru"])
def test_large_graph_paths_build_no_node_weights_and_no_dense_graph(monkeypatch, name):
    """Above the dense budget (here 0) neither the (N, I, O) per-node weights nor the N×N graph
    is ever materialised, forward and backward."""
    import importlib
    gcn_mod = importlib.import_module("himnet_fast.nn.gcn")
    graph_mod = importlib.import_module("himnet_fast.ops.graph")

    def forbidden(*a, **k):
        raise AssertionError("materialised a per-node weight or a dense graph")

    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0")
    monkeypatch.setattr(gcn_mod, "generate_weights", forbidden)
    monkeypatch.setattr(graph_mod, "build_dense", forbidden)
    from himnet_fast.models import needs_attributes
    N = 5
    m = build_model(name, N, attributes=torch.randn(N, 6) if needs_attributes(name) else None, hidden_dim=4,
                    horizon=2, num_layers=1)
    m(torch.randn(2, 3, N, 1)).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name", ["agcrn", "hyperst-lstm-g", "hyperst-lstm-d", "hyperst-gcgru"])
def test_bf16_autocast_runs_and_stays_close(name):
    """The trainer's --amp: bf16 autocast forward and backward, close to fp32."""
    from himnet_fast.models import needs_attributes
    N = 6
    m = build_model(name, N, attributes=torch.randn(N, 6) if needs_attributes(name) else None, hidden_dim=8,
                    horizon=3, num_layers=2)
    x = torch.randn(2, 4, N, 3)
    y = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m(x)
    ya.float().sum().backward()
    assert _rel(ya.float(), y) < 3e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
