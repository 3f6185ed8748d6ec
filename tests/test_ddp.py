"""Data-parallel training through DistributedDataParallel: two CPU processes on gloo.

Each rank trains on its shard of every batch; DDP averages the gradients. With the same seed
on both ranks (teacher forcing draws from numpy's global RNG) both ranks must end with
identical parameters, equal to one process training on the union of the shards (batch size
doubled): Huber is a mean over equally sized shards, so the averaged gradient is the
gradient of the full batch.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from himnet_fast.data import load_dataset
from himnet_fast.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4, st_embedding_dim=4,
             tf_decay_steps=10)


def _data():
    return load_dataset("PEMS08", synthetic=True, num_steps=240, num_nodes=6, seed=4)


def _cfg(batch_size):
    return TrainConfig.from_preset("PEMS08", **SMALL, max_epochs=1, batch_size=batch_size, limit_batches=2, seed=11)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = Trainer(_data(), _cfg(4), out_dir=os.path.join(out_dir, "run"), progress=False, log=lambda m: None)
        assert tr.world == 2 and isinstance(tr.net, torch.nn.parallel.DistributedDataParallel)
        tr.fit()
        torch.save({"params": {k: v.clone() for k, v in tr.model.state_dict().items()},
                    "history": tr.history, "test": tr.test_metrics, "batches_seen": tr.batches_seen},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_ddp_two_processes_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k         # ranks stay in sync
    assert r0["batches_seen"] == r1["batches_seen"] == 2
    assert r0["test"] == r1["test"]                                       # metrics summed over ranks
    assert sorted(os.listdir(tmp_path / "run")) == ["best.pt", "checkpoint.pt", "error_by_horizon.png",
                                                  "forecast_vs_truth.png", "loss_curve.png", "metrics.json"]

    single = Trainer(_data(), _cfg(8), progress=False, log=lambda m: None)
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.fit()
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(initial[k], v) for k, v in r0["params"].items())   # training moved them
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]  # noqa: E731
    assert strip(r0["history"]) == strip(r1["history"])
    for a, b in zip(r0["history"], single.history):
        assert a["val_mae"] == pytest.approx(b["val_mae"], rel=1e-5)      # every val window counted once
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)  # mean of shard means = batch mean
    assert r0["test"]["overall"]["MAE"] == pytest.approx(single.test_metrics["overall"]["MAE"], rel=1e-5)
