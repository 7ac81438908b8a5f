"""Hostile round three: the data mirror, the model cache and a user's files are never destroyed; no
wrong result is reported; locks hold across temporary directories. Every refusal: exit status, one line
naming the flag, no traceback, every input's sha256 unchanged, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hostile import _digest, _refused

import sparseheal
from sparseheal import sources
from sparseheal.sparsity.masks import pack_mask

HEAL = ["--block-size", "32", "--max-steps", "2", "--max-eval-samples", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory) -> Path:
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("h3") / "pruned"), method="magnitude")


@pytest.fixture()
def mirror(data_dir, tmp_path, monkeypatch) -> Path:
    """A copy of the data mirror, pointed at by $SPARSEHEAL_DATA_DIR."""
    copy = tmp_path / "mirror"
    shutil.copytree(data_dir, copy)
    monkeypatch.setenv("SPARSEHEAL_DATA_DIR", str(copy))
    return copy


# --- the data mirror and the model cache are inputs of every command


def test_the_data_mirror_is_never_an_output(pruned, llama_dir, mirror, capsys):
    _refused(["heal", pruned, "-o", mirror, "--overwrite", "--data", "c4", *HEAL], capsys, "--output",
             "SPARSEHEAL_DATA_DIR", inputs=(mirror,))
    test_split = mirror / "wikitext-2-raw-v1" / "wiki.test.raw"
    _refused(["evaluate", pruned, "--dataset", "wikitext2", "-o", test_split, "--overwrite", "--seqlen", "32",
              "--max-windows", "1"], capsys, "--output", "SPARSEHEAL_DATA_DIR", inputs=(mirror,))
    _refused(["prune", llama_dir, "-o", mirror / "c4-en", "--overwrite", "--method", "magnitude"], capsys,
             "--output", "SPARSEHEAL_DATA_DIR", inputs=(mirror,))
    _refused(["prune", llama_dir, "-o", mirror.parent, "--overwrite", "--method", "magnitude",
              "--data-dir", mirror], capsys, "--output", inputs=(mirror,))


def test_the_model_cache_is_never_an_output(llama_dir, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gguf" / "model").mkdir(parents=True)
    monkeypatch.setenv("SPARSEHEAL_CACHE", str(cache))
    _refused(["prune", llama_dir, "-o", cache / "gguf" / "model", "--overwrite", "--method", "magnitude"],
             capsys, "--output", "model cache", inputs=(cache,))


def _fake_conversion(llama_dir: Path):
    def convert(gguf: Path, into: Path) -> None:
        for f in llama_dir.iterdir():
            shutil.copy(f, into / f.name)
    return convert


def test_a_changed_cached_conversion_is_converted_again(llama_dir, tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(sources, "check_gguf", lambda *a: None)
    monkeypatch.setattr(sources, "_convert_gguf", _fake_conversion(llama_dir))
    first = Path(sources.resolve_source(str(gguf)).path)
    weights = first / "model.safetensors"
    original = weights.read_bytes()
    tampered = load_file(str(weights))
    tampered = {k: v.mul(0.0) for k, v in tampered.items()}  # as if a prune had been written over it
    save_file(tampered, str(weights), metadata={"format": "pt"})
    again = Path(sources.resolve_source(str(gguf)).path)
    assert again == first and weights.read_bytes() == original  # converted again, from the GGUF
    assert json.loads((first / "sparseheal-cache.json").read_text())["weights_hash"]
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # nothing left beside it


# --- temporary names never meet a user's file


def test_names_that_look_temporary_are_never_deleted(llama_dir, tmp_path):
    inputs = {name: tmp_path / name for name in (".out.partial", ".out.old", ".out.x1.partial")}
    for path in inputs.values():
        shutil.copytree(llama_dir, path)
    before = {name: _digest(path) for name, path in inputs.items()}
    out = sparseheal.prune(str(inputs[".out.partial"]), str(tmp_path / "out"), method="magnitude")
    sparseheal.prune(str(inputs[".out.old"]), str(out), method="magnitude", overwrite=True)
    assert {name: _digest(path) for name, path in inputs.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*inputs, "out"])


def test_weights_linked_from_another_folder_protect_that_folder(llama_dir, tmp_path, capsys):
    store, model = tmp_path / "store", tmp_path / "model"
    shutil.copytree(llama_dir, store)
    model.mkdir()
    for f in llama_dir.iterdir():
        (model / f.name).symlink_to(store / f.name) if f.suffix == ".safetensors" else shutil.copy(f, model)
    _refused(["prune", model, "-o", store, "--overwrite", "--method", "magnitude"], capsys, "--output",
             "MODEL", inputs=(store, model))


# --- silent wrong results


def _write_masks(directory: Path, masks: dict, meta: dict) -> None:
    packed = {k: pack_mask(m) for k, m in masks.items()}
    header = {"format": "packbits-msb-v1", "shapes": json.dumps({k: list(m.shape) for k, m in masks.items()})}
    save_file(packed, str(directory / "sparsity_masks.safetensors"), metadata={**header, **meta})


def test_masks_that_disagree_with_the_zero_weights_are_refused(pruned, tmp_path, capsys):
    from sparseheal.sparsity.store import load_masks, masks_meta

    copy = tmp_path / "copy"
    shutil.copytree(pruned, copy)
    masks, _ = load_masks(copy / "sparsity_masks.safetensors")
    meta = {k: v for k, v in masks_meta(copy / "sparsity_masks.safetensors").items()
            if k not in ("format", "shapes", "weights_hash")}  # its hash metadata removed
    _write_masks(copy, {k: ~m for k, m in masks.items()}, meta)  # inverted
    for method in ("full", "lora"):
        _refused(["heal", copy, "-o", tmp_path / "o", "--method", method, *HEAL], capsys, "PRUNED_DIR",
                 "non-zero weights", inputs=(copy,))
        assert not (tmp_path / "o").exists()


def test_an_adapter_holding_nan_is_not_merged(pruned, tmp_path, capsys):
    adapter = sparseheal.heal(str(pruned), str(tmp_path / "a"), block_size=32, max_steps=1,
                              max_eval_samples=2, device="cpu")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first].clone().fill_(float("nan"))
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    _refused(["merge", adapter, "-o", tmp_path / "m"], capsys, "ADAPTER_DIR", "not finite",
             inputs=(adapter,))
    assert not (tmp_path / "m").exists()


def test_a_window_of_one_token_is_refused(pruned, capsys):
    _refused(["evaluate", pruned, "--seqlen", "1"], capsys, "--seqlen", "at least 2")


def test_inspect_is_exact_in_float64(llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    pruned = sparseheal.prune(str(llama_dir), str(tmp_path / "p"), method="magnitude")
    model = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float64)
    weight = model.model.layers[0].self_attn.q_proj.weight
    index = (weight == 0).nonzero()[0]
    with torch.no_grad():
        weight[tuple(index)] = 1e-50  # zero in float32, not in float64
    model.save_pretrained(tmp_path / "p64")
    for f in ("sparsity_masks.safetensors", "sparseheal.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pruned / f, tmp_path / "p64" / f)
    report = sparseheal.inspect(str(tmp_path / "p64"), masks=str(pruned / "sparsity_masks.safetensors"))
    assert not report["ok"] and report["mask_violations"] == 1


# --- locks and contradictions


def _hold_lock(path: Path, tmpdir: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from sparseheal.records import output_lock\n"
        f"with output_lock({str(path)!r}):\n    print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_the_lock_holds_across_temporary_directories(llama_dir, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    holder = _hold_lock(out, tmp_path / "t1")
    try:
        proc = subprocess.run([sys.executable, "-m", "sparseheal", "prune", str(llama_dir), "-o", str(out),
                               "--method", "magnitude"], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TMPDIR": str(tmp_path / "t2")})
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and line.startswith("sparseheal: error: --output"), proc.stderr
        assert f"process {holder.pid}" in line and not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_report_waits_for_nothing_a_run_holds(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _hold_lock(run_dir, tmp_path)
    try:
        _refused(["report", run_dir], capsys, "RUN_DIR", f"process {holder.pid}", inputs=(run_dir,))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("text,needle", [
    ("heal: {max-steps: 2, max_steps: 3}\n", "name one setting"),
    ("heal: {max-steps: 2, max-steps: 3}\n", "twice"),
])
def test_a_recipe_that_contradicts_itself_is_refused(llama_dir, tmp_path, capsys, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {llama_dir}\nprune: {{method: magnitude}}\n{text}")
    _refused(["run", "--config", recipe, "--output", tmp_path / "run"], capsys, needle, inputs=(recipe,))
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_gives_one_setting_twice_is_refused(llama_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: magnitude\nsparsity: 0.5\nsparsity: 0.6\n")
    _refused(["prune", llama_dir, "-o", tmp_path / "o", "--config", config], capsys, "--config", "twice")
    config.write_text("method: magnitude\ncalibration-data: c4\ncalibration_data: wikitext2\n")
    _refused(["prune", llama_dir, "-o", tmp_path / "o", "--config", config], capsys, "--config",
             "name one setting")


def test_resume_on_an_input_pruned_again_is_refused(llama_dir, tmp_path, capsys):
    pruned = sparseheal.prune(str(llama_dir), str(tmp_path / "p"), method="magnitude")
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), block_size=32, max_steps=2, save_steps=1,
                          max_eval_samples=1, device="cpu")
    shutil.rmtree(out)  # as if killed before the output was written: its checkpoints are left
    sparseheal.prune(str(llama_dir), str(pruned), method="magnitude", sparsity=0.6, overwrite=True)
    capsys.readouterr()
    _refused(["heal", pruned, "-o", out, "--resume", *HEAL], capsys, "--resume", "pruned again",
             inputs=(pruned,))


# --- damaged inputs and late failures: one line, before any work


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not readable JSON"),
    ("[" * 10000 + "]" * 10000, "not readable JSON"),  # nested ten thousand deep
    ('{"pattern": 24}', "pattern is 24"),
    ("[1, 2]", "a list, not a record"),
    ('{"previous": {"previous": {"sparsity": "half"}}}', "sparsity is"),
])
def test_a_damaged_record_is_refused_by_every_stage(pruned, tmp_path, capsys, text, needle):
    copy = tmp_path / "copy"
    shutil.copytree(pruned, copy)
    (copy / "sparseheal.json").write_text(text)
    for argv, flag in ((["inspect", copy], "MODEL"),
                       (["heal", copy, "-o", tmp_path / "o", *HEAL], "PRUNED_DIR"),
                       (["evaluate", copy, "--seqlen", "32", "--max-windows", "1"], "MODEL"),
                       (["prune", copy, "-o", tmp_path / "o", "--method", "magnitude"], "MODEL")):
        _refused(argv, capsys, flag, needle, "damaged", inputs=(copy,))
    assert not (tmp_path / "o").exists()


def test_a_model_without_a_working_tokenizer_is_refused_before_its_weights_load(llama_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    from sparseheal.sparsity import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    (broken / "tokenizer.json").write_text("{")
    _refused(["prune", broken, "-o", tmp_path / "o", "--method", "magnitude"], capsys, "MODEL", "tokenizer",
             inputs=(broken,))
    config = json.loads((broken / "config.json").read_text())
    config["dtype"] = "nonsense"
    (broken / "config.json").write_text(json.dumps(config))
    _refused(["prune", broken, "-o", tmp_path / "o", "--method", "magnitude"], capsys, "MODEL", "config",
             inputs=(broken,))


@pytest.mark.parametrize("argv_tail,flag", [
    (["--seed", "-1", "--method", "wanda"], "--seed"),
    (["--pattern", "1:100000000"], "--pattern"),
])
def test_values_that_would_crash_or_exhaust_memory_are_refused(llama_dir, tmp_path, capsys, argv_tail, flag):
    _refused(["prune", llama_dir, "-o", tmp_path / "o", *argv_tail], capsys, flag)
    assert not (tmp_path / "o").exists()


def test_an_output_name_too_long_for_the_file_system_is_refused(llama_dir, tmp_path, capsys):
    _refused(["prune", llama_dir, "-o", tmp_path / ("x" * 240), "--method", "magnitude"], capsys, "--output",
             "shorter name")
    _refused(["evaluate", llama_dir, "-o", tmp_path / ("y" * 240 + ".json"), "--seqlen", "32"], capsys,
             "--output", "shorter name")
    assert list(tmp_path.iterdir()) == []


def test_the_results_file_may_go_to_a_folder_not_made_yet(pruned, tmp_path):
    out = tmp_path / "new" / "deeper" / "results.json"
    sparseheal.evaluate(str(pruned), seqlen=32, max_windows=1, output=str(out))
    assert json.loads(out.read_text())["results"][0]["windows"] == 1


def test_two_local_tasks_of_one_file_name_stay_two_results(tmp_path):
    from sparseheal.evaluate.zeroshot import prepare_tasks

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "task.jsonl").write_text(json.dumps(
            {"context": "x", "choices": ["a", "b"], "label": 0}) + "\n")
    specs = [f"local:{tmp_path / folder / 'task.jsonl'}" for folder in ("a", "b")]
    with prepare_tasks(specs) as tasks:
        assert tasks.names == ["local_task", "local_task_2"]


def test_the_held_out_slice_follows_the_training_budget():
    from sparseheal.heal.training import TrainingSettings

    assert TrainingSettings(max_steps=3).eval_limit == 3
    assert TrainingSettings(max_steps=3, batch_size=2, gradient_accumulation=4).eval_limit == 24
    assert TrainingSettings().eval_limit == 128
    assert TrainingSettings(max_steps=3, max_eval_samples=50).eval_limit == 50


# --- resources and values that break the work late


def test_a_data_file_must_be_a_regular_file(pruned, tmp_path, capsys):
    link = tmp_path / "zeros.txt"
    link.symlink_to("/dev/zero")
    _refused(["heal", pruned, "-o", tmp_path / "o", "--data", link, *HEAL], capsys, "--data",
             "not a regular file")
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    _refused(["heal", pruned, "-o", tmp_path / "o", "--data", fifo, *HEAL], capsys, "--data",
             "not a regular file")
    assert not (tmp_path / "o").exists()


def test_a_huge_line_is_tokenized_in_pieces(llama_dir, monkeypatch):
    from transformers import AutoTokenizer

    from sparseheal import data

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir))
    text = " ".join(["rivers and hills"] * 500)
    whole = data.token_ids(tokenizer, text)
    monkeypatch.setattr(data, "TOKENIZE_PIECE", 200)  # a long line, as a 1 GB one is to the real bound
    pieces = data.token_ids(tokenizer, text)
    assert len(pieces) == pytest.approx(len(whole), rel=0.02)
    assert tokenizer.decode(pieces).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize("argv_tail,flag", [
    (["--data", "self", "--self-length", "100000"], "--self-length"),
    (["--data", "self", "--self-length", "16", "--self-sequences", "1000000000"], "--self-sequences"),
    (["--block-size", "1"], "--block-size"),
    (["--distill", "kl", "--temperature", "1e-300"], "--temperature"),
])
def test_heal_values_that_fail_late_are_refused_first(pruned, tmp_path, capsys, argv_tail, flag):
    argv = ["heal", pruned, "-o", tmp_path / "o", "--max-steps", "1", "--device", "cpu", "--block-size", "32"]
    _refused([*argv, *argv_tail], capsys, flag, inputs=(pruned,))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_read_only_cache_for_self_generated_text_is_refused(pruned, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "selfgen").mkdir(parents=True)
    monkeypatch.setenv("SPARSEHEAL_CACHE", str(cache))
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(cache)))
    _refused(["heal", pruned, "-o", tmp_path / "o", "--data", "self", "--self-length", "16", *HEAL], capsys,
             "--data", "cannot write")


def test_an_overflowing_evaluation_is_an_error_not_a_number(pruned, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(pruned, copy)
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1e30  # finite; the loss is not a number
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    (copy / "sparsity_masks.safetensors").unlink()
    (copy / "sparseheal.json").unlink()
    out = tmp_path / "r.json"
    _refused(["evaluate", copy, "--seqlen", "32", "--max-windows", "1", "-o", out], capsys, "MODEL",
             "not finite or overflow", code=1)
    assert not out.exists()


def test_an_adapter_of_other_shapes_is_refused_in_one_line(pruned, tmp_path, capsys):
    adapter = sparseheal.heal(str(pruned), str(tmp_path / "a"), block_size=32, max_steps=1,
                              max_eval_samples=1, device="cpu")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {k: torch.zeros(v.shape[0] + 8, *v.shape[1:]) if "lora_B" in k else v
               for k, v in weights.items()}
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    _refused(["evaluate", pruned, "--adapter", adapter, "--seqlen", "32", "--max-windows", "1"], capsys,
             "--adapter", "does not fit", inputs=(adapter,))


def test_a_safetensors_header_that_lies_about_its_dtype_is_refused(llama_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    path = copy / "model.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    first = next(k for k in header if k != "__metadata__")
    header[first]["dtype"] = "F64"  # twice the bytes the data holds
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text)) if len(text) <= length else b""
    assert len(text) == length
    path.write_bytes(raw[:8] + text + raw[8 + length:])
    _refused(["prune", copy, "-o", tmp_path / "o", "--method", "magnitude"], capsys, "MODEL", first,
             inputs=(copy,))


def test_outputs_get_the_usual_modes_not_owner_only(llama_dir, tmp_path):
    umask = os.umask(0o022)
    try:
        out = sparseheal.prune(str(llama_dir), str(tmp_path / "o"), method="magnitude")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "sparseheal.json").stat().st_mode & 0o777 == 0o644


def test_a_linked_folder_protects_itself_not_its_parent(llama_dir, tmp_path):
    from sparseheal.checks import check_not_an_input

    store = tmp_path / "shelf" / "store"
    shutil.copytree(llama_dir, store)
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights").symlink_to(store)
    check_not_an_input(tmp_path / "shelf" / "beside", {"MODEL": model})  # beside the store: fine
    with pytest.raises(sparseheal.config.ConfigError):
        check_not_an_input(store, {"MODEL": model})
