"""Ahead-of-time compilation of every Triton kernel at the model's real call shapes, no GPU.

``python -m himnet_fast.aot [--grid full|default] [--arch 90] [--out DIR]``

How: Triton's active driver is replaced by :class:`AotDriver`, which reports an sm_XX target
and a device 0 but has no GPU behind it, and ``JITFunction.run`` is wrapped so that every
launch only compiles (Triton's ``warmup`` path) and records the compiled kernel and its grid.
The real model (:class:`himnet_fast.HimNet`, backend "triton", streamed and dense graphs) then
runs forward and backward on **meta** tensors: the real launchers compute their grids, block
sizes and constexprs from real shapes, ``check_offsets`` and the other launcher checks run,
and nothing is allocated. Identical specialisations compile once (Triton's per-kernel cache
in the process, its on-disk cache across runs).

Per compiled kernel the table records registers, stack frame (= spill space: the kernels have
no local arrays and no calls, so a non-zero stack frame means register spills) and shared
memory, read from the cubin Triton itself produced (``cuobjdump -res-usage``; ``shared`` is
Triton's dynamic shared memory from the kernel metadata plus the static part).

Must run in a process where Triton was not imported under ``TRITON_INTERPRET=1`` (the test
suite runs it in a subprocess).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch

SMEM_LIMIT = 227 * 1024  # H100 (sm_90): max dynamic shared memory per block, opt-in
H100_SMS = 132
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Config:
    """One model configuration: N nodes, batch B, hidden width, embedding width D, cheb_k."""
    precision: str
    N: int
    B: int
    hidden: int
    D: int
    cheb_k: int

    @property
    def label(self) -> str:
        return f"{self.precision} N={self.N} B={self.B} h={self.hidden} D={self.D} k={self.cheb_k}"


def full_grid() -> List[Config]:
    """``--grid full``: fp32/TF32/bf16 x N in {883, 100000} x hidden {64, 96} x D {2, 10, 16, 32}
    x cheb_k {2, 3}, B = 16 (96 configurations; D is the width of every embedding)."""
    return [Config(p, n, 16, h, d, k) for p, n, h, d, k in
            itertools.product(PRECISIONS, (883, 100_000), (64, 96), (2, 10, 16, 32), (2, 3))]


def default_grid() -> List[Config]:
    """A subset for the default test suite: every precision at N = 883 and N = 100,000 with the
    PEMS07 preset's widths (hidden 64, D 16, cheb_k 2), plus the extremes hidden 96 / D 32 /
    cheb_k 3 in fp32 (the widest tiles, most registers)."""
    out = [Config(p, n, 16, 64, 16, 2) for p in PRECISIONS for n in (883, 100_000)]
    out += [Config("fp32", 883, 16, 96, 32, 3), Config("bf16", 883, 16, 96, 2, 3)]
    return out


# --------------------------------------------------------------------------- fake driver

def _install_driver(arch: int):
    """Make Triton compile for ``sm_<arch>`` with no GPU, and turn launches into compiles.

    Returns the list that collects ``(kernel name, grid, compiled kernel, constexprs, integer
    specialisations)`` per launch. The compiled (not interpreted) JIT must be active:
    TRITON_INTERPRET is read when a kernel is defined, so this must run before
    ``himnet_fast.kernels`` is imported (a fresh process: the tests use a subprocess)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        if "himnet_fast.kernels" in sys.modules:
            raise RuntimeError("himnet_fast.kernels was imported under TRITON_INTERPRET=1: AOT compilation "
                               "needs a fresh process without it")
        del os.environ["TRITON_INTERPRET"]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton  # noqa: F401
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class AotDriver(DriverBase):
        """Target sm_<arch>, device 0, stream 0; nothing can run."""

        @classmethod
        def is_active(cls):
            return True

        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("AOT driver cannot launch")

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise NotImplementedError("AOT driver cannot launch")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError("AOT driver cannot launch")

        def clear_cache(self, cache):
            pass

    driver.set_active(AotDriver())
    records: List[tuple] = []
    if not getattr(JITFunction.run, "_himnet_aot", False):
        orig = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            # warmup=True: specialise and compile exactly as a launch would, then stop.
            kernel = orig(self, *args, grid=grid, warmup=True, **kwargs)
            if callable(grid):
                grid = None
            consts = {k: v for k, v in kwargs.items() if k.isupper()}  # the launchers' constexprs
            JITFunction.run._records.append((self.fn.__name__, tuple(grid) if grid else None, kernel, consts,
                                             _int_spec(self.arg_names, args)))
            return kernel

        run._himnet_aot = True
        JITFunction.run = run
    JITFunction.run._records = records
    return records


def _int_spec(names, args) -> str:
    """Triton's integer specialisations of a launch: ints equal to 1 become constants, ints
    divisible by 16 get an alignment hint. Two launches with the same constexprs but different
    such ints are different kernels (different registers)."""
    ones = [n for n, v in zip(names, args) if type(v) is int and v == 1]
    d16 = [n for n, v in zip(names, args) if type(v) is int and v != 1 and v % 16 == 0]
    return f"=1:{','.join(ones) or '-'} %16:{','.join(d16) or '-'}"


# --------------------------------------------------------------------------- resources

_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with triton's nvidia backend)")
    return path


def cubin_resources(cubin: bytes, tmpdir: str) -> Tuple[int, int, int, int]:
    """(registers, stack bytes, static shared bytes, local bytes) of a one-kernel cubin."""
    path = os.path.join(tmpdir, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True)
    m = _RES.search(res.stdout)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {res.stdout[-500:]}")
    return tuple(int(x) for x in m.groups())  # type: ignore[return-value]


@dataclass
class Row:
    """One distinct compiled kernel (kernel + constexprs + num_warps)."""
    kernel: str
    constexprs: str
    int_spec: str
    num_warps: int
    regs: int
    spill_bytes: int
    shared_bytes: int
    max_grid_ctas: int
    min_grid_ctas: int
    configs: List[str] = field(default_factory=list)

    @property
    def backward(self) -> bool:
        return "_bwd" in self.kernel


def _constexpr_text(consts: Dict[str, object]) -> str:
    """The launch's constexprs (block sizes, modes, dot dtype) in a short stable form."""
    parts = []
    for name, v in sorted(consts.items()):
        if name in ("ACC", "RNE"):  # ACC is fp32 for every dtype here; RNE is False on GPU
            continue
        parts.append(f"{name}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- driving the model

@contextlib.contextmanager
def _precision(precision: str):
    """fp32 exact / TF32 via PyTorch's matmul switch (what the launchers read)."""
    from himnet_fast.kernels import _utils
    old = _utils.tf32_enabled
    _utils.tf32_enabled = (lambda: True) if precision == "tf32" else (lambda: False)
    try:
        yield
    finally:
        _utils.tf32_enabled = old


def run_config(cfg: Config) -> None:
    """HimNet forward + backward on meta tensors through the Triton launchers: once with
    streamed graphs (the adaptive-product kernels), once with the graphs dense where they fit
    the budget (the fused recurrent step's kernels; at N = 100,000 that is streamed again)."""
    from himnet_fast import HimNet
    from himnet_fast.ops import _triton as tb

    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    half = max(1, cfg.D // 2)
    with torch.device("meta"), tb.allow_meta(), _precision(cfg.precision):
        for dense in (False, None):
            model = HimNet(cfg.N, hidden_dim=cfg.hidden, cheb_k=cfg.cheb_k, node_embedding_dim=cfg.D,
                           st_embedding_dim=cfg.D, tod_embedding_dim=half, dow_embedding_dim=cfg.D - half,
                           backend="triton", dense_graph=dense, check_inputs=False,
                           use_teacher_forcing=False).to(dtype)
            x = torch.empty(cfg.B, 12, cfg.N, 3, dtype=dtype)
            y_cov = torch.empty(cfg.B, 12, cfg.N, 2, dtype=dtype)
            y = model(x, y_cov)
            y.sum().backward()


def compile_grid(configs: Iterable[Config], arch: int = 90, verbose: bool = False) -> Tuple[List[Row], List[str]]:
    """Compile every kernel the model launches for ``configs``. Returns (rows, failures)."""
    import tempfile
    records = _install_driver(arch)
    rows: Dict[str, Row] = {}
    failures: List[str] = []
    res_cache: Dict[str, Tuple[int, int, int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            t0 = time.time()
            del records[:]
            try:
                run_config(cfg)
            except Exception as exc:  # a compile error or a launcher refusing the shapes
                failures.append(f"{cfg.label}: {type(exc).__name__}: {str(exc)[:2000]}")
                if verbose:
                    print(f"FAIL {cfg.label}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                continue
            for name, grid, kernel, consts, spec in records:
                key = kernel.hash
                if key not in res_cache:
                    res_cache[key] = cubin_resources(kernel.asm["cubin"], tmp)
                regs, stack, static_smem, _local = res_cache[key]
                ctas = 1
                for g in grid or (0,):
                    ctas *= int(g)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = Row(name, _constexpr_text(consts), spec, kernel.metadata.num_warps, regs, stack,
                                          kernel.metadata.shared + static_smem, ctas, ctas)
                row.max_grid_ctas = max(row.max_grid_ctas, ctas)
                row.min_grid_ctas = min(row.min_grid_ctas, ctas)
                if cfg.label not in row.configs:
                    row.configs.append(cfg.label)
            if verbose:
                print(f"{cfg.label}: {len(records)} launches, {time.time() - t0:.1f} s", file=sys.stderr)
    return sorted(rows.values(), key=lambda r: (r.kernel, r.constexprs, r.int_spec, r.num_warps)), failures


def problems(rows: List[Row]) -> List[str]:
    """What the AOT check refuses: > 227 KB shared memory anywhere, spills in a forward kernel."""
    out = []
    for r in rows:
        if r.shared_bytes > SMEM_LIMIT:
            out.append(f"{r.kernel} [{r.constexprs}] uses {r.shared_bytes} B shared memory > {SMEM_LIMIT}")
        if r.spill_bytes and not r.backward:
            out.append(f"forward kernel {r.kernel} [{r.constexprs}] spills ({r.spill_bytes} B stack per thread)")
    return out


# --------------------------------------------------------------------------- tables

FIELDS = ["kernel", "constexprs", "int_spec", "num_warps", "regs", "spill_bytes", "shared_bytes", "min_grid_ctas",
          "max_grid_ctas", "n_configs"]


def write_tables(rows: List[Row], out_dir: str, arch: int, grid_name: str, n_configs: int, seconds: float) -> None:
    import triton
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"triton_sm{arch}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for r in rows:
            w.writerow([r.kernel, r.constexprs, r.int_spec, r.num_warps, r.regs, r.spill_bytes, r.shared_bytes,
                        r.min_grid_ctas, r.max_grid_ctas, len(r.configs)])
    lines = [f"# Triton kernels compiled for sm_{arch} (AOT, no GPU)", "",
             f"Generated by `python -m himnet_fast.aot --grid {grid_name} --arch {arch}` "
             f"(triton {triton.__version__}, torch {torch.__version__}): {n_configs} model configurations, "
             f"{len(rows)} distinct kernels, {seconds:.0f} s on the machine that wrote it "
             "(Triton's on-disk cache may have been warm; a cold full grid takes ~10 min on 2 loaded cores).",
             "Registers and stack frame (spill space per thread) from `cuobjdump -res-usage` of Triton's cubin; "
             "shared = dynamic (Triton metadata) + static bytes per CTA (limit 227 KB). "
             f"Grid CTAs: smallest and largest launch over the configurations (H100: {H100_SMS} SMs). "
             "No time here: nothing ran on a GPU.", "",
             "int spec: Triton's integer specialisations (arguments equal to 1 become constants, "
             "those divisible by 16 get alignment hints), which is why equal constexprs can appear twice.", "",
             "| kernel | constexprs | int spec | warps | regs | spill B | smem B | CTAs min-max | configs |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.constexprs} | {r.int_spec} | {r.num_warps} | {r.regs} | {r.spill_bytes} | "
                     f"{r.shared_bytes} | {r.min_grid_ctas}-{r.max_grid_ctas} | {len(r.configs)} |")
    with open(os.path.join(out_dir, f"triton_sm{arch}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CUDA extension (csrc/)

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


@dataclass
class CudaRow:
    """One kernel instantiation of csrc/ as ptxas reports it."""
    source: str
    kernel: str
    regs: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    static_smem: int


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDACXX, $CUDA_HOME/bin, PATH or /usr/local/cuda/bin (as setup.py looks)."""
    import shutil
    cands = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.exists(c):
            return c
    return None


def _demangle(names: List[str]) -> List[str]:
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        out = res.stdout.strip().split("\n")
        return out if len(out) == len(names) else names
    except (OSError, subprocess.CalledProcessError):
        return names


def parse_ptxas(log: str, source: str) -> List[CudaRow]:
    """Rows from ``ptxas -v`` output (one entry function after another)."""
    rows: List[CudaRow] = []
    cur: Optional[dict] = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1)}
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            cur.update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            rows.append(CudaRow(source, cur["kernel"], int(m.group(1)), cur.get("stack", 0), cur.get("st", 0),
                                cur.get("ld", 0), int(m.group(2) or 0)))
            cur = None
    for row, name in zip(rows, _demangle([r.kernel for r in rows])):
        row.kernel = name
    return rows


def compile_cuda(root: str, arch: int = 90, nvcc: Optional[str] = None) -> List[CudaRow]:
    """Compile csrc/*.cu for sm_<arch> the way CMakeLists.txt does (C++17, -O3, Release) with
    ``-Xptxas -v`` and return per-kernel resources. Raises when nvcc fails."""
    import glob
    import tempfile
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDACXX or CUDA_HOME)")
    rows: List[CudaRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(glob.glob(os.path.join(root, "csrc", "*.cu"))):
            cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", f"-arch=sm_{arch}", "-Xptxas", "-v,-warn-spills",
                   "-I", os.path.join(root, "csrc"), "-c", src, "-o", os.path.join(tmp, "k.o")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
            rows += parse_ptxas(res.stderr + res.stdout, os.path.basename(src))
    return rows


def write_cuda_tables(rows: List[CudaRow], out_dir: str, arch: int, nvcc_version: str, seconds: float) -> None:
    os.makedirs(out_dir, exist_ok=True)
    fields = ["source", "kernel", "regs", "stack_bytes", "spill_stores", "spill_loads", "static_smem"]
    with open(os.path.join(out_dir, f"cuda_sm{arch}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for r in rows:
            w.writerow([getattr(r, k) for k in fields])
    lines = [f"# CUDA extension (csrc/) compiled for sm_{arch} (no GPU)", "",
             f"Generated by `python -m himnet_fast.aot --cuda --arch {arch}` with {nvcc_version} "
             f"({seconds:.0f} s): `nvcc -O3 -arch=sm_{arch} -Xptxas -v` per file, as CMakeLists.txt builds it. "
             "smem is the static part only; the dynamic part is set at launch from D "
             "(csrc/adaptive_matmul.cu, `stats_smem` / `matmul_smem`).", "",
             "| source | kernel | regs | stack B | spill stores B | spill loads B | static smem B |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.source} | `{r.kernel}` | {r.regs} | {r.stack_bytes} | {r.spill_stores} | "
                     f"{r.spill_loads} | {r.static_smem} |")
    with open(os.path.join(out_dir, f"cuda_sm{arch}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m himnet_fast.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", choices=("full", "default"), default="full")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", default=None, help="write triton_sm<arch>.csv/.md here (default: no tables)")
    p.add_argument("--cuda", action="store_true", help="compile csrc/ with nvcc -Xptxas -v instead of Triton")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.cuda:
        return _main_cuda(args)
    configs = full_grid() if args.grid == "full" else default_grid()
    t0 = time.time()
    rows, failures = compile_grid(configs, args.arch, args.verbose)
    seconds = time.time() - t0
    if args.out:
        write_tables(rows, args.out, args.arch, args.grid, len(configs), seconds)
    for r in rows:
        print(f"{r.kernel:36s} {r.constexprs:60s} w{r.num_warps} regs={r.regs:3d} spill={r.spill_bytes:5d} "
              f"smem={r.shared_bytes:6d} ctas={r.min_grid_ctas}-{r.max_grid_ctas}")
    bad = failures + problems(rows)
    for b in bad:
        print("PROBLEM:", b)
    print(f"AOT sm_{args.arch}: {len(configs)} configurations, {len(rows)} distinct kernels, "
          f"{len(bad)} problems, {seconds:.1f} s")
    return 1 if bad else 0


def _main_cuda(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDACXX or CUDA_HOME)", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    t0 = time.time()
    rows = compile_cuda(root, args.arch, nvcc)
    seconds = time.time() - t0
    if args.out:
        write_cuda_tables(rows, args.out, args.arch, version, seconds)
    for r in rows:
        print(f"{r.source:20s} regs={r.regs:3d} stack={r.stack_bytes:4d} spill={r.spill_stores}/{r.spill_loads} "
              f"smem={r.static_smem:6d} {r.kernel}")
    bad = [r for r in rows if r.static_smem > SMEM_LIMIT]
    print(f"CUDA sm_{args.arch}: {len(rows)} kernels, {seconds:.1f} s")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
