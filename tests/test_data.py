"""Data loaders, lazy windows, scaler, batch order and the bundled sample."""
import os

import numpy as np
import pytest
import torch

from himnet_fast.data import (BatchOrder, StandardScaler, load_dataset, load_himnet_dir, load_pems_npz,
                              split_windows, time_features, traffic_data)
from himnet_fast.data.series import DATASET_INFO, canonical_name, from_signal, index_to_starts
from himnet_fast.datasets import SAMPLE_PATH, load_pems08_sample, pems08_sample_flow

# Small copies of real benchmark files (tests/fixtures/README.md says where each comes from).
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _series(T=80, N=5, seed=0, start="2016-07-01 00:00"):
    rng = np.random.default_rng(seed)
    sig = rng.integers(0, 500, (T, N)).astype(np.float32)
    tod, dow = time_features(T, start)
    s = np.empty((T, N, 3), np.float32)
    s[..., 0], s[..., 1], s[..., 2] = sig, tod[:, None], dow[:, None]
    return s


@pytest.mark.parametrize("name", ["PEMS04", "PEMS07", "PEMS08", "METRLA", "PEMSBAY"])
def test_split_windows_reproduces_himnet_index_files(name):
    index = np.load(os.path.join(FIXTURES, "himnet_index", f"{name}.npz"))
    info = DATASET_INFO[name]
    starts = split_windows(info["num_steps"], info["split"])
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(index_to_starts(index[s]), starts[s])


def test_time_features_calendar():
    tod, dow = time_features(600, "2016-07-01 00:00")   # a Friday
    assert tod.dtype == np.float32 and dow.dtype == np.float32
    assert dow[0] == 4 and dow[287] == 4 and dow[288] == 5 and dow[576] == 6
    slots = (torch.from_numpy(tod) * 288).long().numpy()
    np.testing.assert_array_equal(slots, np.arange(600) % 288)
    tod, dow = time_features(3, "2018-01-01 23:55")     # Monday, crosses midnight
    assert tod[0] == np.float32(287 / 288) and tod[1] == 0 and list(dow) == [0, 1, 1]


def test_scaler_equals_stacked_training_windows():
    s = _series(T=70)
    starts = split_windows(70)
    data = traffic_data(s, starts)
    xi = starts["train"][:, None] + np.arange(12)
    stacked = s[xi][..., 0]                              # what the original materialises
    assert data.scaler.mean == pytest.approx(float(stacked.astype(np.float64).mean()), rel=1e-9)
    assert data.scaler.std == pytest.approx(float(stacked.astype(np.float64).std()), rel=1e-9)


def test_batch_gathers_windows_lazily_and_scales():
    s = _series(T=60, N=4)
    data = traffic_data(s, split_windows(60))
    pos = np.array([3, 0, 6])
    b = data.batch("val", pos)
    st = data.splits["val"].starts[pos]
    assert b.x.shape == (3, 12, 4, 3) and b.y_cov.shape == (3, 12, 4, 2)
    assert b.labels.shape == (3, 12, 4, 1) and b.target.shape == (3, 12, 4, 1)
    for i, s0 in enumerate(st):
        np.testing.assert_allclose(b.x[i, ..., 0].numpy(), (s[s0:s0 + 12, :, 0] - data.scaler.mean) / data.scaler.std,
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(b.x[i, ..., 1:].numpy(), s[s0:s0 + 12, :, 1:])
        np.testing.assert_array_equal(b.y_cov[i].numpy(), s[s0 + 12:s0 + 24, :, 1:])
        np.testing.assert_array_equal(b.target[i, ..., 0].numpy(), s[s0 + 12:s0 + 24, :, 0])
    np.testing.assert_allclose(data.scaler.inverse_transform(b.labels), b.target, rtol=1e-5, atol=1e-3)


def test_himnet_dir_and_raw_pems_roundtrip(tmp_path):
    s = _series(T=90, N=6)
    starts = split_windows(90)
    np.savez(tmp_path / "data.npz", data=s)
    np.savez(tmp_path / "index.npz", **{k: np.stack([v, v + 12, v + 24], 1) for k, v in starts.items()})
    d = load_himnet_dir(str(tmp_path))
    np.testing.assert_array_equal(d.series, s)
    assert [len(d.splits[k]) for k in ("train", "val", "test")] == [40, 13, 14]
    raw = np.stack([s[..., 0], s[..., 0] * 0.01, s[..., 0] * 0.1], -1)
    np.savez(tmp_path / "PEMS08.npz", data=raw.astype(np.float64))
    r = load_pems_npz(str(tmp_path / "PEMS08.npz"), start="2016-07-01 00:00")
    np.testing.assert_array_equal(r.series, s)
    assert r.scaler == d.scaler
    # load_dataset finds the HimNet format first, then a raw NAME.npz
    assert load_dataset("pems08", str(tmp_path)).source == str(tmp_path)
    os.remove(tmp_path / "data.npz")
    assert load_dataset("PEMS08", str(tmp_path)).source.endswith("PEMS08.npz")


def test_clear_errors_for_bad_files(tmp_path):
    s = _series(T=60, N=3)
    np.savez(tmp_path / "x.npz", series=s)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['data'\].*'series'"):
        load_pems_npz(str(tmp_path / "x.npz"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pems_npz(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_pems_npz(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "obj.npz", data=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable"):
        load_pems_npz(str(tmp_path / "obj.npz"))            # no unpickling of data files
    np.savez(tmp_path / "flat.npz", data=np.zeros(10))
    with pytest.raises(ValueError, match=r"shape \(T, N, C\)"):
        load_pems_npz(str(tmp_path / "flat.npz"))
    bad = s.copy()
    bad[5, 1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf.*step 5, node 1"):
        traffic_data(bad, split_windows(60))
    with pytest.raises(ValueError, match="run past the series"):
        traffic_data(s, {"train": np.arange(10), "val": np.arange(30, 40), "test": np.arange(30, 37)})
    with pytest.raises(ValueError, match=r"missing split\(s\) \['test'\]"):
        traffic_data(s, {"train": np.arange(10), "val": np.arange(10)})
    tod_bad = s.copy()
    tod_bad[0, 0, 1] = 1.0
    with pytest.raises(ValueError, match="time of day"):
        traffic_data(tod_bad, split_windows(60))
    with pytest.raises(ValueError, match=r"shape \(T, N, 3\)"):
        traffic_data(s[..., :2], split_windows(60))
    with pytest.raises(ValueError, match=r"rows must be \[s, s\+12, s\+24\]"):
        index_to_starts(np.array([[0, 12, 23]]))
    with pytest.raises(ValueError, match="need at least 3"):
        split_windows(25)
    with pytest.raises(ValueError, match="unknown dataset"):
        canonical_name("PEMS09")
    with pytest.raises(FileNotFoundError, match="no PEMS04 data"):
        load_dataset("PEMS04", str(tmp_path))
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("PEMS04")


def test_batch_order_deterministic_sharded_and_resumable():
    o = BatchOrder(37, 4, shuffle=True, seed=3)
    a, b = o.indices(0), o.indices(0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, o.indices(1))
    assert sorted(a.tolist()) == list(range(37)) and len(o) == 10
    full = list(o.batches(2))
    np.testing.assert_array_equal(np.concatenate(full[4:]), np.concatenate(list(o.batches(2, skip=4))))
    r0 = BatchOrder(37, 4, shuffle=True, seed=3, rank=0, world_size=2)
    r1 = BatchOrder(37, 4, shuffle=True, seed=3, rank=1, world_size=2)
    single = BatchOrder(37, 8, shuffle=True, seed=3)
    assert len(r0) == len(r1) == 5
    for b0, b1, bs in zip(r0.batches(5), r1.batches(5), single.batches(5)):
        if len(bs) == 8:  # the union of the ranks' i-th batches is the single process's i-th batch
            assert sorted(np.concatenate([b0, b1]).tolist()) == sorted(bs.tolist())
    e0 = BatchOrder(37, 4, shuffle=False, rank=0, world_size=2, pad=False)
    e1 = BatchOrder(37, 4, shuffle=False, rank=1, world_size=2, pad=False)
    seen = np.concatenate(list(e0.batches(0)) + list(e1.batches(0)))
    assert sorted(seen.tolist()) == list(range(37))         # evaluation: every window exactly once
    assert len(BatchOrder(37, 4, shuffle=False, limit_batches=2)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(10, 0, shuffle=False)


def test_bundled_sample_is_the_real_pems08_prefix():
    assert os.path.getsize(SAMPLE_PATH) < 1_000_000
    flow = pems08_sample_flow()
    assert flow.shape == (1282, 170) and flow.dtype == np.float32
    # Every step of every 17th sensor of the recovered source, flow channel: catches a wrong
    # channel, a shifted step or a reordered sensor in the bundled copy.
    src = np.load(os.path.join(FIXTURES, "pems08_first1282steps_flow_every17th_sensor.npz"))
    assert src["flow"].shape == (1282, 10)
    np.testing.assert_array_equal(flow[:, src["nodes"]], src["flow"].astype(np.float32))
    d = load_pems08_sample()
    assert d.name == "PEMS08_SAMPLE" and d.num_nodes == 170
    assert [len(d.splits[k]) for k in ("train", "val", "test")] == [755, 252, 252]
    assert d.series[0, 0, 2] == 4                            # 2016-07-01 was a Friday
    assert load_dataset().name == "LOSLOOP"                    # the default since Los-loop is bundled


def test_scaler_rejects_constant_signal():
    s = _series(T=60)
    s[..., 0] = 7
    with pytest.raises(ValueError, match="zero or non-finite std"):
        traffic_data(s, split_windows(60))
    assert StandardScaler(1.0, 2.0).inverse_transform(StandardScaler(1.0, 2.0).transform(5.0)) == 5.0
    d = from_signal(_series(T=60)[..., 0])
    assert d.series.shape == (60, 5, 3)


def test_bundled_readers_defined_once():
    """The bundled readers are defined in the data layer and re-exported by
    himnet_fast.datasets (the layering and the absence of import cycles: tests/test_layers.py)."""
    # the bundled readers: reachable from both packages, defined once
    from himnet_fast import datasets
    from himnet_fast.data import bundled
    assert datasets.load_losloop is bundled.load_losloop and datasets.LOSLOOP_PATH == bundled.LOSLOOP_PATH
