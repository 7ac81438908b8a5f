"""Self-generated training data (--data self): determinism, the on-disk cache, blocks and the record."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.generation.logits_process import TopPLogitsWarper

import sparseheal
from sparseheal.api import heal
from sparseheal.config import ConfigError
from sparseheal.data import blocks_from_sequences
from sparseheal.heal import selfgen
from sparseheal.heal.selfgen import (
    SelfGenSettings,
    nucleus_filter,
    sample_sequences,
    start_tokens,
)
from sparseheal.models import cache_dir


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("selfgen") / "pruned"
    return sparseheal.prune(str(llama_dir), str(out), method="magnitude", sparsity=0.5)


def _cfg(**overrides):
    base = dict(teacher=None, teacher_dtype=None, teacher_device=None, dtype=None, device="cpu",
                self_sequences=5, self_length=12, self_temperature=1.0, self_top_p=0.95, self_seed=0,
                self_batch_size=16, block_size=16, max_eval_samples=128, max_train_samples=30000)
    return SimpleNamespace(**{**base, **overrides})


def _settings(cfg) -> SelfGenSettings:
    return SelfGenSettings(**{k: v for k, v in vars(cfg).items() if k.startswith("self_")})


def self_generated_tokens(cfg, record, tokenizer):
    """As the heal pipeline calls it: the teacher's dtype and device default to the student's."""
    dtype = cfg.teacher_dtype or cfg.dtype or "float32"
    return selfgen.self_generated_tokens(_settings(cfg), cfg.teacher, dtype, cfg.teacher_device or cfg.device,
                                         record, tokenizer)


def self_training_blocks(cfg, record, tokenizer):
    tokens, made = self_generated_tokens(cfg, record, tokenizer)
    train, held_out, split = selfgen.self_training_blocks(tokens, cfg.block_size, cfg.max_train_samples,
                                                          cfg.max_eval_samples)
    return train, held_out, {**made, **split}


def _record(pruned_dir) -> dict:
    return json.loads((pruned_dir / "sparseheal.json").read_text())


def test_deterministic_for_a_seed_and_cached(pruned_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    first, rec1 = self_generated_tokens(_cfg(), _record(pruned_dir), tokenizer)
    assert first.shape == (5, 1 + 12)  # the tiny tokenizer adds no prefix: one start token + 12 sampled
    assert not rec1["cached"] and (cache_dir() / "selfgen" / f"{rec1['cache_key']}.safetensors").is_file()
    assert tokenizer.eos_token_id not in first[:, 1:].tolist()  # exactly self_length tokens, no early end

    (cache_dir() / "selfgen" / f"{rec1['cache_key']}.safetensors").unlink()
    regenerated, rec2 = self_generated_tokens(_cfg(), _record(pruned_dir), tokenizer)
    assert torch.equal(first, regenerated) and not rec2["cached"]  # same seed, fresh generation: same tokens

    def no_generation(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(selfgen, "sample_sequences", no_generation)
    cached, rec3 = self_generated_tokens(_cfg(), _record(pruned_dir), tokenizer)
    assert torch.equal(first, cached) and rec3["cached"] and rec3["cache_key"] == rec1["cache_key"]
    monkeypatch.undo()

    other, rec4 = self_generated_tokens(_cfg(self_seed=1), _record(pruned_dir), tokenizer)
    assert rec4["cache_key"] != rec1["cache_key"] and not torch.equal(first, other)
    greedy_key = self_generated_tokens(_cfg(self_top_p=0.5), _record(pruned_dir), tokenizer)[1]["cache_key"]
    assert greedy_key not in (rec1["cache_key"], rec4["cache_key"])


def test_start_tokens_skip_special_tokens(pruned_dir):
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    starts = start_tokens(tokenizer, 200, seed=0, vocab_size=256)
    assert starts.shape == (200, 1) and int(starts.max()) < 256
    assert not set(starts.flatten().tolist()) & set(tokenizer.all_special_ids)
    assert torch.equal(starts, start_tokens(tokenizer, 200, seed=0, vocab_size=256))
    assert len(set(starts.flatten().tolist())) > 50  # spread over the vocabulary


def test_blocks_and_held_out_split(pruned_dir):
    sequences = torch.arange(5 * 13).reshape(5, 13)
    blocks = blocks_from_sequences(sequences, 16)
    assert blocks.shape == (4, 16) and torch.equal(blocks.reshape(-1), torch.arange(64))
    with pytest.raises(ConfigError) as err:
        blocks_from_sequences(sequences[:1], 16)
    assert err.value.flag == "--self-sequences"
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    cfg = _cfg(self_sequences=20, self_length=15)
    train, held_out, record = self_training_blocks(cfg, _record(pruned_dir), tokenizer)
    assert train.shape == (18, 16) and held_out.shape == (2, 16)  # 20 x 16 tokens = 20 blocks, 10% held out
    assert record["train_blocks"] == 18 and record["eval_blocks"] == 2 and record["source"] == "self"


def test_vocabulary_mismatch_teacher_refused(pruned_dir, tmp_path):
    other = make_model_dir(tmp_path / "other", "llama")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]  # same tokens and size, two ids swapped
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError) as err:
        self_generated_tokens(_cfg(teacher=str(other)), _record(pruned_dir),
                              AutoTokenizer.from_pretrained(pruned_dir))
    assert err.value.flag == "--teacher" and "other ids" in err.value.message


def test_heal_on_self_data_with_distillation(pruned_dir, tmp_path):
    out = heal(str(pruned_dir), str(tmp_path / "out"), method="full", data="self", distill="kl",
               block_size=16, max_steps=2, self_sequences=12, self_length=15, logging_steps=1, device="cpu")
    record = json.loads((out / "sparseheal.json").read_text())
    data = record["data"]
    assert data["source"] == "self" and data["sequences"] == 12 and data["length"] == 15
    assert data["seed"] == 0 and data["top_p"] == 0.95 and data["teacher"] and data["cache_key"]
    assert data["train_blocks"] == 11 and data["eval_blocks"] == 1
    assert record["steps"] == 2 and record["mask_verification"]["ok"]
    log_lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("kl_loss" in line for line in log_lines)


@pytest.mark.parametrize("candidates", [8, 64, 512])
def test_nucleus_filter_keeps_the_same_tokens_as_a_full_sort(candidates):
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 3.0, 8.0]).repeat_interleave(16)[:, None]  # flat to peaked rows
    logits = torch.randn(64, 512, generator=generator) * scale  # (B, V)
    for top_p in (0.3, 0.9, 0.95):
        expected = TopPLogitsWarper(top_p)(None, logits.clone())
        got = nucleus_filter(logits, top_p, candidates)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])  # kept logits untouched
    wide = torch.isfinite(nucleus_filter(logits, 0.95, 512)).sum(-1) > 8  # nuclei beyond 8 candidates:
    assert wide.any() and not wide.all()  # with candidates=8, both the top-k path and the full sort ran
    assert torch.equal(nucleus_filter(logits, 1.0, candidates), logits)


def test_sampling_matches_generate_with_its_own_top_p(pruned_dir):
    teacher = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    prompts = start_tokens(AutoTokenizer.from_pretrained(pruned_dir), 6, seed=0, vocab_size=256)  # (6, 1)
    ours = sample_sequences(teacher, prompts, 10, temperature=0.7, top_p=0.9, seed=3, eos_token_id=None,
                            batch_size=4)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=10,
                              min_new_tokens=10, pad_token_id=0)
    rows = []
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for start in (0, 4):
            batch = prompts[start : start + 4]
            rows.append(teacher.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                         generation_config=config))
    assert torch.equal(ours, torch.cat(rows))  # the same tokens as generate's sort-based top-p


def test_batch_size_is_part_of_the_cache_key(pruned_dir):
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    small, rec_small = self_generated_tokens(_cfg(self_batch_size=2), _record(pruned_dir), tokenizer)
    _, rec_16 = self_generated_tokens(_cfg(), _record(pruned_dir), tokenizer)
    assert rec_small["cache_key"] != rec_16["cache_key"] and rec_small["batch"] == 2
    assert small.shape == (5, 13)
