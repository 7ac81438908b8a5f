"""Kill -9 during healing, then the same command with ``--resume``: the final weights are bit-identical to
an uninterrupted run's (CPU, fixed seed). The killed run is a real ``python -m sparseheal`` process."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

import sparseheal
from sparseheal import cli
from sparseheal.heal.checkpoints import last_checkpoint

STEPS = 120
SAVE = 5
# long enough (about 2 s of training on one thread) that a kill soon after the first checkpoint lands
# mid-run; checkpoints often enough that it also lands mid-save now and then
HEAL = ("--max-steps", str(STEPS), "--save-steps", str(SAVE), "--block-size", "32", "--max-eval-samples", "2",
        "--logging-steps", "5", "--lr", "1e-3", "--seed", "3", "--device", "cpu")
WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory) -> Path:
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("p") / "pruned"), method="magnitude")


def _heal_argv(pruned: Path, method: str, out: Path, *extra: str) -> list[str]:
    return ["heal", str(pruned), "-o", str(out), "--method", method, *HEAL, *extra]


def _cli(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0, argv


def _kill_when(argv: list[str], ready, waiting_for: str, delay: float, log: Path) -> None:
    """Starts ``python -m sparseheal ARGV`` in a subprocess, waits until ``ready()`` (``waiting_for`` names
    it in failures), and SIGKILLs it ``delay`` s later; fails when the process ended on its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sparseheal", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
        try:
            deadline = time.monotonic() + 240
            while not ready():
                assert proc.poll() is None, f"heal ended before {waiting_for}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no {waiting_for} within 240 s"
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == -signal.SIGKILL, f"heal ended (status {code}) before the kill; lengthen the run"


def _kill_after_first_checkpoint(argv: list[str], out: Path, delay: float, log: Path) -> str:
    """Kills the heal ``delay`` s after its first complete checkpoint; returns the checkpoint directories
    present right after the kill (for the failure message)."""
    ckpt = out.with_name(out.name + ".ckpt")
    _kill_when(argv, lambda: last_checkpoint(ckpt) is not None, "its first checkpoint", delay, log)
    return ", ".join(sorted(p.name for p in ckpt.glob("checkpoint-*")))


@pytest.mark.parametrize("method,seed", [("lora", 11), ("full", 12)])
def test_kill_9_then_resume_matches_an_uninterrupted_run(pruned, tmp_path, method, seed):
    out = tmp_path / "killed"
    delay = random.Random(seed).uniform(0.0, 0.6)
    argv = _heal_argv(pruned, method, out)
    present = _kill_after_first_checkpoint(argv, out, delay, tmp_path / "stderr.txt")
    # the killed run left no output that looks finished: only its checkpoints and, maybe, a temp sibling
    assert not out.exists()
    left = {p.name for p in tmp_path.iterdir()} - {"killed.ckpt", "stderr.txt", ".killed.sparseheal-lock"}
    assert all(name.startswith(".killed.") and name.endswith(".partial") for name in left), left
    resumed_from = last_checkpoint(tmp_path / "killed.ckpt")
    assert resumed_from is not None
    print(f"{method}: killed {delay:.3f} s after the first checkpoint; on disk {present}; "
          f"resuming from {resumed_from.name}")

    _cli(_heal_argv(pruned, method, out, "--resume"))
    _cli(_heal_argv(pruned, method, tmp_path / "whole"))

    resumed = load_file(str(out / WEIGHTS[method]))
    whole = load_file(str(tmp_path / "whole" / WEIGHTS[method]))
    assert resumed.keys() == whole.keys()
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["steps"] == STEPS and record["tokens_seen"] == STEPS * 32
    if method == "lora":  # it trained: the zero-initialised B matrices moved
        assert any(bool(t.abs().sum() > 0) for n, t in whole.items() if "lora_B" in n)
    else:
        assert record["mask_verification"]["ok"]
        base = load_file(str(pruned / "model.safetensors"))
        assert any(not torch.equal(base[n], whole[n]) for n in whole if n in base)


class _SaveCut(Exception):
    pass


def test_resume_skips_a_checkpoint_cut_short_while_saving(pruned, tmp_path, monkeypatch):
    """A kill between the weights and the trainer state of checkpoint-8 leaves a directory holding weights
    only; resuming must go back to checkpoint-4 (the Trainer alone would restart at step 0 from it)."""
    settings = dict(method="full", max_steps=10, save_steps=4, block_size=32, max_eval_samples=2,
                    logging_steps=1, lr=1e-3, seed=3, device="cpu")
    whole = sparseheal.heal(str(pruned), str(tmp_path / "whole"), **settings)
    original = Trainer._save_optimizer_and_scheduler

    def cut(self, output_dir):
        if self.state.global_step == 8:
            raise _SaveCut(output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", cut)
    out = tmp_path / "cut"
    with pytest.raises(_SaveCut):
        sparseheal.heal(str(pruned), str(out), **settings)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    ckpt = tmp_path / "cut.ckpt"
    assert (ckpt / "checkpoint-8" / "model.safetensors").is_file()
    assert not (ckpt / "checkpoint-8" / "trainer_state.json").exists()
    with open(ckpt / "train_log.jsonl", "a") as fh:  # a log line cut short by the kill
        fh.write('{"step": 8, "lo')
    assert last_checkpoint(ckpt) == ckpt / "checkpoint-4"

    resumed = sparseheal.heal(str(pruned), str(out), resume=True, **settings)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 10


def test_only_a_cut_short_checkpoint_is_no_checkpoint(pruned, tmp_path):
    """--resume with nothing complete to resume from is refused; a plain run starts over instead."""
    ckpt = tmp_path / "o.ckpt" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # cut short
    argv = _heal_argv(pruned, "lora", tmp_path / "o", "--resume")
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert last_checkpoint(tmp_path / "o.ckpt") is None
    sparseheal.heal.preflight(str(pruned), str(tmp_path / "o"), save_steps=4, block_size=32)  # no refusal


def test_kill_while_writing_the_output_resumes_from_the_final_checkpoint(pruned, tmp_path):
    """Killed after the last step, while the output was being written: the temp sibling is all that is
    left; --resume restores the final checkpoint, trains no more steps and writes the same weights."""
    settings = dict(method="lora", max_steps=8, save_steps=4, block_size=32, max_eval_samples=2,
                    logging_steps=1, lr=1e-3, seed=3, device="cpu")
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **settings)
    reference = load_file(str(out / WEIGHTS["lora"]))
    shutil.rmtree(out)  # as if the kill came before the rename ...
    partial = tmp_path / ".o.k1ll3d.partial"  # ... of a process that is gone, with the output half written
    partial.mkdir()
    (partial / WEIGHTS["lora"]).write_bytes(b"half a file")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (partial / ".sparseheal-partial").write_text(gone)
    user = tmp_path / ".o.mine.partial"  # a folder of the user's that only looks like one
    user.mkdir()
    resumed = sparseheal.heal(str(pruned), str(out), resume=True, **settings)
    assert not partial.exists() and user.is_dir()
    weights = load_file(str(resumed / WEIGHTS["lora"]))
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    record = json.loads((resumed / "sparseheal.json").read_text())
    assert record["steps"] == 8 and record["tokens_seen"] == 8 * 32


BLOCKWISE = ("--method", "blockwise", "--nsamples", "4", "--seqlen", "32", "--epochs", "200", "--lr", "1e-3",
             "--seed", "3", "--device", "cpu")


def test_kill_9_during_blockwise_then_resume_matches_an_uninterrupted_run(pruned, tmp_path):
    """Killed while the second layer trains (after the first layer's checkpoint), then resumed: the result
    is bit-identical to an uninterrupted block-wise heal."""
    from sparseheal.heal.blockwise import load_progress

    out, ckpt = tmp_path / "killed", tmp_path / "killed.ckpt"
    _kill_when(["heal", str(pruned), "-o", str(out), *BLOCKWISE], lambda: bool(load_progress(ckpt)),
               "its first finished layer", random.Random(13).uniform(0.0, 0.5), tmp_path / "stderr.txt")
    assert not out.exists() and [r["index"] for r in load_progress(ckpt)] == [0]

    _cli(["heal", str(pruned), "-o", str(out), *BLOCKWISE, "--resume"])
    _cli(["heal", str(pruned), "-o", str(tmp_path / "whole"), *BLOCKWISE])
    resumed = load_file(str(out / "model.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    record = json.loads((out / "sparseheal.json").read_text())
    assert [r["index"] for r in record["blockwise"]["layers"]] == [0, 1]
    assert record["mask_verification"]["ok"] and not ckpt.exists()
