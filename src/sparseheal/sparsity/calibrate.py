"""The layer-by-layer driver shared by every pruning method.

Captures the inputs of the first decoder layer for all calibration samples, and the keyword arguments
the model's forward gives each layer (``capture.py``), then for each layer: collects statistics for all
its prunable matrices from the dense layer (``feed.py``: linears by forward pre-hooks, each expert of a
fused tensor from the tokens the model's router sends it), prunes them, recomputes the layer's outputs
with the pruned layer and passes them on as the next layer's inputs.
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

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseheal.checks import positive
from sparseheal.checks import seed as seed_check
from sparseheal.layout import layer_weights
from sparseheal.models import decoder_layers
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.capture import StopForward, at_layer, capture_layer_inputs, run_layer
from sparseheal.sparsity.feed import Feeder, eager_experts
from sparseheal.sparsity.heap import heap_kept, populate_writable, trim_heap
from sparseheal.sparsity.masks import PackedMask
from sparseheal.sparsity.patterns import Pattern

__all__ = ["CalibrationSettings", "Choice", "capture_layer_inputs", "run_layer", "prune_model"]

log = logging.getLogger(__name__)


@dataclass
class CalibrationSettings(Settings):
    """The calibration draw (as the Wanda/SparseGPT reference draws it) and how it is batched."""

    calibration_data: str = setting("c4", "c4, wikitext2, ptb, or a local file or directory.")
    nsamples: int = setting(128, "calibration samples.", check=positive)
    seqlen: int = setting(2048, "tokens per calibration sample.", check=positive)
    seed: int = setting(0, "seed of the calibration draw.", check=seed_check)
    calibration_batch_size: int = setting(2, "samples per forward pass through a layer.", check=positive)

    def spec(self) -> dict:
        """The draw as the record states it."""
        return {"source": self.calibration_data, "nsamples": self.nsamples, "seqlen": self.seqlen,
                "seed": self.seed, "batch_size": self.calibration_batch_size}


@dataclass(frozen=True, eq=False)
class Choice:
    """How one weight is pruned: its method's pruner class and options, its pattern and its sparsity
    (for a sparsity plan; without one every weight takes the method, pattern and ratio given)."""

    pruner: type[LinearPruner]
    options: Settings | None
    pattern: Pattern
    sparsity: float


def _collect_statistics(layer: nn.Module, index: int, pruners: dict[str, LinearPruner], batches: list,
                        unreached: dict[str, list[int]]) -> list[list[str]]:
    """Feeds every calibration batch through decoder layer ``index`` (up to its last matrix's input) to
    the pruners' statistics; an expert no token reached takes the pooled statistics of the others.

    Returns:
        The matrices grouped by the input they share (the one fed first), each matrix in one group.
    """
    one_kind = len({type(p) for p in pruners.values()}) == 1  # a plan may mix methods: each is fed its own
    share = one_kind and all(bool(p.statistics) for p in pruners.values())
    feeder = Feeder(pruners, share)
    with feeder.installed():
        for hidden, kwargs in batches:
            with contextlib.suppress(StopForward):
                layer(hidden, **kwargs[index])
            feeder.end_batch()
    leaders = feeder.leaders or {}
    groups = {name: [name] for name in pruners if name not in leaders}
    for follower, leader in leaders.items():
        pruners[follower].adopt(pruners[leader])
        groups[leader].append(follower)
    unreached.update(_pool_unreached(pruners, feeder.fed))
    return list(groups.values())


def _pool_unreached(pruners: dict[str, LinearPruner], fed: set[str]) -> dict[str, list[int]]:
    """Gives each expert that no calibration token reached the summed statistics of the experts of its
    tensor that were reached (the best estimate of its inputs there is: its tensor's own token mix).

    Returns:
        The unreached experts' indices by mask key.
    """
    unreached: dict[str, list[int]] = {}
    for name, pruner in pruners.items():
        if pruner.slot.expert is not None and name not in fed:
            unreached.setdefault(pruner.slot.weight.key, []).append(pruner.slot.expert)
    for key, experts in unreached.items():
        reached = [p for n, p in pruners.items() if n in fed and p.slot.weight.key == key]
        if not reached:
            raise RuntimeError(f"no calibration token reached any expert of {key}")
        for expert in experts:
            pruner = pruners[f"{key}[{expert}]"]
            for other in reached:
                pruner.absorb(other)
        log.info("%s: %d experts no calibration token reached take the pooled statistics of the other %d",
                 key, len(experts), len(reached))
    return unreached


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
    nm: tuple[int, int] | Pattern | None,
    sparsity: float,
    batch_size: int = 2,
    device: torch.device | str | None = None,
    offload: bool = False,
    options: Settings | None = None,
    layer_sparsity: list[float] | None = None,
    park: Callable[[nn.Module], None] | None = None,
    unreached: dict[str, list[int]] | None = None,
    input_orders: dict[str, torch.Tensor] | None = None,
    choices: dict[str, Choice | None] | None = None,
    used: dict[str, Choice] | None = None,
) -> dict[str, PackedMask]:
    """Prunes every prunable weight of every decoder layer in place (see :mod:`sparseheal.layout`).

    Args:
        model: a causal LM (its decoder stack is found structurally).
        pruner_cls: the method's LinearPruner subclass.
        tokens: (N, T) calibration tokens; unused by methods that need no calibration.
        nm: (n, m), or any :class:`~sparseheal.sparsity.patterns.Pattern`, or None for unstructured.
        sparsity: fraction pruned (unstructured).
        batch_size: calibration samples per forward pass.
        device: compute device for the current layer (default: the model's).
        offload: the model stays in host memory and each decoder layer visits ``device`` only while it
            is pruned; device memory then holds one layer plus the calibration activations.
        options: the method's own settings (``pruner_cls.settings`` built), passed to each pruner.
        layer_sparsity: one sparsity per decoder layer (OWL), instead of ``sparsity`` for all.
        park: called with each layer once nothing reads it any more (see ``sparsity/parking.py``).
        unreached: filled, when given, with the experts no calibration token reached, by mask key.
        input_orders: filled, when given, with the input order of each weight whose N:M groups run along
            permuted inputs (RIA's reallocation), by mask key: (in,) long, or (E, in) for fused experts.
        choices: a sparsity plan's choice for each mask key (None: kept dense); a ratio a rule gives
            moves with the layer by ``layer_sparsity[l] - sparsity`` (OWL).
        used: filled, when given, with the choice each pruned weight was pruned by, by mask key.

    Returns:
        Bit-packed keep-masks by mask key (a linear's module name, or a fused experts parameter's name),
        each shaped like its parameter.
    """
    stack_name, layers = decoder_layers(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    home = next(layers[0].parameters()).device  # where each layer returns to with ``offload``
    kept = heap_kept() if device.type == "cpu" else contextlib.nullcontext()  # trimmed on leaving
    with kept, eager_experts(model):
        batches = None
        calibrated = [pruner_cls] + [c.pruner for c in (choices or {}).values() if c is not None]
        if any(cls.needs_calibration for cls in calibrated):
            if tokens is None:
                raise ValueError("this method needs calibration tokens")
            if offload:
                _move_all_but_layers(model, stack_name, device)
            batches = capture_layer_inputs(model, layers, tokens, batch_size, device)
        ratios = [sparsity] * len(layers) if layer_sparsity is None else layer_sparsity
        shape = nm if isinstance(nm, Pattern) else Pattern("nm", *nm) if nm else Pattern("unstructured")
        default = Choice(pruner_cls, options, shape, sparsity)
        choose = _chooser(stack_name, default, ratios, sparsity, choices, {} if used is None else used)
        masks = _prune_layers(layers, stack_name, choose, batches, device, home if offload else None, park,
                              unreached, input_orders)
        del batches  # freed before the heap is handed back
        if offload:
            model.to(home)
    return masks


def _same_choice(members: list[LinearPruner],
                 chosen: dict[str, Choice]) -> list[tuple[Choice, list[LinearPruner]]]:
    """The members of a group split by their choice (pruned together only when it is one)."""
    parts: dict[tuple, tuple[Choice, list[LinearPruner]]] = {}
    for pruner in members:
        choice = chosen[pruner.slot.weight.key]
        key = (choice.pruner, id(choice.options), choice.pattern, choice.sparsity)
        parts.setdefault(key, (choice, []))[1].append(pruner)
    return list(parts.values())


def _chooser(stack_name: str, default: Choice, ratios: list[float], target: float,
             choices: dict[str, Choice | None] | None,
             used: dict[str, Choice]) -> Callable[[int, str], Choice | None]:
    """``choose(layer, key)``: the choice for a layer's weight (its key relative to the layer), its ratio
    moved by the layer's offset from ``target`` when the pattern takes one (noted in ``used``)."""
    def choose(index: int, key: str) -> Choice | None:
        full = f"{stack_name}.{index}.{key}"
        choice = default if choices is None else choices.get(full, default)
        if choice is not None and choice.pattern.implied is None and ratios[index] != target:
            ratio = min(max(choice.sparsity + ratios[index] - target, 0.0), 0.99)
            choice = Choice(choice.pruner, choice.options, choice.pattern, ratio)
        if choice is not None:
            used[full] = choice
        return choice

    return choose


def _prune_layers(layers: nn.ModuleList, stack_name: str, choose: Callable[[int, str], Choice | None],
                  batches: list | None, device: torch.device, home: torch.device | None,
                  park: Callable[[nn.Module], None] | None, unreached: dict[str, list[int]] | None,
                  input_orders: dict[str, torch.Tensor] | None = None) -> dict[str, PackedMask]:
    """The layer loop of :func:`prune_model`: prune each layer, pass its outputs on, send it ``home``
    (offload), park it."""
    masks: dict[str, PackedMask] = {}
    missed: dict[str, list[int]] = {} if unreached is None else unreached
    orders: dict[str, torch.Tensor] = {} if input_orders is None else input_orders
    for index, layer in enumerate(tqdm(layers, desc="pruning layers", unit="layer")):
        layer.to(device)
        prefix = f"{stack_name}.{index}."
        pruned, layer_missed, layer_orders = _prune_layer(layer, index, choose, batches)
        masks.update({prefix + name: mask for name, mask in pruned.items()})
        orders.update({prefix + name: order for name, order in layer_orders.items()})
        missed.update({prefix + key: experts for key, experts in layer_missed.items()})
        if batches is not None and index < len(layers) - 1:  # the last layer's outputs feed nothing
            run_layer(layer, at_layer(batches, index), in_place=True)
        if home is not None:
            layer.to(home)
        if park is not None:  # the layer's pages go back to the system, and its freed temporaries
            park(layer)
            trim_heap()
    return masks


def _prune_layer(layer: nn.Module, index: int, choose: Callable[[int, str], Choice | None],
                 batches: list | None) -> tuple[dict[str, PackedMask], dict[str, list[int]],
                                                dict[str, torch.Tensor]]:
    """Prunes every prunable matrix of decoder layer ``index`` (statistics from ``batches`` first).

    Returns:
        (its packed masks by mask key relative to the layer, the experts no token reached by key, the
        permuted input orders by key)
    """
    chosen = {key: choose(index, key) for key in layer_weights(layer)}
    weights = {key: w for key, w in layer_weights(layer).items() if chosen[key] is not None}  # else dense
    pruners = {slot.name: chosen[key].pruner(slot, chosen[key].options)
               for key, w in weights.items() for slot in w.slots()}
    populate_writable(w.param for w in weights.values())  # read, then written in place
    unreached: dict[str, list[int]] = {}
    if batches is not None and pruners and any(p.needs_calibration for p in pruners.values()):
        groups = _collect_statistics(layer, index, pruners, batches, unreached)
    else:
        groups = [[n] for n in pruners]
    stored, order_of = {}, {}  # each matrix's mask in its stored orientation, filled group by group
    for group in groups:  # statistics freed as we go
        members = [pruners.pop(name) for name in group]
        for choice, part in _same_choice(members, chosen):
            if choice.pattern.kind in ("vnm", "block"):
                pruned = [p.prune_shaped(choice.pattern, choice.sparsity) for p in part]
            else:
                pruned = type(part[0]).prune_group(part, choice.pattern.nm, choice.sparsity)
            stored.update(zip([p.slot.name for p in part], pruned, strict=True))
        order_of.update({p.slot.name: p.input_order.cpu() for p in members if p.input_order is not None})
    masks, orders = {}, {}
    for key, weight in weights.items():  # the layer's own order
        parts = [stored.pop(slot.name) for slot in weight.slots()]
        masks[key] = PackedMask.pack(parts[0] if weight.experts is None else torch.stack(parts))
        if any(slot.name in order_of for slot in weight.slots()):
            ranks = [order_of[slot.name] for slot in weight.slots()]
            orders[key] = ranks[0] if weight.experts is None else torch.stack(ranks)
    return masks, unreached, orders
