"""Meta-parameter export (paper §5.6): queries, generated parameters, PCA, similarity, plots."""
import os

import numpy as np
import pytest
import torch

import himnet_fast as hf
from himnet_fast.training.interpret import (cosine_matrix, export_meta_parameters, generated_parameters,
                                            meta_parameters, pca_2d, temporal_queries)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hf.HimNet(9, hidden_dim=8, tod_embedding_dim=5, dow_embedding_dim=3, node_embedding_dim=4,
                     st_embedding_dim=4)


def test_temporal_queries_are_the_embedding_combos(model):
    q = temporal_queries(model)
    assert q.shape == (7, 288, 8)
    torch.testing.assert_close(q[3, 100], torch.cat([model.tod_embedding.weight[100], model.dow_embedding.weight[3]]))
    # the same query the model builds from an input whose last step is Thursday 08:20
    x = torch.zeros(1, 12, 9, 3)
    x[:, -1, 0, 1], x[:, -1, 0, 2] = 100 / 288, 3
    torch.testing.assert_close(model.time_embedding(x)[0], q[3, 100])


def test_generated_parameters_equal_the_original_weights(model):
    cell = model.encoder_t.cells[0]
    q = torch.randn(5, 8)
    p = generated_parameters(q, cell)
    gw = torch.einsum("bd,dio->bio", q, cell.gate.weights_pool).reshape(5, -1)
    gb = q @ cell.gate.bias_pool
    uw = torch.einsum("bd,dio->bio", q, cell.update.weights_pool).reshape(5, -1)
    torch.testing.assert_close(p, torch.cat([gw, gb, uw, q @ cell.update.bias_pool], -1), rtol=1e-5, atol=1e-5)


def test_pca_recovers_the_dominant_axes():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, generator=g)
    x = torch.randn(200, 6, generator=g) * 0.01
    x[:, 2] += 5 * t
    x[:, 4] += 2 * torch.randn(200, generator=g)
    p = pca_2d(x)
    assert p.shape == (200, 2)
    assert abs(np.corrcoef(p[:, 0], t)[0, 1]) > 0.999
    assert p[:, 0].var() > p[:, 1].var() > 0
    # Signs are fixed by the loadings, not left to the SVD: negating the data negates the
    # projection, and reordering the samples reorders it.
    torch.testing.assert_close(pca_2d(-x), -p, rtol=1e-5, atol=1e-5)
    xc = (x - x.mean(0)).double()
    loadings = torch.linalg.lstsq(xc, p.double()).solution      # (6, 2): the axes themselves
    top = loadings.abs().argmax(0)
    assert (loadings[top, torch.arange(2)] > 0).all(), "each axis's largest loading must be positive"
    perm = torch.randperm(200, generator=g)
    torch.testing.assert_close(pca_2d(x[perm]), p[perm], rtol=1e-5, atol=1e-5)
    c = cosine_matrix(torch.randn(4, 10, generator=g))
    torch.testing.assert_close(torch.diagonal(c), torch.ones(4))
    torch.testing.assert_close(c, c.T)


def test_export_writes_arrays_and_plots(model, tmp_path):
    paths = export_meta_parameters(model, str(tmp_path), node_values=np.arange(9.0))
    assert set(paths) == {"npz", "temporal_pca", "spatial_pca", "hourly_similarity"}
    for p in paths.values():
        assert os.path.getsize(p) > 0
    z = np.load(paths["npz"])
    assert z["temporal_query"].shape == (7, 288, 8) and z["temporal_pca"].shape == (7, 288, 2)
    assert z["node_embedding"].shape == (9, 4) and z["spatial_pca"].shape == (9, 2)
    assert z["hourly_similarity"].shape == (7, 24, 24)
    np.testing.assert_allclose(np.diagonal(z["hourly_similarity"], axis1=1, axis2=2), 1.0, rtol=1e-5)
    arrays = meta_parameters(model)
    np.testing.assert_allclose(arrays["hourly_params"][2, 5],
                               generated_parameters(temporal_queries(model)[2, 60][None],
                                                    model.encoder_t.cells[0])[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"node_values must have shape \(N=9,\)"):
        export_meta_parameters(model, str(tmp_path), node_values=np.zeros(3))
