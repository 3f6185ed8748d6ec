"""pytest-benchmark: one HimNet training step (forward + backward, teacher forcing) and one
inference forward, per provider, at the preset's paper model sizes.

    HIMNET_BENCH_PRESET=pems07 HIMNET_BENCH_BATCH=4 pytest bench/bench_himnet.py --benchmark-only
"""
import pytest

from conftest import BATCH, DEVICE, NODES, PRESET, providers_for, skip_on_oom, sync
from himnet_fast.benchmark import providers as P


@pytest.mark.parametrize("n", NODES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", P.MODEL_MODES)
@pytest.mark.parametrize("provider", providers_for(P.MODEL))
def bench_himnet(benchmark, provider, mode, n):
    inputs = P.model_inputs(PRESET, n, BATCH, DEVICE)
    module = P.build_module(provider, PRESET, n, DEVICE)
    P.set_mode(module, mode)
    step = P.model_step(P.maybe_compile(provider, module), list(module.parameters()), inputs, mode)
    if provider != "reference":
        ref = P.build_module("reference", PRESET, n, DEVICE)
        ref.load_state_dict(module.state_dict())
        P.set_mode(ref, mode)
        want = skip_on_oom(P.model_step(ref, list(ref.parameters()), inputs, mode))
        err = P.max_rel_err(skip_on_oom(step), want)
        assert err <= P.tolerance(), f"{provider} disagrees with the reference: max rel err {err:.3g}"
        del ref, want

    def run():
        step()
        sync()

    benchmark.extra_info.update(kernel=P.MODEL, provider=provider, mode=mode, N=n, batch=BATCH,
                                device=str(DEVICE), tflop=P.model_flops(PRESET, n, BATCH, mode) / 1e12)
    skip_on_oom(benchmark.pedantic, run, rounds=3, warmup_rounds=1)
