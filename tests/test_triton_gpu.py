"""The Triton kernels at real sizes on a GPU (marker ``gpu``; skipped without CUDA).

Covers what the CPU interpreter cannot: compiled code, real ``tl.dot`` precision modes (exact
fp32 with TF32 off, TF32 when PyTorch allows it), tensor-core bf16, HimNet's real shapes
(N = 883 / 8600, I = K*C = 134 / 194, O = 64..192, D = 2..16, W = B*C = 1024) and memory:
the "ST" meta-linear never holds the B×N×I×O weights and the adaptive product never an N×N
buffer. Criteria as in test_triton_kernels.py: fp32 within 1e-4 of the largest reference
magnitude, bf16 at most 2x PyTorch's own bf16 error against an fp64 reference.
"""
from __future__ import annotations

import pytest
import torch

import himnet_fast as hf
from himnet_fast.reference import RefHimNet, ref_meta_linear

from conftest import HAS_CUDA, HAS_TRITON, tf32_matmul

pytestmark = [pytest.mark.gpu, pytest.mark.triton,
              pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA device and triton")]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _tf32_off():
    """fp32 parity is defined with TF32 off (PyTorch's default for matmul); restore after."""
    with tf32_matmul(False):
        yield


from parity import am_ref as _am_ref, assert_lowp as _assert_lowp, assert_rel as _assert_rel, err as _err  # noqa: E402
from parity import leaf as _leaf, ml_inputs, on, run as _run  # noqa: E402

TRITON = {op: on("triton", op) for op in ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update")}


def _entry(op):
    """The op on the "triton" backend, through its registered custom op (autograd included)."""
    return TRITON[op]


# --------------------------------------------------------------------------- meta_linear

ML_GRID = [  # (axis, B, N, I, O, D): HimNet's encoders ("S", "T") and decoder ("ST") shapes
    ("ST", 16, 883, 134, 128, 16), ("ST", 16, 883, 194, 192, 10), ("ST", 16, 207, 134, 64, 2),
    ("ST", 3, 37, 130, 96, 14), ("ST", 1, 1, 134, 64, 16),
    ("S", 16, 883, 134, 128, 16), ("S", 16, 37, 194, 96, 14), ("S", 2, 8600, 134, 64, 16),
    ("T", 16, 883, 134, 128, 16), ("T", 16, 207, 194, 192, 10), ("T", 1, 1, 134, 64, 2),
]


def _ml_inputs(axis, B, N, I, O, D, dtype=torch.float64):
    return ml_inputs(axis, B, N, I, O, D, dtype=dtype, device=CUDA)


@pytest.mark.parametrize("axis,B,N,I,O,D", ML_GRID)
def test_meta_linear_fp32_real_sizes(axis, B, N, I, O, D):
    x, q, p, pb = _ml_inputs(axis, B, N, I, O, D)
    g = torch.randn(B, N, O, device=CUDA, dtype=torch.float64)
    want, gwant = _run(lambda *a: ref_meta_linear(*a, axis), [_leaf(t) for t in (x, q, p, pb)], g)
    got, ggot = _run(lambda *a: _entry("meta_linear")(*a, axis),
                     [_leaf(t, torch.float32) for t in (x, q, p, pb)], g.float())
    _assert_rel(got, want.to(got.dtype), 1e-4, "y")
    for name, a, b in zip(("dx", "dq", "dP", "dPb"), ggot, gwant):
        _assert_rel(a, b.to(a.dtype), 1e-4, name)


@pytest.mark.parametrize("axis,B,N,I,O,D", [c for c in ML_GRID if c[2] <= 883])
def test_meta_linear_bf16_real_sizes(axis, B, N, I, O, D):
    rounded = [t.to(torch.bfloat16) for t in _ml_inputs(axis, B, N, I, O, D, torch.float32)]
    g = torch.randn(B, N, O, device=CUDA).to(torch.bfloat16)
    exact, gexact = _run(lambda *a: ref_meta_linear(*a, axis), [_leaf(t, torch.float64) for t in rounded],
                         g.double())
    own, gown = _run(lambda *a: ref_meta_linear(*a, axis), [_leaf(t) for t in rounded], g)
    got, ggot = _run(lambda *a: _entry("meta_linear")(*a, axis), [_leaf(t) for t in rounded], g)
    _assert_lowp(got, exact, own, "y")
    for name, a, b, c in zip(("dx", "dq", "dP", "dPb"), ggot, gexact, gown):
        _assert_lowp(a, b, c, name)


def test_meta_linear_tf32_follows_torch_flag():
    """With allow_tf32 the kernels use TF32 (a visible, bounded error); without, exact fp32."""
    x, q, p, pb = _ml_inputs("ST", 16, 883, 134, 128, 16, torch.float32)
    exact = ref_meta_linear(*(t.double() for t in (x, q, p, pb)), "ST")
    ieee = _entry("meta_linear")(x, q, p, pb, "ST")
    with tf32_matmul(True):
        tf32 = _entry("meta_linear")(x, q, p, pb, "ST")
    scale = exact.abs().max().item()
    assert _err(ieee, exact) <= 1e-5 * scale
    assert _err(tf32, exact) <= 1e-2 * scale
    assert _err(tf32, exact) > _err(ieee, exact)


def test_meta_linear_st_memory_is_lean():
    """Forward + backward of the decoder's "ST" product at PEMS07 size (B=16, N=883, I=134,
    O=128, D=16) peaks far below the B×N×I×O generated weight the original builds (970 MB)."""
    B, N, I, O, D = 16, 883, 134, 128, 16
    x, q, p, pb = [_leaf(t) for t in _ml_inputs("ST", B, N, I, O, D, torch.float32)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = _entry("meta_linear")(x, q, p, pb, "ST")
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.25 * B * N * I * O * 4, f"peak extra {extra / 2**20:.0f} MiB"


def test_meta_linear_deterministic_on_gpu():
    x, q, p, pb = _ml_inputs("ST", 16, 883, 134, 128, 16, torch.float32)
    g = torch.randn(16, 883, 128, device=CUDA)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(lambda *a: _entry("meta_linear")(*a, "ST"), [_leaf(t) for t in (x, q, p, pb)], g)
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- adaptive_matmul

def test_adaptive_matmul_deterministic_on_gpu():
    """The backward's two dE passes and the split partials are reduced in a fixed order (no
    atomics): two runs give bitwise the same output and gradients."""
    e = torch.randn(16, 883, 16, device=CUDA) * 0.5
    v = torch.randn(16, 883, 67, device=CUDA)
    g = torch.randn(16, 883, 67, device=CUDA)
    runs = [_run(_entry("adaptive_matmul"), [_leaf(e), _leaf(v)], g) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


AM_GRID = [  # (G, N, D, W): static graph with the batch folded into W, per-sample decoder graph
    (1, 883, 16, 1024), (1, 883, 10, 48), (16, 883, 16, 67), (16, 883, 16, 64),
    (1, 37, 14, 1024), (16, 37, 2, 65), (1, 1, 16, 1024), (16, 1, 16, 3),
    (1, 8600, 16, 128), (2, 8600, 16, 67),
]


@pytest.mark.parametrize("G,N,D,W", AM_GRID)
def test_adaptive_matmul_fp32_real_sizes(G, N, D, W):
    e = torch.randn(G, N, D, device=CUDA, dtype=torch.float64) * 0.5
    e[:, : max(1, N // 50)] = 0.0  # rows whose scores are all <= 0: uniform, no E gradient
    v = torch.randn(G, N, W, device=CUDA, dtype=torch.float64)
    g = torch.randn(G, N, W, device=CUDA, dtype=torch.float64)
    want, gwant = _run(_am_ref, [_leaf(e), _leaf(v)], g)
    got, ggot = _run(_entry("adaptive_matmul"), [_leaf(e, torch.float32), _leaf(v, torch.float32)], g.float())
    _assert_rel(got, want.to(got.dtype), 1e-4, "out")
    for name, a, b in zip(("dE", "dV"), ggot, gwant):
        _assert_rel(a, b.to(a.dtype), 1e-4, name)


@pytest.mark.parametrize("G,N,D,W", [c for c in AM_GRID if c[1] <= 883])
def test_adaptive_matmul_bf16_real_sizes(G, N, D, W):
    e = (torch.randn(G, N, D, device=CUDA) * 0.5).to(torch.bfloat16)
    v = torch.randn(G, N, W, device=CUDA).to(torch.bfloat16)
    g = torch.randn(G, N, W, device=CUDA).to(torch.bfloat16)
    exact, gexact = _run(_am_ref, [_leaf(e, torch.float64), _leaf(v, torch.float64)], g.double())
    own, gown = _run(_am_ref, [_leaf(e), _leaf(v)], g)
    got, ggot = _run(_entry("adaptive_matmul"), [_leaf(e), _leaf(v)], g)
    _assert_lowp(got, exact, own, "out")
    for name, a, b, c in zip(("dE", "dV"), ggot, gexact, gown):
        _assert_lowp(a, b, c, name)


def test_adaptive_matmul_no_nxn_buffer():
    """N = 8600 (PEMS07-like large graph): forward + backward peak well under one N×N fp32."""
    G, N, D, W = 1, 8600, 16, 1024
    e = _leaf(torch.randn(G, N, D, device=CUDA) * 0.3)
    v = _leaf(torch.randn(G, N, W, device=CUDA))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _entry("adaptive_matmul")(e, v)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # out, dV and dout are G·N·W each; an N×N fp32 matrix alone would be 282 MiB.
    assert extra < 4 * G * N * W * 4 + 64 * N * 4 + (8 << 20) < N * N * 4, f"peak extra {extra / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- GCRU tail

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gcru_real_sizes(dtype):
    B, N, H = 16, 883, 64
    pre = (torch.randn(B, N, 2 * H, device=CUDA) * 3).to(dtype)
    h = torch.randn(B, N, H, device=CUDA).to(dtype)
    r = torch.rand(B, N, H, device=CUDA).to(dtype)
    g = torch.randn(B, N, H, device=CUDA).to(dtype)

    def gate_ref(a, b):
        zr = torch.sigmoid(a)
        return zr[..., :H] * b

    def update_ref(c, rr, hh):
        return rr * hh + (1 - rr) * torch.tanh(c)

    cases = ((gate_ref, lambda a, b: _entry("gcru_gate")(a, b)[0], (pre, h)),
             (update_ref, _entry("gcru_update"), (pre[..., :H], r, h)))
    for ref, fn, inputs in cases:
        exact, gexact = _run(ref, [_leaf(t, torch.float64) for t in inputs], g.double())
        got, ggot = _run(fn, [_leaf(t) for t in inputs], g)
        if dtype == torch.float32:
            _assert_rel(got, exact.to(got.dtype), 1e-5, "out")
            for a, b in zip(ggot, gexact):
                _assert_rel(a, b.to(a.dtype), 1e-5, "grad")
        else:
            own, gown = _run(ref, [_leaf(t) for t in inputs], g)
            _assert_lowp(got, exact, own, "out")
            for a, b, c in zip(ggot, gexact, gown):
                _assert_lowp(a, b, c, "grad")


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("N,B,layers", [(883, 4, 1), (207, 8, 2)])
def test_himnet_triton_matches_reference_real_size(N, B, layers):
    torch.manual_seed(0)
    kw = dict(num_nodes=N, num_layers=layers)
    ref = RefHimNet(**kw).to(CUDA).eval()
    model = hf.HimNet(**kw, backend="triton", dense_graph=False).to(CUDA).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B, 12, N, 3, device=CUDA)
    x[..., 1] = torch.rand(B, 12, N, device=CUDA) * 0.99
    x[..., 2] = torch.randint(0, 7, (B, 12, N), device=CUDA).float()
    y_cov = torch.rand(B, 12, N, 2, device=CUDA)
    g = torch.randn(B, 12, N, 1, device=CUDA)
    y, y_ref = model(x, y_cov), ref(x, y_cov)
    _assert_rel(y, y_ref.to(y.dtype), 1e-4, "HimNet output")
    grads = torch.autograd.grad(y, list(model.parameters()), g)
    grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        _assert_rel(a, b.to(a.dtype), 1e-4, name)
