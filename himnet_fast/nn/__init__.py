"""Drop-in modules: same constructors, parameter names and forwards as the original HimNet."""
from .gcn import GeneratedLinear, HimGCN
from .gcru import HimDecoder, HimEncoder, HimGCRU
from .himnet import HimNet

__all__ = ["HimGCN", "HimGCRU", "HimEncoder", "HimDecoder", "HimNet", "GeneratedLinear"]
