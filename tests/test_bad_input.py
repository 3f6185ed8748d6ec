"""Bad input gets a clear exception naming the argument; never an IndexError from an embedding
(on a GPU that would be a device-side assert that kills the process)."""
import pytest
import torch

import himnet_fast as hf
from himnet_fast import _backend

from test_modules import make_inputs

N, B = 5, 2


@pytest.fixture
def model():
    m = hf.HimNet(N, hidden_dim=4, out_steps=3)
    return m.eval()


def _good():
    return make_inputs(B, N, T=3, out_steps=3)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda x, y, l: (x[0], y, l), ValueError, r"x must have 4 dimensions"),
    (lambda x, y, l: (x[:, :, :4], y, l), ValueError, r"x must have shape \(B, T>=1, N=5, 3\)"),
    (lambda x, y, l: (x[..., :2], y, l), ValueError, r"x must have shape"),
    (lambda x, y, l: (x.long(), y, l), TypeError, r"x must be a floating-point"),
    (lambda x, y, l: (x, y[:, :2], l), ValueError, r"y_cov must have shape \(B=2, out_steps>=3"),
    (lambda x, y, l: (x, y[:1], l), ValueError, r"y_cov must have shape \(B=2"),
    (lambda x, y, l: (x, y[..., :1], l), ValueError, r"y_cov must have shape"),
    (lambda x, y, l: (x, y, l[:, :, :3]), ValueError, r"labels must have shape"),
])
def test_shapes(model, mutate, exc, match):
    x, y, l = mutate(*_good())
    with pytest.raises(exc, match=match):
        model(x, y, l)


@pytest.mark.parametrize("channel,value,match", [
    (1, 1.0, r"time of day\) must be a fraction of the day in \[0, 1\)"),
    (1, -0.01, "time of day"),
    (1, float("nan"), "time of day"),
    (2, 7.0, r"day of week\) must be in 0..6"),
    (2, -1.0, "day of week"),
])
def test_time_features_out_of_range(model, channel, value, match):
    x, y, l = _good()
    x[1, -1, 0, channel] = value
    with pytest.raises(ValueError, match=match):
        model(x, y)


def test_teacher_forcing_needs_labels_and_counter(model):
    x, y, l = _good()
    model.train()
    with pytest.raises(ValueError, match="labels are required"):
        model(x, y)
    with pytest.raises(ValueError, match=r"batches_seen \(or teacher_forcing\) is required"):
        model(x, y, l)
    model(x, y, l, 0)  # and works with both


def test_constructor_and_module_errors():
    with pytest.raises(ValueError, match="cheb_k must be >= 2"):
        hf.HimNet(N, cheb_k=1)
    with pytest.raises(ValueError, match="axis must be one of"):
        hf.HimGCN(3, 4, 2, 5, meta_axis="Q")
    with pytest.raises(ValueError, match="backend must be one of"):
        hf.HimNet(N, backend="fastest")
    gcn = hf.HimGCN(3, 4, 2, 5, meta_axis="S")
    support = torch.softmax(torch.randn(N, N), -1)
    with pytest.raises(ValueError, match=r"embeddings has 4 columns .* expected embed_dim=5"):
        gcn(torch.randn(B, N, 3), support, torch.randn(N, 4))
    with pytest.raises(ValueError, match=r"embeddings must have 2 dimensions"):
        gcn(torch.randn(B, N, 3), support, torch.randn(B, N, 5))
    with pytest.raises(ValueError, match=r"x has 2 channels"):
        gcn(torch.randn(B, N, 2), support, torch.randn(N, 5))


def test_backend_selection(monkeypatch):
    assert "torch" in hf.available_backends("cpu")
    x, q, p = torch.randn(2, 3, 4), torch.randn(2, 3, 2), torch.randn(2, 4, 5)
    monkeypatch.setenv("HIMNET_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"\$HIMNET_FAST_BACKEND must be one of"):
        hf.ops.meta_linear(x, q, p)
    monkeypatch.setenv("HIMNET_FAST_BACKEND", "torch")
    hf.ops.meta_linear(x, q, p)
    monkeypatch.delenv("HIMNET_FAST_BACKEND")
    with pytest.raises(hf.BackendUnavailableError, match="'cuda' cannot run on cpu"):
        hf.ops.meta_linear(x, q, p, backend="cuda")
    assert _backend.normalize_backend("AUTO") is None


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    """An explicit triton request on CPU tensors without TRITON_INTERPRET=1 must raise, not
    crash inside Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, q, p = torch.randn(2, 3, 4), torch.randn(2, 3, 2), torch.randn(2, 4, 5)
    with pytest.raises(hf.BackendUnavailableError, match="triton"):
        hf.ops.meta_linear(x, q, p, backend="triton")
    assert "triton" not in hf.available_backends("cpu")


def test_auto_order_follows_the_committed_gpu_measurements(monkeypatch):
    """On CUDA, automatic selection runs torch for every op except the streamed adaptive
    product, where triton measured faster (bench/results/gpu-h100/). The choice is made from
    the device type and the registry alone, so it is checked here without a GPU."""
    monkeypatch.delenv("HIMNET_FAST_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for op in ("meta_linear", "gcru_gate", "gcru_update"):
        assert _backend.auto_order(op, cuda) == ("torch",)
    assert _backend.auto_order("adaptive_matmul", cuda) == ("triton", "torch")
    assert "cuda" not in sum((_backend.auto_order(op, cuda) for op in
                              ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update")), ())
    assert _backend.auto_order("adaptive_matmul", cpu) == ("torch",)
    # A graph that fits the budget is materialised (the dense GEMM path of torch and of the
    # fused Triton step); the CUDA extension streams.
    from himnet_fast.ops import AdaptiveGraph
    e = torch.randn(7, 3)
    assert AdaptiveGraph(e).dense and AdaptiveGraph(e, backend="torch").dense
    assert AdaptiveGraph(e, backend="triton").dense
    assert not AdaptiveGraph(e, backend="cuda").dense
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0")
    assert not AdaptiveGraph(e).dense


def test_a_backend_is_available_where_it_runs_every_op_it_implements(monkeypatch):
    """An op a backend does not implement runs on another, so it does not make the backend
    unavailable (the CUDA extension has no SBA attention); one of its own ops that cannot run
    does."""
    runs = _backend.Impl(lambda *a: None, None, lambda device: None)
    fails = _backend.Impl(lambda *a: None, None, lambda device: "not here")
    registry = {k: v for k, v in _backend._REGISTRY.items() if k[1] != "cuda"}
    registry[("meta_linear", "cuda")] = registry[("gcru_gate", "cuda")] = runs
    monkeypatch.setattr(_backend, "_REGISTRY", registry)
    assert "cuda" in _backend.available_backends("cpu")
    assert _backend.backend_report()["cuda"].startswith("available")
    registry[("gcru_gate", "cuda")] = fails
    assert "cuda" not in _backend.available_backends("cpu")
    assert _backend.backend_report()["cuda"] == "not here"
