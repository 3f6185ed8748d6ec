"""The preset table matches docs/spec.md's training protocol and builds valid models."""
import pytest

from himnet_fast.presets import PRESETS, get_preset, preset_names, synthetic


@pytest.mark.parametrize("name, n, hidden, emb, decay, wd, milestones, loss", [
    ("metrla", 207, 64, (8, 8, 16, 16), 6000, 5e-4, (30, 40), "mae"),
    ("pemsbay", 325, 64, (8, 8, 16, 16), 6000, 1e-4, (25, 35), "mae"),
    ("pems03", 358, 64, (8, 8, 16, 16), 4000, 3e-4, (30, 50), "huber"),
    ("pems04", 307, 64, (12, 4, 16, 16), 4000, 1e-4, (30, 50), "huber"),
    ("pems07", 883, 64, (8, 8, 16, 16), 6000, 1e-4, (40, 60), "huber"),
    ("pems08", 170, 96, (10, 2, 14, 10), 6000, 0.0, (40, 60, 80), "huber"),
])
def test_paper_presets(name, n, hidden, emb, decay, wd, milestones, loss):
    p = get_preset(name)
    assert (p.name, p.num_nodes, p.hidden_dim) == (name, n, hidden)
    assert (p.tod_embedding_dim, p.dow_embedding_dim, p.node_embedding_dim, p.st_embedding_dim) == emb
    assert (p.tf_decay_steps, p.weight_decay, p.milestones, p.loss) == (decay, wd, milestones, loss)
    assert p.steps_per_day == 288 and p.paper_config


@pytest.mark.parametrize("name, n", [("sd", 716), ("gba", 2352), ("gla", 3834), ("ca", 8600)])
def test_largest_presets_use_pems07_sizes(name, n):
    p, ref = get_preset(name), PRESETS["pems07"]
    assert p.num_nodes == n and not p.paper_config
    assert p.model_kwargs(1) == ref.model_kwargs(1)


def test_lookup_spellings_and_synthetic():
    assert get_preset("METR-LA") is PRESETS["metrla"]
    assert get_preset(" PEMS_BAY ") is PRESETS["pemsbay"]
    assert get_preset("synthetic-100000").num_nodes == 100_000
    assert get_preset("synth500").model_kwargs()["hidden_dim"] == 64
    assert "synthetic-N" in preset_names() and "pems07" in preset_names()


@pytest.mark.parametrize("bad, exc, match", [
    ("pems99", ValueError, "unknown preset 'pems99'"),
    ("synthetic-0", ValueError, r"num_nodes must be in 1\.\.100000, got 0"),
    ("synthetic-100001", ValueError, "got 100001"),
    (7, TypeError, "preset name must be a string, got int"),
])
def test_bad_names(bad, exc, match):
    with pytest.raises(exc, match=match):
        get_preset(bad)


def test_synthetic_and_with_nodes_validate():
    with pytest.raises(TypeError, match="num_nodes must be an int"):
        synthetic(5.0)
    with pytest.raises(ValueError, match="num_nodes must be >= 1, got 0"):
        PRESETS["pems07"].with_nodes(0)
    assert PRESETS["pems08"].with_nodes(16).hidden_dim == 96


def test_model_kwargs_build_the_paper_model():
    # docs/spec.md: defaults with N = 883 give 1,261,753 parameters (PEMS07 uses the defaults).
    import himnet_fast as hf

    m = hf.HimNet(**PRESETS["pems07"].model_kwargs())
    assert sum(p.numel() for p in m.parameters()) == 1_261_753
    assert m.tf_decay_steps == 6000
    small = hf.HimNet(**PRESETS["pems08"].model_kwargs(16))
    assert small.hidden_dim == 96 and small.node_embedding.shape == (16, 14)
