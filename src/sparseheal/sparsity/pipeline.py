"""The prune stage's work, after its preflight: calibration tokens -> the dense model -> the layer-by-layer
driver -> the pruned model, its masks and its record, written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sparseheal.cards import write_card
from sparseheal.checks import MASKS_FILE
from sparseheal.data import calibration_samples, load_documents
from sparseheal.errors import ConfigError
from sparseheal.layout import describe_families, family_table, masked_weight, model_weights
from sparseheal.models import (
    ComputeSettings,
    TrustSettings,
    default_device,
    default_dtype,
    load_model,
    load_tokenizer,
    resolve_source,
    save_model,
    source_hash,
)
from sparseheal.records import Stopwatch, atomic_dir, peak_rss_mb, read_record, write_record
from sparseheal.settings import Settings
from sparseheal.sparsity.base import PruneSettings
from sparseheal.sparsity.calibrate import CalibrationSettings, prune_model
from sparseheal.sparsity.dsnot import RefineSettings, refined
from sparseheal.sparsity.masks import sparsity_of
from sparseheal.sparsity.owl import LayerSparsitySettings, layer_outlier_ratios, owl_sparsities
from sparseheal.sparsity.parking import parking_for
from sparseheal.sparsity.store import save_masks, weights_hash

__all__ = ["calibration_tokens", "run_prune"]

log = logging.getLogger(__name__)


def calibration_tokens(model: str, calibration: CalibrationSettings, data_dir: str | None) -> torch.Tensor:
    """Draws the (nsamples, seqlen) calibration windows with the tokenizer alone, before any weights load."""
    tokenizer = load_tokenizer(resolve_source(model))
    docs = load_documents(calibration.calibration_data, "train", data_dir, "--calibration-data")
    return calibration_samples(docs, tokenizer, calibration.nsamples, calibration.seqlen, calibration.seed)


def _layer_sparsity(lm, tokens, how: PruneSettings, spread: LayerSparsitySettings, batch_size: int,
                    device: str, watch: Stopwatch) -> tuple[list[float] | None, dict]:
    """Per-layer sparsities (None for uniform) and what the record says of them."""
    if spread.layer_sparsity != "owl":
        return None, {"mode": "uniform"}
    with watch("owl_statistics"):  # the extra dense pass over the calibration samples
        ratios, sizes = layer_outlier_ratios(lm, tokens, spread.owl_m, batch_size, device)
    try:
        sparsities = owl_sparsities(ratios, sizes, how.sparsity, spread.owl_lambda)
    except ValueError as err:  # the pure maths says what; the stage names the flag
        raise ConfigError("--owl-lambda", f"{err}; lower --owl-lambda") from None
    log.info("owl: layer sparsities %.3f .. %.3f (outlier ratios %.4f .. %.4f)", min(sparsities),
             max(sparsities), min(ratios), max(ratios))
    return sparsities, {"mode": "owl", "m": spread.owl_m, "lambda": spread.owl_lambda,
                        "outlier_ratios": [round(r, 6) for r in ratios], "layer_params": sizes,
                        "sparsities": [round(x, 6) for x in sparsities]}


def _partial_groups(lm, nm: tuple[int, int] | None) -> dict | None:
    """The weights whose inputs do not split into whole groups of M, and the rule they were pruned by."""
    if nm is None:
        return None
    weights = [k for k, w in model_weights(lm).items() if w.matrix(0 if w.experts else None).shape[1] % nm[1]]
    return {"rule": f"the trailing group of fewer than {nm[1]} inputs of each row keeps at most {nm[0]}",
            "weights": weights} if weights else None


def _prune_record(model: str, how: PruneSettings, calibration: CalibrationSettings, options: Settings | None,
                  source, lm, masks: dict, watch: Stopwatch, unreached: dict[str, list[int]]) -> dict:
    layers = {name: round(sparsity_of(masked_weight(lm, name).param), 6) for name in masks}
    kept = {name: m.kept() for name, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = total - sum(kept.values())
    record = {
        "stage": "prune",
        "base_model": model,
        "base_path": source.path,
        "base_hash": source_hash(source),
        "method": how.method,
        "pattern": how.pattern,
        "sparsity": how.sparsity,
        "calibration": calibration.spec() if how.pruner.needs_calibration else None,  # unused: not recorded
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        "sparsity_achieved": round(pruned / max(total, 1), 6),
        "pruned_parameters": pruned,
        "prunable_parameters": total,
        "layers": layers,
        "families": family_table(lm, kept),  # the decoder layers' parameters by family, pruned or dense
        "unreached_experts": {"rule": "pooled statistics of the tensor's reached experts",
                              "experts": unreached} if unreached else None,
        "routers": "dense (routers and gates output routing or gating scalars)",
        "partial_groups": _partial_groups(lm, how.nm),
        "timings": watch.times,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "previous": read_record(source.path) if source.kind == "local" else None,
    }
    if options is not None:
        record["options"] = options.values()
    return record


def run_prune(model: str, output: str, overwrite: bool, how: PruneSettings, calibration: CalibrationSettings,
              options: Settings | None, refine: RefineSettings, spread: LayerSparsitySettings,
              compute: ComputeSettings,
              trust: TrustSettings, data_dir: str | None) -> Path:
    """Prunes ``model`` and writes ``output`` (see ``sparseheal.api.prune``); returns the output."""
    watch = Stopwatch()
    tokens = None
    if how.pruner.needs_calibration:  # first, so that data that cannot serve fails before the weights load
        with watch("calibration_data"):
            tokens = calibration_tokens(model, calibration, data_dir)
    with watch("load"):
        device = compute.device or default_device()
        lm, tokenizer, source = load_model(model, compute.dtype or default_dtype(device),
                                           "cpu" if how.offload else device, trust.trust_remote_code,
                                           trust.allow_pickle)
    batch = calibration.calibration_batch_size
    ratios, spread_record = _layer_sparsity(lm, tokens, how, spread, batch, device, watch)
    park = None  # finished layers go to disk where calibration activations share the memory with them
    if how.pruner.needs_calibration:
        model_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        park = parking_for(output, model_bytes, torch.device("cpu" if how.offload else device))
    unreached: dict[str, list[int]] = {}
    orders: dict[str, torch.Tensor] = {}
    with watch("prune"):
        pruner = refined(how.pruner, refine) if refine.refine == "dsnot" else how.pruner
        masks = prune_model(lm, pruner, tokens, how.nm, how.sparsity, calibration.calibration_batch_size,
                            device, offload=how.offload, options=options, layer_sparsity=ratios, park=park,
                            unreached=unreached, input_orders=orders)
    record = {**_prune_record(model, how, calibration, options, source, lm, masks, watch, unreached),
              "layer_sparsity": spread_record}
    if refine.refine != "none":
        record["refine"] = refine.values()
    if orders:
        record["input_orders"] = (f"N:M along a permuted input order for {len(orders)} weights: "
                                  f"input_order/KEY tensors in {MASKS_FILE}")
    with atomic_dir(output, overwrite) as tmp:
        save_model(lm, tokenizer, tmp)
        record["weights_hash"] = weights_hash(tmp)  # the masks belong to these weights (checked on load)
        save_masks(masks, tmp / MASKS_FILE, {"base_hash": record["base_hash"], "pattern": how.pattern,
                                             "weights_hash": record["weights_hash"]}, orders)
        write_record(tmp, record)
        write_card(tmp, name=Path(output).name)
    log.info("pruned %s with %s (%s) -> %s: %.2f%% of the %d weights it pruned are zero (%s)", model,
             how.method, how.pattern, output, 100 * record["sparsity_achieved"],
             record["prunable_parameters"], describe_families(record["families"]))
    return Path(output)
