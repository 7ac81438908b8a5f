"""What a heal writes: the healer's artifacts, the loss log, a merged model when asked, and the record.

Everything goes into a temporary sibling of the output that is renamed into place when complete.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from sparseheal.cards import write_card
from sparseheal.checks import MASKS_FILE
from sparseheal.errors import StageError
from sparseheal.heal.job import HealJob
from sparseheal.heal.merge import MERGE_EVAL_WINDOWS, save_merged
from sparseheal.heal.merge_stage import merge_record
from sparseheal.heal.training import LOG_FILE
from sparseheal.records import Stopwatch, atomic_dir, write_record
from sparseheal.sparsity.store import stamp_masks, weights_hash

__all__ = ["write_heal_output", "check_finite_weights"]


_CHUNK_BYTES = 16 * 2**20  # rows read at a time by the finiteness check
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype names (8-bit floats: 1)


def _non_finite(path: Path, name: str) -> int:
    """Non-finite values of one saved tensor, read in row chunks of about 16 MiB; the file is reopened
    per chunk, so only that chunk's pages are ever mapped (resident)."""
    with safe_open(str(path), framework="pt") as fh:
        part = fh.get_slice(name)
        shape, dtype = part.get_shape(), part.get_dtype()
    if not dtype.startswith(("F", "BF")):  # integer and bool tensors are finite
        return 0
    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * _ELEMENT_BYTES.get(dtype, 1))
    step, bad = max(1, _CHUNK_BYTES // row_bytes), 0
    for start in range(0, rows, step):
        with safe_open(str(path), framework="pt") as fh:
            chunk = fh.get_slice(name)[start:start + step] if shape else fh.get_tensor(name)
        bad += int((~torch.isfinite(chunk)).sum())
    return bad


def check_finite_weights(directory: Path) -> None:
    """Refuses (before the output is renamed into place) written weights that are not all finite."""
    bad, first = 0, None
    for path in sorted(directory.glob("*.safetensors")):
        if path.name == MASKS_FILE:
            continue
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
        for name in names:
            count = _non_finite(path, name)
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
        if "merged" in extra:  # the merged copy's card reads the heal's record beside it
            write_card(tmp / "merged")
        write_card(tmp, name=Path(job.output).name)  # replaces the generic card an adapter's save writes


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
