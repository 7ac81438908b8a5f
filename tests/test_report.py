"""The run report: gap closed, loss curves, regeneration from the records, markdown and plots."""

import json
import shutil

import matplotlib.image as mpimg
import pytest
from runs import tiny_run

from sparseheal.cli import main
from sparseheal.config import ConfigError
from sparseheal.run.plots import loss_curves, moving_average
from sparseheal.run.report import build_report, gap_closed, write_report

PLOTS = ("loss.png", "sparsity.png", "perplexity.png", "zeroshot.png")


@pytest.fixture
def finished_run(llama_dir, tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny-run", llama_dir)


def test_gap_closed():
    assert gap_closed(20.0, 30.0, 22.0) == pytest.approx(0.8)
    assert gap_closed(20.0, 30.0, 30.0) == 0.0
    assert gap_closed(20.0, 30.0, 35.0) == pytest.approx(-0.5)  # worse than pruned
    assert gap_closed(20.0, 20.0, 19.0) is None  # pruning cost nothing: no gap to close
    assert gap_closed(None, 30.0, 22.0) is None


def test_loss_curves_keep_the_last_entry_of_a_step():
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.8}, {"step": 2, "eval_loss": 4.9},
             {"step": 3, "loss": 4.7}, {"step": 3, "loss": 4.6},  # step 3 logged again after a resume
             {"step": 3, "train_loss": 4.8, "train_runtime": 1.0}, {"epoch": 1.0}]
    train, evals = loss_curves(lines)
    assert train == [(1, 5.0), (2, 4.8), (3, 4.6)]
    assert evals == [(2, 4.9)]


def test_moving_average_is_trailing():
    assert moving_average([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert moving_average([1.0, 2.0, 3.0], 5) == [1.0, 1.5, 2.0]


def test_report_numbers_come_from_the_records(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    evals = {m: json.loads((finished_run / "eval" / f"{m}.json").read_text())
             for m in ("dense", "pruned", "healed")}
    row = report["perplexity"]["wikitext2"]
    ppl = {m: evals[m]["results"][0]["ppl"] for m in evals}
    assert (row["dense"], row["pruned"], row["healed"]) == (ppl["dense"], ppl["pruned"], ppl["healed"])
    expected = (ppl["pruned"] - ppl["healed"]) / (ppl["pruned"] - ppl["dense"])
    assert row["gap_closed"] == pytest.approx(expected)
    assert "merged" in row and "gap_closed_merged" in row
    pruned = json.loads((finished_run / "pruned" / "sparseheal.json").read_text())
    layers = list(pruned["layers"].values())
    assert report["sparsity"]["achieved"] == pruned["sparsity_achieved"]
    assert report["sparsity"]["layers"]["min"] == min(layers) and report["sparsity"]["layers"]["count"] == 14
    healed = json.loads((finished_run / "healed" / "sparseheal.json").read_text())
    assert report["healing"]["trainable_parameters"] == healed["trainable_parameters"] > 0
    assert report["healing"]["tokens_seen"] == healed["tokens_seen"] == 6 * 32
    assert [s["name"] for s in report["stages"]] == ["prune", "heal", "merge", "eval-dense", "eval-pruned",
                                                     "eval-healed", "eval-merged"]
    assert report["zeroshot"]["local_task"]["healed"]["n"] == 6
    assert len(report["loss_curve"]["train"]) == 6 and report["loss_curve"]["eval"]
    assert report["versions"]["torch"]


def test_markdown_shows_the_tables_plots_and_commands(finished_run):
    text = (finished_run / "report.md").read_text()
    for needle in ("| data set | protocol |", "gap closed", "## Zero-shot accuracy", "local_task",
                   "per layer (14 linears)", "trainable parameters", "tokens seen", "peak RSS (MiB)",
                   "## Versions", "sparseheal run --config", "sparseheal prune", "sparseheal heal",
                   "sparseheal merge", "sparseheal evaluate", "--adapter"):
        assert needle in text, needle
    for name in PLOTS:
        assert f"]({name})" in text
        image = mpimg.imread(finished_run / name)
        assert image.shape[0] >= 300 and image.shape[1] >= 500  # a real figure, not an empty file


def test_report_command_regenerates_from_the_records(finished_run, tmp_path, capsys):
    run_dir = shutil.copytree(finished_run, tmp_path / "run")
    original = json.loads((run_dir / "report.json").read_text())
    for name in ("report.md", "report.json", *PLOTS):
        (run_dir / name).unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "| wikitext2 | wanda | 32 × 4 |" in out and f"report: {run_dir / 'report.md'}" in out
    for name in ("report.md", *PLOTS):
        assert (run_dir / name).is_file()
    again = json.loads((run_dir / "report.json").read_text())
    strip = ("run_dir", "commands")  # these name the directory
    assert {k: v for k, v in again.items() if k not in strip} == \
        {k: v for k, v in original.items() if k not in strip}


def test_report_of_a_directory_without_a_run_record(llama_dir, capsys):
    with pytest.raises(ConfigError, match="no run record"):
        build_report(llama_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(llama_dir)])
    assert exit_info.value.code == 2
    assert "RUN_DIR" in capsys.readouterr().err


def test_report_without_healing_records(finished_run, tmp_path):
    """A run stopped after pruning still gets a report (missing values are shown as dashes)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run / "pruned", run_dir / "pruned")
    record = json.loads((finished_run / "sparseheal.json").read_text())
    record["stages"] = {"prune": record["stages"]["prune"]}
    (run_dir / "sparseheal.json").write_text(json.dumps(record))
    report = write_report(run_dir)
    assert report["perplexity"] == {} and report["healing"]["steps"] is None
    assert "sparsity.png" in report["plots"].values() and "loss.png" not in report["plots"].values()
    text = (run_dir / "report.md").read_text()
    assert "achieved: 50.00% of the prunable weights" in text and "(not evaluated)" in text
