"""The architecture matrix: every stage on tiny models of 21 architectures transformers ships.

Each model is pruned (Wanda unstructured, SparseGPT 2:4), inspected, healed by every healer (LoRA with a
masked merge, full, block-wise) and evaluated. Checked: the pruned share of each family, every pruned
position +0.0 after each healer, and a kept weight changed in each family a healer trains.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from architectures import ARCHITECTURES, MOE, make_arch_dir
from safetensors.torch import load_file

import sparseheal
from sparseheal.layout import masked_weight, parameter_families
from sparseheal.models import decoder_layers, load_model
from sparseheal.sparsity.masks import count_violations
from sparseheal.sparsity.store import load_masks

PRUNE = dict(nsamples=2, seqlen=48, calibration_batch_size=2, device="cpu")  # longer than the windows
HEAL = dict(max_steps=2, block_size=32, max_eval_samples=1, lr=1e-2, device="cpu")
TRAINED = {"full": ("attention", "mlp", "experts", "routers"), "blockwise": ("attention", "mlp", "experts"),
           "lora": ("attention",)}


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    made = {}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = make_arch_dir(tmp_path_factory.mktemp(model_type), model_type)
        return made[model_type]

    return get


def _family_weights(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter of the decoder layers by family, copied."""
    stack, layers = decoder_layers(model)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i, layer in enumerate(layers):
        params = dict(layer.named_parameters())
        for name, family in parameter_families(layer).items():
            out.setdefault(family, {})[f"{stack}.{i}.{name}"] = params[name].detach().clone()
    return out


def _check_masks_kept(model_dir, masks) -> None:
    model, _, _ = load_model(str(model_dir), device="cpu")
    for name, keep in masks.items():
        assert count_violations(masked_weight(model, name).param, keep) == 0, (model_dir, name)


def _check_prune(out, pattern: str, moe: bool) -> None:
    record = json.loads((out / "sparseheal.json").read_text())
    families = record["families"]
    for family, row in families.items():
        if family in ("attention", "mlp", "experts"):
            assert row["masked"] > 0 and 2 * row["pruned"] == row["masked"], (family, row)
        else:  # routers, norms (and nothing else here) stay dense
            assert row["masked"] == 0 and row["pruned"] == 0, (family, row)
    assert ("experts" in families) == moe and ("routers" in families) == moe
    assert record["sparsity_achieved"] == 0.5 and record["left_dense"] == []
    report = sparseheal.inspect(str(out))
    assert report["ok"] and report["mask_violations"] == 0, report
    if pattern == "2:4":
        assert report["nm_violations"] == 0 and report["pattern"] == "2:4"


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_stage_on_every_architecture(model_type, arch_dir, tmp_path):
    src = arch_dir(model_type)
    moe = model_type in MOE
    for method, pattern in (("sparsegpt", "2:4"), ("wanda", "unstructured")):
        pruned = sparseheal.prune(str(src), str(tmp_path / method), method=method, pattern=pattern, **PRUNE)
        _check_prune(pruned, pattern, moe)
    masks, _ = load_masks(pruned / "sparsity_masks.safetensors")
    if moe:
        assert any(masked_weight(load_model(str(pruned), device="cpu")[0], n).experts for n in masks)
    before = _family_weights(load_model(str(pruned), device="cpu")[0])
    outputs = {
        "lora": sparseheal.heal(str(pruned), str(tmp_path / "lora"), method="lora", merge="masked",
                                dropout=0.0, **HEAL) / "merged",
        "full": sparseheal.heal(str(pruned), str(tmp_path / "full"), method="full", **HEAL),
        "blockwise": sparseheal.heal(str(pruned), str(tmp_path / "bw"), method="blockwise", epochs=1,
                                     lr=1e-2, device="cpu"),
    }
    for healer, out in outputs.items():
        _check_masks_kept(out, masks)
        after = _family_weights(load_model(str(out), device="cpu")[0])
        for family in TRAINED[healer]:
            if family not in before:
                continue
            changed = [n for n, w in before[family].items() if not torch.equal(w, after[family][n])]
            assert changed, (healer, family)
    result = sparseheal.evaluate(str(outputs["full"]), seqlen=32, max_windows=2, device="cpu")["results"][0]
    assert math.isfinite(result["ppl"])
    merged_file = outputs["lora"] / "sparsity_masks.safetensors"
    assert set(load_masks(merged_file)[0]) == set(masks)
    assert all(k in load_file(str(merged_file)) for k in masks)
