"""The inputs of every decoder layer, exactly as a normal forward of the model gives them.

Passes that run the decoder layers one at a time (the prune driver, OWL's statistics, block-wise healing)
need, besides the hidden states, the keyword arguments the model's own forward passes each layer: the
attention mask, rotary tables, position ids. These differ between layers in many models: sliding-window
and full-attention layers get different masks (Gemma 2 and 3, GPT-OSS, every config with
``layer_types``), local and global layers different rotary bases (Gemma 3). So each layer's arguments are
recorded from the model's own forward, not replayed from layer 0's.

The capture runs the model's forward once per batch with a stand in each decoder layer's place that
records its keyword arguments and passes the hidden states through unchanged (nothing of the layers is
computed, and their hooks do not fire; the last stand stops the forward, so the head never runs). The recorder
returns what the layer returns (a tensor, or a tuple whose first item is the hidden states), learned by
running layer 0 itself once on the first batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["StopForward", "capture_layer_inputs", "at_layer", "run_layer"]

_DROPPED = ("hidden_states", "past_key_values", "past_key_value", "layer_past", "cache")


class StopForward(Exception):
    """Raised inside a forward to stop it once what was wanted of it is recorded."""


def _same_or(value: Any, first: Any) -> Any:
    """``first`` where ``value`` equals it exactly (then one tensor is held, not two), else ``value``."""
    if value is first:
        return first
    if isinstance(value, tuple) and isinstance(first, tuple) and len(value) == len(first):
        return tuple(_same_or(v, f) for v, f in zip(value, first, strict=True))
    if torch.is_tensor(value) and torch.is_tensor(first) and value.dtype == first.dtype \
            and value.shape == first.shape and value.device == first.device and torch.equal(value, first):
        return first
    return value


def _named_arguments(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """The hidden states and every other argument of a call of ``layer`` by name (some models pass the
    mask positionally: GPT-2), so that a replay passes them all as keywords."""
    signature = inspect.signature(layer.forward)
    bound = signature.bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise RuntimeError(f"{type(layer).__name__} takes extra positional arguments that cannot "
                                   "be replayed by name")
        else:
            named[name] = value
    first = next(iter(signature.parameters))  # the hidden states
    return named.pop(first), named


class _Stand(nn.Module):
    """Takes a decoder layer's place in its stack during the capture: its forward is the recorder's, every
    other attribute the layer's own (model loops read some, such as ``attention_type``). The layer's
    own hooks do not fire: nothing of it runs."""

    def __init__(self, layer: nn.Module, forward: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not registered: the stand owns no parameters
        object.__setattr__(self, "_recorded_forward", forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._recorded_forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


class _Recorder:
    """Stands in for every decoder layer during the capture (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.model, self.layers = model, layers
        self.tuple_tail: tuple | None = None  # what follows the hidden states in a tuple output; None: tensor
        self.probed = False
        self.hidden: torch.Tensor | None = None
        self.kwargs: list[dict] = []

    def forward_of(self, index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden, given = _named_arguments(self.layers[index], args, kwargs)
            kept = {k: v for k, v in given.items() if k not in _DROPPED}
            if index == 0:
                self.hidden, self.kwargs = hidden, []
                if not self.probed:  # what the layer returns, from one real forward
                    out = self.layers[0](hidden, **kept)
                    self.tuple_tail = tuple(out[1:]) if isinstance(out, tuple) else None
                    self.probed = True
            self.kwargs.append(kept)
            if index == len(self.layers) - 1:
                raise StopForward
            return hidden if self.tuple_tail is None else (hidden, *self.tuple_tail)
        return forward

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Puts a stand in each layer's place in its stack while the block is entered."""
        parent, attr = next((m, n) for m in self.model.modules() for n, c in m.named_children()
                            if c is self.layers)
        stands = nn.ModuleList(_Stand(layer, self.forward_of(i)) for i, layer in enumerate(self.layers))
        setattr(parent, attr, stands)
        try:
            yield
        finally:
            setattr(parent, attr, self.layers)


def _dedupe(kwargs: list[dict], reference: list[dict] | None) -> list[dict]:
    """Each layer's arguments with values equal to the previous layer's (or to the first batch's) held
    once: a mask or rotary table that every layer (or batch) shares is then one tensor."""
    out: list[dict] = []
    for index, kept in enumerate(kwargs):
        earlier = [out[-1]] if out else []
        if reference is not None and index < len(reference):
            earlier.append(reference[index])
        for other in earlier:
            kept = {k: _same_or(v, other.get(k)) if k in other else v for k, v in kept.items()}
        out.append(kept)
    return out


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, list[dict]]]:
    """Runs the model's forward on the calibration tokens and records what each decoder layer receives.

    Args:
        model: the causal LM (its layers may sit anywhere: none of them is computed, but layer 0 once).
        layers: its decoder stack.
        tokens: (N, T) calibration token ids.
        batch_size: samples per forward pass.
        device: where the embeddings run and the recorded tensors live.

    Returns:
        One (hidden (B, T, d) input of layer 0, [keyword arguments of layer i for each layer i]) pair per
        batch of ``batch_size`` samples.
    """
    recorder = _Recorder(model, layers)
    captured: list[tuple[torch.Tensor, list[dict]]] = []
    first = layers[0]
    home = next(first.parameters()).device
    with recorder.installed():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)  # (B, T)
            probing = not recorder.probed
            if probing:
                first.to(device)  # the probe computes layer 0 once, where the inputs are
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
            if probing:
                first.to(home)
            if len(recorder.kwargs) != len(layers):
                raise RuntimeError(f"the model's forward called {len(recorder.kwargs)} of its {len(layers)} "
                                   "decoder layers")
            reference = captured[0][1] if captured else None
            captured.append((recorder.hidden.detach(), _dedupe(recorder.kwargs, reference)))
    return captured


def at_layer(batches: list[tuple[torch.Tensor, list[dict]]], index: int) -> list[tuple[torch.Tensor, dict]]:
    """The (hidden states, keyword arguments of layer ``index``) pairs of captured batches; the hidden
    states are the batches' own tensors, so writing them in place advances the stream."""
    return [(hidden, kwargs[index]) for hidden, kwargs in batches]


def run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], in_place: bool = False) -> None:
    """Runs every (hidden (B, T, d), keyword arguments) batch through ``layer``; with ``in_place`` each
    batch's hidden states are replaced by the layer's outputs, so one copy of the activations is held."""
    for hidden, kwargs in batches:
        out = layer(hidden, **kwargs)
        if in_place:
            hidden.copy_(out[0] if isinstance(out, tuple) else out)
