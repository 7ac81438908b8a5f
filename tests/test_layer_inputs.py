"""Layer-by-layer passes see what a normal forward gives each layer; experts are calibrated by routing.

- every decoder layer, replayed with its captured keyword arguments, gives a normal forward's output bit
  for bit (architecture matrix), and layer 0's arguments would not do for a mixed-attention model;
- Wanda and SparseGPT masks of a mixed-attention model equal those of a plain procedure that collects
  each layer's statistics with hooks during a normal forward of the model;
- each expert of a fused tensor is pruned from the tokens the model's router sends it (a plain
  re-implementation of Mixtral's routing), and an expert no token reaches takes the pooled statistics.
"""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, MIXED_ATTENTION, arch_config
from conftest import VOCAB
from torch import nn
from transformers import AutoModelForCausalLM

from sparseheal.models import decoder_layers, prunable_linears
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.capture import at_layer, capture_layer_inputs, run_layer
from sparseheal.sparsity.masks import mask_from_scores
from sparseheal.sparsity.sparsegpt import SparseGPTPruner
from sparseheal.sparsity.wanda import WandaPruner, wanda_scores


def _model(model_type: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(arch_config(model_type)).eval()


def _tokens(n: int = 4, length: int = 40) -> torch.Tensor:  # longer than the 16-token sliding windows
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _normal_outputs(model: nn.Module, tokens: torch.Tensor, batch: int) -> list[list[torch.Tensor]]:
    """Each decoder layer's output for each batch, from normal forwards of the model."""
    _, layers = decoder_layers(model)
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(index):
        def hook(_module, _args, out):
            outputs[index].append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[start:start + batch], use_cache=False)
    for handle in handles:
        handle.remove()
    return outputs


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_layer_replayed_gives_the_normal_forward_output(model_type):
    model = _model(model_type)
    _, layers = decoder_layers(model)
    tokens = _tokens()
    expected = _normal_outputs(model, tokens, 2)
    batches = capture_layer_inputs(model, layers, tokens, 2, torch.device("cpu"))
    with torch.no_grad():
        if model_type in MIXED_ATTENTION:  # layer 0's arguments would give layer 1 another output
            hidden, kwargs = batches[0][0].clone(), batches[0][1]
            run_layer(layers[0], [(hidden, kwargs[0])], in_place=True)
            wrong = layers[1](hidden, **kwargs[0])
            assert not torch.equal(wrong[0] if isinstance(wrong, tuple) else wrong, expected[1][0])
        for index, layer in enumerate(layers):
            run_layer(layer, at_layer(batches, index), in_place=True)
            for b, (hidden, _) in enumerate(batches):
                assert torch.equal(hidden, expected[index][b]), (index, b)


def test_arguments_passed_by_position_are_replayed_by_name():
    """GPT-2 passes its attention mask positionally; with eager attention it is not None."""
    from transformers import AutoModelForCausalLM as Auto

    torch.manual_seed(0)
    model = Auto.from_config(arch_config("gpt2"), attn_implementation="eager").eval()
    _, layers = decoder_layers(model)
    tokens = _tokens(n=2)
    expected = _normal_outputs(model, tokens, 2)
    batches = capture_layer_inputs(model, layers, tokens, 2, torch.device("cpu"))
    assert batches[0][1][1]["attention_mask"] is not None
    with torch.no_grad():
        for index, layer in enumerate(layers):
            run_layer(layer, at_layer(batches, index), in_place=True)
            assert torch.equal(batches[0][0], expected[index][0]), index


def _plain_prune(model: nn.Module, pruner_cls, tokens: torch.Tensor, batch: int, nm, sparsity: float) -> dict:
    """Layer by layer: statistics from hooks on the linears during normal forwards of the whole model
    (the layers before already pruned), then each linear pruned alone."""
    stack, layers = decoder_layers(model)
    masks = {}
    for index, layer in enumerate(layers):
        linears = prunable_linears(layer)
        pruners = {name: pruner_cls(module) for name, module in linears.items()}
        handles = [module.register_forward_pre_hook(lambda _m, args, p=pruners[name]: p.add_batch(args[0]))
                   for name, module in linears.items()]
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch):
                model(input_ids=tokens[start:start + batch], use_cache=False)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            masks.update({f"{stack}.{index}.{n}": p.prune(nm, sparsity) for n, p in pruners.items()})
    return masks


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "qwen2"])
@pytest.mark.parametrize("pruner_cls,nm", [(WandaPruner, None), (WandaPruner, (2, 4)),
                                           (SparseGPTPruner, None)])
def test_masks_of_a_mixed_attention_model_equal_a_plain_forward_with_hooks(model_type, pruner_cls, nm):
    tokens = _tokens(n=4, length=48)
    reference, ours = _model(model_type), _model(model_type)
    expected = _plain_prune(reference, pruner_cls, tokens, 2, nm, 0.5)
    masks = prune_model(ours, pruner_cls, tokens, nm, 0.5, batch_size=2)
    assert set(masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(masks[name].unpack(), mask), name
    theirs = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.equal(param, theirs[name]), name


def _routed_inputs(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor):
    """Mixtral's routing, written out: each expert's (gate_up input, down input), rows in the order the
    eager experts forward takes them (top-k slot, then token)."""
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=experts.num_experts).permute(2, 1, 0)
    for e in range(experts.num_experts):
        _slot, token = torch.where(mask[e])
        x = hidden[token]  # (n_e, d)
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        yield e, x, experts.act_fn(gate) * up  # (n_e, d), (n_e, I)


def _expert_statistics(model: nn.Module, tokens: torch.Tensor, batch: int, layer: int = 0) -> dict:
    """Σ x² and token counts of each expert's two inputs in one layer, from normal forwards' routing."""
    experts = decoder_layers(model)[1][layer].mlp.experts
    stats: dict[tuple[str, int], list] = {}

    def hook(_module, args):
        hidden, top_k_index = args[0], args[1]
        for e, x, h in _routed_inputs(experts, hidden, top_k_index):
            for name, inputs in (("gate_up_proj", x), ("down_proj", h)):
                if inputs.shape[0]:
                    entry = stats.setdefault((name, e), [None, 0])
                    sq = inputs.float().pow(2).sum(dim=0)
                    entry[0] = sq if entry[0] is None else entry[0] + sq
                    entry[1] += inputs.shape[0]

    handle = experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[start:start + batch], use_cache=False)
    handle.remove()
    return stats


def _never_route_to(model: nn.Module, expert: int) -> None:
    """Makes every router of the model pass over ``expert`` (its logit -inf before the top-k)."""
    for layer in decoder_layers(model)[1]:
        router = layer.mlp.gate

        def forward(hidden, router=router):
            logits = torch.nn.functional.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            logits[:, expert] = float("-inf")
            probs = torch.softmax(logits.float(), dim=-1)
            top, index = torch.topk(probs, router.top_k, dim=-1)
            return logits, top / top.sum(dim=-1, keepdim=True), index

        router.forward = forward


@pytest.mark.parametrize("unreached", [None, 3])
def test_each_expert_is_pruned_from_the_tokens_its_router_sends_it(unreached):
    tokens = _tokens(n=4, length=24)
    reference, ours = _model("mixtral"), _model("mixtral")
    if unreached is not None:
        _never_route_to(reference, unreached)
        _never_route_to(ours, unreached)
    with torch.no_grad():
        reference.set_experts_implementation("eager")
        stats = _expert_statistics(reference, tokens, 2)
    missed: dict[str, list[int]] = {}
    masks = prune_model(ours, WandaPruner, tokens, None, 0.5, batch_size=2, unreached=missed)
    experts = decoder_layers(reference)[1][0].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        mask = masks[f"model.layers.0.mlp.experts.{name}"].unpack()  # (E, out, in)
        assert mask.shape == getattr(experts, name).shape
        for e in range(experts.num_experts):
            if e == unreached:  # the pooled statistics of the tensor's other experts, in expert order
                reached = [stats[(name, o)] for o in range(experts.num_experts) if o != e]
                sq, n = reached[0][0].clone(), reached[0][1]
                for other_sq, other_n in reached[1:]:
                    sq, n = sq + other_sq, n + other_n
            else:
                sq, n = stats[(name, e)]
            expected = mask_from_scores(wanda_scores(getattr(experts, name)[e], sq / n), None, 0.5)
            assert torch.equal(mask[e], expected), (name, e)
    if unreached is None:
        assert missed == {}
    else:
        assert missed == {f"model.layers.{i}.mlp.experts.{n}": [unreached] for i in (0, 1)
                          for n in ("gate_up_proj", "down_proj")}
