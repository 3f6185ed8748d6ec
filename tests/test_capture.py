"""CapturedHimNet (himnet_fast/nn/capture.py): CUDA-graph capture of the eval forward.

Without a GPU: the clear errors (CPU model, training mode, bad arguments). On a GPU: the
captured forward equals the eager one for every backend that can run, replays new inputs,
validates inputs outside the graph, and honours ``clone``.
"""
import pytest
import torch

import himnet_fast as hf
from himnet_fast.nn.capture import CapturedHimNet

N = 37


def _model(**kw):
    torch.manual_seed(0)
    return hf.HimNet(N, hidden_dim=16, **kw)


def _inputs(B, device, seed=0, T=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, N, 3, generator=g)
    x[..., 1] = torch.randint(0, 288, (B, T, N), generator=g) / 288.0
    x[..., 2] = torch.randint(0, 7, (B, T, N), generator=g).float()
    y_cov = torch.stack([torch.randint(0, 288, (B, 12, N), generator=g) / 288.0,
                         torch.randint(0, 7, (B, 12, N), generator=g).float()], -1)
    return x.to(device), y_cov.to(device)


# --------------------------------------------------------------------------- errors (any machine)

def test_capture_cpu_model_raises():
    model = _model().eval()
    with pytest.raises(RuntimeError, match="CUDA device.*model.cuda"):
        model.capture(2)


def test_capture_training_mode_raises():
    model = _model()  # training mode by default
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        model.capture(2)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
    ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
    ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ({"batch_size": 2, "in_steps": 0}, ValueError, "in_steps"),
    ({"batch_size": 2, "warmup": 0}, ValueError, "warmup"),
])
def test_capture_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CapturedHimNet(_model().eval(), **kwargs)


def test_capture_needs_himnet():
    with pytest.raises(TypeError, match="HimNet"):
        CapturedHimNet(torch.nn.Linear(2, 2), 2)


# --------------------------------------------------------------------------- GPU

def _gpu_backends():
    return [b for b in ("torch", "triton", "cuda") if b in hf.available_backends("cuda")] \
        if torch.cuda.is_available() else ["torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_captured_equals_eager(backend):
    model = _model(backend=backend).cuda().eval()
    cap = model.capture(4)
    for seed in (1, 2):  # the second call must see the new inputs
        x, y_cov = _inputs(4, "cuda", seed)
        with torch.no_grad():
            eager = model(x, y_cov)
        out = cap(x, y_cov)
        assert out.shape == (4, 12, N, 1)
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_captured_inputs_from_cpu_and_longer_y_cov():
    model = _model().cuda().eval()
    cap = CapturedHimNet(model, 2)
    x, y_cov = _inputs(2, "cpu", 3)
    y_long = torch.cat([y_cov, y_cov[:, :3]], 1)  # (B, 15, N, 2): only out_steps are used
    with torch.no_grad():
        eager = model(x.cuda(), y_cov.cuda())
    torch.testing.assert_close(cap(x, y_long), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_captured_clone_semantics():
    model = _model().cuda().eval()
    cap = model.capture(2, clone=False)
    x, y_cov = _inputs(2, "cuda", 4)
    out = cap(x, y_cov)
    assert out.data_ptr() == cap.static_output.data_ptr()
    with torch.no_grad():
        eager = model(x, y_cov)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    fresh = cap(x, y_cov, clone=True)
    assert fresh.data_ptr() != cap.static_output.data_ptr()
    kept = fresh.clone()
    # A replay on other inputs rewrites the static output in place; the clone keeps its values.
    x2, y_cov2 = _inputs(2, "cuda", 5)
    cap(x2, y_cov2)
    assert not torch.equal(cap.static_output, kept)
    assert torch.equal(fresh, kept)


@pytest.mark.gpu
def test_captured_validates_outside_the_graph():
    model = _model().cuda().eval()
    cap = model.capture(2)
    x, y_cov = _inputs(2, "cuda", 5)
    with pytest.raises(ValueError, match="batch_size=2"):
        cap(*_inputs(3, "cuda", 5))
    with pytest.raises(ValueError, match="in_steps"):
        cap(x[:, :6], y_cov)
    bad = x.clone()
    bad[:, -1, 0, 1] = 1.5  # time of day out of [0, 1)
    with pytest.raises(ValueError, match="time of day"):
        cap(bad, y_cov)
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        cap(x, y_cov)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cap(x, y_cov), model(x, y_cov), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_captured_sees_in_place_weight_updates():
    model = _model().cuda().eval()
    cap = model.capture(2)
    x, y_cov = _inputs(2, "cuda", 6)
    with torch.no_grad():
        model.out_proj.bias.add_(1.0)
        eager = model(x, y_cov)
    torch.testing.assert_close(cap(x, y_cov), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_captured_under_autocast_bf16():
    model = _model().cuda().eval()
    cap = model.capture(2, autocast_dtype=torch.bfloat16)
    x, y_cov = _inputs(2, "cuda", 7)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        eager = model(x, y_cov)
    # The graph replays the very kernels eager ran, on the same inputs: equal bit for bit (a
    # tolerance here would hide a capture that ran a different precision path).
    assert torch.equal(cap(x, y_cov), eager)


@pytest.mark.gpu
def test_two_batch_sizes_share_a_pool():
    model = _model().cuda().eval()
    pool = torch.cuda.graph_pool_handle()
    caps = {B: model.capture(B, pool=pool) for B in (1, 3)}
    for B, cap in caps.items():
        x, y_cov = _inputs(B, "cuda", 10 + B)
        with torch.no_grad():
            eager = model(x, y_cov)
        torch.testing.assert_close(cap(x, y_cov), eager, atol=1e-5, rtol=1e-5)
