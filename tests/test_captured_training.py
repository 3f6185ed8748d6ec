"""Captured training: CapturedTrainStep (one CUDA graph per step), the device-resident batches
and the trainer's use of both. The CUDA-graph parts need a GPU (marked ``gpu``); their
preconditions, the batches and the eager step are checked on CPU."""
import numpy as np
import pytest
import torch

import himnet_fast as hf
from himnet_fast.data import synthetic_traffic
from himnet_fast.data.series import from_signal
from himnet_fast.data.device import DeviceWindows, check_time_features
from himnet_fast.training import TrainConfig, Trainer
from himnet_fast.training.captured import CapturedTrainStep, TrainStep



def _data(N=8, T=400, fill=False):
    return from_signal(synthetic_traffic(T, N, seed=0), fill_missing=fill)


def _small_model(N, steps=12, backend=None):
    torch.manual_seed(0)
    return hf.HimNet(N, hidden_dim=8, out_steps=steps, check_inputs=False, backend=backend)


def _himnet_loss(model, x, y_cov, labels, target, teacher_forcing):
    out = model(x, y_cov, labels, teacher_forcing=teacher_forcing)
    return (out - labels).abs().mean()


# --------------------------------------------------------------------------- device batches

@pytest.mark.parametrize("fill", [False, True])
def test_device_windows_equal_host_batches(fill):
    """Batches gathered from the device copy are bitwise TrafficData.batch's, missing readings
    carried forward or not."""
    data = _data(fill=fill)
    assert data.num_missing > 0 and (data.filled is not None) == fill
    w = DeviceWindows(data, "cpu")
    for split in ("train", "val", "test"):
        pos = np.array([0, 3, len(data.splits[split]) - 1])
        want, got = data.batch(split, pos), w.batch(split, torch.from_numpy(pos))
        for name in ("x", "y_cov", "labels", "target"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (split, name)


def test_bad_time_features_are_refused_where_the_data_is_made():
    data = _data()
    check_time_features(data.series)
    data.series[7, 1, 1] = 1.0
    with pytest.raises(ValueError, match=r"x\[\.\.\., 1\] \(time of day\) must be a fraction of the day"):
        DeviceWindows(data, "cpu")
    data = _data()
    data.series[9, 0, 2] = 7.0
    with pytest.raises(ValueError, match=r"x\[\.\.\., 2\] \(day of week\) must be in 0\.\.6"):
        DeviceWindows(data, "cpu")


# --------------------------------------------------------------------------- the step's rules

def test_captured_step_refuses_what_it_cannot_capture():
    model = _small_model(5)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    with pytest.raises(RuntimeError, match="needs the model's parameters on one CUDA device"):
        CapturedTrainStep(model, opt, _himnet_loss, 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        CapturedTrainStep(model, opt, _himnet_loss, 0)
    with pytest.raises(ValueError, match="clip_grad_norm must be positive"):
        CapturedTrainStep(model, opt, _himnet_loss, 4, clip_grad_norm=0.0)


@pytest.mark.gpu
def test_captured_step_refuses_an_optimizer_it_cannot_record():
    model = _small_model(5).cuda()
    with pytest.raises(TypeError, match="Adam or AdamW"):
        CapturedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), _himnet_loss, 4)
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedTrainStep(model, torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda")),
                          _himnet_loss, 4)
    with pytest.raises(ValueError, match="lr must be a tensor"):
        CapturedTrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True), _himnet_loss, 4)


def test_eager_step_is_the_training_step():
    """TrainStep: one Adam step with clipping on the loss_fn's loss, the loss returned detached."""
    model = _small_model(5, steps=3)
    x = torch.randn(2, 12, 5, 3)
    x[..., 1:] = 0
    inputs = (x, torch.zeros(2, 3, 5, 2), torch.randn(2, 3, 5, 1), torch.randn(2, 3, 5, 1),
              torch.tensor([True, False, True]))
    ref = _small_model(5, steps=3)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss_ref = _himnet_loss(ref, *inputs)
    loss_ref.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    opt_ref.step()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-2), _himnet_loss, clip_grad_norm=0.5)
    loss = step(*inputs)
    assert not loss.requires_grad and torch.equal(loss, loss_ref.detach())
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_trainer_on_cpu_is_eager_and_keeps_its_batches_on_the_device():
    data = _data()
    cfg = TrainConfig.from_preset("PEMS08", max_epochs=1, limit_batches=2, hidden_dim=8)
    tr = Trainer(data, cfg, progress=False, log=lambda m: None)
    assert not tr.captures and type(tr.step) is TrainStep
    assert tr.windows.inputs.device.type == "cpu" and tr.model.check_inputs is False
    assert not isinstance(tr.optimizer.param_groups[0]["lr"], torch.Tensor)


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton"])
def test_captured_steps_equal_eager_steps(backend):
    """20 captured steps (forward, loss, backward, clipping, capturable Adam, a scheduler that
    changes the lr tensor mid-way, new teacher-forcing coins every step) against the same 20
    steps run eagerly: the same losses and parameters within fp32 round-off; on the default
    backend and on the fused Triton step (the pair and decoder ops, weight partials)."""
    N, B = 11, 4
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    batches = []
    for i in range(20):
        x = torch.randn(B, 12, N, 3)
        x[..., 1] = torch.rand(B, 12, N) * 0.99
        x[..., 2] = torch.randint(0, 7, (B, 12, N)).float()
        batches.append([t.to(dev) for t in (x, torch.zeros(B, 12, N, 2), torch.randn(B, 12, N, 1),
                                             torch.randn(B, 12, N, 1), torch.from_numpy(rng.random(12) < 0.5))])
    runs = []
    for captured in (True, False):
        model = _small_model(N, backend=backend).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-2, device=dev), capturable=True)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [10], gamma=0.1)
        if captured:
            step = CapturedTrainStep(model, opt, _himnet_loss, B, clip_grad_norm=1.0)
        else:
            step = TrainStep(model, opt, _himnet_loss, clip_grad_norm=1.0)
        losses = []
        for i, batch in enumerate(batches):
            losses.append(step(*batch))
            if i == 9:
                sched.step()
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    (lc, pc), (le, pe) = runs
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_captured_step_errors_and_partial_batch():
    N, B = 7, 4
    dev = torch.device("cuda")
    model = _small_model(N).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device=dev), capturable=True)
    step = CapturedTrainStep(model, opt, _himnet_loss, B)

    def batch(b):
        x = torch.zeros(b, 12, N, 3, device=dev)
        return [x, torch.zeros(b, 12, N, 2, device=dev), torch.randn(b, 12, N, 1, device=dev),
                torch.randn(b, 12, N, 1, device=dev), torch.zeros(12, dtype=torch.bool, device=dev)]
    with pytest.raises(ValueError, match="captured for batch_size=4"):
        step(*batch(3))
    step(*batch(B))
    assert step.graph is not None
    loss = step.eager(*batch(3))   # a last partial batch: same model and optimizer, no graph
    assert loss.shape == () and torch.isfinite(loss)
    step(*batch(B))
    model.out_proj.weight = torch.nn.Parameter(model.out_proj.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced"):
        step(*batch(B))


@pytest.mark.gpu
def test_trainer_captures_on_a_gpu_and_matches_the_eager_run():
    data = _data(N=10, T=600)
    results = {}
    for capture in (True, False):
        cfg = TrainConfig.from_preset("PEMS08", max_epochs=2, limit_batches=6, hidden_dim=8, capture=capture)
        tr = Trainer(data, cfg, device="cuda", progress=False, log=lambda m: None)
        assert tr.captures is capture
        summary = tr.fit()
        results[capture] = [h["train_loss"] for h in summary["history"]], summary["test"]["overall"]["MAE"]
    (lc, mc), (le, me) = results[True], results[False]
    np.testing.assert_allclose(lc, le, rtol=1e-4)
    assert mc == pytest.approx(me, rel=1e-4)
