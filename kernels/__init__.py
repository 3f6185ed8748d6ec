"""Triton kernels, installed as ``himnet_fast.kernels``: one module per op (``meta_linear``,
``adaptive_matmul``, ``gcru``: gate and update, ``block_attention``: SBA), each holding the
op's ``@triton.jit`` kernels and their launchers. The op itself (registration, fake, autograd
formula, dispatch) is ``himnet_fast/ops/<op>.py``, which imports its launchers on first use
(``himnet_fast.ops._triton.launcher``). The submodules need Triton; this package itself imports
nothing."""
