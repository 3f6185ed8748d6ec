"""The roofline model of himnet_fast.benchmark.roofline: counts, bounds and the CLI."""
import math

import pytest

from himnet_fast.benchmark import roofline as R
from himnet_fast.cli import main
from himnet_fast.presets import get_preset


def test_meta_linear_st_original_moves_the_materialised_weights_twice():
    """The original writes the B×N×I×O weight and reads it back; ours never holds it: the
    difference in elements moved is exactly 2·B·N·I·O, and the FLOPs differ by the apply GEMM."""
    b, n, i, o, d = 3, 11, 7, 5, 4
    orig = R._meta_linear("original", "ST", b, n, i, o, d)
    ours = R._meta_linear("ours", "ST", b, n, i, o, d)
    assert sum(e for _, e in orig.parts) - sum(e for _, e in ours.parts) == 2 * b * n * i * o
    assert orig.flops - ours.flops == 2 * b * n * i * o
    assert ours.flops == 2 * b * n * d * i * o


def test_predict_takes_each_kernels_own_bound():
    lim = R.Limits("toy", bandwidth=1e9, compute={"fp32": 1e9, "tf32": 1e10, "bf16": 2e10})
    cost = R.Cost([(2e9, 1e6), (1e6, 1e9)])   # one compute-bound, one memory-bound kernel
    p = R.predict(cost, "fp32", lim)
    assert math.isclose(p["seconds"], 2.0 + 4.0)          # 2e9 / 1e9 s + 4 * 1e9 / 1e9 s
    assert math.isclose(p["compute_s"], 2.0 + 1e-3) and math.isclose(p["memory_s"], 4e-3 + 4.0)
    assert R.predict(cost, "bf16", lim)["memory_s"] == pytest.approx(p["memory_s"] / 2)
    with pytest.raises(ValueError, match="precision must be one of"):
        R.predict(cost, "fp8", lim)


def test_model_prediction_at_pems07():
    """The original moves > 10x our bytes at PEMS07 B=16 (its B×N×I×O decoder weights), a
    training step counts 3x a forward, and the original's fp32 step is memory-bound."""
    p = get_preset("pems07")
    orig = R.model_costs(p, 883, 16, "original", "train")
    ours = R.model_costs(p, 883, 16, "ours", "train")
    assert orig.bytes("fp32") > 10 * ours.bytes("fp32")
    assert R.model_costs(p, 883, 16, "ours", "infer").flops * 3 == pytest.approx(ours.flops)
    assert R.predict(orig, "fp32")["bound"] == "memory"
    assert R.predict(ours, "bf16")["seconds"] < R.predict(ours, "tf32")["seconds"] < R.predict(ours, "fp32")["seconds"]
    # the decoder's "ST" weights alone: 12 steps x (gate + update) x B·N·I·O, written and read
    h, i = p.hidden_dim, 2 * (1 + 2 + p.hidden_dim)
    st_elems = 12 * 2 * 16 * 883 * i * (2 * h + h)
    assert orig.bytes("fp32") / 3 > 4 * st_elems


def test_bad_arguments_name_what_was_expected():
    p = get_preset("pems07")
    with pytest.raises(ValueError, match="algorithm must be"):
        R.model_costs(p, 10, 1, "fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        R.op_costs("meta_linear_st", p, 10, 1, "ours", "sideways")
    with pytest.raises(ValueError, match="unknown op"):
        R.op_costs("gemm", p, 10, 1, "ours")
    assert R.predicted_ms("gemm", "forward", p, 10, 1, "torch") is None


def test_cli_writes_labelled_predictions(tmp_path, capsys):
    assert main(["roofline", "--preset", "pems08", "--batch-size", "2", "--nodes", "50", "--out", str(tmp_path)]) == 0
    stem = tmp_path / "roofline_pems08_n50_b2"
    md = (stem.with_suffix(".md")).read_text()
    assert "PREDICTED ms" in md and "not a measurement" in md
    assert stem.with_suffix(".csv").stat().st_size > 0 and stem.with_suffix(".png").stat().st_size > 0
    assert main(["roofline", "--nodes", "0"]) == 2
    assert "argument --nodes: expected an integer >= 1, got 0" in capsys.readouterr().err
