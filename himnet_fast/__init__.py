"""himnet_fast: fused kernels and drop-in modules for HimNet-style meta-parameter graph
recurrent forecasting models."""
from . import ops
from ._backend import BackendUnavailableError, available_backends
from .nn import HimDecoder, HimEncoder, HimGCN, HimGCRU, HimNet

__version__ = "0.1.0"
__all__ = ["ops", "available_backends", "BackendUnavailableError", "HimGCN", "HimGCRU",
           "HimEncoder", "HimDecoder", "HimNet", "__version__"]
