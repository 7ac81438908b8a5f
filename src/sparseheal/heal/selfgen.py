"""Self-generated training text (``--data self``): the dense teacher writes the data it is healed on.

Following the data-free recipe of LLM-QAT (Liu et al. 2023, https://arxiv.org/abs/2305.17888),
each sequence starts from one token drawn uniformly from the vocabulary (special tokens excluded,
after whatever the tokenizer puts in front of any text, e.g. BOS), and the teacher continues it by
nucleus sampling::

    x_1 ~ U(V \\ special),   x_{t+1} ~ top_p(softmax(z_t / temperature))

for exactly ``--self-length`` new tokens (end-of-sequence is suppressed until then), so that every
sequence has the same length. ``--self-sequences`` sequences are drawn with ``--self-seed``;
sampling runs in batches of ``--self-batch-size`` inside a forked RNG, so the same teacher,
settings, dtype and device type give the same tokens. The nucleus is found by a top-k over the
likeliest tokens (``nucleus_filter``), not a sort of the whole vocabulary. The tokens are cached under
``<cache>/selfgen/<key>.safetensors``, the key hashing the teacher's weights and every setting,
and reused by later runs. The sequences are concatenated and cut into training blocks like any
other text (``data.training_blocks``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from sparseheal.checks import above_zero, positive, seed, unit_interval
from sparseheal.data import blocks_from_sequences, split_blocks
from sparseheal.errors import ConfigError
from sparseheal.heal.distill import check_vocabulary, load_teacher, resolve_teacher
from sparseheal.models import ModelSource, cache_dir, load_tokenizer, source_hash
from sparseheal.settings import Settings, setting

__all__ = [
    "check_self_settings",
    "SELF_DATA",
    "SelfGenSettings",
    "selfgen_key",
    "start_tokens",
    "nucleus_filter",
    "NucleusSampling",
    "sample_sequences",
    "self_generated_tokens",
    "self_training_blocks",
]

log = logging.getLogger(__name__)

SELF_DATA = "self"
SAMPLER = "nucleus-topk"  # part of the cache key: names how tokens are drawn (NucleusSampling)
NUCLEUS_CANDIDATES = 4096  # tokens per row ranked by top-k before a full sort is needed


def _top_p(flag: str, value: float) -> None:
    above_zero(flag, value)
    unit_interval(closed_high=True)(flag, value)


@dataclass
class SelfGenSettings(Settings):
    """``--data self``: how many sequences the dense teacher writes, how long, and how it samples.
    Every setting is part of the cache key (the batch too: it shapes the random stream)."""

    self_sequences: int = setting(64, "--data self: number of generated sequences.", check=positive)
    self_length: int = setting(256, "--data self: tokens per generated sequence.", check=positive)
    self_temperature: float = setting(1.0, "--data self: sampling temperature.", check=above_zero)
    self_top_p: float = setting(0.95, "--data self: nucleus sampling top-p.", check=_top_p)
    self_seed: int = setting(0, "--data self: sampling seed.", check=seed)
    self_batch_size: int = setting(64, "--data self: sequences generated at once (the teacher's KV cache "
                                       "grows with it).", check=positive)


def check_self_settings(cfg: SelfGenSettings, config: Any) -> None:
    """The checks of ``--data self`` before any model loads: sequences within the model's positions, the
    generated tokens within memory, and a cache that can be written."""
    import psutil

    from sparseheal.checks import check_output
    from sparseheal.models import check_positions

    check_positions(config, cfg.self_length + 1, "--self-length")  # + the prefix token
    needed = cfg.self_sequences * cfg.self_length * 8 * 2  # int64 tokens, and their blocks
    available = psutil.virtual_memory().available
    if needed > available // 2:
        raise ConfigError("--self-sequences", f"{cfg.self_sequences} sequences of {cfg.self_length} tokens "
                                              f"need about {needed / 2**30:.1f} GiB, more than half the "
                                              f"{available / 2**30:.1f} GiB of memory free; generate fewer")
    check_output(cache_dir() / "selfgen", overwrite=True, flag="--data")  # where the text is cached


def selfgen_key(teacher_id: str, settings: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the teacher's identity and every generation setting."""
    payload = json.dumps({"teacher": teacher_id, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def start_tokens(tokenizer, count: int, seed: int, vocab_size: int | None = None) -> torch.Tensor:
    """The first tokens of ``count`` sequences: the tokenizer's prefix (e.g. BOS), then one token drawn
    uniformly from the non-special vocabulary with ``seed``.

    Args:
        tokenizer: the teacher's tokenizer.
        count: number of sequences.
        seed: seed of the draw.
        vocab_size: the model's embedding rows; ids at or above it are never drawn.

    Returns:
        (count, P) token ids, P = prefix length + 1.
    """
    prefix = list(tokenizer("").input_ids)
    special = set(tokenizer.all_special_ids)
    limit = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    candidates = torch.tensor([i for i in range(limit) if i not in special], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    picks = candidates[torch.randint(len(candidates), (count,), generator=generator)]  # (count,)
    prefixes = torch.tensor([prefix] * count, dtype=torch.long).reshape(count, -1)  # (count, P - 1)
    return torch.cat([prefixes, picks[:, None]], dim=1)


def nucleus_filter(logits: torch.Tensor, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> torch.Tensor:
    """Top-p (nucleus) filtering that sorts only the ``candidates`` most likely tokens of a row.

    Holtzman et al. 2020, https://arxiv.org/abs/1904.09751: keep the smallest set of most likely
    tokens whose probability reaches p. With tokens ranked by probability, v stays iff the mass
    ranked above it is below p::

        keep(v) = sum_{u ranked above v} softmax(z)_u < p

    When a row's ``candidates`` largest probabilities already sum to p or more, every other token
    has at least that mass above it and is dropped, so a top-k gives the same set as a sort of the
    whole vocabulary (which is what dominates a sampling step on a CPU); rows short of p are sorted
    whole.

    Args:
        logits: (B, V) scores, temperature already applied.
        top_p: nucleus mass in (0, 1].
        candidates: tokens per row ranked before falling back to the whole vocabulary.

    Returns:
        (B, V) logits with every dropped token set to -inf.
    """
    if top_p >= 1.0:
        return logits
    probs = logits.float().softmax(-1)  # (B, V)
    top, index = probs.topk(min(candidates, probs.shape[-1]), dim=-1)  # (B, k), descending
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, index, top.cumsum(-1) - top < top_p)
    short = top.sum(-1) < top_p  # (B,)
    if short.any():
        ranked, order = probs[short].sort(dim=-1, descending=True)  # (S, V)
        keep[short] = torch.zeros_like(ranked, dtype=torch.bool).scatter_(1, order,
                                                                         ranked.cumsum(-1) - ranked < top_p)
    return logits.masked_fill(~keep, float("-inf"))


class NucleusSampling(LogitsProcessor):
    """Temperature then :func:`nucleus_filter`, as one ``generate`` logits processor."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return nucleus_filter(scores / self.temperature, self.top_p)  # (B, V)


@torch.no_grad()
def sample_sequences(model: nn.Module, prompts: torch.Tensor, length: int, temperature: float,
                     top_p: float, seed: int, eos_token_id: int | None,
                     batch_size: int) -> torch.Tensor:
    """Continues each prompt by exactly ``length`` sampled tokens (``model.generate``).

    Args:
        model: the teacher.
        prompts: (N, P) token ids.
        length: new tokens per sequence.
        temperature: sampling temperature (> 0).
        top_p: nucleus mass in (0, 1].
        seed: seeds the sampling RNG (forked, so the caller's RNG state is untouched).
        eos_token_id: suppressed until ``length`` tokens are out.
        batch_size: sequences per generate call.

    Returns:
        (N, P + length) token ids on the CPU.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    # temperature and top-p come from NucleusSampling, after generate's own processors (min_new_tokens)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=length, min_new_tokens=length, eos_token_id=eos_token_id,
                              pad_token_id=eos_token_id if eos_token_id is not None else 0, use_cache=True)
    processors = LogitsProcessorList([NucleusSampling(temperature, top_p)])
    cuda = [device.index or 0] if device.type == "cuda" else []
    rows = []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating self data", unit="batch"):
            batch = prompts[start : start + batch_size].to(device)  # (b, P)
            mask = torch.ones_like(batch)
            out = model.generate(input_ids=batch, attention_mask=mask, generation_config=config,
                                 logits_processor=processors)
            rows.append(out[:, : batch.shape[1] + length].cpu())  # (b, P + length)
    return torch.cat(rows)


def _settings(cfg: SelfGenSettings, dtype: str, device: str) -> dict[str, Any]:
    return {"sequences": cfg.self_sequences, "length": cfg.self_length, "temperature": cfg.self_temperature,
            "top_p": cfg.self_top_p, "seed": cfg.self_seed, "batch": cfg.self_batch_size, "dtype": dtype,
            "device_type": torch.device(device).type, "sampler": SAMPLER}


def _read_cache(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor("tokens")
    except (OSError, ValueError, KeyError):
        log.warning("ignoring an unreadable self-data cache file %s", path)
        return None


def _write_cache(path: Path, tokens: torch.Tensor, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.safetensors")
    header = {"settings": json.dumps(meta, sort_keys=True)}
    save_file({"tokens": tokens.contiguous()}, str(tmp), metadata=header)
    os.replace(tmp, path)


def self_generated_tokens(cfg: SelfGenSettings, teacher_name: str | None, dtype: str, device: str,
                          pruned_record: dict | None, student_tokenizer) -> tuple[torch.Tensor, dict]:
    """Returns the (N, P + L) sequences the teacher (``--teacher`` or the record's base model) writes
    in ``dtype`` on ``device`` (from the cache when present), and the record of how they were made."""
    source, _ = resolve_teacher(teacher_name, pruned_record)
    teacher_tokenizer = _teacher_tokenizer(source)
    check_vocabulary(student_tokenizer, teacher_tokenizer, len(student_tokenizer), len(teacher_tokenizer),
                     source.name)
    settings = _settings(cfg, dtype, device)
    teacher_id = source_hash(source) or source.path
    key = selfgen_key(teacher_id, settings)
    path = cache_dir() / "selfgen" / f"{key}.safetensors"
    record = {"source": SELF_DATA, "teacher": source.name, "teacher_hash": teacher_id, **settings,
              "cache_key": key, "cache_file": str(path)}
    tokens = _read_cache(path)
    if tokens is not None:
        log.info("reusing %d self-generated sequences from %s", tokens.shape[0], path)
        return tokens, {**record, "cached": True, "tokens": tokens.numel()}
    start = time.perf_counter()
    teacher = load_teacher(source, None, dtype, device)
    vocab = teacher.get_input_embeddings().weight.shape[0]
    prompts = start_tokens(teacher_tokenizer, cfg.self_sequences, cfg.self_seed, vocab)  # (N, P)
    tokens = sample_sequences(teacher, prompts, cfg.self_length, cfg.self_temperature, cfg.self_top_p,
                              cfg.self_seed, teacher_tokenizer.eos_token_id, cfg.self_batch_size)
    del teacher
    seconds = round(time.perf_counter() - start, 3)
    _write_cache(path, tokens, {**record, "seconds": seconds})
    log.info("generated %d sequences of %d tokens in %.1f s -> %s", tokens.shape[0], cfg.self_length,
             seconds, path)
    return tokens, {**record, "cached": False, "tokens": tokens.numel(), "generation_seconds": seconds}


def _teacher_tokenizer(source: ModelSource):
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as err:
        reason = type(err).__name__
        raise ConfigError("--teacher", f"cannot load the tokenizer of {source.name} ({reason})") from err


def self_training_blocks(tokens: torch.Tensor, block_size: int, max_train: int,
                         max_eval: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Training and held-out blocks of (N, L) self-generated ``tokens``, and their part of the record.

    The held-out tail follows the same rule as for any other text (``data.split_blocks``), so no
    external text is needed at all.

    Returns:
        (train (N, block_size), eval (E, block_size) or None, record)
    """
    blocks = blocks_from_sequences(tokens, block_size)
    train, held_out = split_blocks(blocks, max_train, max_eval)
    record = {"train_blocks": int(train.shape[0]),
              "eval_blocks": 0 if held_out is None else int(held_out.shape[0]), "block_size": block_size}
    return train, held_out, record
