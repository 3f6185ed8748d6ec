"""Checkpoints: exact resume, atomic writes, weights_only loading, RNG state round trips."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from himnet_fast.data import load_dataset
from himnet_fast.reference import RefHimNet
from himnet_fast.training import TrainConfig, Trainer
from himnet_fast import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4, st_embedding_dim=4,
             tf_decay_steps=10)


@pytest.fixture(scope="module")
def data():
    return load_dataset("PEMS08", synthetic=True, num_steps=260, num_nodes=6, seed=2)


def cfg(**kw):
    base = dict(SMALL, max_epochs=3, batch_size=4, limit_batches=3, milestones=[2], seed=5)
    base.update(kw)
    return TrainConfig.from_preset("PEMS08", **base)


def _quiet(**kw):
    return dict(progress=False, log=lambda m: None, **kw)


def _assert_same_run(a: Trainer, b: Trainer):
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k                                   # bitwise
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k])
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert a.counters() == b.counters()
    assert a.scheduler.get_last_lr() == b.scheduler.get_last_lr()
    assert a.test_metrics == b.test_metrics


@pytest.mark.parametrize("stop_after", [3, 4])  # at an epoch boundary and mid-epoch
def test_resume_equals_uninterrupted(data, tmp_path, stop_after):
    whole = Trainer(data, cfg(), **_quiet())
    whole.fit()
    out = str(tmp_path)
    first = Trainer(data, cfg(), **_quiet(out_dir=out))
    first.fit(stop_after_batches=stop_after)
    # scramble every global RNG: the checkpoint must restore them
    np.random.seed(123)
    torch.manual_seed(123)
    random.seed(123)
    resumed = Trainer.resume(os.path.join(out, "checkpoint.pt"), data, **_quiet(out_dir=out))
    assert resumed.batches_seen == stop_after
    resumed.fit()
    _assert_same_run(whole, resumed)
    assert os.path.isfile(os.path.join(out, "best.pt")) and os.path.isfile(os.path.join(out, "metrics.json"))


def test_save_every_writes_mid_epoch_checkpoints(data, tmp_path, monkeypatch):
    tr = Trainer(data, cfg(max_epochs=1, save_every=2), **_quiet(out_dir=str(tmp_path)))
    saves = []
    orig = ckpt.atomic_save
    ckpt_mod_save = lambda obj, path: saves.append((os.path.basename(path), obj.get("counters", {}).get(  # noqa: E731
        "step_in_epoch"))) or orig(obj, path)
    # the loop calls ckpt.atomic_save through the checkpoint module, so patching it there sees every save
    monkeypatch.setattr(ckpt, "atomic_save", ckpt_mod_save)
    tr.fit()
    assert ("checkpoint.pt", 2) in saves and ("checkpoint.pt", 0) in saves


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.atomic_save({"step": 1, "w": torch.arange(4.0)}, path)
    before = open(path, "rb").read()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert ckpt.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]                   # no temp file left behind
    ckpt.atomic_save({"step": 3}, path)
    assert ckpt.load(path)["step"] == 3
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask             # not mkstemp's 0600


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_is_weights_only(tmp_path, data):
    evil = str(tmp_path / "evil.pt")
    with open(evil, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load|not a readable"):
        ckpt.load(evil)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(str(tmp_path / "missing.pt"))
    tr = Trainer(data, cfg(max_epochs=1, limit_batches=1), **_quiet(out_dir=str(tmp_path)))
    tr.fit()
    for name in ("checkpoint.pt", "best.pt"):   # both load with the plain torch.load(weights_only=True)
        state = torch.load(tmp_path / name, weights_only=True)
        assert state["format"] == ckpt.FORMAT
    with pytest.raises(ValueError, match="not a training checkpoint"):
        Trainer.resume(str(tmp_path / "best.pt"), data, **_quiet())


def test_rng_state_round_trip():
    np.random.seed(1)
    torch.manual_seed(1)
    random.seed(1)
    np.random.standard_normal()          # leaves a cached gaussian in numpy's legacy state
    state = ckpt.rng_state()
    a = (np.random.uniform(size=3), torch.rand(3), random.random(), np.random.standard_normal())
    np.random.seed(9)
    torch.manual_seed(9)
    random.seed(9)
    ckpt.set_rng_state(state)
    b = (np.random.uniform(size=3), torch.rand(3), random.random(), np.random.standard_normal())
    np.testing.assert_array_equal(a[0], b[0])
    assert torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def test_resume_rejects_other_data_or_settings(data, tmp_path):
    tr = Trainer(data, cfg(max_epochs=1, limit_batches=1), **_quiet(out_dir=str(tmp_path)))
    tr.fit()
    other = load_dataset("PEMS08", synthetic=True, num_steps=260, num_nodes=6, seed=3)
    with pytest.raises(ValueError, match="different data"):
        Trainer.resume(str(tmp_path / "checkpoint.pt"), other, **_quiet())
    with pytest.raises(ValueError, match="cannot change 'lr'"):
        Trainer.resume(str(tmp_path / "checkpoint.pt"), data, lr=0.1, **_quiet())


def test_infer_model_config_from_original_state_dict():
    m = RefHimNet(11, hidden_dim=6, num_layers=2, cheb_k=3, tod_embedding_dim=5, dow_embedding_dim=3,
                  node_embedding_dim=4, st_embedding_dim=7)
    c = ckpt.infer_model_config(m.state_dict())
    assert c == dict(num_nodes=11, input_dim=3, output_dim=1, hidden_dim=6, num_layers=2, cheb_k=3, ycov_dim=2,
                     tod_embedding_dim=5, dow_embedding_dim=3, node_embedding_dim=4, st_embedding_dim=7)
    assert ckpt.is_raw_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="not a HimNet state_dict"):
        ckpt.infer_model_config({"weight": torch.zeros(1)})
