"""What a heal writes: the healer's artifacts, the loss log, a merged model when asked, and the record.

Everything goes into a temporary sibling of the output that is renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sparseheal.cards import write_card
from sparseheal.checks import MASKS_FILE
from sparseheal.errors import StageError
from sparseheal.heal.job import HealJob
from sparseheal.heal.merge import MERGE_EVAL_WINDOWS, save_merged
from sparseheal.heal.merge_stage import merge_record
from sparseheal.heal.training import LOG_FILE
from sparseheal.records import Stopwatch, atomic_dir, write_record
from sparseheal.sources import non_finite_weights
from sparseheal.sparsity.store import carry_input_orders, stamp_masks, weights_hash

__all__ = ["write_heal_output", "check_finite_weights"]


def check_finite_weights(directory: Path) -> None:
    """Refuses (before the output is renamed into place) written weights that are not all finite."""
    bad, first = non_finite_weights(directory)
    if bad:
        raise StageError("--lr", f"training left {bad} weights that are not finite (first in {first}); "
                                 "nothing was written: lower --lr or use float32")


def write_heal_output(job: HealJob, student, tokenizer, ctx: dict, watch: Stopwatch) -> None:
    """Writes the healed artifacts, the loss log, the merged model (when asked) and the record."""
    source, masks = ctx["source"], ctx["masks"]
    base_hash = weights_hash(source.path)  # cached: the masks check hashed it
    pattern = (ctx["pruned_record"] or {}).get("pattern", "unstructured")
    with atomic_dir(job.output, job.overwrite) as tmp, watch("save"):
        extra = {"masks_from": ctx["mask_source"], **job.healer.save(student, tokenizer, tmp, masks, pattern)}
        check_finite_weights(tmp)
        if (tmp / MASKS_FILE).is_file():  # masks saved beside trained weights name those weights
            carry_input_orders(source.path, tmp / MASKS_FILE)
            extra["weights_hash"] = weights_hash(tmp)
            stamp_masks(tmp / MASKS_FILE, extra["weights_hash"])
        shutil.copyfile(job.checkpoint_dir / LOG_FILE, tmp / LOG_FILE)
        if job.merge != "none":
            extra["merged"] = _merge_after_heal(job, student, tokenizer, ctx, tmp, base_hash)
            check_finite_weights(tmp / "merged")
        write_record(tmp, _heal_record(job, ctx, extra, watch, base_hash))
        if "merged" in extra:  # the merged copy's card reads the heal's record beside it
            write_card(tmp / "merged")
        write_card(tmp, name=Path(job.output).name)  # replaces the generic card an adapter's save writes


def _merge_after_heal(job: HealJob, student, tokenizer, ctx: dict, tmp: Path, base_hash: str) -> dict:
    """``heal --merge``: the merged model in OUTPUT/merged, compared on held-out blocks."""
    eval_blocks = ctx["eval_blocks"]
    windows = None if eval_blocks is None else eval_blocks[:MERGE_EVAL_WINDOWS]
    merged = save_merged(student, tokenizer, ctx["masks"], job.merge, tmp / "merged", windows, "held-out")
    carry_input_orders(ctx["source"].path, tmp / "merged" / MASKS_FILE)
    record = merge_record(ctx["pruned_record"], merged, ctx["source"], base_hash, job.output,
                          ctx["mask_source"])
    write_record(tmp / "merged", {**record, "weights_hash": weights_hash(tmp / "merged")})
    return {"path": "merged", **merged}


def _heal_record(job: HealJob, ctx: dict, extra: dict, watch: Stopwatch, base_hash: str) -> dict:
    summary = dict(ctx["summary"])
    history = summary.pop("log_history")
    pruned_record = ctx["pruned_record"]
    return {
        "stage": "heal",
        "method": job.healer.name,
        "base_model": job.pruned_dir,
        "base_path": str(Path(ctx["source"].path).resolve()),
        "base_hash": base_hash,
        "dense_model": (pruned_record or {}).get("base_model"),
        "recipe": job.recipe,
        "data": ctx["data_record"],
        **summary,
        "log_entries": len(history),
        **extra,
        "timings": watch.times,
        "wall_seconds": round(sum(watch.times.values()), 3),
        "previous": pruned_record,
    }
