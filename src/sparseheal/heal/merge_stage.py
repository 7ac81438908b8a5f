"""Orchestration of ``sparseheal merge``: the adapter's base and masks -> a masked or dense merge -> a
normal model directory with its record. The merge maths lives in :mod:`sparseheal.heal.merge`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sparseheal.cards import write_card
from sparseheal.checks import (
    MASKS_FILE,
    check_free_space,
    check_model_dir,
    check_not_an_input,
    check_output,
    check_pickle,
    check_weight_files,
)
from sparseheal.data import eval_tokens, protected_inputs
from sparseheal.errors import ConfigError
from sparseheal.heal.adapters import apply_adapter, check_adapter_base, check_adapter_shapes, model_masks
from sparseheal.heal.merge import MergeSettings, save_merged
from sparseheal.models import (
    ComputeSettings,
    TrustSettings,
    check_positions,
    load_config,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_source,
    weights_bytes,
)
from sparseheal.records import Stopwatch, atomic_dir, peak_rss_mb, read_record, write_record
from sparseheal.sources import non_finite_weights
from sparseheal.sparsity.store import carry_input_orders, check_masks_hold, check_own_masks, weights_hash

__all__ = ["preflight_merge", "run_merge", "merge_record"]


def _check_linear_adapter(adapter: str) -> None:
    """Refuses an adapter on parameters (PEFT's ``target_parameters``, such as fused expert tensors):
    only adapters on linear layers merge here, with the mask kept."""
    try:
        config = json.loads((Path(adapter).expanduser() / "adapter_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("ADAPTER_DIR", f"{adapter}/adapter_config.json is not readable JSON "
                                         f"({type(err).__name__})") from err
    targets = config.get("target_parameters") if isinstance(config, dict) else None
    if targets:
        named = ", ".join(map(str, targets))[:80]
        raise ConfigError("ADAPTER_DIR", f"{adapter} adapts parameters ({named}), such as fused expert "
                                         "tensors; only adapters on linear layers merge keeping the sparsity")


def _check_finite_adapter(adapter: str) -> None:
    """Refuses an adapter holding NaN or inf: merged, it would write them into the model's weights."""
    bad, first = non_finite_weights(Path(adapter).expanduser(), "adapter_model")
    if bad:
        raise ConfigError("ADAPTER_DIR", f"{adapter} holds {bad} weights that are not finite (NaN or inf, "
                                         f"{first} first); merging would write them into the model")


def preflight_merge(adapter: str, output: str, overwrite: bool, settings: MergeSettings,
                    allow_pickle: bool, data_dir: str | None) -> tuple[str, torch.Tensor | None]:
    """Every check of the merge before any weights load; returns the base directory and the (W, T)
    comparison windows (None when ``--eval-windows 0``)."""
    if not (Path(adapter).expanduser() / "adapter_config.json").is_file():
        raise ConfigError("ADAPTER_DIR", f"{adapter} is not a PEFT adapter directory "
                                         "(no adapter_config.json)")
    _check_linear_adapter(adapter)
    if settings.base is not None:
        check_model_dir(settings.base, "--base")
    check_output(output, overwrite)
    base = settings.base or (read_record(adapter, "ADAPTER_DIR") or {}).get("base_path")
    check_not_an_input(output, [("ADAPTER_DIR", adapter), ("--base", base), *protected_inputs(data_dir)])
    check_pickle(base, allow_pickle)
    check_pickle(adapter, allow_pickle, "adapter_model")
    check_free_space(output, weights_bytes(base) if base else None, "the size of the base's weights")
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError("--base", f"the adapter's record names no usable base ({base}); pass --base DIR")
    check_adapter_base(adapter, base, "--base")
    check_own_masks(resolve_source(base).path, "--base")
    check_weight_files(base, "--base")
    if (Path(resolve_source(base).path) / MASKS_FILE).is_file():  # the masks prune only zero weights
        check_masks_hold(resolve_source(base).path, Path(resolve_source(base).path) / MASKS_FILE, "--base")
    check_weight_files(adapter, "ADAPTER_DIR", stem="adapter_model")
    check_adapter_shapes(adapter, model_skeleton(base), "ADAPTER_DIR")
    _check_finite_adapter(adapter)
    windows = _merge_windows(base, settings, data_dir) if settings.eval_windows else None
    return base, windows


def run_merge(adapter: str, output: str, overwrite: bool, settings: MergeSettings, compute: ComputeSettings,
              trust: TrustSettings, data_dir: str | None) -> Path:
    """Merges ``adapter`` into its base (see ``sparseheal.api.merge``); returns the output."""
    base_dir, windows = preflight_merge(adapter, output, overwrite, settings, trust.allow_pickle, data_dir)
    source = resolve_source(base_dir)
    watch = Stopwatch()
    with watch("load"):
        lm, tokenizer, _ = load_model(base_dir, compute.dtype, compute.device, trust.trust_remote_code,
                                      trust.allow_pickle, flag="--base")
    masks, mask_source = model_masks(lm, source.path, "--base", packed=True)
    peft_model = apply_adapter(lm, adapter, base_dir, trust.allow_pickle)
    with atomic_dir(output, overwrite) as tmp, watch("merge"):
        stats = save_merged(peft_model, tokenizer, masks, settings.mode, tmp, windows, settings.eval_data)
        carry_input_orders(source.path, tmp / MASKS_FILE)
        base_hash = weights_hash(source.path)
        record = merge_record(read_record(source.path), stats, source, base_hash, adapter, mask_source)
        write_record(tmp, {**record, "weights_hash": weights_hash(tmp), "timings": watch.times,
                           "previous": read_record(adapter) or {}})
        write_card(tmp, name=Path(output).name)
    return Path(output)


def merge_record(base_record: dict | None, stats: dict, source, base_hash: str, adapter: str,
                 mask_source: str) -> dict:
    """The record of a merged model: the base's pruning facts, the merge statistics, provenance."""
    keys = ("method", "pattern", "sparsity", "calibration")
    keep = {k: v for k, v in (base_record or {}).items() if k in keys}
    return {"stage": "merge", **keep, "merge": stats, "masks_from": mask_source, "base_model": source.name,
            "base_path": str(Path(source.path).resolve()), "base_hash": base_hash, "adapter": str(adapter),
            "sparsity_achieved": stats["sparsity_after"], "peak_rss_mb": round(peak_rss_mb(), 1)}


def _merge_windows(base: str, settings: MergeSettings, data_dir: str | None) -> torch.Tensor:
    """The first ``--eval-windows`` windows of ``--eval-data`` for the unmerged/merged comparison."""
    source = resolve_source(base)
    config = load_config(source)
    seqlen = settings.eval_seqlen or min(1024, check_positions(config, 1, "--eval-seqlen") or 1024)
    check_positions(config, seqlen, "--eval-seqlen")
    tokens = eval_tokens(settings.eval_data, load_tokenizer(source), seqlen, data_dir)  # (1, N)
    n = min(settings.eval_windows, tokens.shape[1] // seqlen)
    if n == 0:
        raise ConfigError("--eval-seqlen", f"{seqlen} is longer than the {settings.eval_data} stream")
    return tokens[0, : n * seqlen].reshape(n, seqlen)  # (W, T)
