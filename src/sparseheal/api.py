"""The Python API: one function per stage, each a short pipeline over the modules.

settings (every group built and so checked) -> preflight (files and model configs, before any weights
load) -> work -> atomic write -> record. Each function's signature and ``Args:`` come from the settings
declarations of the groups its :class:`~sparseheal.settings.Stage` lists; the command line is derived
from the same stages.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import sparseheal.evaluate  # noqa: F401  (registers the evaluations before the evaluate stage lists theirs)
import sparseheal.heal  # noqa: F401  (registers the healers before the heal stage lists their settings)
import sparseheal.sparsity  # noqa: F401  (registers the pruning methods likewise)
from sparseheal.checks import (
    check_free_space,
    check_name_length,
    check_not_an_input,
    check_output,
    check_pickle,
    check_weight_files,
)
from sparseheal.data import DataSettings, check_source, protected_inputs
from sparseheal.errors import ConfigError
from sparseheal.evaluate.base import EvaluationSettings, Evaluator, evaluator_groups, evaluators
from sparseheal.heal.base import HealMethodSettings
from sparseheal.heal.distill import DistillSettings
from sparseheal.heal.fsdp import FsdpSettings
from sparseheal.heal.merge import HealMergeSettings, MergeSettings
from sparseheal.heal.selfgen import SelfGenSettings
from sparseheal.heal.training import TrainingSettings
from sparseheal.layout import check_prunable_layout
from sparseheal.models import (
    ComputeSettings,
    TrustSettings,
    check_seqlen,
    input_path,
    load_tokenizer,
    model_skeleton,
    resolve_source,
    weights_bytes,
)
from sparseheal.records import output_lock, read_record, write_json_atomic
from sparseheal.registry import HEALERS, PRUNERS
from sparseheal.settings import REQUIRED, Settings, Stage, refuse_unused, setting
from sparseheal.sparsity.base import PruneSettings
from sparseheal.sparsity.calibrate import CalibrationSettings
from sparseheal.sparsity.dsnot import RefineSettings
from sparseheal.sparsity.owl import LayerSparsitySettings

__all__ = ["PRUNE", "HEAL", "MERGE", "EVALUATE", "INSPECT", "prune", "heal", "merge", "evaluate", "inspect",
           "check_prune_model", "check_evaluate_model"]

log = logging.getLogger(__name__)


@dataclass
class Overwrite(Settings):
    overwrite: bool = setting(False, "replace an existing output directory (a heal then starts over from "
                                     "scratch).", resumable=True)


@dataclass
class PruneIO(Settings):
    model: str = setting(REQUIRED, "Hub id, local directory, .gguf file, or smollm2-135m.", positional=True)
    output: str = setting(REQUIRED, "directory to write (refused if it exists, unless overwrite).")


@dataclass
class HealIO(Settings):
    pruned_dir: str = setting(REQUIRED, "the pruned model directory (weights + sparsity_masks.safetensors); "
                                        "never modified.", positional=True)
    output: str = setting(REQUIRED, "directory to write (what the healer writes: an adapter or a model), "
                                    "with sparseheal.json.")


@dataclass
class MergeIO(Settings):
    adapter: str = setting(REQUIRED, "the adapter directory written by sparseheal heal.", positional=True)
    output: str = setting(REQUIRED, "directory to write the merged model to.")


@dataclass
class EvaluateIO(Settings):
    model: str = setting(REQUIRED, "Hub id, local directory, .gguf file, or smollm2-135m.", positional=True)
    adapter: str | None = setting(None, "a PEFT adapter directory to apply to the model.")
    output: str | None = setting(None, "JSON file to write the results to.")


@dataclass
class InspectIO(Settings):
    model: str = setting(REQUIRED, "a model directory (or any model source).", positional=True)
    masks: str | None = setting(None, "a masks file to verify against (default: the model's own "
                                      "sparsity_masks.safetensors).")
    export_masks: str | None = setting(None, "write the masks to this new directory as one KEY.npy bool "
                                             "array per weight plus masks.json.")


def _method_groups(registry) -> list[type[Settings]]:
    """The methods' own settings groups, each once (methods may share one)."""
    return list(dict.fromkeys(impl.settings for _, impl in registry.items() if impl.settings is not None))


PRUNE = Stage("prune", [PruneIO, PruneSettings, LayerSparsitySettings, CalibrationSettings,
                        *_method_groups(PRUNERS), RefineSettings, ComputeSettings, DataSettings,
                        TrustSettings, Overwrite])
HEAL = Stage("heal", [HealIO, HealMethodSettings, TrainingSettings, *_method_groups(HEALERS),
                      HealMergeSettings, DistillSettings, SelfGenSettings, FsdpSettings, ComputeSettings,
                      DataSettings, TrustSettings, Overwrite])
MERGE = Stage("merge", [MergeIO, MergeSettings, ComputeSettings, DataSettings, TrustSettings, Overwrite])
EVALUATE = Stage("evaluate", [EvaluateIO, *evaluator_groups(), EvaluationSettings, ComputeSettings,
                              DataSettings, TrustSettings, Overwrite])
INSPECT = Stage("inspect", [InspectIO, TrustSettings])


def check_prune_model(model: str, how: PruneSettings, calibration: CalibrationSettings,
                      trust_remote_code: bool = False) -> None:
    """The prune checks that read the model's config and the calibration data's files. A method without
    calibration ignores the calibration settings: given anyway, they are warned about (and the record
    leaves them out). A model holding weights of a layout no method can prune is refused."""
    check_prunable_layout(model_skeleton(model, trust_remote_code))
    load_tokenizer(resolve_source(model), trust_remote_code)  # a missing or broken one: refused now
    from sparseheal.sparsity.pipeline import plan_methods

    if how.pruner.needs_calibration or any(PRUNERS.get(m).needs_calibration for m in plan_methods(how)):
        check_seqlen(model, calibration.seqlen)
        check_source(calibration.calibration_data, "--calibration-data")
        return
    changed = [k for k, v in calibration.values().items() if v != CalibrationSettings.defaults()[k]]
    if changed:
        log.warning("--method %s uses no calibration data; ignoring %s", how.method,
                    ", ".join("--" + k.replace("_", "-") for k in changed))


def _method_options(how: PruneSettings, built: dict) -> Settings | None:
    """The chosen method's own settings; another method's settings, when changed, are refused (unless a
    plan's rule names that method)."""
    from sparseheal.sparsity.pipeline import plan_methods

    planned = {PRUNERS.get(name).settings for name in plan_methods(how)}
    for group in dict.fromkeys(p.settings for _, p in PRUNERS.items() if p.settings is not None):
        if group is not how.pruner.settings and group not in planned:
            owners = " or ".join(n for n, p in PRUNERS.items() if p.settings is group)
            refuse_unused(built[group], (), lambda _name, owners=owners: f"applies to --method {owners} only")
    options = built[how.pruner.settings] if how.pruner.settings else None
    how.pruner.check_pattern(options, how.shape)
    refine = built[RefineSettings]
    if refine.refine == "none":
        refine_unused(refine)
    refine.check_method(how.method, how.pruner.needs_calibration, how.shape.kind)
    return options


def _all_method_options(built: dict) -> dict[str, Settings | None]:
    """Each pruning method's settings group as built (None for a method without one), by name."""
    return {name: built[cls.settings] if cls.settings else None for name, cls in PRUNERS.items()}


def refine_unused(refine: RefineSettings) -> None:
    """DSnoT's options given without ``--refine dsnot`` are refused."""
    refuse_unused(refine, ("refine",), lambda _name: "applies to --refine dsnot only")


def _prune_preflight(built: dict) -> Settings | None:
    """The prune checks of files and model configs; returns the method's own settings."""
    io, how, calibration = built[PruneIO], built[PruneSettings], built[CalibrationSettings]
    options = _method_options(how, built)
    spread = built[LayerSparsitySettings]
    spread.check_against(how.sparsity, how.pattern, how.pruner.needs_calibration, how.method)
    check_output(io.output, built[Overwrite].overwrite)
    calibration_file = calibration.calibration_data if how.pruner.needs_calibration else None
    check_not_an_input(io.output, [("MODEL", input_path(io.model)), ("--calibration-data", calibration_file),
                                   *protected_inputs(built[DataSettings].data_dir)])
    if Path(io.model).expanduser().is_dir():
        read_record(io.model, "MODEL")  # a damaged record of the input: refused now, not after the work
    check_prune_model(io.model, how, calibration, built[TrustSettings].trust_remote_code)  # a broken config
    # says so first
    if how.plan or how.ignore or how.shape.kind in ("vnm", "block"):  # checked against the model's
        from sparseheal.sparsity.pipeline import plan_assignments  # structure, before weights load

        planned = plan_assignments(model_skeleton(io.model, built[TrustSettings].trust_remote_code), how,
                                   _all_method_options(built), built[RefineSettings]) or {}
        if not how.pruner.needs_calibration and any(PRUNERS.get(a.method).needs_calibration
                                                    for a in planned.values() if a is not None):
            check_seqlen(io.model, calibration.seqlen)  # a rule's method reads the calibration draw
            check_source(calibration.calibration_data, "--calibration-data")
            check_not_an_input(io.output, [("--calibration-data", calibration.calibration_data)])
    check_weight_files(input_path(io.model) if Path(io.model).is_dir() else None, "MODEL")
    check_free_space(io.output, _prune_output_bytes(io.model), "the model's weight files, their masks "
                     "(a sixteenth at most) and its tokenizer and config files")
    return options


def _prune_output_bytes(model: str) -> int | None:
    """What a prune writes: the weights, a bit per weight of 16 or more bits, and the other files."""
    weights = weights_bytes(model)
    if weights is None:
        return None
    root = Path(resolve_source(model).path)
    others = sum(f.stat().st_size for f in root.iterdir() if f.is_file() and f.suffix not in
                 (".safetensors", ".bin", ".gguf"))
    return weights + weights // 16 + others


@PRUNE.api(preflight=_prune_preflight)
def prune(built: dict) -> Path:
    """Prunes a causal LM and writes a model directory with masks and a record.

    Returns:
        The output directory.
    """
    from sparseheal.sparsity.pipeline import run_prune

    options = _prune_preflight(built)
    io = built[PruneIO]
    with output_lock(io.output):
        return run_prune(io.model, io.output, built[Overwrite].overwrite, built[PruneSettings],
                         built[CalibrationSettings], options, built[RefineSettings],
                         built[LayerSparsitySettings], built[ComputeSettings], built[TrustSettings],
                         built[DataSettings].data_dir, _all_method_options(built))


def _heal_preflight(built: dict):
    """The heal settled (:class:`~sparseheal.heal.pipeline.HealJob`) and checked before any weights load."""
    from sparseheal.heal.pipeline import plan_heal, preflight_heal

    io = built[HealIO]
    job = plan_heal(io.pruned_dir, io.output, built[Overwrite].overwrite, built)
    preflight_heal(job, {f.name for f in HEAL.fields() if f.resumable})
    return job


@HEAL.api(preflight=_heal_preflight)
def heal(built: dict) -> Path:
    """Heals a pruned model with the chosen healer (LoRA adapters on the frozen sparse base, full
    fine-tuning under the mask, ...); pruned weights stay exactly zero.

    Returns:
        The output directory.
    """
    from sparseheal.heal.pipeline import run_heal

    job = _heal_preflight(built)
    with output_lock(job.output):
        return run_heal(job)


@MERGE.api()
def merge(built: dict) -> Path:
    """Merges a LoRA adapter into its sparse base and writes a normal model directory.

    Returns:
        The output directory.
    """
    from sparseheal.heal.merge_stage import run_merge

    io = built[MergeIO]
    with output_lock(io.output):
        return run_merge(io.adapter, io.output, built[Overwrite].overwrite, built[MergeSettings],
                         built[ComputeSettings], built[TrustSettings], built[DataSettings].data_dir)


def evaluations(built: dict) -> list[Evaluator]:
    """Every registered evaluation with its built settings group."""
    data_dir = built[DataSettings].data_dir if DataSettings in built else None
    return [impl(built.get(impl.settings) or impl.settings(), data_dir) for impl in evaluators()]


def check_evaluate_model(model: str | None, built: dict) -> None:
    """The evaluate checks that read data files and (when ``model`` is given) the model's config."""
    for evaluation in evaluations(built):
        evaluation.check(model)


def _evaluate_preflight(built: dict) -> None:
    """The evaluate checks of files and model configs: the results file, the model, adapter and data."""
    io = built[EvaluateIO]
    for flag, path in (("MODEL", io.model), ("--adapter", io.adapter)):
        if path is not None and Path(path).expanduser().is_dir():
            read_record(path, flag)  # a damaged record: refused before any work
    if io.adapter is not None and not Path(io.adapter).is_dir():
        raise ConfigError("--adapter", f"{io.adapter} is not a directory")
    if io.adapter is not None and not (Path(io.adapter) / "adapter_config.json").is_file():
        raise ConfigError("--adapter", f"{io.adapter} is not a PEFT adapter directory "
                                       "(no adapter_config.json)")
    if io.output is not None:
        out = Path(io.output)
        if out.is_dir():
            raise ConfigError("--output", f"{out} is a directory; give a .json file path")
        inputs = [("MODEL", input_path(io.model)), ("--adapter", io.adapter)]
        read = [pair for evaluation in evaluations(built) for pair in evaluation.inputs()]
        check_not_an_input(out, inputs + read + protected_inputs(built[DataSettings].data_dir))
        if out.exists() and not built[Overwrite].overwrite:
            raise ConfigError("--output", f"{out} already exists; pass --overwrite to replace it")
        check_output(out.parent if str(out.parent) else ".", overwrite=True)
        check_name_length(out, "--output")
        check_free_space(out, None, "a results file", minimum=2 * 2**20)
    check_weight_files(io.model if Path(io.model).is_dir() else None, "MODEL")
    check_weight_files(io.adapter, "--adapter", stem="adapter_model")
    if io.adapter is not None:  # its matrices fit the base's linears (headers and a weightless skeleton)
        from sparseheal.heal.adapters import check_adapter_shapes

        check_adapter_shapes(io.adapter, model_skeleton(io.model, built[TrustSettings].trust_remote_code))
    check_evaluate_model(io.model, built)
    load_tokenizer(resolve_source(io.model), built[TrustSettings].trust_remote_code)  # refused now if broken


@EVALUATE.api(preflight=_evaluate_preflight)
def evaluate(built: dict) -> dict:
    """Measures perplexity with the Wanda protocol, zero-shot accuracy with lm-eval when asked, and any
    other registered evaluation whose settings ask for it.

    Returns:
        {"model", "adapter", "results": [one dict per data set], "zeroshot": {task: {"acc", "acc_norm", "n"}},
        each other evaluation's result under its key, "timings", "peak_rss_mb"}
    """
    from sparseheal.evaluate.pipeline import run_evaluate

    _evaluate_preflight(built)
    io = built[EvaluateIO]
    with contextlib.ExitStack() as stack:
        if io.output:
            stack.enter_context(output_lock(io.output))
        report = run_evaluate(io.model, io.adapter, evaluations(built), built[EvaluationSettings].batch_size,
                              built[ComputeSettings], built[TrustSettings])
        if io.output:
            write_json_atomic(Path(io.output), report)
    return report


@INSPECT.api()
def inspect(built: dict) -> dict:
    """Reports per-layer and total sparsity, the N:M pattern, and mask violations.

    Returns:
        A report dict; ``report["ok"]`` is False when any check fails.
    """
    from sparseheal.card_stages import pruning_record
    from sparseheal.cards import stage_chain
    from sparseheal.models import load_model, resolve_source
    from sparseheal.sparsity.inspection import inspect_model
    from sparseheal.sparsity.store import MASKS_FILE, check_masks_file, check_own_masks, export_masks

    io, trust = built[InspectIO], built[TrustSettings]
    check_pickle(io.model, trust.allow_pickle)
    check_weight_files(io.model if Path(io.model).is_dir() else None, "MODEL")
    if io.masks is not None and not Path(io.masks).is_file():
        raise ConfigError("--masks", f"{io.masks} is not a file")
    if io.export_masks is not None:
        check_output(io.export_masks, overwrite=False, flag="--export-masks")
        check_not_an_input(io.export_masks, [("MODEL", input_path(io.model)), ("--masks", io.masks)],
                           "--export-masks")
    if io.masks is not None:
        check_masks_file(io.masks, io.model)
    else:  # the directory's own masks must belong to its weights
        check_own_masks(resolve_source(io.model).path, "MODEL")
    # in the stored dtype: a pruned weight too small for float32 (1e-50 in float64) is still not zero
    record = read_record(resolve_source(io.model).path, "MODEL")
    lm, _, source = load_model(io.model, "auto", "cpu", trust.trust_remote_code, trust.allow_pickle)
    masks_file = io.masks or (Path(source.path) / MASKS_FILE)
    masks_file = masks_file if Path(masks_file).is_file() else None
    if record is not None and masks_file is not None and not record.get("pattern"):
        # a healed (or masked-merge) model keeps the masks of its prune: its pattern is checked too
        pruned = pruning_record(stage_chain(record, source.path))
        record = {**record, "pattern": pruned.get("pattern"), "sparsity": pruned.get("sparsity"),
                  "layer_sparsity": pruned.get("layer_sparsity")}
    report = inspect_model(lm, record, masks_file)
    if io.export_masks is not None:
        if masks_file is None:
            raise ConfigError("--export-masks", f"{io.model} has no masks file to export (give --masks)")
        report["exported"] = str(export_masks(masks_file, io.export_masks))
    return report
