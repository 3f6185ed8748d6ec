"""The accumulation dtype, one definition for the ops and the kernels' launchers."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of ``dtype``: fp32 for fp32/bf16/fp16 (sums and softmax statistics
    never in 16 bits), fp64 for fp64 (so float64 gradchecks stay exact)."""
    return torch.promote_types(dtype, torch.float32)
