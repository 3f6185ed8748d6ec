"""``himnet_fast.benchmark.steps.prepare`` is the one definition of what is timed: the runner's
worker and the pytest-benchmark suites in bench/ both go through it (tiny shapes, in-process)."""
import importlib.util
import json
import os

import pytest

from himnet_fast.benchmark import providers as P
from himnet_fast.benchmark import steps, worker

BENCH_CONFTEST = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "conftest.py")
SPEC = dict(what="meta_linear_st", provider="torch", modes=["forward", "full"], preset="metrla", num_nodes=16,
            batch_size=2, device="cpu", repeats=1, warmup=0)


@pytest.fixture
def prepare_calls(monkeypatch):
    """Every spec handed to steps.prepare, by anyone."""
    calls, real = [], steps.prepare
    monkeypatch.setattr(steps, "prepare", lambda spec: calls.append(dict(spec)) or real(spec))
    return calls


def _bench_conftest(monkeypatch):
    # The suites' shapes come from the environment, read when their conftest is imported.
    monkeypatch.setenv("HIMNET_BENCH_PRESET", "metrla")
    monkeypatch.setenv("HIMNET_BENCH_NODES", "16")
    monkeypatch.setenv("HIMNET_BENCH_BATCH", "2")
    spec = importlib.util.spec_from_file_location("bench_conftest_under_test", BENCH_CONFTEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _worker_rows(tmp_path, spec):
    out = tmp_path / "rows.jsonl"
    worker.run(worker.Job(spec, str(out)))
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_worker_and_suite_time_the_prepared_step(tmp_path, monkeypatch, prepare_calls):
    rows = _worker_rows(tmp_path, SPEC)
    assert prepare_calls == [SPEC]
    assert [(r["mode"], r["status"]) for r in rows] == [("forward", "ok"), ("full", "ok")]
    assert all(r["check_n"] == 16 and 0 <= r["max_rel_err"] <= P.tolerance() for r in rows)

    bench = _bench_conftest(monkeypatch)
    step = bench.prepared_step("meta_linear_st", "torch", "full", 16)
    assert prepare_calls[-1] == dict(what="meta_linear_st", provider="torch", modes=["full"], preset="metrla",
                                     num_nodes=16, batch_size=2, device=str(bench.DEVICE))
    # a full step is forward + backward: 3x the forward's FLOPs
    assert step.mode == "full" and step.flops == pytest.approx(3 * P.op_case(
        "meta_linear_st", bench.PRESET, 16, 2, bench.DEVICE).flops)
    step.fn()


def test_disagreement_is_an_error_row_and_a_failed_case(tmp_path, monkeypatch):
    # A negative tolerance makes every provider disagree, so both callers take the failure path.
    monkeypatch.setenv("HIMNET_FAST_BENCH_TOL", "-1")
    with pytest.raises(steps.Disagreement, match="disagrees with the reference"):
        steps.prepare(SPEC)
    rows = _worker_rows(tmp_path, SPEC)
    assert [(r["mode"], r["status"]) for r in rows] == [("forward", "error"), ("full", "error")]
    assert "disagrees with the reference" in rows[0]["reason"] and rows[0]["check_n"] == 16
    bench = _bench_conftest(monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="torch disagrees with the reference"):
        bench.prepared_step("meta_linear_st", "torch", "forward", 16)


def test_model_step_agrees_and_backward_step_needs_its_mode(monkeypatch):
    model = steps.prepare(dict(SPEC, what=P.MODEL, modes=["infer"], preset="pems08"))
    assert model.check_n == 16 and model.max_rel_err <= P.tolerance() and model.modes == ["infer"]
    assert model.step("infer").fn().shape == (2, 12, 16, 1)
    with pytest.raises(ValueError, match="one mode"):
        steps.prepare(dict(SPEC, what=P.MODEL, modes=["train", "infer"]))
    op = steps.prepare(dict(SPEC, modes=["backward"]))
    with pytest.raises(ValueError, match="cannot time mode 'forward'"):
        op.step("forward")
    op.step("backward").fn()
