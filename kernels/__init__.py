"""Triton kernels, installed as ``himnet_fast.kernels``. Importing this package needs Triton;
the ops layer imports it lazily through ``himnet_fast.ops._triton_backend``."""
