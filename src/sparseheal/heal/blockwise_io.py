"""What block-wise healing writes: each finished layer's checkpoint and progress, and the output directory
(weights, masks, record naming the dense model)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparseheal.records import replace_file

__all__ = ["PROGRESS_FILE", "save_layer", "load_progress", "load_file_state", "write_blockwise_output"]

PROGRESS_FILE = "blockwise_progress.json"


def save_layer(layer: nn.Module, checkpoint_dir: Path, index: int, result: dict, recipe: dict) -> None:
    """Writes a finished layer's weights, then the progress file that names it (the last write)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
    save_file(state, str(checkpoint_dir / f"layer-{index}.safetensors"))
    progress_path = checkpoint_dir / PROGRESS_FILE
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"layers": []}
    progress["layers"] = [r for r in progress["layers"] if r["index"] < index] + [result]
    progress.update(recipe=recipe, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    replace_file(progress_path, json.dumps(progress, indent=2) + "\n")


def load_progress(checkpoint_dir: Path) -> list[dict]:
    path = checkpoint_dir / PROGRESS_FILE
    return json.loads(path.read_text())["layers"] if path.is_file() else []


def write_blockwise_output(job: Any, lm, tokenizer, ctx: dict, watch: Any) -> Path:
    """A pruned-model directory with the reconstructed layers: weights, masks, record naming the dense
    model (so that a later heal finds its teacher), written atomically."""
    from sparseheal.cards import write_card
    from sparseheal.checks import MASKS_FILE
    from sparseheal.errors import StageError
    from sparseheal.heal.full import verify_saved_masks
    from sparseheal.heal.output import check_finite_weights
    from sparseheal.layout import masked_weight
    from sparseheal.models import save_model, source_hash
    from sparseheal.records import atomic_dir, peak_rss_mb, write_record
    from sparseheal.sparsity.masks import sparsity_of
    from sparseheal.sparsity.store import carry_input_orders, save_masks, weights_hash

    pruned, teacher, options = ctx["pruned_record"], ctx["teacher"], job.healer.options
    with atomic_dir(job.output, job.overwrite) as tmp, watch("save"):
        save_model(lm, tokenizer, tmp)
        check_finite_weights(tmp)
        weights = weights_hash(tmp)
        save_masks(ctx["masks"], tmp / MASKS_FILE, {"pattern": pruned.get("pattern", "unstructured"),
                                                    "weights_hash": weights})
        carry_input_orders(ctx["source"].path, tmp / MASKS_FILE)
        verification = verify_saved_masks(tmp, ctx["masks"], lm)
        if not verification["ok"]:
            raise StageError("--lr", f"{verification['mask_violations']} pruned weights are not +0.0; "
                                     "nothing was written")
        keep = ("method", "pattern", "sparsity", "layer_sparsity", "pruned_parameters", "prunable_parameters",
                "families")
        record = {"stage": "heal", **{k: pruned.get(k) for k in keep}, "heal_method": job.healer.name,
                  "base_model": teacher.name, "base_path": teacher.path,
                  "base_hash": source_hash(teacher), "pruned_from": job.pruned_dir, "weights_hash": weights,
                  "calibration": ctx["calibration"], "masks_from": ctx["mask_source"],
                  "layers": {n: round(sparsity_of(masked_weight(lm, n).param), 6) for n in ctx["masks"]},
                  "sparsity_achieved": pruned.get("sparsity_achieved"), "mask_verification": verification,
                  "blockwise": {"layers": ctx["layers"], "epochs": job.training.epochs, "lr": job.training.lr,
                                "batch_size": job.training.batch_size, "scheduler": job.training.scheduler,
                                "granularity": options.granularity, "inputs": options.recon_inputs,
                                "params": options.recon_params, "loss": options.recon_loss,
                                "holdout": options.holdout, "early_stop": options.early_stop},
                  "recipe": job.recipe, "timings": watch.times, "peak_rss_mb": round(peak_rss_mb(), 1),
                  "previous": pruned}
        write_record(tmp, record)
        write_card(tmp, name=Path(job.output).name)
    return Path(job.output)


def load_file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
