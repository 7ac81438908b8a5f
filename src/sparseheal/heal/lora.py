"""LoRA healing: the sparse base stays frozen and PEFT low-rank adapters learn what pruning cost.

Each targeted linear computes ``W x + (alpha / r) * B A x`` with trainable ``A`` (r, in) and ``B``
(out, r), ``B`` initialised to zero (Hu et al. 2021, https://arxiv.org/abs/2106.09685). The default
recipe is the Wanda project's (Sun et al. 2023, https://arxiv.org/abs/2306.11695): r=8, alpha=16,
dropout 0.05, targets q_proj and v_proj, no bias, lr 1e-4 with a linear schedule.

With ``--mask-aware`` the update is ``(alpha / r) * (B A ⊙ M) x`` during training too (see
:mod:`sparseheal.heal.merge`), so a masked merge reproduces the trained model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sparseheal.config import ConfigError
from sparseheal.heal.settings import HealConfig
from sparseheal.models import prunable_linears
from sparseheal.registry import HEALERS

__all__ = ["LoraHealer", "check_targets", "lora_config"]

log = logging.getLogger(__name__)


def check_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Returns the qualified names of the linears that ``--targets`` selects, or raises ConfigError.

    A target matches a linear whose name equals it or ends with ``.<target>`` (PEFT's rule);
    ``all-linear`` selects every linear except the output head. Every target must match something.
    """
    linears = prunable_linears(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets == "all-linear":
        return [name for name, module in linears.items() if module is not head]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    selected = []
    for target in targets:
        hits = [name for name in linears if name == target or name.endswith("." + target)]
        if not hits:
            raise ConfigError("--targets", f"{target!r} matches no linear layer; the model's linears are "
                                           f"named: {', '.join(leaves)} (or use all-linear)")
        selected += hits
    return sorted(set(selected), key=list(linears).index)


def lora_config(cfg: HealConfig, model: nn.Module):
    """The PEFT ``LoraConfig`` of the recipe."""
    from peft import LoraConfig, TaskType

    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        fan_in_fan_out=conv1d,
    )


@HEALERS.register("lora")
class LoraHealer:
    """PEFT LoRA on the frozen sparse base (``--method lora``)."""

    default_lr = 1e-4
    default_scheduler = "linear"

    def __init__(self) -> None:
        self.mask_hooks: list = []
        self.adapted: list[str] = []

    def validate(self, model: nn.Module, cfg: HealConfig) -> None:
        """Checks ``--targets`` against the model's linears (works on a weightless meta-device skeleton)."""
        check_targets(model, cfg.target_modules)

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], cfg: HealConfig) -> nn.Module:
        """Wraps ``model`` in a PeftModel with fresh adapters (seeded); base weights stay frozen."""
        from peft import get_peft_model
        from transformers import set_seed

        self.adapted = check_targets(model, cfg.target_modules)
        set_seed(cfg.seed)
        peft_model = get_peft_model(model, lora_config(cfg, model))
        if cfg.mask_aware:
            from sparseheal.heal.merge import install_mask_aware

            self.mask_hooks = install_mask_aware(peft_model, masks)
        if cfg.gradient_checkpointing:
            peft_model.enable_input_require_grads()
        trainable, total = peft_model.get_nb_trainable_parameters()
        log.info("LoRA r=%d alpha=%g on %d linears%s: %d trainable parameters of %d (%.3f%%)", cfg.rank,
                 cfg.alpha, len(self.adapted), " (mask-aware)" if cfg.mask_aware else "", trainable, total,
                 100 * trainable / max(total, 1))
        return peft_model

    def save(self, model: nn.Module, tokenizer, out_dir: Path, masks: dict[str, torch.Tensor],
             cfg: HealConfig) -> dict:
        """Writes the PEFT adapter (adapter_config.json + adapter_model.safetensors) to ``out_dir``."""
        model.save_pretrained(out_dir, safe_serialization=True)
        trainable, total = model.get_nb_trainable_parameters()
        return {
            "artifact": "peft-adapter",
            "trainable_parameters": trainable,
            "total_parameters": total,
            "adapter": {
                "rank": cfg.rank,
                "alpha": cfg.alpha,
                "dropout": cfg.dropout,
                "targets": cfg.targets,
                "modules": self.adapted,
                "mask_aware": cfg.mask_aware,
            },
        }
