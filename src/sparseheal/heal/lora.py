"""LoRA healing: the sparse base stays frozen and PEFT low-rank adapters learn what pruning cost.

Each targeted linear computes ``W x + (alpha / r) * B A x`` with trainable ``A`` (r, in) and ``B``
(out, r), ``B`` initialised to zero (Hu et al. 2021, https://arxiv.org/abs/2106.09685). The default
recipe is the Wanda project's (Sun et al. 2023, https://arxiv.org/abs/2306.11695): r=8, alpha=16,
dropout 0.05, targets q_proj and v_proj, no bias, lr 1e-4 with a linear schedule. Models without q_proj
and v_proj get PEFT's default targets for their type, else their attention linears
(:func:`default_targets`).

With ``--mask-aware`` the update is ``(alpha / r) * (B A ⊙ M) x`` during training too (see
:mod:`sparseheal.heal.merge`), so a masked merge reproduces the trained model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseheal.checks import above_zero, positive, unit_interval
from sparseheal.errors import ConfigError
from sparseheal.heal.base import Healer
from sparseheal.layout import model_weights
from sparseheal.models import prunable_linears
from sparseheal.registry import HEALERS
from sparseheal.settings import Settings, setting

__all__ = ["LoraSettings", "LoraHealer", "default_targets", "check_targets", "lora_config"]

log = logging.getLogger(__name__)


@dataclass
class LoraSettings(Settings):
    """The adapters of ``--method lora`` (the Wanda project's recipe by default)."""

    rank: int = setting(8, "LoRA rank r.", check=positive)
    alpha: float = setting(16, "LoRA alpha (the update is scaled by alpha / r).", check=above_zero)
    dropout: float = setting(0.05, "LoRA dropout, in [0, 1).", check=unit_interval(closed_high=False))
    targets: str | None = setting(None, "module names to adapt, comma-separated (q_proj,v_proj), or "
                                        "all-linear (default: q_proj,v_proj where the model has both, else "
                                        "PEFT's default targets for its model type, else its attention "
                                        "linears).")
    mask_aware: bool = setting(False, "mask the LoRA update by the sparsity mask during training, so a "
                                      "masked merge is exact.")

    def validate(self) -> None:
        if self.targets is not None and not self.target_modules:
            raise ConfigError("--targets", "give module names separated by commas (q_proj,v_proj), "
                                           "or all-linear")

    @property
    def target_modules(self) -> list[str] | str | None:
        """``--targets`` as PEFT takes it: ``"all-linear"`` or a list of module names (None: the default,
        settled per model by :func:`default_targets`)."""
        if self.targets is None:
            return None
        if self.targets.strip() == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.targets.split(",") if t.strip()]


def default_targets(model: nn.Module) -> list[str]:
    """The LoRA targets of a model when ``--targets`` is not given.

    ``q_proj`` and ``v_proj`` where the model has both (the Wanda recipe); else PEFT's default targets
    for the model's type (``query_key_value`` for Falcon and Bloom); else the linears of its attention
    family (``qkv_proj`` and ``o_proj`` for Phi-3).
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    leaves = {name.rsplit(".", 1)[-1] for name in prunable_linears(model)}
    if {"q_proj", "v_proj"} <= leaves:
        return ["q_proj", "v_proj"]
    mapped = PEFT_DEFAULTS.get(getattr(getattr(model, "config", None), "model_type", None))
    if mapped and set(mapped) <= leaves:
        return list(mapped)
    attention = [w.key.rsplit(".", 1)[-1] for w in model_weights(model).values()
                 if w.family == "attention" and w.experts is None]
    if not attention:
        raise ConfigError("--targets", f"no default LoRA targets for {type(model).__name__}; name the "
                                       f"linears to adapt: {', '.join(sorted(leaves))} (or all-linear)")
    return list(dict.fromkeys(attention))


def check_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Returns the qualified names of the linears that ``--targets`` selects, or raises ConfigError.

    A target matches a linear whose name equals it or ends with ``.<target>`` (PEFT's rule);
    ``all-linear`` selects every linear except the output head, and is refused on a model whose
    experts are fused tensors (PEFT would adapt those as parameters, whose merge cannot keep their
    sparsity). Every target must match something.
    """
    linears = prunable_linears(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if targets == "all-linear":
        fused = [w.key for w in model_weights(model).values() if w.experts is not None]
        if fused:
            raise ConfigError("--targets", f"all-linear would adapt the fused expert tensors of "
                                           f"{type(model).__name__} ({fused[0]}, ...), which a LoRA merge "
                                           "cannot keep sparse; name the linears to adapt, or heal the "
                                           "experts with --method full")
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


def lora_config(cfg: LoraSettings, model: nn.Module):
    """The PEFT ``LoraConfig`` of the recipe."""
    from peft import LoraConfig, TaskType

    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    targets = cfg.target_modules
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=default_targets(model) if targets is None else targets,
        bias="none",
        fan_in_fan_out=conv1d,
    )


@HEALERS.register("lora")
class LoraHealer(Healer):
    """PEFT LoRA on the frozen sparse base (``--method lora``)."""

    settings = LoraSettings
    defaults = {"lr": 1e-4, "scheduler": "linear"}
    can_merge = True
    packed_masks = True  # the mask-aware hooks and merges unpack one layer's mask at a time
    writes = "a PEFT adapter"
    options: LoraSettings

    def __init__(self, options: LoraSettings | None = None) -> None:
        super().__init__(options)
        self.mask_hooks: list = []
        self.adapted: list[str] = []

    def output_bytes(self, weights: int, checkpoints: int, merged: bool) -> tuple[int, str]:
        """Adapters are small; a merged copy is a whole model."""
        return (weights, "a merged copy of the model") if merged else (0, "the adapter")

    def validate(self, skeleton: nn.Module) -> None:
        """Checks ``--targets`` against the model's linears (works on a weightless meta-device skeleton)."""
        targets = self.options.target_modules
        check_targets(skeleton, default_targets(skeleton) if targets is None else targets)

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], seed: int,
                gradient_checkpointing: bool) -> nn.Module:
        """Wraps ``model`` in a PeftModel with fresh adapters (seeded); base weights stay frozen."""
        from peft import get_peft_model
        from transformers import set_seed

        cfg = self.options
        if cfg.target_modules is None:  # the model's default, recorded as used
            cfg.targets = ",".join(default_targets(model))
        self.adapted = check_targets(model, cfg.target_modules)
        set_seed(seed)
        peft_model = get_peft_model(model, lora_config(cfg, model))
        if cfg.mask_aware:
            from sparseheal.heal.merge import install_mask_aware

            self.mask_hooks = install_mask_aware(peft_model, masks)
        if gradient_checkpointing:
            peft_model.enable_input_require_grads()
        trainable, total = peft_model.get_nb_trainable_parameters()
        log.info("LoRA r=%d alpha=%g on %d linears%s: %d trainable parameters of %d (%.3f%%)", cfg.rank,
                 cfg.alpha, len(self.adapted), " (mask-aware)" if cfg.mask_aware else "", trainable, total,
                 100 * trainable / max(total, 1))
        return peft_model

    def save(self, model: nn.Module, tokenizer, out_dir: Path, masks: dict[str, torch.Tensor],
             pattern: str) -> dict:
        """Writes the PEFT adapter (adapter_config.json + adapter_model.safetensors) to ``out_dir``."""
        model.save_pretrained(out_dir, safe_serialization=True)
        trainable, total = model.get_nb_trainable_parameters()
        return {
            "artifact": "peft-adapter",
            "trainable_parameters": trainable,
            "total_parameters": total,
            "adapter": {**self.options.values(), "modules": self.adapted},
        }
