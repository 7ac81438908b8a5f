"""Reconstruction units of a decoder layer, what they receive and return, and the masked fit of one unit.

Block-wise healing (``heal/blockwise.py``) trains a sparse unit ``g`` to reproduce its dense twin ``g*``:

    min_{W ⊙ M}  mean_b || g(U_b; W ⊙ M) - g*(U*_b) ||²

A unit is a whole decoder layer (``--granularity layer``, EBFT: Guo et al. 2024,
https://arxiv.org/abs/2402.12419) or one submodule of it (``--granularity submodule``: the attention, the
MLP, and in a mixture-of-experts layer each expert group, the routed experts and any shared experts,
separately; "A Free Lunch in LLM Compression", Roux et al. 2025, https://arxiv.org/abs/2510.14444, finds
attention and MLP reconstructed separately about Pareto-optimal). ``U*`` is what the dense model feeds
its own unit, ``U`` what the unit is trained on (``--recon-inputs``): ``sparse``, what the sparse model
healed so far feeds it (EBFT's choice, and the Free Lunch paper's: errors of earlier units are then
corrected downstream); ``dense``, ``U*`` itself; ``mix``, one of the two per step at random.

The loss (``--recon-loss``) is the mean squared error, or the relative one, each token's squared error
over its dense target's squared norm:

    relative:  mean_{b,t} || g(U_b)_t - Y_bt ||² / (|| Y_bt ||² + ε)

In many decoders the first token of a sequence carries a massive activation (smollm2-135m: a norm of
about 22 500 against a median of 132 after layer 11; after Wanda 50% its error was 98% of the squared
error of layer 11's output and 92% of layer 19's), so MSE reconstruction spends its steps on that one
token; the relative loss weighs every token alike.

The inputs of a submodule are taken from a forward of its layer with a hook on the submodule (the rest of
the layer is skipped once the hook has fired); targets from one forward of the dense twin with hooks on
every unit. Routers keep their weights in submodule granularity (their outputs are not reconstructed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparseheal.errors import ConfigError
from sparseheal.heal.full import MaskKeeper
from sparseheal.layout import layer_weights
from sparseheal.sparsity.capture import StopForward

__all__ = ["GRANULARITIES", "INPUT_MODES", "LOSSES", "recon_loss", "Call", "FitSchedule", "layer_units",
           "tap_units", "unit_loss", "fit_unit", "call_module", "feeding_norms", "NormedUnit",
           "trained_names", "check_holdout"]

GRANULARITIES = ("layer", "submodule")
INPUT_MODES = ("sparse", "dense", "mix")
LOSSES = ("mse", "relative")
_EPS = 1e-6  # keeps a zero target's relative error finite


@dataclass
class Call:
    """One call of a unit: its positional and keyword arguments (on the host) and its first output."""

    args: tuple
    kwargs: dict
    output: torch.Tensor | None = None


@dataclass
class FitSchedule:
    """How one unit trains: AdamW with a schedule, ``epochs`` passes, early stopping after ``patience``
    held-out checks without improvement (0: never stops early)."""

    lr: float
    weight_decay: float
    scheduler: str
    warmup_steps: int
    max_grad_norm: float
    epochs: float
    patience: int = 0
    loss: str = "mse"


def layer_units(layer: nn.Module, granularity: str) -> list[str]:
    """The units of a decoder layer by path inside it (``""``: the layer itself), in declaration order.

    In ``submodule`` granularity: each child of the layer holding pruned weights, with a child that holds
    routed experts split into its own children holding pruned weights (the expert groups).

    Raises:
        ValueError: the layer holds a pruned weight (or a bare linear) itself, or all of them in one
            submodule.
    """
    if granularity == "layer":
        return [""]
    weights = layer_weights(layer)
    paths = {id(module): path for path, module in layer.named_modules()}
    units: list[str] = []
    for key, weight in weights.items():
        owner = paths[id(weight.module)].split(".")
        if owner == [""] or (len(owner) == 1 and weight.family != "experts"):
            raise ValueError(f"the layer holds {key} itself, not inside an attention or MLP submodule")
        depth = 2 if any(w.family == "experts" and paths[id(w.module)].split(".")[0] == owner[0]
                         for w in weights.values()) and len(owner) >= 2 else 1
        unit = ".".join(owner[:depth])
        if unit not in units:
            units.append(unit)
    if len(units) < 2:
        raise ValueError(f"every pruned weight sits in one submodule ({units[0] if units else 'none'})")
    return units


def _host(value: Any, keep: dict[int, Any]) -> Any:
    """A captured value on the host, detached and copied unless it is one of the layer's own arguments
    (``keep``, by identity: rotary tables and masks shared by every batch are then held once)."""
    if id(value) in keep:
        return value
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, tuple):
        return tuple(_host(v, keep) for v in value)
    if isinstance(value, dict):
        return {k: _host(v, keep) for k, v in value.items()}
    return value


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _to(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def call_module(module: nn.Module, args: tuple, kwargs: dict, device: torch.device) -> torch.Tensor:
    """``module(*args, **kwargs)`` with its arguments on ``device``; the first output (B, T, d)."""
    return _first(module(*_to(args, device), **_to(kwargs, device)))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


@torch.no_grad()
def feeding_norms(layer: nn.Module, units: list[str], batch: tuple, device: torch.device) -> dict:
    """For each unit, the norm of the layer (outside every unit) whose output the unit takes as an
    argument, and where: ``{unit: (norm path, position or keyword)}``, from one forward of one batch.

    A unit reconstructed with its feeding norm can rescale its own inputs (the norm's weight), which a
    layer reconstructed whole can too; without it, a unit behind a norm cannot."""
    inside = tuple(u + "." for u in units)
    norms = {path: m for path, m in layer.named_modules() if path and _is_norm(m) and
             path not in units and not path.startswith(inside)}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are held: their ids stay theirs
    found: dict[str, tuple[str, int | str]] = {}

    def after_norm(path: str):
        return lambda module, args, output: outputs.__setitem__(id(output), (path, output))

    def before_unit(unit: str):
        def check(module, args, kwargs):
            for slot, value in [*enumerate(args), *kwargs.items()]:
                if unit not in found and torch.is_tensor(value) and id(value) in outputs:
                    found[unit] = (outputs[id(value)][0], slot)
        return check

    handles = [m.register_forward_hook(after_norm(p)) for p, m in norms.items()]
    handles += [layer.get_submodule(u).register_forward_pre_hook(before_unit(u), with_kwargs=True)
                for u in units]
    try:
        call_module(layer, batch[:1], batch[1], device)
    finally:
        for handle in handles:
            handle.remove()
    return found


class NormedUnit(nn.Module):
    """A unit behind the norm that feeds it: ``forward(x, *args, **kwargs)`` puts ``norm(x)`` in the
    unit's argument ``slot`` (a position or a keyword) and calls the unit, so both train together."""

    def __init__(self, norm: nn.Module, unit: nn.Module, slot: int | str) -> None:
        super().__init__()
        self.norm, self.unit, self.slot = norm, unit, slot

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        normed = self.norm(x)  # (B, T, d)
        if isinstance(self.slot, int):
            args = (*args[: self.slot], normed, *args[self.slot + 1 :])
        else:
            kwargs = {**kwargs, self.slot: normed}
        return self.unit(*args, **kwargs)


@torch.no_grad()
def tap_units(layer: nn.Module, units: list[str], stream: list, device: torch.device,
              stop: bool = False, advance: bool = False, norms: dict | None = None) -> dict[str, list[Call]]:
    """Runs each (hidden (B, T, d), keyword arguments) batch of ``stream`` through ``layer`` and records
    every call of each unit (arguments, first output), units in the order the forward calls them; with
    ``stop`` the forward ends after the last unit, with ``advance`` each batch's hidden states are replaced
    by the layer's outputs. A unit with a feeding norm (``norms``, from :func:`feeding_norms`) is recorded
    with the norm's input first, as :class:`NormedUnit` takes it.

    Raises:
        ValueError: a unit did not run exactly once per forward of the layer.
    """
    calls: dict[str, list[Call]] = {}
    last, norms, norm_inputs = units[-1], norms or {}, {}

    def hook(unit: str, keep: dict[int, Any]):
        def record(module, args, kwargs, output):
            fed = (_host(norm_inputs[norms[unit][0]], {}),) if unit in norms else ()
            calls.setdefault(unit, []).append(Call(fed + _host(args, keep), _host(kwargs, keep),
                                                   _host(_first(output), {})))
            if stop and unit == last:
                raise StopForward
        return record

    for number, (hidden, kwargs) in enumerate(stream):
        keep = {id(v): v for v in kwargs.values()}
        handles = [layer.get_submodule(u).register_forward_hook(hook(u, keep), with_kwargs=True)
                   for u in units]
        handles += [layer.get_submodule(n).register_forward_hook(
            lambda m, args, out, n=n: norm_inputs.__setitem__(n, args[0])) for n, _ in set(norms.values())]
        try:
            out = call_module(layer, (hidden,), kwargs, device)  # (B, T, d)
            if advance:
                hidden.copy_(out)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        for unit in units:
            if len(calls.get(unit, ())) != number + 1:
                raise ValueError(f"{unit} ran {len(calls.get(unit, ())) - number} times in one forward of "
                                 "its layer, not once")
    return calls


def recon_loss(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The reconstruction loss of one batch, outputs and targets (B, T, d), in float32 (see the module
    docstring): ``mse``, or ``relative`` (each token's squared error over its target's squared norm)."""
    output, target = output.float(), target.float()
    if kind == "mse":
        return F.mse_loss(output, target)
    error = (output - target).pow(2).sum(-1)  # (B, T)
    return (error / (target.pow(2).sum(-1) + _EPS)).mean()


def unit_loss(module: nn.Module, inputs: list[Call], targets: list[torch.Tensor],
              device: torch.device, kind: str = "mse") -> float:
    """Mean over batches of the loss ``kind`` between g(U_b) and Y_b."""
    if not inputs:
        return float("nan")
    with torch.no_grad():
        losses = [recon_loss(call_module(module, c.args, c.kwargs, device), y.to(device), kind)
                  for c, y in zip(inputs, targets, strict=True)]
    return float(torch.stack(losses).mean())


def _steps(schedule: FitSchedule, batches: int, seed: int) -> list[int]:
    """The batch of each step: ``epochs`` passes, each in a fresh seeded order."""
    total = max(1, round(schedule.epochs * batches))
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(total / batches)
    order = torch.cat([torch.randperm(batches, generator=generator) for _ in range(passes)])
    return order[:total].tolist()


class _Checks:
    """The held-out loss before training and after every epoch; with ``patience``, the best weights."""

    def __init__(self, module: nn.Module, heldout: list[tuple[Call, torch.Tensor]], patience: int,
                 device: torch.device, kind: str) -> None:
        self.module, self.device, self.patience, self.kind = module, device, patience, kind
        self.inputs, self.targets = [c for c, _ in heldout], [y for _, y in heldout]
        self.losses: list[float] = []
        self.best: tuple[int, list[torch.Tensor]] | None = None
        self.stale = 0
        if heldout:
            self.check()

    def check(self) -> bool:
        """Measures the held-out loss; returns whether training should stop."""
        training = self.module.training
        self.module.eval()
        self.losses.append(unit_loss(self.module, self.inputs, self.targets, self.device, self.kind))
        self.module.train(training)
        if not self.patience:
            return False
        if self.best is None or self.losses[-1] < self.losses[self.best[0]]:
            self.best = (len(self.losses) - 1, [p.detach().clone() for p in self.module.parameters()])
            self.stale = 0
        else:
            self.stale += 1
        return self.stale >= self.patience

    @torch.no_grad()
    def restore_best(self) -> int | None:
        """Puts back the weights of the best check (masked when taken); returns that check's number."""
        if self.best is None:
            return len(self.losses) - 1 if self.losses else None
        if self.best[0] != len(self.losses) - 1:
            for p, kept in zip(self.module.parameters(), self.best[1], strict=True):
                p.copy_(kept)
        return self.best[0]


def fit_unit(module: nn.Module, masks: dict[str, torch.Tensor], choices: list[list[Call]],
             targets: list[torch.Tensor], heldout: list[tuple[Call, torch.Tensor]], schedule: FitSchedule,
             seed: int, device: torch.device, desc: str, only: set[str] | None = None) -> dict:
    """Trains ``module`` (masked weights by ``masks``, keyed inside it) so that g(U_b) ≈ Y_b.

    Args:
        choices: per training batch, the inputs a step may take (one, or the sparse and dense ones to
            pick from at random).
        targets: per training batch, the dense twin's output Y_b (B, T, d).
        heldout: (sparse inputs, target) pairs checked after every epoch; with ``schedule.patience``,
            training stops after that many checks without a new best and the best weights are restored.
        seed: seeds the batch order and the input picks.
        only: the names (inside ``module``) of the parameters to train; None: all of them.

    Returns:
        steps run and planned, the mean training loss of the first and the last epoch, the held-out
        loss before training and after each epoch, and the check whose weights were kept.
    """
    from transformers import get_scheduler

    keeper = MaskKeeper(module, masks)
    keeper.apply()
    keeper.install_grad_hooks()
    params = [p for name, p in module.named_parameters() if only is None or name in only]
    for p in params:
        p.requires_grad_(True)
    order, pick = _steps(schedule, len(choices), seed), torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    lr_schedule = get_scheduler(schedule.scheduler, optimizer, schedule.warmup_steps, len(order))
    checks, losses = _Checks(module, heldout, schedule.patience, device, schedule.loss), []
    module.train()
    for batch in tqdm(order, desc=desc, unit="step", leave=False):
        options = choices[batch]
        call = options[int(torch.randint(len(options), (1,), generator=pick))] if len(options) > 1 \
            else options[0]
        # the sparse unit's output against its dense twin's on this batch, (B, T, d) -> a scalar
        loss = recon_loss(call_module(module, call.args, call.kwargs, device), targets[batch].to(device),
                          schedule.loss)
        loss.backward()  # the keeper's hooks zero the gradients of pruned weights
        if schedule.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
        optimizer.step()
        keeper.apply()  # W = W * m + 0.0: pruned weights stay exactly +0.0
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        epoch_end = len(losses) % len(choices) == 0 or len(losses) == len(order)
        if heldout and epoch_end and checks.check():
            break
    module.eval()
    kept = checks.restore_best()
    keeper.remove()
    for p in params:
        p.requires_grad_(False)
    epoch = min(len(choices), len(losses))
    return {"steps": len(losses), "planned_steps": len(order),
            "train_loss_first_epoch": sum(losses[:epoch]) / epoch,
            "train_loss_last_epoch": sum(losses[-epoch:]) / epoch, "heldout": checks.losses,
            "kept_check": kept}


def trained_names(unit: nn.Module, which: str) -> set[str] | None:
    """The parameters of a unit that train (None: all)."""
    if which == "all":
        return None
    from sparseheal.heal.perp import perp_parameters

    return {name for names in perp_parameters(unit).values() for name in names}


def check_holdout(holdout: int, nsamples: int, batch_size: int) -> None:
    """A held-out slice of whole batches that leaves at least one batch to train on."""
    if holdout % batch_size:
        raise ConfigError("--holdout", f"hold out whole batches: a multiple of --batch-size {batch_size}; "
                                       f"got {holdout}")
    if holdout >= nsamples:
        raise ConfigError("--holdout", f"hold out fewer than the {nsamples} calibration samples; "
                                       f"got {holdout}")
