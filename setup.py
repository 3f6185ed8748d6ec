"""Build script for himnet_fast.

The Triton kernels live in ``kernels/`` at the top of the repository and are installed as
``himnet_fast.kernels``. The optional CUDA extension (``csrc/``) is built by CMake; see
``docs/cuda.md``. Environment flags:

* ``HIMNET_FAST_BUILD_CUDA``: ``0`` never builds it; ``1`` builds it and fails the install if
  that fails; ``auto`` (default) builds it when nvcc, cmake and pybind11 are found and the
  installed PyTorch (if any) has CUDA, and on failure warns and installs without it. A
  CPU-only PyTorch can never hand the extension a CUDA tensor, so ``auto`` does not spend a
  minute of nvcc on it (CI, this repository's development machines).
* ``HIMNET_FAST_CUDA_ARCHS``: CMAKE_CUDA_ARCHITECTURES, default ``90-real;90-virtual``.
* ``CUDACXX`` / ``CUDA_HOME``: which nvcc to use (else the one on PATH, else /usr/local/cuda).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUILD_ENV = "HIMNET_FAST_BUILD_CUDA"
ARCHS_ENV = "HIMNET_FAST_CUDA_ARCHS"


def _log(msg: str) -> None:
    print(f"himnet_fast setup: {msg}", file=sys.stderr, flush=True)


def _build_mode() -> str:
    raw = os.environ.get(BUILD_ENV, "auto").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return "0"
    if raw in ("1", "true", "yes", "on"):
        return "1"
    if raw in ("", "auto"):
        return "auto"
    raise SystemExit(f"{BUILD_ENV} must be 0, 1 or auto, got {raw!r}")


def _find_nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _torch_cuda():
    """torch.version.cuda of the installed PyTorch, read from torch/version.py without
    importing torch; "" when PyTorch is CPU-only, None when it is not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        for line in version_py.read_text().splitlines():
            if line.startswith("cuda"):
                value = line.split("=", 1)[1].strip()
                return "" if value == "None" else value.strip("'\"")
    except OSError:
        return None
    return None


def _cuda_build_decision():
    """(build?, reason) for the CUDA extension under $HIMNET_FAST_BUILD_CUDA."""
    mode = _build_mode()
    if mode == "0":
        return False, f"{BUILD_ENV}=0"
    missing = [name for name, ok in (("nvcc", _find_nvcc()), ("cmake", shutil.which("cmake")),
                                     ("pybind11", importlib.util.find_spec("pybind11"))) if not ok]
    if mode == "1":
        if missing:
            raise SystemExit(f"{BUILD_ENV}=1 but {', '.join(missing)} not found; install them or unset {BUILD_ENV}")
        return True, f"{BUILD_ENV}=1"
    if missing:
        return False, f"{', '.join(missing)} not found ({BUILD_ENV}=1 forces the build)"
    if _torch_cuda() == "":
        return False, f"the installed PyTorch is CPU-only ({BUILD_ENV}=1 forces the build)"
    return True, "nvcc, cmake and pybind11 found"


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt instead of setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuildExt(build_ext):
    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self._build_cmake(ext)
                built.append(ext)
            except (OSError, subprocess.CalledProcessError) as exc:
                if _build_mode() == "1":
                    raise
                _log(f"WARNING: building the CUDA extension failed ({exc}); installing without it. "
                     f"The 'cuda' backend will report it as not built.")
        # Only what was built is copied in place (editable installs) or packaged.
        self.extensions = built

    def _build_cmake(self, ext: CMakeExtension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cfg = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
               f"-DPython_EXECUTABLE={sys.executable}", f"-DHIMNET_FAST_OUTPUT_DIR={target.parent}",
               f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}"]
        if os.environ.get(ARCHS_ENV):
            cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ[ARCHS_ENV]}")
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        _log("building the CUDA extension: " + " ".join(cfg))
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)
        # pybind11 names the module with this interpreter's suffix; setuptools expects the same
        # name, but move it if they ever differ.
        produced = sorted(target.parent.glob("_cuda_ext*" + Path(target).suffix))
        if not produced:
            raise OSError(f"CMake finished but produced no _cuda_ext module in {target.parent}")
        if target not in produced:
            shutil.move(str(produced[0]), str(target))


class BuildPy(build_py):
    """build_py that drops a CUDA module left in build/lib by an earlier build when this one
    does not build it (a non-isolated build reuses build/lib, and would package it stale)."""

    def run(self):
        super().run()
        if not _BUILD and not self.editable_mode:
            for stale in Path(self.build_lib, "himnet_fast").glob("_cuda_ext.*"):
                _log(f"removing {stale} from an earlier build")
                stale.unlink()


_BUILD, _WHY = _cuda_build_decision()
_log(("building" if _BUILD else "skipping") + f" the CUDA extension: {_WHY}")

setup(
    name="himnet_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and drop-in modules for HimNet-style "
    "meta-parameter graph recurrent forecasting",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["himnet_fast", "himnet_fast.*"]) + ["himnet_fast.kernels"],
    include_package_data=True,
    package_data={"himnet_fast": ["py.typed"], "himnet_fast.datasets": ["*.npz", "*.csv", "*.json"]},
    package_dir={"himnet_fast.kernels": "kernels"},
    # pandas: `himnet-fast bench` writes its results with it and `--data` reads CSV/Parquet/HDF5
    install_requires=["torch>=2.1", "numpy", "pandas", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "sba": ["pymetis"],   # METIS partitioning for himnet_fast.sba (docs/sba.md)
        "bench": ["pandas", "matplotlib", "pytest-benchmark"],
        "train": ["matplotlib", "tqdm"],
        "data": ["pyarrow", "tables"],   # --data FILE.parquet / FILE.h5 (the DCRNN metr-la.h5 layout)
        # pybind11: tests/test_cuda_ext.py builds the CUDA extension with CMake (skips without it).
        # The test tools are pinned to the versions the suite was last run with (pytest 9.2
        # changed monkeypatch teardown; a new major can change collection or fixtures).
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "pandas", "matplotlib", "tqdm", "pybind11>=2.10",
                 "triton>=3.0", "pymetis"],
    },
    entry_points={"console_scripts": ["himnet-fast=himnet_fast.cli:main"]},
    ext_modules=[CMakeExtension("himnet_fast._cuda_ext")] if _BUILD else [],
    cmdclass={"build_ext": CMakeBuildExt, "build_py": BuildPy},
)
