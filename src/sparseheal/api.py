"""The Python API: ``prune``, ``evaluate`` and ``inspect``, each a short pipeline over the modules.

Every function validates its arguments first (a ConfigError names the bad flag), and stages that
write a directory write it atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from sparseheal.config import ConfigError, EvaluateConfig, InspectConfig, PruneConfig
from sparseheal.data import calibration_samples, eval_tokens, load_documents
from sparseheal.evaluate.perplexity import perplexity
from sparseheal.evaluate.zeroshot import prepare_tasks, run_zeroshot
from sparseheal.models import (
    default_device,
    default_dtype,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_source,
    save_model,
    source_hash,
)
from sparseheal.records import MASKS_FILE, Stopwatch, atomic_dir, peak_rss_mb, read_record, write_record
from sparseheal.registry import PRUNERS
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.inspection import inspect_model
from sparseheal.sparsity.masks import sparsity_of
from sparseheal.sparsity.store import check_own_masks, save_masks, weights_hash

__all__ = ["prune", "evaluate", "inspect", "heal", "merge", "run", "report"]

log = logging.getLogger(__name__)


def _calibration_tokens(cfg: PruneConfig) -> torch.Tensor:
    """Draws the calibration windows with the tokenizer alone, before any weights load."""
    tokenizer = load_tokenizer(resolve_source(cfg.model))
    docs = load_documents(cfg.calibration_data, "train", cfg.data_dir, "--calibration-data")
    return calibration_samples(docs, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)


def _prune_record(cfg: PruneConfig, source, lm, masks: dict, watch: Stopwatch) -> dict:
    modules = dict(lm.named_modules())
    layers = {name: round(sparsity_of(modules[name].weight), 6) for name in masks}
    total = sum(m.numel() for m in masks.values())
    pruned = total - sum(m.kept() for m in masks.values())
    return {
        "stage": "prune",
        "base_model": cfg.model,
        "base_path": source.path,
        "base_hash": source_hash(source),
        "method": cfg.method,
        "pattern": cfg.pattern,
        "sparsity": cfg.sparsity,
        "calibration": {
            "source": cfg.calibration_data,
            "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen,
            "seed": cfg.seed,
            "batch_size": cfg.calibration_batch_size,
        },
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        "sparsity_achieved": round(pruned / max(total, 1), 6),
        "pruned_parameters": pruned,
        "prunable_parameters": total,
        "layers": layers,
        "timings": watch.times,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "previous": read_record(source.path) if source.kind == "local" else None,
    }


def prune(
    model: str,
    output: str,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calibration_data: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    calibration_batch_size: int = 2,
    dtype: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    data_dir: str | None = None,
    offload: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Prunes a causal LM and writes a model directory with masks and a record.

    Args:
        model: Hub id, local directory, .gguf file, or smollm2-135m.
        output: directory to write (refused if it exists, unless overwrite).
        method: wanda, sparsegpt or magnitude.
        sparsity: fraction of each linear's weights pruned, in [0, 1) (default 0.5; implied by N:M).
        pattern: unstructured, or N:M such as 2:4 (N of every M consecutive inputs kept).
        calibration_data: c4, wikitext2, ptb, or a local file or directory.
        nsamples: calibration samples.
        seqlen: tokens per calibration sample.
        seed: seed of the calibration draw.
        calibration_batch_size: samples per forward pass through a layer.
        dtype: float32, bfloat16 or float16 (default float32 on CPU, bfloat16 on GPU).
        device: compute device (default cuda when available, else cpu).
        overwrite: replace an existing output directory.
        data_dir: local mirror of the named data sets (default $SPARSEHEAL_DATA_DIR).
        offload: keep the model in host memory and move one decoder layer at a time to the device.
        allow_pickle: allow pickle-based .bin weights (they can run code when loaded).
        trust_remote_code: allow code shipped with the model to run.

    Returns:
        The output directory.
    """
    cfg = PruneConfig(**{k: v for k, v in locals().items()})
    watch = Stopwatch()
    pruner_cls = PRUNERS.get(cfg.method)
    tokens = None
    if pruner_cls.needs_calibration:  # first, so that data that cannot serve fails before the weights load
        with watch("calibration_data"):
            tokens = _calibration_tokens(cfg)
    with watch("load"):
        device = cfg.device or default_device()
        lm, tokenizer, source = load_model(cfg.model, cfg.dtype or default_dtype(device),
                                           "cpu" if cfg.offload else device, cfg.trust_remote_code,
                                           cfg.allow_pickle)
    with watch("prune"):
        masks = prune_model(lm, pruner_cls, tokens, cfg.nm, cfg.sparsity, cfg.calibration_batch_size,
                            device, offload=cfg.offload)
    record = _prune_record(cfg, source, lm, masks, watch)
    with atomic_dir(cfg.output, cfg.overwrite) as tmp:
        save_model(lm, tokenizer, tmp)
        record["weights_hash"] = weights_hash(tmp)  # the masks belong to these weights (checked on load)
        save_masks(masks, tmp / MASKS_FILE, {"base_hash": record["base_hash"], "pattern": cfg.pattern,
                                             "weights_hash": record["weights_hash"]})
        write_record(tmp, record)
    log.info("pruned %s with %s (%s) -> %s: %.2f%% of prunable weights are zero", cfg.model, cfg.method,
             cfg.pattern, cfg.output, 100 * record["sparsity_achieved"])
    return Path(cfg.output)


def _eval_streams(cfg: EvaluateConfig) -> tuple[int, dict[str, torch.Tensor]]:
    """The window length and each data set's (1, N) token stream, from the config and tokenizer alone."""
    positions = max_positions(load_config(cfg.model))
    seqlen = cfg.seqlen or min(2048, positions or 2048)
    if positions is not None and seqlen > positions:
        raise ConfigError("--seqlen", f"{seqlen} exceeds the model's {positions} positions")
    tokenizer = load_tokenizer(resolve_source(cfg.model))
    streams = {}
    for name in [d.strip() for d in cfg.dataset.split(",") if d.strip() and d.strip() != "none"]:
        streams[name] = eval_tokens(name, tokenizer, seqlen, cfg.data_dir)  # (1, N)
        if streams[name].shape[1] < seqlen:
            n_tokens = streams[name].shape[1]
            raise ConfigError("--seqlen", f"{seqlen} is longer than the {name} stream ({n_tokens} tokens)")
    return seqlen, streams


def evaluate(
    model: str,
    adapter: str | None = None,
    dataset: str = "wikitext2",
    seqlen: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    tasks: str | None = None,
    limit: int | None = None,
    output: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Measures perplexity with the Wanda protocol, and zero-shot accuracy with lm-eval when asked.

    Args:
        model: Hub id, local directory, .gguf file, or smollm2-135m.
        adapter: a PEFT adapter directory to apply to the model.
        dataset: wikitext2, c4, ptb or a local file; several separated by commas (none: no perplexity).
        seqlen: window length (default min(2048, the model's positions)).
        max_windows: evaluate only the first K windows.
        batch_size: windows (or zero-shot requests) per forward pass.
        tasks: zero-shot tasks, comma-separated: lm-eval names (boolq,piqa) or local:PATH.jsonl.
        limit: score only the first N questions of each zero-shot task.
        output: JSON file to write the results to.
        dtype: float32, bfloat16 or float16.
        device: compute device.
        data_dir: local mirror of the named data sets.
        allow_pickle: allow pickle-based .bin weights (they can run code when loaded).
        trust_remote_code: allow code shipped with the model to run.

    Returns:
        {"model", "adapter", "results": [one dict per data set], "zeroshot": {task: {"acc", "acc_norm", "n"}}}
    """
    cfg = EvaluateConfig(**{k: v for k, v in locals().items()})
    watch = Stopwatch()
    with contextlib.ExitStack() as stack:
        zs_tasks = stack.enter_context(prepare_tasks(cfg.tasks, cfg.data_dir)) if cfg.tasks else None
        seqlen, streams = _eval_streams(cfg)  # tokenized before the weights load: bad data fails fast
        with watch("load"):
            lm, tokenizer, _ = load_model(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code,
                                          cfg.allow_pickle)
        if cfg.adapter:
            from sparseheal.heal.adapters import apply_adapter

            lm = apply_adapter(lm, cfg.adapter, cfg.model, cfg.allow_pickle)
        results = []
        with watch("perplexity"):
            for name, tokens in streams.items():
                result = perplexity(lm, tokens, name, seqlen, cfg.max_windows, cfg.batch_size)
                results.append(result.to_dict())
        report = {"model": cfg.model, "adapter": cfg.adapter, "results": results}
        if zs_tasks is not None:
            with watch("zeroshot"):
                report["zeroshot"] = run_zeroshot(lm, tokenizer, zs_tasks, cfg.limit, cfg.batch_size)
    report.update(timings=watch.times, peak_rss_mb=round(peak_rss_mb(), 1))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


def inspect(model: str, masks: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False) -> dict:
    """Reports per-layer and total sparsity, the N:M pattern, and mask violations.

    Args:
        model: a model directory (or any model source).
        masks: a masks file to verify against (default: the model's own sparsity_masks.safetensors).
        allow_pickle: allow pickle-based .bin weights (they can run code when loaded).
        trust_remote_code: allow code shipped with the model to run.

    Returns:
        A report dict; ``report["ok"]`` is False when any check fails.
    """
    cfg = InspectConfig(model, masks, allow_pickle, trust_remote_code)
    if cfg.masks is None:  # the directory's own masks must belong to its weights
        check_own_masks(resolve_source(cfg.model).path, "MODEL")
    lm, _, source = load_model(cfg.model, None, "cpu", cfg.trust_remote_code, cfg.allow_pickle)
    masks_file = cfg.masks or (Path(source.path) / MASKS_FILE)
    masks_file = masks_file if Path(masks_file).is_file() else None
    return inspect_model(lm, read_record(source.path), masks_file)


def heal(
    pruned_dir: str,
    output: str,
    method: str = "lora",
    data: str = "c4",
    data_dir: str | None = None,
    max_train_samples: int = 30000,
    max_eval_samples: int = 128,
    block_size: int = 1024,
    max_steps: int | None = None,
    epochs: float = 1.0,
    batch_size: int = 1,
    gradient_accumulation: int = 1,
    lr: float | None = None,
    weight_decay: float = 0.0,
    scheduler: str | None = None,
    warmup_steps: int = 0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    bf16: bool = False,
    logging_steps: int = 10,
    eval_steps: int | None = None,
    save_steps: int | None = None,
    save_total_limit: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    targets: str = "q_proj,v_proj",
    mask_aware: bool = False,
    merge: str = "none",
    train_embeddings: bool = False,
    train_norms: bool = True,
    distill: str | None = None,
    teacher: str | None = None,
    temperature: float = 2.0,
    distill_alpha: float = 0.5,
    teacher_dtype: str | None = None,
    teacher_device: str | None = None,
    self_sequences: int = 64,
    self_length: int = 256,
    self_temperature: float = 1.0,
    self_top_p: float = 0.95,
    self_seed: int = 0,
    self_batch_size: int = 64,
    max_bad_steps: int = 10,
    fsdp: bool = False,
) -> Path:
    """Heals a pruned model: LoRA adapters on the frozen sparse base, or full fine-tuning under the mask.

    Args:
        pruned_dir: the pruned model directory (weights + sparsity_masks.safetensors); never modified.
        output: directory to write: a PEFT adapter (lora) or a model (full), with sparseheal.json.
        method: lora, or full (alias dense).
        data: training text: c4, wikitext2, ptb, a local file or directory, or self (teacher-generated).
        data_dir: local mirror of the named data sets (default $SPARSEHEAL_DATA_DIR).
        max_train_samples: at most this many training blocks.
        max_eval_samples: blocks held out of the training text for the eval loss (0: none).
        block_size: tokens per training block.
        max_steps: optimizer steps (overrides epochs).
        epochs: passes over the training blocks.
        batch_size: blocks per device and step.
        gradient_accumulation: micro-batches per optimizer step.
        lr: peak learning rate (default 1e-4 for lora, 2e-5 for full).
        weight_decay: AdamW weight decay.
        scheduler: a transformers SchedulerType name (default linear for lora, cosine for full).
        warmup_steps: linear warm-up steps.
        max_grad_norm: gradient clipping norm (0 disables).
        seed: seed of adapter initialisation, dropout and data order.
        dtype: float32, bfloat16 or float16 for the model weights.
        device: compute device.
        allow_pickle: allow pickle-based .bin weights (they can run code when loaded).
        trust_remote_code: allow code shipped with the model to run.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        bf16: bfloat16 mixed precision (autocast).
        logging_steps: log the loss every N steps (to train_log.jsonl too).
        eval_steps: evaluate the held-out loss every N steps (default: only at the end).
        save_steps: write a checkpoint to OUTPUT.ckpt every N steps (kept for --resume).
        save_total_limit: checkpoints kept.
        resume: continue an interrupted run from the last checkpoint in OUTPUT.ckpt.
        overwrite: replace an existing output (and start over from scratch).
        rank: LoRA rank r.
        alpha: LoRA alpha (the update is scaled by alpha / r).
        dropout: LoRA dropout, in [0, 1).
        targets: module names to adapt, comma-separated (q_proj,v_proj), or all-linear.
        mask_aware: mask the LoRA update by the sparsity mask during training, so a masked merge is exact.
        merge: none, masked (pruned weights stay zero) or dense; the merged model goes to OUTPUT/merged.
        train_embeddings: full: train the embeddings and lm_head too.
        train_norms: full: train the normalisation layers.
        distill: distillation loss from the dense teacher: kl, squarehead, or kl,squarehead.
        teacher: the teacher model (default: the dense model named in the pruned record).
        temperature: KL distillation temperature (> 0).
        distill_alpha: weight of the distillation loss against the LM loss, in [0, 1].
        teacher_dtype: float32, bfloat16 or float16 for the teacher.
        teacher_device: device of the teacher.
        self_sequences: --data self: number of generated sequences.
        self_length: --data self: tokens per generated sequence.
        self_temperature: --data self: sampling temperature.
        self_top_p: --data self: nucleus sampling top-p.
        self_seed: --data self: sampling seed.
        self_batch_size: --data self: sequences generated at once (the teacher's KV cache grows with it).
        max_bad_steps: non-finite losses in a row tolerated (their updates dropped) before stopping.
        fsdp: shard the model over the ranks of a torchrun / accelerate launch (FSDP2; docs/distributed.md).

    Returns:
        The output directory.
    """
    from sparseheal.heal.pipeline import run_heal
    from sparseheal.heal.settings import HealConfig

    cfg = HealConfig(**{k: v for k, v in locals().items() if k in HealConfig.__dataclass_fields__})
    return run_heal(cfg)


def merge(
    adapter: str,
    output: str,
    mode: str = "masked",
    base: str | None = None,
    eval_data: str = "wikitext2",
    eval_seqlen: int | None = None,
    eval_windows: int = 4,
    dtype: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    data_dir: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merges a LoRA adapter into its sparse base and writes a normal model directory.

    Args:
        adapter: the adapter directory written by sparseheal heal --method lora.
        output: directory to write the merged model to.
        mode: masked (W + BA * mask: pruned weights stay exactly zero) or dense (plain merge, not sparse).
        base: the base model directory (default: the one named in the adapter's record; its hash must match).
        eval_data: data set whose first windows compare the adapter model with the merged model.
        eval_seqlen: window length of that comparison (default min(1024, the model's positions)).
        eval_windows: windows compared (0 skips the comparison).
        dtype: float32, bfloat16 or float16.
        device: compute device.
        overwrite: replace an existing output directory.
        data_dir: local mirror of the named data sets.
        allow_pickle: allow pickle-based .bin weights (they can run code when loaded).
        trust_remote_code: allow code shipped with the model to run.

    Returns:
        The output directory.
    """
    from sparseheal.heal.pipeline import run_merge
    from sparseheal.heal.settings import MergeConfig

    cfg = MergeConfig(**{k: v for k, v in locals().items() if k in MergeConfig.__dataclass_fields__})
    return run_merge(cfg)


def run(
    config: str | None = None,
    output: str | None = None,
    model: str | None = None,
    prune: list[str] | None = None,
    heal: list[str] | None = None,
    evaluate: list[str] | None = None,
    force: str | None = None,
) -> dict:
    """Runs a recipe: prune, heal, merge (when asked), evaluate every model with one protocol, report.

    Args:
        config: YAML recipe with sections model, prune, heal, evaluate and output (keys are the flags).
        output: the run directory (overrides the recipe's output); re-running resumes it.
        model: the dense model (overrides the recipe's model).
        prune: a prune setting as KEY=VALUE, repeatable (e.g. --prune sparsity=0.6).
        heal: a heal setting as KEY=VALUE, repeatable (e.g. --heal max-steps=50).
        evaluate: an evaluate setting as KEY=VALUE, repeatable (e.g. --evaluate tasks=boolq,piqa).
        force: redo this stage (prune, heal, merge or evaluate) and every stage that uses its output.

    Returns:
        The run record; "report" holds the report (its "path" is report.md).
    """
    from sparseheal.recipe import load_recipe, validate_recipe
    from sparseheal.report import write_report
    from sparseheal.runner import run_recipe

    recipe = load_recipe(config, output, model, {"prune": prune, "heal": heal, "evaluate": evaluate})
    validate_recipe(recipe)
    return run_recipe(recipe, force, after=write_report)


def report(run_dir: str) -> dict:
    """Regenerates report.md, report.json and the PNG plots of a run directory from its records.

    Args:
        run_dir: the output directory of sparseheal run.

    Returns:
        The report ("path" is report.md).
    """
    from sparseheal.report import write_report

    return write_report(run_dir)
