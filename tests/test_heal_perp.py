"""PERP-style healing: only norms and biases train; every weight, pruned or kept, keeps its bits."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_cli import _run
from torch import nn

from sparseheal.heal.perp import perp_parameters
from sparseheal.sparsity.store import load_masks


def test_perp_parameters_are_norms_and_biases():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8, bias=False))
    roles = perp_parameters(model)
    assert roles == {"norms": ["1.weight", "1.bias"], "biases": ["0.bias"]}


def test_perp_heal_trains_only_norms_and_keeps_every_weight(pruned_llama, tmp_path):
    out = tmp_path / "perp"
    proc = _run("heal", str(pruned_llama), "-o", str(out), "--method", "perp", "--block-size", "32",
                "--max-steps", "6", "--lr", "1e-2", "--logging-steps", "1")
    assert proc.returncode == 0, proc.stderr
    before = load_file(str(next(pruned_llama.glob("*.safetensors"))))
    after = load_file(str(next(out.glob("*.safetensors"))))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed), changed  # the tiny llama has no biases
    masks, _ = load_masks(out / "sparsity_masks.safetensors")
    for key, mask in masks.items():
        weight = after[f"{key}.weight"]
        assert torch.equal(weight.view(torch.int32), before[f"{key}.weight"].view(torch.int32))
        assert not (weight[~mask].view(torch.int32) != 0).any()
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["method"] == "perp" and record["mask_verification"]["ok"]
    assert record["trainable_parameters"] < 0.01 * record["total_parameters"]
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    inspected = _run("inspect", str(out))
    assert inspected.returncode == 0 and "OK" in inspected.stdout
