"""The package imports its Triton kernels from its own tree, whatever else is installed."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
