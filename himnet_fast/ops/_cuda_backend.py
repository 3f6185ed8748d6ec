"""The "cuda" backend: forward/inference implementations over the compiled extension.

Registers ``meta_linear``, ``adaptive_matmul``, ``gcru_gate`` and ``gcru_update`` with
``has_backward=False``: under autograd the dispatcher hands over to a backend with a
backward (triton, then torch) and warns once. The ``check`` names why the backend cannot run:
the extension is not built (with the import error and how to build it), there is no CUDA
device, the tensors are not CUDA tensors, or the module cannot run on this GPU (driver older
than its toolkit, no kernel image for the architecture).

The extension takes raw device pointers, so this module owns the tensor side of the
contract: every buffer it passes is contiguous, of one dtype, on the tensors' device, and
kernels are launched on PyTorch's current stream of that device (so they order with
PyTorch's own work and are recorded by CUDA-graph capture).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _cuda_ext_loader

# Must match csrc/common.cuh (DType, MetaAxis).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_AXIS_CODES = {"T": 0, "S": 1, "ST": 2}


def _check(device: torch.device) -> Optional[str]:
    if _cuda_ext_loader.load() is None:
        return f"extension not built: {_cuda_ext_loader.load_error()}; {_cuda_ext_loader.BUILD_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only, got {device.type} tensors"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_ext_loader.device_reason(index)


def _ext():
    module = _cuda_ext_loader.load()
    if module is None:  # resolve() checked already; reached only by direct calls
        raise _backend.BackendUnavailableError(
            f"cuda backend: extension not built: {_cuda_ext_loader.load_error()}; {_cuda_ext_loader.BUILD_HINT}")
    return module


def _launch_args(ref: torch.Tensor, *tensors: Optional[torch.Tensor]):
    """(dtype code, device index, stream handle) for buffers that must share ref's dtype/device."""
    for t in tensors:
        if t is not None and (t.dtype != ref.dtype or t.device != ref.device):
            raise TypeError(f"cuda backend: all tensors must share dtype {ref.dtype} and device {ref.device}, "
                            f"got {t.dtype} on {t.device}")
    if ref.device.type != "cuda":
        raise _backend.BackendUnavailableError(f"cuda backend: tensors on {ref.device}, expected CUDA tensors")
    code = _DTYPE_CODES.get(ref.dtype)
    if code is None:
        raise TypeError(f"cuda backend: dtype must be one of {list(_DTYPE_CODES)}, got {ref.dtype}")
    index = ref.device.index
    return code, index, torch.cuda.current_stream(ref.device).cuda_stream


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def cuda_meta_linear(x: torch.Tensor, query: torch.Tensor, weight_pool: torch.Tensor,
                     bias_pool: Optional[torch.Tensor], axis: str) -> torch.Tensor:
    """x (B, N, I), query (B, D) "T" / (N, D) "S" / (B, N, D) "ST", weight_pool (D, I, O),
    bias_pool (D, O) or None -> y (B, N, O) = sum_d q_d (x @ P_d) + q @ Pb."""
    B, N, I = x.shape
    D, _, O = weight_pool.shape
    code, index, stream = _launch_args(x, query, weight_pool, bias_pool)
    x, query, weight_pool = x.contiguous(), query.contiguous(), weight_pool.contiguous()
    bias_pool = None if bias_pool is None else bias_pool.contiguous()
    y = torch.empty((B, N, O), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _ext().meta_linear(_ptr(x), _ptr(query), _ptr(weight_pool), _ptr(bias_pool), _ptr(y),
                       B * N, N, I, O, D, _AXIS_CODES[axis], code, index, stream)
    return y


def cuda_adaptive_matmul(e: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """e (G, N, D), v (G, N, W) -> softmax(relu(e @ eᵀ), -1) @ v, (G, N, W); no N×N buffer.

    A (G, N, 2) fp32 workspace (fp64 for fp64 inputs) holds the per-row softmax statistics
    between the kernel's two passes.
    """
    G, N, D = e.shape
    W = v.shape[-1]
    code, index, stream = _launch_args(v, e)
    e, v = e.contiguous(), v.contiguous()
    out = torch.empty((G, N, W), dtype=v.dtype, device=v.device)
    if out.numel() == 0:
        return out
    stats_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    stats = torch.empty((G, N, 2), dtype=stats_dtype, device=v.device)
    _ext().adaptive_matmul(_ptr(e), _ptr(v), _ptr(out), _ptr(stats), G, N, D, W, code, index, stream)
    return out


def cuda_gcru_gate(pre: torch.Tensor, h: torch.Tensor):
    """pre (..., 2H), h (..., H) -> (sigmoid(pre[..., :H]) * h, sigmoid(pre[..., H:])), each (..., H)."""
    code, index, stream = _launch_args(h, pre)
    pre, h = pre.contiguous(), h.contiguous()
    zh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    r = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    H = h.shape[-1] if h.dim() else 1
    if h.numel() == 0:
        return zh, r
    _ext().gcru_gate(_ptr(pre), _ptr(h), _ptr(zh), _ptr(r), h.numel() // H, H, code, index, stream)
    return zh, r


def cuda_gcru_update(pre_c: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """pre_c, r, h (..., H) -> r * h + (1 - r) * tanh(pre_c)."""
    code, index, stream = _launch_args(h, pre_c, r)
    pre_c, r, h = pre_c.contiguous(), r.contiguous(), h.contiguous()
    out = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    _ext().gcru_update(_ptr(pre_c), _ptr(r), _ptr(h), _ptr(out), h.numel(), code, index, stream)
    return out


_backend.register("meta_linear", "cuda", cuda_meta_linear, has_backward=False, check=_check)
_backend.register("adaptive_matmul", "cuda", cuda_adaptive_matmul, has_backward=False, check=_check)
_backend.register("gcru_gate", "cuda", cuda_gcru_gate, has_backward=False, check=_check)
_backend.register("gcru_update", "cuda", cuda_gcru_update, has_backward=False, check=_check)
