"""``HimNet.from_checkpoint``: one call loads what the trainer wrote; input dtype and length checks."""
import numpy as np
import pytest
import torch

from himnet_fast import HimNet
from himnet_fast.data import load_dataset
from himnet_fast.reference import RefHimNet
from himnet_fast.training import TrainConfig, Trainer

SMALL = dict(hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4, st_embedding_dim=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("run"))
    data = load_dataset("PEMS08", synthetic=True, num_steps=200, num_nodes=6, seed=3)
    cfg = TrainConfig.from_preset("PEMS08", max_epochs=1, batch_size=4, limit_batches=2, tf_decay_steps=10, **SMALL)
    trainer = Trainer(data, cfg, out_dir=out, progress=False, log=lambda m: None)
    trainer.fit()
    yield out, data, trainer
    torch.set_num_threads(n)


def test_from_checkpoint_gives_the_trained_model(trained):
    out, data, trainer = trained
    model = HimNet.from_checkpoint(f"{out}/best.pt")
    assert not model.training and model.in_steps == 12 and model.num_nodes == 6
    assert model.scaler.mean == pytest.approx(data.scaler.mean)
    assert model.checkpoint_info["name"] == data.name
    b = data.batch("test", np.arange(3))
    trainer.model.load_state_dict(trainer.best_state)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(b.x, b.y_cov), trainer.model(b.x, b.y_cov), rtol=0, atol=0)
        # float64 inputs (numpy data) are cast to the parameters' dtype
        torch.testing.assert_close(model(b.x.double(), b.y_cov.double()), model(b.x, b.y_cov), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x must have in_steps=12 time steps .* got 6"):
        model(b.x[:, :6], b.y_cov)
    HimNet.from_checkpoint(f"{out}/checkpoint.pt")  # the latest weights load the same way


def test_from_checkpoint_original_state_dict_and_errors(tmp_path):
    torch.manual_seed(0)
    ref = RefHimNet(5, hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4,
                    st_embedding_dim=4)
    torch.save(ref.state_dict(), tmp_path / "orig.pt")
    model = HimNet.from_checkpoint(str(tmp_path / "orig.pt"))
    assert model.hidden_dim == 8 and model.scaler is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HimNet.from_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither a himnet_fast training checkpoint"):
        HimNet.from_checkpoint(str(tmp_path / "other.pt"))


def test_plain_module_keeps_the_original_any_length_behaviour():
    model = HimNet(4, hidden_dim=8, tod_embedding_dim=4, dow_embedding_dim=2, node_embedding_dim=4,
                   st_embedding_dim=4, out_steps=3).eval()
    x = torch.zeros(1, 3, 4, 3)
    assert model(x, torch.zeros(1, 3, 4, 2)).shape == (1, 3, 4, 1)
    with pytest.raises(ValueError, match="in_steps must be a positive int"):
        HimNet(4, in_steps=0)
