"""``--data PATH``: your own T x N series in CSV / NumPy / Parquet / HDF5, and their errors."""
import importlib.util

import numpy as np
import pandas as pd
import pytest

from himnet_fast.data.files import load_series_file, read_table, stamps_to_features

T, N = 300, 4


def _signal(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(20, 60, size=(T, N))


def _check(d, sig):
    assert d.name == "custom" and d.num_nodes == N and d.num_steps == T
    np.testing.assert_allclose(d.series[..., 0], np.nan_to_num(sig, nan=0.0), rtol=1e-6)
    assert d.extra["protocol"] == "tgcn" and {len(v) for v in d.splits.values()} != {0}


def test_csv_with_header_and_timestamps(tmp_path):
    sig = _signal()
    stamps = pd.date_range("2024-01-06 23:00", periods=T, freq="5min")  # a Saturday
    df = pd.DataFrame(sig, columns=[f"s{i}" for i in range(N)])
    df.insert(0, "time", stamps.astype(str))
    path = tmp_path / "x.csv"
    df.to_csv(path, index=False)
    d = load_series_file(str(path))
    _check(d, sig)
    assert d.series[0, 0, 2] == 5 and d.series[12, 0, 2] == 6      # Saturday 23:00, then Sunday
    assert d.series[12, 0, 1] == 0 and d.series[1, 0, 1] == np.float32(277 / 288)
    assert d.extra["sensor_names"] == ["s0", "s1", "s2", "s3"]
    with pytest.raises(ValueError, match="has timestamps; --start-time/--interval"):
        load_series_file(str(path), start="2024-01-01 00:00")


def test_csv_without_header_uses_start_and_interval(tmp_path):
    sig = _signal()
    path = tmp_path / "x.csv"
    np.savetxt(path, sig, delimiter=",")
    d = load_series_file(str(path), start="2024-01-01 00:00", interval_minutes=15)   # a Monday
    _check(d, sig)
    assert d.series[1, 0, 1] == np.float32(3 / 288) and d.series[96, 0, 2] == 1   # 15 min later; Tuesday
    assert "assumed start" in load_series_file(str(path)).source
    with pytest.raises(ValueError, match="--interval must be a positive number of minutes dividing a day"):
        load_series_file(str(path), interval_minutes=7)


def test_numpy_files_and_missing_values(tmp_path):
    sig = _signal()
    sig[5, 1] = np.nan
    sig[6, 2] = 0.0
    np.save(tmp_path / "x.npy", sig)
    d = load_series_file(str(tmp_path / "x.npy"))
    _check(d, sig)
    assert d.series[5, 1, 0] == 0 and d.num_missing == 2                      # targets: 0, masked
    assert "2 missing readings (0.17%): inputs carry the last observation forward" in d.describe()
    assert d.filled[5, 1] == np.float32(sig[4, 1]) and d.filled[6, 2] == np.float32(sig[5, 2])   # inputs
    stamps = np.datetime64("2024-01-01T00:00") + (np.arange(T) * 5).astype("timedelta64[m]")
    np.savez(tmp_path / "x.npz", data=sig[..., None].repeat(3, -1), timestamps=stamps)
    _check(load_series_file(str(tmp_path / "x.npz")), sig)                      # (T, N, C): channel 0


@pytest.mark.parametrize("content,match", [
    ("a,b\n1,x\n2,3\n", "column 'b' is not numeric"),
    ("t,a\nnot a time,1\n", "first column 't' is neither numbers nor timestamps"),
])
def test_malformed_csv(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_table(str(path))


def test_malformed_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_series_file(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="is a folder"):
        load_series_file(str(tmp_path))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="unknown format '.xlsx'"):
        load_series_file(str(tmp_path / "x.xlsx"))
    np.save(tmp_path / "v.npy", np.zeros(10))
    with pytest.raises(ValueError, match=r"expected a numeric \(T, N\) or \(T, N, C\) array, got shape \(10,\)"):
        load_series_file(str(tmp_path / "v.npy"))
    np.savez(tmp_path / "two.npz", a=np.zeros((30, 2)), b=np.zeros((30, 2)))
    with pytest.raises(ValueError, match="expected a 'data' array"):
        load_series_file(str(tmp_path / "two.npz"))
    sig = _signal()
    sig[:, 2] = np.nan
    np.save(tmp_path / "dead.npy", sig)
    with pytest.raises(ValueError, match="sensor 2 has no reading at all"):
        load_series_file(str(tmp_path / "dead.npy"))
    sig = _signal()
    sig[3, 0] = np.inf
    np.save(tmp_path / "inf.npy", sig)
    with pytest.raises(ValueError, match="infinite value at step 3, sensor 0"):
        load_series_file(str(tmp_path / "inf.npy"))
    np.save(tmp_path / "short.npy", _signal()[:40])
    with pytest.raises(ValueError, match="a window needs 24"):
        load_series_file(str(tmp_path / "short.npy"))
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable NumPy .npy file"):
        load_series_file(str(tmp_path / "garbage.npy"))


def test_timestamps_must_increase():
    t = np.array(["2024-01-01T00:00", "2024-01-01T00:05", "2024-01-01T00:05"], dtype="datetime64[m]")
    with pytest.raises(ValueError, match="timestamps must increase; row 2"):
        stamps_to_features(t)


def test_graph(tmp_path):
    np.save(tmp_path / "x.npy", _signal())
    adj = np.eye(N)
    np.savetxt(tmp_path / "adj.csv", adj, delimiter=",")
    d = load_series_file(str(tmp_path / "x.npy"), graph=str(tmp_path / "adj.csv"))
    np.testing.assert_array_equal(d.extra["adj"], adj)
    np.savetxt(tmp_path / "adj3.csv", np.eye(3), delimiter=",")
    with pytest.raises(ValueError, match="expected a 4 x 4 matrix"):
        load_series_file(str(tmp_path / "x.npy"), graph=str(tmp_path / "adj3.csv"))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None or importlib.util.find_spec("fastparquet")
                    is not None, reason="a Parquet engine is installed")
def test_parquet_without_an_engine_names_the_package(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_series_file(str(tmp_path / "x.parquet"))


@pytest.mark.skipif(importlib.util.find_spec("tables") is not None, reason="PyTables is installed")
def test_hdf5_without_pytables_names_the_package(tmp_path):
    (tmp_path / "metr-la.h5").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install tables"):
        load_series_file(str(tmp_path / "metr-la.h5"))


@pytest.mark.skipif(importlib.util.find_spec("tables") is None, reason="needs PyTables")
def test_hdf5_dcrnn_layout(tmp_path):
    sig = _signal()
    df = pd.DataFrame(sig, index=pd.date_range("2012-03-01", periods=T, freq="5min"),
                      columns=[str(773869 + i) for i in range(N)])
    df.to_hdf(tmp_path / "metr-la.h5", key="df")
    d = load_series_file(str(tmp_path / "metr-la.h5"))
    _check(d, sig)
    assert d.series[0, 0, 2] == 3                                           # Thursday
