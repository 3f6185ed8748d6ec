"""The CPU kernel counter (himnet_fast.benchmark.kernel_count): its table, custom ops, Triton
launches, the calibration against the H200 profile, and ``himnet-fast bench --count-kernels``."""
import csv
import pathlib
import re

import pytest
import torch

from himnet_fast import cli
from himnet_fast.benchmark import kernel_count as K
from himnet_fast.presets import get_preset

# Kernels of one PEMS07 training step at B = 16 (default HimNet, fp32: forward with teacher
# forcing, L1 loss, backward) as counted at the commit that introduced the counter: 4,358
# (the H200 profile of the same step: 4,352). The bound may only go down: lower it when an
# optimisation lowers the count, so that the count cannot silently grow back.
MAX_KERNELS_PEMS07_B16 = 4200
# The same step on the fused Triton step (backend="triton": dense graphs, both encoders as one
# pair op, the decoder as one op): 786 at the commit that brought it under the target
# of 800. The same rule: lower it with the count, never raise it.
MAX_KERNELS_FUSED_PEMS07_B16 = 800

# The H200 profile of the original model's step (himnet_fast.reference, unchanged code) and
# the counter's stated calibration error (docs/benchmarks.md, "Kernel count").
PROFILED_REFERENCE_PEMS07_B16 = 3150
CALIBRATION_ERROR = 0.07


def meta(*shape, **kw):
    return torch.empty(*shape, device="meta", **kw)


def count(fn, *args):
    return K.count_kernels(fn, *args)[1]


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("himnet_fast::kernel_count_toy", mutates_args=())
def _toy(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * 2.0 + 1.0)  # three kernels: mul, add, relu


@_toy.register_fake
def _(x):
    return torch.empty_like(x)


def _toy_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _toy_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    return grad * 2.0 * (out > 0)  # three kernels: mul, gt, mul


_toy.register_autograd(_toy_backward, setup_context=_toy_setup)


def test_custom_op_counts_the_kernels_of_its_implementation():
    kc = count(_toy, meta(8, 4))
    assert kc.calls["himnet_fast.kernel_count_toy.default"] == 1
    assert kc.total == 3 and kc.kernels["elementwise"] == 3
    assert set(kc.by_op) == {"aten.mul.Tensor", "aten.add.Tensor", "aten.relu.default"}


def test_custom_op_backward_is_counted_too():
    x = meta(8, 4, requires_grad=True)

    def step():
        _toy(x).backward(torch.ones(8, 4, device="meta"))

    kc = count(step)
    # forward 3, the ones 1 (fill), the registered backward 3
    assert kc.total == 7, kc.by_op
    assert kc.kernels["fill"] == 1 and kc.by_op["aten.gt.Scalar"] == 1


def test_op_without_visible_implementation_is_refused():
    lib = torch.library.Library("himnet_fast_kc_test", "FRAGMENT")
    lib.define("opaque(Tensor x) -> Tensor")
    lib.impl("opaque", lambda x: x * 2, "CompositeExplicitAutograd")
    lib.impl("opaque", lambda x: torch.empty_like(x), "Meta")
    with pytest.raises(NotImplementedError, match="opaque"):
        count(torch.ops.himnet_fast_kc_test.opaque, meta(4))


# --------------------------------------------------------------------------- Triton launches

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _toy_triton_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)
except ImportError:  # the counter's Triton hook is then not needed either
    triton = None


def test_triton_launch_inside_a_custom_op_counts_one_and_does_not_run():
    if triton is None:
        pytest.skip("triton is not installed")

    @torch.library.custom_op("himnet_fast::kernel_count_toy_triton", mutates_args=())
    def toy_triton(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()  # one copy (a memcpy: same layout)
        for _ in range(2):
            _toy_triton_kernel[(triton.cdiv(y.numel(), 64),)](y, y.numel(), BLOCK=64)
        return y

    toy_triton.register_fake(lambda x: torch.empty_like(x))
    from triton.runtime.jit import JITFunction

    run_before = JITFunction.__dict__.get("run")
    kc = count(toy_triton, meta(100))
    assert kc.kernels["triton"] == 2 and kc.by_op["triton:_toy_triton_kernel"] == 2
    assert kc.kernels["copy"] == 1 and kc.memcpy["d2d"] == 1 and kc.total == 3
    assert JITFunction.__dict__.get("run") is run_before  # the launch hook is removed afterwards


# --------------------------------------------------------------------------- the table

def test_views_cost_nothing_and_pointwise_ops_one_each():
    def f(x):
        y = x.view(4, 8).t().unsqueeze(0)[..., 1:]
        return (y.sigmoid() * 3).sum()
    kc = count(f, meta(32))
    assert kc.row()["total"] == 3
    assert (kc.kernels["elementwise"], kc.kernels["reduction"]) == (2, 1)
    assert kc.calls["aten.view.default"] == 1 and "aten.view.default" not in kc.by_op


def test_gemm_operand_that_cublas_cannot_take_is_copied_first():
    a, b = meta(64, 32), meta(32, 16)
    assert count(torch.mm, a, b).row()["total"] == 1
    assert count(torch.mm, a.t().t(), b.t().contiguous().t()).row()["total"] == 1  # transposed is fine
    strided = meta(64, 64)[:, ::2]  # neither stride is 1: cuBLAS needs a contiguous copy
    kc = count(torch.mm, strided, b)
    assert (kc.kernels["gemm"], kc.kernels["copy"]) == (1, 1)
    # batched: an operand with a zero inner stride (an expanded vector) is cloned
    kc = count(torch.bmm, meta(4, 8, 1).expand(4, 8, 5), meta(4, 5, 3))
    assert (kc.kernels["gemm"], kc.kernels["copy"]) == (1, 1)


def test_linear_bias_rides_in_the_epilogue_unless_cublaslt_refuses_the_shape():
    x = meta(100, 64)
    assert count(torch.nn.functional.linear, x, meta(16, 64), meta(16)).total == 1
    kc = count(torch.nn.functional.linear, x, meta(1, 64), meta(1))  # one output column: no Lt
    assert (kc.kernels["gemm"], kc.kernels["copy"]) == (1, 1)


def test_copies_memcpy_versus_kernel_and_host_transfers():
    x = meta(16, 8)
    kc = count(torch.clone, x)
    assert kc.total == 1 and kc.memcpy["d2d"] == 1  # same layout: cudaMemcpyAsync
    kc = count(lambda t: t.t().contiguous(), x)
    assert kc.total == 1 and kc.memcpy["d2d"] == 0  # a transpose: a copy kernel
    kc = count(lambda t: t.to(torch.float16), x)
    assert kc.total == 1 and kc.memcpy["d2d"] == 0
    kc = count(lambda t: t.sum().item(), x)
    assert kc.total == 1 and kc.memcpy["d2h"] == 1
    kc = count(lambda t: t.tolist(), x)
    assert kc.total == 0 and kc.memcpy["d2h"] == 1
    kc = count(lambda t: torch.zeros(3).to(t.device) + t[0, :3], x)
    assert kc.total == 1 and kc.memcpy["h2d"] == 1  # the CPU zeros are host work


def test_cat_is_one_kernel_per_batch_of_inputs_and_the_fills():
    xs = [meta(4, 3) for _ in range(130)]
    assert count(torch.cat, xs, 0).kernels["cat"] == 2  # 128 contiguous inputs per launch
    assert count(torch.cat, [x.t() for x in xs[:65]], 1).kernels["cat"] == 2  # 64 if not contiguous
    assert count(torch.cat, [meta(2, 2, 2, 2, 2)] * 2, 0).kernels["copy"] == 2  # > 4 dims: one copy each
    assert count(lambda: torch.eye(5, device="meta")).kernels["fill"] == 2
    assert count(lambda: torch.zeros(0, device="meta")).total == 0


def test_every_aten_op_of_the_model_steps_is_in_the_table():
    for provider in ("default", "reference"):
        for mode in ("train", "infer"):
            kc = K.count_model_step(provider, get_preset("pems07"), 64, 2, mode)
            assert not kc.unlisted, (provider, mode, dict(kc.unlisted))
            assert kc.kernels["other"] == 0 and kc.total > 0


# --------------------------------------------------------------------------- calibration

def test_pems07_b16_training_step_within_its_kernel_budget():
    kc = K.count_model_step("default", get_preset("pems07"), batch=16, mode="train")
    assert not kc.unlisted
    assert kc.total <= MAX_KERNELS_PEMS07_B16, (
        f"a PEMS07 B=16 training step now launches {kc.total} kernels (budget {MAX_KERNELS_PEMS07_B16}); "
        "see `himnet-fast bench --count-kernels --preset pems07 --modes train` for the ops")
    # On a GPU the torch backend builds the dense graphs (4 softmax launches) and takes the GEMM
    # path for the pooled products (no CPU-only accumulation loop): the GPU's code path.
    assert kc.kernels["softmax"] == 4 and kc.kernels["triton"] == 0


def test_pems07_b16_fused_training_step_within_its_kernel_budget():
    """backend="triton" (the fused recurrent step, both encoders as one launch per kernel, the
    decoder as one op), counted where the graphs are dense as on a GPU."""
    if triton is None:
        pytest.skip("triton is not installed")
    kc = K.count_model_step("triton", get_preset("pems07"), batch=16, mode="train")
    assert not kc.unlisted
    assert kc.total <= MAX_KERNELS_FUSED_PEMS07_B16, (
        f"a PEMS07 B=16 fused training step now launches {kc.total} kernels (budget {MAX_KERNELS_FUSED_PEMS07_B16}); "
        "see `himnet-fast bench --count-kernels --preset pems07 --modes train --providers triton` for the ops")
    assert kc.kernels["softmax"] == 4 and kc.by_op.get("triton:_cell_fwd_kernel", 0) > 0


def test_reference_step_matches_its_profile_within_the_calibration_error():
    kc = K.count_model_step("reference", get_preset("pems07"), batch=16, mode="train")
    err = abs(kc.total - PROFILED_REFERENCE_PEMS07_B16) / PROFILED_REFERENCE_PEMS07_B16
    assert err <= CALIBRATION_ERROR, (kc.total, err)


def test_triton_backend_counts_its_launches(monkeypatch):
    """backend="triton": where the graphs fit the dense budget, the fused recurrent step's
    kernels (and the dense graphs' softmax); without that budget, the streamed product's."""
    if triton is None:
        pytest.skip("triton is not installed")
    from himnet_fast import _backend
    from himnet_fast.ops import _triton

    kc = K.count_model_step("triton", get_preset("pems07"), 64, 2, "train")
    names = {op for op in kc.by_op if op.startswith("triton:")}
    assert {"triton:_cell_fwd_kernel", "triton:_cell_bwd_dx_kernel", "triton:_cell_bwd_dw_kernel",
            "triton:_cell_gate_bwd_kernel", "triton:_graph_grad_kernel"} <= names
    assert kc.kernels["triton"] == sum(kc.by_op[n] for n in names) > 0
    assert kc.kernels["softmax"] > 0  # the dense graphs are built
    monkeypatch.setenv("HIMNET_FAST_DENSE_BUDGET_MB", "0")
    kc = K.count_model_step("triton", get_preset("pems07"), 64, 2, "train")
    names = {op for op in kc.by_op if op.startswith("triton:")}
    assert {"triton:_meta_linear_fwd_kernel", "triton:_adaptive_matmul_fwd_kernel",
            "triton:_gcru_gate_fwd_kernel", "triton:_adaptive_matmul_bwd_de_kernel"} <= names
    assert not any(n.startswith("triton:_cell_") for n in names)
    assert kc.kernels["softmax"] == 0  # the streamed product never materialises the graph
    # the GPU-like decisions are undone afterwards
    assert "meta" not in _backend.AUTO_ORDER and not _triton._ALLOW_META


def test_the_library_branches_on_cpu_not_on_cuda():
    """The counter runs on meta tensors: a branch that tests for CUDA would take its non-GPU
    side there. The places that do are listed: the captured inference and the CUDA extension
    (not counted), the Triton backend's device check and ``num_sms`` (both take meta tensors
    as a GPU's), and the teacher-forcing mask's pinned copy (a host-to-device copy on meta as on
    a GPU: one memcpy either way). A new one must be checked against the counter (or test for
    "cpu" instead)."""
    root = pathlib.Path(K.__file__).resolve().parents[2]
    allowed = {"himnet_fast/nn/capture.py", "himnet_fast/ops/_cuda.py", "himnet_fast/ops/_triton.py",
               "kernels/_utils.py", "himnet_fast/nn/himnet.py"}
    pattern = re.compile(r"""type\s*==\s*["']cuda["']|type\s*!=\s*["']cuda["']|\.is_cuda\b""")
    found = set()
    for sub in ("himnet_fast/ops", "himnet_fast/nn", "himnet_fast/sba", "himnet_fast/models", "kernels"):
        for path in (root / sub).glob("*.py"):
            if pattern.search(path.read_text()):
                found.add(path.relative_to(root).as_posix())
    assert found <= allowed, sorted(found - allowed)


# --------------------------------------------------------------------------- the command

def test_bench_count_kernels_prints_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "kc"
    rc = cli.main(["bench", "--count-kernels", "--preset", "pems08", "--nodes", "16", "--batch-size", "2",
                   "--modes", "train,infer", "--providers", "default,reference", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| provider | mode | total | gemm | elementwise |" in printed
    with open(out / "kernel_count_pems08_n16_b2.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["provider"], r["mode"]) for r in rows] == [
        ("default", "train"), ("default", "infer"), ("reference", "train"), ("reference", "infer")]
    for r in rows:
        assert int(r["total"]) == sum(int(r[c]) for c in K.CATEGORIES) > 0
        assert r["torch"] == torch.__version__ and r["command"].startswith("himnet-fast bench --count-kernels")
    by = {(r["provider"], r["mode"]): int(r["total"]) for r in rows}
    assert by[("default", "train")] > by[("default", "infer")]
    with open(out / "kernel_count_pems08_n16_b2_ops.csv", newline="") as f:
        ops = list(csv.DictReader(f))
    assert sum(int(o["kernels"]) for o in ops if o["provider"] == "default" and o["mode"] == "train") \
        == by[("default", "train")]
    assert (out / "kernel_count_pems08_n16_b2.md").read_text().startswith("# Kernel count: pems08")


def test_bench_count_kernels_refuses_what_it_cannot_count(capsys):
    assert cli.main(["bench", "--count-kernels", "--providers", "torch-compile"]) == 2
    assert "unknown ['torch-compile']" in capsys.readouterr().err
    assert cli.main(["bench", "--count-kernels", "--nodes", "16,32"]) == 2
