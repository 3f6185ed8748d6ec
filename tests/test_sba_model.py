"""himnet_fast.models.sba: Laplacian PE, SBATransformer shapes, input checks, a training smoke test."""
import numpy as np
import pytest
import torch

from himnet_fast.sba import SBATransformer
from himnet_fast.models.sba import fix_signs, laplacian_pe

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    import pymetis  # noqa: F401
    HAS_METIS = True
except ImportError:
    HAS_METIS = False


def path_edges(n):
    i = np.arange(n - 1)
    return np.stack([i, i + 1])


def norm_lap(n, ei):
    a = np.zeros((n, n))
    a[ei[0], ei[1]] = a[ei[1], ei[0]] = 1
    d = a.sum(1)
    di = 1 / np.sqrt(d)
    return np.eye(n) - di[:, None] * a * di[None, :]


def test_laplacian_pe_dense_is_eigenvectors():
    n, k = 30, 4
    ei = path_edges(n)
    pe = laplacian_pe(n, ei, k).double().numpy()
    L = norm_lap(n, ei)
    vals = np.linalg.eigvalsh(L)[1:1 + k]
    for j in range(k):
        np.testing.assert_allclose(L @ pe[:, j], vals[j] * pe[:, j], atol=1e-5)
        # sign fixed: the largest-magnitude entry is positive
        assert pe[np.abs(pe[:, j]).argmax(), j] > 0


def test_laplacian_pe_iterative_fallback_matches_dense():
    n, k = 12, 2
    ei = path_edges(n)
    exact = laplacian_pe(n, ei, k)
    approx = laplacian_pe(n, ei, k, dense_max=1, iters=1000)
    torch.testing.assert_close(approx, exact, atol=1e-3, rtol=0)


def test_fix_signs_breaks_ties_by_first_index():
    # an antisymmetric vector: |v[1]| == |v[4]|; rounding noise on either side must not flip it
    base = np.array([0.1, 0.5, 0.2, -0.2, -0.5, -0.1])
    for eps in (0.0, 1e-9, -1e-9):
        v = base.copy()
        v[4] -= eps
        for s in (1.0, -1.0):
            out = fix_signs((s * v)[:, None])[:, 0]
            assert out[1] > 0 and out[4] < 0
    # a clear maximum still decides, wherever it is
    assert fix_signs(np.array([[0.1], [-0.9], [0.3]]))[1, 0] > 0
    assert (fix_signs(np.zeros((3, 1))) == 0).all()


def test_laplacian_pe_iterative_sign_independent_of_start():
    # the path's eigenvectors have tied extremes; the start vector (seed) must not flip signs
    n, k = 12, 2
    ei = path_edges(n)
    exact = laplacian_pe(n, ei, k)
    for seed in range(4):
        approx = laplacian_pe(n, ei, k, dense_max=1, iters=1000, seed=seed)
        torch.testing.assert_close(approx, exact, atol=1e-3, rtol=0)


def test_laplacian_pe_without_edges_is_zero():
    assert (laplacian_pe(5, None, 3) == 0).all()
    assert laplacian_pe(3, path_edges(3), 8)[:, 2:].abs().sum() == 0   # only N-1 non-trivial


def _model(n=60, **kw):
    ei = path_edges(n)
    if HAS_METIS:
        return SBATransformer(n, edge_index=ei, **kw)
    return SBATransformer(n, coords=np.arange(n, dtype=float), **kw)


def test_forward_shape_and_default_parts():
    m = _model(in_steps=6, out_steps=3, input_dim=1, d_model=16, heads=2, parts=(8, 3, 1), pe_dim=4)
    y = m(torch.randn(2, 6, 60, 3))
    assert y.shape == (2, 3, 60, 1)
    assert SBATransformer(2000, coords=np.random.rand(2000, 2), d_model=8, heads=2).parts == (125, 32, 8)


def test_output_does_not_depend_on_padding_or_other_batch():
    torch.manual_seed(0)
    m = _model(d_model=16, heads=2, parts=(7, 3, 1), in_steps=4, out_steps=2)
    x = torch.randn(3, 4, 60, 1)
    full = m(x)
    torch.testing.assert_close(m(x[1:2]), full[1:2], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(full).all()


def test_training_smoke_loss_decreases():
    torch.manual_seed(0)
    n = 40
    m = _model(n, in_steps=4, out_steps=2, d_model=16, heads=2, parts=(6, 3, 1), pe_dim=4)
    x = torch.randn(8, 4, n, 1)
    y = x[:, -2:] * 0.5 + 0.1          # a learnable target
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.l1_loss(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kw, match", [
    (dict(parts=(2, 5, 1)), "non-increasing"),
    (dict(parts=(2, 1)), "one part count per block"),
    (dict(d_model=10, heads=4), "divisible"),
    (dict(pe_dim=-1), "pe_dim"),
    (dict(heads=0), "heads"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SBATransformer(20, coords=np.arange(20.0), **kw)


def test_bad_input_shape():
    m = SBATransformer(10, coords=np.arange(10.0), parts=(2, 1, 1), d_model=8, heads=2, in_steps=3)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 4, 10, 1))
    with pytest.raises(ValueError, match="adjacency must be"):
        SBATransformer(10, adjacency=np.ones((9, 9)))
