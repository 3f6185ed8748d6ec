"""Other published models built on the library's ops (see docs/models.md): AGCRN and
HyperST-Net, with a common forecaster signature and :func:`build_model`."""
from .agcrn import AGCRN, AGCRNCell, AVWDCRNN, AVWGCN
from .attributes import attributes_from_files, load_sensor_coordinates, spatial_attributes
from .hyperst import HyperSTGCGRU, HyperSTLSTMD, HyperSTLSTMG
from .registry import MODEL_NAMES, build_model, needs_attributes

__all__ = ["AGCRN", "AGCRNCell", "AVWDCRNN", "AVWGCN", "HyperSTLSTMG", "HyperSTLSTMD", "HyperSTGCGRU",
           "spatial_attributes", "load_sensor_coordinates", "attributes_from_files", "build_model",
           "MODEL_NAMES", "needs_attributes"]
