"""No host synchronisation inside a training step: forward and backward of every model read no
device data on the host (the condition for one CUDA graph per step, and for a GPU that never
waits on Python).

A dispatch mode records every op that forces a host sync -- ``aten::_local_scalar_dense``
(``.item()``, ``.tolist()``, ``bool(t)``), ``nonzero``, ``is_nonzero``, ``equal``, copies to the
host -- including those inside the library's custom ops (their implementations run under the
mode). It runs on CPU tensors and on meta tensors (which take the GPU's code paths)."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import himnet_fast as hf
from himnet_fast.benchmark.kernel_count import custom_op_impl
from himnet_fast.models import build_model
from himnet_fast.sba import SBATransformer

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default, aten.equal.default,
           aten.item.default}


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims", "prim"):
            impl = custom_op_impl(func)
            assert impl is not None, f"{func}: no implementation to look into"
            with self:  # the ops inside the implementation run under the mode too
                return impl(*args, **kwargs)
        if func in SYNCING:
            self.found.append(str(func))
            if args[0].device.type == "meta":  # meta data cannot be read: give a value, keep going
                return torch.zeros((), dtype=args[0].dtype).item()
        to_host = None
        if func is aten._to_copy.default and kwargs.get("device") is not None:
            to_host = torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu"
        elif func is aten.copy_.default:
            to_host = args[0].device.type == "cpu" and args[1].device.type != "cpu"
        if to_host:
            self.found.append(f"{func} to the host")
            if args[-1 if func is aten.copy_.default else 0].device.type == "meta":
                src = args[1] if func is aten.copy_.default else args[0]
                host = torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
                return args[0].copy_(host) if func is aten.copy_.default else host
        return func(*args, **kwargs)


def _step(model, inputs):
    """Forward (training mode), L1 loss, backward."""
    out = model(*inputs)
    out.abs().mean().backward()


def _batch(N, B=2, T=12, steps=4, device="cpu"):
    torch.manual_seed(0)
    x = torch.randn(B, T, N, 3)
    x[..., 1] = torch.rand(B, T, N) * 0.9
    x[..., 2] = torch.randint(0, 7, (B, T, N)).float()
    y_cov = torch.zeros(B, steps, N, 2)
    labels = torch.randn(B, steps, N, 1)
    return [t.to(device) for t in (x, y_cov, labels)]


def _models(N, steps):
    """(name, model, extra inputs): HimNet as the trainer runs it (teacher forcing from
    batches_seen, the time features validated where the batches are made), in every graph
    form, and every model of himnet_fast.models."""
    torch.manual_seed(0)
    out = []
    for dense in (None, False):
        m = hf.HimNet(N, hidden_dim=8, out_steps=steps, num_layers=2, dense_graph=dense, check_inputs=False)
        out.append((f"himnet dense_graph={dense}", m, [1000]))
    part = hf.sba.partition_graph(3, num_nodes=N, method="chunks")
    out.append(("himnet partitioned", hf.HimNet(N, hidden_dim=8, out_steps=steps, partition=part,
                                                check_inputs=False), [1000]))
    attrs = torch.randn(N, 6)
    for name in ("agcrn", "hyperst-lstm-g", "hyperst-lstm-d", "hyperst-gcgru"):
        out.append((name, build_model(name, N, attributes=attrs if name.startswith("hyperst") else None,
                                      hidden_dim=8, horizon=steps), []))
    out.append(("sba", SBATransformer(N, coords=torch.randn(N, 2).numpy(), out_steps=steps, d_model=8, heads=2,
                                      blocks=2, pe_dim=0), []))
    return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_training_steps_do_not_synchronise(device):
    N, steps = 11, 4
    np.random.seed(0)
    for name, model, extra in _models(N, steps):
        model = model.to(device).train()
        x, y_cov, labels = _batch(N, steps=steps, device=device)
        rec = SyncRecorder()
        with rec:
            _step(model, [x, y_cov, labels, *extra])
        assert not rec.found, (name, device, rec.found)


def test_recorder_finds_syncs():
    """The recorder sees a sync in plain code, one inside a custom op's implementation, and the
    eager time-feature check of HimNet (on by default: a copy to the host on a device)."""
    rec = SyncRecorder()
    with rec:
        torch.ones(3).sum().item()
        torch.ops.himnet_fast.kernel_sync_probe(torch.ones(2))
    # (below autograd, inside the op, .item() reaches the mode undecomposed)
    assert rec.found == ["aten._local_scalar_dense.default", "aten.item.default"]
    m = hf.HimNet(7, hidden_dim=4, out_steps=2).eval().to("meta")
    x, y_cov, _ = _batch(7, steps=2, device="meta")
    rec = SyncRecorder()
    with rec:
        m(x, y_cov)
    assert rec.found == ["aten._to_copy.default to the host"], rec.found


@torch.library.custom_op("himnet_fast::kernel_sync_probe", mutates_args=())
def _sync_probe(t: torch.Tensor) -> torch.Tensor:
    """A custom op whose implementation synchronises (for the recorder's own test)."""
    return t * t.sum().item()


@_sync_probe.register_fake
def _(t):
    return torch.empty_like(t)
