"""Block-wise reconstruction healing on tiny models: the mask, the per-layer loss, resume, one layer
resident, the output as a pruned directory, and the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_model_dir
from safetensors.torch import load_file

import sparseheal
from sparseheal.config import ConfigError
from sparseheal.heal import blockwise
from sparseheal.sparsity.masks import count_violations
from sparseheal.sparsity.store import load_masks

BLOCK = dict(method="blockwise", epochs=3, lr=1e-3, device="cpu")


@pytest.fixture(scope="module")
def pruned(llama_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bw") / "pruned"
    return sparseheal.prune(str(llama_dir), str(out), method="wanda", sparsity=0.7, nsamples=4, seqlen=32,
                            data_dir=str(data_dir))


def _violations(model_dir) -> int:
    from sparseheal.models import load_model

    lm, _, _ = load_model(str(model_dir), device="cpu")
    masks, _ = load_masks(model_dir / "sparsity_masks.safetensors")
    modules = dict(lm.named_modules())
    return sum(count_violations(modules[n].weight, m) for n, m in masks.items())


def test_each_layer_gets_closer_to_its_dense_twin(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **BLOCK)
    record = json.loads((out / "sparseheal.json").read_text())
    layers = record["blockwise"]["layers"]
    assert [r["index"] for r in layers] == [0, 1]
    assert all(r["loss_after"] < r["loss_before"] for r in layers)
    assert record["mask_verification"]["ok"] and _violations(out) == 0
    assert record["calibration"] == {"source": "c4", "nsamples": 4, "seqlen": 32, "seed": 0}  # the prune's
    assert record["pattern"] == "unstructured" and record["heal_method"] == "blockwise"
    assert not (tmp_path / "o.ckpt").exists()


def test_the_mask_holds_under_adversarial_optimizer_settings(pruned, tmp_path):
    """AdamW with lr * weight decay = 2 turns +0.0 into -0.0 and revives any weight the mask lets through."""
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **{**BLOCK, "lr": 2.0, "weight_decay": 1.0,
                                                               "max_grad_norm": 0.0})
    assert _violations(out) == 0  # every pruned position is +0.0, bit for bit


def test_output_is_a_pruned_directory_any_healer_can_take(pruned, tmp_path, llama_dir):
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **BLOCK)
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["base_model"] == str(llama_dir)  # a later --distill finds the dense teacher
    full = sparseheal.heal(str(out), str(tmp_path / "full"), method="full", distill="kl", block_size=32,
                           max_steps=2, max_eval_samples=2, device="cpu")
    assert json.loads((full / "sparseheal.json").read_text())["mask_verification"]["ok"]


def test_resume_ends_bit_identical_to_an_uninterrupted_run(pruned, tmp_path, monkeypatch):
    whole = sparseheal.heal(str(pruned), str(tmp_path / "whole"), **BLOCK)
    original = blockwise.fit_unit

    def stop_at_layer_one(*args, **kwargs):
        if any(isinstance(a, str) and a.endswith("layer 1") for a in args):  # its progress description
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(blockwise, "fit_unit", stop_at_layer_one)
    with pytest.raises(KeyboardInterrupt):
        sparseheal.heal(str(pruned), str(tmp_path / "cut"), **BLOCK)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.ckpt" / "layer-0.safetensors").is_file()
    monkeypatch.setattr(blockwise, "fit_unit", original)
    with pytest.raises(ConfigError, match="--resume"):  # changed settings are refused
        sparseheal.heal(str(pruned), str(tmp_path / "cut"), **{**BLOCK, "lr": 5e-4}, resume=True)
    resumed = sparseheal.heal(str(pruned), str(tmp_path / "cut"), **BLOCK, resume=True)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_the_current_layer_and_its_twin_are_on_the_device(pruned, tmp_path, monkeypatch):
    resident, peak = set(), [0]
    original_to_device, original_build = blockwise.to_device, blockwise.DenseLayers.build

    def to_device(layer, device):
        resident.add(id(layer))
        peak[0] = max(peak[0], len(resident))
        return original_to_device(layer, device)

    def build(self, student_layer, index, device):
        twin = original_build(self, student_layer, index, device)
        resident.add(id(twin))
        peak[0] = max(peak[0], len(resident))
        return twin

    original_fit = blockwise.fit_unit

    def fit(*args, **kwargs):
        result = original_fit(*args, **kwargs)
        resident.clear()  # the twin is dropped before training, the layer leaves after its outputs
        return result

    monkeypatch.setattr(blockwise, "to_device", to_device)
    monkeypatch.setattr(blockwise.DenseLayers, "build", build)
    monkeypatch.setattr(blockwise, "fit_unit", fit)
    sparseheal.heal(str(pruned), str(tmp_path / "o"), **BLOCK)
    assert peak[0] == 2


def test_a_model_with_nothing_pruned_is_refused(llama_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        sparseheal.heal(str(llama_dir), str(tmp_path / "o"), **BLOCK, teacher=str(llama_dir))
    assert err.value.flag == "PRUNED_DIR" and "not a pruned model" in err.value.message
    assert not (tmp_path / "o").exists()


def test_a_teacher_of_another_depth_is_refused(pruned, tmp_path):
    deeper = make_model_dir(tmp_path / "deeper", "llama")
    config = json.loads((deeper / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (deeper / "config.json").write_text(json.dumps(config))
    shallow = tmp_path / "shallow"
    shutil.copytree(deeper, shallow)
    from sparseheal.models import load_model

    lm, tok, _ = load_model(str(shallow), device="cpu")
    lm.save_pretrained(shallow)
    with pytest.raises(ConfigError) as err:
        sparseheal.heal(str(pruned), str(tmp_path / "o"), **BLOCK, teacher=str(shallow))
    assert err.value.flag == "--teacher" and not (tmp_path / "o").exists()


def test_blockwise_settings_with_another_healer_are_refused(pruned, tmp_path):
    with pytest.raises(ConfigError) as err:
        sparseheal.heal(str(pruned), str(tmp_path / "o"), method="full", nsamples=8, block_size=32)
    assert err.value.flag == "--nsamples" and "blockwise only" in err.value.message


def test_the_command_line_summary_names_the_layers(pruned, tmp_path, capsys):
    from sparseheal import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["heal", str(pruned), "-o", str(tmp_path / "o"), "--method", "blockwise", "--device", "cpu"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "with blockwise (layer): 2 layers, 2 of them closer to their dense twin" in out
    assert "None" not in out and "nan" not in out


@pytest.mark.parametrize("extra,flag", [({"max_steps": 5}, "--max-steps"), ({"data": "wikitext2"}, "--data"),
                                        ({"gradient_accumulation": 4}, "--gradient-accumulation"),
                                        ({"distill": "kl"}, "--distill")])
def test_shared_settings_blockwise_does_not_read_are_refused(pruned, tmp_path, extra, flag):
    from sparseheal.config import ConfigError

    with pytest.raises(ConfigError) as err:
        sparseheal.heal(str(pruned), str(tmp_path / "o"), **{**BLOCK, **extra})
    message = err.value.message
    assert err.value.flag == flag and "applies to --method" in message and "full or lora" in message
    assert "blockwise trains --epochs per layer" in err.value.message and not (tmp_path / "o").exists()
