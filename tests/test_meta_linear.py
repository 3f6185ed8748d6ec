"""meta_linear against the reference (the original einsums with materialised weights)."""
import pytest
import torch

import himnet_fast as hf
from himnet_fast.reference import ref_meta_linear

from conftest import parity_backends, rel_err as _rel

BACKENDS = parity_backends()


def _inputs(axis, B, N, I, O, D, dtype=torch.float32, bias=True, requires_grad=True):
    x = torch.randn(B, N, I, dtype=dtype)
    q = {"T": torch.randn(B, D), "S": torch.randn(N, D), "ST": torch.randn(B, N, D)}[axis].to(dtype)
    p = torch.randn(D, I, O, dtype=dtype) / I ** 0.5
    pb = torch.randn(D, O, dtype=dtype) if bias else None
    ts = [t for t in (x, q, p, pb) if t is not None]
    for t in ts:
        t.requires_grad_(requires_grad)
    return x, q, p, pb


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


SHAPES = [  # (B, N, I, O, D): size-1, odd widths, batch == nodes
    (1, 1, 3, 2, 2),
    (3, 37, 14, 10, 5),
    (2, 5, 134 // 4, 7, 14),
    (4, 4, 6, 9, 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["T", "S", "ST"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(backend, axis, shape, bias):
    x, q, p, pb = _inputs(axis, *shape, bias=bias)
    y = hf.ops.meta_linear(x, q, p, pb, axis, backend=backend)
    y_ref = ref_meta_linear(x, q, p, pb, axis)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(_grads(y, (x, q, p, pb)), _grads(y_ref, (x, q, p, pb))):
        assert _rel(g, g_ref) < 1e-4


def test_axis_case_insensitive():
    x, q, p, pb = _inputs("ST", 2, 3, 4, 5, 2, requires_grad=False)
    torch.testing.assert_close(hf.ops.meta_linear(x, q, p, pb, "st"), hf.ops.meta_linear(x, q, p, pb, "ST"))


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_gradcheck_float64(axis):
    x, q, p, pb = _inputs(axis, 2, 3, 4, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: hf.ops.meta_linear(*a, axis, backend="torch"), (x, q, p, pb))


def test_st_streams_in_chunks(monkeypatch):
    """Chunking the Khatri-Rao product over rows must not change the result."""
    x, q, p, pb = _inputs("ST", 3, 37, 20, 6, 4)
    y_ref = ref_meta_linear(x, q, p, pb, "ST")
    g_ref = _grads(y_ref, (x, q, p, pb))
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", "0.001")  # a few rows per chunk
    y = hf.ops.meta_linear(x, q, p, pb, "ST", backend="torch")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(_grads(y, (x, q, p, pb)), g_ref):
        assert _rel(g, gr) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_non_contiguous(backend, axis):
    B, N, I, O, D = 2, 5, 6, 4, 3
    x = torch.randn(B, I, N).transpose(1, 2)  # (B, N, I), non-contiguous
    q = {"T": torch.randn(D, B).t(), "S": torch.randn(D, N).t(), "ST": torch.randn(N, B, D).transpose(0, 1)}[axis]
    p = torch.randn(D, O, I).transpose(1, 2)
    pb = torch.randn(O, D).t()
    assert not x.is_contiguous() and not q.is_contiguous() and not p.is_contiguous()
    torch.testing.assert_close(hf.ops.meta_linear(x, q, p, pb, axis, backend=backend),
                               ref_meta_linear(x, q, p, pb, axis), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_zero_size(axis):
    x, q, p, pb = _inputs(axis, 0, 3, 4, 5, 2)
    y = hf.ops.meta_linear(x, q, p, pb, axis, backend="torch")
    assert y.shape == (0, 3, 5)
    y.sum().backward()
    assert p.grad is not None and torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_low_precision(axis, dtype):
    """Under autocast the error against fp32 is at most 2x (plus a floor) PyTorch's own error
    running the reference in the same dtype."""
    x, q, p, pb = _inputs(axis, 3, 11, 24, 16, 8, requires_grad=False)
    exact = ref_meta_linear(x.double(), q.double(), p.double(), pb.double(), axis)
    with torch.autocast("cpu", dtype=dtype):
        y = hf.ops.meta_linear(x, q, p, pb, axis, backend="torch")
    assert y.dtype == dtype
    own = ref_meta_linear(x.to(dtype), q.to(dtype), p.to(dtype), pb.to(dtype), axis)
    err = (y.double() - exact).abs().max().item()
    err_torch = (own.double() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-3


@pytest.mark.parametrize("axis,qshape,match", [
    ("T", (3, 2), "query"),           # B mismatch
    ("S", (4, 2), "query"),           # N mismatch
    ("ST", (2, 5, 2), r"query .*\(B=2, N=3"),
    ("ST", (2, 3, 7), "embedding columns"),
])
def test_bad_query_shape(axis, qshape, match):
    x = torch.randn(2, 3, 4)
    p = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=match):
        hf.ops.meta_linear(x, torch.randn(*qshape), p, None, axis)


def test_bad_pool_and_axis():
    x, q = torch.randn(2, 3, 4), torch.randn(2, 3, 2)
    with pytest.raises(ValueError, match="weight_pool"):
        hf.ops.meta_linear(x, q, torch.randn(2, 5, 5), None, "ST")
    with pytest.raises(ValueError, match="bias_pool"):
        hf.ops.meta_linear(x, q, torch.randn(2, 4, 5), torch.randn(2, 4), "ST")
    with pytest.raises(ValueError, match="axis"):
        hf.ops.meta_linear(x, q, torch.randn(2, 4, 5), None, "X")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        hf.ops.meta_linear(x.long(), q, torch.randn(2, 4, 5), None, "ST")
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        hf.ops.meta_linear(x[0], q, torch.randn(2, 4, 5), None, "ST")


def test_node_axis_streams_on_large_graphs(monkeypatch):
    """Axis "S" switches from materialised (N, I, O) weights to the streamed Khatri-Rao form
    when they exceed the dense budget; both give the reference's result."""
    from himnet_fast.ops.meta_linear import materialize_node_weights
    x, q, p, pb = _inputs("S", 3, 37, 10, 6, 4)
    assert materialize_node_weights(37, p)
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0.001")
    assert not materialize_node_weights(37, p)
    y = hf.ops.meta_linear(x, q, p, pb, "S", backend="torch")
    y_ref = ref_meta_linear(x, q, p, pb, "S")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, gr in zip(_grads(y, (x, q, p, pb)), _grads(y_ref, (x, q, p, pb))):
        assert _rel(g, gr) < 1e-4
