"""The layer-by-layer driver shared by every pruning method.

Captures the inputs of the first decoder layer for all calibration samples, then for each layer:
collects statistics for all its linears from the dense layer (forward pre-hooks), prunes them,
recomputes the layer's outputs with the pruned layer and passes them on as the next layer's inputs.
Samples go through each layer in batches; only the current layer needs to be on the compute device.

No work whose result is unused: the statistics pass stops each layer's forward at its last linear's
input, linears that read one input share one statistic (see ``LinearPruner.statistics``) and are
pruned as one group (``LinearPruner.prune_group``), and the last layer's pruned outputs are not
computed. On the CPU the loop keeps freed heap memory for reuse instead of faulting it in again at
every forward, and copies each layer's weights out of the loaded file's map in one call before they
are read and then written (see ``heap.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseheal.checks import positive
from sparseheal.models import decoder_layers, prunable_linears
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.heap import heap_kept, populate_writable, trim_heap
from sparseheal.sparsity.masks import PackedMask

__all__ = ["CalibrationSettings", "capture_layer_inputs", "run_layer", "prune_model"]

log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings(Settings):
    """The calibration draw (as the Wanda/SparseGPT reference draws it) and how it is batched."""

    calibration_data: str = setting("c4", "c4, wikitext2, ptb, or a local file or directory.")
    nsamples: int = setting(128, "calibration samples.", check=positive)
    seqlen: int = setting(2048, "tokens per calibration sample.", check=positive)
    seed: int = setting(0, "seed of the calibration draw.")
    calibration_batch_size: int = setting(2, "samples per forward pass through a layer.", check=positive)

    def spec(self) -> dict:
        """The draw as the record states it."""
        return {"source": self.calibration_data, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed, "batch_size": self.calibration_batch_size}


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, dict]]:
    """Runs the model up to its first decoder layer and records that layer's inputs.

    Args:
        tokens: (N, T) calibration token ids.

    Returns:
        One (hidden (B, T, d), keyword arguments) pair per batch of ``batch_size`` samples.
    """
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
        if captured:  # the rotary cos/sin and position ids of equal-length batches are held once
            kept = {k: _same_or(v, captured[0][1].get(k)) for k, v in kept.items()}
        captured.append((hidden.detach(), kept))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)  # (B, T)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _same_or(value: Any, first: Any) -> Any:
    """``first`` (the first batch's keyword argument) where ``value`` equals it exactly, else ``value``."""
    if isinstance(value, tuple) and isinstance(first, tuple) and len(value) == len(first):
        return tuple(_same_or(v, f) for v, f in zip(value, first, strict=True))
    if torch.is_tensor(value) and torch.is_tensor(first) and value.dtype == first.dtype \
            and value.shape == first.shape and torch.equal(value, first):
        return first
    return value


def run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], in_place: bool = False) -> None:
    """Runs every batch through ``layer``; with ``in_place`` each batch's hidden states (B, T, d) are
    replaced by the layer's outputs, so only one copy of the activations is ever held."""
    for hidden, kwargs in batches:
        out = layer(hidden, **kwargs)
        if in_place:
            hidden.copy_(out[0] if isinstance(out, tuple) else out)


class _Feeder:
    """Forward pre-hooks on a layer's linears that feed each distinct input to one pruner.

    Within one batch a linear whose input tensor is the very object an earlier linear received (q, k and
    v read the same normed hidden states; gate and up likewise) is not fed: after the pass it adopts
    the statistics of that earlier linear. Once every linear has received its input the layer's forward
    is stopped, so the last linear's product and the rest of the layer (whose outputs nothing reads:
    they are recomputed after pruning) are never computed.
    """

    def __init__(self, pruners: dict[str, LinearPruner], share: bool) -> None:
        self.pruners, self.share = pruners, share
        self.batch: list[tuple[torch.Tensor, str, str]] = []  # (input, linear, linear fed): inputs are held
        # for the whole batch, so an `is` comparison never meets a freed tensor's reused identity
        self.leaders: dict[str, str] | None = None  # follower -> the linear it shares an input with

    def hook(self, name: str) -> Callable:
        def feed(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            same = next((fed for seen, _, fed in self.batch if seen is x), None) if self.share else None
            self.batch.append((x, name, name if same is None else same))
            if same is None:
                self.pruners[name].add_batch(x.detach())
            if len({fed_name for _, fed_name, _ in self.batch}) == len(self.pruners):
                raise _StopForward
        return feed

    def end_batch(self) -> None:
        """Checks that every batch groups the linears alike (the adopted statistics cover every batch)."""
        leaders = {name: fed for _x, name, fed in self.batch if fed != name}
        if self.leaders is not None and leaders != self.leaders:
            raise RuntimeError(f"linears shared inputs differently between batches: {self.leaders} against "
                               f"{leaders}")
        self.leaders, self.batch = leaders, []


def _collect_statistics(layer: nn.Module, pruners: dict[str, LinearPruner], batches: list) -> list[list[str]]:
    """Feeds every calibration batch through ``layer`` (up to its last linear) to the pruners' statistics.

    Returns:
        The linears grouped by the input they share (the one fed first), each linear in one group.
    """
    share = all(bool(p.statistics) for p in pruners.values())
    feeder = _Feeder(pruners, share)
    handles = [p.module.register_forward_pre_hook(feeder.hook(name)) for name, p in pruners.items()]
    try:
        for hidden, kwargs in batches:
            with contextlib.suppress(_StopForward):
                layer(hidden, **kwargs)
            feeder.end_batch()
    finally:
        for handle in handles:
            handle.remove()
    leaders = feeder.leaders or {}
    groups = {name: [name] for name in pruners if name not in leaders}
    for follower, leader in leaders.items():
        pruners[follower].adopt(pruners[leader])
        groups[leader].append(follower)
    return list(groups.values())


def _stack_parent(model: nn.Module, stack_name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = stack_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _move_all_but_layers(model: nn.Module, stack_name: str, device: torch.device) -> None:
    """Moves embeddings, norms, rotary tables and the head to ``device``; the decoder layers stay put."""
    parent, attr = _stack_parent(model, stack_name)
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def prune_model(
    model: nn.Module,
    pruner_cls: type[LinearPruner],
    tokens: torch.Tensor | None,
    nm: tuple[int, int] | None,
    sparsity: float,
    batch_size: int = 2,
    device: torch.device | str | None = None,
    offload: bool = False,
    options: Settings | None = None,
    layer_sparsity: list[float] | None = None,
    park: Callable[[nn.Module], None] | None = None,
) -> dict[str, PackedMask]:
    """Prunes every linear of every decoder layer in place.

    Args:
        model: a causal LM (its decoder stack is found structurally).
        pruner_cls: the method's LinearPruner subclass.
        tokens: (N, T) calibration tokens; unused by methods that need no calibration.
        nm: (n, m) pattern or None for unstructured.
        sparsity: fraction pruned (unstructured).
        batch_size: calibration samples per forward pass.
        device: compute device for the current layer (default: the model's).
        offload: the model stays in host memory and each decoder layer visits ``device`` only while it
            is pruned; device memory then holds one layer plus the calibration activations.
        options: the method's own settings (``pruner_cls.settings`` built), passed to each pruner.
        layer_sparsity: one sparsity per decoder layer (OWL), instead of ``sparsity`` for all.
        park: called with each layer once nothing reads it any more (see ``sparsity/parking.py``).

    Returns:
        Bit-packed keep-masks by qualified module name, each shaped like the module's weight parameter.
    """
    stack_name, layers = decoder_layers(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    home = next(layers[0].parameters()).device  # where each layer returns to with ``offload``
    kept = heap_kept() if device.type == "cpu" else contextlib.nullcontext()  # trimmed on leaving
    with kept:
        batches = None
        if pruner_cls.needs_calibration:
            if tokens is None:
                raise ValueError("this method needs calibration tokens")
            if offload:
                _move_all_but_layers(model, stack_name, device)
            batches = capture_layer_inputs(model, layers[0], tokens, batch_size, device)
        masks = _prune_layers(layers, stack_name, pruner_cls, options, batches, nm,
                              [sparsity] * len(layers) if layer_sparsity is None else layer_sparsity,
                              device, home if offload else None, park)
        del batches  # freed before the heap is handed back
        if offload:
            model.to(home)
    return masks


def _prune_layers(layers: nn.ModuleList, stack_name: str, pruner_cls: type[LinearPruner],
                  options: Settings | None, batches: list | None, nm: tuple[int, int] | None,
                  sparsities: list[float], device: torch.device, home: torch.device | None,
                  park: Callable[[nn.Module], None] | None) -> dict[str, PackedMask]:
    """The layer loop of :func:`prune_model`: prune each layer, pass its outputs on, send it ``home``
    (offload), park it."""
    masks: dict[str, PackedMask] = {}
    for index, layer in enumerate(tqdm(layers, desc="pruning layers", unit="layer")):
        layer.to(device)
        for name, mask in _prune_layer(layer, pruner_cls, options, batches, nm, sparsities[index]).items():
            masks[f"{stack_name}.{index}.{name}"] = mask
        if batches is not None and index < len(layers) - 1:  # the last layer's outputs feed nothing
            run_layer(layer, batches, in_place=True)
        if home is not None:
            layer.to(home)
        if park is not None:  # the layer's pages go back to the system, and its freed temporaries
            park(layer)
            trim_heap()
    return masks


def _prune_layer(layer: nn.Module, pruner_cls: type[LinearPruner], options: Settings | None,
                 batches: list | None, nm: tuple[int, int] | None, sparsity: float) -> dict[str, PackedMask]:
    """Prunes every linear of one decoder layer (statistics from ``batches`` first) and packs its masks."""
    pruners = {name: pruner_cls(mod, options) for name, mod in prunable_linears(layer).items()}
    populate_writable(p.module.weight for p in pruners.values())  # read, then written in place
    groups = _collect_statistics(layer, pruners, batches) if batches is not None else [[n] for n in pruners]
    masks = dict.fromkeys(pruners)  # the layer's own order, filled group by group
    for group in groups:  # statistics freed as we go
        pruned = pruner_cls.prune_group([pruners.pop(name) for name in group], nm, sparsity)
        masks.update({name: PackedMask.pack(mask) for name, mask in zip(group, pruned, strict=True)})
    return masks
