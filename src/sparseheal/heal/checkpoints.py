"""Where a heal keeps its training checkpoints (``<output>.ckpt/``) and which of them is complete."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

__all__ = ["RECIPE_FILE", "checkpoint_dir_for", "last_checkpoint", "resume_point", "tokens_at"]

log = logging.getLogger(__name__)

RECIPE_FILE = "heal_recipe.json"  # the settings of the run that wrote the checkpoints


def checkpoint_dir_for(output: str | os.PathLike) -> Path:
    """Training checkpoints of ``output`` live in the sibling ``<output>.ckpt/``."""
    path = Path(output).expanduser()
    return path.with_name(path.name + ".ckpt")


def last_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``checkpoint_dir`` (None when there is none).

    The Trainer writes a checkpoint's files one after another and ``trainer_state.json`` last, so a
    run killed while saving leaves a directory without a readable state; resuming from it would
    restart at step 0 from half-saved weights. Such directories are skipped here.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def resume_point(checkpoint_dir: Path) -> Path:
    """The last complete checkpoint; newer ones cut short by a kill while saving are removed."""
    last = last_checkpoint(checkpoint_dir)
    if last is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
    step = int(last.name.split("-")[1])
    for partial in checkpoint_dir.glob("checkpoint-*"):
        number = partial.name.split("-", 1)[1]
        if partial.is_dir() and number.isdigit() and int(number) > step:
            log.warning("removing %s: it was cut short while being saved", partial)
            shutil.rmtree(partial, ignore_errors=True)  # every data-parallel rank may try
    log.info("resuming from %s", last)
    return last


def tokens_at(checkpoint: Path) -> int:
    """Training tokens seen when ``checkpoint`` was written."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen", 0))
