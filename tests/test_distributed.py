"""Data-parallel healing: two CPU processes (gloo) through torchrun, against one process."""

import re

import pytest
import torch
from runs import prune_for_launch, torchrun_heal
from safetensors.torch import load_file

import sparseheal
from sparseheal.sparsity.store import load_masks


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, llama_dir, data_dir):
    return prune_for_launch(tmp_path_factory, llama_dir, data_dir, "ddp")


# Two training blocks and a global batch of two: every step sees both blocks, whichever rank holds which,
# so the data-parallel run and the single process take the same steps.
HEAL = dict(method="full", max_steps=3, block_size=32, lr=1e-3, weight_decay=0.1, max_train_samples=2,
            max_eval_samples=0, seed=0)
HEAL_FLAGS = [part for key, value in HEAL.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def test_ddp_full_healing_matches_single_process(pruned, tmp_path):
    ddp = torchrun_heal(pruned, tmp_path / "ddp", *HEAL_FLAGS)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    digests = re.findall(r"rank (\d): trained weights sha256 (\w+)", ddp.stderr)
    assert sorted(rank for rank, _ in digests) == ["0", "1"]
    assert len({digest for _, digest in digests}) == 1  # both ranks end with the same weights

    single = sparseheal.heal(str(pruned), str(tmp_path / "single"), batch_size=2, **HEAL)
    ddp_weights = load_file(tmp_path / "ddp" / "model.safetensors")
    single_weights = load_file(single / "model.safetensors")
    masks, _ = load_masks(tmp_path / "ddp" / "sparsity_masks.safetensors")
    before = load_file(pruned / "model.safetensors")
    changed = 0
    for key, value in single_weights.items():
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-4, atol=1e-6)
        changed += int(not torch.equal(value, before[key]))
    assert changed > 0  # training moved the weights
    for name, mask in masks.items():
        weight = ddp_weights[f"{name}.weight"]
        assert int((weight[~mask].view(torch.int32) != 0).sum()) == 0  # pruned: exactly +0.0
    assert sparseheal.inspect(str(tmp_path / "ddp"))["ok"]
