"""Full fine-tuning under the sparsity mask (``--method full``, alias ``dense``).

Every surviving weight of the decoder's linear layers and fused expert tensors trains (norms and
routers too by default; embeddings and lm_head only with ``--train-embeddings``), while every pruned
weight stays exactly +0.0. The mask is kept by construction rather than recomputed from ``W == 0`` at
every step:

1. a gradient hook on each masked weight zeroes the gradient at pruned positions before it is
   accumulated, so gradient accumulation, clipping norms, DDP all-reduce and the optimizer's moments
   only ever see ``g' = g * m``;
2. right after every optimizer step (the Trainer's ``on_optimizer_step``, :class:`MaskCallback`, where the
   whole masked update is laid out) the weight is re-masked, ``W' = W * m + 0.0``
   (the ``+ 0.0`` turns the ``-0.0`` of a negative weight times zero into ``+0.0``, so that a decay
   factor ``1 - lr * wd < 0`` cannot leave ``-0.0``).

Both are products with the keep-mask ``m``, held bit-packed and unpacked one weight at a time by a
table lookup; on CPU the lookup and product take about a quarter of the time of a masked fill
with a resident bool mask, and hold 1/8 of its memory. They give the weights the same bits as a
masked fill with +0.0: a pruned gradient is ``+0.0`` or ``-0.0``, which clipping norms and the
optimizers' moments treat alike (``0.9 * 0 + 0.1 * -0.0 = +0.0``), and ``x + 0.0 = x`` for every
non-zero ``x``.

With (1) alone AdamW already keeps zeros (``m_t = v_t = 0`` there, and ``0 * (1 - lr * wd) = 0``);
(2) makes the invariant independent of the optimizer. Under ``--fsdp`` (FSDP2, :mod:`sparseheal.heal.fsdp`)
each weight is a row shard ``W[r]`` and its mask is cut the same way, ``m[r]``; (1) becomes a
post-accumulate-grad hook on the sharded parameter (``g[r] * m[r]`` after FSDP2's reduce-scatter, still
before clipping and the step) and (2) writes into the local shard. At the end every pruned position of the
saved weights is checked bit for bit and the result is recorded.

Memory per trainable parameter with AdamW in float32: weight 4 B + gradient 4 B + two moments
8 B + the keep-mask 1/8 B (bit-packed) = 16.125 B; frozen parameters (embeddings) cost their 4 B
(measured per parameter and block size: ``benchmarks/heal_compare.py``, see benchmarks/README.md).
``--bf16`` autocast keeps float32 master weights (activations
shrink, not the 16.125 B); ``--gradient-checkpointing`` trades activation memory for a second forward pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import TrainerCallback

from sparseheal.checks import MASKS_FILE
from sparseheal.errors import StageError
from sparseheal.heal.base import Healer
from sparseheal.heal.fsdp import is_sharded, local, shard_like
from sparseheal.layout import masked_weight, model_weights, parameter_families
from sparseheal.models import checkpoint_names, decoder_layers, prunable_linears, save_model
from sparseheal.registry import HEALERS
from sparseheal.settings import Settings, setting
from sparseheal.sources import weight_files
from sparseheal.sparsity.masks import PackedMask, as_bool, count_violations
from sparseheal.sparsity.store import check_masks_match, save_masks

__all__ = [
    "FullSettings",
    "select_trainable",
    "MaskKeeper",
    "MaskCallback",
    "save_verified",
    "verify_saved_masks",
    "weight_files",
    "FullHealer",
]

log = logging.getLogger(__name__)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def select_trainable(model: nn.Module, masks: dict[str, torch.Tensor], train_embeddings: bool,
                     train_norms: bool) -> dict[str, list[str]]:
    """Sets ``requires_grad`` by role and returns the parameter names of each role.

    Roles: ``linears`` (every masked weight, fused expert tensors included, and the other parameters of
    the decoder's linears and experts modules, such as biases), ``routers`` (the routers and gates of
    mixture-of-experts layers), ``norms`` (parameters of normalisation modules), ``embeddings``
    (input/output/position embeddings, lm_head) and ``other``. Linears always train; routers and norms
    train together, when ``train_norms``; embeddings when ``train_embeddings``.
    """
    stack, layers = decoder_layers(model)
    masked = {id(masked_weight(model, name).param) for name in masks}
    owners = {id(m) for m in prunable_linears(layers).values()}  # linears and experts modules (biases)
    owners |= {id(w.module) for w in model_weights(model).values()}
    families = {f"{stack}.{i}.{n}": f for i, layer in enumerate(layers)
                for n, f in parameter_families(layer).items()}
    embeddings = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = (model.get_input_embeddings(), model.get_output_embeddings())
    embeddings |= {id(m) for m in heads if m is not None}
    roles: dict[str, list[str]] = {"linears": [], "routers": [], "norms": [], "embeddings": [], "other": []}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights: the first owner decides
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            role = _role(module, param, name, masked, owners, embeddings, families)
            trains = role == "linears" or (role in ("norms", "routers") and train_norms) or (
                role == "embeddings" and train_embeddings)
            param.requires_grad_(trains)
            roles[role].append(name)
    return roles


def _role(module: nn.Module, param: nn.Parameter, name: str, masked: set[int], owners: set[int],
          embeddings: set[int], families: dict[str, str]) -> str:
    if id(module) in embeddings:
        return "embeddings"
    if id(param) in masked:
        return "linears"
    if families.get(name) == "routers":
        return "routers"
    if id(module) in owners:
        return "linears"
    return "norms" if _is_norm(module) else "other"


class MaskKeeper:
    """Keeps the pruned positions of masked weights at exactly +0.0 while they train.

    Args:
        model: the model whose linears are masked.
        masks: keep-masks by module name, each shaped like the module's weight parameter.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor | PackedMask]) -> None:
        self.entries: list[tuple[str, nn.Parameter, torch.Tensor | PackedMask]] = []
        for name, mask in masks.items():
            weight = masked_weight(model, name).param
            if is_sharded(weight):  # the bool keep-mask of the local shard of an FSDP2 weight (heal/fsdp.py)
                keep: torch.Tensor | PackedMask = shard_like(as_bool(mask).bool(), weight)
            else:  # bit-packed on the weight's device, unpacked one weight at a time
                packed = mask if isinstance(mask, PackedMask) else PackedMask.pack(mask.bool())
                keep = PackedMask(packed.bits.to(weight.device), packed.shape)
            self.entries.append((name, weight, keep))
        self._grad_handles: list[Any] = []
        self._step_handles: dict[int, Any] = {}

    @torch.no_grad()
    def apply(self) -> None:
        """Writes +0.0 into every pruned position (also turns a stored -0.0 into +0.0)."""
        for _, weight, keep in self.entries:
            _remask(local(weight), as_bool(keep))

    def install_grad_hooks(self) -> None:
        """Registers a hook on each masked weight that masks its gradient.

        A plain weight's hook masks the gradient before it is accumulated (and before DDP's all-reduce).
        An FSDP2 weight is sharded and not itself in the autograd graph: its post-accumulate-grad hook,
        which FSDP2 calls after the reduce-scatter, masks the local gradient shard in place.
        """
        if self._grad_handles:
            return
        for _, weight, keep in self.entries:
            if is_sharded(weight):
                handle = weight.register_post_accumulate_grad_hook(_sharded_grad_hook(keep))
            else:
                handle = weight.register_hook(_grad_hook(keep))
            self._grad_handles.append(handle)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-masks the weights after every step of ``optimizer`` (unwrapping accelerate's wrapper), for a
        training loop of one's own; the heal stage's Trainer re-masks through :class:`MaskCallback`."""
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        if id(inner) not in self._step_handles:
            self._step_handles[id(inner)] = inner.register_step_post_hook(lambda *_: self.apply())

    def remove(self) -> None:
        """Removes every hook this keeper installed."""
        for handle in [*self._grad_handles, *self._step_handles.values()]:
            handle.remove()
        self._grad_handles.clear()
        self._step_handles.clear()

    def violations(self) -> int:
        """Pruned positions whose stored bits are not +0.0 (counts -0.0 too; this rank's shards only)."""
        return sum(count_violations(local(weight), as_bool(keep)) for _, weight, keep in self.entries)


def _remask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``W * m + 0.0`` in place: pruned positions become +0.0, kept ones keep their bits (but -0.0)."""
    return weight.mul_(keep).add_(0.0)  # (out, in) * (out, in) bool


def _grad_hook(keep: PackedMask) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # in place: a linear's weight gradient is a fresh product that only its accumulation reads;
        # multiplying it allocates no second weight-sized tensor per weight and step
        return grad.mul_(keep.unpack())  # (out, in) g * m

    return hook


def _sharded_grad_hook(keep: torch.Tensor) -> Callable[[nn.Parameter], None]:
    @torch.no_grad()
    def hook(param: nn.Parameter) -> None:
        local(param.grad).mul_(keep)  # (out / R, in) shard of g * m

    return hook


class MaskCallback(TrainerCallback):
    """The masked update of every Trainer step, in the order the Trainer runs it:

    ========================  ==========================================================================
    forward, backward         the gradient of each masked weight is ``g * m`` as it is produced (the
                              keeper's gradient hooks, installed by ``prepare``): accumulation, the DDP
                              all-reduce, clipping and the optimizer's moments see only ``g * m``
    clip, ``optimizer.step``  the Trainer's own (AdamW by default; any optimizer)
    ``on_optimizer_step``     ``W = W * m + 0.0``, right after the step: whatever the optimizer did to a
                              pruned position (weight decay, momentum), it is +0.0 again
    ========================  ==========================================================================

    Under ``--fsdp`` both act on each rank's shard (``MaskKeeper``); block-wise healing runs the same
    three steps in its own loop (``heal.recon.fit_unit``).
    """

    def __init__(self, keeper: MaskKeeper) -> None:
        self.keeper = keeper

    def on_train_begin(self, args, state, control, **kwargs):
        self.keeper.apply()  # the weights start masked (a stored -0.0 becomes +0.0)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.keeper.apply()  # W = W * m + 0.0 after every optimizer step


def save_verified(model: nn.Module, tokenizer, out_dir: str | os.PathLike, masks: dict[str, torch.Tensor],
                  pattern: str) -> tuple[int, int, dict]:
    """Freezes ``model``, writes it with its masks and checks every pruned position of the saved weights
    bit for bit (a failure raises: nothing is written). Returns (trainable, total parameters, report)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for param in model.parameters():
        param.requires_grad_(False)
    save_model(model, tokenizer, out_dir)
    save_masks(masks, Path(out_dir) / MASKS_FILE, {"pattern": pattern})
    report = verify_saved_masks(out_dir, masks, model)
    if not report["ok"]:
        # a non-finite weight times the mask stays non-finite: then the cause is the training's, not the
        # mask's (the products keep +0.0 for every finite weight)
        bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
        if bad:
            raise StageError("--lr", f"training left {bad} weights that are not finite; nothing was written: "
                                     "lower --lr or use float32")
        raise RuntimeError(f"{report['mask_violations']} pruned weights are not +0.0 after training; nothing "
                           "was written")
    log.info("verified: all %d pruned weights are +0.0 in the saved model", report["pruned_parameters"])
    return trainable, total, report


def verify_saved_masks(model_dir: str | os.PathLike, masks: dict[str, torch.Tensor | PackedMask],
                       model: nn.Module | None = None) -> dict:
    """Checks bit for bit that every pruned position of the saved weights is +0.0 (bool or bit-packed
    masks; one weight's mask is unpacked at a time).

    With ``model`` (the model that was saved), each mask is first laid out as ``save_pretrained`` wrote
    its weight (transformers' reverse conversion: a fused experts mask becomes one mask per expert and
    projection); without it, a mask ``name`` belongs to the saved tensor ``name.weight``.

    Returns:
        {"ok", "mask_violations" (pruned positions not +0.0), "negative_zeros" (of those, -0.0),
        "pruned_parameters", "layers_checked"}
    """
    files = weight_files(Path(model_dir))
    violations = negative = pruned_total = 0
    for name, mask in masks.items():
        for key, keep in _saved_masks(model, name, as_bool(mask)).items():
            if key not in files:
                raise RuntimeError(f"{key} is missing from the saved weights in {model_dir}")
            with safe_open(str(files[key]), framework="pt") as fh:
                weight = fh.get_tensor(key)
            pruned = ~keep
            violations += count_violations(weight, keep)
            negative += int((torch.signbit(weight[pruned]) & (weight[pruned] == 0)).sum())
            pruned_total += int(pruned.sum())
    return {"ok": violations == 0, "mask_violations": violations, "negative_zeros": negative,
            "pruned_parameters": pruned_total, "layers_checked": len(masks)}


def _saved_masks(model: nn.Module | None, name: str, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """A mask by the checkpoint key(s) of the weight it covers (see :func:`verify_saved_masks`)."""
    if model is None:
        return {f"{name}.weight": keep}
    return checkpoint_names(model, {masked_weight(model, name).state_name: keep})


@dataclass
class FullSettings(Settings):
    """Which parameters besides the decoder's linears ``--method full`` trains."""

    train_embeddings: bool = setting(False, "full: train the embeddings and lm_head too.")
    train_norms: bool = setting(True, "full: train the normalisation layers.")


@HEALERS.register("full", "dense")
class FullHealer(Healer):
    """Trains every surviving weight; pruned weights stay exactly zero (see the module docstring)."""

    settings = FullSettings
    defaults = {"lr": 2e-5, "scheduler": "cosine"}
    requires_sparsity = True
    packed_masks = True  # the keeper unpacks one weight's keep-mask at a time
    writes = "the healed weights themselves"
    options: FullSettings

    def __init__(self, options: FullSettings | None = None) -> None:
        super().__init__(options)
        self.keeper: MaskKeeper | None = None
        self.roles: dict[str, list[str]] = {}

    def prepare(self, model: nn.Module, masks: dict[str, torch.Tensor], seed: int,
                gradient_checkpointing: bool) -> nn.Module:
        """Chooses the trainable parameters, re-masks the weights and installs the gradient hooks."""
        cfg = self.options
        check_masks_match(model, masks)
        self.roles = select_trainable(model, masks, cfg.train_embeddings, cfg.train_norms)
        self.keeper = MaskKeeper(model, masks)
        self.keeper.apply()
        self.keeper.install_grad_hooks()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("full fine-tuning: %d trainable parameters (%d linear and expert, %d router, %d norm, %d "
                 "embedding tensors); %d masked weights", trainable, len(self.roles["linears"]),
                 len(self.roles["routers"]) if cfg.train_norms else 0,
                 len(self.roles["norms"]) if cfg.train_norms else 0,
                 len(self.roles["embeddings"]) if cfg.train_embeddings else 0, len(masks))
        return model

    def callbacks(self) -> list[TrainerCallback]:
        """Trainer callbacks this healer needs (the one that re-masks after each optimizer step)."""
        if self.keeper is None:
            raise RuntimeError("prepare() must run before callbacks()")
        return [MaskCallback(self.keeper)]

    def save(self, model: nn.Module, tokenizer, out_dir: Path, masks: dict[str, torch.Tensor],
             pattern: str) -> dict:
        """Writes a normal HF directory plus the masks, verifies them bit for bit, returns record fields."""
        if self.keeper is not None:
            self.keeper.remove()
        trainable, total, report = save_verified(model, tokenizer, out_dir, masks, pattern)
        tensors = {role: len(names) for role, names in self.roles.items()}
        pruned = report["pruned_parameters"]
        return {"mask_verification": report, "parameter_tensors": tensors, "trainable_parameters": trainable,
                "trainable_surviving_parameters": trainable - pruned, "total_parameters": total,
                **self.options.values()}

