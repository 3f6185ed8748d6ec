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


def test_import_does_not_import_triton():
    """``import himnet_fast`` (and the torch path of every op) neither imports Triton nor any
    kernel module: the "triton" backend registers its ops by name and imports on first use."""
    code = textwrap.dedent("""
        import sys, torch
        import himnet_fast as hf, himnet_fast.sba
        from himnet_fast import _backend
        x = torch.randn(2, 5, 4)
        hf.ops.meta_linear(x, torch.randn(2, 3), torch.randn(3, 4, 6), None, axis="T", backend="torch")
        hf.ops.adaptive_propagate(x, torch.randn(5, 3), 2, backend="torch", dense=False)
        hf.ops.gcru_update(*hf.ops.gcru_gate(torch.randn(2, 5, 8), torch.randn(2, 5, 4), backend="torch"),
                           torch.randn(2, 5, 4), backend="torch")
        assert ("adaptive_matmul", "triton") in _backend._REGISTRY
        loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "himnet_fast.kernels.")))
        print(loaded)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_triton_registration_table_names_each_ops_module():
    """Each op's "triton" entry lives in the kernel module the table names, beside its kernels
    and autograd Function, and the table covers every op the other backends register."""
    from conftest import HAS_TRITON
    from himnet_fast import _backend
    from himnet_fast.ops import _triton_backend as tb

    _backend._ensure_loaded()
    ops = {op for (op, backend) in _backend._REGISTRY if backend == "torch"}
    assert set(tb.OPS) == ops
    for op, (module, name) in tb.OPS.items():
        assert op.startswith(module), (op, module)   # one name through the layers
        assert _backend._REGISTRY[(op, "triton")].fn.__name__ == name == f"triton_{op}"
        assert (ROOT / "kernels" / f"{module}.py").is_file()
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    for op, (module, name) in tb.OPS.items():
        fn = tb.entry(op)
        assert fn.__module__ == f"himnet_fast.kernels.{module}"
        kmod = sys.modules[fn.__module__]
        functions = [v for v in vars(kmod).values()
                     if isinstance(v, type) and issubclass(v, torch.autograd.Function) and v.__module__ == kmod.__name__]
        assert functions, f"{module} defines no autograd Function"
