"""What each stage record says in a model card ("What was done"): the prune, heal and merge facts of a
record as markdown lines, every number a recorded value written by :func:`number`.

The lines follow the record's content (an ``adapter`` block, a per-layer ``blockwise`` block, the
Trainer's summary), never a method's name. :mod:`sparseheal.cards` assembles the card from them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["number", "pruning_record", "heal_method", "stage_summary", "done_section"]


def number(value: Any) -> str:
    """A recorded value as a card writes it: integers whole, floats to six significant digits,
    booleans as yes/no, a missing value as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def pruning_record(chain: list[dict]) -> dict:
    """The newest record of ``chain`` (oldest first) that says how the weights were pruned."""
    return next((r for r in reversed(chain) if r.get("pattern")), {})


def heal_method(record: dict) -> str | None:
    """The healer a heal record names (a reconstruction heal keeps the pruning method in ``method``)."""
    return record.get("heal_method") or record.get("method")


def _plan_lines(record: dict) -> list[str]:
    """A sparsity plan's lines: its source, what each pattern covered and what stayed dense."""
    plan = record.get("plan")
    if not plan:
        lines = []
    else:
        counts: dict[str, int] = {}
        for got in plan.get("modules", {}).values():
            shown = "dense" if got == "dense" else f"{got['method']} {got['pattern']}"
            counts[shown] = counts.get(shown, 0) + 1
        dense = plan.get("dense") or {}
        lines = [f"- sparsity plan: `{plan.get('file') or '-'}`, ignore `{plan.get('ignore') or '-'}`; "
                 f"weights per choice: {', '.join(f'{k} {v}' for k, v in counts.items())}; "
                 f"{number(dense.get('parameters'))} parameters kept dense (each weight's rule: "
                 "`sparseheal.json`)"]
    if record.get("refine"):
        lines.append(f"- refined with `{record['refine'].get('refine')}` ({record['refine']})")
    return lines


def _prune_lines(record: dict) -> list[str]:
    cal, spread = record.get("calibration"), record.get("layer_sparsity") or {}
    lines = [f"- source model: `{record.get('base_model')}`",
             f"- method: `{record.get('method')}`, pattern `{record.get('pattern')}`, target sparsity "
             f"{number(record.get('sparsity'))}",
             f"- sparsity achieved: {number(record.get('sparsity_achieved'))} "
             f"({number(record.get('pruned_parameters'))} of {number(record.get('prunable_parameters'))} "
             "prunable weights are zero)"]
    if record.get("families"):
        shown = ", ".join(f"{name} {number(row['pruned'])} of {number(row['parameters'])}"
                          + ("" if row["masked"] else " (dense)") for name, row in record["families"].items())
        lines.append(f"- pruned weights by family in the decoder layers (of all parameters): {shown}")
    lines += _plan_lines(record)
    if cal:
        lines.append(f"- calibration: `{cal.get('source')}`, {number(cal.get('nsamples'))} samples of "
                     f"{number(cal.get('seqlen'))} tokens, seed {number(cal.get('seed'))}")
    else:
        lines.append("- calibration: none (the method reads no calibration data)")
    ratios = spread.get("sparsities")
    if ratios:
        lines.append(f"- layer sparsity: `{spread.get('mode')}` (M {number(spread.get('m'))}, lambda "
                     f"{number(spread.get('lambda'))}), from {number(min(ratios))} to {number(max(ratios))} "
                     "per decoder layer")
    else:
        lines.append(f"- layer sparsity: `{spread.get('mode', 'uniform')}` (every decoder layer at the "
                     "target)")
    if record.get("dtype"):
        lines.append(f"- dtype: `{record['dtype']}`")
    return lines


def _training_lines(record: dict) -> list[str]:
    """What a Trainer-based heal trained on, with which settings, and how far."""
    recipe, data = record.get("recipe") or {}, record.get("data") or {}
    lines = [f"- training data: `{data.get('source')}`, block size {number(data.get('block_size'))}, "
             f"training blocks {number(data.get('train_blocks'))}, held-out blocks "
             f"{number(data.get('eval_blocks'))}",
             f"- optimisation: learning rate {number(recipe.get('lr'))}, scheduler "
             f"`{recipe.get('scheduler')}`, warmup steps {number(recipe.get('warmup_steps'))}, weight decay "
             f"{number(recipe.get('weight_decay'))}, batch size {number(recipe.get('batch_size'))}, "
             f"gradient accumulation {number(recipe.get('gradient_accumulation'))}, seed "
             f"{number(recipe.get('seed'))}"]
    adapter = record.get("adapter")
    if isinstance(adapter, dict):
        lines.append(f"- LoRA adapter: rank {number(adapter.get('rank'))}, alpha "
                     f"{number(adapter.get('alpha'))}, dropout {number(adapter.get('dropout'))}, targets "
                     f"`{adapter.get('targets')}`, mask-aware {number(adapter.get('mask_aware'))}; the "
                     "sparse base stays frozen")
    if "train_norms" in record or "train_embeddings" in record:
        lines.append(f"- trains norms: {number(record.get('train_norms'))}, embeddings and output head: "
                     f"{number(record.get('train_embeddings'))}; pruned weights are masked at every step")
    if recipe.get("distill"):
        teacher = recipe.get("teacher") or record.get("dense_model")
        lines.append(f"- distillation: `{recipe['distill']}` from `{teacher}`, temperature "
                     f"{number(recipe.get('temperature'))}, weight {number(recipe.get('distill_alpha'))}")
    else:
        lines.append("- distillation: none")
    return lines + [
        f"- trained: steps {number(record.get('steps'))}, tokens seen {number(record.get('tokens_seen'))}, "
        f"trainable parameters {number(record.get('trainable_parameters'))} of "
        f"{number(record.get('total_parameters'))}",
        f"- loss: first {number(record.get('first_loss'))}, last {number(record.get('final_loss'))}, "
        f"held-out {number(record.get('eval_loss'))} (perplexity {number(record.get('eval_ppl'))})"]


def _layerwise_lines(record: dict, settings: dict) -> list[str]:
    """What a layer-by-layer reconstruction trained on, and each layer's error before and after."""
    cal = record.get("calibration") or {}
    lines = [f"- calibration: `{cal.get('source')}`, {number(cal.get('nsamples'))} samples of "
             f"{number(cal.get('seqlen'))} tokens, seed {number(cal.get('seed'))}",
             f"- per decoder layer: epochs {number(settings.get('epochs'))}, learning rate "
             f"{number(settings.get('lr'))}, batch size {number(settings.get('batch_size'))}, scheduler "
             f"`{settings.get('scheduler')}`", "",
             "| layer | steps | reconstruction MSE before | after |", "|---:|---:|---:|---:|"]
    lines += [f"| {number(row.get('index'))} | {number(row.get('steps'))} | "
              f"{number(row.get('loss_before'))} | {number(row.get('loss_after'))} |"
              for row in settings.get("layers") or []]
    return lines + [""]


def _heal_lines(record: dict) -> list[str]:
    source = record.get("pruned_from") or record.get("base_model")
    lines = [f"- method: `{heal_method(record)}` on `{source}`"]
    layerwise = record.get("blockwise")
    lines += _layerwise_lines(record, layerwise) if isinstance(layerwise, dict) else _training_lines(record)
    check = record.get("mask_verification")
    if isinstance(check, dict):
        lines.append(f"- checked after saving: pruned weights {number(check.get('pruned_parameters'))}, not "
                     f"`+0.0`: {number(check.get('mask_violations'))}, `-0.0`: "
                     f"{number(check.get('negative_zeros'))}")
    merged = record.get("merged")
    if isinstance(merged, dict):
        lines.append(f"- merged copy: `{merged.get('path')}/` (mode `{merged.get('mode')}`, sparsity after "
                     f"{number(merged.get('sparsity_after'))})")
    return lines


def _merge_lines(record: dict) -> list[str]:
    merge = record.get("merge") or {}
    lines = [f"- adapter `{record.get('adapter')}` merged into `{record.get('base_model')}`, mode "
             f"`{merge.get('mode')}`, layers merged {number(merge.get('layers_merged'))}",
             f"- sparsity before {number(merge.get('sparsity_before'))}, after "
             f"{number(merge.get('sparsity_after'))}"]
    check = merge.get("eval")
    if isinstance(check, dict):
        lines.append(f"- check on `{check.get('source')}` text, windows {number(check.get('windows'))} of "
                     f"{number(check.get('seqlen'))} tokens: perplexity with the adapter "
                     f"{number(check.get('ppl_unmerged'))}, merged {number(check.get('ppl_merged'))}")
    return lines


_STAGES = {"prune": ("Prune", _prune_lines), "heal": ("Heal", _heal_lines), "merge": ("Merge", _merge_lines)}


def stage_summary(record: dict) -> str:
    """One clause for the card's first sentence: what the stage of ``record`` did."""
    phrases = {"prune": lambda r: f"pruned with `{r.get('method')}` (`{r.get('pattern')}`)",
               "heal": lambda r: f"healed with `{heal_method(r)}`",
               "merge": lambda r: f"merged (`{(r.get('merge') or {}).get('mode')}`)"}
    phrase = phrases.get(str(record.get("stage")))
    return phrase(record) if phrase else ""


def done_section(chain: list[dict]) -> list[str]:
    """The card's "What was done": one subsection per stage of ``chain`` (oldest first)."""
    lines = ["## What was done", ""]
    for record in chain:
        title, describe = _STAGES.get(str(record.get("stage")), (str(record.get("stage")), None))
        lines += [f"### {title}", "", *(describe(record) if describe else []), ""]
    return lines
