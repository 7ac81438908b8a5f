"""Merges: masked keeps pruned weights +0.0 and changes only kept ones; dense warns; mask-aware is exact."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import sparseheal
from sparseheal.heal.adapters import apply_adapter, model_masks
from sparseheal.heal.lora import LoraHealer, LoraSettings
from sparseheal.heal.merge import lora_layers, merge_lora, merge_weight
from sparseheal.models import load_model, weight_view
from sparseheal.sparsity.masks import count_violations


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory):
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("p") / "pruned"), method="magnitude")


def _adapted(pruned_dir, tmp_path, mask_aware: bool, targets: str = "all-linear", seed: int = 1):
    """A PeftModel on the pruned base whose lora_B is random (as if trained), plus its masks and base."""
    cfg = LoraSettings(targets=targets, mask_aware=mask_aware, dropout=0.0)
    lm, _, _ = load_model(str(pruned_dir), device="cpu")
    masks, _ = model_masks(lm, pruned_dir)
    base = {n: p.detach().clone() for n, p in lm.named_parameters()}
    model = LoraHealer(cfg).prepare(lm, masks, seed=0, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            weight = layer.lora_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=gen) * 0.2)
    return model.eval(), masks, base


def _tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def test_merge_weight_is_exact_at_pruned_positions():
    weight = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    keep = torch.tensor([[True, False], [False, True]])
    delta = torch.tensor([[0.5, -0.0], [-3.0, 1.0]])  # -0.0 and a large update at pruned positions
    merged = merge_weight(weight, delta, keep)
    assert torch.equal(merged, torch.tensor([[1.5, 0.0], [0.0, -1.0]]))
    assert count_violations(merged, keep) == 0  # no -0.0 either
    assert torch.equal(merge_weight(weight, delta, None), weight + delta)


def test_masked_merge_keeps_pruned_zero_and_changes_only_kept(pruned, tmp_path):
    model, masks, base = _adapted(pruned, tmp_path, mask_aware=False)
    deltas = {n: layer.get_delta_weight("default").clone() for n, layer in lora_layers(model).items()}
    merged, stats = merge_lora(model, masks, "masked")
    params = dict(merged.named_parameters())
    assert stats["sparsity_after"] == stats["sparsity_before"] == 0.5 and stats["layers_merged"] == 14
    for name, mask in masks.items():
        weight = params[f"{name}.weight"].detach()
        assert count_violations(weight, mask) == 0, name
        expected = base[f"{name}.weight"] + deltas[name]
        assert torch.allclose(weight[mask], expected[mask], atol=1e-6)
        assert not torch.equal(weight[mask], base[f"{name}.weight"][mask])  # the kept weights did change
    untouched = [n for n in base if not any(n.startswith(m) for m in masks)]
    assert untouched and all(torch.equal(params[n], base[n]) for n in untouched)


def test_dense_merge_warns_and_reports_lower_sparsity(pruned, tmp_path, caplog):
    model, masks, _ = _adapted(pruned, tmp_path, mask_aware=False)
    with caplog.at_level(logging.WARNING, logger="sparseheal.heal.merge"):
        merged, stats = merge_lora(model, masks, "dense")
    assert any("dense merge" in r.getMessage() for r in caplog.records)
    assert stats["sparsity_after"] < 0.05 < 0.5 == stats["sparsity_before"]
    modules = dict(merged.named_modules())
    assert sum(count_violations(modules[n].weight, m) for n, m in masks.items()) > 0


@pytest.mark.parametrize("mask_aware", [True, False])
def test_masked_merge_equals_adapter_model_only_when_mask_aware(pruned, tmp_path, mask_aware):
    model, masks, _ = _adapted(pruned, tmp_path, mask_aware=mask_aware)
    tokens = _tokens()
    with torch.no_grad():
        adapter_logits = model(input_ids=tokens).logits  # (B, T, V)
        merged, _ = merge_lora(model, masks, "masked")
        merged_logits = merged(input_ids=tokens).logits
    close = torch.allclose(adapter_logits, merged_logits, atol=1e-5, rtol=1e-5)
    assert close == mask_aware, (adapter_logits - merged_logits).abs().max()


def test_mask_aware_training_gets_gradients_and_masks_the_update(pruned, tmp_path):
    model, masks, _ = _adapted(pruned, tmp_path, mask_aware=True, targets="q_proj")
    model.train()
    model(input_ids=_tokens(), labels=_tokens()).loss.backward()
    layers = lora_layers(model)
    assert all(layer.lora_A["default"].weight.grad.abs().sum() > 0 for layer in layers.values())
    assert all(layer.lora_B["default"].weight.grad.abs().sum() > 0 for layer in layers.values())


def test_mask_aware_adapter_saves_plain_peft_and_reloads_masked(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "out"), mask_aware=True, max_steps=4, block_size=32,
                          lr=5e-2, max_eval_samples=2, targets="q_proj,v_proj,down_proj", device="cpu")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)  # nothing but the usual adapter tensors
    tokens = _tokens()
    lm, _, _ = load_model(str(pruned), device="cpu")
    with torch.no_grad():
        adapted = apply_adapter(lm, str(out), str(pruned))(input_ids=tokens).logits
    merged_dir = sparseheal.merge(str(out), str(tmp_path / "merged"), eval_windows=2, eval_seqlen=32,
                                  device="cpu")
    merged, _, _ = load_model(str(merged_dir), device="cpu")
    with torch.no_grad():
        assert torch.allclose(adapted, merged(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    record = json.loads((merged_dir / "sparseheal.json").read_text())
    comparison = record["merge"]["eval"]
    assert comparison["ppl_merged"] == pytest.approx(comparison["ppl_unmerged"], rel=1e-5)
    assert sparseheal.inspect(str(merged_dir))["mask_violations"] == 0


def test_evaluate_with_mask_aware_adapter_equals_masked_merge(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "out"), mask_aware=True, max_steps=4, block_size=32,
                          lr=5e-2, max_eval_samples=2, device="cpu")
    merged = sparseheal.merge(str(out), str(tmp_path / "merged"), eval_windows=0, device="cpu")
    with_adapter = sparseheal.evaluate(str(pruned), adapter=str(out), seqlen=32, max_windows=6, device="cpu")
    of_merged = sparseheal.evaluate(str(merged), seqlen=32, max_windows=6, device="cpu")
    plain = sparseheal.evaluate(str(pruned), seqlen=32, max_windows=6, device="cpu")
    ppl = with_adapter["results"][0]["ppl"]
    assert ppl == pytest.approx(of_merged["results"][0]["ppl"], rel=1e-5)
    assert ppl != pytest.approx(plain["results"][0]["ppl"], rel=1e-5)  # the adapter did something


def test_gpt2_conv1d_masked_merge(tmp_path):
    from conftest import make_model_dir

    base = make_model_dir(tmp_path / "gpt2", "gpt2")
    pruned = sparseheal.prune(str(base), str(tmp_path / "pruned"), method="magnitude")
    model, masks, _ = _adapted(pruned, tmp_path, mask_aware=True, targets="c_attn,c_fc")
    tokens = _tokens()
    with torch.no_grad():
        adapter_logits = model(input_ids=tokens).logits
        merged, stats = merge_lora(model, masks, "masked")
        assert torch.allclose(adapter_logits, merged(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    modules = dict(merged.named_modules())
    for name, mask in masks.items():
        assert count_violations(weight_view(modules[name]), weight_view_mask(modules[name], mask)) == 0
    assert stats["layers_merged"] == 4


def weight_view_mask(module, mask):
    """The mask oriented like :func:`weight_view` (GPT-2 Conv1D stores (in, out))."""
    return mask if isinstance(module, torch.nn.Linear) else mask.t()
