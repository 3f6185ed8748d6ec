"""The training protocol: presets, losses, metrics, the Trainer's loop, parity with the reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from himnet_fast.data import load_dataset
from himnet_fast.reference import RefHimNet
from himnet_fast.training import TrainConfig, Trainer, evaluate_model, seed_everything
from himnet_fast.training.protocol import (PAPER_PRESETS, MetricAccumulator, loss_fn, training_preset,
                                           masked_mae_loss)

SMALL = dict(hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4, st_embedding_dim=4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    # threads' spinning makes each step 10-100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return load_dataset("PEMS08", synthetic=True, num_steps=300, num_nodes=8, seed=1)


def small_config(**kw):
    base = dict(SMALL, tf_decay_steps=10, max_epochs=1, batch_size=4, limit_batches=3)
    base.update(kw)
    return TrainConfig.from_preset("PEMS08", **base)


# docs/spec.md, "Training protocol of the paper", written out literally.
SPEC = {  # name: (hidden, tod, dow, node, st, tf_decay, weight_decay, milestones, loss)
    "METRLA": (64, 8, 8, 16, 16, 6000, 5e-4, [30, 40], "mae"),
    "PEMSBAY": (64, 8, 8, 16, 16, 6000, 1e-4, [25, 35], "mae"),
    "PEMS03": (64, 8, 8, 16, 16, 4000, 3e-4, [30, 50], "huber"),
    "PEMS04": (64, 12, 4, 16, 16, 4000, 1e-4, [30, 50], "huber"),
    "PEMS07": (64, 8, 8, 16, 16, 6000, 1e-4, [40, 60], "huber"),
    "PEMS08": (96, 10, 2, 14, 10, 6000, 0.0, [40, 60, 80], "huber"),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_presets_equal_the_spec(name):
    p = training_preset(name)
    got = (p["hidden_dim"], p["tod_embedding_dim"], p["dow_embedding_dim"], p["node_embedding_dim"],
           p["st_embedding_dim"], p["tf_decay_steps"], p["weight_decay"], p["milestones"], p["loss"])
    assert got == SPEC[name]
    assert (p["lr"], p["eps"], p["gamma"], p["batch_size"], p["max_epochs"], p["patience"], p["clip_grad"]) == \
        (1e-3, 1e-3, 0.1, 16, 200, 20, 5.0)
    assert p["num_nodes"] == {"METRLA": 207, "PEMSBAY": 325, "PEMS03": 358, "PEMS04": 307, "PEMS07": 883,
                              "PEMS08": 170}[name]
    assert PAPER_PRESETS[name]["milestones"] == SPEC[name][7]   # the table derived from himnet_fast.presets


def test_masked_mae_ignores_zeros_and_rescales():
    true = torch.tensor([0.0, 2.0, 4.0, 0.0])
    pred = torch.tensor([9.0, 1.0, 7.0, -3.0], requires_grad=True)
    loss = masked_mae_loss(pred, true)
    assert loss.item() == pytest.approx((1 + 3) / 2)
    loss.backward()
    assert pred.grad[0] == 0 and pred.grad[3] == 0
    z = torch.zeros(3, requires_grad=True)
    out = masked_mae_loss(z + 1, torch.zeros(3))
    out.backward()
    assert out.item() == 0 and torch.isfinite(z.grad).all()
    x, y = torch.randn(50), torch.randn(50) * 3
    assert loss_fn("huber")(x, y).item() == pytest.approx(F.huber_loss(x, y).item())
    assert loss_fn("MaskedMAELoss") is masked_mae_loss
    with pytest.raises(ValueError, match="unknown loss"):
        loss_fn("mape")
    # masked MSE (an option of the small presets): zeros in the truth are left out
    p, t = torch.tensor([1.0, 5.0, 2.0]), torch.tensor([0.0, 3.0, 4.0])
    assert loss_fn("mse")(p, t).item() == pytest.approx((4 + 4) / 2)


def _original_metrics(y_true, y_pred):
    """The original's numpy metrics on the concatenated arrays (mask / mask.mean())."""
    mask = (y_true != 0).astype("float32")
    mask /= mask.mean()
    mae = np.nan_to_num(np.abs(y_pred - y_true) * mask).mean()
    rmse = np.sqrt(np.nan_to_num(np.square(y_pred - y_true) * mask).mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        mape = np.nan_to_num(np.abs((y_pred - y_true) / y_true) * mask).mean() * 100
    return mae, rmse, mape


def test_metric_accumulator_equals_the_original_metrics():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 50, (10, 12, 6, 1), generator=g).float()   # includes zeros
    p = y + torch.randn(y.shape, generator=g) * 5
    acc = MetricAccumulator(12)
    for i in range(0, 10, 3):                                        # uneven batches
        acc.update(p[i:i + 3], y[i:i + 3])
    m = acc.compute()
    ref = _original_metrics(y.numpy().astype(np.float64), p.numpy().astype(np.float64))
    assert (m["overall"]["MAE"], m["overall"]["RMSE"], m["overall"]["MAPE"]) == pytest.approx(ref, rel=1e-6)
    for t in (0, 5, 11):
        ref_t = _original_metrics(y[:, t].numpy().astype(np.float64), p[:, t].numpy().astype(np.float64))
        got = m["steps"][t]
        assert (got["MAE"], got["RMSE"], got["MAPE"]) == pytest.approx(ref_t, rel=1e-6)
    empty = MetricAccumulator(2)
    empty.update(torch.ones(1, 2, 3, 1), torch.zeros(1, 2, 3, 1))
    assert math.isnan(empty.compute()["overall"]["MAE"])
    with pytest.raises(ValueError, match="same shape"):
        acc.update(p, y[:, :6])


def test_convergence_parity_with_reference(data):
    """Same seed, same initial state_dict, same batches and teacher-forcing draws: the fast
    model and the original algorithm follow the same loss trajectory for 20 steps."""
    cfg = small_config(limit_batches=None)
    fast = Trainer(data, cfg, progress=False, log=lambda m: None)
    ref_model = RefHimNet(**cfg.model)
    ref_model.load_state_dict(fast.model.state_dict(), strict=True)
    ref = Trainer(data, small_config(limit_batches=None), progress=False, model=ref_model, log=lambda m: None)
    fast_losses, ref_losses = [], []
    for tr, out in ((fast, fast_losses), (ref, ref_losses)):
        seed_everything(cfg.seed)  # the same teacher-forcing draws for both runs
        tr.model.train()
        for i, batch in enumerate(tr.batches(0)):
            if i == 20:
                break
            out.append(float(tr.train_batch(batch)))
    assert len(fast_losses) == 20
    np.testing.assert_allclose(fast_losses, ref_losses, rtol=2e-4)
    assert fast_losses[-1] < fast_losses[0]                       # it learns
    for (k, a), b in zip(fast.model.state_dict().items(), ref.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=k)


def test_teacher_forcing_gets_batches_seen(data, monkeypatch):
    tr = Trainer(data, small_config(max_epochs=2, limit_batches=2), progress=False, log=lambda m: None)
    seen = []
    orig = tr.model.forward

    def spy(x, y_cov, labels=None, batches_seen=None, *, teacher_forcing=None):
        if tr.model.training:
            seen.append(batches_seen)
            assert labels is not None and labels.shape == (x.shape[0], 12, 8, 1)
            assert teacher_forcing is not None and teacher_forcing.shape == (12,)
        return orig(x, y_cov, labels, batches_seen, teacher_forcing=teacher_forcing)

    drawn = []
    orig_mask = tr.model.teacher_forcing_mask

    def spy_mask(batches_seen, device=None):  # the coins of each batch, drawn on the host before its step
        drawn.append(batches_seen)
        return orig_mask(batches_seen, device)

    monkeypatch.setattr(tr.model, "forward", spy)
    monkeypatch.setattr(tr.model, "teacher_forcing_mask", spy_mask)
    clip_calls = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: clip_calls.append(max_norm) or real_clip(params, max_norm))
    tr.fit()
    assert seen == [0, 1, 2, 3] and drawn == [0, 1, 2, 3]
    assert clip_calls == [5.0] * 4


def test_scheduler_early_stopping_and_history(data):
    cfg = small_config(max_epochs=6, limit_batches=1, milestones=[1, 2], patience=2)
    tr = Trainer(data, cfg, progress=False, log=lambda m: None)
    tr.fit()
    lrs = [h["lr"] for h in tr.history]
    assert lrs[:3] == pytest.approx([1e-4, 1e-5, 1e-5])            # MultiStepLR, gamma 0.1, per epoch
    for g in tr.optimizer.param_groups:
        g["lr"] = 0.0
    cfg = small_config(max_epochs=10, limit_batches=1, lr=0.0, patience=2)
    tr = Trainer(data, cfg, progress=False, log=lambda m: None)
    tr.fit()
    assert tr.stopped_early and len(tr.history) == 3 and tr.best_epoch == 1   # no improvement with lr 0
    assert set(tr.test_metrics["overall"]) == {"MAE", "RMSE", "MAPE"}
    assert len(tr.test_metrics["steps"]) == 12


def test_masked_mae_preset_and_amp_loop(data):
    # The trainer's bf16 autocast path, on the reference model (see the next test for HimNet).
    cfg = TrainConfig.from_preset("METRLA", **SMALL, max_epochs=1, batch_size=4, limit_batches=2, amp=True)
    assert cfg.loss == "mae" and cfg.weight_decay == 5e-4
    cfg.model["num_nodes"] = data.num_nodes
    tr = Trainer(data, cfg, progress=False, log=lambda m: None, model=RefHimNet(**cfg.model))
    s = tr.fit()
    assert math.isfinite(s["history"][0]["train_loss"]) and math.isfinite(s["test"]["overall"]["MAE"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())   # autocast, not a cast


def test_amp_bf16_on_himnet(data):
    cfg = small_config(amp=True, limit_batches=1)
    tr = Trainer(data, cfg, progress=False, log=lambda m: None)
    s = tr.fit()
    assert math.isfinite(s["history"][0]["train_loss"])


def test_package_presets_table_agrees():
    presets = pytest.importorskip("himnet_fast.presets")
    table = {k.upper(): v for k, v in presets.PRESETS.items()}
    for name, spec in SPEC.items():
        p = vars(table[name]) if not isinstance(table[name], dict) else table[name]
        got = (p["hidden_dim"], p["tod_embedding_dim"], p["dow_embedding_dim"], p["node_embedding_dim"],
               p["st_embedding_dim"], p["tf_decay_steps"], p["weight_decay"], list(p["milestones"]), p["loss"])
        assert got == spec, name


def test_evaluate_model_is_order_independent_of_batch_size(data):
    tr = Trainer(data, small_config(), progress=False, log=lambda m: None)
    a = evaluate_model(tr.model, data, "val", batch_size=5)
    b = evaluate_model(tr.model, data, "val", batch_size=16)
    assert a["overall"]["MAE"] == pytest.approx(b["overall"]["MAE"], rel=1e-5)
    assert tr.model.training                                       # evaluation restores the mode


def test_from_preset_rejects_unknown_settings():
    with pytest.raises(TypeError, match="unknown training setting 'hiden_dim'"):
        TrainConfig.from_preset("PEMS08", hiden_dim=3)
    sample = training_preset("PEMS08_SAMPLE")
    assert sample["tod_embedding_dim"] == 10 and sample["loss"] == "huber" and sample["max_epochs"] == 8
