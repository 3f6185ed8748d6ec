"""Helpers shared by the Triton launchers and backend entries: interpreter detection, block
sizes, dot precision, dtype promotion.

Only plain Python (launchers, entries) uses these; the ``@triton.jit`` kernels take the results as
``tl.constexpr`` arguments so that every mode switch compiles away.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._dtypes import acc_dtype as _acc_dtype

# Block edge used for every tiled dimension under TRITON_INTERPRET=1. Small on purpose: the
# interpreter runs each program in numpy, and tiny tiles make CI's small test shapes span
# several tiles, so the masking and multi-tile paths are exercised on CPU.
INTERPRET_BLOCK = 16

# tl.dot needs every operand dimension >= 16 (M, N and K) on NVIDIA tensor cores.
MIN_DOT = 16

# Element offsets are computed in int32 inside the kernels unless a tensor spans more than
# this (see needs_int64).
_MAX_OFFSET = 2 ** 31 - 1


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2_block(n: int, cap: int, floor: int = MIN_DOT) -> int:
    """Power-of-two block edge covering ``n`` (at least ``floor``), capped at ``cap``.

    Under the interpreter the block is ``INTERPRET_BLOCK`` unless ``n`` needs a bigger one
    to be held whole (``cap`` is then reached anyway).
    """
    if interpreting():
        cap = max(floor, min(cap, INTERPRET_BLOCK))
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def whole_block(n: int, floor: int = MIN_DOT) -> int:
    """Power-of-two block holding all of ``n`` at once (for small dims such as D)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def tf32_enabled() -> bool:
    """Whether PyTorch currently allows TF32 for fp32 CUDA matmuls.

    PyTorch has two APIs for the same switch. The current one,
    ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32", or "none" to inherit
    ``torch.backends.fp32_precision``), exists from 2.9 on; once it has been set, reading the
    legacy ``allow_tf32`` raises a RuntimeError, so it must be read first. Setting the legacy
    flag (or ``torch.set_float32_matmul_precision``) updates the new one, so reading the new one
    honours both. Older PyTorch has only ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on ``dtype`` operands.

    fp32 follows PyTorch's flag (:func:`tf32_enabled`): TF32 tensor cores only when PyTorch
    allows them for fp32 matmuls, exact ("ieee") otherwise, so fp32 results match the
    reference to 1e-4 with TF32 off. For 16-bit and fp64 operands Triton ignores the setting;
    "ieee" is accepted everywhere.
    """
    if dtype == torch.float32 and tf32_enabled():
        return "tf32"
    return "ieee"


def needs_int64(**tensors: Optional[torch.Tensor]) -> bool:
    """Whether some tensor spans more elements than int32 offsets reach.

    The kernels compute element offsets in int32 (fewer registers, cheaper address math);
    the launchers pass the result as the ``OFF64`` constexpr, and the kernels then cast their
    row indices (and graph index) to int64 before multiplying by strides, so every offset
    product is 64-bit. Only calls that need it compile and run the int64 variant."""
    for t in tensors.values():
        if t is None:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span > _MAX_OFFSET:
            return True
    return False


def check_rows(rows: int, what: str) -> None:
    """Row indices stay int32 even with OFF64 (only the stride products widen): refuse more."""
    if rows > _MAX_OFFSET:
        raise ValueError(f"{what} has {rows} rows; the Triton kernels index rows in int32 (at most "
                         f"{_MAX_OFFSET}): use backend='torch' or split the batch")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 on CPU / in the interpreter; an
    H100's 132 for meta tensors, which only ahead-of-time compilation launches with)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta":
        return 132
    return 8


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (:func:`himnet_fast._dtypes.acc_dtype`) of ``dtype`` operands."""
    return _acc_dtype(dtype)


def acc_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of :func:`acc_torch_dtype`, passed to kernels as ``tl.constexpr``."""
    return tl.float64 if _acc_dtype(dtype) == torch.float64 else tl.float32


def dot_dtype(dtype: torch.dtype):
    """``tl`` dtype that ``tl.dot`` operands are converted to (``tl.constexpr`` DOT).

    The operands' own dtype, except bf16 under TRITON_INTERPRET=1: the interpreter stores bf16
    as raw uint16 bits and its dot multiplies those bits. bf16 -> fp32 is exact and the
    accumulation is fp32 either way, so the interpreter still checks where the kernels round
    to bf16 (they round before the conversion)."""

    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def round_in_interpreter(dtype: torch.dtype) -> bool:
    """Whether kernels must round fp32 -> bf16 by hand (``tl.constexpr`` RNE).

    GPUs convert fp32 -> bf16 rounding to nearest even; the interpreter truncates (rounds
    toward zero), which doubles the rounding error and would make the bf16 precision tests
    measure the interpreter rather than the kernels. With RNE the kernels round the bits
    themselves before converting; on GPU it is always False and the branch compiles away."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def to_storage(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """``x.to(dtype)`` with round-to-nearest-even also under the interpreter (see
    :func:`round_in_interpreter`)."""
    if RNE:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)
