"""The prune stage's work, after its preflight: calibration tokens -> the dense model -> the layer-by-layer
driver -> the pruned model, its masks and its record, written atomically."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sparseheal.cards import write_card
from sparseheal.checks import MASKS_FILE
from sparseheal.data import calibration_samples, load_documents
from sparseheal.errors import ConfigError
from sparseheal.layout import describe_families, family_table, masked_weight, model_weights, weight_layers
from sparseheal.models import (
    ComputeSettings,
    TrustSettings,
    default_device,
    default_dtype,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_source,
    save_model,
    source_hash,
)
from sparseheal.records import Stopwatch, atomic_dir, peak_rss_mb, read_record, write_record
from sparseheal.registry import PRUNERS
from sparseheal.settings import Settings
from sparseheal.sparsity.base import PruneSettings
from sparseheal.sparsity.calibrate import CalibrationSettings, Choice, prune_model
from sparseheal.sparsity.dsnot import RefineSettings, refined
from sparseheal.sparsity.masks import sparsity_of
from sparseheal.sparsity.owl import LayerSparsitySettings, layer_outlier_ratios, owl_sparsities
from sparseheal.sparsity.parking import parking_for
from sparseheal.sparsity.patterns import Pattern
from sparseheal.sparsity.plan import Assignment, Module, assign, ignore_rule, read_plan
from sparseheal.sparsity.store import save_masks, weights_hash

__all__ = ["calibration_tokens", "run_prune", "plan_assignments", "plan_methods"]

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


def plan_assignments(model, how: PruneSettings, options: dict[str, Settings | None],
                     refine: RefineSettings) -> dict[str, Assignment | None] | None:
    """Each prunable weight's method, pattern and ratio (None: dense) under ``--plan`` and ``--ignore``,
    checked against ``model``'s structure (a skeleton will do); None without a plan.

    Args:
        options: each method's built settings group (None for a method without one), by name.
    """
    if not how.plan and not how.ignore:
        _check_fit(model, how.shape)
        return None
    rules, strict = read_plan(how.plan) if how.plan else ([], False)
    if how.ignore:
        rules.insert(0, ignore_rule(how.ignore))
    layers = weight_layers(model)
    modules = {key: Module(w.family, layers[key], *w.matrix(0 if w.experts else None).shape)
               for key, w in model_weights(model).items()}

    def check(method: str, pattern: Pattern, where: str) -> None:
        try:
            cls = PRUNERS.get(method)
            cls.check_pattern(options.get(cls.name), pattern)
            refine.check_method(cls.name, cls.needs_calibration, pattern.kind)
        except ConfigError as err:
            raise ConfigError("--plan", f"{where}: {err.flag}: {err.message}") from None

    default = Assignment(how.method, how.shape, how.sparsity, "the command's flags")
    return assign(rules, modules, default, strict, check)


def plan_methods(how: PruneSettings) -> set[str]:
    """The methods a plan's rules name (read from the file alone), besides ``--method``."""
    if not how.plan:
        return set()
    names = {rule.method for rule in read_plan(how.plan)[0] if rule.method}
    try:
        return {PRUNERS.canonical(name) for name in names}
    except ConfigError as err:
        raise ConfigError("--plan", err.message) from None


def _check_fit(model, pattern: Pattern) -> None:
    """Refuses a pattern some prunable weight's shape cannot take (V:N:M blocks, tiles)."""
    for key, w in model_weights(model).items():
        out_features, in_features = w.matrix(0 if w.experts else None).shape
        if (why := pattern.misfit(out_features, in_features)) is not None:
            raise ConfigError("--pattern", f"{key} is {out_features}x{in_features}: {why}; keep it dense "
                                           "with --ignore or give it another pattern in a --plan")


def _choices(assignments: dict[str, Assignment | None] | None, options: dict[str, Settings | None],
             refine: RefineSettings, seqlen: int) -> dict[str, Choice | None] | None:
    """The driver's choices for a plan's assignments (each method's pruner, refined when asked)."""
    if assignments is None:
        return None
    classes = {}
    for a in assignments.values():
        if a is not None and a.method not in classes:
            cls = PRUNERS.get(a.method)
            classes[a.method] = refined(cls, refine, seqlen) if refine.refine == "dsnot" else cls
    return {key: None if a is None else Choice(classes[a.method], options.get(a.method), a.pattern,
                                               a.sparsity) for key, a in assignments.items()}


def _module_layout(used: dict[str, Choice], assignments: dict[str, Assignment | None] | None) -> dict:
    """Each pruned weight's method, pattern (with its N, M, V, tile, axis) and sparsity, as the masks
    file and the record state them."""
    rules = {k: a.rule for k, a in (assignments or {}).items() if a is not None}
    return {key: {"method": c.pruner.name, **c.pattern.meta(), "sparsity": c.sparsity,
                  "rule": rules.get(key, "the command's flags")} for key, c in used.items()}


def _partial_groups(lm, layout: dict) -> dict | None:
    """The weights pruned to N:M whose inputs do not split into whole groups of M, and the rule they
    were pruned by."""
    weights = model_weights(lm)
    partial = {key: (e["n"], e["m"]) for key, e in layout.items() if e.get("kind") == "nm"
               and weights[key].matrix(0 if weights[key].experts else None).shape[1] % e["m"]}
    if not partial:
        return None
    rules = sorted(set(partial.values()))
    rule = "; ".join(f"the trailing group of fewer than {m} inputs of each row keeps at most {n}"
                     for n, m in rules)
    return {"rule": rule, "weights": list(partial)}


def _overall(layout: dict, field: str, flags: str) -> str:
    """The pattern (or method) every pruned weight got, ``mixed`` when a plan gave them several (each
    weight's is in the masks file and the record's plan), the flags' when nothing was pruned."""
    found = {entry[field] for entry in layout.values()}
    return found.pop() if len(found) == 1 else ("mixed" if found else flags)


def _prune_record(model: str, how: PruneSettings, calibration: CalibrationSettings, options: Settings | None,
                  source, lm, masks: dict, watch: Stopwatch, unreached: dict[str, list[int]],
                  calibrated: bool, layout: dict) -> dict:
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
        "pattern": _overall(layout, "pattern", how.pattern),
        "sparsity": how.sparsity,
        "calibration": calibration.spec() if calibrated else None,  # unused: not recorded
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        "sparsity_achieved": round(pruned / max(total, 1), 6),
        "pruned_parameters": pruned,
        "prunable_parameters": total,
        "layers": layers,
        "families": family_table(lm, kept),  # the decoder layers' parameters by family, pruned or dense
        "unreached_experts": {"rule": "pooled statistics of the tensor's reached experts",
                              "experts": unreached} if unreached else None,
        "routers": "dense (routers and gates output routing or gating scalars)",
        "partial_groups": _partial_groups(lm, layout),
        "timings": watch.times,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "previous": read_record(source.path) if source.kind == "local" else None,
    }
    if options is not None:
        record["options"] = options.values()
    return record


def run_prune(model: str, output: str, overwrite: bool, how: PruneSettings, calibration: CalibrationSettings,
              options: Settings | None, refine: RefineSettings, spread: LayerSparsitySettings,
              compute: ComputeSettings, trust: TrustSettings, data_dir: str | None,
              method_options: dict[str, Settings | None] | None = None) -> Path:
    """Prunes ``model`` and writes ``output`` (see ``sparseheal.api.prune``); returns the output.

    ``method_options`` holds each method's settings for the methods a plan names (``options`` is the
    chosen method's)."""
    watch = Stopwatch()
    method_options = {how.method: options, **(method_options or {})}
    assignments = plan_assignments(model_skeleton(model, trust.trust_remote_code), how, method_options,
                                   refine) if how.plan or how.ignore else None
    calibrated = how.pruner.needs_calibration or any(
        PRUNERS.get(a.method).needs_calibration for a in (assignments or {}).values() if a is not None)
    tokens = None
    if calibrated:  # first, so that data that cannot serve fails before the weights load
        with watch("calibration_data"):
            tokens = calibration_tokens(model, calibration, data_dir)
    with watch("load"):
        device = compute.device or default_device()
        lm, tokenizer, source = load_model(model, compute.dtype or default_dtype(device),
                                           "cpu" if how.offload else device, trust.trust_remote_code,
                                           trust.allow_pickle)
    ratios, spread_record = _layer_sparsity(lm, tokens, how, spread, calibration.calibration_batch_size,
                                            device, watch)
    park = None  # finished layers go to disk where calibration activations share the memory with them
    if calibrated:
        model_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
        park = parking_for(output, model_bytes, torch.device("cpu" if how.offload else device))
    unreached: dict[str, list[int]] = {}
    orders: dict[str, torch.Tensor] = {}
    used: dict[str, Choice] = {}
    with watch("prune"):
        pruner = refined(how.pruner, refine, calibration.seqlen) if refine.refine == "dsnot" else how.pruner
        masks = prune_model(lm, pruner, tokens, how.shape, how.sparsity, calibration.calibration_batch_size,
                            device, offload=how.offload, options=options, layer_sparsity=ratios, park=park,
                            unreached=unreached, input_orders=orders,
                            choices=_choices(assignments, method_options, refine, calibration.seqlen),
                            used=used)
    layout = _module_layout(used, assignments)
    record = {**_prune_record(model, how, calibration, options, source, lm, masks, watch, unreached,
                              calibrated, layout),
              "layer_sparsity": spread_record, **_extras(how, refine, orders, assignments, lm, layout)}
    with atomic_dir(output, overwrite) as tmp:
        save_model(lm, tokenizer, tmp)
        record["weights_hash"] = weights_hash(tmp)  # the masks belong to these weights (checked on load)
        save_masks(masks, tmp / MASKS_FILE, {"base_hash": record["base_hash"], "pattern": record["pattern"],
                                             "weights_hash": record["weights_hash"], "layout_version": "2",
                                             "modules": json.dumps(layout)}, orders)
        write_record(tmp, record)
        write_card(tmp, name=Path(output).name)
    log.info("pruned %s with %s (%s) -> %s: %.2f%% of the %d weights it pruned are zero (%s)", model,
             how.method, how.pattern, output, 100 * record["sparsity_achieved"],
             record["prunable_parameters"], describe_families(record["families"]))
    return Path(output)


def _extras(how: PruneSettings, refine: RefineSettings, orders: dict, assignments: dict | None, lm,
            layout: dict) -> dict:
    """The record's refinement, input orders and plan (what each weight got, what stayed dense)."""
    extra: dict = {}
    if refine.refine != "none":
        extra["refine"] = refine.values()
    if orders:
        extra["input_orders"] = (f"N:M along a permuted input order for {len(orders)} weights: "
                                 f"input_order/KEY tensors in {MASKS_FILE}")
    if assignments is not None:
        extra["methods"] = sorted({entry["method"] for entry in layout.values()})
        dense = [k for k, a in assignments.items() if a is None]
        weights = model_weights(lm)
        extra["plan"] = {"file": how.plan, "ignore": how.ignore,
                         "modules": {k: layout.get(k, "dense") for k in assignments},
                         "dense": {"modules": len(dense),
                                   "parameters": sum(weights[k].param.numel() for k in dense)}}
    return extra
