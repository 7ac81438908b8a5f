"""The Wanda code's variant and ablations, RIA and DSnoT: bit for bit against plain re-implementations of
their reference procedures (tests/reference_methods.py), and through the command line."""

from __future__ import annotations

import json
import math

import pytest
import reference_methods as ref
import torch
from test_cli import _run
from test_methods import _inputs, _linear

from sparseheal.registry import PRUNERS
from sparseheal.sparsity.ablate import AblateMagIter, AblateMagSeq, AblateWandaIter, AblateWandaSeq
from sparseheal.sparsity.dsnot import DSnoTStats, RefineSettings, dsnot_refine, refined
from sparseheal.sparsity.masks import count_violations, nm_violations
from sparseheal.sparsity.ria import RiaPruner, RiaSettings, ria_scores, snake_order
from sparseheal.sparsity.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from sparseheal.sparsity.store import load_input_orders
from sparseheal.sparsity.wanda import WandaPruner, WandaSettings, variant_mask, wanda_scores


def _scores(rows: int = 24, cols: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=gen) * torch.logspace(-1, 1, cols)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_wanda_variant_matches_the_reference_bisection(sparsity):
    scores = _scores()
    keep = variant_mask(scores, sparsity)
    assert torch.equal(keep, ref.variant_keep(scores, sparsity))
    assert abs(float((~keep).float().mean()) - sparsity) < 0.01  # within the bisection's reach
    counts = (~keep).sum(1)
    assert counts.min() != counts.max()  # one alpha for the matrix: rows prune different counts


def test_wanda_variant_pruner_uses_the_variant():
    layer = _linear(64, 16)
    pruner = WandaPruner(layer, WandaSettings(wanda_variant=True))
    x = _inputs(2, 10, 64)
    pruner.add_batch(x)
    expected = variant_mask(wanda_scores(layer.weight.data, pruner.sq_sum / pruner.tokens), 0.5)
    assert torch.equal(pruner.prune(None, 0.5), expected)
    assert count_violations(layer.weight.data, expected) == 0


def _hessian_case(cols: int = 48, rows: int = 12):
    x = _inputs(2, 40, cols, correlated=True).reshape(-1, cols)  # (N, in)
    hessian = 2.0 / x.shape[0] * x.t() @ x
    mean_sq = x.pow(2).mean(0)
    return _linear(cols, rows).weight.data.clone(), hessian, mean_sq


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("cls", [AblateMagSeq, AblateWandaSeq, AblateMagIter, AblateWandaIter])
def test_ablations_match_the_reference_fasterprune(cls, nm):
    weight, hessian, mean_sq = _hessian_case()
    norms = mean_sq.sqrt()
    saliency, fixed = cls.mask_rule(mean_sq, [weight], nm, 0.5)
    hinv, dead = inverse_hessian_factor(hessian.clone(), 0.01)
    new, keep = sparsegpt_prune(weight, hinv, dead, nm, 0.5, 16, saliency, fixed)

    def score(block, diag, start):  # the reference's per-block metric, block (out, b)
        if "Wanda" in cls.__name__:
            return block.abs() * norms[start : start + block.shape[1]]
        return block.abs()

    ref_fixed = None
    if fixed is not None:  # chosen once, as get_mag_mask / get_wanda_mask choose it
        metric = weight.abs() * (norms if "Wanda" in cls.__name__ else 1.0)
        ref_fixed = torch.ones_like(weight, dtype=torch.bool)
        for r in range(weight.shape[0]) if nm is not None or "Wanda" in cls.__name__ else ():
            if nm is None:
                ref_fixed[r, ref.lowest(metric[r], weight.shape[1] // 2)] = False
            else:
                for g in range(0, weight.shape[1], 4):
                    ref_fixed[r, g + ref.lowest(metric[r, g : g + 4], 2)] = False
        if nm is None and "Mag" in cls.__name__:
            ref_fixed.view(-1)[ref.lowest(metric.flatten(), weight.numel() // 2)] = False
    ref_w, ref_keep = ref.fasterprune(weight, hessian, score, ref_fixed, nm, 0.5, 16)
    assert torch.equal(keep, ref_keep)
    assert torch.equal(new, ref_w)
    assert int((~keep).sum()) == weight.numel() // 2
    if nm is not None:
        assert nm_violations(keep, *nm) == 0


def test_ablations_are_registered_and_prune_through_the_pruner():
    x = _inputs(2, 30, 48, correlated=True)
    for name in ("ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter"):
        layer = _linear(48, 12)
        pruner = PRUNERS.get(name)(layer)
        pruner.add_batch(x)
        mask = pruner.prune((2, 4), 0.5)
        assert nm_violations(layer.weight.data, 2, 4) == 0 and count_violations(layer.weight.data, mask) == 0


def test_ria_scores_are_the_definition():
    weight = _linear(16, 8).weight.data
    mean_sq = torch.rand(16) + 0.1
    a = weight.abs()
    expected = torch.empty_like(a)
    for i in range(8):
        for j in range(16):
            relative = a[i, j] / a[:, j].sum() + a[i, j] / a[i, :].sum()
            expected[i, j] = relative * math.sqrt(mean_sq[j]) ** 0.5
    torch.testing.assert_close(ria_scores(weight, mean_sq, 0.5), expected, rtol=1e-5, atol=1e-7)


def test_ria_snake_order_deals_channels_round_by_round():
    scores = torch.arange(8.0).reshape(1, 8).flip(1)  # channel 7 lowest ... channel 0 highest
    order = snake_order(scores, 4)
    # ranked ascending: 7 6 5 4 3 2 1 0; round 0 (ascending) 7 6, round 1 (descending) 4 5, ...
    assert order.tolist() == [7, 4, 3, 0, 6, 5, 2, 1]
    assert sorted(order.tolist()) == list(range(8))
    assert sorted(snake_order(torch.rand(3, 10), 4).tolist()) == list(range(10))  # partial group too


@pytest.mark.parametrize("options,nm", [(RiaSettings(), None), (RiaSettings(ria_per_row=True), None),
                                        (RiaSettings(), (2, 4)), (RiaSettings(ria_permute=True), (2, 4))])
def test_ria_pruner_masks(options, nm):
    layer = _linear(64, 16)
    pruner = RiaPruner(layer, options)
    pruner.add_batch(_inputs(2, 10, 64))
    scores = ria_scores(layer.weight.data, pruner.sq_sum / pruner.tokens, 0.5)
    mask = pruner.prune(nm, 0.5)
    assert int((~mask).sum()) == 16 * 32 and count_violations(layer.weight.data, mask) == 0
    if nm is None and not options.ria_per_row:  # the lowest half over the whole matrix
        assert torch.equal(mask.flatten(), ~torch.isin(torch.arange(1024), ref.lowest(scores.flatten(), 512)))
    if options.ria_permute:
        order = pruner.input_order
        assert nm_violations(mask[:, order], 2, 4) == 0 and sorted(order.tolist()) == list(range(64))
    elif nm is not None:
        assert nm_violations(mask, 2, 4) == 0


def _dsnot_case(nm):
    weight = _linear(64, 12, seed=3).weight.data.clone()
    x = _inputs(3, 20, 64, seed=4) + 0.3  # inputs with a mean, so the expected error is not zero
    stats = DSnoTStats()
    stats.add(x)
    keep = WandaPruner(_linear(64, 12, seed=3))
    keep.add_batch(x)
    mask = keep.select(weight, nm, 0.5)
    current = weight.masked_fill(~mask, 0.0)
    return weight, current, mask, stats


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dsnot_matches_the_row_by_row_procedure(nm):
    weight, current, mask, stats = _dsnot_case(nm)
    keep, regrown = dsnot_refine(weight, current, mask, stats, nm, 50, 0.01, 1.0)
    expected = ref.dsnot(weight, current, mask, stats.signal(), stats.variance(), stats.mean_sq(), nm, 50,
                         0.01, 1.0)
    assert torch.equal(keep, expected)
    assert not torch.equal(keep, mask)  # it swapped something
    assert torch.equal((~keep).sum(1), (~mask).sum(1))  # at fixed sparsity, row by row
    assert torch.equal(regrown, keep & ~mask)
    if nm is not None:
        assert nm_violations(keep, *nm) == 0
    s = stats.signal()
    before = ((weight - current) * s).sum(1).abs()
    after = ((weight - weight.masked_fill(~keep, 0.0)) * s).sum(1).abs()
    assert float(after.mean()) < float(before.mean())


def test_refined_pruner_regrows_original_values():
    x = _inputs(3, 20, 64, seed=4) + 0.3
    layer = _linear(64, 12, seed=3)
    original = layer.weight.data.clone()
    cls = refined(WandaPruner, RefineSettings(refine="dsnot", dsnot_threshold=0.01, dsnot_skip="none"))
    pruner = cls(layer, WandaSettings())
    pruner.add_batch(x)
    mask = pruner.prune(None, 0.5)
    plain = WandaPruner(_linear(64, 12, seed=3))
    plain.add_batch(x)
    assert not torch.equal(mask, plain.prune(None, 0.5))  # it swapped
    assert count_violations(layer.weight.data, mask) == 0
    assert torch.equal(layer.weight.data[mask], original[mask])  # kept (and regrown) hold their values
    assert int((~mask).sum()) == 12 * 32


def test_cli_new_methods_prune_and_inspect(llama_dir, tmp_path):
    for name, extra in (("variant", ("--method", "wanda", "--wanda-variant")),
                        ("ria", ("--method", "ria", "--pattern", "2:4", "--ria-permute")),
                        ("abl", ("--method", "ablate_wanda_iter", "--pattern", "2:4")),
                        ("dsnot", ("--method", "wanda", "--refine", "dsnot", "--dsnot-skip", "none"))):
        out = tmp_path / name
        proc = _run("prune", str(llama_dir), "-o", str(out), "--nsamples", "4", "--seqlen", "32", *extra)
        assert proc.returncode == 0, proc.stderr
        inspected = _run("inspect", str(out))
        assert inspected.returncode == 0 and "OK" in inspected.stdout, inspected.stdout
        record = json.loads((out / "sparseheal.json").read_text())
        if name == "ria":  # the orders travel with the masks through a heal, and inspect checks N:M by them
            orders = load_input_orders(out / "sparsity_masks.safetensors")
            assert len(orders) == len(record["layers"]) and "input_orders" in record
            healed = tmp_path / "ria-healed"
            proc = _run("heal", str(out), "-o", str(healed), "--method", "full", "--block-size", "32",
                        "--max-steps", "2", "--lr", "1e-3")
            assert proc.returncode == 0, proc.stderr
            carried = load_input_orders(healed / "sparsity_masks.safetensors")
            assert carried.keys() == orders.keys() and all(torch.equal(carried[k], orders[k]) for k in orders)
            inspected = _run("inspect", str(healed))
            assert inspected.returncode == 0 and "pattern 2:4; N:M violations 0" in inspected.stdout, \
                inspected.stdout
        if name == "dsnot":
            assert record["refine"]["refine"] == "dsnot" and record["sparsity_achieved"] == 0.5


def test_cli_refuses_what_a_method_does_not_define(llama_dir, tmp_path):
    cases = [(("--method", "wanda", "--wanda-variant", "--pattern", "2:4"), "--wanda-variant"),
             (("--method", "ria", "--ria-permute"), "--ria-permute"),
             (("--method", "ria", "--ria-per-row", "--pattern", "2:4"), "--ria-per-row"),
             (("--method", "magnitude", "--refine", "dsnot"), "--refine"),
             (("--method", "wanda", "--dsnot-cycles", "5"), "--dsnot-cycles"),
             (("--method", "sparsegpt", "--ria-power", "1"), "--ria-power")]
    for argv, flag in cases:
        proc = _run("prune", str(llama_dir), "-o", str(tmp_path / "x"), *argv)
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "x").exists()
