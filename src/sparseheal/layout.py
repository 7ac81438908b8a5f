"""What a decoder layer holds: the weights a method prunes, their layout, and every parameter's family.

Found structurally, whatever the architecture:

- **linears**: ``nn.Linear`` (stored (out, in)) and GPT-2's ``Conv1D`` (stored (in, out));
- **fused experts**: mixture-of-experts layers hold their experts as 3-D parameters, one per projection,
  in the classes transformers marks with ``use_experts_implementation`` (they carry ``is_transposed``):
  (E, out, in), or (E, in, out) where ``is_transposed``. Each expert's matrix is pruned as a linear of its
  own (row-wise scores, N:M groups along the input dimension).

Families: ``attention``, ``mlp`` (shared experts included), ``experts`` (the routed experts),
``routers`` (a linear or 2-D weight giving one output per expert, or a single gating scalar), ``norms``
and ``other``. Routers and gates stay dense; so do norms and biases. A 3-D parameter of an experts class
transformers does not mark (its layout unknown) is left dense and named (:func:`unhandled_parameters`).

A mask key is the qualified name of a linear module (its ``weight`` implied) or of a fused experts
parameter; the mask has that parameter's shape (see docs/artifacts.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparseheal.errors import ConfigError
from sparseheal.models import decoder_layers, is_linear, prunable_linears

__all__ = [
    "FAMILIES",
    "MaskedWeight",
    "Slot",
    "layer_weights",
    "model_weights",
    "weight_layers",
    "masked_weight",
    "parameter_families",
    "unhandled_parameters",
    "check_prunable_layout",
    "family_table",
    "describe_families",
]

FAMILIES = ("attention", "mlp", "experts", "routers", "norms", "other")
_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)
_MLP = re.compile(r"mlp|ffn|^fc\d*$|feed_?forward|moe|expert", re.IGNORECASE)


@dataclass(frozen=True)
class MaskedWeight:
    """One masked parameter: a linear's weight or a fused experts tensor.

    Attributes:
        key: the mask key (module name for a linear, parameter name for fused experts).
        param: the parameter.
        layout: ``linear`` (out, in), ``conv1d`` (in, out), ``experts`` (E, out, in) or ``experts_t``
            (E, in, out).
        module: the module that owns ``param`` (forward pre-hooks of a linear go there).
        family: one of :data:`FAMILIES`.
    """

    key: str
    param: nn.Parameter
    layout: str
    module: nn.Module
    family: str

    @property
    def transposed(self) -> bool:
        """Whether each matrix is stored (in, out): GPT-2's Conv1D, experts marked ``is_transposed``."""
        return self.layout in ("conv1d", "experts_t")

    @property
    def state_name(self) -> str:
        """The parameter's name in the model's state dict (a linear's ``weight`` under its module)."""
        return self.key if self.experts is not None else f"{self.key}.weight"

    @property
    def experts(self) -> int | None:
        """The number of experts of a fused tensor; None for a linear."""
        return self.param.shape[0] if self.layout.startswith("experts") else None

    def matrix(self, expert: int | None = None) -> torch.Tensor:
        """The (out, in) view of the weight (of one expert of a fused tensor); edits reach the parameter."""
        data = self.param.data if expert is None else self.param.data[expert]
        return data.t() if self.transposed else data

    def rows(self) -> torch.Tensor:
        """The weight as (rows, in): every output row of every expert, inputs last (a copy where the
        stored layout has inputs first)."""
        data = self.param.detach()
        if self.layout == "conv1d":
            return data.t()
        if self.layout == "experts":
            return data.reshape(-1, data.shape[-1])
        if self.layout == "experts_t":
            return data.transpose(1, 2).reshape(-1, data.shape[1])
        return data

    def slots(self) -> list[Slot]:
        """The matrices a method prunes: the weight itself, or each expert's."""
        if self.experts is None:
            return [Slot(self, None)]
        return [Slot(self, e) for e in range(self.experts)]


@dataclass(frozen=True)
class Slot:
    """One matrix a method prunes: a linear's weight, or one expert's matrix of a fused tensor."""

    weight: MaskedWeight
    expert: int | None

    @property
    def name(self) -> str:
        return self.weight.key if self.expert is None else f"{self.weight.key}[{self.expert}]"

    def view(self) -> torch.Tensor:
        """(out, in) view of the matrix; in-place edits reach the parameter."""
        return self.weight.matrix(self.expert)

    def stored(self, mask: torch.Tensor) -> torch.Tensor:
        """An (out, in) keep-mask in the orientation of this matrix in its parameter."""
        return mask.t().contiguous() if self.weight.transposed else mask

    @classmethod
    def of_linear(cls, module: nn.Module, key: str = "") -> Slot:
        return cls(_linear_weight(key, module, "other"), None)


def _linear_weight(key: str, module: nn.Module, family: str) -> MaskedWeight:
    """The masked weight of a linear (nn.Linear, or GPT-2's Conv1D stored (in, out))."""
    layout = "linear" if isinstance(module, nn.Linear) else "conv1d"
    return MaskedWeight(key, module.weight, layout, module, family)


def _is_fused_experts(module: nn.Module) -> bool:
    """An experts class transformers marks with ``use_experts_implementation`` (its layout is known)."""
    return isinstance(getattr(module, "is_transposed", None), bool) and hasattr(module, "has_gate")


def _expert_tensors(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 3-D weight parameters (E, ., .) of a fused experts module (biases are 2-D)."""
    return {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _num_experts(layer: nn.Module) -> int | None:
    """The number of routed experts of an MoE layer (fused tensors, or a ModuleList named experts)."""
    for name, module in layer.named_modules():
        tensors = _expert_tensors(module)  # an experts class's, not a convolution's 3-D weight
        if tensors and (_is_fused_experts(module) or "expert" in type(module).__name__.lower()):
            return next(iter(tensors.values())).shape[0]
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "experts":
            return len(module)
    return None


def _chain(layer: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module from ``layer`` down to ``path`` (the layer itself excluded)."""
    chain, module = [], layer
    for part in path.split(".") if path else []:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
        chain.append((part, module))
    return chain


def _family(layer: nn.Module, path: str, param: torch.Tensor, n_experts: int | None) -> str:
    """The family of a parameter held by the module at ``path`` inside a decoder layer."""
    chain = _chain(layer, path)
    names = [name for name, _ in chain]
    classes = [type(module).__name__ for _, module in chain]
    owner = chain[-1][1] if chain else layer
    if "experts" in names or any(_is_fused_experts(m) for _, m in chain) or (
            chain and "expert" in classes[-1].lower() and "shared" not in path.lower()
            and param.dim() == 3):
        return "experts"
    if any("norm" in c.lower() for c in classes) or any("norm" in n.lower() for n in names[-1:]):
        return "norms"
    if any(_ATTENTION.search(c) for c in classes) or any(_ATTENTION.search(n) for n in names):
        return "attention"
    if any("router" in c.lower() for c in classes) or (
            param.dim() == 2 and n_experts is not None and param.shape[0] in (1, n_experts)
            and not isinstance(owner, nn.Embedding)):
        return "routers"
    if any(_MLP.search(c) for c in classes) or any(_MLP.search(n) for n in names):
        return "mlp"
    return "other"


def parameter_families(layer: nn.Module) -> dict[str, str]:
    """The family of every parameter of a decoder layer, by its name inside the layer."""
    n_experts = _num_experts(layer)
    families = {}
    for name, param in layer.named_parameters():
        path = name.rpartition(".")[0]
        families[name] = _family(layer, path, param, n_experts)
    return families


def layer_weights(layer: nn.Module) -> dict[str, MaskedWeight]:
    """The weights a method prunes in one decoder layer, by mask key relative to the layer.

    Every linear but the routers and gates, and every 3-D weight of a fused experts module.
    """
    families = parameter_families(layer)
    found: dict[str, MaskedWeight] = {}
    for name, module in layer.named_modules():
        if _is_fused_experts(module):
            for pname, param in _expert_tensors(module).items():
                key = f"{name}.{pname}" if name else pname
                layout = "experts_t" if module.is_transposed else "experts"
                found[key] = MaskedWeight(key, param, layout, module, "experts")
    for name, module in prunable_linears(layer).items():
        family = families[f"{name}.weight"]
        if family != "routers":
            found[name] = _linear_weight(name, module, family)
    order = [n.removesuffix(".weight") if n.removesuffix(".weight") in found else n
             for n, _ in layer.named_parameters()]  # the layer's own parameter order
    return {k: found[k] for k in order if k in found}


def _qualified(prefix: str, weights: dict[str, MaskedWeight]) -> Iterator[tuple[str, MaskedWeight]]:
    for key, w in weights.items():
        full = f"{prefix}.{key}"
        yield full, MaskedWeight(full, w.param, w.layout, w.module, w.family)


def weight_layers(model: nn.Module) -> dict[str, int]:
    """The decoder layer index of every prunable weight, by qualified mask key."""
    stack, layers = decoder_layers(model)
    return {f"{stack}.{index}.{key}": index for index, layer in enumerate(layers)
            for key in layer_weights(layer)}


def model_weights(model: nn.Module) -> dict[str, MaskedWeight]:
    """The weights a method prunes in every decoder layer, by qualified mask key."""
    stack, layers = decoder_layers(model)
    found: dict[str, MaskedWeight] = {}
    for index, layer in enumerate(layers):
        found.update(_qualified(f"{stack}.{index}", layer_weights(layer)))
    return found


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def masked_weight(model: nn.Module, key: str) -> MaskedWeight | None:
    """The masked parameter a (qualified) mask key names, or None when the model has no such weight."""
    module = _submodule(model, key)
    if module is not None:
        return _linear_weight(key, module, "other") if is_linear(module) else None
    owner_name, _, pname = key.rpartition(".")
    owner = _submodule(model, owner_name)
    if owner is None or not _is_fused_experts(owner) or pname not in _expert_tensors(owner):
        return None
    layout = "experts_t" if owner.is_transposed else "experts"
    return MaskedWeight(key, getattr(owner, pname), layout, owner, "experts")


def unhandled_parameters(model: nn.Module) -> list[str]:
    """Expert weights of the decoder layers held in more than two dimensions whose layout sparseheal does
    not know (an experts class transformers does not mark); convolutions' 3-D weights are not experts."""
    stack, layers = decoder_layers(model)
    out = []
    for index, layer in enumerate(layers):
        handled = {id(w.param) for w in layer_weights(layer).values()}
        families = parameter_families(layer)
        out += [f"{stack}.{index}.{n}" for n, p in layer.named_parameters()
                if p.dim() > 2 and id(p) not in handled and families[n] == "experts"]
    return out


def check_prunable_layout(model: nn.Module) -> None:
    """Refuses a model holding weights of a layout no method can prune (3-D expert tensors of a class
    transformers does not mark with its layout): they would stay dense under a figure that says not."""
    unhandled = unhandled_parameters(model)
    if unhandled:
        owner = type(model.get_submodule(unhandled[0].rpartition(".")[0])).__name__
        raise ConfigError("MODEL", f"{type(model).__name__} holds {len(unhandled)} weights of a layout "
                                   f"sparseheal cannot prune ({unhandled[0]} in {owner}, whose expert layout "
                                   "transformers does not declare); they would stay dense")


def family_table(model: nn.Module, kept: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per family of the decoder layers' parameters: elements in all, elements masked (asked to be
    pruned) and elements pruned, from the kept count of each mask key.

    Args:
        model: the model.
        kept: number of kept positions per qualified mask key.

    Returns:
        {family: {"parameters", "masked", "pruned"}} over the :data:`FAMILIES` that occur.
    """
    stack, layers = decoder_layers(model)
    table: dict[str, dict[str, int]] = {}
    for index, layer in enumerate(layers):
        masked = {id(w.param): f"{stack}.{index}.{k}" for k, w in layer_weights(layer).items()}
        families = parameter_families(layer)
        for name, param in layer.named_parameters():
            row = table.setdefault(families[name], {"parameters": 0, "masked": 0, "pruned": 0})
            row["parameters"] += param.numel()
            key = masked.get(id(param))
            if key is not None and key in kept:
                row["masked"] += param.numel()
                row["pruned"] += param.numel() - kept[key]
    return {f: table[f] for f in FAMILIES if f in table}


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def describe_families(table: dict[str, dict[str, int]]) -> str:
    """One line from :func:`family_table`: each pruned family's share, then what stayed dense.

    For example ``attention 50.0% of 1.2 M, experts 50.0% of 8.4 M; left dense: routers 1.02 K, norms 512``.
    """
    pruned = [f"{f} {100 * row['pruned'] / row['parameters']:.1f}% of {_count(row['parameters'])}"
              for f, row in table.items() if row["masked"]]
    dense = [f"{f} {_count(row['parameters'])}" for f, row in table.items() if not row["masked"]]
    return ", ".join(pruned) + (f"; left dense: {', '.join(dense)}" if dense else "")
