"""Masks of a pruned directory, and applying a PEFT adapter to a loaded base model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sparseheal.checks import MASKS_FILE, check_pickle
from sparseheal.errors import ConfigError
from sparseheal.layout import model_weights
from sparseheal.models import resolve_source, weight_view
from sparseheal.records import read_record
from sparseheal.sparsity.store import (
    check_masks_belong,
    check_masks_match,
    load_masks,
    masks_from_zeros,
    weights_hash,
)

__all__ = ["model_masks", "check_sparse", "check_adapter_shapes", "check_adapter_base", "apply_adapter"]

log = logging.getLogger(__name__)


def model_masks(
    model: nn.Module, model_dir: str | Path, flag: str = "MODEL", packed: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """The keep-masks of a model directory's pruned linears, and where they came from.

    ``sparsity_masks.safetensors`` when present (checked against the model, and against the hash of
    the weights it was written with: a mismatch is refused naming ``flag``); otherwise ``W != 0`` for
    the decoder layers' linears, with a warning. With ``packed`` the masks stay bit-packed
    (:class:`~sparseheal.sparsity.masks.PackedMask`, an eighth of a bool tensor's memory) for users that
    need one layer's mask at a time (LoRA's mask-aware hooks and merges).

    Returns:
        (masks by module name, "file" or "zeros")
    """
    path = Path(model_dir) / MASKS_FILE
    if path.is_file():
        masks, meta = load_masks(path, packed, flag)
        check_masks_belong(path, model_dir, flag, meta)
        check_masks_match(model, masks, str(path))
        return masks, "file"
    names = list(model_weights(model))
    log.warning("%s has no %s; taking the masks from the zero weights (W != 0)", model_dir, MASKS_FILE)
    return masks_from_zeros(model, names, packed), "zeros"


def check_sparse(model_dir: str, masks: dict) -> None:
    """Refuses a model with nothing pruned: no masks file and no zero weight in its decoder linears."""
    from sparseheal.sparsity.masks import as_bool

    if not any(bool((~as_bool(m)).any()) for m in masks.values()):
        raise ConfigError("PRUNED_DIR", f"{model_dir} is not a pruned model: no masks file and no zero "
                                        "weight in its decoder linears; prune it first (sparseheal prune)")


def _check_named_base(adapter: str | Path, base: str, flag: str) -> None:
    """A plain PEFT adapter names its base in ``adapter_config.json``: a local directory there must hold
    the weights of ``base``; a name that cannot be checked (a Hub id) is said in a warning."""
    import json

    try:
        named = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return
    if not named:
        return
    given = resolve_source(base)
    if Path(named).expanduser().is_dir() and given.kind != "hub":
        if Path(named).expanduser().resolve() != Path(given.path).resolve() and \
                weights_hash(Path(named).expanduser()) != weights_hash(given.path):
            raise ConfigError(flag, f"{adapter} was trained on {named} (its adapter_config.json), whose "
                                    f"weights differ from those of {base}; give the base it was trained on")
    elif str(named) not in (base, given.name):
        log.warning("%s names its base %s, which cannot be checked against %s here", adapter, named, base)


def check_adapter_shapes(adapter: str | Path, base: nn.Module, flag: str = "--adapter") -> None:
    """Refuses a LoRA adapter whose matrices do not fit the base's linears (read from the safetensors
    headers and a weightless skeleton of the base, before any weights load): ``lora_A`` is (r, in) and
    ``lora_B`` (out, r) of the linear it adapts."""
    import re

    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(adapter).expanduser().glob("adapter_model*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
        except (OSError, ValueError, SafetensorError) as err:
            raise ConfigError(flag, f"{path} is not a readable adapter ({type(err).__name__})") from err
        for key, shape in shapes.items():
            found = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if found is None:
                continue
            try:
                module = base.get_submodule(found[1])
            except AttributeError:
                raise ConfigError(flag, f"{adapter} adapts {found[1]}, which {type(base).__name__} does not "
                                        "have; give the base it was trained on") from None
            out_in = tuple(weight_view(module).shape)
            side = shape[1] if found[2] == "A" else shape[0]
            wanted = out_in[1] if found[2] == "A" else out_in[0]
            if len(shape) != 2 or side != wanted:
                raise ConfigError(flag, f"{adapter}: {key} has shape {shape}, which does not fit the base's "
                                        f"{found[1]} of (out, in) {out_in}; give the base it was trained on")


def check_adapter_base(adapter: str | Path, base: str, flag: str = "--adapter") -> dict:
    """Refuses an adapter whose record names other base weights than ``base``'s; returns the record."""
    record = read_record(adapter, flag) or {}
    if record.get("base_hash") is None:
        _check_named_base(adapter, base, flag)
    expected = record.get("base_hash")
    if expected is not None:
        source = resolve_source(base)
        actual = weights_hash(source.path) if source.kind != "hub" else None
        if actual != expected:
            raise ConfigError(flag, f"{adapter} was trained on base weights {expected}, but {base} has "
                                    f"weights {actual}; give the base it was trained on")
    return record


def apply_adapter(model: nn.Module, adapter: str, base: str, allow_pickle: bool = False) -> nn.Module:
    """Wraps ``model`` with the PEFT adapter in ``adapter`` after checking it was trained on ``base``.

    The adapter's sparseheal.json names the hash of its base weights; a mismatch is refused. A
    mask-aware adapter gets its update masked by ``base``'s masks again, as in training. Pickle-only
    adapter weights (``adapter_model.bin``) are refused unless ``allow_pickle``.
    """
    from peft import PeftModel

    check_pickle(adapter, allow_pickle, "adapter_model")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError("--adapter", f"{adapter} is not a PEFT adapter directory (no adapter_config.json)")
    record = check_adapter_base(adapter, base)
    mask_aware = bool((record.get("recipe") or {}).get("mask_aware"))
    masks = model_masks(model, resolve_source(base).path, packed=True)[0] if mask_aware else {}
    try:
        wrapped = PeftModel.from_pretrained(model, adapter)
    except (ValueError, OSError, KeyError, RuntimeError) as err:  # shapes that do not fit: RuntimeError
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
        raise ConfigError("--adapter", f"{adapter} does not fit {base} ({reason})") from err
    if mask_aware:
        from sparseheal.heal.merge import install_mask_aware

        install_mask_aware(wrapped, masks)
    return wrapped.eval()
