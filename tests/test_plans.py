"""Sparsity plans and hardware-shaped patterns: V:N:M and block masks against their definitions, plans
validated before weights load, a mixed plan kept bit for bit through every healer, and the mask format
read with numpy alone."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from architectures import make_arch_dir
from safetensors.torch import load_file
from test_cli import _run

import sparseheal
from sparseheal.sparsity.patterns import block_mask, parse, vnm_mask
from sparseheal.sparsity.store import load_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "examples"))
from read_masks import read_masks  # noqa: E402


def test_vnm_mask_is_the_exhaustive_definition():
    scores = torch.rand(16, 24, generator=torch.Generator().manual_seed(0))
    keep = vnm_mask(scores, 8, 2, 6)
    for r0, c0 in itertools.product(range(0, 16, 8), range(0, 24, 6)):
        block = scores[r0 : r0 + 8, c0 : c0 + 6]
        best = max(itertools.combinations(range(6), 4),  # first subset wins ties, as max keeps the first
                   key=lambda cols: sum(sorted(block[r, list(cols)].tolist())[-2:][0]
                                        + sorted(block[r, list(cols)].tolist())[-1] for r in range(8)))
        for r in range(8):
            kept = sorted(best, key=lambda c: -float(block[r, c]))[:2]
            expected = torch.zeros(6, dtype=torch.bool)
            expected[kept] = True
            assert torch.equal(keep[r0 + r, c0 : c0 + 6], expected)
    assert parse("8:2:6").violations(keep) == 0 and float(keep.float().mean()) == pytest.approx(2 / 6)
    broken = keep.clone()
    broken[0, :] = True
    assert parse("8:2:6").violations(broken) == 4  # row 0 of every block of its row band


def test_block_mask_prunes_whole_tiles_by_summed_score():
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    keep = block_mask(scores, 4, 4, 0.5)
    tiles = scores.reshape(2, 4, 4, 4).sum(dim=(1, 3)).flatten()
    pruned_tiles = set(torch.argsort(tiles)[:4].tolist())
    for t in range(8):
        r, c = divmod(t, 4)
        tile = keep[4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        assert bool(tile.all()) == (t not in pruned_tiles) and bool(tile.any()) == (t not in pruned_tiles)
    assert parse("block:4x4").violations(keep, 0.5) == 0
    assert parse("block:4x4").violations(torch.ones(8, 16), 0.5) == 4


@pytest.mark.parametrize("text", ["2:2", "64:3:8", "64:2:4", "block:0x4", "3-of-4", "2:4:8:16"])
def test_bad_patterns_say_what_is_allowed(text):
    with pytest.raises(ValueError, match="N:M|V:N:M|block"):
        parse(text)


def _plan(tmp_path: Path, rules, **extra) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"rules": rules, **extra}))  # JSON is YAML
    return str(path)


MIXED = [{"layers": 0, "skip": True},
         {"family": "attention", "pattern": "unstructured", "sparsity": 0.4},
         {"family": "mlp", "pattern": "2:4"},
         {"family": "experts", "pattern": "8:2:8"}]


def test_bad_plans_are_refused_before_any_work(llama_dir, tmp_path):
    cases = [("not a mapping", "- 1\n- 2\n"),
             ([{"family": "attn", "skip": True}], "unknown family 'attn'"),
             ([{"colour": "red"}], "unknown key 'colour'"),
             ([{"names": "*.nothing_here"}], "rule 1 (names *.nothing_here) matches no prunable weight"),
             ([{"family": "attention", "pattern": "64:2:8"}], "needs rows divisible by 64"),
             ([{"family": "mlp", "method": "sparsegpt", "pattern": "block:8x8"}], "rule 1 (family mlp)"),
             ([{"layers": "3-1", "skip": True}], "layers must be"),
             ([{"family": "mlp", "skip": True}], "no rule matches")]
    for rules, message in cases:
        if isinstance(rules, str):
            (tmp_path / "plan.yaml").write_text(message)
            plan, message = str(tmp_path / "plan.yaml"), "must be a mapping"
        else:
            strict = {"all_must_match": True} if message == "no rule matches" else {}
            plan = _plan(tmp_path, rules, **strict)
        proc = _run("prune", str(llama_dir), "-o", str(tmp_path / "out"), "--plan", plan, "--seqlen", "32")
        assert proc.returncode == 2 and "--plan" in proc.stderr and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    proc = _run("prune", str(llama_dir), "-o", str(tmp_path / "out"), "--ignore", "*.nothing", "--seqlen",
                "32")
    assert proc.returncode == 2 and "--ignore" in proc.stderr


def _check_modules(directory: Path, skipped_layer: str = "model.layers.0.") -> dict:
    masks, meta = load_masks(directory / "sparsity_masks.safetensors")
    modules = json.loads(meta["modules"])
    assert not any(k.startswith(skipped_layer) for k in masks)  # layer 0 stayed dense: no masks
    for key, got in modules.items():
        expected = {"experts": "8:2:8", "self_attn": "unstructured", "mlp": "2:4"}  # experts sit under mlp
        assert got["pattern"] == next(p for part, p in expected.items() if f".{part}." in key + "."), key
        pattern, mask = parse(got["pattern"]), masks[key]
        matrices = mask.reshape(-1, *mask.shape[-2:]) if mask.dim() == 3 else mask.unsqueeze(0)
        assert sum(pattern.violations(m) for m in matrices) == 0
        if got["pattern"] == "unstructured":  # Wanda per row: exactly floor(in * 0.4), no float drift
            assert got["sparsity"] == 0.4 and bool(((~mask).sum(-1) == int(mask.shape[-1] * 0.4)).all())
    return masks


def test_a_mixed_plan_prunes_as_asked_and_every_healer_keeps_it(llama_dir, tmp_path):
    pruned = tmp_path / "pruned"
    proc = _run("prune", str(llama_dir), "-o", str(pruned), "--plan", _plan(tmp_path, MIXED[:3]),
                "--nsamples", "4", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    assert "kept dense by the plan: 7 weights" in proc.stdout
    masks = _check_modules(pruned)
    record = json.loads((pruned / "sparseheal.json").read_text())
    assert record["plan"]["modules"]["model.layers.0.mlp.up_proj"] == "dense"
    assert record["pattern"] == "mixed" and record["methods"] == ["wanda"]  # each weight's: in the plan
    assert record["partial_groups"] is None
    assert "sparsity plan" in (pruned / "README.md").read_text()
    heals = {"full": ("--method", "full"), "blockwise": ("--method", "blockwise", "--nsamples", "4"),
             "lora": ("--method", "lora", "--merge", "masked")}
    for name, flags in heals.items():
        out = tmp_path / name
        proc = _run("heal", str(pruned), "-o", str(out), *flags, "--block-size", "32", "--max-steps", "2",
                    "--lr", "1e-3") if name != "blockwise" else \
            _run("heal", str(pruned), "-o", str(out), *flags, "--seqlen", "32", "--lr", "1e-3")
        assert proc.returncode == 0, (name, proc.stderr)
        model_dir = out / "merged" if name == "lora" else out
        healed = load_file(str(next(model_dir.glob("*.safetensors"))))
        for key, mask in masks.items():
            weight = healed[f"{key}.weight"]
            assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), (name, key)
            assert not (weight[~mask].view(torch.int32) != 0).any(), (name, key)  # +0.0, bit for bit
        inspected = _run("inspect", str(model_dir))
        assert inspected.returncode == 0 and "OK" in inspected.stdout, (name, inspected.stdout)
        _check_modules(model_dir)


def test_experts_take_vnm_in_a_plan(tmp_path):
    model = make_arch_dir(tmp_path / "mixtral", "mixtral")  # experts fused (E, 2I, H) and (E, H, I)
    out = tmp_path / "moe"
    rules = [MIXED[0], MIXED[1], MIXED[3]]  # no dense MLP in Mixtral: a rule for one would match nothing
    proc = _run("prune", str(model), "-o", str(out), "--plan", _plan(tmp_path, rules), "--nsamples", "4",
                "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    masks = _check_modules(out)
    assert any("experts" in key for key in masks)
    inspected = _run("inspect", str(out))
    assert inspected.returncode == 0 and "OK" in inspected.stdout, inspected.stdout


def test_masks_export_and_the_numpy_reader(llama_dir, tmp_path):
    pruned = tmp_path / "pruned"
    assert _run("prune", str(llama_dir), "-o", str(pruned), "--method", "magnitude", "--pattern",
                "16:2:8").returncode == 0
    masks, meta = load_masks(pruned / "sparsity_masks.safetensors")
    read, modules, orders = read_masks(str(pruned / "sparsity_masks.safetensors"))
    assert read.keys() == masks.keys() and all(np.array_equal(read[k], masks[k].numpy()) for k in masks)
    assert modules == json.loads(meta["modules"]) and orders == {}
    assert {m["kind"] for m in modules.values()} == {"vnm"} and all(m["v"] == 16 for m in modules.values())
    out = tmp_path / "npy"
    proc = _run("inspect", str(pruned), "--export-masks", str(out))
    assert proc.returncode == 0 and "pattern 16:2:8; N:M violations 0" in proc.stdout, proc.stdout
    for key, mask in masks.items():
        assert np.array_equal(np.load(out / f"{key}.npy"), mask.numpy())
    assert json.loads((out / "masks.json").read_text())["modules"] == modules
    again = _run("inspect", str(pruned), "--export-masks", str(out))
    assert again.returncode == 2 and "--export-masks" in again.stderr


def test_dense_weights_and_misfits_of_the_flags_pattern(llama_dir, tmp_path):
    out = tmp_path / "ignored"
    proc = _run("prune", str(llama_dir), "-o", str(out), "--pattern", "2:4", "--ignore", "*.o_proj",
                "--nsamples", "4", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr
    inspected = _run("inspect", str(out))  # the dense o_proj are no N:M violations
    assert inspected.returncode == 0 and "N:M violations 0" in inspected.stdout, inspected.stdout
    refused = _run("prune", str(llama_dir), "-o", str(tmp_path / "tiles"), "--pattern", "block:48x48",
                   "--method", "magnitude")
    assert refused.returncode == 2 and "--pattern" in refused.stderr and "48" in refused.stderr
    assert not (tmp_path / "tiles").exists()


def test_dsnot_skipping_attention_on_a_parallel_block_model(tmp_path):
    model = make_arch_dir(tmp_path / "phi", "phi")  # attention and MLP read one normed input
    proc = _run("prune", str(model), "-o", str(tmp_path / "out"), "--refine", "dsnot", "--dsnot-skip",
                "attention", "--nsamples", "4", "--seqlen", "32")
    assert proc.returncode == 0, proc.stderr


def test_dsnot_statistic_of_routed_tokens_does_not_depend_on_the_batch():
    from sparseheal.sparsity.dsnot import DSnoTStats

    x = torch.randn(32, 8)  # 32 routed tokens of 8-token samples: 4 samples' worth
    whole, halves = DSnoTStats(seqlen=8), DSnoTStats(seqlen=8)
    whole.add(x)
    halves.add(x[:16])
    halves.add(x[16:])
    assert whole.samples == halves.samples == 4
    torch.testing.assert_close(whole.signal(), halves.signal())
    torch.testing.assert_close(whole.signal(), x.sum(0) / 4)


def test_a_plans_nm_rule_and_calibrated_method_are_what_the_record_says(tmp_path, caplog):
    """The flags say magnitude, unstructured; the plan's rule prunes the experts 2:3 by Wanda."""
    model = make_arch_dir(tmp_path / "mixtral", "mixtral")
    plan = _plan(tmp_path, [{"family": "experts", "method": "wanda", "pattern": "2:3"}])
    with caplog.at_level("WARNING"):
        out = sparseheal.prune(str(model), str(tmp_path / "p"), method="magnitude", plan=plan, nsamples=2,
                               seqlen=32)
    assert "ignoring" not in caplog.text  # the plan's Wanda reads the calibration settings
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["pattern"] == "mixed" and record["methods"] == ["magnitude", "wanda"]
    assert record["calibration"]["nsamples"] == 2
    partial = record["partial_groups"]
    assert partial["rule"] == "the trailing group of fewer than 3 inputs of each row keeps at most 2"
    assert "model.layers.0.mlp.experts.gate_up_proj" in partial["weights"]
    assert not any("self_attn" in k for k in partial["weights"])  # unstructured: no groups
    report = sparseheal.inspect(str(out))
    assert report["ok"] and report["pattern"] == "mixed"
