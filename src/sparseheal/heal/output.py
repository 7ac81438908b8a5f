"""What a heal writes: the healer's artifacts, the loss log, a merged model when asked, and the record.

Everything goes into a temporary sibling of the output that is renamed into place when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from sparseheal.checks import MASKS_FILE
from sparseheal.errors import StageError
from sparseheal.heal.job import HealJob
from sparseheal.heal.merge import MERGE_EVAL_WINDOWS, save_merged
from sparseheal.heal.merge_stage import merge_record
from sparseheal.heal.trainer import LOG_FILE
from sparseheal.records import Stopwatch, atomic_dir, write_record
from sparseheal.sparsity.store import stamp_masks, weights_hash

__all__ = ["write_heal_output", "write_blockwise_output", "check_finite_weights"]


def check_finite_weights(directory: Path) -> None:
    """Refuses (before the output is renamed into place) written weights that are not all finite."""
    bad, first = 0, None
    for path in sorted(directory.glob("*.safetensors")):
        if path.name == MASKS_FILE:
            continue
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                count = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
                bad += count
                first = first or (name if count else None)
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
            extra["weights_hash"] = weights_hash(tmp)
            stamp_masks(tmp / MASKS_FILE, extra["weights_hash"])
        shutil.copyfile(job.checkpoint_dir / LOG_FILE, tmp / LOG_FILE)
        if job.merge != "none":
            extra["merged"] = _merge_after_heal(job, student, tokenizer, ctx, tmp, base_hash)
            check_finite_weights(tmp / "merged")
        write_record(tmp, _heal_record(job, ctx, extra, watch, base_hash))


def _merge_after_heal(job: HealJob, student, tokenizer, ctx: dict, tmp: Path, base_hash: str) -> dict:
    """``heal --merge``: the merged model in OUTPUT/merged, compared on held-out blocks."""
    eval_blocks = ctx["eval_blocks"]
    windows = None if eval_blocks is None else eval_blocks[:MERGE_EVAL_WINDOWS]
    merged = save_merged(student, tokenizer, ctx["masks"], job.merge, tmp / "merged", windows, "held-out")
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


def write_blockwise_output(job: HealJob, lm, tokenizer, ctx: dict, watch: Stopwatch) -> Path:
    """A pruned-model directory with the reconstructed layers: weights, masks, record naming the dense
    model (so that a later heal finds its teacher), written atomically."""
    from sparseheal.heal.full import verify_saved_masks
    from sparseheal.models import save_model, source_hash
    from sparseheal.records import peak_rss_mb
    from sparseheal.sparsity.masks import as_bool, sparsity_of
    from sparseheal.sparsity.store import save_masks

    pruned, teacher = ctx["pruned_record"], ctx["teacher"]
    modules = dict(lm.named_modules())
    with atomic_dir(job.output, job.overwrite) as tmp, watch("save"):
        save_model(lm, tokenizer, tmp)
        check_finite_weights(tmp)
        weights = weights_hash(tmp)
        save_masks(ctx["masks"], tmp / MASKS_FILE, {"pattern": pruned.get("pattern", "unstructured"),
                                                    "weights_hash": weights})
        verification = verify_saved_masks(tmp, {n: as_bool(m) for n, m in ctx["masks"].items()})
        if not verification["ok"]:
            raise StageError("--lr", f"{verification['mask_violations']} pruned weights are not +0.0; "
                                     "nothing was written")
        keep = ("method", "pattern", "sparsity", "layer_sparsity", "pruned_parameters", "prunable_parameters")
        record = {"stage": "heal", **{k: pruned.get(k) for k in keep}, "heal_method": job.healer.name,
                  "base_model": teacher.name, "base_path": teacher.path,
                  "base_hash": source_hash(teacher), "pruned_from": job.pruned_dir, "weights_hash": weights,
                  "calibration": ctx["calibration"], "masks_from": ctx["mask_source"],
                  "layers": {n: round(sparsity_of(modules[n].weight), 6) for n in ctx["masks"]},
                  "sparsity_achieved": pruned.get("sparsity_achieved"), "mask_verification": verification,
                  "blockwise": {"layers": ctx["layers"], "epochs": job.training.epochs, "lr": job.training.lr,
                                "batch_size": job.training.batch_size, "scheduler": job.training.scheduler},
                  "recipe": job.recipe, "timings": watch.times, "peak_rss_mb": round(peak_rss_mb(), 1),
                  "previous": pruned}
        write_record(tmp, record)
    return Path(job.output)
