"""Pruning in reduced precision and with layer offloading."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseheal
from sparseheal.sparsity.masks import nm_violations
from sparseheal.sparsity.store import load_masks


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bf16_prunes_with_float32_statistics(llama_dir, tmp_path, method, pattern):
    out = sparseheal.prune(str(llama_dir), str(tmp_path / "p"), method=method, pattern=pattern, nsamples=4,
                           seqlen=32, calibration_batch_size=2, dtype="bfloat16")
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["dtype"] == "bfloat16"
    assert record["sparsity_achieved"] == pytest.approx(0.5, abs=1e-3)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    masks, _ = load_masks(out / "sparsity_masks.safetensors")
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert torch.isfinite(weight.float()).all()
        assert (weight[~mask] == 0).all() and not torch.signbit(weight[~mask]).any()
        if pattern == "2:4":
            assert nm_violations(weight, 2, 4) == 0
    assert sparseheal.inspect(str(out))["ok"]


def test_offload_gives_the_same_masks_and_weights(llama_dir, tmp_path):
    kwargs = dict(method="sparsegpt", nsamples=4, seqlen=32, calibration_batch_size=2)
    plain = sparseheal.prune(str(llama_dir), str(tmp_path / "a"), **kwargs)
    offloaded = sparseheal.prune(str(llama_dir), str(tmp_path / "b"), offload=True, **kwargs)
    a, _ = load_masks(plain / "sparsity_masks.safetensors")
    b, _ = load_masks(offloaded / "sparsity_masks.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (plain / "model.safetensors").read_bytes() == (offloaded / "model.safetensors").read_bytes()


def test_pickle_weights_are_refused_unless_allowed(llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sparseheal.cli import main

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    for f in [*llama_dir.glob("tokenizer*"), llama_dir / "config.json"]:
        (pickled / f.name).write_bytes(f.read_bytes())
    assert not list(pickled.glob("*.safetensors"))
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(pickled), "--seqlen", "32", "--max-windows", "1"])
    assert exc.value.code == 2
    assert "--allow-pickle" in capsys.readouterr().err
    result = sparseheal.evaluate(str(pickled), seqlen=32, max_windows=1, allow_pickle=True)
    assert result["results"][0]["windows"] == 1
