"""The fused Triton GCRU step (``kernels/gcru_cell.py``): the cell and sequence ops on the
"triton" backend over a dense graph, against the step written out here from the spec (plain
autograd, float64) and against the torch backend's composed step.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small and odd (N = 7, H = 5: partial tiles everywhere); compiled runs at real
sizes are tests/test_triton_gpu.py's (``-m gpu``).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from himnet_fast import _backend
from himnet_fast.ops import AdaptiveGraph

from conftest import DEVICE, HAS_TRITON
from parity import assert_lowp, assert_rel, himnet_matches_the_original

_REASON = (_backend.unavailable_reason("gcru_gate", "triton", DEVICE) if HAS_TRITON
           else "triton is not installed")
pytestmark = [pytest.mark.triton, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

cell_ops = importlib.import_module("himnet_fast.ops.gcru_cell")
FUSED_FORMS = ("plain", "T", "S", "S-pooled", "ST")


def _weights(form, B, N, C, H, D, K, dtype, device=DEVICE):
    """CellWeights of ``form`` (ops/gcru_cell.py's table), scaled to keep activations O(1)."""
    lead = {"plain": (), "T": (B,), "S": (N,), "S-pooled": (D,), "ST": (D,)}[form]
    blead = {"plain": (), "T": (B,), "S": (N,), "S-pooled": (N,), "ST": (B, N)}[form]

    def w(rows, o):
        return torch.randn(*lead, rows, o, dtype=dtype, device=device) / rows ** 0.5

    def b(o):
        return 0.3 * torch.randn(*blead, o, dtype=dtype, device=device)
    aux = {"S-pooled": lambda: torch.randn(N, D), "ST": lambda: torch.randn(B, N, D)}.get(form)
    aux = aux().to(device, dtype) / D ** 0.5 if aux else None
    return cell_ops.CellWeights(form, w(K * C, 2 * H), w(K * H, 2 * H), b(2 * H), w(K * C, H), w(K * H, H), b(H),
                                aux, aux)


def _linear(form, x, w, q):
    """x (B, N, I) @ the form's weight, written out (einsum over the pool for the pooled forms)."""
    if form == "plain":
        return x @ w
    if form == "T":
        return torch.einsum("bni,bio->bno", x, w)
    if form == "S":
        return torch.einsum("bni,nio->bno", x, w)
    qq = q if q.dim() == 3 else q.expand(x.shape[0], *q.shape)
    return torch.einsum("bni,bnd,dio->bno", x, qq, w)


def _bias(form, b):
    return b[:, None, :] if form == "T" else b


def _ref_sequence(xs, A, w, K, H):
    """The recurrent cell from the spec, step by step (plain autograd): xs (B, T, N, C)."""
    def terms(v):
        z = [v, A @ v]
        for _ in range(2, K):
            z.append(2 * (A @ z[-1]) - z[-2])
        return torch.cat(z[:K], -1)

    B, T, N, _ = xs.shape
    h = xs.new_zeros(B, N, H)
    out = []
    for t in range(T):
        zx = terms(xs[:, t])
        zr = torch.sigmoid(_linear(w.form, zx, w.wgx, w.aux_g) + _linear(w.form, terms(h), w.wgh, w.aux_g)
                           + _bias(w.form, w.bg))
        z, r = zr[..., :H], zr[..., H:]
        hc = torch.tanh(_linear(w.form, zx, w.wux, w.aux_u) + _linear(w.form, terms(z * h), w.wuh, w.aux_u)
                        + _bias(w.form, w.bu))
        h = r * h + (1 - r) * hc
        out.append(h)
    return torch.stack(out, 1)


def _leaves(w, xs, A):
    ts = [xs, A] + [t for t in w.tensors()[:6]]
    ts = [t.detach().clone().requires_grad_(True) for t in ts]
    aux = None if w.aux_g is None else w.aux_g.detach().clone().requires_grad_(True)
    return ts[0], ts[1], cell_ops.CellWeights(w.form, *ts[2:], aux, aux), ts + ([aux] if aux is not None else [])


def _run_sequence(w, xs, A, K, H, backend, seed=1):
    """States and the gradients of <states, g> into xs, A, the weights (and the query)."""
    xs, A, w, leaves = _leaves(w, xs, A)
    if backend is None:
        states = _ref_sequence(xs, A, w, K, H)
    else:
        states, _ = cell_ops.gcru_sequence(xs, AdaptiveGraph.from_support(A), w, K, H, backend)
    g = torch.randn(states.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [states] + list(torch.autograd.grad(states, leaves, g.to(states)))


CASES = [("plain", 3, True), ("T", 2, False), ("S", 3, False), ("S-pooled", 2, True), ("ST", 3, True),
         ("ST", 2, False)]


@pytest.mark.parametrize("form,K,shared", CASES)
def test_fused_sequence_matches_the_spec_fp64(form, K, shared):
    """The sequence op (first step from the zero state, later steps, in-place gradient
    accumulation) on the fused step: outputs and every gradient equal the spec's step in
    float64, for each weight form, K = 2 and 3, a shared (N, N) or per-sample (B, N, N) graph."""
    torch.manual_seed(0)
    B, T, N, C, H, D = 2, 3, 7, 2, 5, 3
    w = _weights(form, B, N, C, H, D, K, torch.float64)
    xs = torch.randn(B, T, N, C, dtype=torch.float64, device=DEVICE)
    A = torch.softmax(torch.randn(*(() if shared else (B,)), N, N, dtype=torch.float64, device=DEVICE), -1)
    got = _run_sequence(w, xs, A, K, H, "triton")
    want = _run_sequence(w, xs, A, K, H, None)
    names = ["states", "xs", "graph", "wgx", "wgh", "bg", "wux", "wuh", "bu", "query"]
    for name, a, b in zip(names, got, want):
        assert_rel(a, b, 1e-10, f"{form} K={K} {name}")


def test_fused_path_is_the_one_taken(monkeypatch):
    """backend "triton" on a dense graph runs FusedStep (not the composed ops); "scaled",
    streamed graphs and the torch backend run the composed step."""
    from himnet_fast.kernels.gcru_cell import FusedStep

    w = _weights("ST", 2, 7, 2, 5, 3, 2, torch.float32)
    A = torch.rand(7, 7, device=DEVICE)
    assert isinstance(cell_ops._make_step(A, "dense", [], w, 2, "triton", (2, 7, 5)), FusedStep)
    for mode, backend in (("dense", "torch"), ("streamed", "triton")):
        step = cell_ops._make_step(A, mode, [], w, 2, backend, (2, 7, 5))
        assert isinstance(step, cell_ops._ComposedStep)
    scaled = w._replace(form="scaled")
    assert isinstance(cell_ops._make_step(A, "dense", [], scaled, 2, "triton", (2, 7, 5)), cell_ops._ComposedStep)
    monkeypatch.setenv("HIMNET_FAST_BACKEND", "triton")  # the environment's choice counts too
    assert isinstance(cell_ops._make_step(A, "dense", [], w, 2, "", (2, 7, 5)), FusedStep)


@pytest.mark.parametrize("form", ["T", "ST"])
def test_fused_single_step_and_one_step_sequence(form):
    """The cell op (one step, any state) and a sequence of one step (no state terms: the
    state rows' gradients are zero) on the fused step, fp32, against the torch backend."""
    torch.manual_seed(2)
    B, N, C, H, D, K = 3, 7, 2, 5, 3, 2
    w = _weights(form, B, N, C, H, D, K, torch.float32)
    A = torch.softmax(torch.randn(N, N, device=DEVICE), -1)
    xs = torch.randn(B, 1, N, C, device=DEVICE)
    got = _run_sequence(w, xs, A, K, H, "triton")
    want = _run_sequence(w, xs, A, K, H, "torch")
    for i, (a, b) in enumerate(zip(got, want)):
        assert_rel(a, b, 1e-5, f"T=1 output/grad {i}")
    assert got[4].abs().max() == 0 and got[7].abs().max() == 0  # wgh, wuh: no state term acted
    h = torch.randn(B, N, H, device=DEVICE)
    zx = torch.randn(B, N, K * C, device=DEVICE)
    res = {}
    for backend in ("triton", "torch"):
        ins = [t.detach().clone().requires_grad_(True) for t in (h, zx, A) + w.tensors()[:6]]
        q = w.aux_g.detach().clone().requires_grad_(True) if form == "ST" else None
        ws = cell_ops.CellWeights(form, *ins[3:], q, q)
        out = cell_ops.cell_step(ins[0], ins[1], AdaptiveGraph.from_support(ins[2]), ws, K, backend)
        leaves = ins + ([q] if form == "ST" else [])
        res[backend] = [out] + list(torch.autograd.grad(out.square().sum(), leaves))
    for i, (a, b) in enumerate(zip(res["triton"], res["torch"])):
        assert_rel(a, b, 1e-5, f"cell op output/grad {i}")


@pytest.mark.parametrize("form", ["S", "ST"])
def test_fused_sequence_bf16(form):
    """bf16 (fp32 accumulation inside the kernels): each output's and gradient's error against
    the float64 spec is at most twice the torch backend's own bf16 error (plus a floor)."""
    torch.manual_seed(3)
    B, T, N, C, H, D, K = 2, 3, 7, 2, 5, 3, 2
    w64 = _weights(form, B, N, C, H, D, K, torch.float64)
    xs = torch.randn(B, T, N, C, dtype=torch.float64, device=DEVICE)
    A = torch.softmax(torch.randn(N, N, dtype=torch.float64, device=DEVICE), -1)
    exact = _run_sequence(w64, xs, A, K, H, None)
    w16 = cell_ops.CellWeights(form, *(None if t is None else t.to(torch.bfloat16) for t in w64.tensors()))
    xs16, A16 = xs.to(torch.bfloat16), A.to(torch.bfloat16)
    got = _run_sequence(w16, xs16, A16, K, H, "triton")
    own = _run_sequence(w16, xs16, A16, K, H, "torch")
    for i, (a, e, o) in enumerate(zip(got, exact, own)):
        assert_lowp(a, e, o, f"{form} bf16 output/grad {i}")


def test_himnet_on_the_fused_step_matches_the_original_end_to_end():
    """HimNet(backend="triton") with its graphs dense (the default where they fit) runs the
    fused step in both encoders and the decoder: output and every parameter's gradient equal
    the original model's (fp32)."""
    himnet_matches_the_original("triton")


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_model_at_pems07_size_matches_the_torch_backend(autocast):
    """Compiled kernels at the real sizes (N = 883, hidden 64, B = 4): a training step of
    HimNet on the fused step against the torch backend, fp32 (TF32 off) within 1e-4 of the
    output and 1e-3 of each gradient; under bf16 autocast, each within 2x the torch backend's
    own bf16 error against fp32 (plus a floor)."""
    from himnet_fast.benchmark import providers as P
    from himnet_fast.presets import get_preset
    from conftest import tf32_matmul

    import himnet_fast as hf

    preset = get_preset("pems07")
    dev = torch.device("cuda")
    inputs = P.model_inputs(preset, preset.num_nodes, 4, dev)

    def run(backend, bf16):
        torch.manual_seed(0)
        model = hf.HimNet(**preset.model_kwargs(), backend=backend).to(dev)
        with tf32_matmul(False), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = P.model_step(model, list(model.parameters()), inputs, "train")()
        return [out.float()] + [p.grad.float() for p in model.parameters()]
    exact = run("torch", False)
    if not autocast:
        for i, (a, b) in enumerate(zip(run("triton", False), exact)):
            assert_rel(a, b, 1e-4 if i == 0 else 1e-3, f"output/grad {i}")
        return
    got, own = run("triton", True), run("torch", True)
    for i, (a, e, o) in enumerate(zip(got, exact, own)):
        err, err_own = (a - e).abs().max().item(), (o - e).abs().max().item()
        assert err <= 2 * err_own + 1e-3 * e.abs().max().item(), (i, err, err_own)
