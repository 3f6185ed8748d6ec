"""Import-time registration of the optional backends (Triton, CUDA extension).

Each module registers its implementations with a ``check`` that explains why it cannot run
(package missing, no GPU, extension not built), so `available_backends()` tells the truth and
an explicit request gets that reason in its error.
"""
import importlib

for _name in ("himnet_fast.ops._triton_backend", "himnet_fast.ops._cuda_backend"):
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as exc:  # the backend module itself is absent from this build
        if exc.name != _name:
            raise
