"""``himnet-fast train`` / ``evaluate`` end to end on the bundled data (tiny settings), and the
CLI's behaviour on user mistakes, Ctrl-C and existing runs."""
import json
import os
import signal

import pytest
import torch

from himnet_fast.cli import main
from himnet_fast.reference import RefHimNet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--hidden-dim", "8", "--batch-size", "4", "--limit-batches", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--epochs", "1", "--out", out, "--device", "cpu"] + TINY) == 0
    return out


def test_train_on_bundled_losloop_writes_outputs(run, capsys):
    assert sorted(os.listdir(run)) == ["best.pt", "checkpoint.pt", "error_by_horizon.png", "forecast_vs_truth.png",
                                       "loss_curve.png", "metrics.json"]
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["config"]["dataset"] == "LOSLOOP" and m["config"]["model"]["hidden_dim"] == 8
    assert m["config"]["model"]["dow_embedding_dim"] == 2 and m["config"]["loss"] == "mae"   # the small preset
    assert len(m["history"]) == 1 and len(m["test"]["steps"]) == 12
    assert set(m["baselines"]) == {"last value", "historical average"}
    assert "LOSLOOP: 2016 steps x 207 nodes" in m["data"]


def test_train_prints_the_comparison_with_the_baselines(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", "--epochs", "1", "--out", out, "--dataset", "PEMS08_SAMPLE"] + TINY) == 0
    txt = capsys.readouterr().out
    for s in ("last value", "historical average", "15 min (3)", "60 min (12)", "the last value (MAE)"):
        assert s in txt
    assert json.load(open(os.path.join(out, "metrics.json")))["config"]["dataset"] == "PEMS08_SAMPLE"


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
    assert main(["evaluate", "--checkpoint", str(tmp_path / "other.pt")]) == 2
    assert "neither a himnet_fast checkpoint nor a HimNet state_dict" in capsys.readouterr().err
    small = RefHimNet(7, hidden_dim=8)
    torch.save(small.state_dict(), str(tmp_path / "n7.pt"))
    assert main(["evaluate", "--checkpoint", str(tmp_path / "n7.pt"), "--limit-batches", "1"]) == 2
    assert "has 7 nodes but LOSLOOP has 207" in capsys.readouterr().err


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
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--synthetic", "--epochs", "--batch-size", "--limit-batches",
                 "--backend", "--device", "--out", "--resume"):
        assert flag in out
    assert main(["train", "--data-dir", "x", "--synthetic"]) == 2          # mutually exclusive
    _one_line_error(capsys, "not allowed with argument")


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("argv,fragment", [
    (["train", "--dataset", "PEMS08", "--data-dir", "/nonexistent/dir"], "no such folder"),
    (["train", "--dataset", "PEMS09"], "unknown dataset 'PEMS09'"),
    (["train", "--dataset", "PEMS07"], "needs --data-dir"),
    (["train", "--backend", "nope"], "--backend 'nope'"),
    (["train", "--device", "tpu"], "expected cpu, cuda or cuda:K"),
    (["train", "--resume", "/nonexistent/checkpoint.pt"], "no such checkpoint file"),
    (["train", "--data", "/nonexistent.csv"], "no such file"),
    (["train", "--graph", "a.csv"], "go with --data PATH"),
    (["evaluate", "--checkpoint", "/nonexistent.pt"], "no such file"),
])
def test_user_mistakes_print_one_line_and_exit_2(argv, fragment, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "o")] if argv[0] == "train" else argv) == 2
    _one_line_error(capsys, fragment, "himnet-fast " + argv[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_is_a_user_error(capsys, tmp_path):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--device cuda", "use --device cpu")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        main(["train", "--dataset", "PEMS09", "--debug", "--out", str(tmp_path)])


def test_existing_run_is_not_overwritten(run, tmp_path, capsys):
    assert main(["train", "--out", run] + TINY) == 2
    _one_line_error(capsys, "already holds a run", "--resume", "--overwrite")
    new = str(tmp_path / "new")
    # --resume into a folder that does not exist yet creates it and continues there
    assert main(["train", "--resume", run, "--out", new, "--epochs", "3", "--limit-batches", "1",
                 "--no-progress"]) == 0
    m = json.load(open(os.path.join(new, "metrics.json")))
    assert m["history"][-1]["epoch"] == 3 and os.path.isfile(os.path.join(new, "checkpoint.pt"))
    assert main(["train", "--resume", run, "--out", new, "--epochs", "4", "--limit-batches", "1"]) == 2
    _one_line_error(capsys, "already holds another run")
    assert main(["train", "--out", new, "--overwrite", "--epochs", "1"] + TINY) == 0
    assert len(json.load(open(os.path.join(new, "metrics.json")))["history"]) == 1


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, capsys, monkeypatch):
    from himnet_fast.training.loop import Trainer

    orig = Trainer.train_batch
    calls = []

    def interrupted(self, positions):  # Ctrl-C arrives while the first batch is training
        loss = orig(self, positions)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "train_batch", interrupted)
    out = str(tmp_path / "r")
    argv = ["train", "--epochs", "1", "--out", out, "--hidden-dim", "8", "--batch-size", "4", "--limit-batches", "2",
            "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    ck = os.path.join(out, "checkpoint.pt")
    assert f"himnet-fast train --resume {ck}" in err
    state = torch.load(ck, weights_only=True)
    assert state["counters"]["step_in_epoch"] == 1 and state["counters"]["batches_seen"] == 1
    assert main(["train", "--resume", ck, "--no-progress"]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["counters"]["batches_seen"] == 2 and len(m["history"]) == 1


def test_bench_does_not_write_into_the_committed_results_by_default():
    from himnet_fast.benchmark.cli import _config
    from himnet_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "--nodes", "16", "--device", "cpu"])
    assert _config(args, "bench").out == "runs/bench/cpu"
    args = build_parser().parse_args(["scale", "--nodes", "16,32", "--device", "cpu", "--out", "bench/results/cpu"])
    assert _config(args, "scale").out == "bench/results/cpu"          # only when asked


def test_train_and_evaluate_on_your_own_csv(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "speeds.csv"
    np.savetxt(path, rng.uniform(20, 60, size=(300, 5)), delimiter=",", header="a,b,c,d,e", comments="")
    out = str(tmp_path / "r")
    assert main(["train", "--data", str(path), "--start-time", "2024-01-01 00:00", "--epochs", "1", "--out", out]
                + TINY) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["config"]["dataset"] == "custom" and m["config"]["model"]["num_nodes"] == 5
    assert m["config"]["data_source"]["data_path"] == str(path)
    # evaluate reloads the same file from the checkpoint's data_source
    assert main(["evaluate", "--checkpoint", os.path.join(out, "best.pt"), "--limit-batches", "1",
                 "--no-progress"]) == 0
    assert "custom: 300 steps x 5 nodes" in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "x")]) == 2
    _one_line_error(capsys, "no such file")


@pytest.mark.parametrize("name,label", [("agcrn", "AGCRN"), ("hyperst-lstm-d", "HyperST-LSTM-D"),
                                        ("sba", "SBATransformer")])
def test_train_and_evaluate_another_model(tmp_path, capsys, name, label):
    """--model trains a model of himnet_fast.models through the same pipeline (Los-loop, its
    coordinates and graph for HyperST's attributes); evaluate rebuilds it from the checkpoint."""
    out = tmp_path / name
    assert main(["train", "--model", name, "--epochs", "1", "--limit-batches", "2", "--hidden-dim", "8",
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert label in text and "last value" in text
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert state["config"]["architecture"] == name
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--limit-batches", "1", "--no-progress"]) == 0
    assert label in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,expected", [
    ("--epochs", "-1", "expected an integer >= 1, got -1"),
    ("--epochs", "0", "expected an integer >= 1, got 0"),
    ("--epochs", "two", "expected an integer >= 1, got 'two'"),
    ("--batch-size", "0", "expected an integer >= 1, got 0"),
    ("--lr", "0", "expected a finite number > 0, got 0"),
    ("--lr", "-0.01", "expected a finite number > 0, got -0.01"),
    ("--lr", "nan", "expected a finite number > 0, got nan"),
    ("--patience", "0", "expected an integer >= 1, got 0"),
    ("--steps", "-5", "expected an integer >= 1, got -5"),
    ("--nodes", "0", "expected an integer >= 1, got 0"),
    ("--limit-batches", "0", "expected an integer >= 1, got 0"),
    ("--save-every", "-2", "expected an integer >= 1, got -2"),
    ("--hidden-dim", "0", "expected an integer >= 1, got 0"),
    ("--tf-decay-steps", "0", "expected an integer >= 1, got 0"),
    ("--threads", "0", "expected an integer >= 1, got 0"),
    ("--interval", "7", "expected a number of minutes dividing a day (1440), got 7"),
    ("--seed", "-1", "expected an integer in [0, 4294967296), got -1"),
    ("--data-seed", "4294967296", "expected an integer in [0, 4294967296), got 4294967296"),
])
def test_numeric_options_are_validated(flag, value, expected, tmp_path, capsys):
    """A bad number stops before anything runs or is written: one line naming the option, status 2."""
    out = tmp_path / "o"
    assert main(["train", flag, value, "--out", str(out)]) == 2
    _one_line_error(capsys, f"himnet-fast train: error: argument {flag}: {expected}")
    assert not out.exists()


def test_evaluate_validates_its_numbers_too(capsys):
    assert main(["evaluate", "--checkpoint", "x.pt", "--batch-size", "0"]) == 2
    _one_line_error(capsys, "himnet-fast evaluate: error: argument --batch-size: expected an integer >= 1, got 0")


def test_a_run_without_checkpoint_gets_no_resume_hint(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(["train", "--out", str(out)] + TINY) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" not in err and "--overwrite" in err


def test_resume_uses_the_device_threads_and_settings_of_the_run(tmp_path, capsys, monkeypatch):
    """The printed resume command continues on the run's own device and thread count (recorded
    in the checkpoint), whatever the resuming process had, and with the run's settings."""
    from himnet_fast import checkpoint as ckpt
    from himnet_fast.training.loop import Trainer

    out = tmp_path / "r"
    argv = ["train", "--epochs", "1", "--out", str(out), "--device", "cpu"] + TINY
    assert main(argv + ["--threads", "2"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["runtime"] == {"device": "cpu", "threads": 2, "world_size": 1}
    seen = []
    fit = Trainer.fit

    def spy(self, **kw):
        seen.append({"threads": torch.get_num_threads(), "device": str(self.device), "config": self.config.to_dict()})
        return fit(self, **kw)

    monkeypatch.setattr(Trainer, "fit", spy)
    try:
        torch.set_num_threads(1)                 # a new process, with another default
        assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
        assert seen[-1]["threads"] == 2 and seen[-1]["device"] == "cpu"
        assert seen[-1]["config"] == dict(state["config"], max_epochs=2)
        assert "device cpu, 2 thread(s)" in capsys.readouterr().out
        # a checkpoint that predates the record: the rule of a fresh run of its dataset (Los-loop: one thread)
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        del state["runtime"]
        ckpt.atomic_save(state, str(out / "checkpoint.pt"))
        torch.set_num_threads(2)
        assert main(["train", "--resume", str(out), "--epochs", "3", "--no-progress"]) == 0
        assert seen[-1]["threads"] == 1
    finally:
        torch.set_num_threads(1)
    # settings that define the run cannot change on resume
    assert main(["train", "--resume", str(out), "--epochs", "4", "--lr", "0.1", "--batch-size", "8"]) == 2
    _one_line_error(capsys, "--batch-size, --lr cannot change", "allowed: --epochs")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resume_of_a_gpu_run_without_a_gpu_says_so(run, tmp_path, capsys):
    from himnet_fast import checkpoint as ckpt

    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    state["runtime"]["device"] = "cuda:0"
    path = str(tmp_path / "checkpoint.pt")
    ckpt.atomic_save(state, path)
    assert main(["train", "--resume", path, "--epochs", "2"]) == 2
    _one_line_error(capsys, "the run trained on cuda:0, which is not available here", "pass --device")


def test_own_data_summary_is_true_for_the_run(tmp_path, capsys):
    """--data: the missing readings are counted, no preset note, and one verdict per baseline."""
    import numpy as np

    rng = np.random.default_rng(1)
    sig = 50 + 10 * np.sin(np.arange(300) / 20)[:, None] + rng.normal(0, 1, (300, 4))
    sig[[40, 41, 250], [1, 1, 3]] = np.nan
    path = tmp_path / "s.csv"
    np.savetxt(path, sig, delimiter=",")
    out = tmp_path / "r"
    assert main(["train", "--data", str(path), "--epochs", "1", "--out", str(out)] + TINY) == 0
    txt = capsys.readouterr().out
    assert "note: the" not in txt and "preset has" not in txt
    assert "3 missing readings (0.25%): inputs carry the last observation forward" in txt
    verdicts = [line for line in txt.splitlines() if line.startswith("HimNet ") and " (MAE) at " in line]
    assert len(verdicts) == 2 and "last value" in verdicts[0] and "historical average" in verdicts[1]
    listed = txt.strip().splitlines()[-1]
    assert listed.startswith(f"outputs in {out}: ")
    assert set(listed.split(": ", 1)[1].split(", ")) == set(os.listdir(out))


def test_output_to_a_closed_pipe_ends_quietly(tmp_path):
    """`himnet-fast ... | head` that stops reading: no error message, the status of SIGPIPE."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "himnet_fast", "info"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()              # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
