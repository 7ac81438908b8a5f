"""Safe loading and safe writing: free space checked before work, pickle-only weights refused unless allowed,
masks refused beside weights they were not written with, YAML 1.2 numbers in ``--config``, and recipes that
cannot write outside their run directory."""

from __future__ import annotations

import inspect as pyinspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import sparseheal
from sparseheal import api, checks, cli
from sparseheal.config import ConfigError
from sparseheal.models import hash_weights, weights_bytes
from sparseheal.records import MASKS_FILE
from sparseheal.run import recipe
from sparseheal.sparsity.store import load_masks, save_masks

TINY_HEAL = dict(block_size=32, max_steps=2, max_eval_samples=2, logging_steps=1, device="cpu")


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory) -> Path:
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("p") / "pruned"), method="magnitude")


@pytest.fixture(scope="module")
def pruned_nm(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p") / "pruned-2-4"
    return sparseheal.prune(str(llama_dir), str(out), method="magnitude", pattern="2:4")


@pytest.fixture(scope="module")
def healed(pruned, tmp_path_factory, data_dir) -> Path:
    """A LoRA adapter with a masked merge under healed/merged."""
    return sparseheal.heal(str(pruned), str(tmp_path_factory.mktemp("h") / "healed"), merge="masked",
                           data_dir=str(data_dir), **TINY_HEAL)


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def _swapped(pruned: Path, other: Path, target: Path) -> Path:
    shutil.copytree(pruned, target)
    shutil.copyfile(other / MASKS_FILE, target / MASKS_FILE)
    return target


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


# --- masks belong to the weights they were written with


def test_masks_and_record_carry_the_hash_of_their_weights(pruned, healed):
    record = json.loads((pruned / "sparseheal.json").read_text())
    assert _meta(pruned / MASKS_FILE)["weights_hash"] == record["weights_hash"] == hash_weights(pruned)
    assert record["base_hash"] != record["weights_hash"]  # the dense weights, and the pruned ones
    merged = healed / "merged"
    assert _meta(merged / MASKS_FILE)["weights_hash"] == hash_weights(merged)
    assert sparseheal.inspect(str(merged))["ok"]


def test_full_heal_output_masks_name_the_trained_weights(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "full"), method="full", lr=1e-3, **TINY_HEAL)
    assert hash_weights(out) != hash_weights(pruned)  # trained
    assert _meta(out / MASKS_FILE)["weights_hash"] == hash_weights(out)
    assert sparseheal.inspect(str(out))["ok"]


def test_swapped_masks_are_refused_naming_both_hashes(pruned, pruned_nm, healed, tmp_path):
    swapped = _swapped(pruned, pruned_nm, tmp_path / "swapped")
    written_for, holds = hash_weights(pruned_nm), hash_weights(swapped)
    calls = {
        "PRUNED_DIR": lambda: sparseheal.heal(str(swapped), str(tmp_path / "h"), **TINY_HEAL),
        "MODEL": lambda: sparseheal.inspect(str(swapped)),
        "--base": lambda: sparseheal.merge(str(healed), str(tmp_path / "m"), base=str(swapped)),
    }
    for flag, call in calls.items():
        with pytest.raises(ConfigError) as info:
            call()
        assert info.value.flag == flag
        message = info.value.message
        assert written_for in message and holds in message, message
        assert str(swapped / MASKS_FILE) in message
        assert f"{swapped}/sparseheal.json records weights" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swapped"]  # nothing written


def test_masks_beside_other_weights_without_a_record_are_refused(pruned, pruned_nm, tmp_path):
    """Without a record the weight files are the reference."""
    swapped = _swapped(pruned, pruned_nm, tmp_path / "swapped")
    (swapped / "sparseheal.json").unlink()
    with pytest.raises(ConfigError) as info:
        sparseheal.inspect(str(swapped))
    assert f"{swapped} holds weights {hash_weights(pruned)}" in info.value.message
    assert hash_weights(pruned_nm) in info.value.message


def test_weights_changed_after_the_masks_are_verified_not_refused(pruned, tmp_path, caplog):
    """A pruned weight set non-zero after pruning: inspect reports the violation (the masks still belong)."""
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(pruned, changed)
    weights = load_file(changed / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    masks, _ = load_masks(changed / MASKS_FILE)
    row, col = (~masks[name.removesuffix(".weight")]).nonzero()[0].tolist()
    weights[name][row, col] = 0.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    report = sparseheal.inspect(str(changed))
    assert not report["ok"] and report["mask_violations"] == 1
    assert "changed since the masks were written" in caplog.text


def test_masks_without_the_hash_are_still_read(pruned, tmp_path):
    """Masks written before they carried the hash are accepted (and still checked bit for bit)."""
    old = tmp_path / "old"
    shutil.copytree(pruned, old)
    masks, meta = load_masks(old / MASKS_FILE)
    save_masks(masks, old / MASKS_FILE, {k: v for k, v in meta.items() if k not in ("format", "shapes",
                                                                                      "weights_hash")})
    assert "weights_hash" not in _meta(old / MASKS_FILE)
    assert sparseheal.inspect(str(old))["ok"]


def test_explicit_masks_of_other_weights_are_verified_not_refused(pruned, pruned_nm):
    """``inspect --masks FILE`` checks given masks against the weights: other masks show as violations."""
    report = sparseheal.inspect(str(pruned), masks=str(pruned_nm / MASKS_FILE))
    assert not report["ok"] and report["mask_violations"] > 0


# --- pickle-only weights: refused unless --allow-pickle, then loaded


@pytest.fixture(scope="module")
def pickled(pruned, tmp_path_factory) -> Path:
    """``pruned`` with its weights as pytorch_model.bin (no masks file: they come from the zeros)."""
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("pk") / "pickled"
    shutil.copytree(pruned, target)
    (target / "model.safetensors").unlink()
    (target / MASKS_FILE).unlink()
    state = AutoModelForCausalLM.from_pretrained(pruned).state_dict()
    torch.save(state, target / "pytorch_model.bin")
    return target


def test_pickle_only_weights_need_allow_pickle_on_heal_merge_inspect(pickled, tmp_path, capsys):
    steps = ["--block-size", "32", "--max-steps", "2", "--max-eval-samples", "2", "--device", "cpu"]
    adapter = tmp_path / "adapter"
    refused = [
        ["heal", str(pickled), "-o", str(adapter), *steps],
        ["inspect", str(pickled)],
    ]
    for argv in refused:
        assert _cli(argv) == 2
        assert "--allow-pickle" in capsys.readouterr().err
    assert _cli(["heal", str(pickled), "-o", str(adapter), *steps, "--allow-pickle"]) == 0
    assert json.loads((adapter / "sparseheal.json").read_text())["masks_from"] == "zeros"
    merged = tmp_path / "merged"
    assert _cli(["merge", str(adapter), "-o", str(merged), "--eval-windows", "0"]) == 2  # base is pickled
    assert "--allow-pickle" in capsys.readouterr().err and not merged.exists()
    assert _cli(["merge", str(adapter), "-o", str(merged), "--eval-windows", "0", "--allow-pickle"]) == 0
    capsys.readouterr()
    assert _cli(["inspect", str(pickled), "--allow-pickle", "--trust-remote-code"]) == 0
    assert "OK" in capsys.readouterr().out


def test_allow_pickle_and_trust_remote_code_are_flags_of_every_loading_command():
    for func in (api.prune, api.heal, api.merge, api.evaluate, api.inspect):
        params = pyinspect.signature(func).parameters
        assert params["allow_pickle"].default is False and params["trust_remote_code"].default is False


# --- free space and the output, before any work


@pytest.fixture
def disk(monkeypatch):
    """Sets the free bytes every file system reports, and drops the fixed minimum, so estimates show."""
    monkeypatch.setattr(checks, "MIN_FREE_BYTES", 0)

    def set_free(free: int) -> None:
        usage = shutil._ntuple_diskusage(2**40, 2**40 - free, free)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)

    return set_free


def _space_refusal(call, area: Path, free: int, needed: int, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.flag == "--output"
    message = info.value.message
    assert f"{checks._size(free)} free" in message and f"about {checks._size(needed)} is needed" in message
    assert what in message and "choose another --output" in message
    assert not any(area.iterdir())  # nothing written where the output would go, not even a temporary sibling


def test_prune_needs_room_for_the_model(llama_dir, tmp_path, disk):
    weights = weights_bytes(llama_dir)
    assert weights == (llama_dir / "model.safetensors").stat().st_size
    others = sum(f.stat().st_size for f in llama_dir.iterdir() if f.suffix != ".safetensors")
    needed = weights + weights // 16 + others  # masks (a bit per 16-bit weight at most), tokenizer, config
    disk(needed - 1)
    call = lambda: sparseheal.prune(str(llama_dir), str(tmp_path / "o"), method="magnitude")  # noqa: E731
    _space_refusal(call, tmp_path, needed - 1, needed, "weight files")
    disk(needed)
    api.prune.preflight(str(llama_dir), str(tmp_path / "o"), method="magnitude")  # exactly enough: accepted


def test_full_heal_needs_room_for_its_checkpoints(pruned, tmp_path, disk):
    weights = weights_bytes(pruned)
    needed = weights * (1 + 3 * 2)  # the model and two checkpoints of weights plus two AdamW moments
    disk(needed - 1)
    call = lambda: sparseheal.heal(str(pruned), str(tmp_path / "o"), method="full", save_steps=5,  # noqa: E731
                                   **TINY_HEAL)
    _space_refusal(call, tmp_path, needed - 1, needed, "2 checkpoints")
    disk(weights)  # without checkpoints the model alone must fit
    api.heal.preflight(str(pruned), str(tmp_path / "o"), method="full", block_size=32)


def test_merge_and_run_need_room_for_their_models(llama_dir, healed, pruned, tmp_path, disk):
    weights = weights_bytes(pruned)
    disk(weights - 1)
    call = lambda: sparseheal.merge(str(healed), str(tmp_path / "m"))  # noqa: E731
    _space_refusal(call, tmp_path, weights - 1, weights, "the base's weights")
    dense = weights_bytes(llama_dir)
    area = tmp_path / "runs"
    area.mkdir()
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"model: {llama_dir}\nprune: {{method: magnitude}}\nheal: {{block-size: 32, "
                        f"merge: masked}}\nevaluate: {{seqlen: 32}}\noutput: {area / 'run'}\n")
    disk(2 * dense - 1)  # pruned/ and merged/ are each about the dense model's size
    _space_refusal(lambda: sparseheal.run(config=str(run_yaml)), area, 2 * dense - 1, 2 * dense,
                   "prune, heal, merge")


# --- --config reads YAML 1.2 numbers


def test_config_file_reads_nm_patterns_and_exponent_floats(llama_dir, tmp_path):
    assert yaml.safe_load("pattern: 2:4\nlr: 1e-4")["pattern"] == 124  # what YAML 1.1 makes of them
    (tmp_path / "prune.yaml").write_text("method: magnitude\npattern: 2:4\n")
    pruned_dir = tmp_path / "p"
    assert _cli(["prune", str(llama_dir), "-o", str(pruned_dir), "--config", f"{tmp_path}/prune.yaml"]) == 0
    record = json.loads((pruned_dir / "sparseheal.json").read_text())
    assert record["pattern"] == "2:4" and record["sparsity"] == 0.5
    (tmp_path / "heal.yaml").write_text("lr: 1e-4\nmax-steps: 1\nblock-size: 32\nmax-eval-samples: 0\n"
                                        "device: cpu\n")
    healed_dir = tmp_path / "h"
    assert _cli(["heal", str(pruned_dir), "-o", str(healed_dir), "--config", f"{tmp_path}/heal.yaml"]) == 0
    lr = json.loads((healed_dir / "sparseheal.json").read_text())["recipe"]["lr"]
    assert lr == 1e-4 and isinstance(lr, float)


# --- recipes write inside their run directory only


def test_no_recipe_key_places_a_written_path():
    """Every stage parameter that says where something is written (or replaced) is set by run alone."""
    for section in recipe.SECTIONS:
        params = set(pyinspect.signature(getattr(api, section)).parameters)
        written = {p for p in params if "output" in p or p in ("overwrite", "resume")}
        assert written and written <= recipe._RUN_KEYS[section], section
        assert not written & set(recipe.section_defaults(section))


@pytest.mark.parametrize("section,key,value", [
    ("prune", "output", "../../escaped"),
    ("heal", "output", "/tmp/escaped"),
    ("heal", "pruned_dir", "../elsewhere"),
    ("evaluate", "output", "../../escaped.json"),
    ("prune", "overwrite", "true"),
    ("heal", "resume", "true"),
])
def test_recipe_keys_that_place_outputs_are_refused(llama_dir, tmp_path, section, key, value):
    for spelling in (key, key.replace("_", "-")):
        text = f"model: {llama_dir}\n{section}: {{{spelling}: {value}}}\noutput: {tmp_path / 'run'}\n"
        (tmp_path / "r.yaml").write_text(text)
        with pytest.raises(ConfigError) as info:
            sparseheal.run(config=str(tmp_path / "r.yaml"))
        assert info.value.flag.endswith(f"{section}.{spelling}") and "set by run" in info.value.message
        with pytest.raises(ConfigError) as info:  # the same through a flag override
            sparseheal.run(model=str(llama_dir), output=f"{tmp_path}/run",
                           **{section: [f"{spelling}={value}"]})
        assert info.value.flag.endswith(f"{section}.{spelling}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_link_out_of_the_run_directory_is_refused(llama_dir, tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    run_dir.mkdir()
    outside.mkdir()
    (run_dir / "sparseheal.json").write_text('{"stage": "run", "stages": {}}')
    (run_dir / "healed.ckpt").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError) as info:
        sparseheal.run(model=str(llama_dir), output=str(run_dir), prune=["method=magnitude"])
    assert info.value.flag == "--output" and "outside the run directory" in info.value.message
    assert str(run_dir / "healed.ckpt") in info.value.message
    assert not any(outside.iterdir()) and sorted(p.name for p in run_dir.iterdir()) == ["healed.ckpt",
                                                                                        "sparseheal.json"]
    (run_dir / "healed.ckpt").unlink()
    (run_dir / "notes").mkdir()
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "latest").symlink_to(run_dir / "notes", target_is_directory=True)
    recipe.check_run_links(run_dir)  # a link that stays inside is fine
