"""Pruning methods on single layers: Wanda scores, SparseGPT reconstruction, magnitude thresholds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparseheal.registry import PRUNERS
from sparseheal.sparsity.magnitude import MagnitudePruner
from sparseheal.sparsity.masks import count_violations, nm_violations
from sparseheal.sparsity.sparsegpt import SparseGPTPruner, inverse_hessian_factor, sparsegpt_prune
from sparseheal.sparsity.wanda import WandaPruner, wanda_scores


def _linear(in_f: int, out_f: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=False)


def _inputs(batch: int, tokens: int, features: int, seed: int = 1, correlated: bool = False) -> torch.Tensor:
    """(B, T, features) inputs with per-feature scales spread over two orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, features, generator=gen)
    if correlated:  # mix features so that the Hessian is far from diagonal
        noise = torch.randn(features, features, generator=gen) / math.sqrt(features)
        mixing = torch.eye(features) + 0.8 * noise
        x = x @ mixing
    return x * torch.logspace(-1, 1, features)[torch.randperm(features, generator=gen)]


def test_registry_names_and_aliases():
    assert PRUNERS.get("wanda") is WandaPruner
    assert PRUNERS.get("sparsegpt") is SparseGPTPruner
    assert PRUNERS.get("magnitude") is MagnitudePruner
    assert not MagnitudePruner.needs_calibration and WandaPruner.needs_calibration


def test_wanda_scores_equal_direct_computation():
    layer = _linear(32, 16)
    x = _inputs(3, 10, 32)
    pruner = WandaPruner(layer)
    pruner.add_batch(x[:2])  # statistics accumulate over batches of different sizes
    pruner.add_batch(x[2:])
    # direct: |W_ij| * sqrt(mean over all 30 tokens of x_j^2), written out element by element
    tokens = x.reshape(-1, 32)
    expected = torch.empty(16, 32)
    for j in range(32):
        rms = math.sqrt(sum(float(t[j]) ** 2 for t in tokens) / tokens.shape[0])
        for i in range(16):
            expected[i, j] = abs(float(layer.weight.data[i, j])) * rms
    scores = wanda_scores(layer.weight.data, pruner.sq_sum / pruner.tokens)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    assert pruner.tokens == 30

    mask = pruner.prune(None, 0.5)
    for i in range(16):  # per output row: the 16 lowest direct scores are pruned
        pruned = set(torch.argsort(expected[i])[:16].tolist())
        assert pruned == set(torch.nonzero(~mask[i]).flatten().tolist())
    assert count_violations(layer.weight.data, mask) == 0
    assert ((~mask).sum(1) == 16).all()


def test_wanda_uses_activations_not_only_weights():
    layer = _linear(16, 8)
    x = _inputs(2, 12, 16)
    wanda = WandaPruner(layer)
    wanda.add_batch(x)
    w_mask = wanda.select(layer.weight.data.clone(), None, 0.5)
    m_mask = MagnitudePruner(_linear(16, 8)).select(layer.weight.data.clone(), None, 0.5)
    assert not torch.equal(w_mask, m_mask)


def test_magnitude_is_one_threshold_per_matrix():
    layer = _linear(24, 12)
    weight = layer.weight.data.clone()
    mask = MagnitudePruner(layer).prune(None, 0.6)
    assert int((~mask).sum()) == math.floor(24 * 12 * 0.6)
    assert weight.abs()[~mask].max() < weight.abs()[mask].min()
    assert layer.weight.data[~mask].eq(0).all() and torch.equal(layer.weight.data[mask], weight[mask])


def _reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W' X||_F over all tokens."""
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    return float(torch.linalg.norm(flat @ weight.t() - flat @ pruned.t()))


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstruction_beats_magnitude(pattern):
    x = _inputs(4, 64, 96, correlated=True)
    dense = _linear(96, 48).weight.data.clone()
    sgpt_layer, mag_layer = _linear(96, 48), _linear(96, 48)
    pruner = SparseGPTPruner(sgpt_layer)
    pruner.add_batch(x[:3])
    pruner.add_batch(x[3:])
    s_mask = pruner.prune(pattern, 0.5)
    m_mask = MagnitudePruner(mag_layer).prune(pattern, 0.5)
    assert int((~s_mask).sum()) == int((~m_mask).sum()) == 96 * 48 // 2  # same budget
    assert count_violations(sgpt_layer.weight.data, s_mask) == 0
    s_err = _reconstruction_error(dense, sgpt_layer.weight.data, x)
    m_err = _reconstruction_error(dense, mag_layer.weight.data, x)
    assert s_err < 0.8 * m_err, (s_err, m_err)
    # the kept weights were updated (OBS reconstruction), not merely selected
    assert not torch.equal(sgpt_layer.weight.data[s_mask], dense[s_mask])


@pytest.mark.parametrize(
    "n,m,cols", [(2, 4, 64), (4, 8, 64), (2, 4, 30), (1, 4, 52), (3, 8, 200), (3, 5, 256)]
)
def test_sparsegpt_nm_masks_valid(n, m, cols):
    x = _inputs(2, 40, cols, correlated=True)
    layer = _linear(cols, 8)
    pruner = SparseGPTPruner(layer)
    pruner.add_batch(x)
    mask = pruner.prune((n, m), 1 - n / m)
    assert nm_violations(mask, n, m) == 0
    assert nm_violations(layer.weight.data, n, m) == 0
    full = cols // m
    assert (mask[:, : full * m].reshape(8, full, m).sum(-1) == n).all()
    assert count_violations(layer.weight.data, mask) == 0


def test_sparsegpt_unstructured_count_per_block():
    x = _inputs(2, 40, 200)
    layer = _linear(200, 8)
    pruner = SparseGPTPruner(layer)
    pruner.add_batch(x)
    mask = pruner.prune(None, 0.5)
    # blocks of 128 and 72 columns each prune floor(rows * cols * 0.5)
    assert int((~mask[:, :128]).sum()) == 8 * 64 and int((~mask[:, 128:]).sum()) == 8 * 36


def test_sparsegpt_at_zero_sparsity_keeps_weights():
    weight = _linear(32, 8).weight.data.clone()
    x = _inputs(2, 20, 32).reshape(-1, 32)
    hessian = 2.0 / x.shape[0] * x.t() @ x
    hinv, dead = inverse_hessian_factor(hessian, 0.01)
    new, mask = sparsegpt_prune(weight, hinv, dead, None, 0.0, 128)
    assert mask.all()
    torch.testing.assert_close(new, weight, rtol=0, atol=0)


def test_sparsegpt_dead_inputs_are_zeroed():
    x = _inputs(2, 20, 16)
    x[..., 3] = 0.0  # input feature 3 never fires: its Hessian diagonal is zero
    layer = _linear(16, 8)
    pruner = SparseGPTPruner(layer)
    pruner.add_batch(x)
    pruner.prune(None, 0.25)
    assert layer.weight.data[:, 3].eq(0).all()
    assert torch.isfinite(layer.weight.data).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_methods_keep_low_precision_weights_masked(dtype):
    x = _inputs(2, 16, 32).to(dtype)
    for cls in (WandaPruner, SparseGPTPruner, MagnitudePruner):
        layer = _linear(32, 16).to(dtype)
        pruner = cls(layer)
        pruner.add_batch(x)
        mask = pruner.prune((2, 4), 0.5)
        assert layer.weight.dtype == dtype
        assert count_violations(layer.weight.data, mask) == 0 and nm_violations(mask, 2, 4) == 0
