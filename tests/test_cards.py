"""Model cards: every model or adapter directory a stage writes carries a README.md in the Hub's format
(YAML front matter with base_model, library_name, pipeline_tag and tags), whose numbers are the
records' own, regenerated with the evaluations of a run and never copied from the dense model's card."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from runs import tiny_run

import sparseheal
from sparseheal.cards import front_matter, render_card, stage_chain, write_card, write_run_cards
from sparseheal.cli import main

HEAL = dict(block_size=32, max_steps=2, max_eval_samples=2, logging_steps=1, device="cpu")
KINDS = ("pruned", "full", "lora", "heal-merged", "merged", "blockwise")
DENSE_BODY = "This dense model card body must never reach a pruned model's card."


@pytest.fixture(scope="module")
def written(pruned_llama, data_dir, tmp_path_factory) -> dict[str, Path]:
    """The outputs of every stage, from the session's Wanda-pruned tiny LLaMA."""
    tmp = tmp_path_factory.mktemp("cards")
    heal = {**HEAL, "data_dir": str(data_dir)}  # a module fixture runs before the test's own environment
    full = sparseheal.heal(str(pruned_llama), str(tmp / "full"), method="full", **heal)
    adapter = sparseheal.heal(str(pruned_llama), str(tmp / "lora"), method="lora", merge="masked", **heal)
    merged = sparseheal.merge(str(adapter), str(tmp / "merged"), eval_windows=0)
    blockwise = sparseheal.heal(str(pruned_llama), str(tmp / "blockwise"), method="blockwise", device="cpu",
                                data_dir=str(data_dir))
    return {"pruned": pruned_llama, "full": full, "lora": adapter, "heal-merged": adapter / "merged",
            "merged": merged, "blockwise": blockwise}


def split_card(text: str) -> tuple[dict, str]:
    """(front matter, body) of a card; the front matter must open the file."""
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def prose_numbers(body: str) -> list[str]:
    """The numbers of a card's text outside code (code spans hold names and paths)."""
    body = re.sub(r"```.*?```", "", body, flags=re.S)
    body = re.sub(r"`[^`]*`", "", body)
    body = "\n".join(line for line in body.splitlines() if not line.startswith("# "))  # the title
    return re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])", body)


def recorded_numbers(value) -> list[float]:
    """Every number a record (or an evaluation report) holds, at any depth."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in recorded_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in recorded_numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def assert_numbers_recorded(body: str, *sources) -> None:
    known = [n for source in sources for n in recorded_numbers(source)]
    found = prose_numbers(body)
    assert found
    for token in found:
        value = float(token)
        assert any(value == n or math.isclose(value, n, rel_tol=1e-5) for n in known), token


def chain_of(directory: Path) -> list[dict]:
    return stage_chain(json.loads((directory / "sparseheal.json").read_text()), directory)


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_has_a_card_in_the_hub_format(written, llama_dir, kind):
    meta, body = split_card((written[kind] / "README.md").read_text())
    assert meta["base_model"] == str(llama_dir)  # the dense model the chain started from
    assert meta["library_name"] == ("peft" if kind == "lora" else "transformers")
    assert meta["pipeline_tag"] == "text-generation"
    assert {"sparse", "pruned", "sparseheal", "wanda", "unstructured"} <= set(meta["tags"])
    assert "license" not in meta  # the tiny model's config and files name none
    assert "No evaluations recorded yet; run `sparseheal evaluate" in body
    assert "## What was done" in body and "## How to load" in body and "## Verify the sparsity" in body


@pytest.mark.parametrize("kind, healer", [("full", "full"), ("lora", "lora"), ("blockwise", "blockwise"),
                                          ("merged", "lora")])
def test_the_healer_and_merge_are_tagged(written, kind, healer):
    meta, _ = split_card((written[kind] / "README.md").read_text())
    assert {"healed", healer} <= set(meta["tags"])
    assert ("merged" in meta["tags"]) == (kind == "merged")


@pytest.mark.parametrize("kind", KINDS)
def test_every_number_in_the_card_is_the_records(written, kind):
    _, body = split_card((written[kind] / "README.md").read_text())
    assert_numbers_recorded(body, *chain_of(written[kind]))


def test_the_prune_facts_read_back_equal_the_record(written):
    record = json.loads((written["pruned"] / "sparseheal.json").read_text())
    _, body = split_card((written["pruned"] / "README.md").read_text())
    achieved = re.search(r"sparsity achieved: (\S+) \((\d+) of (\d+) prunable", body)
    assert float(achieved[1]) == record["sparsity_achieved"]
    assert (int(achieved[2]), int(achieved[3])) == \
        (record["pruned_parameters"], record["prunable_parameters"])
    cal = re.search(r"calibration: `(\w+)`, (\d+) samples of (\d+) tokens, seed (\d+)", body)
    spec = record["calibration"]
    assert (cal[1], int(cal[2]), int(cal[3]), int(cal[4])) == \
        (spec["source"], spec["nsamples"], spec["seqlen"], spec["seed"])
    name = written["pruned"].name
    assert f"sparseheal inspect {name} --masks {name}/sparsity_masks.safetensors" in body


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_heal_facts_read_back_equal_the_record(written, kind):
    record = json.loads((written[kind] / "sparseheal.json").read_text())
    _, body = split_card((written[kind] / "README.md").read_text())
    trained = re.search(r"trained: steps (\d+), tokens seen (\d+), trainable parameters (\d+) of (\d+)", body)
    assert [int(x) for x in trained.groups()] == [record["steps"], record["tokens_seen"],
                                                   record["trainable_parameters"], record["total_parameters"]]
    assert float(re.search(r"learning rate (\S+),", body)[1]) == record["recipe"]["lr"]
    assert math.isclose(float(re.search(r"held-out (\S+) \(", body)[1]), record["eval_loss"], rel_tol=1e-5)


def test_the_adapter_card_replaces_peft_s_and_verifies_the_base(written, pruned_llama):
    text = (written["lora"] / "README.md").read_text()
    assert "More Information Needed" not in text  # nothing of PEFT's generic card is left
    _, body = split_card(text)
    assert f'PeftModel.from_pretrained(base, "{written["lora"].name}")' in body
    assert "AutoPeftModelForCausalLM" in body and "--enable-lora" in body
    assert f"sparseheal inspect {pruned_llama} --masks {pruned_llama}/sparsity_masks.safetensors" in body
    assert f"sparseheal evaluate {pruned_llama} --adapter {written['lora'].name}" in body


def test_the_merged_copy_of_a_heal_describes_the_whole_chain(written):
    stages = [r["stage"] for r in chain_of(written["heal-merged"])]
    assert stages == ["prune", "heal", "merge"]
    _, body = split_card((written["heal-merged"] / "README.md").read_text())
    assert "### Prune" in body and "### Heal" in body and "### Merge" in body
    assert "from_pretrained(\"merged\")" in body and "vllm serve merged" in body


def test_a_card_with_evaluations_shows_the_reports_numbers(written, data_dir, tmp_path):
    pruned = shutil.copytree(written["pruned"], tmp_path / written["pruned"].name)  # the card names it
    report = sparseheal.evaluate(str(pruned), seqlen=32, max_windows=2, data_dir=str(data_dir))
    before = (pruned / "README.md").stat().st_mtime_ns
    write_card(pruned)  # nothing new: the card is left as it was
    assert (pruned / "README.md").stat().st_mtime_ns == before
    write_card(pruned, {"pruned": report})
    _, body = split_card((pruned / "README.md").read_text())
    cells = r"\| (\d+) \| (\d+) \| (\d+) \| `float32` \| (\S+) \|"
    row = re.search(r"\| `pruned` \| `wikitext2` \| `wanda` " + cells, body)
    result = report["results"][0]
    assert [int(x) for x in row.groups()[:3]] == [result["seqlen"], result["windows"], result["tokens"]]
    assert math.isclose(float(row[4]), result["ppl"], rel_tol=1e-5)
    assert "No evaluations recorded yet" not in body
    assert_numbers_recorded(body, *chain_of(pruned), report)


def test_the_base_model_s_license_is_carried_and_its_card_body_is_not(llama_dir, tmp_path):
    with_config = shutil.copytree(llama_dir, tmp_path / "licensed")
    config = json.loads((with_config / "config.json").read_text())
    (with_config / "config.json").write_text(json.dumps({**config, "license": "apache-2.0"}))
    with_card = shutil.copytree(llama_dir, tmp_path / "carded")
    (with_card / "README.md").write_text(f"---\nlicense: mit\nlanguage: en\n---\n\n# Dense\n\n{DENSE_BODY}\n")
    for source, license_id in ((with_config, "apache-2.0"), (with_card, "mit")):
        out = sparseheal.prune(str(source), str(tmp_path / f"{source.name}-pruned"), method="magnitude")
        text = (out / "README.md").read_text()
        meta, _ = split_card(text)
        assert meta["license"] == license_id and meta["base_model"] == str(source)
        assert DENSE_BODY not in text and "# Dense" not in text


def test_front_matter_of_a_builtin_n_m_owl_prune():
    """The Hub id of a built-in model, an N:M pattern tag and OWL's layer spread, from records alone."""
    record = {"stage": "prune", "base_model": "smollm2-135m", "base_path": "/nowhere", "method": "wanda",
              "pattern": "2:4", "sparsity": 0.5, "sparsity_achieved": 0.498214, "pruned_parameters": 100,
              "prunable_parameters": 200, "calibration": None,
              "layer_sparsity": {"mode": "owl", "m": 5.0, "lambda": 0.08, "sparsities": [0.42, 0.5, 0.58]}}
    meta = front_matter([record], "transformers", None)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "2:4" in meta["tags"]
    text = render_card([record], "owl", "transformers", False)
    parsed, body = split_card(text)
    assert parsed == meta
    assert "from 0.42 to 0.58 per decoder layer" in body and "sparsity achieved: 0.498214" in body
    assert "sparseheal inspect owl\n" in body  # no masks file: inspect counts the zeros
    assert_numbers_recorded(body, record)


@pytest.fixture
def finished_run(llama_dir, tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-run", llama_dir)


def test_a_run_regenerates_every_card_with_its_evaluations(finished_run):
    evals = {p.stem: json.loads(p.read_text()) for p in (finished_run / "eval").glob("*.json")}
    for name in ("pruned", "healed", "merged"):
        meta, body = split_card((finished_run / name / "README.md").read_text())
        assert meta["library_name"] == ("peft" if name == "healed" else "transformers")
        for label in (name, "dense"):  # this model's evaluation, and the dense one beside it
            ppl = evals[label]["results"][0]["ppl"]
            cell = re.search(rf"\| `{label}` \| `wikitext2` \|[^\n]*\| (\S+) \|\n", body)
            assert math.isclose(float(cell[1]), ppl, rel_tol=1e-5), (name, label)
        others = {"pruned", "healed", "merged"} - {name}
        assert not any(f"| `{other}` |" in body for other in others)
        assert f"| `{name}` | `local_task` |" in body
        assert_numbers_recorded(body, *chain_of(finished_run / name), evals[name], evals["dense"])


def test_report_regenerates_the_cards(finished_run, tmp_path):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    original = (run_dir / "healed" / "README.md").read_text()
    (run_dir / "healed" / "README.md").write_text("stale")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir)])
    assert exit_info.value.code == 0
    assert (run_dir / "healed" / "README.md").read_text() == original  # the copy's evaluations matched too
    assert [p.parent.name for p in write_run_cards(run_dir)] == ["pruned", "healed", "merged"]
