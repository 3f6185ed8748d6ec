"""ops.gcru_cell (one GCRU step, recomputed in backward) against the reference step."""
import importlib

import pytest
import torch

from conftest import parity_backends

from himnet_fast.nn.gcru import HimEncoder, HimGCRU
from himnet_fast.ops import AdaptiveGraph, gcru_cell
from himnet_fast.reference import RefHimEncoder, RefHimGCRU, _ref_propagate_support, ref_adaptive_graph


def _split_rows(cheb_k, c, h, device):
    """Rows of a k-major ``cat(x, h)`` weight that multiply x and h: row ``k*(c+h) + j`` is an
    x row for ``j < c``."""
    ix = [k * (c + h) + j for k in range(cheb_k) for j in range(c)]
    ih = [k * (c + h) + c + j for k in range(cheb_k) for j in range(h)]
    return torch.tensor(ix, device=device), torch.tensor(ih, device=device)


def _rel(got, want):
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _case(axis, B=3, N=7, C=2, H=5, D=4, k=2, dtype=torch.float64, seed=0):
    """A reference cell and inputs; the op's arguments derived from the same parameters."""
    torch.manual_seed(seed)
    ref = RefHimGCRU(N, C, H, k, D, axis).to(dtype)
    with torch.no_grad():  # non-zero bias pools so the bias path is checked
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, N, C, dtype=dtype)
    h = torch.randn(B, N, H, dtype=dtype)
    e_graph = torch.randn(N, 3, dtype=dtype) * 0.7
    emb = {"S": torch.randn(N, D), "T": torch.randn(B, D), "ST": torch.randn(B, N, D)}[axis].to(dtype)
    emb.requires_grad_(True)
    return ref, x, h, e_graph, emb


def _op_args(ref, x, e_graph, emb, axis, k, streamed_graph=False):
    """zx, graph, gate, update, query for gcru_cell, from the reference cell's pools."""
    C, H = x.shape[-1], ref.hidden_dim
    ix, ih = _split_rows(k, C, H, x.device)
    graph = AdaptiveGraph(e_graph, dense=not streamed_graph, backend="torch")
    zx = _ref_propagate_support(x, ref_adaptive_graph(e_graph), k)
    parts = []
    for gcn in (ref.gate, ref.update):
        ws = []
        for rows in (ix, ih):
            pool = gcn.weights_pool[:, rows]
            ws.append({"T": lambda: torch.einsum("bd,dio->bio", emb, pool),
                       "S": lambda: torch.einsum("nd,dio->nio", emb, pool),
                       "ST": lambda: pool}[axis]())
        bias = torch.einsum("...d,do->...o", emb, gcn.bias_pool)
        parts.append((ws[0], ws[1], bias))
    return zx, graph, parts[0], parts[1], (emb if axis == "ST" else None)


@pytest.mark.parametrize("axis", ["S", "T", "ST"])
@pytest.mark.parametrize("recompute", [True, False])
def test_cell_matches_reference_step(axis, recompute):
    """Output and every gradient (x, h, graph embedding, query, both pools) vs RefHimGCRU."""
    k = 2
    ref, x, h, e_graph, emb = _case(axis, dtype=torch.float32)
    leaves = [x, h, e_graph, emb] + list(ref.parameters())
    for t in leaves:
        t.requires_grad_(True)
    want = ref(x, h, ref_adaptive_graph(e_graph), emb)
    dy = torch.randn_like(want)
    want_g = torch.autograd.grad(want, leaves, dy)
    zx, graph, gate, update, q = _op_args(ref, x, e_graph, emb, axis, k)
    got = gcru_cell(zx, h, graph, gate, update, cheb_k=k, axis=axis, query=q, backend="torch",
                    recompute=recompute)
    assert _rel(got, want) < 1e-5
    got_g = torch.autograd.grad(got, leaves, dy)
    for g, w in zip(got_g, want_g):
        assert _rel(g, w) < 1e-4


@pytest.mark.parametrize("axis,streamed_graph", [("S", False), ("T", False), ("ST", False), ("ST", True)])
def test_gradcheck_fp64(axis, streamed_graph):
    k = 3  # odd term count: exercises T_2 = 2 A T_1 - T_0
    ref, x, h, e_graph, emb = _case(axis, B=2, N=4, C=2, H=2, D=2, k=k)
    zx, graph, gate, update, q = _op_args(ref, x, e_graph, emb, axis, k, streamed_graph)
    base = [zx, h, graph.embedding, *gate, *update] + ([q] if q is not None else [])
    ins = tuple(t.detach().clone().requires_grad_(True) for t in base)

    def f(zx_, h_, e_, *rest):
        g = AdaptiveGraph(e_, dense=not streamed_graph, backend="torch")
        return gcru_cell(zx_, h_, g, rest[0:3], rest[3:6], cheb_k=k, axis=axis,
                         query=rest[6] if len(rest) > 6 else None, backend="torch")

    assert torch.autograd.gradcheck(f, ins, fast_mode=True)


@pytest.mark.parametrize("axis", ["S", "T", "ST"])
def test_fp32_grads_match_fp64(axis):
    """fp32 recompute gradients against fp64 plain-autograd ones (a finite-difference
    gradcheck is meaningless in fp32)."""
    ref, x, h, e_graph, emb = _case(axis, B=2, N=6, C=3, H=4, D=3)
    zx, graph, gate, update, q = _op_args(ref, x, e_graph, emb, axis, 2)
    base = [zx, h, *gate, *update] + ([q] if q is not None else [])
    grads = {}
    for dt, rc in ((torch.float64, False), (torch.float32, True)):
        ins = [t.detach().to(dt).requires_grad_(True) for t in base]
        g = AdaptiveGraph.from_support(graph.matrix.detach().to(dt))
        out = gcru_cell(ins[0], ins[1], g, ins[2:5], ins[5:8], axis=axis,
                        query=ins[8] if q is not None else None, recompute=rc)
        grads[dt] = torch.autograd.grad(out.sum(), ins)
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        assert _rel(a.double(), b) < 1e-4


@pytest.mark.parametrize("axis", ["S", "T"])
def test_encoder_odd_shapes_and_saved_memory(axis):
    """Encoder with cheb_k=3 and odd sizes vs the reference (outputs, all grads); with
    recompute its saved tensors are a fraction of plain autograd's."""
    B, T, N, C, H, D = 16, 5, 11, 3, 7, 5
    torch.manual_seed(1)
    ref = RefHimEncoder(N, C, H, 3, 1, D, axis)
    enc = HimEncoder(N, C, H, 3, 1, D, axis, backend="torch")
    enc.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, N, C)
    e_graph = torch.randn(N, 4) * 0.5
    emb = torch.randn(N, D) if axis == "S" else torch.randn(B, D)
    want, _ = ref(x, ref_adaptive_graph(e_graph), emb)
    want.square().sum().backward()
    saved = {}
    for recompute in (True, False):
        enc.cells[0].recompute = recompute
        enc.zero_grad()
        nbytes = {}

        def pack(t):  # bytes of distinct storages kept for backward
            st = t.untyped_storage()
            nbytes[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            got, _ = enc(x, AdaptiveGraph(e_graph, dense=True), emb)
        saved[recompute] = sum(nbytes.values())
        assert _rel(got, want) < 1e-5
        got.square().sum().backward()
        for (name, p), q in zip(enc.named_parameters(), ref.parameters()):
            assert _rel(p.grad, q.grad) < 1e-4, name
    assert saved[True] < 0.6 * saved[False], saved


def test_module_step_uses_op_and_matches_reference():
    """HimGCRU.forward (the decoder's step) with a per-sample graph, axis ST."""
    torch.manual_seed(2)
    B, N, C, H, D = 2, 9, 3, 6, 4
    ref = RefHimGCRU(N, C, H, 2, D, "ST")
    cell = HimGCRU(N, C, H, 2, D, "ST", backend="torch")
    cell.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, N, C), torch.randn(B, N, H, requires_grad=True)
    e = (torch.randn(B, N, D) * 0.5).requires_grad_(True)
    sup = ref_adaptive_graph(e)
    want = ref(x, h, sup, e)
    gw = torch.autograd.grad(want.sum(), [h, e] + list(ref.parameters()))
    got = cell(x, h, AdaptiveGraph(e, dense=True), e)
    assert got.grad_fn is not None and "himnet_fast_gcru_cell" in type(got.grad_fn).__name__
    gg = torch.autograd.grad(got.sum(), [h, e] + list(cell.parameters()))
    assert _rel(got, want) < 1e-5
    for a, b in zip(gg, gw):
        assert _rel(a, b) < 1e-4


def test_bad_input_names_argument():
    ref, x, h, e_graph, emb = _case("S", dtype=torch.float32)
    zx, graph, gate, update, _ = _op_args(ref, x, e_graph, emb, "S", 2)
    with pytest.raises(ValueError, match="zx"):
        gcru_cell(zx[:, :, :3], h, graph, gate, update, axis="S")
    with pytest.raises(ValueError, match=r"gate\[w_h\]"):
        gcru_cell(zx, h, graph, (gate[0], update[1], gate[2]), update, axis="S")
    with pytest.raises(ValueError, match=r"update\[bias\]"):
        gcru_cell(zx, h, graph, gate, (update[0], update[1], gate[2]), axis="S")
    with pytest.raises(ValueError, match="query"):
        gcru_cell(zx, h, graph, gate, update, axis="ST")
    with pytest.raises(ValueError, match="graph has"):
        gcru_cell(zx, h, torch.eye(4), gate, update, axis="S")


def test_pooled_s_equals_materialized_s():
    """Axis "S" given as pool + query (the large-graph form) equals the materialised (N, I, O)
    weights, outputs and gradients (fp64)."""
    ref, x, h, e_graph, emb = _case("S", B=2, N=5, C=2, H=3, D=3)
    zx, graph, gate, update, _ = _op_args(ref, x, e_graph, emb, "S", 2)
    C, H = x.shape[-1], ref.hidden_dim
    ix, ih = _split_rows(2, C, H, x.device)
    pools = [(g.weights_pool[:, ix], g.weights_pool[:, ih]) for g in (ref.gate, ref.update)]
    q = emb  # the same leaf as the biases' query, so d/d emb sums both paths in both forms
    hh = h.detach().clone().requires_grad_(True)
    got = gcru_cell(zx, hh, graph, (*pools[0], gate[2]), (*pools[1], update[2]), axis="S", query=q)
    h2 = h.detach().clone().requires_grad_(True)
    want = gcru_cell(zx, h2, graph, gate, update, axis="S")
    assert _rel(got, want) < 1e-10
    leaves = [ref.gate.weights_pool, ref.update.weights_pool]
    gg = torch.autograd.grad(got.sum(), leaves + [q, hh], retain_graph=True)
    gw = torch.autograd.grad(want.sum(), leaves + [emb, h2])
    for a, b in zip(gg, gw):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("backend", parity_backends())
@pytest.mark.parametrize("axis", ["S", "ST"])
def test_backends_inside_the_recompute(backend, axis):
    """The recompute Function runs the registered ops of the chosen backend (Triton in the
    interpreter on CPU): outputs and gradients equal plain autograd on the torch backend."""
    ref, x, h, e_graph, emb = _case(axis, B=2, N=5, C=2, H=4, D=2, dtype=torch.float32)
    zx, _, gate, update, q = _op_args(ref, x, e_graph, emb, axis, 2)
    base = [zx, h, e_graph, *gate, *update] + ([q] if q is not None else [])
    res = {}
    for be, rc in ((backend, True), ("torch", False)):
        ins = [t.detach().clone().requires_grad_(True) for t in base]
        g = AdaptiveGraph(ins[2], dense=False, backend=be)  # streamed: the backend's propagation
        out = gcru_cell(ins[0], ins[1], g, ins[3:6], ins[6:9], axis=axis,
                        query=ins[9] if q is not None else None, backend=be, recompute=rc)
        res[be, rc] = (out, torch.autograd.grad(out.square().sum(), ins))
    (o1, g1), (o2, g2) = res[backend, True], res["torch", False]
    assert _rel(o1, o2) < 1e-5
    for a, b in zip(g1, g2):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("shape", [(6, 3), (2, 5, 3)])
def test_dense_graph_gradcheck(shape):
    """The dense graph's relu-softmax saves probabilities and a mask only: fp64 gradcheck,
    with negative scores present so the ReLU mask matters."""
    from himnet_fast.ops import adaptive_graph

    e = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    s = e @ e.transpose(-1, -2)
    assert (s < 0).any()
    assert torch.autograd.gradcheck(adaptive_graph, (e,))


def test_cpu_heap_release(monkeypatch):
    """release_cpu_heap trims only on CPU, only above its threshold, and never when disabled;
    a recomputed sequence calls it once per step in forward and in backward, and gives
    bitwise the same outputs and grads with trimming on and off."""
    import sys

    from himnet_fast.ops import _common

    cell_mod = sys.modules["himnet_fast.ops.gcru_cell"]
    cpu = torch.device("cpu")
    monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_EVERY", "1")
    assert not _common.release_cpu_heap(torch.device("meta"))
    monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_MB", "0")
    assert not _common.release_cpu_heap(cpu)
    monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_MB", "1e12")       # more than any heap
    assert not _common.release_cpu_heap(cpu)
    if _common._glibc():
        monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_MB", "0.001")  # 1 KiB free is enough
        junk = [torch.empty(1000) for _ in range(100)]
        del junk
        assert _common.release_cpu_heap(cpu)
        monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_EVERY", "3")   # every third call only
        junk = [torch.empty(1000) for _ in range(100)]
        del junk
        assert [_common.release_cpu_heap(cpu) for _ in range(6)].count(True) == 2
        monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_EVERY", "1")

    calls = []

    def counting(dev):
        calls.append(dev)
        return _common.release_cpu_heap(dev)
    monkeypatch.setattr(cell_mod, "release_cpu_heap", counting)
    torch.manual_seed(0)
    enc = HimEncoder(9, 2, 4, 2, 1, 3, "S", backend="torch")
    x, e_graph, emb = torch.randn(2, 4, 9, 2), torch.randn(9, 3), torch.randn(9, 3)
    results = []
    for mb in ("0", "0.001"):
        monkeypatch.setenv("HIMNET_FAST_CPU_HEAP_RELEASE_MB", mb)
        enc.zero_grad()
        out, _ = enc(x, AdaptiveGraph(e_graph, dense=True), emb)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in enc.parameters()])
    assert len(calls) == 2 * 2 * 3      # 2 runs x (forward + backward) x 3 recomputed steps
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shared_query", [False, True])
@pytest.mark.parametrize("block_d", [1, 3, 7])
def test_pooled_product_over_pool_slices(monkeypatch, shared_query, block_d):
    """The pooled product of the "ST" / streamed "S" meta-linear, its Khatri-Rao block limited
    to ``block_d`` pool slices (D = 7: one per d, ragged 3+3+1, all at once), against the einsum
    of its definition: output and the gradients of x, q and the pool; fp64 gradcheck of the op."""
    ml = importlib.import_module("himnet_fast.ops.meta_linear")  # the module: the package attribute is the function

    B, N, I, O, D = 2, 5, 3, 4, 7
    monkeypatch.setattr(ml, "_CPU_KR_BLOCK_BYTES", B * N * I * 8 * block_d)
    assert len(ml._pooled_blocks(torch.zeros(B, N, I, dtype=torch.float64), D)) == -(-D // block_d)
    torch.manual_seed(block_d)
    x = torch.randn(B, N, I, dtype=torch.float64, requires_grad=True)
    q = torch.randn(*((N, D) if shared_query else (B, N, D)), dtype=torch.float64, requires_grad=True)
    pool = torch.randn(D, I, O, dtype=torch.float64, requires_grad=True)
    y = ml.pooled_forward(x, q, pool)
    want = torch.einsum("bni," + ("nd" if shared_query else "bnd") + ",dio->bno", x, q, pool)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    with torch.no_grad():  # an implementation of the op's backward: no autograd inside
        got = ml.pooled_backward(dy, x, q, pool, (True, True, True))
    ref = torch.autograd.grad(want, (x, q, pool), dy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0")  # axis "S" streams too
    op = lambda x, q, pool: ml.meta_linear(x, q, pool, None, "S" if shared_query else "ST", backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(op, (x, q, pool))


def test_pooled_product_over_node_chunks(monkeypatch):
    """When one pool slice of all rows exceeds the block budget, the product runs one pool entry
    at a time over chunks of nodes: the same result as one block."""
    ml = importlib.import_module("himnet_fast.ops.meta_linear")  # the module: the package attribute is the function

    B, N, I, O, D = 2, 9, 3, 4, 3
    x = torch.randn(B, N, I, dtype=torch.float64)
    q = torch.randn(B, N, D, dtype=torch.float64)
    pool = torch.randn(D, I, O, dtype=torch.float64)
    dy = torch.randn(B, N, O, dtype=torch.float64)
    whole = ml.pooled_forward(x, q, pool), ml.pooled_backward(dy, x, q, pool, (True, True, True))
    monkeypatch.setattr(ml, "_CPU_KR_BLOCK_BYTES", B * 2 * I * 8)  # two nodes per block
    blocks = ml._pooled_blocks(x, D)
    assert len(blocks) == D * 5 and all(sl.stop - sl.start == 1 for _, sl in blocks)
    chunked = ml.pooled_forward(x, q, pool), ml.pooled_backward(dy, x, q, pool, (True, True, True))
    torch.testing.assert_close(chunked[0], whole[0])
    for a, b in zip(chunked[1], whole[1]):
        torch.testing.assert_close(a, b)
