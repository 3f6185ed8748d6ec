"""himnet_fast: fused kernels and drop-in modules for HimNet-style meta-parameter graph
recurrent forecasting models."""


def _bind_checkout_kernels() -> None:
    """In a source checkout the Triton kernels live in ``kernels/`` beside this package (the
    installed layout puts them inside it). Bind that folder as ``himnet_fast.kernels`` here, so
    the kernels always come from the same tree as the package: an editable install's import
    hook maps the name to the tree it was installed from, which is another tree when this one
    is imported through PYTHONPATH or a second clone."""
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kdir = os.path.join(root, "kernels")
    init = os.path.join(kdir, "__init__.py")
    # Only this project's checkout (setup.py and our kernel files), never an unrelated
    # top-level "kernels" package that happens to sit beside an installed copy.
    if (__name__ + ".kernels" in sys.modules or not os.path.isfile(init)
            or not os.path.isfile(os.path.join(root, "setup.py"))
            or not os.path.isfile(os.path.join(kdir, "adaptive_matmul.py"))):
        return
    spec = importlib.util.spec_from_file_location(__name__ + ".kernels", init, submodule_search_locations=[kdir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_bind_checkout_kernels()

from . import ops  # noqa: E402
from ._backend import BackendUnavailableError, available_backends  # noqa: E402
from .nn import HimDecoder, HimEncoder, HimGCN, HimGCRU, HimNet  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "available_backends", "BackendUnavailableError", "HimGCN", "HimGCRU",
           "HimEncoder", "HimDecoder", "HimNet", "CapturedTrainStep", "__version__"]


def __getattr__(name):
    # The training package (optimizers, data pipeline) is imported on first use only.
    if name == "CapturedTrainStep":
        from .training.captured import CapturedTrainStep

        return CapturedTrainStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
