"""The layer-by-layer driver does no work whose result is unused, and its masks and weights equal those of
the plain procedure (every linear fed its own statistic, every dense layer run to its end, every pruned
layer's outputs computed), written out below as the driver was before."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from sparseheal.models import decoder_layers, prunable_linears
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.magnitude import MagnitudePruner
from sparseheal.sparsity.sparsegpt import SparseGPTPruner, SparseGPTSettings
from sparseheal.sparsity.wanda import WandaPruner

PRUNERS = {"wanda": WandaPruner, "sparsegpt": SparseGPTPruner, "magnitude": MagnitudePruner}


class _Stop(Exception):
    pass


@torch.no_grad()
def plain_prune(model: nn.Module, pruner_cls: type[LinearPruner], tokens: torch.Tensor,
                nm: tuple[int, int] | None, sparsity: float, batch_size: int, options=None) -> dict:
    """The procedure without shortcuts; returns bool keep-masks by qualified name."""
    stack, layers = decoder_layers(model)
    batches = []

    def catch(_m, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batches.append((hidden, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache")}))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for start in range(0, tokens.shape[0], batch_size):
        try:
            model(input_ids=tokens[start : start + batch_size], use_cache=False)
        except _Stop:
            pass
    handle.remove()
    masks = {}
    for index, layer in enumerate(layers):
        pruners = {name: pruner_cls(mod, options) for name, mod in prunable_linears(layer).items()}
        handles = [p.module.register_forward_hook(lambda _m, i, _o, p=p: p.add_batch(i[0])) for p in
                   pruners.values()]
        for hidden, kwargs in batches:  # each dense layer to its end
            layer(hidden, **kwargs)
        for h in handles:
            h.remove()
        for name, pruner in pruners.items():
            masks[f"{stack}.{index}.{name}"] = pruner.prune(nm, sparsity)
        for hidden, kwargs in batches:  # every layer's pruned outputs, the last one's too
            out = layer(hidden, **kwargs)
            hidden.copy_(out[0] if isinstance(out, tuple) else out)
    return masks


def _tokens(n: int = 5, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 200, (n, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "neox"])
@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_masks_and_weights_equal_the_plain_procedure(tiny_model_dir, arch, method, nm):
    path = tiny_model_dir(arch)
    options = SparseGPTSettings() if method == "sparsegpt" else None
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_masks = plain_prune(ref, PRUNERS[method], _tokens(), nm, 0.5, 2, options)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    masks = prune_model(ours, PRUNERS[method], _tokens(), nm, 0.5, batch_size=2, options=options)
    assert masks.keys() == ref_masks.keys()
    for name, mask in ref_masks.items():
        assert torch.equal(masks[name].unpack(), mask), name
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():  # SparseGPT's reconstructed weights too, bit for bit
        assert torch.equal(param, ref_params[name]), name


class _CountingWanda(WandaPruner):
    fed: list[str] = []
    modules: list[tuple[str, nn.Module]] = []

    def add_batch(self, inputs: torch.Tensor) -> None:
        type(self).fed.append(self.name_in_layer)
        super().add_batch(inputs)

    def __init__(self, module, options=None):
        super().__init__(module, options)
        self.name_in_layer = next(n for n, m in _CountingWanda.modules if m is self.module)


def test_one_statistic_per_distinct_input_and_no_unused_forward(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    _, layers = decoder_layers(model)
    _CountingWanda.modules = [(n, m) for layer in layers for n, m in prunable_linears(layer).items()]
    _CountingWanda.fed = []
    finished = {i: 0 for i in range(len(layers))}
    down_calls = {i: 0 for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda *_a, i=i: finished.__setitem__(i, finished[i] + 1))
        down = layer.mlp.down_proj
        down.register_forward_hook(lambda *_a, i=i: down_calls.__setitem__(i, down_calls[i] + 1))
    prune_model(model, _CountingWanda, _tokens(n=6), None, 0.5, batch_size=2)  # 3 batches
    # per layer and batch: q (k, v share it), o, gate (up shares it), down
    assert sorted(set(_CountingWanda.fed)) == ["mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj",
                                               "self_attn.q_proj"]
    assert len(_CountingWanda.fed) == len(layers) * 3 * 4
    # the statistics pass never finishes a layer nor computes down_proj; only the propagation does,
    # and not for the last layer (layer 0 runs once more in the capture, on the first batch, to learn
    # what a layer returns)
    assert finished == {0: 3 + 1, 1: 0} and down_calls == {0: 3 + 1, 1: 0}


def test_linears_that_share_an_input_are_pruned_as_one_group(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    _, layers = decoder_layers(model)
    names = {m: n for layer in layers for n, m in prunable_linears(layer).items()}
    groups = []

    class _Recording(SparseGPTPruner):
        @classmethod
        def prune_group(cls, group, nm, sparsity):
            groups.append([names[p.module] for p in group])
            return super().prune_group(group, nm, sparsity)

    masks = prune_model(model, _Recording, _tokens(n=4), None, 0.5, batch_size=2)
    assert groups == len(layers) * [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                    ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert list(masks) == [f"model.layers.{i}.{n}" for i, layer in enumerate(layers) for n in
                           prunable_linears(layer)]  # in the layer's own order


class _Unshared(WandaPruner):
    statistics = ()  # a method that does not declare its statistics is fed per linear


def test_a_method_without_declared_statistics_is_fed_per_linear(llama_dir):
    a = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    shared = prune_model(a, WandaPruner, _tokens(), None, 0.6, batch_size=2)
    unshared = prune_model(b, _Unshared, _tokens(), None, 0.6, batch_size=2)
    assert all(torch.equal(shared[k].unpack(), unshared[k].unpack()) for k in shared)


def test_adopted_statistics_are_copies():
    first, second = WandaPruner(nn.Linear(8, 8)), WandaPruner(nn.Linear(8, 8))
    first.add_batch(torch.ones(1, 2, 8))
    second.adopt(first)
    assert second.tokens == 2 and torch.equal(second.sq_sum, first.sq_sum)
    second.sq_sum.mul_(0)
    assert torch.equal(first.sq_sum, torch.full((8,), 2.0))
