"""Fully sharded healing (--fsdp, FSDP2): two CPU processes (gloo) through torchrun, against one process;
and the refused combinations."""

import json

import pytest
import torch
from runs import prune_for_launch, torchrun_heal
from safetensors.torch import load_file

import sparseheal
from sparseheal import cli
from sparseheal.config import ConfigError
from sparseheal.sparsity.store import load_masks


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, llama_dir, data_dir):
    return prune_for_launch(tmp_path_factory, llama_dir, data_dir, "fsdp")


def _flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def _heal_sharded(pruned, out, settings: dict, *extra: str) -> str:
    """Runs ``sparseheal heal --fsdp`` in two torchrun processes (one block each); returns their stderr."""
    proc = torchrun_heal(pruned, out, "--fsdp", *_flags(settings), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks hold shards, no DDP copy
    assert proc.stderr.count("sharded over 2 ranks (FSDP2)") == 2, proc.stderr[-3000:]
    return proc.stderr


def _grad_norms(out) -> list[float]:
    lines = (json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines())
    return [entry["grad_norm"] for entry in lines if "grad_norm" in entry]


# Two training blocks and a global batch of two: every step sees both blocks, whichever rank holds which.
# Clipping is active (the gradient norm is above 1), so a gradient that is not masked on its shard before
# the step would change every kept weight's update, not only the pruned ones.
FULL = dict(method="full", max_steps=3, block_size=32, lr=1e-3, weight_decay=0.1, max_train_samples=2,
            max_eval_samples=0, seed=0, logging_steps=1)


def test_fsdp_full_healing_matches_single_process(pruned, tmp_path):
    _heal_sharded(pruned, tmp_path / "fsdp", FULL)
    single = sparseheal.heal(str(pruned), str(tmp_path / "single"), batch_size=2, **FULL)

    sharded_weights = load_file(tmp_path / "fsdp" / "model.safetensors")
    single_weights = load_file(single / "model.safetensors")
    before = load_file(pruned / "model.safetensors")
    assert sorted(sharded_weights) == sorted(single_weights)
    changed = 0
    for key, value in single_weights.items():
        torch.testing.assert_close(sharded_weights[key], value, rtol=1e-4, atol=1e-6)
        changed += int(not torch.equal(value, before[key]))
    assert changed > 0  # training moved the weights
    assert _grad_norms(tmp_path / "fsdp")[0] > 1.0  # clipping was active
    assert _grad_norms(tmp_path / "fsdp") == pytest.approx(_grad_norms(single), rel=1e-5)

    masks, _ = load_masks(tmp_path / "fsdp" / "sparsity_masks.safetensors")
    assert masks.keys() == load_masks(pruned / "sparsity_masks.safetensors")[0].keys()
    for name, mask in masks.items():
        weight = sharded_weights[f"{name}.weight"]
        assert int((weight[~mask].view(torch.int32) != 0).sum()) == 0  # pruned: exactly +0.0
    record = json.loads((tmp_path / "fsdp" / "sparseheal.json").read_text())
    assert record["mask_verification"]["ok"] and record["mask_verification"]["pruned_parameters"] > 0
    assert record["recipe"]["fsdp"] is True
    assert sparseheal.inspect(str(tmp_path / "fsdp"))["ok"]


LORA = dict(method="lora", max_steps=3, block_size=32, lr=1e-2, max_train_samples=2, max_eval_samples=0,
            seed=0, logging_steps=1, dropout=0.0, targets="all-linear", distill="kl")


def test_fsdp_mask_aware_lora_with_distillation_matches_single_process(pruned, tmp_path):
    _heal_sharded(pruned, tmp_path / "fsdp", LORA, "--mask-aware")
    single = sparseheal.heal(str(pruned), str(tmp_path / "single"), batch_size=2, mask_aware=True, **LORA)

    sharded = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    reference = load_file(single / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(reference) and len(reference) == 28  # A and B of 14 linears
    for key, value in reference.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-3, atol=1e-5)
    assert any(float(value.abs().max()) > 1e-3 for key, value in reference.items() if "lora_B" in key)
    assert _grad_norms(tmp_path / "fsdp") == pytest.approx(_grad_norms(single), rel=1e-4)


REFUSED = [
    ({}, {"fsdp": True}, "--fsdp", "torchrun --nproc_per_node"),
    ({"WORLD_SIZE": "2"}, {"fsdp": True, "merge": "masked"}, "--merge", "sparseheal merge"),
    ({"WORLD_SIZE": "2"}, {"fsdp": True, "save_steps": 5}, "--save-steps", "sharded at load time"),
    ({"WORLD_SIZE": "2"}, {"fsdp": True, "device": "cpu"}, "--device", "LOCAL_RANK"),
    ({"ACCELERATE_USE_FSDP": "true"}, {}, "--fsdp", "--use_fsdp"),
]


@pytest.mark.parametrize("env, settings, flag, allowed", REFUSED,
                         ids=["single-process", "merge", "checkpoints", "device", "accelerate-plugin"])
def test_fsdp_refuses_unsupported_combinations(pruned, tmp_path, monkeypatch, env, settings, flag, allowed):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        sparseheal.heal(str(pruned), str(out), max_steps=1, block_size=32, **settings)
    assert err.value.flag == flag and allowed in err.value.message
    assert not out.exists()


def test_fsdp_refusal_is_one_line_through_the_cli(pruned, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["heal", str(pruned), "-o", str(tmp_path / "out"), "--method", "full", "--fsdp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("sparseheal: error: --fsdp: needs two or more processes")
    assert not (tmp_path / "out").exists()
