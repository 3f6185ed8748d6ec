"""adaptive_propagate / adaptive_graph against the reference (dense supports with identity)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import himnet_fast as hf
from himnet_fast.reference import ref_adaptive_graph, ref_adaptive_propagate

from conftest import parity_backends, rel_err as _rel

BACKENDS = parity_backends()


def _check(x, e, k, **kw):
    y = hf.ops.adaptive_propagate(x, e, k, **kw)
    y_ref = ref_adaptive_propagate(x, e, k)
    assert y.shape == y_ref.shape == (x.shape[0], x.shape[1], k * x.shape[2])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(y.shape)
    got = torch.autograd.grad(y, (x, e), g)
    want = torch.autograd.grad(y_ref, (x, e), g)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("cheb_k", [2, 3, 4])
@pytest.mark.parametrize("B,N,C,D", [(1, 1, 3, 2), (3, 37, 5, 10), (4, 4, 7, 3)])
def test_streamed_matches_reference(backend, per_sample, cheb_k, B, N, C, D):
    x = torch.randn(B, N, C, requires_grad=True)
    e = torch.randn(*((B,) if per_sample else ()), N, D, requires_grad=True)
    _check(x, e, cheb_k, backend=backend, dense=False)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("cheb_k", [2, 3])
def test_dense_matches_reference(per_sample, cheb_k):
    x = torch.randn(3, 37, 5, requires_grad=True)
    e = torch.randn(*((3,) if per_sample else ()), 37, 6, requires_grad=True)
    _check(x, e, cheb_k, backend="torch", dense=True)


def test_row_blocks(monkeypatch):
    """Several row blocks (forward and backward) give the same result as one."""
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", "0.002")
    x = torch.randn(2, 53, 4, requires_grad=True)
    e = torch.randn(53, 5, requires_grad=True)
    _check(x, e, 3, backend="torch", dense=False)


@pytest.mark.parametrize("dense", [True, False])
def test_non_positive_rows_are_uniform(dense):
    """A row whose scores are all <= 0 becomes uniform (softmax of zeros), as in the original."""
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # row 1 scores: -1, 1, 0 -> relu 0,1,0
    e[1] = torch.tensor([-1.0, 0.0])
    a = hf.ops.adaptive_graph(torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(a, torch.full((2, 2), 0.5))
    x = torch.randn(1, 3, 2, requires_grad=True)
    e.requires_grad_(True)
    _check(x, e, 2, backend="torch", dense=dense)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_float64(dense, per_sample):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(*((2,) if per_sample else ()), 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: hf.ops.adaptive_propagate(a, b, 3, backend="torch", dense=dense), (x, e))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    x = torch.randn(5, 9, 3).permute(2, 1, 0)  # (3, 9, 5)
    e = torch.randn(4, 9).t()                 # (9, 4)
    assert not x.is_contiguous() and not e.is_contiguous()
    torch.testing.assert_close(hf.ops.adaptive_propagate(x, e, 3, backend=backend, dense=False),
                               ref_adaptive_propagate(x, e, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("chunk_mb", [None, "0.0005"])
def test_dense_graph_gradient_blocks(monkeypatch, per_sample, chunk_mb):
    """The dense graph's own backward (scores and ReLU mask recomputed per row block) against
    autograd through the reference, in one block and in many; e has negative scores so the
    mask matters."""
    if chunk_mb:
        monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", chunk_mb)   # a few rows per block
    e = torch.randn(*((3,) if per_sample else ()), 29, 4, dtype=torch.float64, requires_grad=True)
    a, a_ref = hf.ops.adaptive_graph(e), ref_adaptive_graph(e)
    torch.testing.assert_close(a, a_ref)
    assert (e.detach() @ e.detach().transpose(-1, -2) < 0).any()
    g = torch.randn(a.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(a, e, g)[0], torch.autograd.grad(a_ref, e, g)[0])


@pytest.mark.parametrize("per_sample", [False, True])
def test_dense_graph_gradient_accumulates_over_uses(per_sample):
    """A training graph used by many products (the cell's steps) sums their gradients: the result
    must equal plain autograd through the reference, also for a second backward through the
    same graph and with one use of the matrix outside the propagation."""
    B, N = 3, 11
    e = torch.randn(*((B,) if per_sample else ()), N, 4, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(B, N, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    graph = hf.ops.AdaptiveGraph(e, dense=True, backend="torch")
    a_ref = ref_adaptive_graph(e)

    def loss(apply, a):
        out = apply(xs[0], 2).sum() + (apply(xs[1], 3) ** 2).sum()
        return out + (torch.matmul(a, xs[2]) ** 3).sum()     # a plain use of the matrix

    got = loss(graph.propagate, graph.matrix)
    want = loss(lambda x, k: ref_adaptive_propagate(x, e, k), a_ref)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want, [e, *xs])
    for _ in range(2):   # retain_graph: a second backward through the same graph
        gg = torch.autograd.grad(got, [e, *xs], retain_graph=True)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b)


def test_dense_graph_bf16_gradients():
    """Autocast bf16 through the dense graph: the gradient of E within bf16 rounding of fp64."""
    x = torch.randn(2, 37, 8, requires_grad=True)
    e = torch.randn(2, 37, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hf.ops.adaptive_propagate(x, e, 3, dense=True, backend="torch")
    g = torch.randn(y.shape)
    ge = torch.autograd.grad(y.float(), e, g)[0]
    ed = e.detach().double().requires_grad_(True)
    ge_exact = torch.autograd.grad(ref_adaptive_propagate(x.detach().double(), ed, 3), ed, g.double())[0]
    assert _rel(ge.double(), ge_exact) < 3e-2


def test_adaptive_graph_matches_reference():
    e = torch.randn(2, 7, 3)
    torch.testing.assert_close(hf.ops.adaptive_graph(e), ref_adaptive_graph(e))
    torch.testing.assert_close(hf.ops.adaptive_graph(e[0]), ref_adaptive_graph(e[0]))


def test_zero_size_batch():
    y = hf.ops.adaptive_propagate(torch.randn(0, 4, 3), torch.randn(4, 2), 2, dense=False)
    assert y.shape == (0, 4, 6)


def test_autocast_bf16():
    x, e = torch.randn(2, 37, 8), torch.randn(37, 16)
    exact = ref_adaptive_propagate(x.double(), e.double(), 3)
    own = ref_adaptive_propagate(x.bfloat16(), e.bfloat16(), 3)
    for dense in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = hf.ops.adaptive_propagate(x, e, 3, dense=dense, backend="torch")
        assert y.dtype == torch.bfloat16
        err = (y.double() - exact).abs().max().item()
        assert err <= 2 * (own.double() - exact).abs().max().item() + 1e-3


@pytest.mark.parametrize("bad,match", [
    (dict(cheb_k=1), "cheb_k must be >= 2"),
    (dict(cheb_k=2.0), "cheb_k must be an int"),
    (dict(x=torch.randn(2, 5, 3)), "x has 5 nodes"),
    (dict(x=torch.randn(4, 3)), "x must have 3 dimensions"),
    (dict(embedding=torch.randn(3, 4, 2)), "x has batch 2"),
    (dict(embedding=torch.randn(4)), "embedding must have 2 or 3 dimensions"),
    (dict(x=torch.ones(2, 4, 3, dtype=torch.int64)), "floating-point"),
    (dict(backend="cuda-fast"), "backend must be one of"),
])
def test_bad_input(bad, match):
    args = dict(x=torch.randn(2, 4, 3), embedding=torch.randn(4, 2), cheb_k=2)
    backend = bad.pop("backend", None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        hf.ops.adaptive_propagate(args["x"], args["embedding"], args["cheb_k"], backend=backend, dense=False)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch, himnet_fast as hf
    torch.manual_seed(0)
    N, C, D = {n}, 8, 16
    x = torch.randn(1, N, C, requires_grad=True)
    e = (torch.randn(N, D) / 2).requires_grad_(True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y = hf.ops.adaptive_propagate(x, e, 2)       # automatic: too big for dense -> streamed
    y.square().sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(extra_mb=(peak - base) / 1024, finite=bool(torch.isfinite(e.grad).all()))))
""")


def test_large_graph_memory_is_lean():
    """20,000 nodes: the dense graph alone would be 1.6 GB; the streamed path (chosen
    automatically) must train (forward + backward) in well under that."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(n=20000)], capture_output=True,
                         text=True, timeout=600, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["finite"]
    assert res["extra_mb"] < 600, res
