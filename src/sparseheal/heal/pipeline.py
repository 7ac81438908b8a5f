"""Orchestration of ``sparseheal heal`` from its settings groups.

``plan_heal``: the groups -> one :class:`HealJob` (the healer with its options, method defaults filled,
settings of other healers refused). ``preflight_heal``: every check that needs the file system or the
model's config, before any weights load. ``run_heal``: training blocks (or teacher-written text) -> the
pruned model and its masks -> the healer's trainable module (+ a distiller) -> the shared Trainer
set-up -> rank 0 writes the output atomically with its record (and a merged model when asked).
The maths lives in the healer, distillation and merge modules; this module only wires them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from sparseheal.checks import (
    MASKS_FILE,
    check_free_space,
    check_model_dir,
    check_not_an_input,
    check_output,
    check_pickle,
    check_weight_files,
)
from sparseheal.data import DataSettings, protected_inputs, training_split
from sparseheal.errors import ConfigError, StageError
from sparseheal.heal.adapters import check_sparse
from sparseheal.heal.base import HealMethodSettings, refuse_foreign_settings, refuse_unused_shared
from sparseheal.heal.checkpoints import RECIPE_FILE
from sparseheal.heal.distill import DistillSettings, build_distiller, check_teacher_config, resolve_teacher
from sparseheal.heal.fsdp import FsdpSettings, check_fsdp
from sparseheal.heal.job import HealJob
from sparseheal.heal.merge import HealMergeSettings
from sparseheal.heal.selfgen import SELF_DATA, SelfGenSettings, check_self_settings
from sparseheal.heal.training import TrainingSettings, budget_steps
from sparseheal.models import (
    ComputeSettings,
    TrustSettings,
    check_positions,
    default_device,
    default_dtype,
    load_config,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_source,
    weights_bytes,
)
from sparseheal.records import Stopwatch, read_record
from sparseheal.registry import HEALERS
from sparseheal.settings import Settings
from sparseheal.sparsity.store import check_masks_file, check_masks_hold, check_own_masks, weights_hash

__all__ = ["HealJob", "plan_heal", "settle_training", "preflight_heal", "check_heal_model", "run_heal"]

log = logging.getLogger(__name__)


def plan_heal(pruned_dir: str, output: str, overwrite: bool, built: dict[type, Settings]) -> HealJob:
    """Settles the heal of ``pruned_dir`` into ``output`` from the stage's built settings groups."""
    method = built[HealMethodSettings].method
    healer_cls = HEALERS.get(method)
    merge = built[HealMergeSettings].merge
    if merge != "none" and not healer_cls.can_merge:
        owners = ", ".join(name for name, h in HEALERS.items() if h.can_merge)
        raise ConfigError("--merge", f"applies to --method {owners} only (--method {method} writes "
                                     f"{healer_cls.writes})")
    for group in dict.fromkeys(h.settings for _, h in HEALERS.items() if h.settings is not None):
        if group is not healer_cls.settings:  # another healer's settings would be silently ignored
            owners = " or ".join(n for n, h in HEALERS.items() if h.settings is group)
            refuse_foreign_settings(built[group], owners, method, healer_cls.writes)
    shared = [built[TrainingSettings], built[DistillSettings], built[SelfGenSettings], built[FsdpSettings]]
    refuse_unused_shared(shared, healer_cls)  # a shared setting the healer does not read
    training = settle_training(built[TrainingSettings], healer_cls)
    compute = built[ComputeSettings]
    fsdp = built[FsdpSettings].fsdp
    check_fsdp(fsdp, merge, training.save_steps, training.resume, compute.device)
    recipe = {k: v for group in built.values() for k, v in group.values().items()}
    options = built[healer_cls.settings] if healer_cls.settings else None
    healer = healer_cls(options)
    healer.check_training(training)
    return HealJob(pruned_dir, output, overwrite, healer, training, merge,
                   built[DistillSettings], built[SelfGenSettings], fsdp, compute, built[TrustSettings],
                   built[DataSettings].data_dir, recipe)


def settle_training(training: TrainingSettings, healer_cls: type) -> TrainingSettings:
    """Fills the healer's defaults (``lr``, ``scheduler``) and turns ``--budget-tokens`` into the Trainer's
    ``max_steps`` (a healer of its own loop turns it into its own length)."""
    training = training.with_method_defaults(healer_cls.defaults)
    if training.budget_tokens and healer_cls.trainer_based:
        training.max_steps = budget_steps(training.budget_tokens, training.block_size, training.batch_size,
                                          training.gradient_accumulation)
    return training


def _check_checkpoints(job: HealJob, resumable: set[str]) -> None:
    ckpt = job.checkpoint_dir
    last = job.healer.latest_checkpoint(ckpt)
    resume = job.training.resume
    if resume and last is None:
        raise ConfigError("--resume", f"no checkpoint to resume from in {ckpt}; run without --resume "
                                      "(and with --save-steps N to write checkpoints)")
    if not resume and last is not None and not job.overwrite:
        raise ConfigError("--resume", f"{ckpt} holds checkpoints of an earlier run; pass --resume to "
                                      "continue it or --overwrite to start over")
    job.recipe["input_hash"] = weights_hash(job.pruned_dir)  # what the checkpoints are trained from
    if resume and (ckpt / RECIPE_FILE).is_file():  # a resumed run must train what the interrupted one did
        before = json.loads((ckpt / RECIPE_FILE).read_text())
        if before.get("input_hash") not in (None, job.recipe["input_hash"]):
            raise ConfigError("--resume", f"the checkpoints in {ckpt} were trained from weights "
                                          f"{before['input_hash']}, but {job.pruned_dir} now holds weights "
                                          f"{job.recipe['input_hash']} (pruned again?); pass --overwrite to "
                                          "start over")
        changed = sorted(k for k, v in job.recipe.items() if k in before and k not in resumable
                         and before[k] != v)
        if changed:
            listed = ", ".join(f"--{k.replace('_', '-')} ({before[k]!r} -> {job.recipe[k]!r})"
                               for k in changed)
            raise ConfigError("--resume", f"the interrupted run used other settings: {listed}; resume with "
                                          "the same ones or pass --overwrite to start over")


def check_heal_model(model: str, job: HealJob) -> None:
    """Checks the settings against the model's structure (its config and a weightless skeleton)."""
    if job.healer.trainer_based:  # the Trainer's blocks; a healer of its own loop checks its own lengths
        check_positions(load_config(model, job.trust.trust_remote_code), job.training.block_size,
                        "--block-size")
    job.healer.validate(model_skeleton(model, job.trust.trust_remote_code))
    if job.healer.trainer_based and job.training.data == SELF_DATA:
        check_self_settings(job.selfgen, load_config(model, job.trust.trust_remote_code))
    load_tokenizer(resolve_source(model), job.trust.trust_remote_code)  # a missing or broken one: refused now


def preflight_heal(job: HealJob, resumable: set[str]) -> None:
    """Every check of the heal that needs the file system or the model's config, before any weights
    load; ``resumable`` names the settings a resumed run may change."""
    check_model_dir(job.pruned_dir, "PRUNED_DIR")
    read_record(job.pruned_dir, "PRUNED_DIR")  # a damaged record: refused before any work
    check_pickle(job.pruned_dir, job.trust.allow_pickle)
    check_output(job.output, job.overwrite)
    _check_not_inputs(job)
    _check_checkpoints(job, resumable)
    kept = job.training.save_total_limit if job.training.save_steps else 0
    needed, what = job.healer.output_bytes(weights_bytes(job.pruned_dir) or 0, kept, job.merge != "none")
    check_free_space(job.output, needed, what)
    check_weight_files(job.pruned_dir, "PRUNED_DIR")
    check_heal_model(job.pruned_dir, job)
    masks_file = Path(job.pruned_dir) / MASKS_FILE
    if masks_file.is_file():  # readable, of the model's shapes, and written beside these weights
        check_masks_file(masks_file, job.pruned_dir, "PRUNED_DIR")
        check_own_masks(resolve_source(job.pruned_dir).path, "PRUNED_DIR")
        check_masks_hold(job.pruned_dir, masks_file, "PRUNED_DIR")
    if job.distill.losses:  # the teacher is found and fits, before data and weights load
        source, _ = resolve_teacher(job.distill.teacher, read_record(job.pruned_dir))
        check_teacher_config(source, load_config(job.pruned_dir), job.pruned_dir, job.distill.losses)


def _check_not_inputs(job: HealJob) -> None:
    """Neither the output nor its checkpoints may replace what the heal reads."""
    from sparseheal.models import input_path

    data = job.training.data if Path(job.training.data).expanduser().exists() else None
    inputs = [("PRUNED_DIR", job.pruned_dir), ("--teacher", input_path(job.distill.teacher)),
              ("--data", data), *protected_inputs(job.data_dir)]
    check_not_an_input(job.output, inputs)
    check_not_an_input(job.checkpoint_dir, inputs)


def run_heal(job: HealJob) -> Path:
    """Heals ``job.pruned_dir`` into ``job.output`` (see ``sparseheal.api.heal``); returns the output."""
    from sparseheal.heal import trainer  # the Trainer and what it loads (datasets), only for a heal
    from sparseheal.heal.adapters import model_masks
    from sparseheal.heal.output import write_heal_output

    if not job.healer.trainer_based:  # a healer with a loop of its own (blockwise)
        return job.healer.run(job)
    watch = Stopwatch()
    source = resolve_source(job.pruned_dir)
    pruned_record = read_record(source.path)
    with watch("data"):
        train_blocks, eval_blocks, data_record = _training_data(job, source, pruned_record)
    with watch("load"):
        lm, tokenizer = _load_student(job, source)
    masks, mask_source = model_masks(lm, source.path, "PRUNED_DIR", job.healer.packed_masks and not job.fsdp)
    if job.fsdp:  # masks read off a sharded model's zeros (no masks file) are gathered whole
        from sparseheal.heal.fsdp import full_masks

        masks = full_masks(masks)
    if job.healer.requires_sparsity:
        check_sparse(job.pruned_dir, masks)
    student = job.healer.prepare(lm, masks, job.training.seed, job.training.gradient_checkpointing)
    distiller = build_distiller(job.distill, student, job.pruned_dir, pruned_record, checked=True)
    with watch("train"):
        summary = trainer.train(student, train_blocks, eval_blocks, job.training, job.compute.device,
                                job.checkpoint_dir, distiller=distiller, callbacks=job.healer.callbacks(),
                                recipe=job.recipe)
    if 0 < summary["steps_run"] <= summary["bad_steps"]:  # nothing learnt: the output would be the input
        if not job.training.resume:  # its checkpoints hold nothing either
            shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
        raise StageError("--lr", f"every one of the {summary['steps_run']} steps had a non-finite loss and "
                                 "was dropped; nothing was written: lower --lr or use float32")
    student = _writer_model(student, job.fsdp)
    if student is None:  # another rank writes
        return Path(job.output)
    context = {"source": source, "pruned_record": pruned_record, "masks": masks, "mask_source": mask_source,
               "eval_blocks": eval_blocks, "data_record": data_record, "summary": summary}
    write_heal_output(job, student, tokenizer, context, watch)
    if not job.training.save_steps:
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    log.info("healed %s with %s -> %s", job.pruned_dir, job.healer.name, job.output)
    return Path(job.output)


def _training_data(job: HealJob, source, pruned_record: dict | None) -> tuple[Any, Any, dict]:
    """Training and held-out blocks (N, T), and what the record says about them."""
    t = job.training
    tokenizer = load_tokenizer(source, job.trust.trust_remote_code)
    record: dict = {"source": t.data, "block_size": t.block_size}
    if t.data == SELF_DATA:  # text written by the dense teacher (heal/selfgen.py), cached
        from sparseheal.heal.selfgen import self_generated_tokens, self_training_blocks

        device = job.distill.teacher_device or job.compute.device or default_device()
        dtype = job.distill.teacher_dtype or job.compute.dtype or default_dtype(device)
        tokens, self_record = self_generated_tokens(job.selfgen, job.distill.teacher, dtype, device,
                                                    pruned_record, tokenizer)
        train_blocks, eval_blocks, split = self_training_blocks(tokens, t.block_size, t.max_train_samples,
                                                                t.eval_limit)
        return train_blocks, eval_blocks, {**record, **self_record, **split}
    train_blocks, eval_blocks = training_split(t.data, tokenizer, t.block_size, t.block_limit,
                                               t.eval_limit, job.data_dir)
    record.update(train_blocks=len(train_blocks), eval_blocks=0 if eval_blocks is None else len(eval_blocks))
    return train_blocks, eval_blocks, record


def _load_student(job: HealJob, source) -> tuple[torch.nn.Module, Any]:
    """The pruned model: whole on ``--device``, or each rank's shard under ``--fsdp``."""
    if job.fsdp:  # each rank loads and keeps only its shard (heal/fsdp.py)
        from sparseheal.heal.fsdp import load_sharded

        return load_sharded(job.pruned_dir, job.compute.dtype), load_tokenizer(source)
    lm, tokenizer, _ = load_model(job.pruned_dir, job.compute.dtype, job.compute.device,
                                  job.trust.trust_remote_code, job.trust.allow_pickle, flag="PRUNED_DIR")
    return lm, tokenizer


def _writer_model(student: torch.nn.Module, fsdp: bool) -> torch.nn.Module | None:
    """The model rank 0 writes; None on the other ranks of a distributed run."""
    if fsdp:  # every rank takes part in gathering the shards; rank 0 gets the full model
        from sparseheal.heal.fsdp import unshard_for_save

        return unshard_for_save(student)
    return student if _is_main_process(student) else None


def _is_main_process(model: torch.nn.Module) -> bool:
    """True on rank 0 (or without torch.distributed); every rank logs a digest of its trained weights,
    so a data-parallel run can show that all ranks ended identical."""
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        digest = hashlib.sha256()
        for name, param in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        log.info("rank %d: trained weights sha256 %s", rank, digest.hexdigest()[:16])
    return rank == 0
