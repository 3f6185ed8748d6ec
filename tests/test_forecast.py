"""A forecast in the data's units in one call: ``model.forecast(history, timestamps)`` builds the
same window as the training pipeline (missing readings carried forward, scaler, time features
from the timestamps), and returns readings with their timestamps."""
import numpy as np
import pandas as pd
import pytest
import torch

import himnet_fast as hf
from himnet_fast.data import Forecast, forecast
from himnet_fast.data.series import from_signal
from himnet_fast.training import TrainConfig, Trainer, to_forecast

pytestmark = pytest.mark.usefixtures("one_thread")

T, N, START = 400, 5, np.datetime64("2024-01-05T22:00")   # a Friday evening: crosses midnight and a weekend


def _readings(seed=0):
    rng = np.random.default_rng(seed)
    sig = rng.uniform(20, 65, size=(T, N))
    sig[rng.random((T, N)) < 0.03] = np.nan
    sig[350:362, 2] = np.nan                  # a 1-hour gap inside a test window
    sig[:3, 4] = np.nan                       # before the first reading of a sensor
    return sig


def _data(sig):
    return from_signal(np.nan_to_num(sig, nan=0.0).astype(np.float32), start=str(START).replace("T", " "),
                       ratios=(0.7, 0.8), protocol="tgcn", fill_missing=True, extra={"units": "mph"})


STAMPS = START + np.arange(T) * np.timedelta64(5, "m")


def _model(seed=0):
    torch.manual_seed(seed)
    return hf.HimNet(N, hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4,
                     st_embedding_dim=4, in_steps=12).eval()


def _pipeline(model, data, i, residual=True):
    b = data.batch("test", [i])
    with torch.no_grad():
        return to_forecast(model(b.x, b.y_cov), b.x, data.scaler, residual)[0, :, :, 0].numpy()


def test_forecast_equals_the_training_pipeline_window_for_window():
    sig = _readings()
    data = _data(sig)
    model = _model()
    kw = dict(scaler=data.scaler, residual=True, step_minutes=5, fill_missing=True, fill_values=data.fill_values)
    starts = data.splits["test"].starts
    gap = [i for i, s in enumerate(starts) if s <= 350 < s + 12][0]         # the gap in the input window
    for i in (0, gap, len(starts) - 1):
        end = starts[i] + 12
        f = forecast(model, sig[:end], STAMPS[:end], **kw)
        assert isinstance(f, Forecast) and f.values.shape == (12, N) and f.values.dtype == np.float32
        np.testing.assert_array_equal(f.values, _pipeline(model, data, i))
        np.testing.assert_array_equal(f.timestamps, STAMPS[end:end + 12])


def test_untrained_residual_model_forecasts_the_last_observed_value():
    """A zero residual output is the last *observed* reading, also right after a gap; a reading
    missing before any observation gets the sensor's training mean, never 0."""
    sig = _readings()
    data = _data(sig)
    model = _model()
    with torch.no_grad():
        model.out_proj.weight.zero_()
        model.out_proj.bias.zero_()
    end = 355                                               # inside the gap of sensor 2
    f = forecast(model, sig[:end], STAMPS[:end], scaler=data.scaler, residual=True, fill_values=data.fill_values)
    last = [sig[:end, n][~np.isnan(sig[:end, n])][-1] for n in range(N)]
    np.testing.assert_allclose(f.values, np.broadcast_to(last, (12, N)), rtol=1e-5)
    assert f.values[:, 2].min() > 19                     # not the drop to ~0 of a zero-filled input
    early = forecast(model, sig[:12], STAMPS[:12], scaler=data.scaler, residual=True, fill_values=data.fill_values)
    assert early.values[0, 4] == pytest.approx(sig[3:12, 4][~np.isnan(sig[3:12, 4])][-1], rel=1e-5)
    head = forecast(model, np.full((12, N), np.nan), STAMPS[:12], scaler=data.scaler, residual=True,
                    fill_values=data.fill_values)
    np.testing.assert_allclose(head.values[0], data.fill_values, rtol=1e-5)


def test_absent_rows_count_as_missing_and_a_dataframe_brings_its_timestamps():
    sig = _readings()
    data = _data(sig)
    model = _model(1)
    kw = dict(scaler=data.scaler, residual=True, fill_values=data.fill_values)
    end = 300
    full = forecast(model, sig[:end], STAMPS[:end], step_minutes=5, **kw)
    keep = ~np.isnan(sig[:end]).all(1)
    keep[[100, 290, 295]] = False                       # drop rows: they become missing readings
    hole = sig[:end].copy()
    hole[~keep] = np.nan
    dropped = forecast(model, sig[:end][keep], STAMPS[:end][keep], step_minutes=5, **kw)
    np.testing.assert_array_equal(dropped.values, forecast(model, hole, STAMPS[:end], step_minutes=5, **kw).values)
    frame = pd.DataFrame(sig[:end], index=pd.DatetimeIndex(STAMPS[:end]))
    np.testing.assert_array_equal(forecast(model, frame, **kw).values, full.values)   # step inferred: 5 min
    values, times = full                                      # unpacks as a pair
    assert times[0] == STAMPS[end] and values.shape == (12, N)


def test_model_from_checkpoint_forecasts_in_the_units_of_the_data(tmp_path):
    sig = _readings(2)
    data = _data(sig)
    cfg = TrainConfig.from_preset("custom", max_epochs=1, batch_size=8, limit_batches=2, hidden_dim=8)
    tr = Trainer(data, cfg, out_dir=str(tmp_path), progress=False, log=lambda m: None)
    tr.fit()
    model = hf.HimNet.from_checkpoint(str(tmp_path / "best.pt"))
    info = model.checkpoint_info
    assert info["residual"] and info["fill_missing"] and info["step_minutes"] == 5 and info["units"] == "mph"
    assert info["fill_values"] == pytest.approx(list(data.fill_values))
    i = 7
    end = data.splits["test"].starts[i] + 12
    values, times = model.forecast(sig[:end], [str(t) for t in STAMPS[:end]])    # ISO strings work too
    np.testing.assert_array_equal(values, _pipeline(model, data, i))
    assert times[-1] == STAMPS[end + 11]
    # what a bare model(x, y_cov) gives is the scaled change, not mph: the reason for forecast()
    b = data.batch("test", [i])
    with torch.no_grad():
        raw = model(b.x, b.y_cov)
    assert not np.allclose(raw[0, :, :, 0].numpy(), values)


@pytest.mark.parametrize("history,stamps,kw,match", [
    (np.ones((20, N + 1)), STAMPS[:20], {}, r"history has 6 columns; the model forecasts 5 sensors"),
    (np.ones(20), STAMPS[:20], {}, r"history must have shape \(T, N\).*reshape"),
    (np.ones((8, N)), STAMPS[:8], {}, r"history covers 8 step\(s\) of 5 minutes.*needs the last 12 steps"),
    (np.ones((20, N)), STAMPS[:19], {}, r"timestamps has 19 entries; history has 20 rows"),
    (np.ones((20, N)), STAMPS[:20][::-1], {}, r"timestamps must increase; timestamps\[1\]"),
    (np.ones((20, N)), STAMPS[:20] + np.r_[np.zeros(19), 2].astype("timedelta64[m]"), {},
     r"5-minute grid ending at the last one"),
    (np.ones((20, N)), np.arange(20), {}, r"timestamps must be datetimes .* got numbers"),
    (np.ones((20, N)), ["soon"] * 20, {}, r"timestamps must be datetimes"),
    (np.full((20, N), np.inf), STAMPS[:20], {}, r"infinite value at row 0, sensor 0; use NaN"),
    (np.ones((20, N)), None, {}, r"timestamps are required"),
    (np.ones((20, N)), STAMPS[:20], {"step_minutes": 7}, r"step_minutes must be a positive number of minutes "
                                                          r"dividing a day"),
    (np.ones((20, N)), STAMPS[:20], {"fill_values": [1.0, 2.0]}, r"fill_values must have one value per sensor"),
])
def test_bad_inputs_name_the_argument(history, stamps, kw, match):
    model = _model()
    scaler = _data(_readings()).scaler
    with pytest.raises(ValueError, match=match):
        forecast(model, history, stamps, scaler=scaler, residual=True, **kw)


def test_a_model_without_a_scaler_says_what_to_pass():
    with pytest.raises(ValueError, match=r"carries no scaler .* pass scaler=StandardScaler"):
        _model().forecast(np.ones((12, N)), STAMPS[:12])
