"""pytest-benchmark: one HimNet training step (forward + backward, teacher forcing) and one
inference forward, per provider, at the preset's paper model sizes (the same steps as
``himnet-fast bench --what himnet``).

    HIMNET_BENCH_PRESET=pems07 HIMNET_BENCH_BATCH=4 pytest bench/bench_himnet.py --benchmark-only
"""
import pytest

from conftest import NODES, prepared_step, providers_for, time_step
from himnet_fast.benchmark import providers as P


@pytest.mark.parametrize("n", NODES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", P.MODEL_MODES)
@pytest.mark.parametrize("provider", providers_for(P.MODEL))
def bench_himnet(benchmark, provider, mode, n):
    step = prepared_step(P.MODEL, provider, mode, n)
    time_step(benchmark, step, rounds=3, kernel=P.MODEL, provider=provider, N=n)
