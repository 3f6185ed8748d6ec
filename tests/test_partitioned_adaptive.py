"""partitioned_adaptive_matmul (himnet_fast.ops.partitioned_adaptive) and HimNet(partition=...): parity with
the dense operator built step by step from its definition, outputs and all gradients."""
import numpy as np
import pytest
import torch

import himnet_fast as hf
from himnet_fast.ops import AdaptiveGraph, adaptive_graph, adaptive_propagate
from himnet_fast.ops import partitioned_adaptive as pa
from himnet_fast.ops.partitioned_adaptive import partitioned_adaptive_matmul
from himnet_fast.partition import _from_membership, partition_graph
from himnet_fast.reference import partitioned_adaptive_graph_reference as reference


def uneven(n, sizes, seed=0):
    """A partition of n nodes with the given part sizes (0 = an empty part), nodes shuffled."""
    memb = np.repeat(np.arange(len(sizes)), sizes)
    assert len(memb) == n
    return _from_membership(np.random.RandomState(seed).permutation(memb), len(sizes))


PARTS = {
    "uneven+empty": (23, [7, 0, 9, 6, 1]),
    "two": (11, [5, 6]),
    "singletons": (5, [1, 1, 1, 1, 1]),
}


def grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("case", list(PARTS))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_parity_with_dense_reference(case, per_sample, dtype, atol):
    n, sizes = PARTS[case]
    part = uneven(n, sizes)
    B, D, W = 3, 5, 4
    e = torch.randn(*((B,) if per_sample else ()), n, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, n, W, dtype=dtype, requires_grad=True)
    y = partitioned_adaptive_matmul(e, v, part)
    a = reference(e.double(), part)
    yr = a @ v.double()
    g = torch.randn_like(y)
    assert torch.allclose(a.sum(-1), torch.ones((), dtype=a.dtype)), "rows must be stochastic"
    torch.testing.assert_close(y.double(), yr, atol=atol, rtol=0)
    for got, want in zip(grads(y, (e, v), g), grads(yr, (e, v), g.double())):
        torch.testing.assert_close(got.double(), want.double(), atol=atol * 10, rtol=0)


def test_bf16_within_twice_torch_error():
    """bf16: the error against the fp64 reference is at most about twice that of the same
    operator evaluated by dense torch ops in bf16."""
    part = uneven(23, [7, 0, 9, 6, 1])
    e = torch.randn(23, 6, dtype=torch.float64)
    v = torch.randn(2, 23, 8, dtype=torch.float64)
    exact = reference(e, part) @ v
    got = partitioned_adaptive_matmul(e.bfloat16(), v.bfloat16(), part).double()
    torch_bf16 = (reference(e.bfloat16(), part) @ v.bfloat16()).double()
    err, base = (got - exact).abs().max(), (torch_bf16 - exact).abs().max()
    assert got.dtype == torch.float64 and err <= 2 * base + 1e-3, (err, base)
    eb, vb = e.bfloat16().requires_grad_(), v.bfloat16().requires_grad_()
    de, dv = torch.autograd.grad(partitioned_adaptive_matmul(eb, vb, part).float().sum(), (eb, vb))
    e64, v64 = e.clone().requires_grad_(), v.clone().requires_grad_()
    de_r, dv_r = torch.autograd.grad((reference(e64, part) @ v64).sum(), (e64, v64))
    torch.testing.assert_close(de.double(), de_r, atol=0.1, rtol=0.05)
    torch.testing.assert_close(dv.double(), dv_r, atol=0.05, rtol=0.05)


def test_gradcheck_fp64():
    part = uneven(9, [4, 0, 3, 2])
    e = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, v: partitioned_adaptive_matmul(e, v, part), (e, v))


@pytest.mark.parametrize("per_sample", [False, True])
def test_one_part_is_the_exact_adaptive_graph(per_sample):
    n = 17
    part = partition_graph(1, num_nodes=n)
    e = torch.randn(*((2,) if per_sample else ()), n, 6, requires_grad=True)
    v = torch.randn(2, n, 3, requires_grad=True)
    y = partitioned_adaptive_matmul(e, v, part)
    yr = adaptive_graph(e) @ v
    g = torch.randn_like(y)
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads(y, (e, v), g), grads(yr, (e, v), g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # and through the graph holder the model uses, Chebyshev terms included
    z = adaptive_propagate(v, e, 3, dense=False)
    zp = AdaptiveGraph(e, partition=part).propagate(v, 3)
    torch.testing.assert_close(zp, z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mb", ["1e-6", "0.002"])
def test_chunked_over_parts_matches(monkeypatch, mb):
    """Tiny chunk budgets: one part per chunk, and a few parts per chunk (a ragged last one)."""
    part = uneven(23, [7, 0, 9, 6, 1])
    e = torch.randn(2, 23, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 23, 4, dtype=torch.float64, requires_grad=True)
    y0 = partitioned_adaptive_matmul(e, v, part)
    g0 = grads(y0, (e, v), torch.ones_like(y0))
    monkeypatch.setenv("HIMNET_FAST_CHUNK_MB", mb)
    assert pa._parts_per_chunk(2, part.max_size, part.num_parts, 8) < part.num_parts
    y1 = partitioned_adaptive_matmul(e, v, part)
    torch.testing.assert_close(y1, y0, atol=1e-13, rtol=0)
    for a, b in zip(grads(y1, (e, v), torch.ones_like(y1)), g0):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_chunk_working_set_bounded():
    # 64 MiB budget, parts of 1,000 nodes and 1,000 parts (N = 1M): a few parts per chunk,
    # not all 1,000 (which would be 1,000 x 1,000 x 2,000 scores)
    c = pa._parts_per_chunk(1, 1000, 1000, 4)
    assert 1 <= c <= 4


def test_bad_input():
    part = uneven(11, [5, 6])
    e, v = torch.randn(11, 4), torch.randn(2, 11, 3)
    with pytest.raises(ValueError, match="partition covers 10 nodes"):
        partitioned_adaptive_matmul(e, v, uneven(10, [5, 5]))
    with pytest.raises(ValueError, match="partition must be a Partition \\(from himnet_fast.sba.partition_graph\\)"):
        partitioned_adaptive_matmul(e, v, [0, 1])
    with pytest.raises(ValueError, match="v has 10 nodes"):
        partitioned_adaptive_matmul(e, torch.randn(2, 10, 3), part)
    with pytest.raises(ValueError, match="v has batch 2"):
        partitioned_adaptive_matmul(torch.randn(3, 11, 4), v, part)
    with pytest.raises(ValueError, match="embedding must have 2 or 3 dimensions"):
        partitioned_adaptive_matmul(torch.randn(11), v, part)
    with pytest.raises(ValueError, match="dense=True cannot be combined with partition"):
        AdaptiveGraph(e, dense=True, partition=part)
    with pytest.raises(ValueError, match="torch implementation only"):
        AdaptiveGraph(e, backend="triton", partition=part)
    with pytest.raises(ValueError, match="partition covers 11 nodes, expected N=12"):
        hf.HimNet(12, hidden_dim=4, partition=part)
    with pytest.raises(ValueError, match="dense_graph=True cannot be combined"):
        hf.HimNet(11, hidden_dim=4, partition=part, dense_graph=True)


def small_himnet(n, seed=0, **kw):
    torch.manual_seed(seed)
    return hf.HimNet(n, hidden_dim=6, out_steps=3, node_embedding_dim=4, st_embedding_dim=4,
                     tod_embedding_dim=2, dow_embedding_dim=2, **kw).double()


def himnet_inputs(n, B=2, T=3, out_steps=3):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, T, n, 3, generator=g, dtype=torch.float64)
    x[..., 2] = torch.randint(0, 7, (B, T, n), generator=g)
    y_cov = torch.rand(B, out_steps, n, 2, generator=g, dtype=torch.float64)
    y_cov[..., 1] = torch.randint(0, 7, (B, out_steps, n), generator=g)
    return x, y_cov


def run_step(model, x, y_cov):
    out = model(x, y_cov)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_himnet_partitioned_matches_dense_reference_operator(monkeypatch):
    """HimNet(partition=part) against the same weights with both graphs replaced by the dense
    reference operator (encoders' shared graph and the decoder's per-sample graph): forecast
    and every parameter's gradient."""
    import himnet_fast.nn.himnet as himnet_mod

    n = 13
    part = uneven(n, [5, 0, 4, 4])
    x, y_cov = himnet_inputs(n)
    model = small_himnet(n, partition=part).eval()
    got, g_got = run_step(model, x, y_cov)
    assert model.state_dict().keys() == small_himnet(n).state_dict().keys()

    class DenseReference:
        def __new__(cls, embedding, **kw):
            assert kw["partition"] is part
            return AdaptiveGraph.from_support(reference(embedding, part))

    model.zero_grad()
    monkeypatch.setattr(himnet_mod, "AdaptiveGraph", DenseReference)
    want, g_want = run_step(model, x, y_cov)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], atol=1e-9, rtol=1e-7, msg=k)


def test_himnet_one_part_equals_default():
    n = 10
    x, y_cov = himnet_inputs(n)
    base = small_himnet(n).train(False)
    part = small_himnet(n, partition=partition_graph(1, num_nodes=n)).train(False)
    part.load_state_dict(base.state_dict(), strict=True)
    y0, g0 = run_step(base, x, y_cov)
    y1, g1 = run_step(part, x, y_cov)
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-10, rtol=1e-8, msg=k)
