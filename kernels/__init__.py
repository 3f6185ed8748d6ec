"""Triton kernels, installed as ``himnet_fast.kernels``: one module per op, each holding its
kernels, launchers, autograd Function and backend entry (``meta_linear``, ``adaptive_matmul``,
``gcru``: gate and update, ``block_attention``: SBA). The submodules need Triton; the ops layer
imports them lazily (``himnet_fast.ops._triton_backend``, ``himnet_fast.sba.attention``), and
this package itself imports nothing."""
