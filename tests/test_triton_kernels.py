"""Kernel-level tests of the "triton" backend: every op, forward and backward, against the
reference (float64 where exactness is checked).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); block edges are then 16, so the small shapes here span several tiles in
every tiled dimension and exercise masking and tile loops. What the interpreter cannot show
(real ``tl.dot`` precision modes, TF32, compiled code paths, real sizes) is covered by
tests/test_triton_gpu.py; ``test_kernels_compile_for_gpu`` (``-m slow``) compiles every
kernel to sm_80/sm_90 cubins without a GPU.

Criteria: fp32 and fp64 results match the reference within 1e-4 of the largest reference
magnitude (fp32) resp. 1e-10 (fp64). bf16/fp16 errors against an exact reference are at most
twice PyTorch's own error running the reference in that dtype (the flash-attention test rule).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import himnet_fast as hf
from himnet_fast import _backend
from himnet_fast.reference import ref_meta_linear

from conftest import DEVICE, HAS_CUDA, HAS_TRITON, tf32_matmul

_REASON = (_backend.unavailable_reason("meta_linear", "triton", DEVICE) if HAS_TRITON
           else "triton is not installed")
pytestmark = [pytest.mark.triton, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

if _REASON is None:
    from himnet_fast.kernels import adaptive_matmul as k_am
    from himnet_fast.kernels import gcru as k_gcru
    from himnet_fast.kernels import meta_linear as k_ml
    from himnet_fast.kernels import _utils as k_utils
    from himnet_fast.ops import _triton as tb

LOWP = [torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------- helpers

from parity import assert_lowp as _assert_lowp, assert_rel as _assert_rel  # noqa: E402
from parity import gate_ref as _gate_ref, leaf as _leaf, on, run as _run, update_ref as _update_ref  # noqa: E402
from parity import am_ref as _am_ref, ml_inputs as _ml_inputs  # noqa: E402
from parity import himnet_matches_the_original  # noqa: E402

TRITON = {op: on("triton", op) for op in ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update")}


# --------------------------------------------------------------------------- meta_linear

def _ml_triton(axis):
    return lambda x, q, p, pb: TRITON["meta_linear"](x, q, p, pb, axis)


def _ml_ref(axis):
    return lambda x, q, p, pb: ref_meta_linear(x, q, p, pb, axis)


@pytest.mark.parametrize("axis,B,N,I,O,D,bias", [
    # Several row, K and O tiles (interpreter blocks are 16). For "S" the rows of one query
    # are the batch, so B spans the tiles there.
    ("T", 2, 37, 21, 24, 3, True),
    ("S", 19, 3, 21, 24, 3, True),
    ("ST", 2, 37, 21, 24, 5, True),
    # Size-1 batch and nodes, D < 16, no bias.
    ("T", 1, 1, 3, 17, 2, False),
    ("S", 1, 1, 3, 17, 2, False),
    ("ST", 1, 1, 3, 17, 2, False),
    # I = K*C as in HimNet (134 = 2 * 67), D = 10: the decoder's hot path.
    ("ST", 2, 3, 134, 20, 10, True),
])
def test_meta_linear_matches_reference_fp32(axis, B, N, I, O, D, bias):
    x, q, p, pb = _ml_inputs(axis, B, N, I, O, D, bias)
    leaves64 = [_leaf(t) if t is not None else None for t in (x, q, p, pb)]
    leaves32 = [_leaf(t, torch.float32) if t is not None else None for t in (x, q, p, pb)]
    want, gwant = _run(_ml_ref(axis), leaves64, g := torch.randn(B, N, O, dtype=torch.float64))
    got, ggot = _run(_ml_triton(axis), leaves32, g.float())
    _assert_rel(got, want.float(), 1e-4, "y")
    for name, a, b in zip(("dx", "dq", "dP", "dPb"), ggot, gwant):
        _assert_rel(a, b.float(), 1e-4, name)


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_meta_linear_fp64_exact(axis):
    x, q, p, pb = _ml_inputs(axis, 2, 9, 18, 17, 2)
    g = torch.randn(2, 9, 17, dtype=torch.float64)
    want, gwant = _run(_ml_ref(axis), [_leaf(t) for t in (x, q, p, pb)], g)
    got, ggot = _run(_ml_triton(axis), [_leaf(t) for t in (x, q, p, pb)], g)
    _assert_rel(got, want, 1e-10, "y")
    for name, a, b in zip(("dx", "dq", "dP", "dPb"), ggot, gwant):
        _assert_rel(a, b, 1e-10, name)


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
@pytest.mark.parametrize("dtype", LOWP)
def test_meta_linear_low_precision(axis, dtype):
    B, N, I, O, D = 2, 9, 20, 18, 3
    x, q, p, pb = _ml_inputs(axis, B, N, I, O, D, dtype=torch.float32)
    # Exact reference on the rounded inputs: the error measured is the computation's own.
    rounded = [t.to(dtype) for t in (x, q, p, pb)]
    g = torch.randn(B, N, O).to(dtype)
    exact, gexact = _run(_ml_ref(axis), [_leaf(t, torch.float64) for t in rounded], g.double())
    own, gown = _run(_ml_ref(axis), [_leaf(t) for t in rounded], g)
    got, ggot = _run(_ml_triton(axis), [_leaf(t) for t in rounded], g)
    _assert_lowp(got, exact, own, "y")
    for name, a, b, c in zip(("dx", "dq", "dP", "dPb"), ggot, gexact, gown):
        _assert_lowp(a, b, c, name)


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_meta_linear_non_contiguous(axis):
    B, N, I, O, D = 3, 7, 18, 20, 2
    x, q, p, pb = _ml_inputs(axis, B, N, I, O, D, dtype=torch.float32)
    # Same values, strided storage: x node-major, q column-major, the pool O-major, Pb transposed.
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    qs = q.t().contiguous().t() if q.dim() == 2 else q.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    ps = p.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    pbs = pb.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (xs, qs, ps, pbs))
    g = torch.randn(B, N, O)
    want, gwant = _run(_ml_triton(axis), [_leaf(t) for t in (x, q, p, pb)], g)
    leaves = [t.detach().requires_grad_(True) for t in (xs, qs, ps, pbs)]
    got, ggot = _run(_ml_triton(axis), leaves, g)
    _assert_rel(got, want, 1e-6, "y")
    for name, a, b in zip(("dx", "dq", "dP", "dPb"), ggot, gwant):
        _assert_rel(a, b, 1e-6, name)


def test_meta_linear_dp_split_agrees():
    """dP's split-K partials are reduced in a fixed order: any split agrees with no split.
    (Run-to-run determinism cannot fail in the interpreter, which runs programs one after
    another in numpy; it is tested on the GPU in test_triton_gpu.py.)"""
    x, q, p, pb = _ml_inputs("ST", 2, 23, 18, 17, 2, dtype=torch.float32)
    dy = torch.randn(2, 23, 17)
    one = k_ml.meta_linear_backward(dy, x, q, p, pb, "ST", needs=(False, False, True, False), split=1)[2]
    three = k_ml.meta_linear_backward(dy, x, q, p, pb, "ST", needs=(False, False, True, False), split=3)[2]
    _assert_rel(three, one, 1e-6, "dP split 3 vs 1")
    full = k_ml.meta_linear_backward(dy, x, q, p, pb, "ST", split=3)
    assert torch.equal(full[2], three), "dP must not depend on which other gradients are asked for"


@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_meta_linear_zero_size(axis):
    # Empty batch: empty output, zero pool gradients.
    x, q, p, pb = _ml_inputs(axis, 0, 4, 5, 6, 2, dtype=torch.float32)
    if axis == "S":
        q = torch.randn(4, 2)
    leaves = [_leaf(t) for t in (x, q, p, pb)]
    y = TRITON["meta_linear"](*leaves, axis)
    assert y.shape == (0, 4, 6)
    y.sum().backward()
    assert torch.count_nonzero(leaves[2].grad) == 0 and torch.count_nonzero(leaves[3].grad) == 0
    # No input columns: y is the bias alone.
    x, q, p, pb = _ml_inputs(axis, 2, 4, 0, 6, 2, dtype=torch.float32)
    _assert_rel(TRITON["meta_linear"](x, q, p, pb, axis), ref_meta_linear(x, q, p, pb, axis), 1e-6, "bias only")


# --------------------------------------------------------------------------- adaptive_matmul


@pytest.mark.parametrize("G,N,D,W", [
    (1, 37, 10, 40),   # static graph, batch folded into W: several W tiles
    (3, 37, 2, 5),     # per-sample graph, D = 2 padded to 16
    (2, 1, 16, 3),     # one node
    (1, 20, 14, 33),
])
def test_adaptive_matmul_matches_reference_fp32(G, N, D, W):
    e, v = torch.randn(G, N, D, dtype=torch.float64), torch.randn(G, N, W, dtype=torch.float64)
    g = torch.randn(G, N, W, dtype=torch.float64)
    want, gwant = _run(_am_ref, [_leaf(e), _leaf(v)], g)
    got, ggot = _run(TRITON["adaptive_matmul"], [_leaf(e, torch.float32), _leaf(v, torch.float32)], g.float())
    _assert_rel(got, want.float(), 1e-4, "out")
    for name, a, b in zip(("dE", "dV"), ggot, gwant):
        _assert_rel(a, b.float(), 1e-4, name)


def test_adaptive_matmul_fp64_exact():
    e, v = torch.randn(2, 23, 6, dtype=torch.float64), torch.randn(2, 23, 9, dtype=torch.float64)
    g = torch.randn(2, 23, 9, dtype=torch.float64)
    want, gwant = _run(_am_ref, [_leaf(e), _leaf(v)], g)
    got, ggot = _run(TRITON["adaptive_matmul"], [_leaf(e), _leaf(v)], g)
    _assert_rel(got, want, 1e-10, "out")
    for name, a, b in zip(("dE", "dV"), ggot, gwant):
        _assert_rel(a, b, 1e-10, name)


def test_adaptive_matmul_non_positive_rows():
    """A row whose scores are all <= 0 is uniform (softmax of zeros) and passes no gradient
    to E (relu'(s <= 0) = 0), exactly as the reference."""
    G, N, D, W = 2, 21, 3, 7
    e = torch.randn(G, N, D, dtype=torch.float64)
    e[0, 4] = 0.0             # all scores of row 4 are exactly 0
    e[1] = 0.0                # a whole graph without a positive score
    e[0, 7] = -e[0, 3]        # row 7 has some negative scores, not all
    v = torch.randn(G, N, W, dtype=torch.float64)
    g = torch.randn(G, N, W, dtype=torch.float64)
    want, gwant = _run(_am_ref, [_leaf(e), _leaf(v)], g)
    got, ggot = _run(TRITON["adaptive_matmul"], [_leaf(e, torch.float32), _leaf(v, torch.float32)], g.float())
    _assert_rel(got, want.float(), 1e-4, "out")
    torch.testing.assert_close(got[0, 4], v[0].float().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], v[1].float().mean(0).expand(N, W), rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("dE", "dV"), ggot, gwant):
        _assert_rel(a, b.float(), 1e-4, name)
    assert torch.count_nonzero(ggot[0][1]) == 0 and torch.count_nonzero(ggot[0][0, 4]) == 0


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("G,N,D,W", [(1, 37, 10, 24), (2, 19, 16, 5)])
def test_adaptive_matmul_low_precision(dtype, G, N, D, W):
    e = (torch.randn(G, N, D) * 0.5).to(dtype)
    v = torch.randn(G, N, W).to(dtype)
    g = torch.randn(G, N, W).to(dtype)
    exact, gexact = _run(_am_ref, [_leaf(e, torch.float64), _leaf(v, torch.float64)], g.double())
    own, gown = _run(_am_ref, [_leaf(e), _leaf(v)], g)
    got, ggot = _run(TRITON["adaptive_matmul"], [_leaf(e), _leaf(v)], g)
    _assert_lowp(got, exact, own, "out")
    for name, a, b, c in zip(("dE", "dV"), ggot, gexact, gown):
        _assert_lowp(a, b, c, name)


def test_adaptive_matmul_saves_only_e_v_out_lse():
    G, N, D, W = 2, 37, 5, 6
    e, v = _leaf(torch.randn(G, N, D)), _leaf(torch.randn(G, N, W))
    out = TRITON["adaptive_matmul"](e, v)
    saved = out.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(G, N, D), (G, N, W), (G, N, W), (G, N)]
    lse = saved[3]
    assert lse.dtype == torch.float32
    ref_lse = torch.logsumexp(torch.relu(e @ e.transpose(1, 2)).double(), dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


def test_adaptive_matmul_non_contiguous_is_bitwise_the_same():
    G, N, D, W = 2, 29, 6, 20
    e, v, g = torch.randn(G, N, D), torch.randn(G, N, W), torch.randn(G, N, W)
    want, gwant = _run(TRITON["adaptive_matmul"], [_leaf(e), _leaf(v)], g)
    es = e.transpose(1, 2).contiguous().transpose(1, 2)
    vs = v.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not es.is_contiguous() and not vs.is_contiguous()
    got, ggot = _run(TRITON["adaptive_matmul"], [es.requires_grad_(True), vs.requires_grad_(True)], g)
    assert torch.equal(got, want)  # same tiles, same order: bitwise equal
    for a, b in zip(ggot, gwant):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- GCRU tail

@pytest.mark.parametrize("shape", [(2, 37, 5), (3, 1, 1, 16), (0, 4, 3)])
def test_gcru_fp32(shape):
    *lead, H = shape
    pre_big = torch.randn(*lead, 3 * H, dtype=torch.float64) * 3
    pre = pre_big[..., H:]   # non-contiguous (..., 2H) slice
    h, r = torch.randn(*shape, dtype=torch.float64), torch.rand(*shape, dtype=torch.float64)
    gz, gr = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    leaves64 = [pre.clone().requires_grad_(True), _leaf(h)]
    leaves32 = [pre_big.float()[..., H:].requires_grad_(True), _leaf(h, torch.float32)]
    assert not leaves32[0].is_contiguous() or pre.numel() == 0
    want, gwant = _run(_gate_ref, leaves64, (gz, gr))
    got, ggot = _run(TRITON["gcru_gate"], leaves32, (gz.float(), gr.float()))
    for name, a, b in zip(("zh", "r", "dpre", "dh"), list(got) + list(ggot), list(want) + list(gwant)):
        _assert_rel(a, b.detach().float(), 1e-5, name)

    c = torch.randn(*shape, dtype=torch.float64) * 3
    leaves64 = [_leaf(t) for t in (c, r, h)]
    leaves32 = [_leaf(t, torch.float32) for t in (c, r, h)]
    want, gwant = _run(_update_ref, leaves64, gz)
    got, ggot = _run(TRITON["gcru_update"], leaves32, gz.float())
    _assert_rel(got, want.float(), 1e-5, "update out")
    for a, b in zip(ggot, gwant):
        _assert_rel(a, b.float(), 1e-5, "update grad")


@pytest.mark.parametrize("dtype", LOWP)
def test_gcru_low_precision_and_extremes(dtype):
    B, N, H = 2, 13, 8
    pre = torch.cat([torch.randn(B, N, 2 * H) * 4, torch.full((B, 1, 2 * H), 80.0),
                     torch.full((B, 1, 2 * H), -80.0)], dim=1).to(dtype)  # saturating rows
    h = torch.randn(B, N + 2, H).to(dtype)
    r = torch.rand(B, N + 2, H).to(dtype)
    g = torch.randn(B, N + 2, H).to(dtype)
    exact, gexact = _run(lambda a, b: _gate_ref(a, b)[0], [_leaf(pre, torch.float64), _leaf(h, torch.float64)],
                         g.double())
    own, gown = _run(lambda a, b: _gate_ref(a, b)[0], [_leaf(pre), _leaf(h)], g)
    got, ggot = _run(lambda a, b: TRITON["gcru_gate"](a, b)[0], [_leaf(pre), _leaf(h)], g)
    _assert_lowp(got, exact, own, "zh")
    for a, b, c in zip(ggot, gexact, gown):
        assert torch.isfinite(a).all()
        _assert_lowp(a, b, c, "gate grad")
    exact, gexact = _run(_update_ref, [_leaf(t, torch.float64) for t in (pre[..., :H], r, h)], g.double())
    own, gown = _run(_update_ref, [_leaf(t) for t in (pre[..., :H], r, h)], g)
    got, ggot = _run(TRITON["gcru_update"], [_leaf(t) for t in (pre[..., :H], r, h)], g)
    _assert_lowp(got, exact, own, "h'")
    for a, b, c in zip(ggot, gexact, gown):
        assert torch.isfinite(a).all()
        _assert_lowp(a, b, c, "update grad")


# --------------------------------------------------------------------------- backend plumbing

def test_check_reasons(monkeypatch):
    assert tb.check(torch.device("meta")) is not None and "not supported" in tb.check(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = tb.check(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    if HAS_CUDA:
        assert "triton" in hf.available_backends(torch.device("cuda"))
    else:
        assert "CUDA" in tb.check(torch.device("cuda"))
        assert "triton" not in hf.available_backends(torch.device("cuda"))


def test_dot_precision_follows_torch_tf32_flag():
    with tf32_matmul(False):
        assert k_utils.dot_precision(torch.float32) == "ieee"
    with tf32_matmul(True):
        assert k_utils.dot_precision(torch.float32) == "tf32"
        assert k_utils.dot_precision(torch.bfloat16) == "ieee"
    assert not k_utils.tf32_enabled(), "the switch was not restored"


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this PyTorch has only the legacy allow_tf32 flag")
def test_dot_precision_honours_both_tf32_apis():
    """The current API (fp32_precision, after which reading allow_tf32 raises), the global
    default it inherits with "none", and the legacy flag and set_float32_matmul_precision,
    which PyTorch mirrors into the current one."""
    matmul = torch.backends.cuda.matmul
    old_matmul, old_global = matmul.fp32_precision, torch.backends.fp32_precision
    old_api = torch.get_float32_matmul_precision()
    try:
        matmul.fp32_precision = "tf32"
        assert k_utils.dot_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert k_utils.dot_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert k_utils.dot_precision(torch.float32) == "tf32"
        torch.backends.fp32_precision = "none"
        assert k_utils.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert k_utils.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert k_utils.dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(old_api)
        torch.backends.fp32_precision = old_global
        matmul.fp32_precision = old_matmul


def test_public_ops_route_to_triton_under_autocast():
    x, q, p, pb = _ml_inputs("ST", 2, 9, 12, 16, 3, dtype=torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = hf.ops.meta_linear(x, q, p, pb, "ST", backend="triton")
    assert y.dtype == torch.bfloat16
    exact = ref_meta_linear(*(t.double() for t in (x, q, p, pb)), "ST")
    own = ref_meta_linear(*(t.to(torch.bfloat16) for t in (x, q, p, pb)), "ST")
    _assert_lowp(y, exact, own, "autocast y")
    e = torch.randn(9, 4)
    xs = torch.randn(2, 9, 3)
    got = hf.ops.adaptive_propagate(xs, e, 3, backend="triton", dense=False)
    want = hf.ops.adaptive_propagate(xs, e, 3, backend="torch", dense=True)
    _assert_rel(got, want, 1e-5, "adaptive_propagate")


# --------------------------------------------------------------------------- end to end

def test_himnet_triton_matches_reference_end_to_end():
    # Small on purpose (the interpreter runs every kernel of 2 encoders + decoder, fwd + bwd);
    # real sizes are in tests/test_triton_gpu.py. Streamed graphs: the adaptive-product kernels
    # (the fused step over dense graphs is tests/test_fused_step.py's).
    himnet_matches_the_original("triton", dense_graph=False)


# --------------------------------------------------------------------------- 64-bit offsets

def test_needs_int64_threshold():
    """The encoder's "S" call at N = 100,000 (output (192, 100000, 128), 2.46e9 elements) needs
    64-bit offsets; the same call at B = 16 without the folded steps does not."""
    meta = dict(device="meta")
    assert k_utils.needs_int64(y=torch.empty(192, 100_000, 128, **meta))
    assert not k_utils.needs_int64(y=torch.empty(16, 100_000, 128, **meta), q=None)
    # Strides count, not elements: a (2, 2) view with a 2^31 row stride spans past int32.
    assert k_utils.needs_int64(t=torch.empty(2 ** 31 + 2, **meta).as_strided((2, 2), (2 ** 31, 1)))


def _with_off64(monkeypatch, on: bool):
    for mod in (k_ml, k_am, k_gcru):
        monkeypatch.setattr(mod, "needs_int64", (lambda **t: True) if on else (lambda **t: False))


def test_int64_offset_variant_is_bitwise_equal(monkeypatch):
    """Every kernel's OFF64 variant (row indices cast to int64 before the stride products, used
    when a tensor passes 2^31 elements) computes bitwise what the int32 variant computes: the
    variant is forced here on small shapes."""
    torch.manual_seed(1)
    ml_cases = [(axis, _ml_inputs(axis, 3, 18, 20, 17, 3, dtype=torch.float32)) for axis in ("T", "S", "ST")]
    e, v = torch.randn(2, 37, 5), torch.randn(2, 37, 20)
    pre, h = torch.randn(3, 5, 2 * 7), torch.randn(3, 5, 7)

    def run_all():
        outs = []
        for axis, inputs in ml_cases:
            leaves = [_leaf(t) for t in inputs]
            outs += _run(_ml_triton(axis), leaves, torch.ones(3, 18, 17))[1]
            outs.append(TRITON["meta_linear"](*inputs, axis))
        out, grads = _run(TRITON["adaptive_matmul"], [_leaf(e), _leaf(v)], v)
        outs += [out, *grads]
        pl, hl = _leaf(pre), _leaf(h)
        zh, r = TRITON["gcru_gate"](pl, hl)
        hn = TRITON["gcru_update"](pl[..., :7], r, hl)
        outs += [zh, r, hn, *torch.autograd.grad((zh * 2 + hn).sum(), [pl, hl])]
        return outs

    _with_off64(monkeypatch, False)
    want = run_all()
    _with_off64(monkeypatch, True)
    got = run_all()
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"output {i} differs between int32 and int64 offsets"


def test_adaptive_backward_tiles():
    """Backward tiling rules (GPU block sizes): W tiles that waste at most 25 % to padding where
    W is looped inside a program, and enough dE programs at N = 883 for 132 SMs."""
    import triton
    from unittest import mock
    with mock.patch.object(k_utils, "interpreting", lambda: False):
        assert k_am.w_tile(67, 64) == 16          # 80 columns for 67, not 128
        assert k_am.w_tile(1024, 32) == 32
        assert k_am.w_tile(16 * 67, 32) == 32     # 1088 = 34 x 32: no padding
        assert k_am.w_tile(8, 64) == 16           # tl.dot's minimum
        meta = torch.device("meta")
        for G in (1, 16):
            s = k_am.de_splits(G, 883, 16, 64, 32, meta)
            assert 1 <= s <= triton.cdiv(883, 32)
            assert triton.cdiv(883, 64) * G * s >= 132, (G, s)
        bm, bw = k_am._delta_blocks(1, 883, 1024, meta)
        assert bm * bw <= 2048 and triton.cdiv(883, bm) >= 132


# --------------------------------------------------------------------------- GPU compilation

_COMPILE_SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from himnet_fast.kernels import adaptive_matmul as ap, gcru as gc, meta_linear as ml

    def build(fn, ptrs, const, arch, warps=4):
        sig = {n: "constexpr" if n in const else (ptrs.get(n, ptrs["*"]) if n.endswith("_ptr") else "i32")
               for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})

    n = 0
    for arch, p, dt, prec in ((90, "*fp32", tl.float32, "ieee"), (80, "*fp32", tl.float32, "tf32"),
                              (90, "*bf16", tl.bfloat16, "ieee")):
        base = dict(PRECISION=prec, ACC=tl.float32, DOT=dt, RNE=False, OFF64=False)
        for per_row in (True, False):
            build(ml._meta_linear_fwd_kernel, {"*": p}, dict(base, PER_ROW=per_row, HAS_BIAS=True, BLOCK_M=64,
                  BLOCK_K=32, BLOCK_O=128), arch, 8)
        build(ml._meta_linear_bwd_kernel, {"*": p, "dq_ptr": "*fp32"}, dict(base, COMPUTE_DX=True, BLOCK_M=32,
              BLOCK_I=64, BLOCK_O=64, BLOCK_D=16), arch)
        build(ml._meta_linear_bwd_dp_kernel, {"*": p, "dp_ptr": "*fp32"}, dict(base, BLOCK_R=64, BLOCK_I=64,
              BLOCK_O=64), arch)
        build(ap._adaptive_matmul_fwd_kernel, {"*": p, "lse_ptr": "*fp32"}, dict(base, BLOCK_M=64, BLOCK_N=64,
              BLOCK_D=16, BLOCK_W=128), arch, 8)
        build(ap._adaptive_matmul_bwd_delta_kernel, {"*": p, "delta_ptr": "*fp32"}, dict(ACC=tl.float32,
              BLOCK_M=4, BLOCK_W=128, OFF64=False), arch)
        build(ap._adaptive_matmul_bwd_dv_kernel, {"*": p, "lse_ptr": "*fp32"}, dict(base, BLOCK_M=64, BLOCK_N=64,
              BLOCK_D=16, BLOCK_W=64), arch)
        for key_side in (False, True):
            build(ap._adaptive_matmul_bwd_de_kernel, {"*": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32",
                  "part_ptr": "*fp32"}, dict(base, KEY_SIDE=key_side, BLOCK_M=64, BLOCK_N=32, BLOCK_D=16,
                  BLOCK_W=32, EB_FIRST=p != "*fp32"), arch)
        for fn in (gc._gcru_gate_fwd_kernel, gc._gcru_gate_bwd_kernel, gc._gcru_update_fwd_kernel,
                   gc._gcru_update_bwd_kernel):
            build(fn, {"*": p}, dict(BLOCK=1024, ACC=tl.float32, RNE=False, OFF64=False), arch, 8)
        n += 13
    print("compiled", n)
""")


@pytest.mark.slow
def test_kernels_compile_for_gpu(request):
    """Every kernel compiles to a cubin for sm_80 / sm_90 (fp32 exact and TF32, bf16) with
    the GPU block sizes, without a GPU. Catches what the interpreter does not check: dot
    shape/dtype rules, constexpr branches, layouts. Minutes: run with ``-m slow``."""
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("compiles ~40 kernels (minutes); run with -m slow")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled 39" in res.stdout
