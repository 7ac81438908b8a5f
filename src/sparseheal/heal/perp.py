"""PERP-style healing (``--method perp``): retrain only the normalisation layers and the biases.

After pruning, the weights stay as pruned (frozen: every pruned position keeps its +0.0 and every kept
weight its value) and only the parameters that rescale and shift activations train end to end with the
Trainer: every normalisation module's parameters (RMSNorm / LayerNorm weights and biases, the final norm
included) and every bias of a linear or fused experts module; the record counts them. Zimmer, Andoni,
Spiegel, Pokutta, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs",
https://arxiv.org/abs/2312.15230 (their "biases and normalisation" retraining).

With ``--perp-lora-rank r`` a MaskLoRA trains beside them (PERP's MaskLoRA): every pruned linear gets a
LoRA update ``s·BA`` (rank r, ``s = alpha / r`` with alpha = 2r, no dropout) computed masked,
``W x + ((s·BA) ⊙ M) x``, during training, and merged as ``W' = W + (s·BA) ⊙ M`` at the end, so every pruned
weight stays +0.0 and the merged model is the trained one. The output is a plain model directory either way.

Memory: the Trainer keeps gradients and AdamW moments for the trained tensors only; the model itself is
held once, frozen (a mask-aware LoRA forms each adapted layer's dense (out, in) update while it trains).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseheal.checks import non_negative
from sparseheal.errors import ConfigError
from sparseheal.heal.base import Healer
from sparseheal.heal.full import save_verified
from sparseheal.registry import HEALERS
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.store import check_masks_match

__all__ = ["perp_parameters", "PerpSettings", "PerpHealer", "mask_lora"]

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


@dataclass
class PerpSettings(Settings):
    """PERP's optional MaskLoRA (``--method perp``)."""

    perp_lora_rank: int = setting(0, "perp: also train a LoRA of this rank on every pruned linear, masked by "
                                     "the sparsity mask and merged with it exactly (MaskLoRA); 0: norms and "
                                     "biases only.", check=non_negative("a rank"))


def mask_lora(model: nn.Module, masks: dict[str, torch.Tensor], rank: int, norms: list[str]) -> nn.Module:
    """Wraps ``model`` in a PEFT LoRA of ``rank`` on every pruned linear (not fused experts), mask-aware,
    with every bias (``bias="all"``) and the ``norms`` modules trained as well; returns the PeftModel."""
    from peft import LoraConfig, TaskType, get_peft_model

    from sparseheal.heal.merge import install_mask_aware
    from sparseheal.layout import model_weights

    linears = [name for name, w in model_weights(model).items() if w.experts is None and name in masks]
    if not linears:
        raise ConfigError("--perp-lora-rank", "this model has no pruned linear a LoRA can adapt (fused "
                                              "experts only); leave --perp-lora-rank at 0")
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=linears, bias="all", modules_to_save=norms or None,
                        fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, config)
    peft_model.sparseheal_mask_hooks = install_mask_aware(peft_model, masks)
    return peft_model


@HEALERS.register("perp")
class PerpHealer(Healer):
    """Trains norms and biases only; every weight, pruned or kept, stays as the prune left it."""

    settings = PerpSettings
    defaults = {"lr": 1e-3, "scheduler": "cosine"}
    requires_sparsity = True
    writes = "the model with retrained norms and biases"
    options: PerpSettings

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
        if self.options.perp_lora_rank:
            from transformers import set_seed

            set_seed(seed)
            norm_modules = sorted({name.rpartition(".")[0] for name in self.roles["norms"]})
            model = mask_lora(model, masks, self.options.perp_lora_rank, norm_modules)
        log.info("perp: %d trainable parameters (%d norm, %d bias tensors)",
                 sum(p.numel() for p in model.parameters() if p.requires_grad), len(self.roles["norms"]),
                 len(self.roles["biases"]))
        return model

    def save(self, model: nn.Module, tokenizer, out_dir: Path, masks: dict[str, torch.Tensor],
             pattern: str) -> dict:
        """Writes the model and its masks and verifies every pruned position bit for bit."""
        extra = {}
        if self.options.perp_lora_rank:  # W' = W + (s·BA) ⊙ M: the trained model, pruned weights +0.0
            from sparseheal.heal.merge import merge_lora, remove_mask_aware

            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            remove_mask_aware(model, model.sparseheal_mask_hooks)
            model, extra["merge"] = merge_lora(model, masks, "masked")
            extra["lora_rank"] = self.options.perp_lora_rank
        trained, total, report = save_verified(model, tokenizer, out_dir, masks, pattern)
        return {"trainable_parameters": trainable if extra else trained, "total_parameters": total,
                "mask_verification": report, **extra,
                "trainable_tensors": {role: len(names) for role, names in self.roles.items()}}
