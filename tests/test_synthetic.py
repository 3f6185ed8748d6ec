"""The synthetic traffic generator: deterministic, float32, realistic structure."""
import numpy as np
import pytest

from himnet_fast.data import load_dataset, synthetic_traffic, time_features

T, N = 2016 * 2, 60   # two weeks, 60 sensors


@pytest.fixture(scope="module")
def flow():
    return synthetic_traffic(T, N, seed=7, start="2016-07-04 00:00")  # starts on a Monday


def test_deterministic_by_seed_and_dtype(flow):
    again = synthetic_traffic(T, N, seed=7, start="2016-07-04 00:00")
    np.testing.assert_array_equal(flow, again)
    assert not np.array_equal(flow, synthetic_traffic(T, N, seed=8, start="2016-07-04 00:00"))
    assert flow.dtype == np.float32 and flow.shape == (T, N)
    assert np.isfinite(flow).all() and flow.min() >= 0
    np.testing.assert_array_equal(flow, np.rint(flow))        # whole vehicles
    assert 150 < flow.mean() < 280                            # PEMS-like level (PEMS08 sample: 215)


def test_missing_zeros(flow):
    zeros = (flow == 0).mean()
    assert 0.002 < zeros < 0.02
    assert (synthetic_traffic(500, 10, seed=1, missing_rate=0.0) > 0).mean() > 0.99


def test_daily_and_weekly_cycles(flow):
    _, dow = time_features(T, "2016-07-04 00:00")
    hour = (np.arange(T) % 288) // 12
    weekday = dow < 5
    night = flow[weekday & (hour == 3)].mean()
    am = flow[weekday & (hour == 8)].mean()
    pm = flow[weekday & (hour == 17)].mean()
    assert am > 2.5 * night and pm > 2.5 * night               # rush hours over the night trough
    weekend_am = flow[~weekday & (hour == 8)].mean()
    assert am > 1.2 * weekend_am                               # no morning rush on weekends


def test_sensor_regimes_differ(flow):
    # Clusters have different regimes: the ratio of morning to evening rush varies a lot.
    hour = (np.arange(T) % 288) // 12
    _, dow = time_features(T, "2016-07-04 00:00")
    wd = dow < 5
    ratio = flow[wd & (hour == 8)].mean(0) / flow[wd & (hour == 17)].mean(0)
    assert ratio.max() / ratio.min() > 2.0
    level = flow.mean(0)
    assert level.max() / level.min() > 2.0                     # low-volume and busy sensors


def test_any_shape_and_errors():
    assert synthetic_traffic(1, 1).shape == (1, 1)
    assert synthetic_traffic(300, 883, seed=0).shape == (300, 883)   # PEMS07 width
    with pytest.raises(ValueError, match="positive"):
        synthetic_traffic(0, 5)
    with pytest.raises(ValueError, match="missing_rate"):
        synthetic_traffic(10, 5, missing_rate=1.5)


def test_synthetic_dataset_has_the_requested_shape():
    d = load_dataset("PEMS07", synthetic=True, num_steps=400, num_nodes=9, seed=3)
    assert d.series.shape == (400, 9, 3) and d.series.dtype == np.float32
    assert d.series[0, 0, 2] == 0                              # PEMS07 starts on Monday 2017-05-01
    assert len(d.splits["train"]) == round(0.6 * 377)


@pytest.mark.slow
def test_pems07_full_shape():
    f = synthetic_traffic(28224, 883, seed=0)
    assert f.shape == (28224, 883) and f.dtype == np.float32
