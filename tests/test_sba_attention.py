"""himnet_fast.ops.block_attention: parity with a dense block-masked reference, outputs and gradients."""
import importlib

import pytest
import torch

from himnet_fast.ops.block_attention import block_attention, inter_attention, part_mean
from himnet_fast.reference import block_attention_reference

_att = importlib.import_module("himnet_fast.ops.block_attention")  # the module (the package attribute is the op)


def make(B, P, M, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, P, M, d, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(B, P, M, dv, generator=g, dtype=dtype, requires_grad=True)
    mask = torch.rand(P, M, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1] = False          # a part made only of padding
    return q, k, v, mask


def compare(q, k, v, mask, atol):
    out = block_attention(q, k, v, mask)
    ref = block_attention_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), g)
    gr = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ga, gr):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (1, 4, 7, 5, 6), (3, 2, 1, 3, 2)])
def test_parity_fp32(shape):
    q, k, v, mask = make(*shape, torch.float32)
    out = compare(q, k, v, mask, 1e-5)
    # padding never leaks: padded query rows and the all-padding part are exactly zero
    assert (out[:, ~mask] == 0).all()
    assert (out[:, -1] == 0).all()


def test_padded_keys_have_no_influence():
    q, k, v, mask = make(2, 3, 6, 4, 4, torch.float64)
    out = block_attention(q, k, v, mask)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, ~mask] = 1e6
    v2[:, ~mask] = 1e9               # padding content never enters a softmax or a product
    torch.testing.assert_close(block_attention(q, k2, v2, mask), out.detach())


def test_gradcheck_fp64_odd_sizes_and_empty_part():
    q, k, v, mask = make(2, 3, 5, 3, 2, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, c: block_attention(a, b, c, mask), (q, k, v))


def test_batch_mask_and_no_mask():
    q, k, v, _ = make(2, 2, 4, 3, 3, torch.float64)
    bm = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [1, 0, 1, 0]]], dtype=torch.bool)
    compare(q, k, v, bm, 1e-10)
    torch.testing.assert_close(block_attention(q, k, v), block_attention_reference(q, k, v))


@pytest.mark.parametrize("mb", ["0.0005", "0.00002"])
def test_chunked_matches_reference(monkeypatch, mb):
    """Tiny budgets force chunks of parts, then chunks of query rows inside one part."""
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", mb)
    B, P, M, d = 2, 5, 9, 4
    pc, qc = _att._chunks(B, P, M, d, d, 8)
    assert pc < P or qc < M
    q, k, v, mask = make(B, P, M, d, d, torch.float64, seed=2)
    compare(q, k, v, mask, 1e-10)


def test_chunk_working_set_bounded(monkeypatch):
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", "1")
    B, P, M, d = 4, 64, 512, 16
    pc, qc = _att._chunks(B, P, M, d, d, 4)
    assert 3 * B * pc * qc * M * 4 <= (1 << 20)


def test_part_mean_and_inter_attention():
    q, k, v, mask = make(2, 4, 5, 3, 3, torch.float64, seed=3)
    pm = part_mean(v, mask)
    for p in range(4):
        n = int(mask[p].sum())
        exp = v[:, p, mask[p]].mean(1) if n else torch.zeros(2, 3, dtype=torch.float64)
        torch.testing.assert_close(pm[:, p], exp)
    nonempty = mask.any(1)
    t = part_mean(q, mask), part_mean(k, mask), pm
    out = inter_attention(*t, nonempty)
    # reference: plain softmax over the non-empty part tokens
    s = (t[0] @ t[1].transpose(-1, -2)) / 3 ** 0.5
    s = s.masked_fill(~nonempty, float("-inf"))
    ref = torch.softmax(s, -1) @ t[2] * nonempty[:, None]
    torch.testing.assert_close(out, ref)
    assert torch.autograd.gradcheck(lambda a, b, c: inter_attention(a, b, c, nonempty),
                                    tuple(x.detach().requires_grad_() for x in t))


def test_bad_input():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="q must be"):
        block_attention(q[0], q, q)
    with pytest.raises(ValueError, match="k must"):
        block_attention(q, q[..., :2], q)
    with pytest.raises(ValueError, match="mask must be"):
        block_attention(q, q, q, torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask must be"):
        block_attention(q, q, q, torch.ones(3, 3, dtype=torch.bool))


# ---- Triton backend (kernels/block_attention.py), interpreter on CPU: tiny shapes only ----
from conftest import DEVICE, HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed / no interpreter")


@needs_triton
@pytest.mark.parametrize("shape, dtype, atol", [
    ((2, 3, 19, 5, 3), torch.float32, 2e-5),
    ((1, 2, 70, 4, 4), torch.float32, 2e-5),      # M > 64: several query and key blocks
    ((2, 2, 9, 3, 2), torch.float64, 1e-10),
])
def test_triton_parity(shape, dtype, atol):
    q, k, v, mask = (t.to(DEVICE) for t in make(*shape, dtype))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = block_attention(q, k, v, mask, backend="triton")
    ref = block_attention_reference(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    assert (out[:, ~mask] == 0).all() and (out[:, -1] == 0).all()
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


@needs_triton
def test_triton_gradcheck_fp64():
    q, k, v, mask = (t.to(DEVICE) for t in make(1, 2, 4, 3, 2, torch.float64, seed=5))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: block_attention(a, b, c, mask, backend="triton"),
                                    (q, k, v))


def test_backend_argument_checked():
    from himnet_fast import BackendUnavailableError

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(BackendUnavailableError, match="'cuda' does not implement block_attention"):
        block_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        block_attention(q, q, q, backend="fast")
