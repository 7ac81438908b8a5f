"""Distillation from the dense model: losses any healer adds to its language-modelling loss.

Two losses, alone or combined (``--distill kl``, ``squarehead`` or ``kl,squarehead``):

- ``kl`` (Hinton et al. 2015, https://arxiv.org/abs/1503.02531): the KL divergence between the
  teacher's and the student's next-token distributions, both softened by a temperature T,
  scaled by T^2 so that its gradients keep their size as T changes::

      L_kl = T^2 * mean_tokens sum_v p_t(v) * (log p_t(v) - log p_s(v)),   p = softmax(z / T)

- ``squarehead`` (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large
  Language Models", https://arxiv.org/abs/2310.06927): per-layer MSE between student and teacher
  hidden states, each normalised by the teacher's mean square, averaged over the layers::

      L_sq = mean_l MSE(h_s^l, h_t^l) / MSE(h_t^l, 0)

The total loss mixes them with the language-modelling loss by ``alpha`` (``--distill-alpha``)::

      L = (1 - alpha) * L_lm + alpha * (L_kl + L_sq)

The teacher is the dense model the pruned directory was made from (its record names it), or
``--teacher``; it runs in eval mode without gradients, optionally in another dtype or on another device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparseheal.checks import DTYPES, above_zero, check_device, unit_interval
from sparseheal.errors import ConfigError
from sparseheal.models import ModelSource, hash_weights, load_model, load_tokenizer, resolve_source
from sparseheal.settings import Settings, setting

__all__ = [
    "DISTILL_LOSSES",
    "DistillSettings",
    "kl_distill_loss",
    "KL_CHUNK_TOKENS",
    "squarehead_loss",
    "mix_losses",
    "resolve_teacher",
    "check_vocabulary",
    "check_teacher_config",
    "Distiller",
    "build_distiller",
]

log = logging.getLogger(__name__)

DISTILL_LOSSES = ("kl", "squarehead")


MIN_TEMPERATURE = 1e-3


def _temperature(flag: str, value: float) -> None:
    above_zero(flag, value)
    if value < MIN_TEMPERATURE:
        raise ConfigError(flag, f"must be at least {MIN_TEMPERATURE:g} (float32 logits divided by it "
                                f"overflow to inf and every loss is NaN), got {value:g}")


@dataclass
class DistillSettings(Settings):
    """Learning from the dense model: which losses, the teacher, and how they mix."""

    distill: str | None = setting(None, "distillation loss from the dense teacher: kl, squarehead, or "
                                        "kl,squarehead.")
    teacher: str | None = setting(None, "the teacher model (default: the dense model named in the pruned "
                                        "record).")
    temperature: float = setting(2.0, "KL distillation temperature, at least 0.001 (logits divided by a "
                                      "smaller one overflow).", check=_temperature)
    distill_alpha: float = setting(0.5, "weight of the distillation loss against the LM loss, in [0, 1].",
                                   check=unit_interval(closed_high=True))
    teacher_dtype: str | None = setting(None, "float32, bfloat16 or float16 for the teacher.", choices=DTYPES)
    teacher_device: str | None = setting(None, "device of the teacher.", check=check_device, resumable=True)

    def validate(self) -> None:
        if self.distill is None:
            return
        names = [n.strip() for n in str(self.distill).split(",") if n.strip()]
        if not names or any(n not in DISTILL_LOSSES for n in names):
            raise ConfigError("--distill", f"choose from {', '.join(DISTILL_LOSSES)} (or both, comma "
                                           f"separated), got {self.distill!r}")
        self.distill = ",".join(dict.fromkeys(names))

    @property
    def losses(self) -> tuple[str, ...]:
        """The names in ``--distill`` (empty when distillation is off)."""
        return tuple(self.distill.split(",")) if self.distill else ()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T) ``values`` over positions where ``mask`` (B, T) is true (all when None)."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


KL_CHUNK_TOKENS = 256  # tokens whose (chunk, V) softmaxes exist at once; about 50 MB at V = 49152


def _kl_per_token(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, V) student and teacher logits -> (N,) ``sum_v p_t(v) (log p_t(v) - log p_s(v))``."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)  # (N, V)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # (N,)


def kl_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    chunk_tokens: int | None = KL_CHUNK_TOKENS,
) -> torch.Tensor:
    """Temperature-scaled KL(teacher || student) of next-token distributions, times T^2.

    ``L = T^2 * mean_tokens sum_v p_t(v) (log p_t(v) - log p_s(v))`` with ``p = softmax(z / T)``
    (Hinton et al. 2015, https://arxiv.org/abs/1503.02531). Computed in float32, ``chunk_tokens``
    positions at a time; each chunk's softmaxes are recomputed in the backward pass
    (activation checkpointing), so the float32 (B, T, V) intermediates never exist whole.

    Args:
        student_logits: (B, T, V) student logits (gradients flow through these).
        teacher_logits: (B, T, V) teacher logits (treated as constants).
        temperature: softening temperature T > 0.
        mask: (B, T) positions to include (e.g. the attention mask); all when None.
        chunk_tokens: positions per chunk; None computes all at once.

    Returns:
        Scalar loss; exactly zero when the two sets of logits are equal.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, length, vocab = student_logits.shape
    student = student_logits.reshape(-1, vocab)  # (B*T, V)
    teacher = teacher_logits.detach().reshape(-1, vocab)  # (B*T, V)
    step = chunk_tokens or student.shape[0]
    pieces = []
    for start in range(0, student.shape[0], step):
        s, t = student[start : start + step], teacher[start : start + step]  # (n, V)
        if s.requires_grad and chunk_tokens:
            pieces.append(checkpoint(_kl_per_token, s, t, temperature, use_reentrant=False))
        else:
            pieces.append(_kl_per_token(s, t, temperature))
    per_token = torch.cat(pieces).reshape(batch, length)  # (B, T)
    return temperature**2 * _masked_mean(per_token, mask)


def squarehead_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """SquareHead loss: mean over layers of MSE(h_s, h_t) / MSE(h_t, 0).

    Kurtic et al. 2023, https://arxiv.org/abs/2310.06927 (section 3): the normalisation by the
    teacher's mean square puts layers of very different scale on one footing.

    Args:
        student_hidden: per-layer (B, T, d) student hidden states.
        teacher_hidden: per-layer (B, T, d) teacher hidden states, same count and shapes.
        mask: (B, T) positions to include; all when None.
        eps: guards the division for an all-zero teacher state.

    Returns:
        Scalar loss; zero when the hidden states are equal.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        counts = f"{len(student_hidden)}, {len(teacher_hidden)}"
        raise ValueError(f"need equal, non-zero layer counts; got {counts}")
    terms = []
    for h_s, h_t in zip(student_hidden, teacher_hidden, strict=True):
        h_t = h_t.detach().float()  # (B, T, d)
        err = _masked_mean((h_s.float() - h_t).pow(2).mean(-1), mask)  # MSE(h_s, h_t)
        scale = _masked_mean(h_t.pow(2).mean(-1), mask)  # MSE(h_t, 0)
        terms.append(err / (scale + eps))
    return torch.stack(terms).mean()


def mix_losses(lm_loss: torch.Tensor, distill_loss: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * lm_loss + alpha * distill_loss`` with alpha in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * lm_loss + alpha * distill_loss


def resolve_teacher(teacher: str | None, pruned_record: dict | None) -> tuple[ModelSource, str | None]:
    """Finds the teacher: ``--teacher``, else the base model named by the pruned directory's record.

    The record's ``base_model`` (as the user named it) is tried first, then ``base_path`` (where it
    was loaded from).

    Returns:
        (the teacher's source, the weight hash the record expects of it, or None)

    Raises:
        ConfigError("--teacher") when nothing can be resolved.
    """
    if teacher is not None:
        try:
            return resolve_source(teacher), None
        except ConfigError as err:
            raise ConfigError("--teacher", err.message) from err
    record = pruned_record or {}
    tried = [str(c) for c in (record.get("base_model"), record.get("base_path")) if c]
    for candidate in tried:
        try:
            source = resolve_source(candidate)
        except ConfigError:
            continue
        return source, (record.get("base_hash") if source.kind != "hub" else None)
    found = f"its record names {' / '.join(tried)}, not found here" if tried else "it records no base model"
    raise ConfigError("--teacher", f"no teacher for distillation ({found}); pass --teacher MODEL")


def check_vocabulary(student_tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int,
                     name: str) -> None:
    """Refuses a teacher whose vocabulary (logit count or token ids) differs from the student's."""
    if student_vocab != teacher_vocab:
        raise ConfigError("--teacher", f"{name} has a vocabulary of {teacher_vocab} tokens, the student "
                          f"{student_vocab}; the teacher must share the student's tokenizer")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise ConfigError("--teacher", f"{name}'s tokenizer maps tokens to other ids than the student's")


def _text_config_value(config, key: str) -> Any:
    return getattr(config.get_text_config(), key, None)


def check_teacher_config(source: ModelSource, student_config: Any, student_dir: str | None,
                         losses: Sequence[str]) -> None:
    """Compares the teacher's config and tokenizer with the student's (``student_config``), before any
    weights load."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path)
        teacher_tok = load_tokenizer(source)
    except (OSError, ValueError) as err:
        reason = type(err).__name__
        raise ConfigError("--teacher", f"cannot read {source.name} ({reason}); pass --teacher MODEL") from err
    student_tok = load_tokenizer(resolve_source(student_dir)) if student_dir else None
    vocabs = [_text_config_value(c, "vocab_size") for c in (student_config, config)]
    check_vocabulary(student_tok, teacher_tok, vocabs[0], vocabs[1], source.name)
    if "squarehead" in losses:
        for key in ("num_hidden_layers", "hidden_size"):
            mine, theirs = _text_config_value(student_config, key), _text_config_value(config, key)
            if mine != theirs:
                raise ConfigError("--distill", f"squarehead needs the teacher's {key} ({theirs}) to equal "
                                  f"the student's ({mine}); use --distill kl")


class Distiller:
    """Adds distillation from a frozen teacher to a healer's language-modelling loss.

    Args:
        teacher: the dense model (put in eval mode, gradients off).
        losses: loss names from DISTILL_LOSSES.
        temperature: KL temperature T > 0.
        alpha: weight of the distillation part, in [0, 1].
    """

    def __init__(self, teacher: nn.Module, losses: Sequence[str], temperature: float, alpha: float) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.losses = tuple(losses)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.needs_hidden_states = "squarehead" in self.losses
        self.kl_chunk_tokens: int | None = KL_CHUNK_TOKENS  # None: the whole (B, T, V) at once
        self.device = next(teacher.parameters()).device

    @torch.no_grad()
    def teacher_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        """Runs the teacher on (B, T) ids on its own device."""
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        return self.teacher(input_ids=input_ids.to(self.device), attention_mask=mask,
                            output_hidden_states=self.needs_hidden_states, use_cache=False)

    def __call__(self, student_outputs: Any, inputs: dict,
                 lm_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (mixed loss, {"lm_loss", "distill_loss", "kl_loss"?, "squarehead_loss"?} as floats)."""
        attention_mask = inputs.get("attention_mask")
        teacher = self.teacher_outputs(inputs["input_ids"], attention_mask)
        device = student_outputs.logits.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        parts: dict[str, torch.Tensor] = {}
        if "kl" in self.losses:
            teacher_logits = teacher.logits.to(device)  # (B, T, V)
            parts["kl_loss"] = kl_distill_loss(student_outputs.logits, teacher_logits, self.temperature, mask,
                                              self.kl_chunk_tokens)
        if "squarehead" in self.losses:
            student_hidden = student_outputs.hidden_states[1:]  # layer outputs; [0] is the embedding output
            teacher_hidden = [h.to(device) for h in teacher.hidden_states[1:]]
            parts["squarehead_loss"] = squarehead_loss(student_hidden, teacher_hidden, mask)
        distill = torch.stack(list(parts.values())).sum()
        total = mix_losses(lm_loss, distill, self.alpha)
        logged = {"lm_loss": float(lm_loss.detach()), "distill_loss": float(distill.detach())}
        logged.update({name: float(value.detach()) for name, value in parts.items()})
        return total, logged


def load_teacher(source: ModelSource, expected_hash: str | None, dtype: str | None,
                 device: str | None) -> nn.Module:
    """Loads the teacher in eval mode without gradients; warns when its weights are not the pruned base's."""
    if expected_hash is not None and source.kind != "hub":
        actual = hash_weights(source.path)
        if actual != expected_hash:
            log.warning("teacher %s has weights %s, not %s that the model was pruned from",
                        source.name, actual, expected_hash)
    try:
        teacher, _, _ = load_model(source.name if source.kind == "builtin" else source.path, dtype, device)
    except ConfigError as err:
        raise ConfigError("--teacher", err.message) from err
    except OSError as err:  # a Hub id that cannot be reached, a directory without weights
        reason = type(err).__name__
        raise ConfigError("--teacher", f"cannot load {source.name} ({reason}); pass --teacher MODEL") from err
    return teacher.eval().requires_grad_(False)


def build_distiller(settings: DistillSettings, student_model: nn.Module, pruned_dir: str | None,
                    pruned_record: dict | None, checked: bool = False) -> Distiller | None:
    """Builds the Distiller that ``--distill`` asks for, or returns None when it asks for none.

    Resolves the teacher (``--teacher`` or the record's base model), checks its vocabulary (and,
    for squarehead, its depth and width) against the student's before loading weights, and loads it
    with ``--teacher-dtype`` / ``--teacher-device`` (default: the student's). With ``checked`` the
    teacher's config was compared already (the heal preflight does it before the student loads).
    """
    losses = settings.losses
    if not losses:
        return None
    source, expected_hash = resolve_teacher(settings.teacher, pruned_record)
    if not checked:
        check_teacher_config(source, student_model.config, pruned_dir, losses)
    param = next(student_model.parameters())
    dtype = settings.teacher_dtype or str(param.dtype).removeprefix("torch.")
    teacher = load_teacher(source, expected_hash, dtype, settings.teacher_device or str(param.device))
    log.info("distilling (%s, T=%g, alpha=%g) from %s", ",".join(losses), settings.temperature,
             settings.distill_alpha, source.name)
    return Distiller(teacher, losses, settings.temperature, settings.distill_alpha)
