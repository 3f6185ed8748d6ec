"""himnet_fast.partition: METIS parts, contiguity, padding, determinism, balance, fallbacks."""
import math
import sys

import numpy as np
import pytest
import torch

from himnet_fast import partition as part_mod
from himnet_fast.partition import partition_graph

HAS_METIS = True
try:
    import pymetis  # noqa: F401
except ImportError:
    HAS_METIS = False
needs_metis = pytest.mark.skipif(not HAS_METIS, reason="pymetis not installed (pip install himnet_fast[sba])")


def grid_edges(h, w):
    idx = np.arange(h * w).reshape(h, w)
    right = np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()])
    down = np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()])
    return np.concatenate([right, down], 1), h * w


def check_partition(p, n, P):
    assert p.num_nodes == n and p.num_parts == P
    # every node in exactly one part
    assert sorted(p.order.tolist()) == list(range(n))
    assert torch.equal(p.inverse[p.order], torch.arange(n))
    assert int(p.sizes.sum()) == n and p.offsets[-1] == n
    # contiguity: positions offsets[p]:offsets[p+1] of the order are exactly the nodes of part p
    for q in range(P):
        run = p.order[p.offsets[q]:p.offsets[q + 1]]
        assert (p.membership[run] == q).all()
    # padding mask: the first sizes[p] slots are real, the rest padding
    assert p.max_size == int(p.sizes.max())
    assert torch.equal(p.mask.sum(1), p.sizes)
    for q in range(P):
        s = int(p.sizes[q])
        assert p.mask[q, :s].all() and not p.mask[q, s:].any()
        assert torch.equal(p.index[q, :s], p.order[p.offsets[q]:p.offsets[q] + s])
    # to_parts / from_parts round trip, zeros on padding
    x = torch.randn(2, n, 3)
    xp = p.to_parts(x)
    assert xp.shape == (2, P, p.max_size, 3)
    assert (xp[:, ~p.mask] == 0).all()
    assert torch.equal(p.from_parts(xp), x)


@needs_metis
def test_metis_grid():
    ei, n = grid_edges(20, 25)
    P = 8
    p = partition_graph(P, edge_index=ei)
    check_partition(p, n, P)
    # METIS's default imbalance tolerance is 3 %; allow 10 %
    assert int(p.sizes.max()) <= math.ceil(n / P) * 1.1
    # a grid partition cuts far fewer edges than a random one would
    m = p.membership.numpy()
    cut = (m[ei[0]] != m[ei[1]]).mean()
    assert cut < 0.2


@needs_metis
def test_metis_deterministic_and_dense_adjacency_matches_edges():
    ei, n = grid_edges(12, 13)
    a = np.zeros((n, n))
    a[ei[0], ei[1]] = 1.0
    p1 = partition_graph(5, edge_index=ei)
    p2 = partition_graph(5, edge_index=ei)
    p3 = partition_graph(5, adjacency=torch.tensor(a))
    assert torch.equal(p1.membership, p2.membership)
    assert torch.equal(p1.membership, p3.membership)
    check_partition(p3, n, 5)


def test_rcb_fallback_coords_only():
    rng = np.random.default_rng(0)
    n, P = 203, 6
    coords = rng.random((n, 2))
    p = partition_graph(P, coords=coords)
    check_partition(p, n, P)
    assert int(p.sizes.max()) - int(p.sizes.min()) <= 1
    assert torch.equal(p.membership, partition_graph(P, coords=coords).membership)
    # spatially coherent: coordinate bisection on two well separated clusters separates them
    two = np.concatenate([rng.random((50, 2)), rng.random((50, 2)) + 10])
    m = partition_graph(2, coords=two).membership
    assert m[:50].unique().numel() == 1 and m[50:].unique().numel() == 1 and m[0] != m[50]


def test_chunks_fallback_and_auto_without_edges():
    p = partition_graph(4, num_nodes=10)
    check_partition(p, 10, 4)
    assert p.membership.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    # self-loops only = no edges -> coordinate fallback
    p2 = partition_graph(3, edge_index=np.stack([np.arange(9), np.arange(9)]), coords=np.arange(9.0))
    assert p2.membership.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_missing_pymetis_raises_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymetis", None)   # makes `import pymetis` raise ImportError
    ei, _ = grid_edges(4, 4)
    with pytest.raises(ImportError, match=r"pip install himnet_fast\[sba\]"):
        partition_graph(2, edge_index=ei)
    # the fallbacks still work without it
    check_partition(partition_graph(2, edge_index=ei, coords=np.random.rand(16, 2), method="rcb"), 16, 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_parts=0, num_nodes=5), "num_parts"),
    (dict(num_parts=6, num_nodes=5), "num_parts"),
    (dict(num_parts=2), "num_nodes"),
    (dict(num_parts=2, adjacency=np.zeros((3, 4))), "adjacency"),
    (dict(num_parts=2, edge_index=np.zeros((3, 4), dtype=int)), "edge_index"),
    (dict(num_parts=2, edge_index=np.array([[0], [7]]), num_nodes=5), "edge_index"),
    (dict(num_parts=2, num_nodes=5, method="spectral"), "method"),
    (dict(num_parts=2, num_nodes=5, method="rcb"), "coords"),
    (dict(num_parts=2, num_nodes=5, method="metis"), "edges"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition_graph(**kwargs)
