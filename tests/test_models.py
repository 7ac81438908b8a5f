"""Model sources, structural layer search, and pruning + inspection across architectures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import sparseheal
from sparseheal.config import ConfigError
from sparseheal.models import (
    decoder_layers,
    hash_weights,
    load_model,
    max_positions,
    prunable_linears,
    resolve_source,
    weight_view,
)
from sparseheal.sparsity.masks import count_violations, nm_violations
from sparseheal.sparsity.store import load_masks

STACKS = {
    "llama": ("model.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "opt": ("model.decoder.layers", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                     "self_attn.out_proj", "fc1", "fc2"}),
    "gpt2": ("transformer.h", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    "neox": ("gpt_neox.layers", {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                 "mlp.dense_4h_to_h"}),
}


@pytest.mark.parametrize("arch", sorted(STACKS))
def test_decoder_layers_found_structurally(tiny_model_dir, arch):
    lm, tokenizer, source = load_model(str(tiny_model_dir(arch)), device="cpu")
    name, layers = decoder_layers(lm)
    expected_stack, expected_linears = STACKS[arch]
    assert name == expected_stack and len(layers) == 2
    assert set(prunable_linears(layers[0])) == expected_linears
    assert source.kind == "local" and max_positions(lm.config) == 256
    assert next(lm.parameters()).dtype == torch.float32 and not lm.training


@pytest.mark.parametrize("arch", sorted(STACKS))
@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured")])
def test_prune_and_inspect_each_architecture(tiny_model_dir, tmp_path, arch, method, pattern):
    src = tiny_model_dir(arch)
    out = sparseheal.prune(str(src), str(tmp_path / "p"), method=method, pattern=pattern, nsamples=3,
                           seqlen=32, calibration_batch_size=2)
    dense, _, _ = load_model(str(src), device="cpu")
    pruned, _, _ = load_model(str(out), device="cpu")
    masks, meta = load_masks(out / "sparsity_masks.safetensors")
    stack, _ = decoder_layers(pruned)
    assert len(masks) == 2 * len(STACKS[arch][1])
    assert all(name.startswith(stack + ".") for name in masks)
    modules = dict(pruned.named_modules())
    for name, mask in masks.items():
        module = modules[name]
        assert mask.shape == module.weight.shape  # stored in the parameter's own orientation
        assert count_violations(module.weight, mask) == 0
        if pattern == "2:4":
            assert nm_violations(weight_view(module), 2, 4) == 0  # groups run along the input dim
    # everything outside the decoder linears is untouched: embeddings, lm_head, norms, biases
    pruned_params = dict(pruned.named_parameters())
    linear_weights = {f"{name}.weight" for name in masks}
    for name, param in dense.named_parameters():
        if name not in linear_weights:
            assert torch.equal(param, pruned_params[name]), name
    assert torch.equal(dense.get_input_embeddings().weight, pruned.get_input_embeddings().weight)
    assert torch.equal(dense.get_output_embeddings().weight, pruned.get_output_embeddings().weight)
    report = sparseheal.inspect(str(out))
    assert report["ok"] and report["mask_violations"] == 0
    assert report["total_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert report["pattern"] == ("2:4" if pattern == "2:4" else "unstructured")
    if pattern == "2:4":
        assert report["nm_violations"] == 0 and {r["nm_detected"] for r in report["layers"]} == {"2:4"}


def test_gpt2_conv1d_mask_orientation(tiny_model_dir, tmp_path):
    out = sparseheal.prune(str(tiny_model_dir("gpt2")), str(tmp_path / "p"), method="wanda", pattern="2:4",
                           nsamples=2, seqlen=32)
    masks, _ = load_masks(out / "sparsity_masks.safetensors")
    weights = load_file(out / "model.safetensors")
    c_attn = masks["transformer.h.0.attn.c_attn"]
    assert c_attn.shape == (64, 192)  # Conv1D stores (in, out)
    assert nm_violations(c_attn.t(), 2, 4) == 0  # valid along the input dimension...
    assert nm_violations(c_attn, 2, 4) > 0  # ...and not along the output dimension
    stored = weights["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(stored == 0, ~c_attn)
    # weight_view really is a view: edits through it reach the Conv1D parameter
    lm, _, _ = load_model(str(out), device="cpu")
    module = dict(lm.named_modules())["transformer.h.0.mlp.c_fc"]
    view = weight_view(module)
    assert view.shape == (module.nf, module.weight.shape[0])
    view[0, 1] = 7.0
    assert module.weight[1, 0] == 7.0


def test_weight_view_linear_is_the_weight():
    layer = nn.Linear(8, 4)
    assert weight_view(layer).data_ptr() == layer.weight.data_ptr() and weight_view(layer).shape == (4, 8)


def test_resolve_source_kinds_and_errors(llama_dir, tmp_path):
    assert resolve_source(str(llama_dir)).kind == "local"
    assert resolve_source("meta-llama/Llama-2-7b-hf").kind == "hub"
    for bad in ["does-not-exist", str(tmp_path / "missing"), "./a/b/c"]:
        with pytest.raises(ConfigError) as err:
            resolve_source(bad)
        assert err.value.flag == "MODEL" and "smollm2-135m" in err.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a model directory"):
        resolve_source(str(tmp_path / "file.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"))


def test_load_model_dtype_and_pickle_refusal(llama_dir, tmp_path):
    lm, _, _ = load_model(str(llama_dir), dtype="bfloat16", device="cpu")
    assert next(lm.parameters()).dtype == torch.bfloat16
    pickled = tmp_path / "pickled"
    shutil.copytree(llama_dir, pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ConfigError) as err:
        load_model(str(pickled), device="cpu")
    assert err.value.flag == "--allow-pickle"


def test_hash_weights_tracks_weights_only(pruned_llama, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pruned_llama, copy)
    before = hash_weights(copy)
    assert before == hash_weights(pruned_llama) and len(before) == 16
    (copy / "sparsity_masks.safetensors").write_bytes(b"changed")  # the masks file is not a weight file
    (copy / "sparseheal.json").write_text("{}")
    assert hash_weights(copy) == before
    state = load_file(copy / "model.safetensors")
    name = next(iter(state))
    state[name] = state[name] + 1
    from safetensors.torch import save_file

    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    assert hash_weights(copy) != before


def test_pruned_record(pruned_llama, llama_dir):
    record = json.loads((pruned_llama / "sparseheal.json").read_text())
    assert record["base_hash"] == hash_weights(llama_dir)
    assert record["method"] == "wanda" and record["pattern"] == "unstructured" and record["sparsity"] == 0.5
    assert record["calibration"] == {"source": "c4", "nsamples": 4, "seqlen": 32, "seed": 0, "batch_size": 2}
    assert len(record["layers"]) == 14 and all(v == pytest.approx(0.5) for v in record["layers"].values())
    assert record["pruned_parameters"] * 2 == record["prunable_parameters"]
    assert {"torch", "transformers", "python"} <= set(record["versions"])
    assert {"load", "prune"} <= set(record["timings"])
    # a normal HF directory: transformers loads it unchanged
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(pruned_llama)
    assert float((lm.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
