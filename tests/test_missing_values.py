"""Missing readings: counted, carried forward in the inputs (never from the future), masked as
targets; a series with gaps trains as well as the same series complete."""
import numpy as np
import pytest
import torch

from himnet_fast.data import StandardScaler, carry_forward, load_dataset
from himnet_fast.data.files import load_series_file
from himnet_fast.datasets import losloop_arrays
from himnet_fast.training import TrainConfig, Trainer, teacher_labels, to_forecast

pytestmark = pytest.mark.usefixtures("one_thread")


def test_carry_forward_reads_only_the_past():
    sig = np.array([[0, 5], [1, 0], [0, 0], [3, 7], [0, 0]], dtype=np.float32)
    missing = sig == 0
    out = carry_forward(sig, missing, [9, 8])
    assert out.tolist() == [[9, 5], [1, 5], [1, 5], [3, 7], [3, 7]]
    for t in range(len(sig)):            # the filled value at t depends on steps <= t only
        changed = sig.copy()
        changed[t + 1:] = 42
        assert (carry_forward(changed, changed == 0, [9, 8])[: t + 1] == out[: t + 1]).all()


def _gappy(tmp_path, values):
    path = tmp_path / "s.npy"
    np.save(path, values)
    return load_series_file(str(path), start="2024-01-01 00:00")


def test_inputs_carry_the_last_observation_and_targets_stay_missing(tmp_path):
    rng = np.random.default_rng(0)
    sig = rng.uniform(30, 60, size=(400, 3))
    sig[100:112, 1] = np.nan                 # a 1-hour gap
    sig[200, 2] = 0.0                        # 0 is missing too
    sig[:2, 0] = np.nan                      # before the sensor's first reading
    d = _gappy(tmp_path, sig)
    assert d.num_missing == 15 and d.fill_missing
    assert "15 missing readings (1.2%): inputs carry the last observation forward" in d.describe()
    assert (d.filled[100:112, 1] == np.float32(sig[99, 1])).all() and d.filled[200, 2] == np.float32(sig[199, 2])
    train_end = d.splits["train"].starts[-1] + d.in_steps
    assert d.filled[0, 0] == pytest.approx(np.nanmean(sig[:train_end, 0]))         # the sensor's training mean
    fitted = StandardScaler.fit(d.filled, d.splits["train"].starts, d.in_steps)       # on what the model sees
    assert d.scaler == fitted and d.scaler != StandardScaler.fit(d.series[..., 0], d.splits["train"].starts, 12)
    starts = d.splits["train"].starts
    assert starts[89] == 89
    b = d.batch("train", [89])                        # inputs: steps 89..100, the last inside the gap ...
    last = d.scaler.inverse_transform(b.x[0, -1, :, 0])
    assert last[1] == pytest.approx(sig[99, 1], rel=1e-5)                         # ... the last observed value
    gap = d.batch("train", [88])                     # targets: steps 100..111, the gap
    assert (gap.target[0, :, 1, 0] == 0).all()                                     # masked, never filled
    # residual teacher forcing: a missing target is "no change", not a drop to 0
    labels = teacher_labels(gap, d.scaler, residual=True)
    assert (labels[0, :, 1, 0] == 0).all() and (labels[0, :, 0, 0] != 0).all()


def test_the_paper_datasets_keep_zero_inputs():
    d = load_dataset("PEMS08_SAMPLE")
    assert not d.fill_missing and d.filled is None and d.num_missing == 915
    assert "915 missing readings (0.42%): 0 as inputs (the original's convention)" in d.describe()


# Los-loop's 10 most variable sensors (real, complete): the complete series and the same one with
# 1 % of its readings missing at random and five 1-hour gaps, three of them in the test part.
GAPS = ((300, 2), (900, 6), (1650, 4), (1800, 7), (1930, 1))


def _series():
    speed = losloop_arrays()["speed"]
    sig = speed[:, np.sort(np.argsort(-speed.std(0))[:10])].astype(np.float64)
    gappy = sig.copy()
    gappy[np.random.default_rng(0).random(sig.shape) < 0.01] = np.nan
    for s, n in GAPS:
        gappy[s:s + 12, n] = np.nan
    return sig, gappy


def _train(folder, values):
    folder.mkdir()
    data = _gappy(folder, values)
    trainer = Trainer(data, TrainConfig.from_preset("custom", max_epochs=2), progress=False, log=lambda m: None)
    summary = trainer.fit()
    model = trainer.model.eval()
    with torch.no_grad():
        b = data.batch("test", np.arange(len(data.splits["test"])))
        pred = to_forecast(model(b.x, b.y_cov), b.x, data.scaler, residual=True)
    observed = b.target != 0
    return data, summary["test"]["overall"]["MAE"], float((pred - b.target).abs()[observed].max())


def test_a_series_with_gaps_trains_as_well_as_the_complete_one(tmp_path):
    sig, gappy = _series()
    assert 0.01 < np.isnan(gappy).mean() < 0.02
    _, mae_complete, worst_complete = _train(tmp_path / "complete", sig)
    data, mae_gappy, worst_gappy = _train(tmp_path / "gappy", gappy)
    assert data.num_missing == int(np.isnan(gappy).sum())
    value_range = float(np.nanmax(sig) - np.nanmin(sig))
    assert abs(mae_gappy / mae_complete - 1) < 0.05, (mae_gappy, mae_complete)
    assert worst_gappy < value_range and worst_complete < value_range, (worst_gappy, worst_complete, value_range)
