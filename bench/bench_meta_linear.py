"""pytest-benchmark: the decoder's "ST" meta-linear (forward, and forward + backward) per provider
(the same steps as ``himnet-fast bench --what meta_linear_st``).

    pytest bench/bench_meta_linear.py --benchmark-only
"""
import pytest

from conftest import NODES, prepared_step, providers_for, time_step

WHAT = "meta_linear_st"


@pytest.mark.parametrize("n", NODES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("provider", providers_for(WHAT))
def bench_meta_linear(benchmark, provider, mode, n):
    step = prepared_step(WHAT, provider, mode, n)
    time_step(benchmark, step, kernel=WHAT, provider=provider, N=n)
