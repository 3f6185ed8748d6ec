"""The CUDA extension (csrc/) and the "cuda" backend.

Without a GPU (CI) this file checks what can be checked there:

* the CMake build: configure + build for sm_90 into a temporary directory; the module exists,
  exports PyInit__cuda_ext, imports without a driver and turns CUDA/argument errors into
  Python exceptions;
* the kernels' logic: the same launchers and kernels compiled as host C++ against a CPU
  emulation of the CUDA execution model (csrc/emulation), compared with the reference in
  fp32/bf16/fp16/fp64 at awkward sizes;
* the clear errors: backend="cuda" on CPU tensors raises BackendUnavailableError naming the
  reason, available_backends() leaves "cuda" out.

On a GPU (``-m gpu``) every kernel is compared with the reference at N in {1, 37, 883},
D in {2, 10, 16}, I = 134 in fp32/bf16/fp16, through the real extension.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import himnet_fast as hf
from himnet_fast import _backend, _cuda_ext_loader
import importlib

from himnet_fast.ops import _cuda

# The op modules (the package attributes of the same names are the ops themselves).
_am_mod = importlib.import_module("himnet_fast.ops.adaptive_matmul")
_gcru_mod = importlib.import_module("himnet_fast.ops.gcru")
from himnet_fast.reference import ref_adaptive_graph, ref_meta_linear

ROOT = Path(__file__).resolve().parents[1]
DTYPES_LOWP = (torch.bfloat16, torch.float16)
_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    nvcc = _nvcc()
    if nvcc:
        inc = Path(nvcc).resolve().parent.parent / "include"
        if (inc / "cuda_fp16.h").is_file():
            return inc
    return None


def _pybind11_ok():
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- reference checks

def _ref_meta(x, q, p, pb, axis):
    return ref_meta_linear(x, q, p, pb, axis)


def _ref_amm(e, v):
    return ref_adaptive_graph(e) @ v


def _ref_gate(pre, h):
    H = h.shape[-1]
    zr = torch.sigmoid(pre)
    return torch.cat([zr[..., :H] * h, zr[..., H:]], -1)


def _ref_update(c, r, h):
    return r * h + (1 - r) * torch.tanh(c)


def assert_parity(out: torch.Tensor, ref_fn, inputs, what: str) -> None:
    """fp32/fp64: close to the float64 reference. bf16/fp16: error against the float64
    reference at most twice PyTorch's own error in that dtype, plus one ulp of the largest
    output (flash-attention's criterion)."""
    dtype = out.dtype
    ref64 = ref_fn(*[t.double() if isinstance(t, torch.Tensor) else t for t in inputs])
    assert out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item()) if out.numel() else 1.0
    if dtype == torch.float64:
        assert err <= 1e-10 * scale, f"{what}: fp64 error {err:.3g}"
    elif dtype == torch.float32:
        assert err <= 2e-5 * scale, f"{what}: fp32 error {err:.3g} (scale {scale:.3g})"
    else:
        base = (ref_fn(*inputs).double() - ref64).abs().max().item()
        assert err <= 2 * base + _EPS[dtype] * scale, f"{what}: {dtype} error {err:.3g}, PyTorch's {base:.3g}"


def _meta_inputs(axis, B, N, I, O, D, dtype, device="cpu", bias=True):
    g = torch.Generator().manual_seed(B * 1000 + N * 10 + D)
    x = torch.randn(B, N, I, generator=g)
    q = {"T": torch.randn(B, D, generator=g), "S": torch.randn(N, D, generator=g),
         "ST": torch.randn(B, N, D, generator=g)}[axis]
    p = torch.randn(D, I, O, generator=g) / I ** 0.5
    pb = torch.randn(D, O, generator=g) if bias else None
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (x, q, p, pb)]


def _amm_inputs(G, N, D, W, dtype, device="cpu"):
    g = torch.Generator().manual_seed(G * 1000 + N + D)
    # Scale like trained node embeddings: scores of a few units, some rows all-negative.
    e = torch.randn(G, N, D, generator=g) * (2.0 / D ** 0.5)
    v = torch.randn(G, N, W, generator=g)
    return e.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- CMake build

@pytest.fixture(scope="module")
def built_ext(tmp_path_factory):
    """Configure and build the module with CMake for sm_90 (the CI check of CMakeLists.txt)."""
    missing = [n for n, ok in (("nvcc", _nvcc()), ("cmake", shutil.which("cmake")), ("pybind11", _pybind11_ok()))
               if not ok]
    if missing:
        pytest.skip(f"cannot build the CUDA extension: {', '.join(missing)} not found")
    root = tmp_path_factory.mktemp("cuda_ext")
    build, out = root / "build", root / "out"
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=90",
           f"-DCMAKE_CUDA_COMPILER={_nvcc()}", f"-DPython_EXECUTABLE={sys.executable}",
           f"-DHIMNET_FAST_OUTPUT_DIR={out}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    for cmd in (cfg, ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 1)]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    mods = sorted(out.glob("_cuda_ext*.so"))
    assert len(mods) == 1, f"expected one _cuda_ext module in {out}, found {mods}"
    return mods[0]


@pytest.mark.cuda_ext
def test_cmake_build_exports_module(built_ext):
    assert built_ext.stat().st_size > 0
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    syms = subprocess.run(["nm", "-D", "--defined-only", str(built_ext)], capture_output=True, text=True).stdout
    assert "PyInit__cuda_ext" in syms
    # The CUDA runtime is linked statically: the module must not need libcudart.so at load.
    needed = subprocess.run(["readelf", "-d", str(built_ext)], capture_output=True, text=True).stdout \
        if shutil.which("readelf") else ""
    assert "libcudart" not in needed


@pytest.mark.cuda_ext
def test_built_module_imports_and_reports_errors(built_ext):
    # In a subprocess: importing needs no GPU or driver (the static runtime loads libcuda
    # lazily); without one, every call raises RuntimeError naming the CUDA error.
    code = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("_cuda_ext", {str(built_ext)!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)  # no torch in this process: the module must not need it
assert m.cuda_archs == "90", m.cuda_archs
assert m.cuda_version >= 11000, m.cuda_version
for name in ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update", "probe", "device_count"):
    assert callable(getattr(m, name)), name
try:
    m.gcru_update(0, 0, 0, 0, 10, 9, 0, 0)
except ValueError as exc:
    assert "dtype code" in str(exc), exc
else:
    raise AssertionError("bad dtype code accepted")
try:
    m.meta_linear(1, 1, 1, 0, 1, -3, 1, 4, 4, 2, 2, 0, 0, 0)
except ValueError as exc:
    assert "rows" in str(exc), exc
else:
    raise AssertionError("negative size accepted")
try:
    n = m.device_count()
except RuntimeError as exc:
    assert "cuda" in str(exc).lower(), exc
    print("no-device")
else:
    print("devices", n)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    if not torch.cuda.is_available():
        assert "no-device" in res.stdout


@pytest.mark.cuda_ext
def test_backend_check_with_built_module(built_ext, monkeypatch):
    monkeypatch.setenv(_cuda_ext_loader.ENV_PATH, str(built_ext))
    _cuda_ext_loader._reset()
    try:
        assert _cuda_ext_loader.load() is not None, _cuda_ext_loader.load_error()
        assert "built with CUDA" in _cuda_ext_loader.info()
        if not torch.cuda.is_available():
            reason = _backend.unavailable_reason("meta_linear", "cuda", torch.device("cpu"))
            assert reason is not None and "no CUDA device" in reason
            assert "cuda" not in hf.available_backends()
    finally:
        monkeypatch.delenv(_cuda_ext_loader.ENV_PATH)
        _cuda_ext_loader._reset()


# --------------------------------------------------------------------------- clear errors on CPU

def _cpu_calls():
    x, q, p, pb = _meta_inputs("ST", 2, 3, 4, 5, 2, torch.float32)
    e, v = _amm_inputs(1, 3, 2, 4, torch.float32)
    h = torch.randn(2, 3, 4)
    return {
        "meta_linear": lambda: hf.ops.meta_linear(x, q, p, pb, "ST", backend="cuda"),
        "adaptive_matmul": lambda: hf.ops.adaptive_matmul(e[0], v, backend="cuda"),
        "gcru_gate": lambda: hf.ops.gcru_gate(torch.randn(2, 3, 8), h, backend="cuda"),
        "gcru_update": lambda: hf.ops.gcru_update(h, h, h, backend="cuda"),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
@pytest.mark.parametrize("op", ["meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update"])
def test_cuda_backend_on_cpu_raises_clear_error(op):
    with pytest.raises(hf.BackendUnavailableError) as info:
        _cpu_calls()[op]()
    msg = str(info.value)
    assert "'cuda'" in msg and op in msg
    assert any(s in msg for s in ("extension not built", "no CUDA device")), msg
    if "extension not built" in msg:
        assert "HIMNET_FAST_BUILD_CUDA=1" in msg  # says how to get it


def test_available_backends_tells_the_truth():
    cpu = hf.available_backends("cpu")
    assert "cuda" not in cpu and "torch" in cpu
    reason = _backend.unavailable_reason("gcru_gate", "cuda", torch.device("cpu"))
    assert reason is not None
    if torch.cuda.is_available() and _cuda_ext_loader.load() is not None \
            and _cuda_ext_loader.device_reason(torch.cuda.current_device()) is None:
        assert "cuda" in hf.available_backends("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_himnet_with_cuda_backend_on_cpu_raises():
    model = hf.HimNet(5, hidden_dim=8, backend="cuda").eval()
    x = torch.zeros(1, 12, 5, 3)
    with pytest.raises(hf.BackendUnavailableError, match="cuda"):
        model(x, torch.zeros(1, 12, 5, 2))


def test_backend_function_rejects_mixed_dtypes():
    # Direct calls (bypassing the dispatcher) still refuse what the kernels cannot take.
    x = torch.randn(1, 2, 3)
    with pytest.raises((TypeError, hf.BackendUnavailableError)):
        _gcru_mod.cuda_update_forward(x, x.double(), x)


# --------------------------------------------------------------------------- CPU emulation

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The launchers and kernels of csrc/*.cu compiled as host C++ against csrc/emulation."""
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a host C++20 compiler and the CUDA headers (cuda_fp16.h)")
    out = tmp_path_factory.mktemp("emu")
    flags = ["-std=c++20", "-O1", "-pthread", "-fPIC", "-DHIMNET_EMULATION", "-w", f"-I{ROOT / 'csrc'}", f"-I{inc}"]
    sources = ["csrc/meta_linear.cu", "csrc/adaptive_matmul.cu", "csrc/gcru.cu", "csrc/emulation/emu_main.cpp"]
    # One compiler process per translation unit, in parallel: this is most of the fixture's time.
    procs = [subprocess.Popen([cxx, *flags, "-x", "c++", "-c", str(ROOT / src), "-o", str(out / f"{i}.o")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, src in enumerate(sources)]
    for src, proc in zip(sources, procs):
        _, err = proc.communicate()
        assert proc.returncode == 0, f"compiling {src} for the emulation failed:\n{err[-4000:]}"
    lib = out / "himnet_emu.so"
    res = subprocess.run([cxx, "-shared", "-pthread", *[str(out / f"{i}.o") for i in range(len(sources))],
                          "-o", str(lib)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    dll = ctypes.CDLL(str(lib))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.emu_meta_linear.argtypes = [P] * 5 + [I64] * 5 + [I, I]
    dll.emu_adaptive_matmul.argtypes = [P] * 4 + [I64] * 4 + [I]
    dll.emu_gcru_gate.argtypes = [P] * 4 + [I64] * 2 + [I]
    dll.emu_gcru_update.argtypes = [P] * 4 + [I64] + [I]
    return dll


def _p(t):
    return None if t is None else t.data_ptr()


def _code(dtype):
    return _cuda.DTYPE_CODES[dtype]


def emu_meta_linear(dll, x, q, p, pb, axis):
    B, N, I = x.shape
    D, _, O = p.shape
    y = torch.full((B, N, O), float("nan"), dtype=x.dtype)
    rc = dll.emu_meta_linear(_p(x), _p(q), _p(p), _p(pb), _p(y), B * N, N, I, O, D,
                             _cuda.AXIS_CODES[axis], _code(x.dtype))
    assert rc == 0
    return y


def emu_adaptive_matmul(dll, e, v):
    G, N, D = e.shape
    W = v.shape[-1]
    out = torch.full((G, N, W), float("nan"), dtype=v.dtype)
    stats = torch.empty(G, N, 2, dtype=torch.float64 if v.dtype == torch.float64 else torch.float32)
    assert dll.emu_adaptive_matmul(_p(e), _p(v), _p(out), _p(stats), G, N, D, W, _code(v.dtype)) == 0
    return out


def emu_gate(dll, pre, h):
    zh, r = torch.full_like(h, float("nan")), torch.full_like(h, float("nan"))
    H = h.shape[-1]
    assert dll.emu_gcru_gate(_p(pre), _p(h), _p(zh), _p(r), h.numel() // H, H, _code(h.dtype)) == 0
    return torch.cat([zh, r], -1)


def emu_update(dll, c, r, h):
    out = torch.full_like(h, float("nan"))
    assert dll.emu_gcru_update(_p(c), _p(r), _p(h), _p(out), h.numel(), _code(h.dtype)) == 0
    return out


ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_emulated_meta_linear(emu, axis, dtype):
    # Two row tiles with a remainder, two column tiles with a remainder, I = 134 (9 input
    # stages, the last partial), D = 10 (partial pool stage).
    inputs = _meta_inputs(axis, 2, 37, 134, 70, 10, dtype)
    assert_parity(emu_meta_linear(emu, *inputs, axis), _ref_meta, inputs + [axis], f"meta_linear {axis}")


@pytest.mark.cuda_ext
@pytest.mark.parametrize("shape", [(1, 1, 134, 3, 2, True), (3, 5, 17, 64, 16, False), (2, 3, 5, 1, 18, True),
                                   (1, 4, 0, 5, 3, True), (2, 3, 6, 4, 0, False)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_meta_linear_edge_sizes(emu, shape):
    # N = 1, D = 2; exact 64-column tile; D = 18 (two query chunks); O = 1; I = 0 (bias only);
    # D = 0 (an empty pool: y = 0).
    *dims, bias = shape
    for axis in ("T", "ST"):
        inputs = _meta_inputs(axis, *dims, torch.float32, bias=bias)
        assert_parity(emu_meta_linear(emu, *inputs, axis), _ref_meta, inputs + [axis], f"meta_linear {axis} {shape}")


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 2, 5), (1, 37, 16, 130), (3, 37, 10, 67), (2, 70, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_adaptive_matmul(emu, shape, dtype):
    # G = 1 with wide folded columns (static graph) and G > 1 (per-sample); N = 1; odd D;
    # key blocks with remainders in both passes.
    e, v = _amm_inputs(*shape, dtype)
    assert_parity(emu_adaptive_matmul(emu, e, v), _ref_amm, [e, v], f"adaptive_matmul {shape}")


@pytest.mark.cuda_ext
def test_emulated_adaptive_matmul_large_embedding(emu):
    # D = 100 (padded row stride 101; on a GPU the > 48 KB shared-memory opt-in path).
    e, v = _amm_inputs(2, 40, 100, 20, torch.float32)
    assert_parity(emu_adaptive_matmul(emu, e * 0.3, v), _ref_amm, [e * 0.3, v], "D=100")


@pytest.mark.cuda_ext
def test_emulated_adaptive_matmul_uniform_rows(emu):
    # Rows whose scores are all <= 0 become uniform (softmax of zeros), as in the original.
    e = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]])
    v = torch.randn(1, 3, 4)
    assert_parity(emu_adaptive_matmul(emu, e, v), _ref_amm, [e, v], "uniform rows")


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 64), (2, 5, 97)], ids=lambda s: "x".join(map(str, s)))
def test_emulated_gcru_tail(emu, shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    B, N, H = shape
    pre = (torch.randn(B, N, 2 * H, generator=g) * 4).to(dtype)
    h, c = torch.randn(B, N, H, generator=g).to(dtype), (torch.randn(B, N, H, generator=g) * 3).to(dtype)
    r = torch.rand(B, N, H, generator=g).to(dtype)
    assert_parity(emu_gate(emu, pre, h), _ref_gate, [pre, h], "gcru_gate")
    assert_parity(emu_update(emu, c, r, h), _ref_update, [c, r, h], "gcru_update")


# --------------------------------------------------------------------------- GPU parity

@pytest.fixture(scope="module")
def gpu_ext():
    """The extension the "cuda" backend will use on this GPU machine, or skip saying why."""
    if _cuda_ext_loader.load() is None:
        pytest.skip(f"CUDA extension not built: {_cuda_ext_loader.load_error()}")
    reason = _cuda_ext_loader.device_reason(torch.cuda.current_device())
    if reason is not None:
        pytest.skip(reason)
    return _cuda_ext_loader.load()


GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", [2, 10, 16])
@pytest.mark.parametrize("N", [1, 37, 883])
@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_gpu_meta_linear(gpu_ext, axis, N, D, dtype):
    inputs = _meta_inputs(axis, 3, N, 134, 70, D, dtype, device="cuda")
    with torch.no_grad():
        y = hf.ops.meta_linear(*inputs, axis, backend="cuda")
    assert_parity(y, _ref_meta, inputs + [axis], f"meta_linear {axis} N={N} D={D}")


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", [2, 10, 16, 100])
@pytest.mark.parametrize("N", [1, 37, 883])
@pytest.mark.parametrize("per_sample", [False, True], ids=["static", "per_sample"])
def test_gpu_adaptive_matmul(gpu_ext, per_sample, N, D, dtype):
    # Static graph: G = 1 with the batch folded into 4 * 67 value columns; per-sample: G = 4.
    # D = 100 needs more than 48 KB of shared memory (the opt-in path).
    G, W = (4, 67) if per_sample else (1, 4 * 67)
    e, v = _amm_inputs(G, N, D, W, dtype, device="cuda")
    with torch.no_grad():
        out = _am_mod.cuda_forward(e, v)[0]
    assert_parity(out, _ref_amm, [e, v], f"adaptive_matmul G={G} N={N} D={D}")


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("cheb_k", [2, 3])
@pytest.mark.parametrize("N", [1, 37, 883])
def test_gpu_adaptive_propagate(gpu_ext, N, cheb_k, dtype):
    from himnet_fast.reference import ref_adaptive_propagate
    g = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, 5, generator=g).to("cuda", dtype)
    for emb in (torch.randn(N, 10, generator=g), torch.randn(3, N, 10, generator=g)):
        emb = (emb * 0.6).to("cuda", dtype)
        with torch.no_grad():
            out = hf.ops.adaptive_propagate(x, emb, cheb_k, backend="cuda", dense=False)
        assert_parity(out, lambda a, b: ref_adaptive_propagate(a, b, cheb_k), [x, emb], f"propagate k={cheb_k}")


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (16, 883, 64), (3, 37, 97)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_gcru_tail(gpu_ext, shape, dtype):
    B, N, H = shape
    pre = (torch.randn(B, N, 2 * H, device="cuda") * 4).to(dtype)
    h, c = torch.randn(B, N, H, device="cuda").to(dtype), (torch.randn(B, N, H, device="cuda") * 3).to(dtype)
    r = torch.rand(B, N, H, device="cuda").to(dtype)
    zh, rr = hf.ops.gcru_gate(pre, h, backend="cuda")
    assert_parity(torch.cat([zh, rr], -1), _ref_gate, [pre, h], "gcru_gate")
    assert_parity(hf.ops.gcru_update(c, r, h, backend="cuda"), _ref_update, [c, r, h], "gcru_update")


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_non_contiguous_and_empty(gpu_ext):
    x = torch.randn(134, 37, 3, device="cuda").permute(2, 1, 0)  # (3, 37, 134), non-contiguous
    q = torch.randn(3, 37, 10, device="cuda")
    p = torch.randn(10, 134, 70, device="cuda") / 12
    with torch.no_grad():
        y = hf.ops.meta_linear(x, q, p, None, "ST", backend="cuda")
    assert_parity(y, _ref_meta, [x, q, p, None, "ST"], "non-contiguous x")
    empty = torch.empty(0, 37, 134, device="cuda")
    assert hf.ops.meta_linear(empty, q[:0], p, None, "ST", backend="cuda").shape == (0, 37, 70)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_autograd_falls_back_with_one_warning(gpu_ext):
    x, q, p, pb = _meta_inputs("ST", 2, 37, 134, 70, 10, torch.float32, device="cuda")
    x.requires_grad_(True)
    _backend._WARNED.clear()
    with pytest.warns(UserWarning, match="no backward"):
        y = hf.ops.meta_linear(x, q, p, pb, "ST", backend="cuda")
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_himnet_cuda_backend_matches_torch(gpu_ext):
    torch.manual_seed(0)
    fast = hf.HimNet(37, hidden_dim=32, backend="cuda").cuda().eval()
    ref = hf.HimNet(37, hidden_dim=32, backend="torch").cuda().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 12, 37, 3, device="cuda")
    x[..., 1] = torch.rand(4, 12, 37, device="cuda")
    x[..., 2] = torch.randint(0, 7, (4, 12, 37), device="cuda").float()
    y_cov = x[..., 1:3].clone()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, y_cov), ref(x, y_cov), atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- Python glue, emulated

class _EmulatedModule:
    """Stands in for the pybind11 module: same call signatures, kernels run by the emulation."""

    calls: dict = {}

    def __init__(self, dll):
        self.dll = dll

    def __getattribute__(self, name):
        if name in ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update"):
            _EmulatedModule.calls[name] = _EmulatedModule.calls.get(name, 0) + 1
        return object.__getattribute__(self, name)

    def meta_linear(self, x, q, p, pb, y, rows, nodes, in_dim, out_dim, pool_dim, axis, dtype, device, stream):
        assert self.dll.emu_meta_linear(x, q, p, pb or None, y, rows, nodes, in_dim, out_dim, pool_dim, axis, dtype) == 0

    def adaptive_matmul(self, e, v, out, stats, groups, nodes, embed_dim, width, dtype, device, stream):
        assert self.dll.emu_adaptive_matmul(e, v, out, stats, groups, nodes, embed_dim, width, dtype) == 0

    def gcru_gate(self, pre, h, zh, r, rows, hidden, dtype, device, stream):
        assert self.dll.emu_gcru_gate(pre, h, zh, r, rows, hidden, dtype) == 0

    def gcru_update(self, pre_c, r, h, out, numel, dtype, device, stream):
        assert self.dll.emu_gcru_update(pre_c, r, h, out, numel, dtype) == 0


@pytest.fixture
def emulated_cuda_backend(emu, monkeypatch):
    """The "cuda" backend's Python functions over the emulated kernels, runnable on CPU tensors:
    checks the glue (contiguity, sizes, codes, the static-graph folding, cheb_k recursion)."""
    _EmulatedModule.calls = {}
    monkeypatch.setattr(_cuda, "ext", lambda: _EmulatedModule(emu))
    monkeypatch.setattr(_cuda, "launch_args", lambda ref, *ts: (_cuda.DTYPE_CODES[ref.dtype], 0, 0))
    for op in ("meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update"):
        impl = _backend._REGISTRY[(op, "cuda")]
        monkeypatch.setitem(_backend._REGISTRY, (op, "cuda"), _backend.Impl(impl.forward, None, lambda device: None))


@pytest.mark.cuda_ext
@pytest.mark.parametrize("axis", ["T", "S", "ST"])
def test_emulated_backend_meta_linear_non_contiguous(emulated_cuda_backend, axis):
    x, q, p, pb = _meta_inputs(axis, 3, 5, 7, 6, 4, torch.float32)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    p = p.transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad():
        y = hf.ops.meta_linear(x, q, p, pb, axis, backend="cuda")
    assert_parity(y, _ref_meta, [x, q, p, pb, axis], f"glue meta_linear {axis}")


@pytest.mark.cuda_ext
@pytest.mark.parametrize("cheb_k", [2, 3])
def test_emulated_backend_adaptive_propagate(emulated_cuda_backend, cheb_k):
    from himnet_fast.reference import ref_adaptive_propagate
    g = torch.Generator().manual_seed(cheb_k)
    x = torch.randn(3, 11, 5, generator=g)
    for emb in (torch.randn(11, 6, generator=g), torch.randn(3, 11, 6, generator=g)):  # static, per-sample
        out = hf.ops.adaptive_propagate(x, emb * 0.6, cheb_k, backend="cuda", dense=False)
        assert_parity(out, lambda a, b: ref_adaptive_propagate(a, b, cheb_k), [x, emb * 0.6], "glue propagate")


@pytest.mark.cuda_ext
def test_emulated_backend_himnet_forward(emulated_cuda_backend):
    # The whole eval forward through the "cuda" backend's glue and kernels (emulated) equals
    # the torch backend: both encoders, 12 decoder steps, static and per-sample graphs.
    torch.manual_seed(0)
    fast = hf.HimNet(9, hidden_dim=8, out_steps=3, backend="cuda", dense_graph=False).eval()
    ref = hf.HimNet(9, hidden_dim=8, out_steps=3, backend="torch").eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 4, 9, 3)
    x[..., 1], x[..., 2] = torch.rand(2, 4, 9), torch.randint(0, 7, (2, 4, 9)).float()
    y_cov = x[:, :3, :, 1:3].clone()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, y_cov), ref(x, y_cov), atol=1e-5, rtol=1e-4)
    # Every op really ran through the extension's glue (nothing fell back to torch).
    assert set(_EmulatedModule.calls) == {"meta_linear", "adaptive_matmul", "gcru_gate", "gcru_update"}
