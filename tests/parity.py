"""Helpers shared by the kernel parity tests (interpreter on CPU and compiled on GPU): error
measures, the low-precision criterion, autograd runs, inputs and the small references."""
import functools

import torch

import himnet_fast as hf


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_rel(got, want, tol, what=""):
    """max |got - want| <= tol * max |want| (relative to the tensor's scale), same shape and dtype."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    scale = max(want.double().abs().max().item(), 1e-30) if want.numel() else 1.0
    e = err(got, want)
    assert e <= tol * scale, f"{what}: max error {e:.3e} > {tol:.0e} * scale {scale:.3e}"


def assert_lowp(got, exact, own, what=""):
    """Error of the kernel <= 2x PyTorch's own error in the same dtype (flash-attention's
    criterion; a tiny floor for exact ties)."""
    assert got.dtype == own.dtype, f"{what}: dtype {got.dtype} != {own.dtype}"
    e_got, e_own = err(got, exact), err(own, exact)
    floor = 1e-6 * max(exact.double().abs().max().item(), 1e-30)
    assert e_got <= 2 * e_own + floor, f"{what}: kernel error {e_got:.3e} > 2 x torch's {e_own:.3e}"


def run(fn, inputs, g):
    """fn(*inputs) and the gradients of <fn(*inputs), g> into every input that requires grad."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], g)
    return out, grads


def leaf(t, dtype=None):
    t = t if dtype is None else t.to(dtype)
    return t.detach().clone().requires_grad_(True)


def on(backend: str, op: str):
    """The public op ``hf.ops.<op>`` bound to ``backend`` (autograd through its registered formula)."""
    return functools.partial(getattr(hf.ops, op), backend=backend)


QSHAPE = {"T": lambda B, N, D: (B, D), "S": lambda B, N, D: (N, D), "ST": lambda B, N, D: (B, N, D)}


def ml_inputs(axis, B, N, I, O, D, bias=True, dtype=torch.float64, device="cpu"):
    """(x, query, pool, bias pool) of meta_linear, the pool scaled to keep outputs O(1)."""
    x = torch.randn(B, N, I, dtype=dtype, device=device)
    q = torch.randn(*QSHAPE[axis](B, N, D), dtype=dtype, device=device)
    p = torch.randn(D, I, O, dtype=dtype, device=device) / (I * D) ** 0.5
    pb = torch.randn(D, O, dtype=dtype, device=device) if bias else None
    return x, q, p, pb


def am_ref(e, v):
    """softmax(relu(E Eᵀ)) @ V for E (G, N, D), V (G, N, W), dense."""
    return torch.softmax(torch.relu(e @ e.transpose(1, 2)), dim=-1) @ v


def gate_ref(pre, h):
    H = h.shape[-1]
    zr = torch.sigmoid(pre)
    return zr[..., :H] * h, zr[..., H:]


def update_ref(pre_c, r, h):
    return r * h + (1 - r) * torch.tanh(pre_c)


def himnet_matches_the_original(backend: str, dense_graph=None, tol: float = 1e-4) -> None:
    """A small HimNet (cheb_k 3: the Chebyshev recursion) on ``backend`` against the original
    model with the same weights: the output and every parameter's gradient within ``tol`` of
    the largest reference magnitude (eval mode, fp32)."""
    from himnet_fast.reference import RefHimNet

    torch.manual_seed(1)
    N, B, T = 9, 2, 2
    kw = dict(num_nodes=N, input_dim=3, output_dim=1, out_steps=2, hidden_dim=8, num_layers=1, cheb_k=3,
              ycov_dim=2, tod_embedding_dim=4, dow_embedding_dim=4, node_embedding_dim=5, st_embedding_dim=6)
    ref = RefHimNet(**kw).eval()
    model = hf.HimNet(**kw, backend=backend, dense_graph=dense_graph).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B, T, N, 3)
    x[..., 1] = torch.rand(B, T, N) * 0.99
    x[..., 2] = torch.randint(0, 7, (B, T, N)).float()
    y_cov = torch.rand(B, 2, N, 2)
    g = torch.randn(B, 2, N, 1)
    y, y_ref = model(x, y_cov), ref(x, y_cov)
    assert_rel(y, y_ref, tol, "HimNet output")
    grads = torch.autograd.grad(y, list(model.parameters()), g)
    grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        assert_rel(a, b, tol, name)
