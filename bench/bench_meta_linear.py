"""pytest-benchmark: the decoder's "ST" meta-linear (forward, and forward + backward) per provider.

    pytest bench/bench_meta_linear.py --benchmark-only
"""
import pytest
import torch

from conftest import BATCH, DEVICE, NODES, PRESET, providers_for, skip_on_oom, sync
from himnet_fast.benchmark import providers as P

WHAT = "meta_linear_st"


@pytest.mark.parametrize("n", NODES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", providers_for(WHAT))
def bench_meta_linear(benchmark, provider, mode, n):
    case = P.op_case(WHAT, PRESET, n, BATCH, DEVICE)
    leaves = {k: v.clone().requires_grad_(mode == "full") for k, v in case.inputs.items()}
    fn = P.op_function(provider, WHAT)
    out = skip_on_oom(fn, **leaves)
    want = skip_on_oom(P.op_function("reference", WHAT), **case.inputs)
    err = P.max_rel_err(out, want)
    assert err <= P.tolerance(), f"{provider} disagrees with the reference: max rel err {err:.3g}"
    del out, want
    dy = torch.randn(BATCH, n, case.inputs["weight_pool"].shape[-1], device=DEVICE)

    def run():
        if mode == "full":
            for v in leaves.values():
                v.grad = None
            fn(**leaves).backward(dy)
        else:
            with torch.no_grad():
                fn(**leaves)
        sync()

    benchmark.extra_info.update(kernel=WHAT, provider=provider, mode=mode, N=n, batch=BATCH,
                                device=str(DEVICE), tflop=case.flops * (3 if mode == "full" else 1) / 1e12)
    skip_on_oom(benchmark, run)
