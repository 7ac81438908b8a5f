"""Model cards: the ``README.md`` of every model or adapter directory a stage writes, in the Hugging Face
Hub's format (YAML front matter, then markdown), generated from the stage records alone.

The front matter names the dense model the chain of stages started from (``base_model``), the library
that loads the directory (``peft`` for an adapter, else ``transformers``), ``pipeline_tag:
text-generation``, tags (``sparse``, ``pruned``, ``sparseheal``, the pruning method and pattern, each
healer) and the base model's license when its ``config.json`` or its own card's front matter names one.
The body says what each stage did, the evaluations recorded for this model (``sparseheal run`` and
``sparseheal report`` regenerate the cards with them), how to load the directory and how to verify its
sparsity. Every number in a card is a value of a record, written by :func:`number`; nothing of the dense
model's own card is copied.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from sparseheal.card_stages import done_section, heal_method, number, pruning_record, stage_summary
from sparseheal.checks import MASKS_FILE
from sparseheal.evaluate.base import evaluators
from sparseheal.records import RECORD_FILE, read_record, replace_file
from sparseheal.sources import BUILTIN_HUB_IDS

__all__ = ["CARD_FILE", "number", "stage_chain", "card_base", "base_license", "front_matter", "render_card",
           "write_card", "write_run_cards"]

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
ADAPTER_CONFIG = "adapter_config.json"


def _parent_record(directory: Path) -> dict | None:
    """The record of the heal that wrote ``directory`` as its merged copy (``heal --merge``)."""
    parent = read_record(directory.parent) if (directory.parent / RECORD_FILE).is_file() else None
    merged = (parent or {}).get("merged")
    return parent if isinstance(merged, dict) and merged.get("path") == directory.name else None


def stage_chain(record: dict, directory: str | os.PathLike | None = None) -> list[dict]:
    """The record and the records of the stages before it, oldest first (the ``previous`` each embeds;
    for the merged copy a heal writes inside its output, the heal's record)."""
    chain, current = [], record
    while current:
        chain.append(current)
        previous = current.get("previous")
        if not previous and directory is not None and len(chain) == 1:
            previous = _parent_record(Path(directory))
        current = previous
    return chain[::-1]


def card_base(chain: list[dict]) -> tuple[str, str | None]:
    """The dense model the chain started from: its name for the card (the Hub repository of a built-in
    model) and where its files are (None when only a name is known)."""
    first = chain[0]
    name = first.get("dense_model") or first.get("base_model") or "unknown"
    path = first.get("base_path") if not first.get("dense_model") else first.get("dense_model")
    return BUILTIN_HUB_IDS.get(name, name), path


def _front_matter_of(text: str) -> dict:
    """The YAML front matter of a model card (empty when it has none or it does not parse)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(path: str | os.PathLike | None) -> str | None:
    """The license a local base model's ``config.json`` or its card's front matter names, else None."""
    root = Path(path).expanduser() if path else None
    if root is None or not root.is_dir():
        return None
    found = None
    if (root / "config.json").is_file():
        try:
            found = json.loads((root / "config.json").read_text()).get("license")
        except (json.JSONDecodeError, AttributeError):
            found = None
    if not found and (root / CARD_FILE).is_file():
        found = _front_matter_of((root / CARD_FILE).read_text(errors="replace")).get("license")
    return found if isinstance(found, str) and found.strip() else None


def front_matter(chain: list[dict], library: str, license_id: str | None) -> dict:
    """The card's metadata: base_model, library_name, pipeline_tag, tags and (when known) license."""
    pruning = pruning_record(chain)
    tags = ["sparse", "pruned", "sparseheal", pruning.get("method"), pruning.get("pattern")]
    for record in chain:
        added = {"heal": ["healed", heal_method(record)], "merge": ["merged"]}
        tags += added.get(str(record.get("stage")), [])
    data: dict[str, Any] = {"base_model": card_base(chain)[0], "library_name": library,
                            "pipeline_tag": "text-generation",
                            "tags": list(dict.fromkeys(str(t) for t in tags if t))}
    if license_id:
        data["license"] = license_id
    return data


def _evaluation_section(evaluations: dict[str, dict] | None, command: str) -> list[str]:
    """Each evaluation's results for every model that has them (label -> evaluate report)."""
    lines = ["## Evaluation", ""]
    evaluations = evaluations or {}
    for evaluator in evaluators():
        results = {label: report[evaluator.key] for label, report in evaluations.items()
                   if report.get(evaluator.key)}
        if results:
            lines += [*evaluator.card_lines(results), ""]
    if len(lines) == 2:
        return lines + [f"No evaluations recorded yet; run `{command}`.", ""]
    return lines


def _load_section(name: str, library: str, base: str | None, has_masks: bool) -> list[str]:
    lines = ["## How to load", ""]
    if library == "peft":
        return lines + [
            f"A PEFT adapter for the sparse model `{base}` (named in `{ADAPTER_CONFIG}`):", "",
            "```python", "from peft import AutoPeftModelForCausalLM", "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # this directory or its Hub repo',
            "",
            "# or on a base loaded yourself", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{name}")', "```", "",
            "PEFT's `merge_and_unload` writes a dense update into every pruned position; "
            f"`sparseheal merge {name} -o merged` (masked by default) keeps the sparsity.", "",
            "With vLLM:", "", "```bash", f"vllm serve {base} --enable-lora --lora-modules healed={name}",
            "```", ""]
    masks = (f"; `{MASKS_FILE}` beside the weights is no weight file (the weights index names only the "
             "model's own files)") if has_masks else ""
    return lines + [
        f"A normal Hugging Face model directory{masks}.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")  # this directory or its Hub repo',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
        "With vLLM:", "", "```bash", f"vllm serve {name}", "```", "",
        "```python", "from vllm import LLM", "", f'llm = LLM(model="{name}")', "```", ""]


def _verify_section(name: str, library: str, has_masks: bool, sparsity: Any, base: str | None) -> list[str]:
    lines = ["## Verify the sparsity", ""]
    if library == "peft":
        target, note = base, "The adapter leaves its base bit-identical; verify the base:"
    else:
        target, note = name, "Per-layer and total sparsity, checked bit for bit against the stored masks:"
    command = f"sparseheal inspect {target}" + (f" --masks {target}/{MASKS_FILE}" if has_masks else "")
    if not has_masks:
        note = "No masks file is stored with these weights; the report counts the zeros:"
    return lines + [note, "", "```bash", command, "```", "",
                    f"The record gives a sparsity of {number(sparsity)}; `inspect` exits non-zero when a "
                    "pruned position is not exactly `+0.0` or the N:M pattern is broken.", ""]


def _summary(chain: list[dict], library: str) -> str:
    what = "A PEFT adapter that heals a sparse" if library == "peft" else "A sparse"
    done = ", then ".join(s for s in map(stage_summary, chain) if s)
    return f"{what} version of `{card_base(chain)[0]}`, made with `sparseheal`: {done}."


def render_card(chain: list[dict], name: str, library: str, has_masks: bool,
                evaluations: dict[str, dict] | None = None, license_id: str | None = None) -> str:
    """The model card of a directory (pure: records in, markdown out).

    Args:
        chain: the directory's record and those of the stages before it, oldest first.
        name: how the card refers to the directory (its name, or its Hub repository).
        library: ``transformers`` for a model directory, ``peft`` for an adapter.
        has_masks: whether the model whose sparsity ``inspect`` verifies (the directory, or an adapter's
            base) stores its sparsity masks.
        evaluations: evaluate reports by model label (this model, and others to compare with).
        license_id: the base model's license, when known.

    Returns:
        The card: YAML front matter, then the markdown body.
    """
    record = chain[-1]
    base = record.get("base_model") if library == "peft" else None
    sparsity = record.get("sparsity_achieved", pruning_record(chain).get("sparsity_achieved"))
    command = f"sparseheal evaluate {base} --adapter {name}" if base else f"sparseheal evaluate {name}"
    meta = yaml.safe_dump(front_matter(chain, library, license_id), sort_keys=False, allow_unicode=True)
    body = [f"# {name}", "", _summary(chain, library), "", *done_section(chain),
            *_evaluation_section(evaluations, command), *_load_section(name, library, base, has_masks),
            *_verify_section(name, library, has_masks, sparsity, base)]
    return f"---\n{meta}---\n\n" + "\n".join(body).rstrip() + "\n"


def _write_if_changed(path: Path, text: str) -> bool:
    """Writes ``text`` to ``path`` through a temporary sibling, unless the file already holds it."""
    if path.is_file() and path.read_text(errors="replace") == text:
        return False
    replace_file(path, text)
    return True


def write_card(directory: str | os.PathLike, evaluations: dict[str, dict] | None = None,
               name: str | None = None) -> Path:
    """Writes (or regenerates) ``DIRECTORY/README.md`` from the directory's record and its chain.

    Args:
        directory: a directory holding a stage record (``sparseheal.json``).
        evaluations: evaluate reports by model label to show (none: the card says none is recorded).
        name: how the card refers to the directory (default: its name); a stage writing into a
            temporary directory passes the name of its output.

    Returns:
        The card's path (rewritten only when its text changed).
    """
    directory = Path(directory)
    record = read_record(directory)
    if record is None:
        raise FileNotFoundError(f"{directory} holds no {RECORD_FILE}")
    chain = stage_chain(record, directory)
    adapter = (directory / ADAPTER_CONFIG).is_file()
    weights = Path(record.get("base_path") or directory) if adapter else directory  # what inspect reads
    text = render_card(chain, name or directory.name, "peft" if adapter else "transformers",
                       (weights / MASKS_FILE).is_file(), evaluations, base_license(card_base(chain)[1]))
    path = directory / CARD_FILE
    if _write_if_changed(path, text):
        log.info("model card: %s", path)
    return path


def _evaluated(report: dict) -> str | None:
    """The directory an evaluate report measured (its adapter, when it had one)."""
    return report.get("adapter") or report.get("model")


def _same_dir(path: str | None, directory: Path) -> bool:
    return bool(path) and Path(path).expanduser().resolve() == directory.resolve()


def _run_evaluations(run_dir: Path, stages: dict) -> list[tuple[str, dict]]:
    """(label, report) of every finished evaluation of a run, its label the evaluation file's name."""
    found = []
    for entry in stages.values():
        path = run_dir / str(entry.get("path", ""))
        if entry.get("stage") != "evaluate" or entry.get("status") != "done" or not path.is_file():
            continue
        try:
            found.append((path.stem, json.loads(path.read_text())))
        except json.JSONDecodeError:
            log.warning("%s is unreadable; the model cards leave it out", path)
    return found


def _belongs(label: str, report: dict, directory: Path, relative: str) -> bool:
    target = (report.get("settings") or {}).get("target")
    return _same_dir(_evaluated(report), directory) or target == relative or label == Path(relative).name


def write_run_cards(run_dir: str | os.PathLike) -> list[Path]:
    """Regenerates the card of every finished stage directory of a run with the evaluations of its
    model, and those of the models outside the run (the dense one) for comparison.

    Args:
        run_dir: the output directory of ``sparseheal run``.

    Returns:
        The cards' paths.
    """
    run_dir = Path(run_dir)
    stages = (read_record(run_dir) or {}).get("stages") or {}
    outputs = [(str(e["path"]), run_dir / str(e["path"])) for e in stages.values()
               if e.get("stage") != "evaluate" and e.get("status") == "done" and e.get("path")
               and (run_dir / str(e["path"]) / RECORD_FILE).is_file()]
    evaluations = _run_evaluations(run_dir, stages)
    owned = {label for label, report in evaluations
             if any(_belongs(label, report, d, rel) for rel, d in outputs)}
    outside = {label: report for label, report in evaluations if label not in owned}
    cards = []
    for relative, directory in outputs:
        mine = {label: report for label, report in evaluations
                if _belongs(label, report, directory, relative)}
        cards.append(write_card(directory, {**mine, **outside} if mine else None))
    return cards
