"""The shared Trainer set-up: data split, resume, loss log, distillation plumbing, non-finite guard."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import sparseheal
from sparseheal.config import ConfigError
from sparseheal.data import split_blocks
from sparseheal.heal import trainer as heal_trainer
from sparseheal.heal.trainer import training_arguments
from sparseheal.heal.training import LOG_FILE, TrainingSettings

FAST = dict(max_steps=6, block_size=32, max_eval_samples=2, logging_steps=1, device="cpu", lr=5e-3)


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory):
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("p") / "pruned"), method="magnitude")


class Interrupt(Exception):
    pass


class InterruptAt(TrainerCallback):
    """Raises at the end of optimizer step ``step``, before that step is logged or saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"stopped at step {state.global_step}")


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_split_blocks_holds_out_tail():
    blocks = torch.arange(40).reshape(20, 2)
    train, held = split_blocks(blocks, train_limit=100, max_eval=8)
    assert len(held) == 2 and len(train) == 18  # short data: a tenth held out
    train, held = split_blocks(blocks, train_limit=10, max_eval=8)
    assert len(held) == 8 and len(train) == 10 and torch.equal(held, blocks[12:])
    train, held = split_blocks(blocks[:1], train_limit=10, max_eval=8)
    assert held is None and len(train) == 1
    train, held = split_blocks(blocks, train_limit=10, max_eval=0)
    assert held is None and len(train) == 10


def test_training_arguments_follow_the_recipe(pruned, tmp_path):
    cfg = TrainingSettings(lr=3e-4, scheduler="cosine", warmup_steps=2, gradient_accumulation=4, save_steps=7,
                           max_steps=9)
    args = training_arguments(cfg, "cpu", tmp_path / "ck", has_eval=False)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (3e-4, "cosine", 2)
    assert (args.gradient_accumulation_steps, args.save_steps, args.max_steps) == (4, 7, 9)
    assert args.save_strategy.value == "steps" and args.eval_strategy.value == "no"
    assert sparseheal.heal.preflight(str(pruned), str(tmp_path / "o"), block_size=32).training.lr == 1e-4


def test_resume_ends_with_the_uninterrupted_weights(pruned, tmp_path, monkeypatch):
    full = sparseheal.heal(str(pruned), str(tmp_path / "full"), save_steps=2, **FAST)
    out = tmp_path / "cut"
    original = heal_trainer.train

    def interrupted(*args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), InterruptAt(4)]
        return original(*args, **kwargs)

    monkeypatch.setattr(heal_trainer, "train", interrupted)
    with pytest.raises(Interrupt):
        sparseheal.heal(str(pruned), str(out), save_steps=2, **FAST)
    monkeypatch.setattr(heal_trainer, "train", original)
    assert not out.exists()
    ckpt = tmp_path / "cut.ckpt"
    assert (ckpt / "checkpoint-2").is_dir() and not (ckpt / "checkpoint-4").exists()
    logged = [json.loads(line)["step"] for line in (ckpt / LOG_FILE).read_text().splitlines()]
    assert max(logged) == 3  # step 3 was logged, then lost: the resume repeats it
    with pytest.raises(ConfigError, match="--resume"):  # checkpoints present: must say resume or overwrite
        sparseheal.heal(str(pruned), str(out), save_steps=2, **FAST)
    with pytest.raises(ConfigError, match=r"--resume: .*--lr \(0.005 -> 0.001\)"):
        sparseheal.heal(str(pruned), str(out), save_steps=2, resume=True, **{**FAST, "lr": 1e-3})
    sparseheal.heal(str(pruned), str(out), save_steps=2, resume=True, **{**FAST, "logging_steps": 1})
    resumed, reference = _adapter(out), _adapter(full)
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert any(bool(t.abs().sum() > 0) for n, t in reference.items() if "lora_B" in n)  # it trained
    steps = [json.loads(line)["step"] for line in (out / LOG_FILE).read_text().splitlines()]
    train_steps = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in train_steps if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert steps == sorted(steps)
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["tokens_seen"] == 6 * 32 and record["steps"] == 6


def test_resume_without_checkpoint_is_refused(pruned, tmp_path):
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        sparseheal.heal(str(pruned), str(tmp_path / "o"), resume=True, **FAST)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()


class FakeDistiller:
    """Adds a constant multiple of the LM loss; reports both parts (or returns NaN when asked)."""

    needs_hidden_states = True

    def __init__(self, nan: bool = False) -> None:
        self.nan = nan
        self.saw_hidden = False

    def __call__(self, outputs, inputs, lm_loss):
        self.saw_hidden = outputs.hidden_states is not None
        extra = 0.5 * lm_loss
        loss = lm_loss + extra
        if self.nan:
            loss = loss * float("nan")
        return loss, {"lm_loss": lm_loss.item(), "fake_loss": extra.item()}


def _run_train(pruned, tmp_path, distiller, **overrides):
    from sparseheal.heal.lora import LoraHealer
    from sparseheal.models import load_model

    job = sparseheal.heal.preflight(str(pruned), str(tmp_path / "o"), **{**FAST, **overrides})
    lm, _, _ = load_model(str(pruned), device="cpu")
    model = LoraHealer().prepare(lm, {}, job.training.seed, job.training.gradient_checkpointing)
    blocks = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    summary = heal_trainer.train(model, blocks[:6], blocks[6:], job.training, job.compute.device,
                                 tmp_path / "ck", distiller)
    return model, summary


def test_distillation_parts_are_logged(pruned, tmp_path):
    distiller = FakeDistiller()
    _, summary = _run_train(pruned, tmp_path, distiller)
    lines = [json.loads(line) for line in (tmp_path / "ck" / LOG_FILE).read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert distiller.saw_hidden
    assert all("lm_loss" in line and "fake_loss" in line for line in train_lines)
    assert train_lines[0]["loss"] == pytest.approx(1.5 * train_lines[0]["lm_loss"], rel=1e-4)
    assert any("eval_fake_loss" in line for line in lines)


def test_non_finite_losses_drop_updates_then_stop(pruned, tmp_path):
    model, summary = _run_train(pruned, tmp_path / "a", FakeDistiller(nan=True), max_bad_steps=100)
    assert summary["bad_steps"] == 6
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(bool((p == 0).all()) for p in lora_b)  # no update was applied
    with pytest.raises(RuntimeError, match="max-bad-steps 2"):
        _run_train(pruned, tmp_path / "b", FakeDistiller(nan=True), max_bad_steps=2)
