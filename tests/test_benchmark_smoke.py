"""Smoke tests of `himnet-fast bench` / `scale` on tiny shapes (no timing asserts).

The runner starts one worker process per job, as in real runs; the shapes are tiny and the
workers single-threaded so the whole file stays well under a minute and a half on 2 cores.
"""
import csv
import os

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from himnet_fast import cli  # noqa: E402
from himnet_fast.benchmark import providers as P  # noqa: E402
from himnet_fast.benchmark.runner import RunConfig, execute, parse_nodes  # noqa: E402
from himnet_fast.benchmark.schema import COLUMNS, make_row  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_subcommand_writes_csv_markdown_and_plots(tmp_path):
    out = tmp_path / "res"
    rc = cli.main(["bench", "--preset", "pems08", "--nodes", "16", "--batch-size", "2", "--device", "cpu",
                   "--providers", "reference,torch,triton", "--what", "himnet", "--modes", "train",
                   "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out)])
    assert rc == 0
    stem = "bench_pems08_cpu_b2"
    header, rows = _read(out / f"{stem}.csv")
    assert tuple(header) == COLUMNS
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"reference", "torch", "triton"}
    for name in ("reference", "torch"):
        r = by[name]
        assert (r["kernel"], r["mode"], r["x"], r["batch_size"], r["status"]) == ("himnet", "train", "16", "2", "ok")
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"])
        assert float(r["peak_mem_abs_mb"]) >= float(r["peak_mem_mb"]) >= 0
        assert r["mem_kind"] == "rss" and r["device"] and r["torch"] and r["timestamp"]
    assert float(by["torch"]["max_rel_err"]) <= P.tolerance()
    assert float(by["torch"]["check_n"]) == 16
    # Memory breakdown: params > 0, grads = params, Adam = 2x params, saved activations
    # measured (the reference saves every intermediate, the recomputing torch backend less).
    for name in ("reference", "torch"):
        r = by[name]
        params = float(r["mem_params_mb"])
        assert params > 0 and float(r["mem_grads_mb"]) == params and float(r["mem_adam_mb"]) == 2 * params
        assert float(r["mem_saved_mb"]) > 0
    assert float(by["torch"]["mem_saved_mb"]) < float(by["reference"]["mem_saved_mb"])
    assert by["triton"]["status"] == "skipped" and "interpreter" in by["triton"]["reason"]
    md = (out / f"{stem}.md").read_text()
    assert "| kernel | mode | N | B | provider | status | p50 ms |" in md
    assert "speedup vs ref" in md and "memory ratio vs ref" in md and "saved act. MiB" in md
    png = out / f"{stem}_himnet_train.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_oom_and_timeout_are_results(tmp_path):
    # The reference builds the (B, N, I, O) "ST" weight: 4 x 20000 x 134 x 128 fp32 = 5.5 GB,
    # over a 2 GB address-space limit, so the worker records an OOM row and the run goes on.
    cfg = RunConfig(kind="scale", preset="pems07", nodes=[20000], batch_size=4, device="cpu",
                    providers=["reference"], what=["meta_linear_st"], modes=["train"], out=str(tmp_path),
                    repeats=1, warmup=0, memory_limit_gb=2.0, threads=1)
    df = execute(cfg, log=lambda *_: None)
    assert list(df["status"]) == ["oom"] * 3 and list(df["mode"]) == list(P.OP_MODES)
    assert df["reason"].str.contains("memory").all()
    assert os.path.exists(tmp_path / (cfg.stem + ".md"))

    cfg = RunConfig(kind="scale", preset="pems08", nodes=[16], batch_size=1, device="cpu",
                    providers=["torch"], what=["himnet"], modes=["infer"], out=str(tmp_path),
                    timeout_s=0.2, stem="timeout")
    df = execute(cfg, log=lambda *_: None)
    assert list(df["status"]) == ["timeout"] and "0.2" in df["reason"][0]


def test_report_ratios_and_plots_without_a_run(tmp_path):
    from himnet_fast.benchmark import report

    base = dict(kernel="himnet", mode="train", x_name="N", batch_size=2, preset="pems07", device="cpu",
                torch="x", timestamp="t")
    rows = [make_row(provider="reference", x=100, status="ok", p20=9, p50=10, p80=11, peak_mem_mb=300, **base),
            make_row(provider="torch", x=100, status="ok", p20=1, p50=2, p80=3, peak_mem_mb=50, **base),
            make_row(provider="reference", x=1000, status="oom", reason="out of memory", **base),
            make_row(provider="torch", x=1000, status="ok", p20=5, p50=6, p80=7, peak_mem_mb=80, **base)]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    r = report.add_ratios(df)
    assert r.loc[1, "speedup"] == pytest.approx(5.0) and r.loc[1, "mem_ratio"] == pytest.approx(6.0)
    assert pd.isna(r.loc[3, "speedup"])  # the reference ran out of memory at N = 1000
    table = report.summary_table(df)
    assert list(table["speedup vs ref"]) == ["1.00x", "5.00x", "", ""]
    assert list(table["status"]) == ["ok", "ok", "oom", "ok"]
    paths = report.write_plots(df, str(tmp_path), "unit")
    assert [os.path.basename(p) for p in paths] == ["unit_himnet_train.png"]


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["bench", "--preset", "nope", "--device", "cpu"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert cli.main(["scale", "--nodes", "10,abc", "--device", "cpu"]) == 2
    assert "--nodes must be comma-separated integers" in capsys.readouterr().err
    assert cli.main(["bench", "--providers", "torch,fast", "--device", "cpu"]) == 2
    assert "unknown ['fast']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nodes entries must be >= 1"):
        parse_nodes("0")
    with pytest.raises(KeyError, match="unknown result columns"):
        make_row(speed=1)
