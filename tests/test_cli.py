"""The command line end to end on a tiny model: prune, evaluate, inspect, --config files, planted faults."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sparseheal import cli
from sparseheal.sparsity.store import load_masks


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sparseheal", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_prune_evaluate_inspect_through_python_m(llama_dir, tmp_path):
    out = tmp_path / "pruned"
    proc = _run("prune", str(llama_dir), "-o", str(out), "--method", "wanda", "--pattern", "2:4",
                "--nsamples", "4", "--seqlen", "32", "--calibration-batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and str(out) in proc.stdout and "50.00%" in proc.stdout
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["pattern"] == "2:4" and record["calibration"]["batch_size"] == 3

    results = tmp_path / "results.json"
    proc = _run("evaluate", str(out), "--seqlen", "32", "--max-windows", "3", "--batch-size", "2",
                "-o", str(results))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    assert report["model"] == str(out) and report["adapter"] is None
    (row,) = report["results"]
    assert {"dataset", "protocol", "seqlen", "windows", "tokens", "dtype", "ppl"} <= set(row)
    assert (row["dataset"], row["protocol"], row["seqlen"], row["windows"], row["tokens"], row["dtype"]) == (
        "wikitext2", "wanda", 32, 3, 96, "float32")
    assert math.isfinite(row["ppl"]) and row["ppl"] > 1
    assert f"{row['ppl']:.3f}" in proc.stdout  # the printed table shows the same number

    proc = _run("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "2:4" in proc.stdout


def test_config_file_dashed_and_underscore_keys(llama_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(llama_dir),
        "output": str(tmp_path / "from-config"),
        "method": "magnitude",
        "pattern": "4:8",
        "calibration-batch-size": 3,  # dashed
        "calibration_data": "wikitext2",  # underscore
        "nsamples": 5,
        "seqlen": 24,
    }))
    code, out, err = _main(capsys, "prune", "--config", str(recipe))
    assert code == 0, err
    record = json.loads((tmp_path / "from-config" / "sparseheal.json").read_text())
    assert record["method"] == "magnitude" and record["pattern"] == "4:8" and record["sparsity"] == 0.5
    assert record["calibration"] is None  # magnitude draws no calibration: the settings are left out


def test_command_line_overrides_config(llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("nsamples: 2\nseqlen: 40\nmethod: sparsegpt\nsparsity: 0.25\n")
    out = tmp_path / "o"
    code, _, err = _main(capsys, "prune", str(llama_dir), "-o", str(out), "--config", str(recipe),
                         "--seqlen", "16", "--calibration_batch_size", "2")  # underscore flag spelling
    assert code == 0, err
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["method"] == "sparsegpt" and record["sparsity"] == 0.25
    assert record["calibration"]["seqlen"] == 16 and record["calibration"]["nsamples"] == 2
    assert record["calibration"]["batch_size"] == 2
    assert record["sparsity_achieved"] == pytest.approx(0.25, abs=1e-3)


@pytest.mark.parametrize("key,suggestion", [("nsample", "nsamples"), ("calibration-dta", "calibration-data"),
                                            ("sed", "seed"), ("over_write", "overwrite")])
def test_unknown_config_key_suggests_closest(llama_dir, tmp_path, capsys, key, suggestion):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"{key}: 1\n")
    out_dir = str(tmp_path / "o")
    code, out, err = _main(capsys, "prune", str(llama_dir), "-o", out_dir, "--config", str(recipe))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and key in err and f"did you mean '{suggestion}'" in err
    assert not (tmp_path / "o").exists()


def test_evaluate_config_and_print(pruned_llama, tmp_path, capsys):
    recipe = tmp_path / "e.yaml"
    recipe.write_text("dataset: wikitext2,c4\nmax-windows: 2\nseqlen: 16\nbatch_size: 2\n")
    code, out, err = _main(capsys, "evaluate", str(pruned_llama), "--config", str(recipe))
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith(("wikitext2", "c4"))]
    assert len(lines) == 2 and all(" wanda " in line and " 16 " in line for line in lines)


def test_only_rank_zero_prints(pruned_llama, tmp_path, capsys, monkeypatch):
    argv = ("evaluate", str(pruned_llama), "--max-windows", "1", "--seqlen", "16")
    monkeypatch.setenv("RANK", "1")
    code, out, err = _main(capsys, *argv)
    assert code == 0 and out == "", err
    monkeypatch.setenv("RANK", "0")
    code, out, err = _main(capsys, *argv)
    assert code == 0 and "wikitext2" in out, err


def test_help_lists_dashed_flags_with_docstring_text(capsys):
    code, out, _ = _main(capsys, "prune", "--help")
    assert code == 0
    for flag in ("--calibration-data", "--calibration-batch-size", "--nsamples", "--pattern", "--output",
                 "-o", "--config", "--overwrite"):
        assert flag in out
    assert "seed of the calibration draw" in out


def _planted_copy(pruned: Path, tmp_path: Path, value: float) -> tuple[Path, str, tuple[int, int]]:
    """A copy of ``pruned`` with one pruned position of one weight set to ``value``."""
    copy = tmp_path / f"planted-{value}"
    shutil.copytree(pruned, copy)
    masks, _ = load_masks(copy / "sparsity_masks.safetensors")
    name = "model.layers.1.mlp.down_proj"
    row, col = (int(i) for i in torch.nonzero(~masks[name])[7])
    weights = load_file(copy / "model.safetensors")
    assert weights[f"{name}.weight"][row, col].item() == 0.0
    weights[f"{name}.weight"][row, col] = value
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy, name, (row, col)


@pytest.mark.parametrize("value", [0.125, -0.0])
def test_inspect_detects_planted_violation(pruned_llama, tmp_path, capsys, value):
    import sparseheal

    assert sparseheal.inspect(str(pruned_llama))["ok"]
    copy, name, _ = _planted_copy(pruned_llama, tmp_path, value)
    report = sparseheal.inspect(str(copy))
    assert report["ok"] is False and report["mask_violations"] == 1
    bad = [r for r in report["layers"] if r.get("mask_violations")]
    assert [r["name"] for r in bad] == [name]
    code, out, err = _main(capsys, "inspect", str(copy))
    assert code == 1 and "FAILED" in out and "Traceback" not in err
    # an explicit --masks file is checked the same way
    masks_file = str(pruned_llama / "sparsity_masks.safetensors")
    code, out, _ = _main(capsys, "inspect", str(copy), "--masks", masks_file)
    assert code == 1


def test_inspect_nm_violation_without_masks(tiny_model_dir, tmp_path, capsys):
    import sparseheal

    out = sparseheal.prune(str(tiny_model_dir("opt")), str(tmp_path / "p"), method="magnitude", pattern="2:4")
    (out / "sparsity_masks.safetensors").unlink()  # pruned elsewhere: only the record's pattern is known
    report = sparseheal.inspect(str(out))
    assert report["ok"] and report["nm_violations"] == 0 and report["mask_violations"] is None
    weights = load_file(out / "model.safetensors")
    key = "model.decoder.layers.0.fc1.weight"
    group = weights[key][0, :4]
    weights[key][0, :4] = torch.where(group == 0, torch.ones_like(group), group)  # the group is dense again
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    report = sparseheal.inspect(str(out))
    assert report["ok"] is False and report["nm_violations"] == 1
    code, _, _ = _main(capsys, "inspect", str(out))
    assert code == 1
