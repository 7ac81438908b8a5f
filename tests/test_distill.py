"""Distillation: the losses (pure), the Distiller on tiny models, and teacher resolution/refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model_dir, synthetic_text
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparseheal
from sparseheal.config import ConfigError
from sparseheal.heal.distill import (
    Distiller,
    DistillSettings,
    build_distiller,
    kl_distill_loss,
    mix_losses,
    resolve_teacher,
    squarehead_loss,
)


def parse_distill(distill):
    return DistillSettings(distill=distill).losses


def check_distill_settings(temperature, alpha, teacher_dtype=None):
    DistillSettings(temperature=temperature, distill_alpha=alpha, teacher_dtype=teacher_dtype)


def _cfg(pruned_dir, **overrides):
    return SimpleNamespace(settings=lambda: DistillSettings(**{"distill": "kl", **overrides}),
                           pruned_dir=str(pruned_dir))


def _build(cfg, student, record):
    return build_distiller(cfg.settings(), student, cfg.pruned_dir, record)


def _text_blocks(tokenizer, seed: int, n: int, length: int = 32) -> torch.Tensor:
    ids = tokenizer(synthetic_text(40 * n, seed)).input_ids[: n * length]
    return torch.tensor(ids).reshape(n, length)  # (n, length)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny LLaMA whose final norm is scaled up 20x, so that its next-token distributions are peaked
    (a freshly initialised model predicts almost uniformly, leaving nothing to distil)."""
    path = make_model_dir(tmp_path_factory.mktemp("dense"), "llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, dense_dir):
    out = tmp_path_factory.mktemp("distill") / "pruned"
    return sparseheal.prune(str(dense_dir), str(out), method="magnitude", sparsity=0.5)


def test_kl_is_zero_with_zero_gradient_when_teacher_equals_student():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 16, requires_grad=True)  # (B, T, V)
    loss = kl_distill_loss(logits, logits.detach().clone(), temperature=2.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-8)


def test_kl_matches_direct_computation_with_t_squared_scaling_and_mask():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 10), torch.randn(2, 4, 10)  # (B, T, V)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]])
    t = 3.0
    p_t = torch.softmax(teacher / t, -1)
    per_token = (p_t * (torch.log(p_t) - torch.log_softmax(student / t, -1))).sum(-1)  # (B, T)
    expected = t**2 * per_token[mask.bool()].mean()
    assert kl_distill_loss(student, teacher, t, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = t**2 * per_token.mean().item()
    assert kl_distill_loss(student, teacher, t).item() == pytest.approx(unmasked, rel=1e-5)
    with pytest.raises(ValueError):
        kl_distill_loss(student, teacher, 0.0)


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_kl_equals_whole_kl_with_the_same_gradient(chunk):
    torch.manual_seed(2)
    teacher = torch.randn(2, 5, 12)  # (B, T, V)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]])
    grads, losses = [], []
    for chunk_tokens in (None, chunk):
        student = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3)).requires_grad_()
        loss = kl_distill_loss(student, teacher, 2.0, mask, chunk_tokens=chunk_tokens)
        loss.backward()
        losses.append(loss.detach())
        grads.append(student.grad)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-8) and grads[0].abs().sum() > 0


def test_squarehead_matches_direct_computation():
    torch.manual_seed(2)
    student = [torch.randn(2, 3, 8) for _ in range(3)]  # per layer (B, T, d)
    teacher = [2.0 * torch.randn(2, 3, 8) + i for i in range(3)]
    direct = sum(((s - t) ** 2).mean() / (t**2).mean() for s, t in zip(student, teacher, strict=True)) / 3
    assert squarehead_loss(student, teacher).item() == pytest.approx(direct.item(), rel=1e-5)
    assert squarehead_loss(teacher, teacher).item() == 0.0
    # scale invariance of the normalisation: scaling both by 10 leaves the loss unchanged
    scaled = squarehead_loss([10 * s for s in student], [10 * t for t in teacher])
    assert scaled.item() == pytest.approx(direct.item(), rel=1e-4)


def test_mix_and_parse_and_settings():
    lm, kd = torch.tensor(4.0), torch.tensor(2.0)
    assert mix_losses(lm, kd, 0.25).item() == pytest.approx(3.5)
    assert mix_losses(lm, kd, 0.0).item() == 4.0 and mix_losses(lm, kd, 1.0).item() == 2.0
    assert parse_distill("kl, squarehead,kl") == ("kl", "squarehead")
    assert parse_distill(None) == ()
    for value, flag in [("mse", "--distill"), ("", "--distill")]:
        with pytest.raises(ConfigError) as err:
            parse_distill(value)
        assert err.value.flag == flag
    bad = [((0.0, 0.5), "--temperature"), ((-1.0, 0.5), "--temperature"), ((2.0, 1.5), "--distill-alpha"),
           ((2.0, -0.1), "--distill-alpha"), ((2.0, 0.5, "int8"), "--teacher-dtype")]
    for args, flag in bad:
        with pytest.raises(ConfigError) as err:
            check_distill_settings(*args)
        assert err.value.flag == flag


def _held_out_kl(student, teacher, tokens) -> float:
    with torch.no_grad():
        return kl_distill_loss(student(tokens).logits, teacher(tokens).logits, 1.0).item()


def test_distillation_lowers_kl_to_teacher(pruned_dir, dense_dir):
    teacher = AutoModelForCausalLM.from_pretrained(dense_dir)
    student = AutoModelForCausalLM.from_pretrained(pruned_dir)
    distiller = Distiller(teacher, ["kl"], temperature=1.0, alpha=1.0)
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    train = _text_blocks(tokenizer, seed=11, n=10)  # (N, T)
    held_out = _text_blocks(tokenizer, seed=12, n=4)
    before = _held_out_kl(student, teacher, held_out)
    assert before > 0.02
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-4)
    student.train()
    for step in range(30):
        rows = train[(step % 3) * 3 : (step % 3) * 3 + 4]  # (4, T)
        batch = {"input_ids": rows, "labels": rows}
        outputs = student(**batch)
        loss, parts = distiller(outputs, batch, outputs.loss)
        assert set(parts) == {"lm_loss", "distill_loss", "kl_loss"}
        assert loss.item() == pytest.approx(parts["kl_loss"], rel=1e-5)  # alpha = 1: the KL alone
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    student.eval()
    after = _held_out_kl(student, teacher, held_out)
    assert after < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())


def test_squarehead_distiller_parts(pruned_dir, dense_dir):
    teacher = AutoModelForCausalLM.from_pretrained(dense_dir)
    student = AutoModelForCausalLM.from_pretrained(pruned_dir)
    distiller = Distiller(teacher, ["kl", "squarehead"], temperature=2.0, alpha=0.5)
    assert distiller.needs_hidden_states
    ids = torch.randint(0, 256, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    outputs = student(**batch, output_hidden_states=True)
    loss, parts = distiller(outputs, batch, outputs.loss)
    with torch.no_grad():
        hidden = teacher(ids, output_hidden_states=True).hidden_states
    expected_sq = squarehead_loss(outputs.hidden_states[1:], hidden[1:]).item()
    assert parts["squarehead_loss"] == pytest.approx(expected_sq, rel=1e-5)
    assert parts["distill_loss"] == pytest.approx(parts["kl_loss"] + parts["squarehead_loss"], rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * parts["lm_loss"] + 0.5 * parts["distill_loss"], rel=1e-5)
    loss.backward()
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None


def test_build_distiller_uses_record_base_model(pruned_dir, dense_dir):
    record = json.loads((pruned_dir / "sparseheal.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(pruned_dir)
    distiller = _build(_cfg(pruned_dir, teacher_dtype="bfloat16"), student, record)
    assert distiller is not None and not distiller.teacher.training
    assert next(distiller.teacher.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert torch.equal(distiller.teacher.lm_head.weight.float(), dense.lm_head.weight.bfloat16().float())
    assert _build(_cfg(pruned_dir, distill=None), student, record) is None


def test_teacher_refusals(pruned_dir, tmp_path):
    record = json.loads((pruned_dir / "sparseheal.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(pruned_dir)
    with pytest.raises(ConfigError) as err:  # no teacher resolvable
        _build(_cfg(pruned_dir), student, {**record, "base_model": str(tmp_path / "gone"),
                                                    "base_path": str(tmp_path / "gone2")})
    assert err.value.flag == "--teacher" and "pass --teacher" in err.value.message
    with pytest.raises(ConfigError) as err:
        resolve_teacher(None, None)
    assert err.value.flag == "--teacher"
    other = make_model_dir(tmp_path / "gpt2", "gpt2")  # same tokenizer, different depth/width: fine for kl
    other_cfg = json.loads((other / "config.json").read_text())
    other_cfg["vocab_size"] = 320
    (other / "config.json").write_text(json.dumps(other_cfg))
    with pytest.raises(ConfigError) as err:  # vocabulary differs
        _build(_cfg(pruned_dir, teacher=str(other)), student, record)
    assert err.value.flag == "--teacher" and "vocabulary" in err.value.message
    with pytest.raises(ConfigError) as err:
        _build(_cfg(pruned_dir, temperature=0.0), student, record)
    assert err.value.flag == "--temperature"
    with pytest.raises(ConfigError) as err:
        _build(_cfg(pruned_dir, distill_alpha=1.5), student, record)
    assert err.value.flag == "--distill-alpha"


def test_squarehead_refuses_teacher_of_other_shape(pruned_dir, tmp_path):
    record = json.loads((pruned_dir / "sparseheal.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(pruned_dir)
    deeper = make_model_dir(tmp_path / "deeper", "llama")
    cfg = json.loads((deeper / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (deeper / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        _build(_cfg(pruned_dir, distill="squarehead", teacher=str(deeper)), student, record)
    assert err.value.flag == "--distill" and "num_hidden_layers" in err.value.message


@pytest.mark.parametrize("method", ["lora", "full"])
def test_heal_distills_for_both_healers(pruned_dir, tmp_path, method):
    out = sparseheal.heal(str(pruned_dir), str(tmp_path / "out"), method=method, distill="kl,squarehead",
                          block_size=32, max_steps=2, max_eval_samples=2, logging_steps=1, distill_alpha=0.7)
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["recipe"]["distill"] == "kl,squarehead" and record["steps"] == 2
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    parts = next(line for line in logged if "kl_loss" in line)
    assert parts["squarehead_loss"] > 0 and parts["lm_loss"] > 0
    expected = 0.3 * parts["lm_loss"] + 0.7 * (parts["kl_loss"] + parts["squarehead_loss"])
    assert parts["loss"] == pytest.approx(expected, rel=1e-3)
