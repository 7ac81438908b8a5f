"""Sparsity inspection: per-weight and total sparsity, N:M conformance, and mask verification.

Every prunable weight of the decoder layers is inspected (linears, and fused expert tensors with each
expert's matrix checked as a linear of its own), plus the weights a masks file names.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sparseheal.layout import MaskedWeight, describe_families, family_table, masked_weight, model_weights
from sparseheal.sparsity.masks import count_violations, detect_nm, sparsity_of
from sparseheal.sparsity.patterns import Pattern, parse
from sparseheal.sparsity.store import check_masks_match, load_input_orders, load_masks, module_rules

__all__ = ["inspect_model"]


def _layer_row(name: str, masked: MaskedWeight, rule: tuple[Pattern, float] | None, mask,
               order: torch.Tensor | None = None) -> dict:
    weight = masked.rows()  # (rows, in): every expert's rows for a fused tensor
    if order is not None:  # N:M along a permuted input order (one per expert for a fused tensor)
        per_expert = order.reshape(-1, order.shape[-1])  # (E or 1, in)
        rows = weight.reshape(per_expert.shape[0], -1, weight.shape[-1])  # (E or 1, out, in)
        weight = torch.cat([r[:, o] for r, o in zip(rows, per_expert, strict=True)])
    found = detect_nm(weight)
    row = {
        "name": name,
        "shape": list(masked.param.shape),
        "sparsity": round(sparsity_of(weight), 6),
        "zeros": int((weight == 0).sum()),
        "numel": weight.numel(),
        "nm_detected": f"{found[0]}:{found[1]}" if found else None,
    }
    if rule is not None:
        row["pattern"] = rule[0].text  # the pattern this weight was pruned to (checked unless unstructured)
    if rule is not None and rule[0].kind != "unstructured":
        pattern, sparsity = rule
        per = weight.shape[0] // (masked.experts or 1)  # each expert's matrix checked alone
        row["nm_violations"] = sum(pattern.violations(part, sparsity) for part in weight.split(per))
    if mask is not None:
        row["mask_violations"] = count_violations(masked.param, mask)
    return row


def inspect_model(model: nn.Module, record: dict | None, masks_file: str | os.PathLike | None) -> dict:
    """Inspects the decoder linears of ``model``.

    Args:
        model: the loaded model.
        record: the model directory's sparseheal.json (its pattern is checked when N:M).
        masks_file: masks to verify bit for bit (every pruned position must be exactly +0.0).

    Returns:
        {"layers": [...], "total_sparsity", "pattern", "nm_violations", "mask_violations", "ok"}
    """
    weights = model_weights(model)
    pattern = (record or {}).get("pattern")
    masks, orders, modules = None, {}, {}
    if masks_file is not None:
        masks, meta = load_masks(masks_file)
        check_masks_match(model, masks, str(masks_file))
        orders, modules = load_input_orders(masks_file), module_rules(meta)
    default = (parse(pattern), float((record or {}).get("sparsity") or 0.0)) \
        if pattern and not modules else None  # a plan's files state each weight's own ("mixed" overall)
    if masks is not None:  # the weights the file names too (checked to exist by check_masks_match)
        weights.update({name: masked_weight(model, name) for name in masks if name not in weights})
    # a file stating each weight's pattern (layout 2) leaves out exactly the weights kept dense
    rows = [_layer_row(name, w, modules.get(name) if modules else default,
                       None if masks is None else masks.get(name), orders.get(name))
            for name, w in weights.items()]
    families = family_table(model, {r["name"]: r["numel"] - r["zeros"] for r in rows})
    zeros, numel = sum(r["zeros"] for r in rows), sum(r["numel"] for r in rows)
    nm_bad = sum(r.get("nm_violations", 0) for r in rows)
    mask_bad = sum(r.get("mask_violations", 0) for r in rows)
    detected = {r["nm_detected"] for r in rows}
    return {
        "layers": rows,
        "total_sparsity": round(zeros / max(numel, 1), 6),
        "pattern": pattern or (detected.pop() if len(detected) == 1 and None not in detected
                               else "unstructured"),
        "nm_violations": nm_bad if any("nm_violations" in r for r in rows) else None,
        "mask_violations": mask_bad if masks is not None else None,
        "masks_file": str(masks_file) if masks_file is not None else None,
        "layer_sparsity": (record or {}).get("layer_sparsity"),  # per decoder layer, as pruned (OWL)
        "families": families,  # the decoder layers' parameters by family: zeros of the inspected weights
        "families_line": describe_families(families),
        "ok": nm_bad == 0 and mask_bad == 0,
    }
