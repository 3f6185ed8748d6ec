"""The "triton" backend: autograd Functions over the kernels in ``himnet_fast.kernels``.

Registers ``meta_linear``, ``adaptive_matmul``, ``gcru_gate`` and ``gcru_update`` with a
``check`` that names why Triton cannot run: the package is missing, the device is neither
CUDA nor CPU, or a CPU tensor arrives without ``TRITON_INTERPRET=1`` (the interpreter, how CI
runs the kernels). The kernel modules are imported on first use only, so
``import himnet_fast`` works without Triton and pays no Triton start-up cost.

Each Function saves only what its backward needs: meta_linear (x, query, pool, bias_pool),
adaptive_matmul (E, V, out, per-row fp32 logsumexp), the GCRU tail its pre-activations and
inputs (activations are recomputed). All backward passes are deterministic (no atomics).
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _backend

_TRITON_ERROR: Optional[str] = None
_TRITON_CHECKED = False
# Set only by :func:`allow_meta` (ahead-of-time compilation, himnet_fast.aot): meta tensors are
# then accepted so the real launchers compute grids and constexprs without any data.
_ALLOW_META = False


@contextlib.contextmanager
def allow_meta():
    """Accept meta tensors on the "triton" backend inside the block (for AOT compilation only:
    launches must compile, not run, which :mod:`himnet_fast.aot` arranges)."""
    global _ALLOW_META
    old, _ALLOW_META = _ALLOW_META, True
    try:
        yield
    finally:
        _ALLOW_META = old


def _triton_import_error() -> Optional[str]:
    """None when ``import triton`` works, else the reason (checked once)."""
    global _TRITON_ERROR, _TRITON_CHECKED
    if not _TRITON_CHECKED:
        _TRITON_CHECKED = True
        try:
            importlib.import_module("triton")
        except Exception as exc:  # ImportError, or a broken install raising at import
            _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return _TRITON_ERROR


def _kernels(name: str):
    return importlib.import_module(f"himnet_fast.kernels.{name}")


def _check(device: torch.device) -> Optional[str]:
    err = _triton_import_error()
    if err is not None:
        return err
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type == "meta" and _ALLOW_META:
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if device.type == "cpu":
        if not interpret:
            return ("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                    "triton (slow; meant for tests)")
        # triton.jit picks interpreter or compiler when a kernel is defined: kernels imported
        # before the variable was set cannot run CPU tensors.
        mod = importlib.import_module("himnet_fast.kernels.gcru")
        if type(mod._gcru_gate_fwd_kernel).__name__ != "InterpretedFunction":
            return ("himnet_fast.kernels was imported before TRITON_INTERPRET=1 was set; set it before "
                    "the first Triton op runs")
        return None
    return f"device type {device.type!r} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"


def _common_dtype(*tensors):
    dt = None
    for t in tensors:
        if t is not None:
            dt = t.dtype if dt is None else torch.promote_types(dt, t.dtype)
    return dt


# --------------------------------------------------------------------------- meta_linear

class MetaLinearFunction(torch.autograd.Function):
    """y (B, N, O) = sum_d q_d (x @ P_d) + q @ Pb without the generated weight tensor."""

    @staticmethod
    def forward(ctx, x, query, pool, bias_pool, axis):
        ctx.axis = axis
        ctx.save_for_backward(x, query, pool, bias_pool)
        return _kernels("meta_linear").meta_linear_forward(x, query, pool, bias_pool, axis)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, query, pool, bias_pool = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        dx, dq, dp, dpb = _kernels("meta_linear").meta_linear_backward(dy, x, query, pool, bias_pool,
                                                                      ctx.axis, needs)
        return dx, dq, dp, dpb, None


def triton_meta_linear(x, query, weight_pool, bias_pool, axis):
    """x (B, N, I), query (B, D) | (N, D) | (B, N, D), weight_pool (D, I, O), bias_pool (D, O)
    or None, axis "T" | "S" | "ST" -> (B, N, O)."""
    dt = _common_dtype(x, query, weight_pool, bias_pool)
    x, query, weight_pool = (t if t.dtype == dt else t.to(dt) for t in (x, query, weight_pool))
    if bias_pool is not None and bias_pool.dtype != dt:
        bias_pool = bias_pool.to(dt)
    return MetaLinearFunction.apply(x, query, weight_pool, bias_pool, axis.upper())


# --------------------------------------------------------------------------- adaptive_matmul

class AdaptiveMatmulFunction(torch.autograd.Function):
    """out (G, N, W) = softmax(relu(E Eᵀ), -1) @ V, flash style; saves E, V, out, lse."""

    @staticmethod
    def forward(ctx, e, v):
        out, lse = _kernels("adaptive_propagate").adaptive_matmul_forward(e, v)
        ctx.save_for_backward(e, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        e, v, out, lse = ctx.saved_tensors
        need_e, need_v = ctx.needs_input_grad
        return _kernels("adaptive_propagate").adaptive_matmul_backward(dout, e, v, out, lse, need_e, need_v)


def triton_adaptive_matmul(e, v):
    """e (G, N, D), v (G, N, W) -> (G, N, W)."""
    dt = _common_dtype(e, v)
    return AdaptiveMatmulFunction.apply(e if e.dtype == dt else e.to(dt), v if v.dtype == dt else v.to(dt))


# --------------------------------------------------------------------------- GCRU tail

class GcruGateFunction(torch.autograd.Function):
    """(pre (..., 2H), h (..., H)) -> (sigmoid(pre[..., :H]) * h, sigmoid(pre[..., H:]))."""

    @staticmethod
    def forward(ctx, pre, h):
        ctx.save_for_backward(pre, h)
        return _kernels("gcru").gcru_gate_forward(pre, h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dzh, dr):
        pre, h = ctx.saved_tensors
        dpre, dh = _kernels("gcru").gcru_gate_backward(pre, h, dzh, dr)
        return dpre.view(pre.shape), dh.view(h.shape)


class GcruUpdateFunction(torch.autograd.Function):
    """(pre_c, r, h) (..., H) -> r * h + (1 - r) * tanh(pre_c)."""

    @staticmethod
    def forward(ctx, pre_c, r, h):
        ctx.save_for_backward(pre_c, r, h)
        return _kernels("gcru").gcru_update_forward(pre_c, r, h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        pre_c, r, h = ctx.saved_tensors
        return _kernels("gcru").gcru_update_backward(pre_c, r, h, dout)


def triton_gcru_gate(pre, h):
    dt = _common_dtype(pre, h)
    return GcruGateFunction.apply(pre if pre.dtype == dt else pre.to(dt), h if h.dtype == dt else h.to(dt))


def triton_gcru_update(pre_c, r, h):
    dt = _common_dtype(pre_c, r, h)
    return GcruUpdateFunction.apply(*(t if t.dtype == dt else t.to(dt) for t in (pre_c, r, h)))


_backend.register("meta_linear", "triton", triton_meta_linear, check=_check)
_backend.register("adaptive_matmul", "triton", triton_adaptive_matmul, check=_check)
_backend.register("gcru_gate", "triton", triton_gcru_gate, check=_check)
_backend.register("gcru_update", "triton", triton_gcru_update, check=_check)
