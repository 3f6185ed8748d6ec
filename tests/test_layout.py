"""The package imports its Triton kernels from its own tree, whatever else is installed."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_resolve_to_this_checkout():
    import himnet_fast
    import himnet_fast.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
    assert Path(himnet_fast.__file__).resolve().parent == ROOT / "himnet_fast"


def test_a_second_tree_on_pythonpath_uses_its_own_kernels(tmp_path):
    """A copy of the tree imported through PYTHONPATH (a second clone, a worktree) must not
    pick up the kernels of the tree the package was installed from."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(ROOT / "himnet_fast", clone / "himnet_fast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(ROOT / "kernels", clone / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", clone / "setup.py")
    env = dict(os.environ, PYTHONPATH=str(clone))
    out = subprocess.run([sys.executable, "-c", "import himnet_fast, himnet_fast.kernels as k, "
                          "himnet_fast.kernels._utils as u; print(himnet_fast.__file__); print(k.__file__); "
                          "print(u.__file__)"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to(clone.resolve()), out.stdout


def test_ops_run_without_triton_or_kernel_modules():
    """``import himnet_fast`` imports neither Triton nor a kernel module, and the torch path of
    every op runs with Triton made unimportable: the "triton" implementations are registered
    by name and import their kernel module on first use. (PyTorch itself imports Triton, when
    installed, the first time any custom op runs; that is not the library's doing.)"""
    code = textwrap.dedent("""
        import sys
        import himnet_fast
        print(sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "himnet_fast.kernels."))))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None   # `import triton` raises ImportError from here on
        import torch
        import himnet_fast as hf
        from himnet_fast import _backend
        x = torch.randn(2, 5, 4, requires_grad=True)
        y = hf.ops.meta_linear(x, torch.randn(2, 3), torch.randn(3, 4, 6), None, axis="T", backend="torch")
        y = y + hf.ops.adaptive_propagate(x, torch.randn(5, 3), 2, backend="torch", dense=False)[..., :6]
        zh, r = hf.ops.gcru_gate(torch.randn(2, 5, 8), torch.randn(2, 5, 4), backend="torch")
        y.sum().backward()
        hf.HimNet(5, hidden_dim=4, out_steps=2).eval()(torch.zeros(1, 12, 5, 3), torch.zeros(1, 2, 5, 2))
        assert "triton" in _backend.unavailable_reason("adaptive_matmul", "triton", torch.device("cpu"))
        print(sorted(m for m in sys.modules if m.startswith("himnet_fast.kernels.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


OP_MODULES = {   # op -> its module under himnet_fast/ops (and kernels/, where it has Triton code)
    "meta_linear": "meta_linear", "adaptive_matmul": "adaptive_matmul", "adaptive_graph": "adaptive_matmul",
    "gcru_gate": "gcru", "gcru_update": "gcru", "block_attention": "block_attention",
    "partitioned_adaptive_matmul": "partitioned_adaptive", "gcru_cell": "gcru_cell",
}


def test_each_op_is_registered_in_its_own_module():
    """One op, one place: every registered implementation of an op (all backends) comes from
    its op module or that op's kernel module, and every op is a PyTorch custom op
    ``himnet_fast::<op>`` defined in the same op module, with its backward op beside it."""
    import importlib

    from himnet_fast import _backend

    ops = {op for op, _ in _backend._REGISTRY}
    assert ops | {"gcru_cell"} == set(OP_MODULES)
    for (op, backend), impl in _backend._REGISTRY.items():
        home = OP_MODULES[op]
        for fn in (impl.forward, impl.backward):
            if fn is not None:
                assert fn.__module__ in (f"himnet_fast.ops.{home}", f"himnet_fast.kernels.{home}"), (op, backend, fn)
    for op, home in OP_MODULES.items():
        module = importlib.import_module(f"himnet_fast.ops.{home}")
        for name in (op, f"{op}_backward"):
            opdef = getattr(torch.ops.himnet_fast, name).default
            assert opdef is not None
        defined = {v._qualname for v in vars(module).values() if type(v).__name__ == "CustomOpDef"}
        assert {f"himnet_fast::{op}", f"himnet_fast::{op}_backward"} <= defined, (op, defined)


def test_kernel_modules_hold_kernels_and_launchers_only():
    """``kernels/<op>.py`` holds Triton kernels and their launchers: no autograd Function (the
    op's autograd formula is its registration in ``himnet_fast/ops``)."""
    from conftest import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    import importlib

    for module in ("meta_linear", "adaptive_matmul", "gcru", "block_attention"):
        kmod = importlib.import_module(f"himnet_fast.kernels.{module}")
        functions = [v for v in vars(kmod).values()
                     if isinstance(v, type) and issubclass(v, torch.autograd.Function)]
        assert not functions, (module, functions)
        assert any(type(v).__name__ in ("JITFunction", "InterpretedFunction") for v in vars(kmod).values())
