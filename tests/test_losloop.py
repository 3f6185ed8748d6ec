"""The bundled Los-loop dataset, the T-GCN protocol and the naive baselines."""
import gzip
import os

import numpy as np
import pytest
import torch

from himnet_fast.data import load_dataset
from himnet_fast.data.series import from_signal, split_windows_by_steps
from himnet_fast.datasets import losloop_arrays
from himnet_fast.training.baselines import (baseline_metrics, format_comparison, ha_profile,
                                            tgcn_reference_baselines)

# The source CSV's header and rows, cut to every 13th sensor (tests/fixtures/README.md).
SOURCE_SLICE = os.path.join(os.path.dirname(__file__), "fixtures", "los_speed_every13th_sensor.csv.gz")
SLICE_COLS = np.arange(0, 207, 13)


@pytest.fixture(scope="module")
def arrays():
    return losloop_arrays()


def test_bundled_arrays(arrays):
    s, a = arrays["speed"], arrays["adj"]
    assert s.shape == (2016, 207) and s.dtype == np.float32
    assert 1.0 <= s.min() and s.max() <= 70.0 and abs(float(s.mean()) - 58.89) < 0.01
    assert a.shape == (207, 207) and np.array_equal(a, a.T) and np.all(np.diag(a) == 1)
    assert int((a > 0).sum()) == 2833
    assert arrays["start"] == "2012-03-01 00:00" and arrays["step_minutes"] == 5
    assert arrays["lat"].shape == (207,) and 33 < arrays["lat"].min() < arrays["lat"].max() < 35
    assert arrays["sensor_ids"][0] == 773869


def test_quantisation_error_is_far_below_the_metrics_resolution(arrays):
    """The bundled uint16 speeds against the source CSV's own text, on 16 of the 207 sensors
    (every 13th, all 2016 steps). The baselines score each sensor separately, so comparing
    them on the slice measures what quantisation does to them."""
    with gzip.open(SOURCE_SLICE, "rt") as f:
        ids = [int(v) for v in f.readline().split(",")]
    raw = np.loadtxt(SOURCE_SLICE, delimiter=",", skiprows=1)
    assert raw.shape == (2016, len(SLICE_COLS))
    np.testing.assert_array_equal(arrays["sensor_ids"][SLICE_COLS], ids)   # same columns in both
    speed = arrays["speed"][:, SLICE_COLS]
    err = np.abs(speed.astype(np.float64) - raw)
    assert err.max() <= 1 / 1024 + 1e-6          # 0.001 mph; metrics are printed to 0.01
    ref_raw = tgcn_reference_baselines(raw)
    ref_q = tgcn_reference_baselines(speed)
    assert abs(ref_raw["historical average"]["MAE"] - ref_q["historical average"]["MAE"]) < 1e-4
    assert all(abs(ref_raw["last value"][h]["MAE"] - ref_q["last value"][h]["MAE"]) < 1e-4 for h in (3, 6, 9, 12))


def test_tgcn_protocol_split():
    d = load_dataset()  # the default dataset
    assert d.name == "LOSLOOP" and d.num_nodes == 207 and d.num_steps == 2016
    assert {k: len(v) for k, v in d.splits.items()} == {"train": 1388, "val": 178, "test": 381}
    tr, va, te = (d.splits[k].starts for k in ("train", "val", "test"))
    assert tr[-1] + 24 <= 1411 and va[0] == 1411 and va[-1] + 24 <= 1612 and te[0] == 1612 and te[-1] + 24 == 2016
    assert d.extra["fit_end"] == 1612 and d.extra["protocol"] == "tgcn"
    # 2012-03-01 was a Thursday (Monday = 0); 5-minute slots
    assert d.series[0, 0, 2] == 3 and d.series[288, 0, 2] == 4 and d.series[1, 0, 1] == np.float32(1 / 288)
    with pytest.raises(ValueError, match="val part of a 100-step series has 10 steps"):
        split_windows_by_steps(100, (0.7, 0.8))
    with pytest.raises(ValueError, match="boundaries"):
        split_windows_by_steps(1000, (0.8, 0.7))


def test_reference_baselines_reproduce_the_published_figures(arrays):
    ref = tgcn_reference_baselines(arrays["speed"])
    lv = [round(ref["last value"][h]["MAE"], 2) for h in (3, 6, 9, 12)]
    assert lv == [3.56, 4.36, 5.08, 5.80]
    assert round(ref["historical average"]["MAE"], 2) == 5.14


def test_baselines_on_the_model_windows():
    d = load_dataset()
    b = baseline_metrics(d, "test")
    lv, ha = b["last value"], b["historical average"]
    s = d.splits["test"].starts
    sig = d.series[..., 0].astype(np.float64)
    for h in (3, 12):  # by hand: persistence of the last input step
        assert lv["steps"][h - 1]["MAE"] == pytest.approx(np.abs(sig[s + 11 + h] - sig[s + 11]).mean(), rel=1e-9)
    assert [round(lv["steps"][h - 1]["MAE"], 2) for h in (3, 6, 9, 12)] == [3.58, 4.38, 5.09, 5.80]
    assert 5.1 < ha["overall"]["MAE"] < 5.25


def test_historical_average_sees_only_the_training_part():
    rng = np.random.default_rng(0)
    sig = rng.uniform(10, 20, size=(288 * 5, 3)).astype(np.float32)
    d = from_signal(sig, start="2020-01-06 00:00", ratios=(0.7, 0.8), protocol="tgcn")
    before = baseline_metrics(d, "test")["historical average"]
    d.series[d.extra["fit_end"]:, :, 0] += 5.0      # change only the test part
    after = baseline_metrics(d, "test")["historical average"]
    # the profile is unchanged, so the error grows by the shift
    assert after["overall"]["MAE"] > before["overall"]["MAE"] + 2
    prof = ha_profile(sig[:288 * 2], d.series[:288 * 2, 0, 1])
    np.testing.assert_allclose(prof[5], sig[[5, 293]].mean(0), rtol=1e-6)


def test_ha_profile_ignores_missing_zeros():
    sig = np.array([[10.0, 0.0], [0.0, 0.0], [20.0, 4.0]])
    tod = np.zeros(3, dtype=np.float32)       # all in slot 0
    prof = ha_profile(sig, tod)
    assert prof[0].tolist() == [15.0, 4.0] and prof[1].tolist() == [15.0, 4.0]  # unseen slot: node mean


def test_format_comparison_says_whether_the_model_wins():
    d = load_dataset()
    b = baseline_metrics(d, "test", max_windows=20)
    better = {"overall": dict(b["last value"]["overall"]),
              "steps": [{k: v * 0.9 for k, v in m.items()} for m in b["last value"]["steps"]]}
    txt = format_comparison(better, b)
    assert "15 min (3)" in txt and "60 min (12)" in txt and "beats the last value" in txt
    worse = {"overall": better["overall"], "steps": [dict(m) for m in better["steps"]]}
    worse["steps"][2]["MAE"] = b["last value"]["steps"][2]["MAE"]
    worse["steps"][11]["MAE"] = b["last value"]["steps"][11]["MAE"] + 0.01
    assert "HimNet ties with the last value (MAE) at 15 min, beats it at 30, 45 min and loses to it at 60 min" \
        in format_comparison(worse, b)


def test_format_comparison_names_every_baseline_the_model_loses_to():
    """Each baseline gets its own line: a model that beats the last value but not the
    historical average is not summarised as beating the baselines."""
    d = load_dataset()
    b = baseline_metrics(d, "test", max_windows=20)
    ha = b["historical average"]["steps"]
    lv = b["last value"]["steps"]
    # halfway between the two baselines at every step: worse than the better of them
    model = {"overall": dict(b["last value"]["overall"]),
             "steps": [dict(m, MAE=(m["MAE"] + h["MAE"]) / 2) for m, h in zip(lv, ha)]}
    lines = format_comparison(model, b).splitlines()[-2:]
    wins = {name: all(model["steps"][s - 1]["MAE"] < b[name]["steps"][s - 1]["MAE"] for s in (3, 6, 9, 12))
            for name in b}
    for line, name in zip(lines, b):
        assert name in line
        assert (line.endswith("at every listed horizon") and "beats" in line) == wins[name], line
        if not wins[name]:
            assert "loses to the " + name in line, line
    nan = {"overall": model["overall"], "steps": [dict(m, MAE=float("nan")) for m in model["steps"]]}
    assert "cannot be compared with the last value (MAE) at every listed horizon" in format_comparison(nan, b)


def test_residual_output_of_zero_is_the_last_value_forecast():
    """The small preset's model predicts the change from the last input step: a model that
    outputs 0 scores exactly the last-value baseline, and teacher forcing feeds it the true
    changes in the same units."""
    from himnet_fast.training import evaluate_model, teacher_labels, to_forecast

    d = load_dataset()

    class Zero(torch.nn.Module):
        def forward(self, x, y_cov):
            return x.new_zeros(x.shape[0], 12, x.shape[2], 1)

    m = evaluate_model(Zero(), d, "test", batch_size=64, limit_batches=2, residual=True)
    lv = baseline_metrics(d, "test", max_windows=128)["last value"]
    for a, b in zip(m["steps"], lv["steps"]):
        assert a["MAE"] == pytest.approx(b["MAE"], abs=1e-4) and a["RMSE"] == pytest.approx(b["RMSE"], abs=1e-4)
    b = d.batch("train", np.arange(4))
    lab = teacher_labels(b, d.scaler, residual=True)
    torch.testing.assert_close(to_forecast(lab, b.x, d.scaler, residual=True), b.target, atol=1e-4, rtol=0)
    assert teacher_labels(b, d.scaler, residual=False) is b.labels
