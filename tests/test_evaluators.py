"""The evaluator contract: perplexity and zero-shot are two registered evaluations, and a new one is one
file plus its registration (the worked example of docs/extending.md, run here as a plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sparseheal.evaluate.base import evaluators
from sparseheal.evaluate.perplexity import PerplexityEvaluator
from sparseheal.evaluate.zeroshot import ZeroShotEvaluator

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _plugin_path(root: Path) -> str:
    """A search path where the example is an installed plugin: its module and a distribution whose
    entry point names it under ``sparseheal.evaluations``."""
    info = root / "generation_check-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: generation-check\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sparseheal.evaluations]\ngeneration = generation_check\n")
    return os.pathsep.join([str(root), str(EXAMPLES)])


def _with_plugin(root: Path, code: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _plugin_path(root)}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def test_perplexity_and_zeroshot_are_registered_evaluations():
    assert [e.name for e in evaluators()] == ["perplexity", "zeroshot"]
    assert (PerplexityEvaluator.key, ZeroShotEvaluator.key) == ("results", "zeroshot")


def test_a_new_evaluation_is_one_file_and_one_registration(llama_dir, tmp_path):
    main = "import sys\nfrom sparseheal.cli import main\nmain(sys.argv[1:])"
    help_text = _with_plugin(tmp_path / "site", main, "evaluate", "--help")
    assert help_text.returncode == 0 and "--generation-prompts" in help_text.stdout, help_text.stderr

    out = tmp_path / "eval.json"
    proc = _with_plugin(tmp_path / "site", main, "evaluate", str(llama_dir), "--dataset", "none",
                        "--generation-prompts", "the cat|a dog", "--generation-tokens", "8", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "distinct-2" in proc.stdout and "the cat" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["generation"]) == {"the cat", "a dog"}
    assert all(row["tokens"] == 8 and 0 < row["distinct_2"] <= 1 for row in report["generation"].values())

    refused = _with_plugin(tmp_path / "site", main, "evaluate", str(llama_dir), "--generation-tokens", "0")
    assert refused.returncode == 2 and "--generation-tokens" in refused.stderr

    # the card and the run report show it, and the report draws it, with no other file touched
    shown = _with_plugin(
        tmp_path / "site",
        "import json, sys\nfrom pathlib import Path\nfrom sparseheal.cards import _evaluation_section\n"
        "import importlib\nreport = importlib.import_module('sparseheal.run.report')\n"
        "data = json.loads(Path(sys.argv[1]).read_text())\n"
        "print('\\n'.join(_evaluation_section({'healed': data}, 'x')))\n"
        "tables = report._tables({'healed': data})\n"
        "print(tables['generation'])\n"
        "import generation_check as g\n"
        "print(g.GenerationEvaluator.plot(tables['generation'], Path(sys.argv[2]), 't'))\n",
        str(out), str(tmp_path / "g.png"))
    assert shown.returncode == 0, shown.stderr
    assert "Generation (distinct-2" in shown.stdout and "| the cat |" in shown.stdout
    assert "{'the cat': {'healed':" in shown.stdout and (tmp_path / "g.png").stat().st_size > 1000
