"""The calibration draw and the layer-by-layer driver against a plain re-implementation of the published
reference procedure (Wanda's ``get_c4`` and ``prune_wanda``: one calibration sample at a time through each
layer, the running-average ``scaler_row``, a per-row sort for unstructured and per-group smallest for N:M).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparseheal
from sparseheal.data import calibration_samples, load_documents
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.store import load_masks
from sparseheal.sparsity.wanda import WandaPruner

# --- the reference, written out plainly -----------------------------------------------------------------


def reference_draw(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda/SparseGPT ``get_c4``: global ``random`` seeded once, documents drawn with retries."""
    random.seed(seed)
    samples = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        samples.append(enc.input_ids[:, i:j])
    return torch.cat(samples, dim=0)


class _Caught(Exception):
    pass


def _reference_layer_inputs(model: nn.Module, layer0: nn.Module, tokens: torch.Tensor) -> list[tuple]:
    """Like the reference's Catcher: each sample alone through the model up to the first layer."""
    inputs = []

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        extra = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        inputs.append((hidden, extra))
        raise _Caught

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    for sample in tokens:
        try:
            model(input_ids=sample.unsqueeze(0), use_cache=False)
        except _Caught:
            pass
    handle.remove()
    return inputs


class _ScalerRow:
    """WrappedGPT.add_batch: ``scaler_row *= n / (n + b); n += b; scaler_row += ||x_j||^2 / n``."""

    def __init__(self, columns: int) -> None:
        self.scaler_row = torch.zeros(columns)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().float()  # (in, tokens)
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def reference_wanda(model: nn.Module, tokens: torch.Tensor, sparsity: float, prune_n: int = 0,
                    prune_m: int = 0) -> dict[str, torch.Tensor]:
    """prune_wanda of the reference code; returns keep-masks (True = kept) by qualified name.

    ``prune_n`` is the reference's count of weights *pruned* per group of ``prune_m``.
    """
    layers = model.model.layers
    inps = _reference_layer_inputs(model, layers[0], tokens)
    masks = {}
    for index, layer in enumerate(layers):
        subset = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        wrapped = {name: _ScalerRow(mod.in_features) for name, mod in subset.items()}
        handles = [
            mod.register_forward_hook(lambda _m, inp, _o, stats=wrapped[name]: stats.add_batch(inp[0].data))
            for name, mod in subset.items()
        ]
        for hidden, kwargs in inps:  # one sample at a time
            _layer_output(layer, hidden, kwargs)
        for handle in handles:
            handle.remove()
        for name, mod in subset.items():
            metric = torch.abs(mod.weight.data) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
            pruned = torch.zeros_like(metric) == 1
            if prune_n != 0:
                for ii in range(metric.shape[1]):
                    if ii % prune_m == 0:
                        tmp = metric[:, ii : ii + prune_m].float()
                        pruned.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            else:
                order = torch.sort(metric, dim=-1, stable=True)[1]
                pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
            mod.weight.data[pruned] = 0
            masks[f"model.layers.{index}.{name}"] = ~pruned
        inps = [(_layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in inps]
    return masks


# --- tests ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def c4_docs(data_dir) -> list[str]:
    return load_documents("c4", "train", str(data_dir), "--calibration-data")


def _token_lengths(docs, tokenizer) -> list[int]:
    return [len(tokenizer(d).input_ids) for d in docs]


@pytest.mark.parametrize("seed", [0, 3])
def test_calibration_draw_equals_reference(llama_dir, c4_docs, seed):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    lengths = _token_lengths(c4_docs, tokenizer)
    seqlen = sorted(lengths)[len(lengths) // 2]  # half of the documents are too short: retries happen
    assert sum(n <= seqlen for n in lengths) >= len(lengths) // 2
    ours = calibration_samples(c4_docs, tokenizer, 12, seqlen, seed)
    ref = reference_draw(c4_docs, tokenizer, 12, seqlen, seed)
    assert ours.shape == (12, seqlen) and ours.dtype == ref.dtype
    assert torch.equal(ours, ref)


def test_calibration_draw_does_not_touch_global_random_state(llama_dir, c4_docs):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    random.seed(123)
    expected = random.random()
    random.seed(123)
    calibration_samples(c4_docs, tokenizer, 3, 32, 0)
    assert random.random() == expected


def test_calibration_draw_errors_when_no_document_is_long_enough(llama_dir, c4_docs):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    longest = max(_token_lengths(c4_docs, tokenizer))
    with pytest.raises(sparseheal.config.ConfigError) as err:
        calibration_samples(c4_docs, tokenizer, 2, longest, 0)
    assert err.value.flag == "--seqlen" and str(longest) in err.value.message
    assert calibration_samples(c4_docs, tokenizer, 2, longest - 1, 0).shape == (2, longest - 1)


@pytest.mark.parametrize("pattern,prune_n,prune_m", [(None, 0, 0), ((2, 4), 2, 4), ((4, 8), 4, 8)])
def test_batched_wanda_equals_reference(llama_dir, c4_docs, pattern, prune_n, prune_m):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokens = calibration_samples(c4_docs, tokenizer, 6, 64, 0)
    ref_model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ref_masks = reference_wanda(ref_model, tokens, 0.5, prune_n, prune_m)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    masks = prune_model(model, WandaPruner, tokens, pattern, 0.5, batch_size=4)  # batches of 4 and 2
    assert set(masks) == set(ref_masks) and len(masks) == 14
    for name, ref in ref_masks.items():
        assert torch.equal(masks[name].unpack(), ref), name
    ref_params, params = dict(ref_model.named_parameters()), dict(model.named_parameters())
    for name, param in params.items():
        assert torch.equal(param, ref_params[name]), name


def _prune_masks(llama_dir, out, seed, method="wanda"):
    sparseheal.prune(str(llama_dir), str(out), method=method, nsamples=4, seqlen=48, seed=seed,
                     calibration_batch_size=3)
    return load_masks(out / "sparsity_masks.safetensors")[0]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_masks_identical_across_runs_and_change_with_seed(llama_dir, tmp_path, method):
    first = _prune_masks(llama_dir, tmp_path / "a", 0, method)
    second = _prune_masks(llama_dir, tmp_path / "b", 0, method)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    a_bytes = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a_bytes == (tmp_path / "b" / "model.safetensors").read_bytes()
    other = _prune_masks(llama_dir, tmp_path / "c", 1, method)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_driver_batch_size_does_not_change_wanda_masks(llama_dir, c4_docs):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokens = calibration_samples(c4_docs, tokenizer, 5, 40, 1)
    results = []
    for batch_size in (1, 2, 5):
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
        results.append(prune_model(model, WandaPruner, tokens, None, 0.5, batch_size=batch_size))
    for other in results[1:]:
        assert all(torch.equal(results[0][k].unpack(), other[k].unpack()) for k in results[0])


def test_captured_batches_hold_their_equal_keyword_tensors_once(llama_dir):
    """The rotary cos/sin of equal-length batches are one pair of tensors, not one pair per batch; the
    hidden states stay each batch's own."""
    from sparseheal.models import decoder_layers
    from sparseheal.sparsity.calibrate import capture_layer_inputs

    lm = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    _, layers = decoder_layers(lm)
    tokens = torch.randint(0, lm.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    batches = capture_layer_inputs(lm, layers, tokens, 2, torch.device("cpu"))
    first_cos, first_sin = batches[0][1][0]["position_embeddings"]
    for hidden, kwargs in batches[1:]:
        cos, sin = kwargs[0]["position_embeddings"]
        assert cos is first_cos and sin is first_sin
        assert hidden.data_ptr() != batches[0][0].data_ptr()
    with torch.no_grad():  # the kept tensors are the ones each batch would have computed
        fresh = capture_layer_inputs(lm, layers, tokens[4:], 2, torch.device("cpu"))
    assert torch.equal(fresh[0][1][0]["position_embeddings"][0], first_cos)
