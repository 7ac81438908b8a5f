"""Orchestration of ``sparseheal heal`` and ``sparseheal merge`` from validated settings.

``run_heal``: checks against the model's structure -> training blocks (or teacher-written text) ->
the pruned model and its masks -> the healer's trainable module (+ a distiller) -> the shared Trainer
set-up -> rank 0 writes the output atomically with its record (and a merged model when asked).
``run_merge``: the adapter's base and masks -> a masked or dense merge -> a normal model directory.
The maths lives in the healer, distillation and merge modules; this module only wires them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sparseheal.config import ConfigError
from sparseheal.data import eval_tokens
from sparseheal.heal.settings import HealConfig, MergeConfig
from sparseheal.models import load_model, load_tokenizer, max_positions, resolve_source
from sparseheal.records import MASKS_FILE, Stopwatch, atomic_dir, peak_rss_mb, read_record, write_record
from sparseheal.registry import HEALERS
from sparseheal.sparsity.store import check_own_masks, stamp_masks, weights_hash

__all__ = ["run_heal", "run_merge"]

log = logging.getLogger(__name__)


def run_heal(cfg: HealConfig) -> Path:
    """Heals ``cfg.pruned_dir`` into ``cfg.output`` (see ``sparseheal.api.heal``); returns the output."""
    from sparseheal.heal import trainer
    from sparseheal.heal.adapters import model_masks

    watch = Stopwatch()
    source = resolve_source(cfg.pruned_dir)
    healer = HEALERS.get(cfg.method)()
    _check_model_fits(source.path, cfg, healer)
    check_own_masks(source.path, "PRUNED_DIR")
    pruned_record = read_record(source.path)
    if cfg.distill:  # an unresolvable teacher fails here, before data and weights load
        from sparseheal.heal.distill import resolve_teacher

        resolve_teacher(cfg.teacher, pruned_record)
    with watch("data"):
        train_blocks, eval_blocks, data_record = _training_data(cfg, source, pruned_record)
    with watch("load"):
        lm, tokenizer = _load_student(cfg, source)
    packed = cfg.method == "lora" and not cfg.fsdp  # LoRA needs one layer's mask at a time
    masks, mask_source = model_masks(lm, source.path, "PRUNED_DIR", packed)
    if cfg.fsdp:  # masks read off a sharded model's zeros (no masks file) are gathered whole
        from sparseheal.heal.fsdp import full_masks

        masks = full_masks(masks)
    student = healer.prepare(lm, masks, cfg)
    distiller = None
    if cfg.distill:
        from sparseheal.heal.distill import build_distiller

        distiller = build_distiller(cfg, student, pruned_record)
    callbacks = healer.callbacks() if hasattr(healer, "callbacks") else None
    with watch("train"):
        summary = trainer.train(student, train_blocks, eval_blocks, cfg, cfg.checkpoint_dir,
                                distiller=distiller, callbacks=callbacks)
    student = _writer_model(student, cfg)
    if student is None:  # another rank writes
        return Path(cfg.output)
    context = {"source": source, "pruned_record": pruned_record, "masks": masks, "mask_source": mask_source,
               "eval_blocks": eval_blocks, "data_record": data_record, "summary": summary}
    _write_heal_output(cfg, healer, student, tokenizer, context, watch)
    if not cfg.save_steps:
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    log.info("healed %s with %s -> %s", cfg.pruned_dir, cfg.method, cfg.output)
    return Path(cfg.output)


def _training_data(cfg: HealConfig, source, pruned_record: dict | None) -> tuple[Any, Any, dict]:
    """Training and held-out blocks (N, T), and what the record says about them."""
    from sparseheal.heal.trainer import heal_blocks

    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    self_record: dict = {}
    if cfg.data == "self":  # text written by the dense teacher (heal/selfgen.py), cached
        from sparseheal.heal.selfgen import self_training_blocks

        train_blocks, eval_blocks, self_record = self_training_blocks(cfg, pruned_record, tokenizer)
    else:
        train_blocks, eval_blocks = heal_blocks(cfg, tokenizer)
    record = {"source": cfg.data, "block_size": cfg.block_size, "train_blocks": len(train_blocks),
              "eval_blocks": 0 if eval_blocks is None else len(eval_blocks), **self_record}
    return train_blocks, eval_blocks, record


def _load_student(cfg: HealConfig, source) -> tuple[torch.nn.Module, Any]:
    """The pruned model: whole on ``cfg.device``, or each rank's shard under ``--fsdp``."""
    if cfg.fsdp:  # each rank loads and keeps only its shard (heal/fsdp.py)
        from sparseheal.heal.fsdp import load_sharded

        return load_sharded(cfg.pruned_dir, cfg.dtype), load_tokenizer(source)
    lm, tokenizer, _ = load_model(cfg.pruned_dir, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                  cfg.allow_pickle)
    return lm, tokenizer


def _writer_model(student: torch.nn.Module, cfg: HealConfig) -> torch.nn.Module | None:
    """The model rank 0 writes; None on the other ranks of a distributed run."""
    if cfg.fsdp:  # every rank takes part in gathering the shards; rank 0 gets the full model
        from sparseheal.heal.fsdp import unshard_for_save

        return unshard_for_save(student)
    return student if _is_main_process(student) else None


def _write_heal_output(cfg: HealConfig, healer, student, tokenizer, ctx: dict, watch: Stopwatch) -> None:
    """Writes the healed artifacts, the loss log, the merged model (when asked) and the record."""
    from sparseheal.heal.trainer import LOG_FILE

    source, masks = ctx["source"], ctx["masks"]
    base_hash = weights_hash(source.path)  # cached: the masks check hashed it
    with atomic_dir(cfg.output, cfg.overwrite) as tmp, watch("save"):
        extra = {"masks_from": ctx["mask_source"], **healer.save(student, tokenizer, tmp, masks, cfg)}
        if (tmp / MASKS_FILE).is_file():  # masks saved beside trained weights name those weights
            extra["weights_hash"] = weights_hash(tmp)
            stamp_masks(tmp / MASKS_FILE, extra["weights_hash"])
        shutil.copyfile(cfg.checkpoint_dir / LOG_FILE, tmp / LOG_FILE)
        if cfg.merge != "none":
            extra["merged"] = _merge_after_heal(cfg, student, tokenizer, ctx, tmp, base_hash)
        record = _heal_record(cfg, source, ctx, extra, watch, base_hash)
        write_record(tmp, record)


def _merge_after_heal(cfg: HealConfig, student, tokenizer, ctx: dict, tmp: Path, base_hash: str) -> dict:
    """``heal --merge``: the merged model in OUTPUT/merged, compared on held-out blocks."""
    from sparseheal.heal.merge import MERGE_EVAL_WINDOWS, save_merged

    eval_blocks = ctx["eval_blocks"]
    windows = None if eval_blocks is None else eval_blocks[:MERGE_EVAL_WINDOWS]
    merged = save_merged(student, tokenizer, ctx["masks"], cfg.merge, tmp / "merged", windows, "held-out")
    record = _merge_record(ctx["pruned_record"], merged, ctx["source"], base_hash, cfg.output,
                           ctx["mask_source"])
    write_record(tmp / "merged", {**record, "weights_hash": weights_hash(tmp / "merged")})
    return {"path": "merged", **merged}


def _heal_record(cfg: HealConfig, source, ctx: dict, extra: dict, watch: Stopwatch, base_hash: str) -> dict:
    summary = dict(ctx["summary"])
    history = summary.pop("log_history")
    pruned_record = ctx["pruned_record"]
    return {
        "stage": "heal",
        "method": cfg.method,
        "base_model": cfg.pruned_dir,
        "base_path": str(Path(source.path).resolve()),
        "base_hash": base_hash,
        "dense_model": (pruned_record or {}).get("base_model"),
        "recipe": asdict(cfg),
        "data": ctx["data_record"],
        **summary,
        "log_entries": len(history),
        **extra,
        "timings": watch.times,
        "wall_seconds": round(sum(watch.times.values()), 3),
        "previous": pruned_record,
    }


def _is_main_process(model: torch.nn.Module) -> bool:
    """True on rank 0 (or without torch.distributed); every rank logs a digest of its trained weights,
    so a data-parallel run can show that all ranks ended identical."""
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        digest = hashlib.sha256()
        for name, param in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        log.info("rank %d: trained weights sha256 %s", rank, digest.hexdigest()[:16])
    return rank == 0


def _check_model_fits(model_path: str, cfg: HealConfig, healer) -> None:
    """Checks the recipe against the model's structure (a weightless skeleton) before any heavy work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code)
    positions = max_positions(config)
    if positions is not None and cfg.block_size > positions:
        raise ConfigError("--block-size", f"{cfg.block_size} exceeds the model's {positions} positions")
    if hasattr(healer, "validate"):
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
        healer.validate(skeleton, cfg)


def run_merge(cfg: MergeConfig) -> Path:
    """Merges ``cfg.adapter`` into its base (see ``sparseheal.api.merge``); returns the output."""
    from sparseheal.heal.adapters import apply_adapter, check_adapter_base, model_masks
    from sparseheal.heal.merge import save_merged

    adapter_record = read_record(cfg.adapter) or {}
    base_dir = cfg.base or adapter_record.get("base_path")
    if not base_dir or not (Path(base_dir) / "config.json").is_file():
        raise ConfigError("--base", f"the adapter's record names no usable base ({base_dir}); "
                                    "pass --base DIR")
    check_adapter_base(cfg.adapter, base_dir, "--base")
    source = resolve_source(base_dir)
    check_own_masks(source.path, "--base")
    windows = _merge_windows(cfg, source) if cfg.eval_windows else None
    watch = Stopwatch()
    with watch("load"):
        lm, tokenizer, _ = load_model(base_dir, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                      cfg.allow_pickle)
    masks, mask_source = model_masks(lm, source.path, "--base", packed=True)
    peft_model = apply_adapter(lm, cfg.adapter, base_dir, cfg.allow_pickle)
    with atomic_dir(cfg.output, cfg.overwrite) as tmp, watch("merge"):
        stats = save_merged(peft_model, tokenizer, masks, cfg.mode, tmp, windows, cfg.eval_data)
        base_hash = weights_hash(source.path)
        record = _merge_record(read_record(source.path), stats, source, base_hash, cfg.adapter, mask_source)
        write_record(tmp, {**record, "weights_hash": weights_hash(tmp), "timings": watch.times,
                           "previous": adapter_record})
    return Path(cfg.output)


def _merge_record(base_record: dict | None, stats: dict, source, base_hash: str, adapter: str,
                  mask_source: str) -> dict:
    """The record of a merged model: the base's pruning facts, the merge statistics, provenance."""
    keys = ("method", "pattern", "sparsity", "calibration")
    keep = {k: v for k, v in (base_record or {}).items() if k in keys}
    return {"stage": "merge", **keep, "merge": stats, "masks_from": mask_source, "base_model": source.name,
            "base_path": str(Path(source.path).resolve()), "base_hash": base_hash, "adapter": str(adapter),
            "sparsity_achieved": stats["sparsity_after"], "peak_rss_mb": round(peak_rss_mb(), 1)}


def _merge_windows(cfg: MergeConfig, source) -> torch.Tensor:
    """The first ``--eval-windows`` windows of ``--eval-data`` for the unmerged/merged comparison."""
    from transformers import AutoConfig

    positions = max_positions(AutoConfig.from_pretrained(source.path)) or 1024
    seqlen = cfg.eval_seqlen or min(1024, positions)
    if seqlen > positions:
        raise ConfigError("--eval-seqlen", f"{seqlen} exceeds the model's {positions} positions")
    tokens = eval_tokens(cfg.eval_data, load_tokenizer(source), seqlen, cfg.data_dir)  # (1, N)
    n = min(cfg.eval_windows, tokens.shape[1] // seqlen)
    if n == 0:
        raise ConfigError("--eval-seqlen", f"{seqlen} is longer than the {cfg.eval_data} stream")
    return tokens[0, : n * seqlen].reshape(n, seqlen)  # (W, T)
