"""pytest-benchmark: adaptive graph propagation ``cat(x, softmax(relu(E Eᵀ)) x)`` per provider,
for the static graph (encoder shapes) and the per-sample graph (decoder shapes); FlexAttention
(compiled, score_mod = relu, scale 1) is one of the providers where the installed PyTorch has it.
The same steps as ``himnet-fast bench --what adaptive_propagate,adaptive_propagate_st``.

    pytest bench/bench_adaptive_propagate.py --benchmark-only
"""
import pytest

from conftest import NODES, prepared_step, providers_for, time_step


@pytest.mark.parametrize("n", NODES, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("what", ["adaptive_propagate", "adaptive_propagate_st"])
@pytest.mark.parametrize("provider", providers_for("adaptive_propagate"))
def bench_adaptive_propagate(benchmark, provider, what, mode, n):
    step = prepared_step(what, provider, mode, n)
    time_step(benchmark, step, kernel=what, provider=provider, N=n)
