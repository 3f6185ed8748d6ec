"""Build script for himnet_fast.

The Triton kernels live in ``kernels/`` at the top of the repository and are installed as
``himnet_fast.kernels``. The optional CUDA extension (``csrc/``) is built by CMake; see
``docs/cuda.md`` for the environment flags that force or skip it.
"""
from setuptools import find_packages, setup

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
    install_requires=["torch>=2.1", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "bench": ["pandas", "matplotlib", "pytest-benchmark"],
        "train": ["matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "pandas", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["himnet-fast=himnet_fast.cli:main"]},
)
