"""ops.gcru_pair (two cells over one input and graph as one op: HimNet's encoders) against
the two cells run on their own: states and every gradient, "S"/"T" in either order, a shared
input (first layer) or two inputs (later layers). On backend "triton" (the interpreter on
CPU) the front-end runs the op on the fused pair step; on torch it runs the two cells' own
sequence ops (the op would save nothing there), and the op itself, whose torch path runs the
two steps in turn, is held by opcheck and a float64 gradcheck."""
import importlib

import pytest
import torch

from himnet_fast.ops import AdaptiveGraph

from conftest import parity_backends
from parity import assert_rel

cell_ops = importlib.import_module("himnet_fast.ops.gcru_cell")
pair_ops = importlib.import_module("himnet_fast.ops.gcru_pair")
ops = torch.ops.himnet_fast
F64 = dict(dtype=torch.float64)


def _weights(form, B, N, C, H, K, dtype=torch.float64):
    G = {"S": N, "T": B}[form]

    def w(rows, o):
        return torch.randn(G, rows, o, dtype=dtype) / rows ** 0.5
    b = lambda o: 0.3 * torch.randn(G, o, dtype=dtype)  # noqa: E731
    return cell_ops.CellWeights(form, w(K * C, 2 * H), w(K * H, 2 * H), b(2 * H), w(K * C, H), w(K * H, H), b(H))


def _leaves(w):
    return cell_ops.CellWeights(w.form, *(t.detach().clone().requires_grad_(True) for t in w.tensors()[:6]))


@pytest.mark.parametrize("backend", parity_backends())
@pytest.mark.parametrize("forms,shared", [(("S", "T"), True), (("T", "S"), False), (("S", "S"), True)])
def test_pair_equals_the_two_cells(backend, forms, shared):
    torch.manual_seed(0)
    B, T, N, C, H, K = 2, 3, 7, 2, 5, 3
    A = torch.softmax(torch.randn(N, N, **F64), -1)
    ws = [_weights(f, B, N, C, H, K) for f in forms]
    xa = torch.randn(B, T, N, C, **F64)
    xb = xa if shared else torch.randn(B, T, N, C, **F64)
    g = [torch.randn(B, N, H, **F64) for _ in range(2)]
    res = {}
    for how in ("pair", "apart"):
        A_ = A.clone().requires_grad_(True)
        xa_ = xa.clone().requires_grad_(True)
        xb_ = xa_ if shared else xb.clone().requires_grad_(True)
        wa, wb = _leaves(ws[0]), _leaves(ws[1])
        graph = AdaptiveGraph.from_support(A_)
        if how == "pair":
            (sa, la), (sb, lb) = pair_ops.gcru_sequence_pair(xa_ if shared else (xa_, xb_), graph, wa, wb, K, H,
                                                             backend)
        else:
            sa, la = cell_ops.gcru_sequence(xa_, graph, wa, K, H, "torch")
            sb, lb = cell_ops.gcru_sequence(xb_, graph, wb, K, H, "torch")
        loss = (la * g[0]).sum() + (lb * g[1]).sum() + sa[:, 0].square().sum() + sb[:, 1].sum()
        leaves = [A_, xa_] + ([] if shared else [xb_]) + list(wa.tensors()[:6]) + list(wb.tensors()[:6])
        res[how] = [sa, la, sb, lb] + list(torch.autograd.grad(loss, leaves))
    for i, (a, b) in enumerate(zip(res["pair"], res["apart"])):
        assert_rel(a, b, 1e-10, f"{forms} output/grad {i}")


def _op_args(shared=True, B=2, T=3, N=5, C=2, H=3, K=2):
    ws = [_weights(f, B, N, C, H, K) for f in ("S", "T")]
    joint = [torch.cat([a, b]).requires_grad_(True) for a, b in zip(ws[0].tensors()[:6], ws[1].tensors()[:6])]
    zx = torch.randn(T, *(() if shared else (2,)), B, N, K * C, **F64).requires_grad_(True)
    g = torch.softmax(torch.randn(N, N, **F64), -1).requires_grad_(True)
    return zx, g, [], joint, N, K, H


@pytest.mark.parametrize("shared", [True, False])
def test_pair_op_opcheck(shared):
    zx, g, layout, joint, split, K, H = _op_args(shared)
    torch.library.opcheck(ops.gcru_sequence_pair.default,
                          (zx, g, layout, *joint, "S", "T", split, "dense", K, H, "torch"))


def test_pair_op_gradcheck():
    zx, g, layout, joint, split, K, H = _op_args(True, N=4, H=2, K=3)

    def f(zx, g, *w):
        return ops.gcru_sequence_pair.default(zx, g, layout, *w, "S", "T", split, "dense", K, H, "torch")
    assert torch.autograd.gradcheck(f, (zx, g, *joint), fast_mode=True)


def test_the_fused_pair_runs_where_it_saves_launches():
    """The front-end runs the op only where the fused pair step runs (shared dense graph,
    backend "triton"); the op picks FusedStep there and the two cells' steps elsewhere."""
    A = torch.softmax(torch.randn(5, 5), -1)
    assert not pair_ops._fuses(A, "dense", "torch")
    assert not pair_ops._fuses(torch.rand(2, 5, 5), "dense", "triton")
    zx, g, layout, joint, split, K, H = _op_args(True)
    step = pair_ops._make_pair_step(g, "dense", [], ("S", "T"), joint, split, K, "torch", (2, 5, H))
    assert isinstance(step, pair_ops._StepPair)
    if "triton" in parity_backends():
        from himnet_fast.kernels.gcru_cell import FusedStep
        assert pair_ops._fuses(A, "dense", "triton")
        step = pair_ops._make_pair_step(g, "dense", [], ("S", "T"), joint, split, K, "triton", (2, 5, H))
        assert isinstance(step, FusedStep) and step.rows.G1 > 0
