"""``sparseheal run`` with several named heal stages: side by side, chained with ``from``, resumed and
forced per stage, the recipe checks, and the comparison report."""

import functools
import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from runs import copy_run, snapshot, write_heals_recipe, write_recipe

import sparseheal
from sparseheal.cli import main
from sparseheal.config import ConfigError
from sparseheal.heal.trainer import HealTrainer
from sparseheal.run.recipe import load_recipe, validate_recipe

# lora (merged under the mask) and full side by side from the pruned model, and full again on lora's
# merged model
STAGES = [{"name": "lora", "merge": "masked"},
          {"name": "full", "method": "full", "lr": 3e-4},
          {"name": "after-lora", "from": "lora", "method": "full", "max-steps": 3, "lr": 3e-4}]
TOPS = ("pruned", "healed-lora", "merged-lora", "healed-full", "healed-after-lora", "eval")


@functools.cache
def _side_by_side(base: Path, model: Path) -> Path:
    base.mkdir(parents=True, exist_ok=True)
    recipe = write_heals_recipe(base / "recipe.yaml", model, base / "run", STAGES)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(recipe)])
    assert exit_info.value.code == 0
    return base / "run"


@pytest.fixture
def finished(llama_dir, tmp_path_factory):
    return _side_by_side(tmp_path_factory.getbasetemp() / "tiny-heals", llama_dir)


@pytest.fixture
def run_copy(finished, tmp_path):
    return copy_run(finished, tmp_path)


def _record(directory: Path) -> dict:
    return json.loads((directory / "sparseheal.json").read_text())


def test_each_stage_heals_its_input_and_is_evaluated(finished):
    for name in ("healed-lora/adapter_config.json", "merged-lora/sparseheal.json",
                 "healed-full/sparsity_masks.safetensors", "healed-after-lora/sparsity_masks.safetensors"):
        assert (finished / name).is_file(), name
    assert not (finished / "healed").exists() and not (finished / "merged").exists()
    evals = {p.stem for p in (finished / "eval").glob("*.json")}
    assert evals == {"dense", "pruned", "healed-lora", "merged-lora", "healed-full", "healed-after-lora"}
    lora_eval = json.loads((finished / "eval" / "healed-lora.json").read_text())
    assert lora_eval["adapter"] == str(finished / "healed-lora")
    assert lora_eval["model"] == str(finished / "pruned")
    assert _record(finished / "healed-lora")["base_model"] == str(finished / "pruned")
    assert _record(finished / "healed-full")["base_model"] == str(finished / "pruned")
    after = _record(finished / "healed-after-lora")
    assert after["base_model"] == str(finished / "merged-lora") and after["steps"] == 3
    assert after["mask_verification"]["ok"]
    run = _record(finished)
    assert list(run["stages"]) == ["prune", "heal-lora", "merge-lora", "heal-full", "heal-after-lora",
                                   "eval-dense", "eval-pruned", "eval-healed-lora", "eval-merged-lora",
                                   "eval-healed-full", "eval-healed-after-lora"]
    assert run["stages"]["heal-after-lora"]["input"] == "merged-lora"
    assert run["stages"]["heal-after-lora"]["settings"]["teacher"] == run["recipe"]["model"]
    assert [h["name"] for h in run["recipe"]["heal"]] == ["lora", "full", "after-lora"]


def test_the_report_compares_every_model_in_one_table(finished, capsys):
    report = json.loads((finished / "report.json").read_text())
    rows = {r["model"]: r for r in report["models"]}
    assert list(rows) == ["dense", "pruned", "healed-lora", "merged-lora", "healed-full", "healed-after-lora"]
    ppl = {m: json.loads((finished / "eval" / f"{m}.json").read_text())["results"][0]["ppl"] for m in rows}
    dense, pruned = ppl["dense"], ppl["pruned"]
    for model, row in rows.items():
        assert row["ppl"]["wikitext2"] == ppl[model]
        if model != "dense":
            assert row["gap_closed"]["wikitext2"] == pytest.approx((pruned - ppl[model]) / (pruned - dense))
    assert rows["healed-full"]["tokens_seen"] == 6 * 32 and rows["healed-after-lora"]["tokens_seen"] == 3 * 32
    seconds = {s["name"]: s["seconds"] for s in report["stages"]}
    assert rows["healed-full"]["heal_seconds"] == seconds["heal-full"]
    assert rows["merged-lora"]["merge_seconds"] == seconds["merge-lora"]
    assert rows["healed-after-lora"]["from"] == "merged-lora"
    assert set(report["loss_curves"]) == {"lora", "full", "after-lora"}
    assert report["loss_curves"]["full"]["eval"][0][0] == 3 * 32  # held-out loss by tokens seen
    text = (finished / "report.md").read_text()
    head = ("| model | method | from | ppl wikitext2 | gap closed wikitext2 | tokens seen "
            "| heal wall time (s) |")
    assert head in text
    assert "| healed-after-lora | full | merged-lora |" in text and "| heal stage | method | from |" in text
    assert "](healing.png)" in text and "sparseheal heal" in text
    image = mpimg.imread(finished / "healing.png")
    assert image.shape[0] >= 300 and image.shape[1] >= 1000  # two panels
    assert sparseheal.report(str(finished))["models"] == report["models"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(finished)])
    assert exit_info.value.code == 0
    assert "| merged-lora | masked merge | healed-lora |" in capsys.readouterr().out


def test_rerun_skips_every_finished_stage(run_copy):
    run_dir, recipe = run_copy
    before = snapshot(run_dir, TOPS)
    result = sparseheal.run(config=recipe)
    assert all(stage["skipped"] for stage in result["stages"].values())
    assert snapshot(run_dir, TOPS) == before


def test_force_one_stage_redoes_it_and_what_uses_its_output(run_copy):
    run_dir, recipe = run_copy
    before = snapshot(run_dir, TOPS)
    result = sparseheal.run(config=recipe, force="heal-lora")
    ran = {name for name, stage in result["stages"].items() if not stage["skipped"]}
    assert ran == {"heal-lora", "merge-lora", "heal-after-lora", "eval-healed-lora", "eval-merged-lora",
                   "eval-healed-after-lora"}
    after = snapshot(run_dir, TOPS)
    untouched = [p for p in before if p.startswith(("pruned/", "healed-full/"))]
    untouched += ["eval/dense.json", "eval/pruned.json", "eval/healed-full.json"]
    assert all(after[p] == before[p] for p in untouched)
    for changed in ("healed-lora/adapter_model.safetensors", "healed-after-lora/model.safetensors"):
        assert after[changed][0] != before[changed][0], changed


def test_force_heal_redoes_every_heal_stage(run_copy):
    run_dir, recipe = run_copy
    result = sparseheal.run(config=recipe, force="heal")
    ran = {name for name, stage in result["stages"].items() if not stage["skipped"]}
    assert ran == set(result["stages"]) - {"prune", "eval-dense", "eval-pruned"}


def test_force_and_changes_name_the_stage(run_copy):
    run_dir, recipe = run_copy
    with pytest.raises(ConfigError) as info:
        sparseheal.run(config=recipe, force="heal-other")
    assert info.value.flag == "--force"
    assert "heal-lora, merge-lora, heal-full, heal-after-lora" in info.value.message
    before = snapshot(run_dir, TOPS)
    with pytest.raises(ConfigError) as info:
        sparseheal.run(config=recipe, heal=["full.lr=1e-3"])
    assert info.value.flag == "heal[1].lr" and "--force heal-full" in info.value.message
    with pytest.raises(ConfigError) as info:  # a key without a name sets it for every stage
        sparseheal.run(config=recipe, heal=["max-steps=7"])
    assert info.value.flag == "heal[0].max-steps" and "--force heal-lora" in info.value.message
    assert snapshot(run_dir, TOPS) == before


def test_blockwise_then_full_in_one_run(llama_dir, tmp_path):
    stages = [{"name": "bw", "method": "blockwise", "epochs": 1, "lr": 1e-3},
              {"name": "bw-full", "from": "bw", "method": "full", "max-steps": 2, "lr": 3e-4}]
    result = sparseheal.run(config=str(write_heals_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run",
                                                          stages)))
    run_dir = tmp_path / "run"
    assert _record(run_dir / "healed-bw-full")["base_model"] == str(run_dir / "healed-bw")
    assert result["stages"]["heal-bw-full"]["input"] == "healed-bw"
    report = json.loads((run_dir / "report.json").read_text())
    assert [r["model"] for r in report["models"]] == ["dense", "pruned", "healed-bw", "healed-bw-full"]
    assert "layer_losses-bw.png" in report["plots"].values() and "healing.png" in report["plots"].values()
    assert sparseheal.inspect(str(run_dir / "healed-bw-full"))["ok"]


def test_an_interrupted_stage_resumes_while_the_finished_one_is_skipped(llama_dir, tmp_path, monkeypatch):
    stages = [{"name": "a"}, {"name": "b", "method": "full"}]
    recipe = str(write_heals_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run", stages))
    original = HealTrainer.training_step

    def crash_in_b(self, *args, **kwargs):
        if self.state.global_step == 4 and "healed-b" in self.args.output_dir:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HealTrainer, "training_step", crash_in_b)
    with pytest.raises(KeyboardInterrupt):
        sparseheal.run(config=recipe)
    assert (tmp_path / "run" / "healed-a").is_dir() and not (tmp_path / "run" / "healed-b").exists()
    assert (tmp_path / "run" / "healed-b.ckpt" / "checkpoint-3").is_dir()
    monkeypatch.setattr(HealTrainer, "training_step", original)
    result = sparseheal.run(config=recipe)
    assert result["stages"]["heal-a"]["skipped"]
    assert result["stages"]["heal-b"]["reason"] == "resuming from checkpoint-3"
    assert _record(tmp_path / "run" / "healed-b")["steps"] == 6


def test_a_single_mapping_keeps_the_plain_directories(llama_dir, tmp_path):
    recipe = load_recipe(str(write_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run")), None, None, {})
    assert [(h.label, h.name, h.suffix) for h in recipe.heals] == [("heal", None, "")]
    assert recipe.to_dict()["heal"]["merge"] == "masked"  # written back as the mapping it was
    from sparseheal.run.plan import plan_units

    units = {u.name: u.path.relative_to(tmp_path / "run") for u in plan_units(recipe)}
    assert units == {"prune": Path("pruned"), "heal": Path("healed"), "merge": Path("merged"),
                     "eval-dense": Path("eval/dense.json"), "eval-pruned": Path("eval/pruned.json"),
                     "eval-healed": Path("eval/healed.json"), "eval-merged": Path("eval/merged.json")}


@pytest.mark.parametrize("stages, flag, words", [
    ([{"name": "a"}, {"name": "a"}], "heal[1].name", "already names heal[0]"),
    ([{"name": "a"}, {}], "heal[1].name", "required"),
    ([{"name": "a"}, {"name": "b c"}], "heal[1].name", "not a valid name"),
    ([{"name": "a"}, {"name": "b", "from": "c"}], "heal[1].from", "no earlier heal stage is named 'c'"),
    ([{"name": "a", "from": "b"}, {"name": "b"}], "heal[0].from", "comes later"),
    ([{"name": "a", "from": "a"}], "heal[0].from", "this stage itself"),
    ([{"name": "a", "max-step": 5}, {"name": "b"}], "heal[0].max-step", "did you mean 'max-steps'"),
])
def test_structure_errors_name_the_key(llama_dir, tmp_path, stages, flag, words):
    path = write_heals_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run", stages)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path), None, None, {})
    assert info.value.flag == f"{path}: {flag}" and words in info.value.message


@pytest.mark.parametrize("stages, flag, words", [
    ([{"name": "a"}, {"name": "b", "from": "a", "method": "full"}], "heal[1].from", "merge: masked"),
    ([{"name": "a", "merge": "dense"}, {"name": "b", "from": "a"}], "heal[1].from", "merges densely"),
    ([{"name": "a"}, {"name": "b", "method": "full", "rank": 4}], "heal[1].rank", "lora only"),
])
def test_validation_errors_name_the_stage(llama_dir, tmp_path, stages, flag, words):
    path = write_heals_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run", stages)
    with pytest.raises(ConfigError) as info:
        validate_recipe(load_recipe(str(path), None, None, {}))
    assert info.value.flag == flag and words in info.value.message


def test_heal_overrides_address_one_stage_or_all(llama_dir, tmp_path):
    stages = [{"name": "a"}, {"name": "b"}]
    path = write_heals_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run", stages)
    recipe = load_recipe(str(path), None, None, {"heal": ["max-steps=9", "b.max-steps=2", "b.lr=2e-3"]})
    assert [h.settings["max_steps"] for h in recipe.heals] == [9, 2]
    assert [h.settings["lr"] for h in recipe.heals] == [1e-3, 2e-3]
    for value, words in (("c.lr=1", "'c' names no heal stage (names: a, b)"), ("b.from=a", "structure"),
                         ("name=x", "structure")):
        with pytest.raises(ConfigError) as info:
            load_recipe(str(path), None, None, {"heal": [value]})
        assert info.value.flag == "--heal" and words in info.value.message
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path), None, None, {"heal": ["b.max-step=2"]})
    assert info.value.flag == "--heal: heal[1].max-step"


def test_cli_refuses_a_bad_stage_list_with_exit_2_and_writes_nothing(llama_dir, tmp_path, capsys):
    path = write_heals_recipe(tmp_path / "r.yaml", llama_dir, tmp_path / "run",
                              [{"name": "a"}, {"name": "b", "from": "nope"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "heal[1].from" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()
