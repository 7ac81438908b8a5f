"""OWL layer sparsity: the ratios' maths, their effect on a tiny model, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

import sparseheal
from sparseheal.config import ConfigError
from sparseheal.sparsity.owl import LayerSparsitySettings, outlier_ratio, owl_sparsities

PRUNE = dict(method="wanda", nsamples=4, seqlen=32)


def test_outlier_ratio_by_hand():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 13.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])]
    # mean = 16 / 8 = 2; above M * mean = 10: one of eight
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 0.1) == pytest.approx(4 / 8)


def test_owl_sparsities_by_hand_and_their_mean_is_the_target():
    # D = (0, 0.5, 1): normalised (0, 0.5, 1) * 2 * 0.1 = (0, 0.1, 0.2); equal sizes: shift to keep 0.4 mean
    sparsities = owl_sparsities([0.0, 0.05, 0.1], [10, 10, 10], 0.6, 0.1)
    assert sparsities == pytest.approx([0.7, 0.6, 0.5])
    sizes = [10, 30, 60]
    weighted = owl_sparsities([0.3, 0.1, 0.2], sizes, 0.7, 0.08)
    assert sum(s * n for s, n in zip(weighted, sizes, strict=True)) / sum(sizes) == pytest.approx(0.7)
    assert weighted[0] < weighted[2] < weighted[1]  # more outliers, lower sparsity
    assert max(weighted) - min(weighted) == pytest.approx(0.16)
    assert owl_sparsities([0.2, 0.2], [5, 5], 0.5, 0.08) == pytest.approx([0.5, 0.5])


def test_owl_prune_records_ratios_and_keeps_the_overall_share(llama_dir, tmp_path):
    out = sparseheal.prune(str(llama_dir), str(tmp_path / "owl"), sparsity=0.6, layer_sparsity="owl",
                           owl_lambda=0.1, owl_m=2.0, **PRUNE)
    record = json.loads((out / "sparseheal.json").read_text())
    spread = record["layer_sparsity"]
    assert spread["mode"] == "owl" and len(spread["sparsities"]) == 2
    params, sparsities = spread["layer_params"], spread["sparsities"]
    assert sum(p * s for p, s in zip(params, sparsities, strict=True)) / sum(params) == pytest.approx(0.6)
    order = sorted(range(2), key=lambda i: spread["outlier_ratios"][i])
    assert sparsities[order[0]] > sparsities[order[1]]  # the layer with more outliers is pruned less
    for name, achieved in record["layers"].items():  # each linear is pruned at its layer's ratio
        layer = int(name.split(".")[2])
        assert achieved == pytest.approx(sparsities[layer], abs=0.02)
    # each row prunes floor(in * s_l): below the target by less than one weight in 64 (the narrowest input)
    assert 0.6 - 1 / 64 <= record["sparsity_achieved"] <= 0.6
    assert "owl_statistics" in record["timings"]
    report = sparseheal.inspect(str(out))
    assert report["layer_sparsity"]["sparsities"] == sparsities and report["ok"]


def test_uniform_is_the_default_and_recorded(llama_dir, tmp_path):
    out = sparseheal.prune(str(llama_dir), str(tmp_path / "u"), **PRUNE)
    assert json.loads((out / "sparseheal.json").read_text())["layer_sparsity"] == {"mode": "uniform"}


@pytest.mark.parametrize("settings, flag", [
    (dict(method="magnitude"), "--layer-sparsity"),
    (dict(pattern="2:4"), "--layer-sparsity"),
    (dict(sparsity=0.05, owl_lambda=0.08), "--owl-lambda"),
    (dict(sparsity=0.95, owl_lambda=0.08), "--owl-lambda"),
    (dict(owl_lambda=0.0), "--owl-lambda"),
    (dict(owl_m=float("inf")), "--owl-m"),
])
def test_owl_refusals(llama_dir, tmp_path, settings, flag):
    with pytest.raises(ConfigError) as err:
        sparseheal.prune(str(llama_dir), str(tmp_path / "o"),
                         **{**PRUNE, "layer_sparsity": "owl", **settings})
    assert err.value.flag == flag and not (tmp_path / "o").exists()


def test_layer_sparsity_choices_are_checked():
    with pytest.raises(ConfigError, match="uniform, owl"):
        LayerSparsitySettings(layer_sparsity="random")


def test_the_pure_maths_names_no_flag():
    from sparseheal.config import ConfigError

    with pytest.raises(ValueError) as err:  # a small layer pushed past 1 by a large one's weight
        owl_sparsities([0.0, 1.0], [1, 99], 0.5, 0.45)
    assert not isinstance(err.value, ConfigError) and "outside [0, 1)" in str(err.value)
