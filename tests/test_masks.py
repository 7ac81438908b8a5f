"""Mask maths: exact counts, valid N:M groups, stable ties, packing, +0.0 writes and bitwise checks."""

from __future__ import annotations

import math

import pytest
import torch

from sparseheal.sparsity.masks import (
    apply_mask,
    count_violations,
    detect_nm,
    mask_from_scores,
    nm_mask,
    nm_violations,
    pack_mask,
    sparsity_of,
    unpack_mask,
    unstructured_mask,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("shape", [(8, 64), (5, 37), (1, 3), (16, 10)])
def test_unstructured_per_row_prunes_exactly_floor(shape, sparsity):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    mask = unstructured_mask(scores, sparsity, per_row=True)
    assert mask.dtype == torch.bool and mask.shape == shape
    expected = math.floor(shape[1] * sparsity)
    assert ((~mask).sum(dim=1) == expected).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.95])
@pytest.mark.parametrize("shape", [(8, 64), (7, 13), (3, 1)])
def test_unstructured_whole_matrix_prunes_exactly_floor(shape, sparsity):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    mask = unstructured_mask(scores, sparsity, per_row=False)
    assert int((~mask).sum()) == math.floor(shape[0] * shape[1] * sparsity)


def test_unstructured_prunes_the_lowest_scores():
    scores = torch.randn(6, 20, generator=torch.Generator().manual_seed(3))
    per_row = unstructured_mask(scores, 0.5, per_row=True)
    for row, keep in zip(scores, per_row, strict=True):
        assert row[~keep].max() < row[keep].min()
    whole = unstructured_mask(scores, 0.5, per_row=False)
    assert scores[~whole].max() < scores[whole].min()
    assert not torch.equal(per_row, whole)  # per-row and whole-matrix selections really differ here


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("cols", [64, 24, 30, 13, 3])
def test_nm_every_group_valid(n, m, cols):
    scores = torch.randn(9, cols, generator=torch.Generator().manual_seed(cols))
    mask = nm_mask(scores, n, m)
    assert mask.shape == scores.shape
    full = cols // m
    groups = mask[:, : full * m].reshape(9, full, m)
    assert (groups.sum(-1) == n).all()  # every full group keeps exactly n
    tail = mask[:, full * m :]
    if tail.numel():  # a trailing partial group keeps at most n
        assert (tail.sum(-1) <= n).all()
        assert (tail.sum(-1) == min(n, cols - full * m)).all()
    assert nm_violations(mask, n, m) == 0
    assert nm_violations(scores.masked_fill(~mask, 0.0), n, m) == 0
    # the kept weights of each full group are its n largest scores
    g_scores = scores[:, : full * m].reshape(9, full, m)
    kept_min = g_scores.masked_fill(~groups, float("inf")).amin(-1)
    pruned_max = g_scores.masked_fill(groups, float("-inf")).amax(-1)
    assert (kept_min > pruned_max).all()


def test_ties_are_broken_stably_earlier_index_pruned_first():
    scores = torch.ones(3, 10)
    mask = unstructured_mask(scores, 0.5, per_row=True)
    assert torch.equal(mask, torch.tensor([[False] * 5 + [True] * 5] * 3))
    whole = unstructured_mask(torch.ones(2, 5), 0.3, per_row=False)  # floor(10 * 0.3) = 3 pruned
    assert torch.equal(whole.reshape(-1), torch.tensor([False] * 3 + [True] * 7))
    nm = nm_mask(torch.ones(2, 8), 2, 4)
    assert torch.equal(nm, torch.tensor([[False, False, True, True] * 2] * 2))
    nm48 = nm_mask(torch.ones(1, 8), 4, 8)
    assert torch.equal(nm48, torch.tensor([[False] * 4 + [True] * 4]))
    # partial ties: among the three equal lowest scores the first two are pruned
    row = torch.tensor([[5.0, 1.0, 9.0, 1.0, 1.0, 7.0]])
    assert torch.equal(unstructured_mask(row, 2 / 6 + 1e-9, per_row=True),
                       torch.tensor([[True, False, True, False, True, True]]))


def _sorted_selection(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """The first k of a stable ascending sort: the selection ``unstructured_mask`` must reproduce."""
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    k = int(flat.shape[1] * sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], False)
    return mask.reshape(scores.shape)


def _hostile_scores(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(24, 40, generator=gen)
    if kind == "ties":
        return (base * 2).round() / 2  # a few distinct values, many ties at every threshold
    if kind == "signed_zeros":
        return torch.where(base > 0, torch.zeros(()), -torch.zeros(()))
    if kind == "nan_inf":
        out = base.clone()
        out[::3, ::5] = float("nan")
        out[1::4, 2::7] = float("inf")
        out[2::5, 3::6] = float("-inf")
        return out
    if kind == "nan_heavy":  # NaN where the k-th lowest falls in some rows
        out = base.clone()
        out[::2, 8:] = float("nan")
        return out
    return base


@pytest.mark.parametrize("kind", ["random", "ties", "signed_zeros", "nan_inf", "nan_heavy"])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.02, 0.5, 0.7, 0.99])
def test_unstructured_selection_is_the_stable_sorts_first_k(kind, per_row, sparsity):
    scores = _hostile_scores(kind)
    expected = _sorted_selection(scores, sparsity, per_row)
    assert torch.equal(unstructured_mask(scores, sparsity, per_row), expected)


def test_ties_deterministic_across_calls():
    scores = torch.randint(0, 3, (32, 64), generator=torch.Generator().manual_seed(4)).float()  # many ties

    def masks() -> list[torch.Tensor]:
        rows, whole = unstructured_mask(scores, 0.5, True), unstructured_mask(scores, 0.5, False)
        return [rows, whole, nm_mask(scores, 2, 4)]

    first = masks()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, masks(), strict=True))


def test_mask_from_scores_dispatch():
    scores = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(mask_from_scores(scores, (2, 4), 0.5), nm_mask(scores, 2, 4))
    for per_row in (True, False):
        expected = unstructured_mask(scores, 0.5, per_row)
        assert torch.equal(mask_from_scores(scores, None, 0.5, per_row=per_row), expected)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (13, 17), (2, 3, 5), (64, 64), (1, 9)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(6)) > 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_pack_is_msb_first():
    mask = torch.tensor([True] + [False] * 7 + [False, True])
    assert pack_mask(mask).tolist() == [128, 64]
    assert torch.equal(unpack_mask(torch.tensor([128, 64], dtype=torch.uint8), (10,)), mask)
    every_byte = torch.arange(256, dtype=torch.uint8)  # each byte's bits, most significant first
    expected = torch.tensor([[(b >> (7 - i)) & 1 == 1 for i in range(8)] for b in range(256)])
    assert torch.equal(unpack_mask(every_byte, (256, 8)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_mask_writes_positive_zero(dtype):
    weight = torch.randn(4, 8).to(dtype)
    weight[0, :4] = -0.0
    weight[1, :4] = 0.0
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[:2, :4] = False
    mask[3, ::2] = False
    before = weight.clone()
    out = apply_mask(weight, mask)
    assert out is weight  # in place
    assert (_bits(weight[~mask]) == 0).all()  # bitwise +0.0, including where -0.0 was stored
    assert torch.equal(_bits(weight[mask]), _bits(before[mask]))  # kept weights untouched
    assert count_violations(weight, mask) == 0


def test_count_violations_counts_negative_zero_and_nonzero():
    weight = torch.zeros(3, 4)
    mask = torch.tensor([[True, False, False, True]] * 3)
    assert count_violations(weight, mask) == 0
    weight[0, 1] = -0.0
    assert count_violations(weight, mask) == 1
    weight[2, 2] = 1e-30
    assert count_violations(weight, mask) == 2
    weight[1, 0] = 5.0  # kept position: never a violation
    assert count_violations(weight, mask) == 2
    half = torch.zeros(3, 4, dtype=torch.float16)
    half[0, 2] = -0.0
    assert count_violations(half, mask) == 1
    assert count_violations(half, mask) != count_violations(half.abs(), mask)


def test_nm_violations_counts_groups():
    weight = torch.ones(2, 8)
    weight[0, :2] = 0.0  # row 0, group 0 keeps 2 of 4: fine; group 1 keeps 4: a violation
    weight[1] = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, -0.0, 3.0, 0.0])  # -0.0 counts as zero here
    assert nm_violations(weight, 2, 4) == 1  # row 1 is valid: -0.0 is a zero for the pattern
    weight[1, 4:6] = 2.0
    assert nm_violations(weight, 2, 4) == 2
    assert nm_violations(torch.ones(1, 6), 2, 4) == 1  # the partial group of 2 is within 2:4
    assert nm_violations(torch.ones(1, 7), 2, 4) == 2  # a partial group of 3 is not


def test_detect_nm_and_sparsity_of():
    scores = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    w24 = scores.masked_fill(~nm_mask(scores, 2, 4), 0.0)
    assert detect_nm(w24) == (2, 4)
    w48 = scores.masked_fill(~nm_mask(scores, 4, 8), 0.0)
    assert detect_nm(w48) == (4, 8)  # 4:8 is not 2:4 in every group of 4
    assert detect_nm(scores.masked_fill(~unstructured_mask(scores, 0.5, True), 0.0)) is None
    assert detect_nm(scores) is None  # dense
    assert sparsity_of(w24) == 0.5
    assert sparsity_of(torch.tensor([0.0, -0.0, 1.0, 2.0])) == 0.5


def test_packed_masks_load_and_unpack_to_the_saved_masks(tmp_path):
    from sparseheal.sparsity.masks import PackedMask, as_bool
    from sparseheal.sparsity.store import load_masks, save_masks

    gen = torch.Generator().manual_seed(0)
    masks = {"a.q_proj": torch.rand(8, 24, generator=gen) > 0.5,  # (out, in); 24 * 8 not a multiple of 64
             "b.v_proj": torch.rand(16, 8, generator=gen) > 0.3}
    save_masks(masks, tmp_path / "m.safetensors")
    packed, _ = load_masks(tmp_path / "m.safetensors", packed=True)
    assert all(isinstance(m, PackedMask) and m.shape == masks[n].shape for n, m in packed.items())
    assert all(torch.equal(as_bool(packed[n]), masks[n]) for n in masks)
    assert as_bool(masks["a.q_proj"]) is masks["a.q_proj"]
