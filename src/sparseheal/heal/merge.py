"""Merging LoRA adapters into a sparse base without (or knowingly with) losing its sparsity.

A LoRA layer computes ``W x + s * B A x`` with ``s = alpha / r`` (Hu et al. 2021,
https://arxiv.org/abs/2106.09685). A plain merge ``W' = W + s * B A`` is dense, so every pruned weight
becomes non-zero. Modes:

- ``masked``: ``W' = W + (s * B A) ⊙ M`` with the stored keep-mask ``M``; pruned weights stay exactly
  ``+0.0``. It equals the adapter model exactly when the adapter was trained mask-aware.
- ``dense``: ``W' = W + s * B A`` (the plain PEFT merge); the resulting sparsity is reported.

Mask-aware training (:func:`install_mask_aware`) computes the adapter branch as ``(s * B A ⊙ M) x``
during training, so the masked merge is the trained model itself. It works through forward hooks on
the adapter's ``lora_A`` / ``lora_B`` submodules and a non-persistent buffer, so PEFT saves and loads
the adapter in its usual format.

Its cost: the low-rank product can no longer be applied as two thin matmuls; every adapted layer forms
the dense (out, in) update and multiplies the input by it, so an adapted layer costs about as much as
its base weight again, and autograd keeps that (out, in) update for the backward pass (measured with
``python benchmarks/heal_lora.py --mask-aware-cost``; the figures are in docs/healing.md).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseheal.checks import MASKS_FILE, non_negative, window_length
from sparseheal.models import save_model
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.masks import apply_mask, as_bool, sparsity_of
from sparseheal.sparsity.store import save_masks, weights_hash

__all__ = [
    "MERGE_MODES",
    "HealMergeSettings",
    "MergeSettings",
    "masked_delta",
    "merge_weight",
    "lora_layers",
    "install_mask_aware",
    "remove_mask_aware",
    "merge_lora",
    "mean_window_loss",
    "save_merged",
    "MERGE_EVAL_WINDOWS",
]

log = logging.getLogger(__name__)

_PRUNED_BUFFER = "sparseheal_pruned"
MERGE_EVAL_WINDOWS = 16  # held-out blocks on which ``heal --merge`` compares adapter and merged model
MERGE_MODES = ("masked", "dense")


@dataclass
class HealMergeSettings(Settings):
    """``heal --merge``: a merged model beside the adapter (for healers that can merge)."""

    merge: str = setting("none", "none, masked (pruned weights stay zero) or dense; the merged model goes to "
                                 "OUTPUT/merged.", choices=("none", *MERGE_MODES), resumable=True)


@dataclass
class MergeSettings(Settings):
    """``sparseheal merge``: how an adapter is merged into its base, and the comparison that checks it."""

    mode: str = setting("masked", "masked (W + BA * mask: pruned weights stay exactly zero) or dense (plain "
                                  "merge, not sparse).", choices=MERGE_MODES)
    base: str | None = setting(None, "the base model directory (default: the one named in the adapter's "
                                     "record; its hash must match).")
    eval_data: str = setting("wikitext2", "data set whose first windows compare the adapter model with the "
                                          "merged model.")
    eval_seqlen: int | None = setting(None, "window length of that comparison (default min(1024, the model's "
                                            "positions)).", check=window_length)
    eval_windows: int = setting(4, "windows compared (0 skips the comparison).",
                                check=non_negative("an integer (0 skips the comparison)"))


def masked_delta(weight_b: torch.Tensor, weight_a: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """The adapter's update restricted to kept positions: ``(B A) ⊙ M`` with pruned positions +0.0.

    Args:
        weight_b: (out, r) ``lora_B`` weight.
        weight_a: (r, in) ``lora_A`` weight.
        pruned: (out, in) bool, True where the base weight is pruned (``~M``).

    Returns:
        (out, in) masked product (unscaled).
    """
    return (weight_b @ weight_a).masked_fill(pruned, 0.0)  # (out, in)


def merge_weight(weight: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``W + delta`` (dense, ``keep`` None) or ``W + delta ⊙ M`` with pruned positions exactly +0.0.

    Args:
        weight: (out, in) base weight (any orientation, as long as ``delta`` and ``keep`` match it).
        delta: scaled adapter update, same shape.
        keep: bool keep-mask, same shape, or None for the dense merge.

    Returns:
        A new tensor in ``weight``'s dtype; the sum is formed in float32.
    """
    merged = weight.float() + delta.float()
    if keep is not None:
        apply_mask(merged, keep)
    return merged.to(weight.dtype)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA layers of a PeftModel, keyed by the base model's module names."""
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: module for name, module in root.named_modules() if isinstance(module, LoraLayer)}


class _MaskedBranch:
    """Forward hooks that turn ``lora_B(lora_A(x'))`` into ``x' (B A ⊙ M)^T`` for one adapter.

    The hook on ``lora_A`` keeps its input ``x'`` (the dropped-out input, so dropout is shared); the hook on
    ``lora_B`` replaces the low-rank output with the masked dense product. PEFT then scales it.
    """

    def __init__(self, layer: nn.Module, adapter: str) -> None:
        self.layer = layer
        self.adapter = adapter
        self.inputs: list[torch.Tensor] = []

    def keep_input(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.inputs.append(args[0])  # (..., in)

    def masked_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = self.inputs.pop()  # (..., in)
        pruned = getattr(self.layer, _PRUNED_BUFFER)  # (out, in)
        delta = masked_delta(module.weight, self.layer.lora_A[self.adapter].weight, pruned)  # (out, in)
        return F.linear(x.to(delta.dtype), delta, module.bias)  # (..., out)


def install_mask_aware(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Masks every LoRA update of ``model`` (a PeftModel) by the base layer's keep-mask.

    Layers without a mask (not pruned) keep the plain LoRA branch.

    Returns:
        The hook handles (see :func:`remove_mask_aware`).
    """
    handles = []
    for name, layer in lora_layers(model).items():
        if name not in masks:
            continue
        keep = as_bool(masks[name])  # (out, in)
        if getattr(layer, "fan_in_fan_out", False):
            keep = keep.t()  # GPT-2 Conv1D stores (in, out); the delta is (out, in)
        device = layer.get_base_layer().weight.device
        layer.register_buffer(_PRUNED_BUFFER, (~keep.bool()).contiguous().to(device), persistent=False)
        for adapter in layer.lora_A:
            branch = _MaskedBranch(layer, adapter)
            handles.append(layer.lora_A[adapter].register_forward_hook(branch.keep_input))
            handles.append(layer.lora_B[adapter].register_forward_hook(branch.masked_output))
    if not handles:
        log.warning("mask-aware: no LoRA layer sits on a masked weight; nothing to mask")
    return handles


def remove_mask_aware(model: nn.Module, handles: list) -> None:
    """Removes the hooks of :func:`install_mask_aware` and its buffers."""
    for handle in handles:
        handle.remove()
    for layer in lora_layers(model).values():
        if hasattr(layer, _PRUNED_BUFFER):
            delattr(layer, _PRUNED_BUFFER)


def _masked_layer_sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    modules = dict(model.named_modules())
    zeros = sum(sparsity_of(modules[n].weight) * modules[n].weight.numel() for n in masks if n in modules)
    total = sum(modules[n].weight.numel() for n in masks if n in modules)
    return zeros / max(total, 1)


@torch.no_grad()
def _keep_trained_copies(model: nn.Module) -> None:
    """Writes the trained copy of each ``modules_to_save`` module (norms trained beside the adapter) into
    the module it wraps, which is what ``unload`` keeps."""
    from peft.utils import ModulesToSaveWrapper

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            active = [a for a in module.active_adapters if a in module.modules_to_save]
            if active:
                module.original_module.load_state_dict(module.modules_to_save[active[0]].state_dict())


@torch.no_grad()
def merge_lora(model: nn.Module, masks: dict[str, torch.Tensor], mode: str) -> tuple[nn.Module, dict]:
    """Merges the active LoRA adapter of a PeftModel into its base and returns the plain model.

    Args:
        model: a PeftModel with LoRA layers (mask-aware hooks, if any, are ignored: the maths is here).
        masks: keep-masks of the base's pruned linears, by module name.
        mode: ``masked`` or ``dense``.

    Returns:
        (the base model with merged weights and no PEFT modules, statistics)
    """
    base = model.get_base_model()
    before = _masked_layer_sparsity(base, masks)
    layers = lora_layers(model)
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        keep = as_bool(masks[name]) if mode == "masked" and name in masks else None
        weight.data = merge_weight(weight.data, delta, None if keep is None else keep.to(weight.device))
    _keep_trained_copies(model)
    merged = model.unload()
    after = _masked_layer_sparsity(merged, masks)
    stats = {"mode": mode, "layers_merged": len(layers), "sparsity_before": round(before, 6),
             "sparsity_after": round(after, 6)}
    if mode == "dense":
        log.warning("dense merge: pruned weights become non-zero (sparsity of the pruned layers "
                    "%.4f -> %.4f); use --mode masked to keep them at zero", before, after)
    return merged, stats


def mean_window_loss(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token loss over (W, T) windows, as the Wanda perplexity protocol computes it."""
    from sparseheal.evaluate.perplexity import window_losses

    seqlen = windows.shape[1]
    return float(window_losses(model, windows.reshape(1, -1), seqlen).double().mean())


def save_merged(model: nn.Module, tokenizer, masks: dict[str, torch.Tensor], mode: str, out_dir: Path,
                eval_windows: torch.Tensor | None = None, eval_source: str = "") -> dict:
    """Merges a PeftModel (see :func:`merge_lora`) and writes a normal model directory to ``out_dir``.

    With (W, T) ``eval_windows`` the perplexity of the adapter model (before) and of the merged model
    (after) on those windows is recorded. A masked merge also writes the keep-masks beside the weights.

    Returns:
        Merge statistics for the record.
    """
    before = mean_window_loss(model, eval_windows) if eval_windows is not None and len(eval_windows) else None
    merged, stats = merge_lora(model, masks, mode)
    if before is not None:
        after = mean_window_loss(merged, eval_windows)
        stats["eval"] = {"source": eval_source, "windows": int(eval_windows.shape[0]),
                         "seqlen": int(eval_windows.shape[1]), "ppl_unmerged": math.exp(before),
                         "ppl_merged": math.exp(after), "ppl_change": math.exp(after) - math.exp(before)}
        log.info("%s merge: perplexity %.4f (adapter) -> %.4f (merged) on %d %s windows", mode,
                 math.exp(before), math.exp(after), eval_windows.shape[0], eval_source)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_model(merged, tokenizer, out_dir)
    if mode == "masked":
        save_masks(masks, Path(out_dir) / MASKS_FILE, {"merge": mode, "weights_hash": weights_hash(out_dir)})
    return stats
