"""PERP-style healing (``--method perp``): retrain only the normalisation layers and the biases.

After pruning, the weights stay as pruned (frozen: every pruned position keeps its +0.0 and every kept
weight its value) and only the parameters that rescale and shift activations train end to end with the
Trainer: every normalisation module's parameters (RMSNorm / LayerNorm weights and biases, the final norm
included) and every bias of a linear or fused experts module; the record counts them. Zimmer, Andoni,
Spiegel, Pokutta, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs",
https://arxiv.org/abs/2312.15230 (their "biases and normalisation" retraining).

Memory: the Trainer keeps gradients and AdamW moments for the trained tensors only; the model itself is
held once, frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sparseheal.errors import ConfigError
from sparseheal.heal.base import Healer
from sparseheal.heal.full import save_verified
from sparseheal.registry import HEALERS
from sparseheal.sparsity.store import check_masks_match

__all__ = ["perp_parameters", "PerpHealer"]

log = logging.getLogger(__name__)


def perp_parameters(model: nn.Module) -> dict[str, list[str]]:
    """The parameters PERP trains, by role: ``norms`` (every parameter of a module whose class is a
    normalisation: its name ends in Norm or it is nn.LayerNorm / nn.GroupNorm) and ``biases`` (every other
    parameter named ``bias``)."""
    roles: dict[str, list[str]] = {"norms": [], "biases": []}
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm:
                roles["norms"].append(full)
            elif name == "bias" or name.endswith("_bias"):
                roles["biases"].append(full)
    return roles


@HEALERS.register("perp")
class PerpHealer(Healer):
    """Trains norms and biases only; every weight, pruned or kept, stays as the prune left it."""

    defaults = {"lr": 1e-3, "scheduler": "cosine"}
    requires_sparsity = True
    writes = "the model with retrained norms and biases"

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], seed: int,
                gradient_checkpointing: bool) -> nn.Module:
        check_masks_match(model, masks)
        self.roles = perp_parameters(model)
        trained = set(self.roles["norms"] + self.roles["biases"])
        if not trained:
            raise ConfigError("--method", "perp trains normalisation layers and biases, and this model has "
                                          "neither; use --method full or lora")
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)
        log.info("perp: %d trainable parameters (%d norm, %d bias tensors)",
                 sum(p.numel() for p in model.parameters() if p.requires_grad), len(self.roles["norms"]),
                 len(self.roles["biases"]))
        return model

    def save(self, model: nn.Module, tokenizer, out_dir: Path, masks: dict[str, torch.Tensor],
             pattern: str) -> dict:
        """Writes the model and its masks and verifies every pruned position bit for bit."""
        trainable, total, report = save_verified(model, tokenizer, out_dir, masks, pattern)
        return {"trainable_parameters": trainable, "total_parameters": total, "mask_verification": report,
                "trainable_tensors": {role: len(names) for role, names in self.roles.items()}}
