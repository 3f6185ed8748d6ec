"""What the ops' "cuda" implementations share: whether the compiled extension can run, and the
tensor side of its calling convention.

The extension (``csrc/``, loaded by :mod:`himnet_fast._cuda_ext_loader`) takes raw device
pointers, so the op modules own the tensor side of the contract through these helpers: every
buffer passed is contiguous, of one dtype, on the tensors' device, and kernels are launched
on PyTorch's current stream of that device (so they order with PyTorch's own work and are
recorded by CUDA-graph capture). The "cuda" implementations are forward-only (inference):
under autograd the dispatcher hands over to a backend with a backward and warns once.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend, _cuda_ext_loader

# Must match csrc/common.cuh (DType, MetaAxis).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
AXIS_CODES = {"T": 0, "S": 1, "ST": 2}


def check(device: torch.device) -> Optional[str]:
    """None when the extension can run on ``device``, else why not (the ``check`` of every
    "cuda" registration): not built (with the import error and how to build it), no CUDA
    device, not CUDA tensors, or no kernel image / too old a driver for this GPU."""
    if _cuda_ext_loader.load() is None:
        return f"extension not built: {_cuda_ext_loader.load_error()}; {_cuda_ext_loader.BUILD_HINT}"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only, got {device.type} tensors"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_ext_loader.device_reason(index)


def ext():
    """The loaded extension module."""
    module = _cuda_ext_loader.load()
    if module is None:  # resolve() checked already; reached only by direct calls
        raise _backend.BackendUnavailableError(
            f"cuda backend: extension not built: {_cuda_ext_loader.load_error()}; {_cuda_ext_loader.BUILD_HINT}")
    return module


def launch_args(ref: torch.Tensor, *tensors: Optional[torch.Tensor]):
    """(dtype code, device index, stream handle) for buffers that must share ref's dtype/device."""
    for t in tensors:
        if t is not None and (t.dtype != ref.dtype or t.device != ref.device):
            raise TypeError(f"cuda backend: all tensors must share dtype {ref.dtype} and device {ref.device}, "
                            f"got {t.dtype} on {t.device}")
    if ref.device.type != "cuda":
        raise _backend.BackendUnavailableError(f"cuda backend: tensors on {ref.device}, expected CUDA tensors")
    code = DTYPE_CODES.get(ref.dtype)
    if code is None:
        raise TypeError(f"cuda backend: dtype must be one of {list(DTYPE_CODES)}, got {ref.dtype}")
    return code, ref.device.index, torch.cuda.current_stream(ref.device).cuda_stream


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()
