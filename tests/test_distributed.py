"""Data-parallel healing: two CPU processes (gloo) through torchrun, against one process."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sparseheal
from sparseheal.sparsity.store import load_masks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, llama_dir, data_dir):
    out = tmp_path_factory.mktemp("ddp") / "pruned"
    os.environ["SPARSEHEAL_DATA_DIR"] = str(data_dir)
    return sparseheal.prune(str(llama_dir), str(out), nsamples=4, seqlen=32, calibration_batch_size=2)


# Two training blocks and a global batch of two: every step sees both blocks, whichever rank holds which,
# so the data-parallel run and the single process take the same steps.
HEAL = dict(method="full", max_steps=3, block_size=32, lr=1e-3, weight_decay=0.1, max_train_samples=2,
            max_eval_samples=0, seed=0)
HEAL_FLAGS = [part for key, value in HEAL.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def test_ddp_full_healing_matches_single_process(pruned, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port())]
    heal = ["-m", "sparseheal", "heal", str(pruned), "-o", str(tmp_path / "ddp"), "--batch-size", "1",
            *HEAL_FLAGS]
    ddp = subprocess.run(launcher + heal, env=env, capture_output=True, text=True, timeout=300)
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
