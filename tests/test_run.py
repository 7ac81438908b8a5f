"""``sparseheal run`` end to end on a tiny model: stages, resume, --force, refused recipe changes."""

import json
from pathlib import Path

import pytest
from runs import copy_run, snapshot, tiny_run, write_recipe

import sparseheal
from sparseheal.cli import main
from sparseheal.config import ConfigError
from sparseheal.heal.trainer import HealTrainer
from sparseheal.run.recipe import load_recipe
from sparseheal.settings import parse_yaml


@pytest.fixture
def finished_run(llama_dir, tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-run", llama_dir)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run (with its recipe pointing at the copy) for tests that change it."""
    return copy_run(finished_run, tmp_path)


def test_run_writes_every_stage_and_the_report(finished_run, capsys):
    for name in ("pruned/sparseheal.json", "pruned/sparsity_masks.safetensors", "healed/adapter_config.json",
                 "healed/train_log.jsonl", "merged/sparseheal.json", "recipe.yaml", "report.md",
                 "report.json", "loss.png", "sparsity.png", "perplexity.png", "zeroshot.png"):
        assert (finished_run / name).is_file(), name
    evals = {p.stem: json.loads(p.read_text()) for p in (finished_run / "eval").glob("*.json")}
    assert set(evals) == {"dense", "pruned", "healed", "merged"}
    protocol = {(r["dataset"], r["seqlen"], r["windows"], r["dtype"])
                for e in evals.values() for r in e["results"]}
    assert protocol == {("wikitext2", 32, 4, "float32")}  # one protocol for every model
    assert evals["healed"]["adapter"] == str(finished_run / "healed")
    assert all(0 <= e["zeroshot"]["local_task"]["acc"] <= 1 for e in evals.values())
    record = json.loads((finished_run / "sparseheal.json").read_text())
    assert record["stage"] == "run" and record["report"] == "report.md"
    assert {s["status"] for s in record["stages"].values()} == {"done"}
    assert record["stages"]["heal"]["settings"]["max_steps"] == 6
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 0 and s["cpu_seconds"] >= 0
               for s in record["stages"].values())
    assert record["stages"]["heal"]["cpu_seconds"] > 0


def test_rerun_skips_finished_stages(run_copy):
    run_dir, recipe = run_copy
    before = snapshot(run_dir)
    result = sparseheal.run(config=recipe)
    assert all(stage["skipped"] for stage in result["stages"].values())
    assert snapshot(run_dir) == before  # no stage file rewritten


def test_force_redoes_the_stage_and_what_uses_it(run_copy):
    run_dir, recipe = run_copy
    before = snapshot(run_dir)
    result = sparseheal.run(config=recipe, force="heal")
    after = snapshot(run_dir)
    ran = {name for name, stage in result["stages"].items() if not stage["skipped"]}
    assert ran == {"heal", "merge", "eval-healed", "eval-merged"}
    unchanged = {p for p in before if after.get(p) == before[p]}
    assert {"pruned/sparsity_masks.safetensors", "eval/dense.json", "eval/pruned.json"} <= unchanged
    assert after["healed/adapter_model.safetensors"][0] != before["healed/adapter_model.safetensors"][0]
    assert after["eval/healed.json"][0] != before["eval/healed.json"][0]


def test_a_flag_added_after_a_stage_ran_keeps_it_finished(run_copy):
    """A run record written before a flag existed (the flag absent from its settings) still resumes."""
    run_dir, recipe = run_copy
    record = json.loads((run_dir / "sparseheal.json").read_text())
    del record["stages"]["prune"]["settings"]["data_dir"]
    (run_dir / "sparseheal.json").write_text(json.dumps(record))
    before = snapshot(run_dir)
    assert sparseheal.run(config=recipe)["stages"]["prune"]["skipped"]
    assert snapshot(run_dir) == before
    with pytest.raises(ConfigError) as info:  # given a value other than its default, it is a change
        sparseheal.run(config=recipe, prune=["data-dir=/elsewhere"])
    assert info.value.flag == "prune.data-dir" and "--force prune" in info.value.message


@pytest.mark.parametrize(
    "flags, key",
    [({"prune": ["sparsity=0.6"]}, "prune.sparsity"), ({"heal": ["lr=2e-3"]}, "heal.lr"),
     ({"heal": ["merge=dense"]}, "heal.merge"), ({"evaluate": ["max-windows=2"]}, "evaluate.max-windows")],
)
def test_changed_recipe_is_refused_naming_the_setting(run_copy, flags, key):
    run_dir, recipe = run_copy
    before = snapshot(run_dir)
    with pytest.raises(ConfigError) as info:
        sparseheal.run(config=recipe, **flags)
    assert info.value.flag == key and "--force" in info.value.message
    assert snapshot(run_dir) == before


def test_interrupted_heal_resumes_from_its_checkpoint(llama_dir, tmp_path, monkeypatch):
    recipe = str(write_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run", merge="none"))
    original = HealTrainer.training_step

    def crash_after_checkpoint(self, *args, **kwargs):
        if self.state.global_step == 4:  # checkpoint-3 is on disk
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HealTrainer, "training_step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        sparseheal.run(config=recipe)
    assert not (tmp_path / "run" / "healed").exists()
    assert (tmp_path / "run" / "healed.ckpt" / "checkpoint-3").is_dir()
    pruned_before = snapshot(tmp_path / "run")

    monkeypatch.setattr(HealTrainer, "training_step", original)
    result = sparseheal.run(config=recipe)
    assert result["stages"]["prune"]["skipped"]
    assert result["stages"]["heal"]["reason"] == "resuming from checkpoint-3"
    assert snapshot(tmp_path / "run")["pruned/sparsity_masks.safetensors"] == \
        pruned_before["pruned/sparsity_masks.safetensors"]
    healed = json.loads((tmp_path / "run" / "healed" / "sparseheal.json").read_text())
    assert healed["steps"] == 6


def test_force_names_a_stage_of_the_recipe(run_copy, llama_dir, tmp_path):
    run_dir, recipe = run_copy
    with pytest.raises(ConfigError, match="choose a stage from prune, heal, merge, evaluate"):
        sparseheal.run(config=recipe, force="healing")
    no_merge = write_recipe(tmp_path / "no-merge.yaml", llama_dir, tmp_path / "other", merge="none")
    with pytest.raises(ConfigError, match="no merge stage"):
        sparseheal.run(config=str(no_merge), force="merge")
    assert not (tmp_path / "other").exists()


def test_cli_error_for_a_misspelled_key(llama_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {llama_dir}\nheal: {{max-step: 5}}\noutput: {tmp_path / 'run'}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(recipe)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "heal.max-step" in err and "did you mean 'max-steps'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, flag, words",
    [("model: m\nprun: {}\noutput: o\n", "prun", "did you mean 'prune'"),
     ("model: m\nheal: {output: /elsewhere}\noutput: o\n", "heal.output", "set by run"),
     ("model: m\nevaluate: {dataset: [wikitext2}\n", "--config", "not valid YAML"),
     ("prune: {}\noutput: o\n", "--model", "model"),
     ("model: m\n", "--output", "run directory"),
     ("model: m\nprune: {sparsity: half}\noutput: o\n", "prune.sparsity", "number")],
)
def test_recipe_errors(tmp_path, text, flag, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path), None, None, {})
    assert info.value.flag.endswith(flag) and words in info.value.message


def test_recipe_values_and_flag_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\nprune: {pattern: 2:4, calibration_data: c4}\nheal: {lr: 1e-4, max-steps: 10}\n"
                    "evaluate: {tasks: [boolq, piqa]}\noutput: o\n")
    recipe = load_recipe(str(path), "elsewhere", None, {"heal": ["max-steps=20", "distill=kl"]})
    assert recipe.prune == {"pattern": "2:4", "calibration_data": "c4"}  # not the YAML 1.1 integer 124
    assert recipe.heal == {"lr": 1e-4, "max_steps": 20, "distill": "kl"}
    assert recipe.evaluate == {"tasks": "boolq,piqa"}
    assert str(recipe.output) == "elsewhere"
    assert parse_yaml("a: 2:4\nb: 1e-4\nc: 010\n", "--config") == {"a": "2:4", "b": 1e-4, "c": "010"}


def test_output_that_is_not_a_run_directory_is_refused(llama_dir, tmp_path):
    (tmp_path / "pruned").mkdir()
    (tmp_path / "pruned" / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="no run record"):
        sparseheal.run(model=str(llama_dir), output=str(tmp_path), prune=["seqlen=32"],
                       heal=["block-size=32"], evaluate=["seqlen=32"])
    assert (tmp_path / "pruned" / "mine.txt").read_text() == "keep me"


RECIPE_DIR = Path(__file__).parent.parent / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_recipes_load_and_state_hardware_and_time():
    names = {p.name for p in RECIPES}
    assert {"wanda-lora-llama2-7b.yaml", "full-ft.yaml", "distill-2of4.yaml", "demo-cpu.yaml"} <= names
    for path in RECIPES:
        text = path.read_text()
        assert "# Hardware:" in text and "# Time" in text, path.name
        recipe = load_recipe(str(path), None, None, {})
        assert recipe.prune and all(h.settings for h in recipe.heals) and recipe.evaluate, path.name
    demo = load_recipe(str(RECIPE_DIR / "demo-cpu.yaml"), None, None, {})
    assert demo.model == "smollm2-135m"
    assert [(h.name, h.settings["method"]) for h in demo.heals] == [("lora", "lora"), ("full", "full")]
    assert all(h.settings["max_steps"] <= 60 and h.settings["block_size"] == 256 for h in demo.heals)
    assert demo.heals[0].merge_mode == "masked"
    assert demo.evaluate == {"dataset": "wikitext2", "seqlen": 1024, "max_windows": 8}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["demo-cpu.yaml", "full-ft.yaml", "distill-2of4.yaml"])
def test_builtin_model_recipes_validate(name, monkeypatch):
    from sparseheal.run.recipe import validate_recipe

    monkeypatch.setenv("SPARSEHEAL_DATA_DIR", str(Path(__file__).parent.parent.parent / "shared" / "data"))
    validate_recipe(load_recipe(str(RECIPE_DIR / name), None, None, {}))


def test_a_redone_prune_cut_short_never_mixes_into_the_report(run_copy, monkeypatch):
    """``--force prune`` with a new ratio, interrupted in the heal: the stages after the prune are pending,
    and the report shows none of the old models' numbers beside the new prune."""
    from sparseheal.run import runner

    run_dir, recipe = run_copy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(runner.api, "heal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparseheal.run(config=recipe, force="prune", prune=["sparsity=0.6"])
    record = json.loads((run_dir / "sparseheal.json").read_text())
    assert record["stages"]["prune"]["status"] == "done"
    assert {record["stages"][s]["status"] for s in ("heal", "merge", "eval-pruned", "eval-healed")} \
        == {"pending", "running"}
    report = sparseheal.report(str(run_dir))
    models = {m for row in report["perplexity"].values() for m in row} & {"pruned", "healed", "merged"}
    assert models == set() and report["sparsity"]["target"] == 0.6
    assert report["heals"] == [] and report["merge"] is None
