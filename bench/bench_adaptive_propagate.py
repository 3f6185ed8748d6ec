"""pytest-benchmark: adaptive graph propagation ``cat(x, softmax(relu(E Eᵀ)) x)`` per provider,
for the static graph (encoder shapes) and the per-sample graph (decoder shapes); FlexAttention
(compiled, score_mod = relu, scale 1) is one of the providers where the installed PyTorch has it.

    pytest bench/bench_adaptive_propagate.py --benchmark-only
"""
import pytest
import torch

from conftest import BATCH, DEVICE, NODES, PRESET, providers_for, skip_on_oom, sync
from himnet_fast.benchmark import providers as P


@pytest.mark.parametrize("n", NODES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("what", ["adaptive_propagate", "adaptive_propagate_st"])
@pytest.mark.parametrize("provider", providers_for("adaptive_propagate"))
def bench_adaptive_propagate(benchmark, provider, what, mode, n):
    if provider == "flex" and mode == "full" and DEVICE.type == "cpu":
        pytest.skip("FlexAttention has no backward on CPU")
    case = P.op_case(what, PRESET, n, BATCH, DEVICE)
    leaves = {k: v.clone().requires_grad_(mode == "full") for k, v in case.inputs.items()}
    fn = P.op_function(provider, what)
    with torch.set_grad_enabled(mode == "full"):
        out = skip_on_oom(fn, **leaves)
    want = skip_on_oom(P.op_function("reference", what), **case.inputs)
    err = P.max_rel_err(out, want)
    assert err <= P.tolerance(), f"{provider} disagrees with the reference: max rel err {err:.3g}"
    dy = torch.randn_like(want)
    del out, want

    def run():
        if mode == "full":
            for v in leaves.values():
                v.grad = None
            fn(**leaves).backward(dy)
        else:
            with torch.no_grad():
                fn(**leaves)
        sync()

    benchmark.extra_info.update(kernel=what, provider=provider, mode=mode, N=n, batch=BATCH,
                                device=str(DEVICE), tflop=case.flops * (3 if mode == "full" else 1) / 1e12)
    skip_on_oom(benchmark, run)
