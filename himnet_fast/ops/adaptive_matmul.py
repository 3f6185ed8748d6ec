"""The adaptive graph ``A = softmax(relu(E Eᵀ))`` and its product ``A v``, as two ops.

* ``adaptive_matmul``: the streamed product ``softmax(relu(E Eᵀ)) @ v`` without any N×N
  buffer: attention with query = key = E, value = v, score ``relu(q·k)``, no scaling. Blocks of
  rows, flash-attention style; backward recomputes each block's probabilities. Backends:
  torch (here), triton (``kernels/adaptive_matmul.py``), cuda (``csrc/adaptive_matmul.cu``,
  forward only).
* ``adaptive_graph``: the dense matrix (N, N), or (B, N, N) for a per-sample graph, built a
  block of rows at a time, for small graphs whose matrix is reused by every step of a forward
  (torch only).

Each is a registered PyTorch custom op (``himnet_fast::adaptive_matmul``,
``himnet_fast::adaptive_graph``) with a fake and an autograd formula that is itself a custom op.
The graph layer (:mod:`himnet_fast.ops.graph`) decides dense or streamed and builds the
Chebyshev terms from these.

Rows whose scores are all <= 0 become uniform (softmax of zeros), as in the original.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _backend
from .._checks import check_same_device, check_tensor
from . import _cuda, _triton
from .._dtypes import acc_dtype
from ._common import cast, compute_dtype, contiguous, custom_op, empty_like, needs_grad, no_autocast, rows_per_chunk

__all__ = ["adaptive_matmul", "adaptive_graph", "apply_streamed", "build_dense"]


def _check_embedding(embedding) -> Tensor:
    return check_tensor("embedding", embedding, (2, 3))


def adaptive_matmul(embedding: Tensor, v: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Streamed ``softmax(relu(E Eᵀ)) @ v`` without an N×N buffer.

    Args:
        embedding: (N, D) static graph (every sample shares A) or (B, N, D) per-sample graph.
        v: (B, N, W).
        backend: None/"auto", "torch", "triton" or "cuda".

    Returns:
        (B, N, W) in the compute dtype (the autocast dtype under autocast).
    """
    _check_embedding(embedding)
    check_tensor("v", v, 3)
    N = embedding.shape[-2]
    if v.shape[1] != N:
        raise ValueError(f"v has {v.shape[1]} nodes (dim 1 of shape {tuple(v.shape)}), expected {N} "
                         f"(the graph's node count)")
    if embedding.dim() == 3 and v.shape[0] != embedding.shape[0]:
        raise ValueError(f"v has batch {v.shape[0]} (dim 0 of shape {tuple(v.shape)}), expected "
                         f"{embedding.shape[0]} (the per-sample graph's batch)")
    check_same_device(v=v, embedding=embedding)
    dtype = compute_dtype(v.device, v, embedding)
    with no_autocast(v.device):
        return apply_streamed(cast(embedding, dtype), cast(v, dtype), backend)


def apply_streamed(e: Tensor, v: Tensor, backend: Optional[str]) -> Tensor:
    """:func:`adaptive_matmul` on validated inputs of one dtype (the graph layer's entry):
    e (N, D) or (B, N, D), v (B, N, W) -> (B, N, W)."""
    if v.numel() == 0:
        return v.clone()
    name = _backend.resolve("adaptive_matmul", backend, v.device, needs_grad(e, v))
    if e.dim() == 3:
        return _adaptive_matmul(e, v, name)[0]
    # Static graph: every sample shares A, so the batch becomes extra value columns.
    B, N, W = v.shape
    vf = v.permute(1, 0, 2).reshape(1, N, B * W)
    out = _adaptive_matmul(e.unsqueeze(0), vf, name)[0]
    return out.reshape(N, B, W).permute(1, 0, 2)


def adaptive_graph(embedding: Tensor) -> Tensor:
    """Dense ``softmax(relu(E Eᵀ), -1)``: (N, N) for E (N, D), (B, N, N) for E (B, N, D), in
    the compute dtype. For inspection and small graphs; the propagation ops never need it."""
    _check_embedding(embedding)
    dtype = compute_dtype(embedding.device, embedding)
    with no_autocast(embedding.device):
        e = cast(embedding, dtype)
        return build_dense(e).to(dtype)


def build_dense(e: Tensor) -> Tensor:
    """The dense graph of a validated embedding (N, D) / (B, N, D) in its accumulation dtype
    (fp32 for half types): the softmax statistics are never computed in low precision."""
    g = e if e.dim() == 3 else e.unsqueeze(0)
    name = _backend.resolve("adaptive_graph", None, e.device, needs_grad(e))
    a = _adaptive_graph(g, name)
    return a if e.dim() == 3 else a.squeeze(0)


# --------------------------------------------------------------------------- torch: streamed

def _softmax_relu_scores(eq: Tensor, ek: Tensor) -> Tensor:
    """softmax(relu(eq @ ekᵀ)) with the softmax statistics never in low precision."""
    s = torch.matmul(eq, ek.transpose(-1, -2))
    return torch.softmax(torch.relu(s).to(acc_dtype(s.dtype)), dim=-1)


def torch_forward(e: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """``out[g] = softmax(relu(E[g] E[g]ᵀ)) @ V[g]`` for E (G, N, D), V (G, N, W), one block of
    query rows at a time. Returns (out, an empty statistics tensor): backward needs E, V, out."""
    G, N, _ = e.shape
    out = torch.empty(G, N, v.shape[-1], dtype=v.dtype, device=v.device)
    # ~4 live (G, rows, N) fp32 temporaries: scores, relu, exp, probabilities.
    step = rows_per_chunk(G * N * 4 * 4, N)
    for s in range(0, N, step):
        p = _softmax_relu_scores(e[:, s:s + step], e).to(v.dtype)
        torch.bmm(p, v, out=out[:, s:s + step])
    return out, e.new_empty(0)


def torch_backward(dout: Tensor, e: Tensor, v: Tensor, out: Tensor, stats: Tensor, need_e: bool = True,
                   need_v: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients (de, dv) of :func:`torch_forward`: each block's probabilities are recomputed
    and the flash-attention backward is applied with the ReLU mask; both the query-side and
    the key-side gradients go into dE, since E plays both roles."""
    G, N, _ = e.shape
    dout = dout.contiguous()
    ef, vf = e.to(acc_dtype(e.dtype)), v.to(acc_dtype(v.dtype))
    de, dv = torch.zeros_like(ef), torch.zeros_like(vf)
    # delta_i = <dO_i, O_i> = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = (dout.to(vf.dtype) * out.to(vf.dtype)).sum(-1, keepdim=True)
    step = rows_per_chunk(G * N * 4 * 6, N)
    for s in range(0, N, step):
        eq = ef[:, s:s + step]
        sc = torch.bmm(eq, ef.transpose(1, 2))
        p = torch.softmax(torch.relu(sc), dim=-1)
        do = dout[:, s:s + step].to(vf.dtype)
        dv += torch.bmm(p.transpose(1, 2), do)
        ds = p * (torch.bmm(do, vf.transpose(1, 2)) - delta[:, s:s + step])
        ds = ds.masked_fill_(sc <= 0, 0.0)  # relu'(s) = 0 for s <= 0 (torch convention)
        de[:, s:s + step] += torch.bmm(ds, ef)
        de += torch.bmm(ds.transpose(1, 2), eq)
    return (de.to(e.dtype) if need_e else None), (dv.to(v.dtype) if need_v else None)


# --------------------------------------------------------------------------- triton, cuda

def cuda_forward(e: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """The extension's forward (csrc/adaptive_matmul.cu) -> (out (G, N, W), empty statistics).

    A (G, N, 2) fp32 workspace (fp64 for fp64 inputs) holds the per-row softmax statistics
    between the kernel's two passes."""
    G, N, D = e.shape
    W = v.shape[-1]
    code, index, stream = _cuda.launch_args(v, e)
    e, v = e.contiguous(), v.contiguous()
    out = torch.empty((G, N, W), dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out, e.new_empty(0)
    stats = torch.empty((G, N, 2), dtype=acc_dtype(v.dtype), device=v.device)
    _cuda.ext().adaptive_matmul(_cuda.ptr(e), _cuda.ptr(v), _cuda.ptr(out), _cuda.ptr(stats), G, N, D, W, code,
                                index, stream)
    return out, e.new_empty(0)


def _stats_like(e: Tensor, v: Tensor, backend: str) -> Tensor:
    """The statistics output's shape: the triton kernels keep each row's log-sum-exp (G, N) in
    the accumulation dtype; the torch and cuda implementations keep none."""
    if backend == "triton":
        return v.new_empty(e.shape[0], e.shape[1], dtype=acc_dtype(v.dtype))
    return e.new_empty(0)


_backend.register("adaptive_matmul", "torch", torch_forward, torch_backward)
_backend.register("adaptive_matmul", "triton", _triton.launcher("adaptive_matmul", "adaptive_matmul_forward"),
                  _triton.launcher("adaptive_matmul", "adaptive_matmul_backward"), check=_triton.check)
_backend.register("adaptive_matmul", "cuda", cuda_forward, check=_cuda.check)


@custom_op("adaptive_matmul")
def _adaptive_matmul(e: Tensor, v: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    with no_autocast(v.device):
        return contiguous(_backend.impl("adaptive_matmul", backend).forward(e, v))


@_adaptive_matmul.register_fake
def _(e, v, backend):
    return empty_like(v), _stats_like(e, v, backend)


@custom_op("adaptive_matmul_backward")
def _adaptive_matmul_backward(dout: Tensor, e: Tensor, v: Tensor, out: Tensor, stats: Tensor, backend: str,
                              needs: List[bool]) -> List[Tensor]:
    with no_autocast(v.device):
        de, dv = _backend.impl("adaptive_matmul", backend).backward(dout, e, v, out, stats, *needs)
    return [g.contiguous() for g, n in zip((de, dv), needs) if n]


@_adaptive_matmul_backward.register_fake
def _(dout, e, v, out, stats, backend, needs):
    return [empty_like(t) for t, n in zip((e, v), needs) if n]


def _setup(ctx, inputs, output):
    e, v, backend = inputs
    out, stats = output
    ctx.save_for_backward(e, v, out, stats)
    ctx.backend = backend


def _backward(ctx, dout, dstats):
    e, v, out, stats = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:2]]
    grads = iter(_adaptive_matmul_backward(dout.contiguous(), e, v, out, stats, ctx.backend, needs))
    return (*(next(grads) if n else None for n in needs), None)


_adaptive_matmul.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------- dense graph (torch)

def dense_forward(e: Tensor) -> Tensor:
    """``softmax(relu(E Eᵀ), -1)`` for E (G, N, D) -> (G, N, N) in the accumulation dtype, a
    block of rows at a time.

    The dense graph is the largest tensor a training step keeps (G*N*N for the decoder's
    per-sample graph: 48 MiB at PEMS07, B = 16). Its autograd formula saves only E and the
    probabilities: the scores and the ReLU mask are recomputed per block in backward (N*D
    FLOPs per entry, cheap next to the propagations), and the softmax backward and
    ``dE = dS E + dSᵀ E`` are done per block, so the extra memory is O(block*N) both ways."""
    G, N, _ = e.shape
    ef = e.to(acc_dtype(e.dtype))
    p = torch.empty(G, N, N, dtype=ef.dtype, device=e.device)
    # ~3 live (G, rows, N) temporaries: scores, ReLU, exponentials.
    step = rows_per_chunk(G * N * ef.element_size() * 3, N)
    for s in range(0, N, step):
        sc = torch.matmul(ef[:, s:s + step], ef.transpose(1, 2))
        p[:, s:s + step] = torch.softmax(sc.relu_(), dim=-1)
    return p


def dense_backward(dp: Tensor, e: Tensor, p: Tensor) -> Tensor:
    """dE of :func:`dense_forward` from dP (G, N, N), E and the saved probabilities."""
    G, N, _ = e.shape
    ef = e.to(acc_dtype(e.dtype))
    dp = dp.to(p.dtype)
    de = torch.zeros_like(ef)
    step = rows_per_chunk(G * N * ef.element_size() * 3, N)
    for s in range(0, N, step):
        eq = ef[:, s:s + step]
        ps, dps = p[:, s:s + step], dp[:, s:s + step]
        # softmax backward: dR = P * (dP - rowsum(dP * P))
        ds = (dps - (dps * ps).sum(-1, keepdim=True)).mul_(ps)
        # relu'(s) = 0 for s <= 0 (torch convention); the scores are recomputed
        ds.masked_fill_(torch.matmul(eq, ef.transpose(1, 2)) <= 0, 0.0)
        de[:, s:s + step] += torch.bmm(ds, ef)       # E as the query
        de.baddbmm_(ds.transpose(1, 2), eq)          # E as the key
    return de.to(e.dtype)


_backend.register("adaptive_graph", "torch", dense_forward, dense_backward)


@custom_op("adaptive_graph")
def _adaptive_graph(e: Tensor, backend: str) -> Tensor:
    with no_autocast(e.device):
        return contiguous(_backend.impl("adaptive_graph", backend).forward(e))


@_adaptive_graph.register_fake
def _(e, backend):
    return e.new_empty(e.shape[0], e.shape[1], e.shape[1], dtype=acc_dtype(e.dtype))


@custom_op("adaptive_graph_backward")
def _adaptive_graph_backward(dp: Tensor, e: Tensor, p: Tensor, backend: str) -> Tensor:
    with no_autocast(e.device):
        return contiguous(_backend.impl("adaptive_graph", backend).backward(dp, e, p))


@_adaptive_graph_backward.register_fake
def _(dp, e, p, backend):
    return empty_like(e)


def _setup_graph(ctx, inputs, output):
    e, backend = inputs
    ctx.save_for_backward(e, output)
    ctx.backend = backend


def _backward_graph(ctx, dp):
    e, p = ctx.saved_tensors
    return _adaptive_graph_backward(dp.contiguous(), e, p, ctx.backend), None


_adaptive_graph.register_autograd(_backward_graph, setup_context=_setup_graph)
