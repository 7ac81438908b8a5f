"""The Python API: ``prune``, ``evaluate`` and ``inspect``, each a short pipeline over the modules.

Every function validates its arguments first (a ConfigError names the bad flag), and stages that
write a directory write it atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sparseheal.config import ConfigError, EvaluateConfig, InspectConfig, PruneConfig
from sparseheal.data import calibration_samples, eval_tokens, load_documents
from sparseheal.evaluate.perplexity import perplexity
from sparseheal.models import load_model, max_positions, save_model, source_hash
from sparseheal.records import MASKS_FILE, Stopwatch, atomic_dir, peak_rss_mb, read_record, write_record

read_record = read_record
from sparseheal.registry import PRUNERS
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.inspection import inspect_model
from sparseheal.sparsity.masks import sparsity_of
from sparseheal.sparsity.store import save_masks

__all__ = ["prune", "evaluate", "inspect"]

log = logging.getLogger(__name__)


def _calibration_tokens(cfg: PruneConfig, lm, tokenizer) -> torch.Tensor:
    limit = max_positions(lm.config)
    if limit is not None and cfg.seqlen > limit:
        raise ConfigError("--seqlen", f"{cfg.seqlen} exceeds the model's {limit} positions")
    docs = load_documents(cfg.calibration_data, "train", cfg.data_dir, "--calibration-data")
    return calibration_samples(docs, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)


def _prune_record(cfg: PruneConfig, source, lm, masks: dict, watch: Stopwatch) -> dict:
    modules = dict(lm.named_modules())
    layers = {name: round(sparsity_of(modules[name].weight), 6) for name in masks}
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "stage": "prune",
        "base_model": cfg.model,
        "base_path": source.path,
        "base_hash": source_hash(source),
        "method": cfg.method,
        "pattern": cfg.pattern,
        "sparsity": cfg.sparsity,
        "calibration": {
            "source": cfg.calibration_data,
            "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen,
            "seed": cfg.seed,
            "batch_size": cfg.calibration_batch_size,
        },
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        "sparsity_achieved": round(pruned / max(total, 1), 6),
        "pruned_parameters": pruned,
        "prunable_parameters": total,
        "layers": layers,
        "timings": watch.times,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "previous": read_record(source.path) if source.kind == "local" else None,
    }


def prune(
    model: str,
    output: str,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calibration_data: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    calibration_batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    data_dir: str | None = None,
) -> Path:
    """Prunes a causal LM and writes a model directory with masks and a record.

    Args:
        model: Hub id, local directory, .gguf file, or smollm2-135m.
        output: directory to write (refused if it exists, unless overwrite).
        method: wanda, sparsegpt or magnitude.
        sparsity: fraction of each linear's weights pruned, in [0, 1) (default 0.5; implied by N:M).
        pattern: unstructured, or N:M such as 2:4 (N of every M consecutive inputs kept).
        calibration_data: c4, wikitext2, ptb, or a local file or directory.
        nsamples: calibration samples.
        seqlen: tokens per calibration sample.
        seed: seed of the calibration draw.
        calibration_batch_size: samples per forward pass through a layer.
        dtype: float32, bfloat16 or float16 (default float32 on CPU, bfloat16 on GPU).
        device: compute device (default cuda when available, else cpu).
        overwrite: replace an existing output directory.
        data_dir: local mirror of the named data sets (default $SPARSEHEAL_DATA_DIR).

    Returns:
        The output directory.
    """
    cfg = PruneConfig(**{k: v for k, v in locals().items()})
    watch = Stopwatch()
    with watch("load"):
        lm, tokenizer, source = load_model(cfg.model, cfg.dtype, cfg.device)
    pruner_cls = PRUNERS.get(cfg.method)
    tokens = None
    if pruner_cls.needs_calibration:
        with watch("calibration_data"):
            tokens = _calibration_tokens(cfg, lm, tokenizer)
    with watch("prune"):
        masks = prune_model(lm, pruner_cls, tokens, cfg.nm, cfg.sparsity, cfg.calibration_batch_size, cfg.device)
    record = _prune_record(cfg, source, lm, masks, watch)
    with atomic_dir(cfg.output, cfg.overwrite) as tmp:
        save_model(lm, tokenizer, tmp)
        save_masks(masks, tmp / MASKS_FILE, {"base_hash": record["base_hash"], "pattern": cfg.pattern})
        write_record(tmp, record)
    log.info("pruned %s with %s (%s) -> %s: %.2f%% of prunable weights are zero", cfg.model, cfg.method,
             cfg.pattern, cfg.output, 100 * record["sparsity_achieved"])
    return Path(cfg.output)


def evaluate(
    model: str,
    adapter: str | None = None,
    dataset: str = "wikitext2",
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    output: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
) -> dict:
    """Measures perplexity with the Wanda protocol on one or more data sets.

    Args:
        model: Hub id, local directory, .gguf file, or smollm2-135m.
        adapter: a PEFT adapter directory to apply to the model.
        dataset: wikitext2, c4, ptb or a local file; several separated by commas.
        seqlen: window length (default min(2048, the model's positions)).
        max_windows: evaluate only the first K windows.
        batch_size: windows per forward pass.
        output: JSON file to write the results to.
        dtype: float32, bfloat16 or float16.
        device: compute device.
        data_dir: local mirror of the named data sets.

    Returns:
        {"model", "adapter", "results": [one dict per data set]}
    """
    cfg = EvaluateConfig(**{k: v for k, v in locals().items()})
    lm, tokenizer, _ = load_model(cfg.model, cfg.dtype, cfg.device)
    if cfg.adapter:
        from sparseheal.heal.adapters import apply_adapter

        lm = apply_adapter(lm, cfg.adapter, cfg.model)
    seqlen = cfg.seqlen or min(2048, max_positions(lm.config) or 2048)
    limit = max_positions(lm.config)
    if limit is not None and seqlen > limit:
        raise ConfigError("--seqlen", f"{seqlen} exceeds the model's {limit} positions")
    results = []
    for name in [d.strip() for d in cfg.dataset.split(",") if d.strip()]:
        tokens = eval_tokens(name, tokenizer, seqlen, cfg.data_dir)
        results.append(perplexity(lm, tokens, name, seqlen, cfg.max_windows, cfg.batch_size).to_dict())
    report = {"model": cfg.model, "adapter": cfg.adapter, "results": results}
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


def inspect(model: str, masks: str | None = None) -> dict:
    """Reports per-layer and total sparsity, the N:M pattern, and mask violations.

    Args:
        model: a model directory (or any model source).
        masks: a masks file to verify against (default: the model's own sparsity_masks.safetensors).

    Returns:
        A report dict; ``report["ok"]`` is False when any check fails.
    """
    cfg = InspectConfig(model=model, masks=masks)
    lm, _, source = load_model(cfg.model, dtype=None, device="cpu")
    masks_file = cfg.masks or (Path(source.path) / MASKS_FILE)
    masks_file = masks_file if Path(masks_file).is_file() else None
    return inspect_model(lm, read_record(source.path), masks_file)
