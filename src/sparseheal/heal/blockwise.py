"""Block-wise reconstruction healing (``--method blockwise``): one decoder layer at a time.

Following EBFT (Guo et al. 2024, https://arxiv.org/abs/2402.12419), each sparse decoder layer l learns
to reproduce its dense twin's output, layer after layer, on calibration samples:

    min_{W_l ⊙ M_l}  mean_b || f_l(X̂_l^b; W_l ⊙ M_l) - f_l^dense(X_l^b) ||²

where ``X_l`` are the dense model's own hidden states entering layer l and ``X̂_l`` the sparse model's,
produced by the layers already healed before it (``X̂_{l+1} = f_l(X̂_l)`` after training). Only that
layer's weights train (AdamW with the ``--lr``/``--scheduler``/``--warmup-steps``/``--weight-decay``/
``--max-grad-norm`` of the training settings, ``--epochs`` passes over the samples in batches of
``--batch-size``, a fresh optimizer and schedule per layer); every pruned weight stays exactly +0.0 by the
full healer's mechanism (masked gradients, re-masked after each step). Both activation streams live on
the host; the student layer and its dense twin, built from the teacher's safetensors files one layer at a
time, are the only layers on the compute device, so the dense model is never resident beside the sparse
one.

Memory, for L layers of P parameters, N samples of T tokens, width d (float32): host ≈ the sparse model
(4 L P) + two streams (2 · 4 N T d) + one target batch; device ≈ two layers (2 · 4 P) + AdamW state of
one layer (12 P) + one batch's activations. Full fine-tuning needs ≈ 17 bytes per trainable parameter of
the whole model at once.

After each layer its weights go to ``OUTPUT.ckpt/layer-I.safetensors``; ``--resume`` loads the finished
layers, replays their forward passes (deterministic on the CPU) and continues at the first unfinished
layer, so the result is bit-identical to an uninterrupted run. The output is a pruned-model directory
(weights, masks, record naming the dense model), so any healer can run after it.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from sparseheal.checks import non_negative, positive, seed
from sparseheal.errors import ConfigError
from sparseheal.heal.base import Healer
from sparseheal.heal.blockwise_io import (
    PROGRESS_FILE,
    load_file_state,
    load_progress,
    save_layer,
    write_blockwise_output,
)
from sparseheal.heal.checkpoints import RECIPE_FILE
from sparseheal.heal.recon import (
    GRANULARITIES,
    INPUT_MODES,
    LOSSES,
    Call,
    FitSchedule,
    NormedUnit,
    check_holdout,
    feeding_norms,
    fit_unit,
    layer_units,
    tap_units,
    trained_names,
)
from sparseheal.heal.training import budget_epochs
from sparseheal.models import checkpoint_keys, decoder_layers, read_as_loaded
from sparseheal.registry import HEALERS
from sparseheal.settings import Settings, setting
from sparseheal.sources import read_tensor, weight_files

__all__ = ["BlockwiseSettings", "BlockwiseHealer", "layer_loss", "propagate", "DenseLayers",
           "run_blockwise", "to_device"]

log = logging.getLogger(__name__)

LOSS_BATCHES = 8  # a layer's MSE before and after healing is measured on its first 8 calibration batches


@dataclass
class BlockwiseSettings(Settings):
    """The units, inputs, held-out slice and calibration draw of ``--method blockwise`` (default draw:
    the pruned model's own)."""

    granularity: str = setting("layer", "blockwise: reconstruct each decoder layer whole (layer), or its "
                                        "attention, MLP and expert groups one by one (submodule).",
                               choices=GRANULARITIES)
    recon_inputs: str = setting("sparse", "blockwise: train each unit on what the sparse model feeds it "
                                          "(sparse), what the dense model feeds it (dense), or either at "
                                          "random per step (mix).", choices=INPUT_MODES)
    recon_params: str = setting("all", "blockwise: what each unit trains: every parameter (all), or only its "
                                       "norms and biases, PERP-style (norms-biases).",
                                choices=("all", "norms-biases"))
    recon_loss: str = setting("mse", "blockwise: each unit's loss: mean squared error (mse), or each token's "
                                     "squared error over its target's squared norm (relative).",
                              choices=LOSSES)
    holdout: int = setting(0, "blockwise: calibration samples held out (the last ones) to measure each "
                              "unit's reconstruction loss after every epoch.", check=non_negative("a count"))
    early_stop: int = setting(0, "blockwise: stop a unit after this many held-out checks without a new best "
                                 "and keep its best weights (0: off; needs --holdout).",
                              check=non_negative("a count"))

    calibration_data: str | None = setting(None, "blockwise: calibration text (default: the pruned model's).")
    nsamples: int | None = setting(None, "blockwise: calibration samples (default: the pruned model's).",
                                   check=positive)
    seqlen: int | None = setting(None, "blockwise: tokens per sample (default: the pruned model's).",
                                 check=positive)
    calibration_seed: int | None = setting(None, "blockwise: seed of the calibration draw (default: the "
                                                 "pruned model's).", check=seed)

    def validate(self) -> None:
        if self.early_stop and not self.holdout:
            raise ConfigError("--early-stop", "early stopping watches a held-out slice: give --holdout N "
                                              "(calibration samples to hold out) too")


def layer_loss(layer: nn.Module, inputs: list, targets: list[torch.Tensor], device: torch.device) -> float:
    """Mean over batches of MSE(f(X̂_b), Y_b); ``inputs`` holds (hidden (B, T, d), kwargs) pairs."""
    with torch.no_grad():
        losses = [F.mse_loss(_forward(layer, x, kw, device).float(), y.to(device).float())
                  for (x, kw), y in zip(inputs, targets, strict=True)]
    return float(torch.stack(losses).mean())


def propagate(layer: nn.Module, stream: list, targets: list[torch.Tensor] | None,
              device: torch.device, first: int | None = None) -> float | None:
    """Replaces each batch's hidden states (B, T, d) by the layer's outputs, in place (one copy of the
    stream is ever held); with ``targets``, returns the mean over batches (the ``first`` ones when given)
    of MSE(outputs, targets), the same number as :func:`layer_loss` from the same forward pass."""
    losses = []
    with torch.no_grad():
        for (hidden, kwargs), target in zip(stream, targets or [None] * len(stream), strict=True):
            out = _forward(layer, hidden, kwargs, device)  # (B, T, d)
            if target is not None:
                losses.append(F.mse_loss(out.float(), target.to(device).float()))
            hidden.copy_(out)
    return float(torch.stack(losses[:first]).mean()) if losses else None


def _forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor:
    out = layer(hidden.to(device), **{k: _to(v, device) for k, v in kwargs.items()})
    return out[0] if isinstance(out, tuple) else out  # (B, T, d)


def _to(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


class DenseLayers:
    """Builds the dense twin of a decoder layer from the teacher's files, one layer at a time.

    The teacher's checkpoint may name and lay out tensors otherwise than the model holds them in memory
    (experts saved one by one, fused in memory): each layer's tensors are read through transformers'
    own conversion (:func:`~sparseheal.models.read_as_loaded`).

    Args:
        model_dir: the teacher's directory (safetensors weights, same architecture as the student).
        prefix: the qualified name of the decoder stack (``model.layers``).
        model: the student model (its conversions name the checkpoint's tensors).
    """

    def __init__(self, model_dir: str, prefix: str, model: nn.Module) -> None:
        self.files = weight_files(model_dir)  # tensor name -> file, from the headers
        self.prefix = prefix
        self.model = model

    def _shapes(self, layer: nn.Module, index: int) -> dict[str, tuple[int, ...]]:
        return {f"{self.prefix}.{index}.{n}": tuple(p.shape) for n, p in layer.state_dict().items()}

    def check(self, student_layers: nn.ModuleList) -> None:
        """Refuses a teacher whose decoder layers differ in count or shape (headers only)."""
        for index, layer in enumerate(student_layers):
            for key, shape in checkpoint_keys(self.model, self._shapes(layer, index)).items():
                if key not in self.files:
                    raise ConfigError("--teacher", f"the teacher has no {key}: its layers differ from the "
                                                   "student's (another depth or architecture)")
                with safe_open(str(self.files[key]), framework="pt") as fh:
                    found = tuple(fh.get_slice(key).get_shape())
                if found != shape:
                    raise ConfigError("--teacher", f"the teacher's {key} has shape {found}, the student's "
                                                   f"{shape}")

    def build(self, student_layer: nn.Module, index: int, device: torch.device) -> nn.Module:
        """A copy of ``student_layer`` holding the teacher's weights for layer ``index``, on ``device``."""
        twin = copy.deepcopy(student_layer).to(device)
        read = functools.partial(read_tensor, self.files)
        state = read_as_loaded(self.model, self._shapes(twin, index), read)
        start = len(f"{self.prefix}.{index}.")
        twin.load_state_dict({key[start:]: value for key, value in state.items()})
        return twin.eval().requires_grad_(False)


@HEALERS.register("blockwise")
class BlockwiseHealer(Healer):
    """Trains each sparse decoder layer to reproduce its dense twin (see the module docstring)."""

    settings = BlockwiseSettings
    uses = frozenset({"lr", "weight_decay", "scheduler", "warmup_steps", "max_grad_norm", "seed", "epochs",
                      "budget_tokens", "batch_size", "resume", "teacher"})
    unused_note = "trains --epochs per layer on calibration samples, to match the teacher's layers"
    defaults = {"lr": 1e-3, "scheduler": "cosine"}  # at 70% on smollm2-135m: 80.5% of the gap, 2e-4 64.6%
    requires_sparsity = True
    trainer_based = False
    writes = "a pruned model directory with reconstructed layers"
    options: BlockwiseSettings

    def output_bytes(self, weights: int, checkpoints: int, merged: bool) -> tuple[int, str]:
        return 2 * weights, "the model's weights, plus the finished layers' checkpoint"

    def validate(self, skeleton: nn.Module) -> None:
        """Refuses a granularity the model's layers cannot give (a weightless skeleton is enough)."""
        _, layers = decoder_layers(skeleton)
        for index, layer in enumerate(layers):
            try:
                layer_units(layer, self.options.granularity)
            except ValueError as err:
                raise ConfigError("--granularity", f"layer {index} of this model cannot be split into "
                                                   f"submodules: {err}; use --granularity layer") from None
            if self.options.recon_params == "norms-biases" and not trained_names(layer, "norms-biases"):
                raise ConfigError("--recon-params", f"layer {index} has no norm or bias to train; use "
                                                    "--recon-params all")

    def latest_checkpoint(self, checkpoint_dir: Path) -> Path | None:
        path = Path(checkpoint_dir) / PROGRESS_FILE
        return path if path.is_file() else None

    def run(self, job: Any) -> Path:
        """Heals ``job.pruned_dir`` into ``job.output`` layer by layer; returns the output."""
        return run_blockwise(job, self)

    @classmethod
    def summary(cls, record: dict) -> str:
        layers = record["blockwise"]["layers"]
        closer = sum(x["loss_after"] < x["loss_before"] for x in layers)
        how = record["blockwise"].get("granularity", "layer")
        return (f"healed {record.get('pruned_from')} with blockwise ({how}): {len(layers)} layers, {closer} "
                f"of them closer to their dense twin (MSE, last layer {layers[-1]['loss_before']:.4g} -> "
                f"{layers[-1]['loss_after']:.4g})")


def _calibration(job: Any, options: BlockwiseSettings, pruned_record: dict,
                 tokenizer) -> tuple[torch.Tensor, dict]:
    """The (N, T) calibration tokens: the pruned model's own draw unless the settings say otherwise."""
    from sparseheal.data import calibration_samples, load_documents

    recorded = (pruned_record or {}).get("calibration") or {}
    spec = {"source": options.calibration_data or recorded.get("source", "c4"),
            "nsamples": options.nsamples or recorded.get("nsamples", 128),
            "seqlen": options.seqlen or recorded.get("seqlen", 2048),
            "seed": recorded.get("seed", 0) if options.calibration_seed is None else options.calibration_seed}
    docs = load_documents(spec["source"], "train", job.data_dir, "--calibration-data")
    return calibration_samples(docs, tokenizer, spec["nsamples"], spec["seqlen"], spec["seed"]), spec


def _layer_masks(masks: dict, prefix: str) -> dict[str, torch.Tensor]:
    from sparseheal.sparsity.masks import as_bool

    return {name[len(prefix):]: as_bool(mask) for name, mask in masks.items() if name.startswith(prefix)}


def to_device(layer: nn.Module, device: torch.device) -> nn.Module:
    """Moves a layer to the compute device (one place, so that tests can count the layers there)."""
    return layer.to(device)


def run_blockwise(job: Any, healer: BlockwiseHealer) -> Path:
    """The block-wise heal: calibration stream -> per layer, dense target, fit, next stream -> output."""
    from sparseheal.heal.adapters import check_sparse, model_masks
    from sparseheal.heal.distill import resolve_teacher
    from sparseheal.models import default_device, load_model, resolve_source
    from sparseheal.records import Stopwatch, read_record
    from sparseheal.sparsity.capture import capture_layer_inputs

    watch, source = Stopwatch(), resolve_source(job.pruned_dir)
    pruned_record = read_record(source.path) or {}
    teacher, _ = resolve_teacher(job.distill.teacher, pruned_record)
    recorded = pruned_record.get("calibration") or {}
    nsamples = healer.options.nsamples or recorded.get("nsamples", 128)
    check_holdout(healer.options.holdout, nsamples, job.training.batch_size)
    if job.training.budget_tokens:  # epochs over the training samples that see about that many tokens
        job.training.epochs = budget_epochs(job.training.budget_tokens, nsamples - healer.options.holdout,
                                            healer.options.seqlen or recorded.get("seqlen", 2048),
                                            job.training.batch_size)
    lm, tokenizer, _ = load_model(job.pruned_dir, job.compute.dtype, "cpu", job.trust.trust_remote_code,
                                  job.trust.allow_pickle, flag="PRUNED_DIR")
    prefix, layers = decoder_layers(lm)
    dense = DenseLayers(teacher.path, prefix, lm)
    dense.check(layers)
    masks, mask_source = model_masks(lm, source.path, "PRUNED_DIR", packed=True)  # unpacked per layer
    check_sparse(job.pruned_dir, masks)
    device = torch.device(job.compute.device or default_device())
    tokens, spec = _calibration(job, healer.options, pruned_record, tokenizer)
    sparse_stream = capture_layer_inputs(lm, layers, tokens, job.training.batch_size, torch.device("cpu"))
    dense_stream = [(x.clone(), kw) for x, kw in sparse_stream]  # the embeddings are the dense model's
    done = load_progress(job.checkpoint_dir) if job.training.resume else []
    if not job.training.resume:  # a fresh start: what a later --resume is checked against
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
        job.checkpoint_dir.mkdir(parents=True)
        (job.checkpoint_dir / RECIPE_FILE).write_text(json.dumps(job.recipe, indent=2) + "\n")
    streams = {"dense": dense_stream, "sparse": sparse_stream}
    with watch("layers"):
        results = [_heal_layer(healer, job, layer, i, dense, streams, masks, f"{prefix}.{i}.", done, device)
                   for i, layer in enumerate(layers)]
    del streams, dense_stream, sparse_stream  # not held while the output is written
    context = {"source": source, "pruned_record": pruned_record, "masks": masks, "mask_source": mask_source,
               "teacher": teacher, "calibration": spec, "layers": results}
    out = write_blockwise_output(job, lm, tokenizer, context, watch)
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)  # the finished layers are in the output now
    return out


def _heal_layer(healer: BlockwiseHealer, job: Any, layer: nn.Module, index: int, dense: DenseLayers,
                streams: dict, masks: dict, prefix: str, done: list[dict], device: torch.device) -> dict:
    """Layer ``index``: its dense targets, then the fit of each unit in turn (or the layer's finished
    weights), then the next inputs.

    Both streams are rewritten in place: the dense stream becomes this layer's targets (and the next
    layer's dense inputs), the sparse stream the healed layer's outputs. Each batch goes with the
    keyword arguments the model's forward gives this layer."""
    from sparseheal.sparsity.capture import at_layer

    streams = {name: at_layer(stream, index) for name, stream in streams.items()}
    twin = dense.build(layer, index, device)
    # a layer finished before an interruption only advances the dense stream: no unit is recorded
    units = layer_units(layer, healer.options.granularity) if index >= len(done) else [""]
    norms = feeding_norms(twin, units, streams["dense"][0], device) if units != [""] else {}
    twin_calls = _twin_pass(twin, units, streams["dense"], healer.options.recon_inputs != "sparse", device,
                            norms)
    del twin
    targets = [y for y, _ in streams["dense"]]  # (B, T, d) each: the dense twin's outputs
    to_device(layer, device)
    if index < len(done):  # finished before an interruption: its healed weights, as trained
        layer.load_state_dict(load_file_state(job.checkpoint_dir / f"layer-{index}.safetensors"))
        propagate(layer, streams["sparse"], None, device)
        result = done[index]
    else:
        probe = min(LOSS_BATCHES, len(targets))  # the batches the MSE before and after is measured on
        result = {"index": index, "loss_batches": probe,
                  "loss_before": layer_loss(layer, streams["sparse"][:probe], targets[:probe], device)}
        result["units"] = [_fit_one(healer, job, layer, index, number, unit, twin_calls[unit], streams,
                                    _layer_masks(masks, prefix), device, norms.get(unit))
                           for number, unit in enumerate(twin_calls)]
        result["steps"] = sum(u["steps"] for u in result["units"])
        # the healed layer's outputs feed the next sparse layer; their MSE is its loss after training
        result["loss_after"] = propagate(layer, streams["sparse"], targets, device, first=probe)
        save_layer(layer, job.checkpoint_dir, index, result, job.recipe)
    layer.to("cpu")
    log.info("blockwise layer %d: MSE %.6g -> %.6g", index, result["loss_before"], result["loss_after"])
    return result


def _twin_pass(twin: nn.Module, units: list[str], stream: list, dense_inputs: bool,
               device: torch.device, norms: dict) -> dict[str, list[Call]]:
    """Advances the dense stream through the twin; returns, per unit in call order, what the dense
    model feeds it (kept only when training reads it) and its output (the unit's targets)."""
    if units == [""]:  # the layer itself: its inputs are the stream's, its outputs the stream after it
        calls = [Call((hidden.clone() if dense_inputs else None,), kwargs, hidden)
                 for hidden, kwargs in stream]
        propagate(twin, stream, None, device)
        return {"": calls}
    return tap_units(twin, units, stream, device, advance=True, norms=norms)


def _fit_one(healer: BlockwiseHealer, job: Any, layer: nn.Module, index: int, number: int, unit: str,
             twin_calls: list[Call], streams: dict, masks: dict, device: torch.device,
             norm: tuple[str, int | str] | None) -> dict:
    """Fits one unit of a layer (with the norm that feeds it, if any) to the dense twin's, on the inputs
    ``--recon-inputs`` names."""
    options, training = healer.options, job.training
    if unit:  # what the sparse layer, healed up to this unit, feeds it
        fed = {unit: norm} if norm else None
        sparse_calls = tap_units(layer, [unit], streams["sparse"], device, stop=True, norms=fed)[unit]
    else:
        sparse_calls = [Call((hidden,), kwargs) for hidden, kwargs in streams["sparse"]]
    targets = [c.output for c in twin_calls]
    choices = {"sparse": lambda s, d: [s], "dense": lambda s, d: [d], "mix": lambda s, d: [s, d]}
    pairs = [choices[options.recon_inputs](s, d) for s, d in zip(sparse_calls, twin_calls, strict=True)]
    n = len(pairs) - options.holdout // training.batch_size  # the last batches are held out
    schedule = FitSchedule(training.lr, training.weight_decay, training.scheduler, training.warmup_steps,
                           training.max_grad_norm, training.epochs, options.early_stop, options.recon_loss)
    inside = {key[len(unit) + 1:] if unit else key: m for key, m in masks.items()
              if not unit or key.startswith(unit + ".")}
    module = layer.get_submodule(unit)
    if norm:  # the unit's own inputs come from its norm, which trains with it
        module = NormedUnit(layer.get_submodule(norm[0]), module, norm[1])
        inside = {f"unit.{key}": m for key, m in inside.items()}
    result = fit_unit(module, inside, pairs[:n], targets[:n],
                      list(zip(sparse_calls[n:], targets[n:], strict=True)), schedule,
                      training.seed * 1_000_003 + index + 7_919 * number, device,
                      f"blockwise: layer {index}{' ' + unit if unit else ''}",
                      trained_names(module, options.recon_params))
    return {"unit": unit or "layer", "norm": norm[0] if norm else None, **result}
