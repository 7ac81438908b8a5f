"""Every model directory sparseheal writes loads unchanged in a serving engine that reads a folder's
weights the way vLLM does: the files a weights index names, else every ``*.safetensors`` file; and no
config carries a quantization or sparsity config (vLLM refuses them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import sparseheal
from sparseheal.sparsity.store import load_masks

HEAL = dict(block_size=32, max_steps=1, max_eval_samples=2, logging_steps=1, device="cpu")


def engine_weight_files(model_dir: Path) -> list[Path]:
    """The files an engine reads as weights: those the index names, else every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model_dir.glob("*.safetensors"))


@pytest.fixture(scope="module")
def written(llama_dir, data_dir, tmp_path_factory) -> dict[str, Path]:
    """A pruned, a fully healed and a masked-merged directory, as the commands write them."""
    tmp = tmp_path_factory.mktemp("serve")
    pruned = sparseheal.prune(str(llama_dir), str(tmp / "pruned"), method="magnitude")
    heal = {**HEAL, "data_dir": str(data_dir)}  # a module fixture runs before the test's own environment
    full = sparseheal.heal(str(pruned), str(tmp / "full"), method="full", **heal)
    adapter = sparseheal.heal(str(pruned), str(tmp / "lora"), method="lora", merge="masked", **heal)
    merged = sparseheal.merge(str(adapter), str(tmp / "merged"), eval_windows=0)
    return {"pruned": pruned, "full": full, "merged": merged, "heal-merged": adapter / "merged"}


@pytest.mark.parametrize("kind", ["pruned", "full", "merged", "heal-merged"])
def test_engine_reads_only_the_model_weights(written, kind):
    model_dir = written[kind]
    assert (model_dir / "sparsity_masks.safetensors").is_file()  # masks stay where sparseheal reads them
    files = engine_weight_files(model_dir)
    assert files and model_dir / "sparsity_masks.safetensors" not in files
    names = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            names |= set(fh.keys())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert names == set(model.state_dict()) - {"lm_head.weight"} or names == set(model.state_dict())
    masks, _ = load_masks(model_dir / "sparsity_masks.safetensors")
    assert masks and not names & set(masks)  # mask names (module paths) are no weight names


@pytest.mark.parametrize("kind", ["pruned", "full", "merged", "heal-merged"])
def test_config_has_no_quantization_or_sparsity_config(written, kind):
    config = json.loads((written[kind] / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config


def test_a_quantization_config_is_not_carried_into_the_output(llama_dir, tmp_path):
    """A source whose config names a quantization scheme is saved as the plain tensors it holds."""
    import shutil

    source = tmp_path / "src"
    shutil.copytree(llama_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["sparsity_config"] = {"format": "dense"}
    (source / "config.json").write_text(json.dumps(config))
    out = sparseheal.prune(str(source), str(tmp_path / "pruned"), method="magnitude")
    assert "sparsity_config" not in json.loads((out / "config.json").read_text())
