"""``himnet-fast train`` / ``evaluate`` end to end on the bundled real sample (tiny settings)."""
import json
import os

import pytest
import torch

from himnet_fast.cli import main
from himnet_fast.reference import RefHimNet

TINY = ["--hidden-dim", "8", "--batch-size", "4", "--limit-batches", "1", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--epochs", "1", "--out", out, "--device", "cpu"] + TINY) == 0
    return out


def test_train_on_bundled_sample_writes_outputs(run, capsys):
    assert sorted(os.listdir(run)) == ["best.pt", "checkpoint.pt", "loss_curve.png", "metrics.json"]
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["config"]["dataset"] == "PEMS08_SAMPLE" and m["config"]["model"]["hidden_dim"] == 8
    assert m["config"]["model"]["tod_embedding_dim"] == 10                 # the PEMS08 preset
    assert len(m["history"]) == 1 and len(m["test"]["steps"]) == 12
    assert "PEMS08_SAMPLE: 1282 steps x 170 nodes" in m["data"]


def test_resume_continues_the_run(run, capsys):
    assert main(["train", "--resume", os.path.join(run, "checkpoint.pt"), "--epochs", "2", "--limit-batches", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "epoch   2" in out
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert [h["epoch"] for h in m["history"]] == [1, 2] and m["counters"]["batches_seen"] == 2


def test_evaluate_checkpoint_with_json_and_meta_export(run, tmp_path, capsys):
    js, meta = str(tmp_path / "m.json"), str(tmp_path / "meta")
    assert main(["evaluate", "--checkpoint", os.path.join(run, "best.pt"), "--limit-batches", "1", "--device", "cpu",
                 "--no-progress", "--json", js, "--export-meta", meta]) == 0
    out = capsys.readouterr().out
    assert "test split" in out and "    all " in out and out.count("\n      1 ") == 1
    m = json.load(open(js))
    assert set(m["overall"]) == {"MAE", "RMSE", "MAPE"}
    assert sorted(os.listdir(meta)) == ["hourly_similarity.png", "meta_parameters.npz", "spatial_pca.png",
                                        "temporal_pca.png"]


def test_evaluate_raw_original_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    ref = RefHimNet(170, hidden_dim=8, tod_embedding_dim=10, dow_embedding_dim=2, node_embedding_dim=14,
                    st_embedding_dim=10)
    path = str(tmp_path / "original.pt")
    torch.save(ref.state_dict(), path)                  # what the original train.py saves
    assert main(["evaluate", "--checkpoint", path, "--dataset", "PEMS08_SAMPLE", "--limit-batches", "1",
                 "--batch-size", "4", "--no-progress"]) == 0
    assert "    all " in capsys.readouterr().out
    torch.save({"something": torch.zeros(2)}, str(tmp_path / "other.pt"))
    with pytest.raises(SystemExit, match="neither a himnet_fast checkpoint nor a HimNet state_dict"):
        main(["evaluate", "--checkpoint", str(tmp_path / "other.pt")])
    small = RefHimNet(7, hidden_dim=8)
    torch.save(small.state_dict(), str(tmp_path / "n7.pt"))
    with pytest.raises(SystemExit, match="has 7 nodes but PEMS08_SAMPLE has 170"):
        main(["evaluate", "--checkpoint", str(tmp_path / "n7.pt"), "--limit-batches", "1"])


def test_train_synthetic(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert main(["train", "--dataset", "PEMS04", "--synthetic", "--steps", "200", "--nodes", "5", "--epochs", "1",
                 "--out", out] + TINY) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["config"]["model"]["tod_embedding_dim"] == 12 and m["config"]["model"]["num_nodes"] == 5
    assert m["config"]["data_source"]["synthetic"] is True
    # evaluate rebuilds the same synthetic data from the checkpoint's data_source
    assert main(["evaluate", "--checkpoint", os.path.join(out, "best.pt"), "--limit-batches", "1",
                 "--no-progress"]) == 0
    assert "PEMS04(synthetic 200x5)" in capsys.readouterr().out


def test_parser_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--synthetic", "--epochs", "--batch-size", "--limit-batches",
                 "--backend", "--device", "--out", "--resume"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["train", "--data-dir", "x", "--synthetic"])          # mutually exclusive
    assert "not allowed with argument" in capsys.readouterr().err
