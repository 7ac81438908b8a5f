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


def test_perp_with_mask_lora_merges_into_the_trained_model_with_the_mask_exact(pruned_llama, tmp_path):
    from sparseheal.heal.perp import PerpHealer, PerpSettings
    from sparseheal.models import load_model

    model, tokenizer, _ = load_model(str(pruned_llama), device="cpu")
    masks, _ = load_masks(pruned_llama / "sparsity_masks.safetensors")
    healer = PerpHealer(PerpSettings(perp_lora_rank=4))
    student = healer.prepare(model, masks, seed=0, gradient_checkpointing=False)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("norm" in n for n in trainable)
    assert not any(n.endswith("proj.base_layer.weight") for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained state: non-zero updates and norms moved
        for param in student.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        trained_logits = student(input_ids=tokens).logits
    record = healer.save(student, tokenizer, tmp_path / "out", masks, "unstructured")
    assert record["mask_verification"]["ok"] and record["lora_rank"] == 4
    merged, _, _ = load_model(str(tmp_path / "out"), device="cpu")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=tokens).logits, trained_logits, atol=1e-4)
    after = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    before = load_file(str(next(pruned_llama.glob("*.safetensors"))))
    for key, mask in masks.items():
        weight = after[f"{key}.weight"]
        assert not (weight[~mask].view(torch.int32) != 0).any()  # every pruned weight +0.0, bit for bit
        assert not torch.equal(weight, before[f"{key}.weight"])  # the kept ones moved


def test_perp_mask_lora_heal_lowers_the_loss(pruned_llama, tmp_path):
    out = tmp_path / "perp"
    proc = _run("heal", str(pruned_llama), "-o", str(out), "--method", "perp", "--perp-lora-rank", "4",
                "--block-size", "32", "--max-steps", "6", "--lr", "1e-2", "--logging-steps", "1")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["mask_verification"]["ok"] and record["merge"]["sparsity_after"] == \
        record["merge"]["sparsity_before"]
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    refused = _run("heal", str(pruned_llama), "-o", str(tmp_path / "x"), "--method", "full",
                   "--perp-lora-rank", "4")
    assert refused.returncode == 2 and "--perp-lora-rank" in refused.stderr
