"""The selection and reconstruction kernels give the bits of their plain forms, written out below as they
were: a stable sort for the lowest scores, SparseGPT's column loop on the weight as it is laid out with a
K=1 product per column, one full product for each Gram matrix, and a factor per linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

import sparseheal.sparsity.gram as gram_module
import sparseheal.sparsity.sparsegpt as sparsegpt_module
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.gram import LEAF, GramSum, blocked_gram, upper_blocks
from sparseheal.sparsity.masks import nm_mask
from sparseheal.sparsity.sparsegpt import (
    SparseGPTPruner,
    SparseGPTSettings,
    inverse_hessian_factor,
    sparsegpt_prune,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _plain_unstructured(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], False)
    return mask.reshape(scores.shape)


def plain_sparsegpt(weight, hessian, nm, sparsity, blocksize, percdamp):
    """SparseGPT as the reference code lays it out (blocks of the weight as is, an outer product per
    column, the factor made from this linear's own Hessian)."""
    if nm is not None:
        blocksize = max(nm[1], blocksize - blocksize % nm[1])
    w = weight.detach().float().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    hessian.diagonal().add_(percdamp * torch.mean(torch.diag(hessian)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, w.shape[1], blocksize):
        i2 = min(i1 + blocksize, w.shape[1])
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        p1 = (_plain_unstructured(w1.pow(2) / torch.diag(h1).reshape(1, -1).pow(2), sparsity) == 0
              if nm is None else torch.zeros_like(w1, dtype=torch.bool))
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                sal = w1[:, i : i + nm[1]].pow(2) / torch.diag(h1)[i : i + nm[1]].reshape(1, -1).pow(2)
                p1[:, i : i + nm[1]] = ~nm_mask(sal, *nm)
            q = w1[:, i].masked_fill(p1[:, i], 0.0)
            err = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2], pruned[:, i1:i2] = w1, p1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w.masked_fill_(pruned, 0.0)
    return w, ~pruned


class PlainSparseGPT(LinearPruner):
    """Every linear its own full-product Hessian and its own factor."""

    def __init__(self, module: nn.Module, options=None) -> None:
        super().__init__(module, options or SparseGPTSettings())
        self.hessian, self.tokens = None, 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        batch = flat.t() @ flat
        self.hessian = batch if self.hessian is None else self.hessian.add_(batch)
        self.tokens += flat.shape[0]

    def select(self, weight, nm, sparsity):
        new, mask = plain_sparsegpt(weight, self.hessian.mul_(2.0 / self.tokens), nm, sparsity,
                                    self.options.sparsegpt_block_size, self.options.sparsegpt_dampening)
        weight.copy_(new.to(weight.dtype))
        return mask


def _case(rows: int, cols: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows + cols)
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen)
    x = torch.randn(3 * cols, cols, generator=gen) @ mixing  # (N, in) correlated inputs
    weight = torch.randn(rows, cols, generator=gen)
    if kind == "ties":  # equal saliencies: whole rows of zero weights, and a dead input
        weight[::3] = 0.0
        x[:, 5] = 0.0
    if kind == "nonfinite":  # large weights that stay kept, inf and NaN among them
        weight[1, 3], weight[2, 7], weight[4, 150] = float("inf"), float("nan"), float("-inf")
    return weight, x.t() @ x / x.shape[0]


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("shape,kind", [((24, 200), "random"), ((40, 96), "ties"), ((8, 13), "random"),
                                        ((24, 200), "nonfinite")])
@pytest.mark.parametrize("blocksize", [128, 32])
def test_sparsegpt_kernel_gives_the_plain_loops_bits(nm, shape, kind, blocksize):
    weight, hessian = _case(*shape, kind)
    ref_w, ref_mask = plain_sparsegpt(weight, hessian.clone(), nm, 0.5, blocksize, 0.01)
    hinv, dead = inverse_hessian_factor(hessian.clone(), 0.01)
    new_w, new_mask = sparsegpt_prune(weight, hinv, dead, nm, 0.5, blocksize)
    assert torch.equal(new_mask, ref_mask)
    assert torch.equal(_bits(new_w), _bits(ref_w))


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("blocksize", [128, 32])
def test_stacked_weights_get_the_bits_they_get_alone(nm, blocksize):
    weight, hessian = _case(40, 96, "ties")
    gen = torch.Generator().manual_seed(11)
    weights = [weight, torch.randn(8, 96, generator=gen), torch.randn(24, 96, generator=gen)]
    hinv, dead = inverse_hessian_factor(hessian.clone(), 0.01)
    alone = [sparsegpt_prune(w, hinv, dead, nm, 0.5, blocksize) for w in weights]
    parts = [w.shape[0] for w in weights]
    stacked_w, stacked_mask = sparsegpt_prune(weights, hinv, dead, nm, 0.5, blocksize)
    for (ref_w, ref_mask), new_w, new_mask in zip(alone, stacked_w.split(parts), stacked_mask.split(parts),
                                                  strict=True):
        assert torch.equal(new_mask, ref_mask)
        assert torch.equal(_bits(new_w), _bits(ref_w))


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_a_group_prune_equals_pruning_each_linear_alone(conv1d, dtype, nm):
    from transformers.pytorch_utils import Conv1D

    def linears() -> list[nn.Module]:
        torch.manual_seed(5)
        mods = [Conv1D(out, 64) if conv1d else nn.Linear(64, out, bias=False) for out in (24, 8, 16)]
        return [m.to(dtype) for m in mods]

    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(6)).to(dtype)  # (B, T, in)
    group = [SparseGPTPruner(m) for m in linears()]
    group[0].add_batch(x)
    for follower in group[1:]:
        follower.adopt(group[0])
    masks = SparseGPTPruner.prune_group(group, nm, 0.5)
    assert all(p.hessian._factor is None for p in group)  # the shared factor is let go
    alone = []
    for module in linears():
        pruner = SparseGPTPruner(module)
        pruner.add_batch(x)
        alone.append((module, pruner.prune(nm, 0.5)))
    for pruner, mask, (module, ref_mask) in zip(group, masks, alone, strict=True):
        assert torch.equal(mask, ref_mask)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(pruner.module.weight.detach().view(bits), module.weight.detach().view(bits))


def _plain_sum(batches: list[torch.Tensor]) -> torch.Tensor:
    total = None
    for flat in batches:
        product = flat.t() @ flat
        total = product if total is None else total.add_(product)
    return total


@pytest.mark.parametrize("d", [LEAF + 8, 3 * LEAF + 40, 1000])
def test_upper_blocks_cover_the_upper_triangle_once(d):
    cover = torch.zeros(d, d, dtype=torch.int32)
    for r0, r1, c0, c1 in upper_blocks(d):
        cover[r0:r1, c0:c1] += 1
        assert (r0, r1) == (c0, c1) and r1 - r0 <= LEAF or r1 <= c0  # a diagonal leaf or above it
    assert (cover.triu() == torch.ones(d, d, dtype=torch.int32).triu()).all()


def test_blocked_gram_is_the_gram_and_symmetric():
    x = torch.randn(64, 2 * LEAF + 40, generator=torch.Generator().manual_seed(3))
    blocks = blocked_gram(x)
    torch.testing.assert_close(blocks, x.t() @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(blocks, blocks.t())


def _batches(d: int, rows: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) for n in rows]


def test_gram_sum_has_the_bits_of_adding_full_products(monkeypatch):
    monkeypatch.setattr(gram_module, "_AGREES", {})
    batches = _batches(LEAF + 72, (96, 96, 40), 4)  # a shorter last batch is a second shape
    total = GramSum()
    for flat in batches:
        total.add(flat)
    assert torch.equal(_bits(total.value()), _bits(_plain_sum(batches)))  # however this BLAS sums


def test_gram_sum_falls_back_to_full_products_where_blocks_differ(monkeypatch):
    monkeypatch.setattr(gram_module, "_AGREES", {})
    real = gram_module.blocked_gram

    def skewed(flat, leaf=LEAF):  # one ulp off in one entry, for batches of 40 rows only
        out = real(flat, leaf)
        if flat.shape[0] == 40:
            out[0, 0] = torch.nextafter(out[0, 0], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(gram_module, "blocked_gram", skewed)
    batches = _batches(LEAF + 16, (96, 40, 96), 5)
    total = GramSum()
    for flat in batches:
        total.add(flat)
    assert gram_module._AGREES[(40, LEAF + 16, torch.float32, "cpu")] is False
    assert torch.equal(_bits(total.value()), _bits(_plain_sum(batches)))


def _wide_llama(path) -> str:
    """A llama whose inputs are wider than a Gram leaf, so that the blocks are used."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=LEAF + 64,
                         intermediate_size=2 * LEAF + 128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_prune_gives_the_plain_procedures_bits(tmp_path, monkeypatch, nm):
    path = _wide_llama(tmp_path / "wide")
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    factors = []
    real_factor = sparsegpt_module.inverse_hessian_factor
    monkeypatch.setattr(sparsegpt_module, "inverse_hessian_factor",
                        lambda h, d: factors.append(h.shape) or real_factor(h, d))
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for _ in range(2)]
    ref = prune_model(models[0], PlainSparseGPT, tokens, nm, 0.5, batch_size=2)
    ours = prune_model(models[1], SparseGPTPruner, tokens, nm, 0.5, batch_size=2)
    assert len(factors) == 2 * 4  # one factor per distinct input: (q, k, v), o, (gate, up), down
    for name, mask in ref.items():
        assert torch.equal(ours[name].unpack(), mask.unpack()), name
    ref_params = dict(models[0].named_parameters())
    for name, param in models[1].named_parameters():
        assert torch.equal(_bits(param.data), _bits(ref_params[name].data)), name
