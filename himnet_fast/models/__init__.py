"""Other published models built on the library's ops (see docs/models.md)."""
from .agcrn import AGCRN, AGCRNCell, AVWDCRNN, AVWGCN

__all__ = ["AGCRN", "AGCRNCell", "AVWDCRNN", "AVWGCN"]
