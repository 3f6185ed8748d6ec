"""ops.gcru_decoder (HimNet's whole autoregressive decoder as one op, recomputed in backward)
against the original model, float64: outputs and every parameter's gradient, one and two
layers, teacher forcing on a mix of drawn and forecast steps, and eval mode."""
import numpy as np
import pytest
import torch

import himnet_fast as hf
from himnet_fast.reference import RefHimNet

from parity import assert_rel


def _pair(num_layers, cheb_k=3, N=9, T=3):
    torch.manual_seed(1)
    kw = dict(num_nodes=N, input_dim=3, output_dim=1, out_steps=T, hidden_dim=8, num_layers=num_layers,
              cheb_k=cheb_k, ycov_dim=2, tod_embedding_dim=4, dow_embedding_dim=4, node_embedding_dim=5,
              st_embedding_dim=6)
    ref = RefHimNet(**kw).double()
    model = hf.HimNet(**kw, backend="torch").double()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


def _batch(B=2, T=3, N=9):
    x = torch.randn(B, T, N, 3, dtype=torch.float64)
    x[..., 1] = torch.rand(B, T, N) * 0.99
    x[..., 2] = torch.randint(0, 7, (B, T, N)).double()
    return x, torch.rand(B, T, N, 2, dtype=torch.float64), torch.randn(B, T, N, 1, dtype=torch.float64)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("train,batches_seen", [(False, 0), (True, 30_000)])
def test_decoder_op_matches_the_original(num_layers, train, batches_seen, monkeypatch):
    """At batches_seen = 30,000 the coins draw the label with probability ~0.69: the seed
    below gives both drawn and forecast steps, so the gradient through the fed-back forecast
    and its cut by the label are both checked."""
    from himnet_fast.ops import gcru_decoder as dec_mod
    calls = []
    real = dec_mod._gcru_decoder
    monkeypatch.setattr(dec_mod, "_gcru_decoder", lambda *a: calls.append(1) or real(*a))
    ref, model = _pair(num_layers)
    x, y_cov, labels = _batch()
    g = torch.randn(2, 3, 9, 1, dtype=torch.float64)
    model.train(train)
    ref.train(train)
    np.random.seed(4)
    coins = np.random.uniform(0, 1, size=3) < 4000 / (4000 + np.exp(batches_seen / 4000))
    assert not train or (coins.any() and not coins.all())
    np.random.seed(4)
    y = model(x, y_cov, labels, batches_seen=batches_seen)
    np.random.seed(4)
    y_ref = ref(x, y_cov, labels, batches_seen=batches_seen)
    assert calls, "the decoder op did not run"
    assert_rel(y, y_ref, 1e-12, "forecast")
    grads = torch.autograd.grad(y, list(model.parameters()), g)
    grads_ref = torch.autograd.grad(y_ref, list(ref.parameters()), g)
    for (name, _), a, b in zip(model.named_parameters(), grads, grads_ref):
        assert_rel(a, b, 1e-10, name)


def test_covariates_needing_a_gradient_run_the_steps_through_autograd():
    """The op gives no gradient to data; when y_cov needs one the steps run one by one and
    its gradient equals the original's."""
    ref, model = _pair(1)
    x, y_cov, labels = _batch()
    y_a = y_cov.clone().requires_grad_(True)
    y_b = y_cov.clone().requires_grad_(True)
    model.eval()
    ref.eval()
    (ga,) = torch.autograd.grad(model(x, y_a).square().sum(), [y_a])
    (gb,) = torch.autograd.grad(ref(x, y_b).square().sum(), [y_b])
    assert_rel(ga, gb, 1e-10, "y_cov gradient")
