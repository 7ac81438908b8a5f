"""``heal --method auto``: the recipe a budget chooses, its stages run one after another, what the record
says, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import _run

import sparseheal
from sparseheal.checks import MASKS_FILE
from sparseheal.heal import auto
from sparseheal.heal.auto import RECIPES, Recipe, choose_recipe, stage_budgets
from sparseheal.sparsity.masks import as_bool
from sparseheal.sparsity.store import load_masks


@pytest.fixture(scope="module")
def pruned(llama_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "pruned"
    return sparseheal.prune(str(llama_dir), str(out), method="wanda", sparsity=0.5, nsamples=4, seqlen=32,
                            data_dir=str(data_dir))


def _pruned_weights_are_zero(pruned_dir, healed_dir) -> int:
    """How many weights the masks prune; asserts each is +0.0 in the healed model."""
    masks, _ = load_masks(pruned_dir / MASKS_FILE)
    weights = load_file(str(healed_dir / "model.safetensors"))
    count = 0
    for name, mask in masks.items():
        pruned_out = ~as_bool(mask)
        kept = weights[f"{name}.weight"][pruned_out]
        assert torch.equal(kept.view(torch.int32), torch.zeros_like(kept).view(torch.int32)), name
        count += int(pruned_out.sum())
    return count


def test_recipes_cover_every_budget_in_order():
    limits = [r.up_to for r in RECIPES]
    assert limits[-1] is None and limits[:-1] == sorted(limits[:-1])
    assert choose_recipe(1).name == RECIPES[0].name and choose_recipe(10**12).name == RECIPES[-1].name
    assert all(abs(sum(s.share for s in r.stages) - 1) < 1e-9 for r in RECIPES)
    two = Recipe("x", None, (auto.Stage("blockwise", 0.5), auto.Stage("full", 0.5)), "")
    assert stage_budgets(two, 1001) == [500, 501]


def test_a_two_stage_recipe_runs_both_and_says_why(pruned, tmp_path, monkeypatch):
    two = RECIPES[-1]
    assert [s.method for s in two.stages] == ["blockwise", "full"]
    monkeypatch.setattr(auto, "RECIPES", (Recipe(two.name, None, two.stages, two.why),))
    out = sparseheal.heal(str(pruned), str(tmp_path / "healed"), method="auto", budget_tokens=8 * 32,
                          block_size=32, max_eval_samples=0, device="cpu")
    record = json.loads((out / "sparseheal.json").read_text())
    chosen = record["auto"]
    assert chosen["recipe"] == two.name and chosen["why"] == two.why and chosen["pruned_from"] == str(pruned)
    assert [(s["method"], s["tokens"]) for s in chosen["stages"]] == [("blockwise", 128), ("full", 128)]
    assert record["method"] == "full" and record["steps"] == 4  # 128 tokens of 32
    assert record["base_model"] == str(pruned) and len(chosen["removed"]) == 1
    assert record["previous"]["heal_method"] == "blockwise"  # the full stage healed the block-wise output
    assert record["previous"]["blockwise"]["layers"][0]["units"][0]["steps"] == 4  # 4 samples, 1 epoch
    assert _pruned_weights_are_zero(pruned, out) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]  # no stage output left behind


def test_a_small_budget_runs_the_first_recipe(pruned, tmp_path):
    first = RECIPES[0]
    out = sparseheal.heal(str(pruned), str(tmp_path / "healed"), method="auto", budget_tokens=6 * 32,
                          block_size=32, device="cpu")
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["auto"]["recipe"] == choose_recipe(6 * 32).name == first.name
    assert [s["method"] for s in record["auto"]["stages"]] == [s.method for s in first.stages]
    assert record["auto"]["stages"][-1]["lr"] == first.stages[-1].training["lr"]
    assert _pruned_weights_are_zero(pruned, out) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]


@pytest.mark.parametrize("flags,flag,needle", [
    ([], "--budget-tokens", "give --budget-tokens"),
    (["--budget-tokens", "20", "--block-size", "32"], "--budget-tokens", "fewer than one step"),
    (["--budget-tokens", "4096", "--lr", "1e-3"], "--lr", "sets each stage"),
    (["--budget-tokens", "4096", "--granularity", "submodule"], "--granularity", "blockwise only"),
])
def test_auto_refuses_what_it_cannot_honour(pruned, tmp_path, flags, flag, needle):
    proc = _run("heal", str(pruned), "-o", str(tmp_path / "o"), "--method", "auto", *flags)
    assert proc.returncode == 2 and flag in proc.stderr and needle in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_says_what_auto_chose(pruned, tmp_path):
    proc = _run("heal", str(pruned), "-o", str(tmp_path / "o"), "--method", "auto", "--budget-tokens", "64",
                "--block-size", "32", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    stage = RECIPES[0].stages[0].method
    assert f"auto: {RECIPES[0].name} for 64 tokens ({stage} on 64 tokens)" in proc.stdout
