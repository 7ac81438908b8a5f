"""Bad input, table-driven, through the command line: every case must end with exit status 2, exactly one
line on stderr that names the flag (or recipe key) and what is allowed, no traceback, and nothing written.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparseheal import cli
from sparseheal.sparsity.store import save_masks


@dataclass(frozen=True)
class Case:
    """``argv`` may use {model}, {tmp} (prepared files) and {out} (the output that must not appear)."""

    id: str
    argv: tuple[str, ...]
    names: str  # the flag or key the message must name
    allowed: str = ""  # a piece of what is allowed (or what is wrong), when the message can say it
    free: int | None = None  # bytes free on every file system (shutil.disk_usage patched): a full disk


P = ("prune", "{model}", "-o", "{out}", "--nsamples", "2", "--seqlen", "32")  # a valid prune to spoil
E = ("evaluate", "{model}", "--max-windows", "1")
H = ("heal", "{tmp}/pruned", "-o", "{out}", "--block-size", "32")
M = ("merge", "{tmp}/fake-adapter", "-o", "{out}", "--base")
CASES = [
    # --- prune: ratios and patterns
    Case("sparsity-one", P + ("--sparsity", "1.0"), "--sparsity", "[0, 1)"),
    Case("sparsity-negative", P + ("--sparsity", "-0.1"), "--sparsity", "[0, 1)"),
    Case("sparsity-above-one", P + ("--sparsity", "1.5"), "--sparsity", "[0, 1)"),
    Case("sparsity-not-a-number", P + ("--sparsity", "half"), "--sparsity", "number"),
    Case("pattern-3:2", P + ("--pattern", "3:2"), "--pattern", "0 < N < M"),
    Case("pattern-0:4", P + ("--pattern", "0:4"), "--pattern", "0 < N < M"),
    Case("pattern-4:4", P + ("--pattern", "4:4"), "--pattern", "0 < N < M"),
    Case("pattern-malformed", P + ("--pattern", "2-4"), "--pattern", "unstructured"),
    Case("pattern-words", P + ("--pattern", "structured"), "--pattern", "N:M"),
    Case("pattern-2:4-other-ratio", P + ("--pattern", "2:4", "--sparsity", "0.6"), "--sparsity", "0.5"),
    Case("pattern-4:8-other-ratio", P + ("--pattern", "4:8", "--sparsity", "0.7"), "--sparsity", "0.5"),
    Case("method-unknown", P + ("--method", "obs"), "--method",
         "ablate_wanda_seq, magnitude, ria, sparsegpt, wanda"),
    # --- prune: model sources
    Case("model-missing", ("prune", "{tmp}/no-model", "-o", "{out}"), "MODEL", "smollm2-135m"),
    Case("model-not-a-model-dir", ("prune", "{tmp}/emptydir", "-o", "{out}"), "MODEL", "config.json"),
    Case("model-is-a-file", ("prune", "{tmp}/empty.txt", "-o", "{out}"), "MODEL", "model directory"),
    Case("model-missing-gguf", ("prune", "{tmp}/m.gguf", "-o", "{out}"), "MODEL", "does not exist"),
    Case("model-bad-config", ("prune", "{tmp}/badconfig", "-o", "{out}"), "MODEL", "config"),
    Case("model-hub-unreachable", ("prune", "nobody/no-such-model", "-o", "{out}"), "MODEL", "Hub"),
    Case("model-argument-absent", ("prune", "-o", "{out}"), "'model'"),
    # --- prune: calibration data
    Case("data-unknown-name", P + ("--calibration-data", "c5"), "--calibration-data", "wikitext2, c4, ptb"),
    Case("data-missing-file", P + ("--calibration-data", "{tmp}/gone.jsonl"), "--calibration-data",
         "does not exist"),
    Case("data-dangling-link", P + ("--calibration-data", "{tmp}/dangling.txt"), "--calibration-data",
         "does not exist"),
    Case("data-empty-file", P + ("--calibration-data", "{tmp}/empty.txt"), "--calibration-data", "no text"),
    Case("data-blank-file", P + ("--calibration-data", "{tmp}/blank.txt"), "--calibration-data", "no text"),
    Case("data-binary-file", P + ("--calibration-data", "{tmp}/binary.txt"), "--calibration-data",
         "UTF-8"),
    Case("data-jsonl-no-text", P + ("--calibration-data", "{tmp}/notext.jsonl"), "--calibration-data",
         "'text' field"),
    Case("data-jsonl-broken", P + ("--calibration-data", "{tmp}/broken.jsonl"), "--calibration-data",
         "'text' field"),
    Case("data-parquet-broken", P + ("--calibration-data", "{tmp}/broken.parquet"), "--calibration-data",
         "not readable"),
    Case("data-empty-dir", P + ("--calibration-data", "{tmp}/emptydir"), "--calibration-data", ".jsonl"),
    Case("data-unsupported-type", P + ("--calibration-data", "{tmp}/table.csv"), "--calibration-data",
         ".txt, .jsonl, .parquet"),
    # --- prune: lengths and counts
    Case("seqlen-beyond-positions", P + ("--seqlen", "1000"), "--seqlen", "256"),
    Case("seqlen-beyond-documents", P + ("--seqlen", "200", "--calibration-data", "{tmp}/short.txt"),
         "--seqlen", "longer than every calibration document"),
    Case("seqlen-zero", P + ("--seqlen", "0"), "--seqlen", ">= 1"),
    Case("seqlen-not-int", P + ("--seqlen", "long"), "--seqlen", "integer"),
    Case("nsamples-zero", P + ("--nsamples", "0"), "--nsamples", ">= 1"),
    Case("nsamples-negative", P + ("--nsamples", "-3"), "--nsamples", ">= 1"),
    Case("nsamples-float", P + ("--nsamples", "1.5"), "--nsamples", "integer"),
    Case("batch-size-zero", P + ("--calibration-batch-size", "0"), "--calibration-batch-size", ">= 1"),
    Case("seed-not-int", P + ("--seed", "x"), "--seed", "integer"),
    Case("dtype-unknown", P + ("--dtype", "float64"), "--dtype", "float32, bfloat16, float16"),
    Case("device-unknown", P + ("--device", "gpu"), "--device", "cpu"),
    Case("device-unavailable", P + ("--device", "cuda:7"), "--device", "cpu"),
    # --- prune: output
    Case("output-exists", ("prune", "{model}", "-o", "{tmp}/existing", "--nsamples", "2", "--seqlen", "32"),
         "--output", "--overwrite"),
    Case("output-unwritable", ("prune", "{model}", "-o", "/proc/sparseheal-out", "--nsamples", "2"),
         "--output", "cannot write"),
    Case("output-absent", ("prune", "{model}"), "--output"),
    Case("unknown-flag", P + ("--frobnicate", "3"), "--frobnicate"),
    # --- --config files
    Case("config-missing", P + ("--config", "{tmp}/none.yaml"), "--config", "not a file"),
    Case("config-misspelled-key", P + ("--config", "{tmp}/misspelled.yaml"), "sparsty",
         "did you mean 'sparsity'"),
    Case("config-misspelled-dashed", P + ("--config", "{tmp}/misspelled-dashed.yaml"), "calibraton-data",
         "did you mean 'calibration-data'"),
    Case("config-unknown-key", P + ("--config", "{tmp}/unknown.yaml"), "colour", "valid:"),
    Case("config-not-yaml", P + ("--config", "{tmp}/broken.yaml"), "--config", "YAML"),
    Case("config-not-mapping", P + ("--config", "{tmp}/list.yaml"), "--config", "mapping"),
    Case("config-wrong-type", P + ("--config", "{tmp}/wrongtype.yaml"), "--calibration-batch-size",
         "integer"),
    Case("config-out-of-range", P + ("--config", "{tmp}/range.yaml"), "--sparsity", "[0, 1)"),
    Case("config-binary", P + ("--config", "{tmp}/binary.txt"), "--config"),
    # --- evaluate
    Case("eval-model-missing", ("evaluate", "{tmp}/no-model"), "MODEL"),
    Case("eval-dataset-unknown", E + ("--dataset", "wikitext103"), "--dataset", "wikitext2, c4, ptb"),
    Case("eval-dataset-one-of-two-unknown", E + ("--dataset", "wikitext2,nope"), "--dataset", "nope"),
    Case("eval-dataset-empty-file", E + ("--dataset", "{tmp}/empty.txt"), "--dataset", "no text"),
    Case("eval-dataset-binary", E + ("--dataset", "{tmp}/binary.txt"), "--dataset", "UTF-8"),
    Case("eval-seqlen-beyond-positions", E + ("--seqlen", "999"), "--seqlen", "256"),
    Case("eval-seqlen-beyond-stream", E + ("--seqlen", "200", "--dataset", "{tmp}/short.txt"), "--seqlen",
         "tokens"),
    Case("eval-seqlen-zero", E + ("--seqlen", "0"), "--seqlen", ">= 1"),
    Case("eval-batch-size-zero", E + ("--batch-size", "0"), "--batch-size", ">= 1"),
    Case("eval-batch-size-word", E + ("--batch-size", "two"), "--batch-size", "integer"),
    Case("eval-max-windows-negative", ("evaluate", "{model}", "--max-windows", "-1"), "--max-windows",
         ">= 1"),
    Case("eval-output-is-dir", E + ("--output", "{tmp}/emptydir"), "--output", ".json"),
    Case("eval-output-unwritable", E + ("--output", "/proc/none/results.json"), "--output", "cannot write"),
    Case("eval-adapter-missing", E + ("--adapter", "{tmp}/no-adapter"), "--adapter", "not a directory"),
    Case("eval-dtype", E + ("--dtype", "half"), "--dtype", "float32, bfloat16, float16"),
    Case("eval-device", E + ("--device", "tpu0"), "--device", "cpu"),
    Case("eval-config-misspelled", E + ("--config", "{tmp}/eval-misspelled.yaml"), "max_window",
         "did you mean 'max-windows'"),
    # --- inspect
    Case("inspect-model-missing", ("inspect", "{tmp}/no-model"), "MODEL"),
    Case("inspect-not-a-model", ("inspect", "{tmp}/emptydir"), "MODEL", "config.json"),
    Case("inspect-masks-missing", ("inspect", "{model}", "--masks", "{tmp}/none.safetensors"), "--masks",
         "not a file"),
    Case("inspect-masks-is-dir", ("inspect", "{model}", "--masks", "{tmp}/emptydir"), "--masks",
         "not a file"),
    Case("inspect-masks-binary", ("inspect", "{model}", "--masks", "{tmp}/binary.txt"), "--masks",
         "masks file"),
    Case("inspect-masks-are-weights", ("inspect", "{model}", "--masks", "{model}/model.safetensors"),
         "--masks", "not a sparseheal masks file"),
    Case("inspect-masks-other-model", ("inspect", "{model}", "--masks", "{tmp}/gpt2-masks.safetensors"),
         "--masks", "not a linear layer of the model"),
    Case("inspect-masks-wrong-shape", ("inspect", "{model}", "--masks", "{tmp}/wrong-shape.safetensors"),
         "--masks", "shape"),
    Case("unknown-command", ("compress", "{model}"), "compress"),
    # --- output space and permissions, checked before any work
    Case("output-readonly-dir", ("prune", "{model}", "-o", "{tmp}/readonly/out", "--seqlen", "32"),
         "--output", "cannot write"),
    Case("disk-full-prune", P, "--output", "1.0 MiB free", free=2**20),
    Case("disk-full-heal", H, "--output", "1.0 MiB free", free=2**20),
    Case("disk-full-heal-checkpoints", ("heal", "{tmp}/pruned", "-o", "{out}", "--method", "full",
                                        "--block-size", "32", "--save-steps", "5"), "--output",
         "checkpoints", free=2**20),
    Case("disk-full-merge", M + ("{tmp}/pruned",), "--output", "1.0 MiB free", free=2**20),
    Case("disk-full-evaluate", E + ("--output", "{out}.json"), "--output", "1.0 MiB free", free=2**20),
    Case("disk-full-run", ("run", "--config", "{tmp}/run.yaml", "--output", "{out}"), "--output",
         "stages still to run", free=2**20),
    # --- pickle-only weights (they can run code when loaded) are refused unless --allow-pickle
    Case("heal-pickle-only", ("heal", "{tmp}/pickled", "-o", "{out}", "--block-size", "32"), "--allow-pickle",
         "pass --allow-pickle"),
    Case("inspect-pickle-only", ("inspect", "{tmp}/pickled"), "--allow-pickle", "pass --allow-pickle"),
    Case("evaluate-pickle-beside-masks", ("evaluate", "{tmp}/pickled-masks", "--max-windows", "1"),
         "--allow-pickle", "pass --allow-pickle"),
    Case("merge-pickle-only-base", M + ("{tmp}/pickled",), "--allow-pickle", "pass --allow-pickle"),
    Case("merge-pickle-only-adapter", ("merge", "{tmp}/pickle-adapter", "-o", "{out}", "--base",
                                       "{tmp}/pruned"), "--allow-pickle", "pass --allow-pickle"),
    # --- masks that belong to other weights
    Case("heal-masks-of-another-model", ("heal", "{tmp}/swapped", "-o", "{out}", "--block-size", "32"),
         "PRUNED_DIR", "was written for weights"),
    Case("inspect-masks-of-another-model", ("inspect", "{tmp}/swapped"), "MODEL", "was written for weights"),
    Case("merge-masks-of-another-model", M + ("{tmp}/swapped",), "--base", "was written for weights"),
    # --- --config reads YAML 1.2 numbers: 2:4 is a pattern (not the sexagesimal 124)
    Case("config-nm-pattern-other-ratio", P + ("--config", "{tmp}/nm.yaml"), "--sparsity",
         "implies sparsity 0.5"),
    # --- recipes cannot place a stage's output (outside the run directory or anywhere)
    Case("run-stage-output-parent", ("run", "--config", "{tmp}/escape.yaml", "--output", "{out}"),
         "prune.output", "set by run"),
    Case("run-stage-output-absolute", ("run", "--config", "{tmp}/escape-abs.yaml", "--output", "{out}"),
         "heal.output", "set by run"),
    Case("run-override-output", ("run", "--config", "{tmp}/run.yaml", "--output", "{out}", "--evaluate",
                                 "output=../../x.json"), "evaluate.output", "set by run"),
]
PARAMS = [pytest.param(c, id=c.id, marks=pytest.mark.skipif(
    c.id == "output-readonly-dir" and os.geteuid() == 0, reason="root writes into read-only directories"))
    for c in CASES]


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, llama_dir, tiny_model_dir) -> Path:
    """Every broken file the table refers to, in one directory."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "emptydir").mkdir()
    (tmp / "existing").mkdir()
    (tmp / "existing" / "keep.txt").write_text("previous result")
    files = {
        "empty.txt": "",
        "blank.txt": "  \n\n \t \n",
        "binary.txt": bytes(range(256)) * 8,
        "notext.jsonl": '{"content": "no text field"}\n',
        "broken.jsonl": '{"text": "fine"}\n{"text": \n',
        "broken.parquet": b"PAR1 not really parquet",
        "table.csv": "text\nhello\n",
        "short.txt": "only a few words here",
        "badconfig/config.json": '{"model_type": "no-such-architecture"}',
        "misspelled.yaml": "sparsty: 0.5\n",
        "misspelled-dashed.yaml": "calibraton-data: c4\n",
        "unknown.yaml": "colour: red\n",
        "broken.yaml": "nsamples: [1, 2\n",
        "list.yaml": "- nsamples\n- 2\n",
        "wrongtype.yaml": "calibration_batch_size: many\n",
        "range.yaml": "sparsity: 1.5\n",
        "eval-misspelled.yaml": "max_window: 2\n",
    }
    for name, content in files.items():
        _write(tmp / name, content)
    os.symlink(tmp / "nowhere.txt", tmp / "dangling.txt")
    # masks that belong to another architecture, and masks with llama's names but transposed shapes
    from sparseheal.models import load_model, prunable_linears

    gpt2, _, _ = load_model(str(tiny_model_dir("gpt2")), device="cpu")
    save_masks({n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in prunable_linears(gpt2).items()
                if ".h." in n}, tmp / "gpt2-masks.safetensors")
    llama, _, _ = load_model(str(llama_dir), device="cpu")
    save_masks({n: torch.ones_like(m.weight.t(), dtype=torch.bool) for n, m in prunable_linears(llama).items()
                if "layers.0.mlp" in n}, tmp / "wrong-shape.safetensors")
    _model_files(tmp, llama_dir, llama)
    return tmp


def _model_files(tmp: Path, llama_dir: Path, llama) -> None:
    """Pruned, pickled, masks-swapped and adapter directories, and recipes, for the later cases."""
    import shutil

    import sparseheal

    (tmp / "readonly").mkdir(mode=0o555)
    (tmp / "nm.yaml").write_text("pattern: 2:4\nsparsity: 0.6\n")
    pruned = sparseheal.prune(str(llama_dir), str(tmp / "pruned"), method="magnitude")
    other = sparseheal.prune(str(llama_dir), str(tmp / "pruned-2-4"), method="magnitude", pattern="2:4")
    shutil.copytree(pruned, tmp / "swapped")
    shutil.copyfile(other / "sparsity_masks.safetensors", tmp / "swapped" / "sparsity_masks.safetensors")
    for name, masks in (("pickled", False), ("pickled-masks", True)):
        shutil.copytree(pruned, tmp / name)
        (tmp / name / "model.safetensors").unlink()
        if not masks:
            (tmp / name / "sparsity_masks.safetensors").unlink()
        torch.save(llama.state_dict(), tmp / name / "pytorch_model.bin")
    adapters = {"fake-adapter": "adapter_model.safetensors", "pickle-adapter": "adapter_model.bin"}
    for name, weights in adapters.items():
        (tmp / name).mkdir()
        (tmp / name / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (tmp / name / weights).write_bytes(b"not read: refused first")
    run = f"model: {llama_dir}\nprune: {{method: magnitude}}\nheal: {{block-size: 32, max-steps: 1}}\n" \
          "evaluate: {seqlen: 32, max-windows: 1}\n"
    (tmp / "run.yaml").write_text(run)
    (tmp / "escape.yaml").write_text(run.replace("magnitude}", "magnitude, output: ../../x}"))
    (tmp / "escape-abs.yaml").write_text(run.replace("max-steps: 1", f"max-steps: 1, output: {tmp}/abs"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: make this process offline (no slow retries)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _fill(argv: tuple[str, ...], model: Path, tmp: Path, out: Path) -> list[str]:
    return [a.format(model=model, tmp=tmp, out=out) for a in argv]


def _tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(str(p.relative_to(path)).encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def _check_error(code: int, stdout: str, stderr: str, case: Case) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, (case.id, code, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert len(lines) == 1, (case.id, stderr)
    line = lines[0]
    assert line.startswith("sparseheal: error: "), line
    assert case.names in line, (case.id, line)
    assert case.allowed in line, (case.id, line)


def test_table_is_large_and_unique():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} >= {"prune", "heal", "merge", "evaluate", "inspect", "run"}


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(case, bad_files, llama_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    existing = _tree_digest(bad_files / "existing")
    if case.free is not None:
        import shutil

        full = shutil._ntuple_diskusage(2**40, 2**40 - case.free, case.free)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(_fill(case.argv, llama_dir, bad_files, out))
    captured = capsys.readouterr()
    _check_error(exit_info.value.code, captured.out, captured.err, case)
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing at all written beside it
    assert _tree_digest(bad_files / "existing") == existing
    assert not Path("/proc/sparseheal-out").exists()


SUBPROCESS_CASES = ["seqlen-beyond-documents", "inspect-masks-other-model"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_real_process(case_id, bad_files, llama_dir, tmp_path):
    """The real console entry point: logging and progress bars must not add lines before the error."""
    case = next(c for c in CASES if c.id == case_id)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparseheal", *_fill(case.argv, llama_dir, bad_files, out)],
                          capture_output=True, text=True, env=env, timeout=300)
    _check_error(proc.returncode, proc.stdout, proc.stderr, case)
    assert proc.stdout == "" and not out.exists()
