"""The architecture matrix: every stage on tiny models of 22 architectures transformers ships.

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
from conftest import build_tokenizer
from safetensors.torch import load_file
from test_heal_lora import _cli_refuses

import sparseheal
from sparseheal.cli import main
from sparseheal.errors import ConfigError
from sparseheal.layout import masked_weight, parameter_families
from sparseheal.models import decoder_layers, load_model
from sparseheal.sparsity.masks import count_violations
from sparseheal.sparsity.store import load_masks

PRUNE = dict(nsamples=2, seqlen=48, calibration_batch_size=2, device="cpu")  # longer than the windows
HEAL = dict(max_steps=2, block_size=32, max_eval_samples=1, lr=1e-2, device="cpu")
TRAINED = {"full": ("attention", "mlp", "experts", "routers"), "blockwise": ("attention", "mlp", "experts"),
           "submodules": ("attention", "mlp", "experts"), "lora": ("attention",)}
UNSPLIT = {"opt": "fc1"}  # the layer holds its MLP's linears itself: no submodule granularity


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
        elif family in ("routers", "norms"):  # stay dense
            assert row["masked"] == 0 and row["pruned"] == 0, (family, row)
        else:  # other linears (LFM2's convolution block projections) are pruned like the rest
            assert 2 * row["pruned"] == row["masked"], (family, row)
    assert ("experts" in families) == moe and ("routers" in families) == moe
    assert record["sparsity_achieved"] == 0.5 and record["partial_groups"] is None
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
    submodules = dict(method="blockwise", granularity="submodule", recon_inputs="mix", epochs=1, lr=1e-2,
                      device="cpu")
    if model_type in UNSPLIT:
        with pytest.raises(ConfigError, match=UNSPLIT[model_type]) as err:
            sparseheal.heal(str(pruned), str(tmp_path / "sub"), **submodules)
        assert err.value.flag == "--granularity" and not (tmp_path / "sub").exists()
    else:
        outputs["submodules"] = sparseheal.heal(str(pruned), str(tmp_path / "sub"), **submodules)
        record = json.loads((outputs["submodules"] / "sparseheal.json").read_text())
        units = [u["unit"] for u in record["blockwise"]["layers"][0]["units"]]
        assert len(units) >= 2 and len(set(units)) == len(units) and "layer" not in units
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


@pytest.mark.parametrize("model_type,targets", [("phi3", "o_proj,qkv_proj"), ("falcon", "query_key_value"),
                                                ("bloom", "query_key_value"), ("mixtral", "q_proj,v_proj")])
def test_lora_default_targets_follow_the_model(model_type, targets, arch_dir, tmp_path):
    pruned = sparseheal.prune(str(arch_dir(model_type)), str(tmp_path / "p"), **PRUNE)
    out = sparseheal.heal(str(pruned), str(tmp_path / "a"), method="lora", **HEAL)
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["recipe"]["targets"] is None and record["adapter"]["targets"] == targets
    assert {m.rsplit(".", 1)[-1] for m in record["adapter"]["modules"]} == set(targets.split(","))


def test_lora_on_fused_experts_and_parameter_adapters_are_cli_refuses(arch_dir, tmp_path, capsys):
    pruned = sparseheal.prune(str(arch_dir("mixtral")), str(tmp_path / "p"), **PRUNE)
    out = tmp_path / "a"
    _cli_refuses(["heal", str(pruned), "-o", str(out), "--targets", "all-linear", "--max-steps", "1",
              "--block-size", "32"], capsys,
             "--targets", "fused expert tensors", "--method full")
    assert not out.exists()
    adapter = sparseheal.heal(str(pruned), str(out), method="lora", **HEAL)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_parameters"] = ["mlp.experts.gate_up_proj"]  # as PEFT writes an adapter on parameters
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _cli_refuses(["merge", str(adapter), "-o", str(tmp_path / "m")], capsys, "ADAPTER_DIR", "fused expert")
    assert not (tmp_path / "m").exists()


def test_the_summary_inspect_and_card_give_the_share_by_family(arch_dir, tmp_path, capsys):
    out = tmp_path / "p"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(arch_dir("qwen2_moe")), "-o", str(out), "--nsamples", "2", "--seqlen", "32"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "50.00% of prunable weights are zero" in printed
    assert "by family in the decoder layers: attention 49.5% of" in printed  # q/k/v biases stay dense
    assert "experts 50.0% of" in printed and "left dense: routers 640, norms 256" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(out)])
    assert exit_info.value.code == 0 and "experts 50.0% of" in capsys.readouterr().out
    assert "experts 24576 of 49152" in (out / "README.md").read_text()


def test_a_model_whose_expert_layout_is_unknown_is_cli_refuses(tmp_path, capsys):
    """Llama 4 applies its 3-D experts in one batched product, a layout transformers does not declare."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama4_text", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4,
                                  num_experts_per_tok=1, max_position_embeddings=256)
    src = tmp_path / "llama4"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    build_tokenizer(src)
    _cli_refuses(["prune", str(src), "-o", str(tmp_path / "p"), "--nsamples", "2", "--seqlen", "32"], capsys,
             "MODEL", "feed_forward.experts.gate_up_proj", "Llama4TextExperts", "would stay dense")
    assert not (tmp_path / "p").exists()


def test_a_pattern_whose_groups_do_not_divide_the_inputs_says_so_in_the_record(arch_dir, tmp_path):
    out = sparseheal.prune(str(arch_dir("mixtral")), str(tmp_path / "p"), method="magnitude", pattern="2:3")
    partial = json.loads((out / "sparseheal.json").read_text())["partial_groups"]
    assert partial["rule"] == "the trailing group of fewer than 3 inputs of each row keeps at most 2"
    assert "model.layers.0.mlp.experts.gate_up_proj" in partial["weights"]  # 64 inputs: 21 groups and 1
