"""Fully sharded healing (``--fsdp``): FSDP2 through transformers' own distributed loader.

With ``--fsdp`` under ``torchrun`` (or ``accelerate launch``) the pruned model is loaded with
``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=WORLD_SIZE))``: transformers
applies torch's ``fully_shard`` (FSDP2) to each decoder layer and to the root as it loads, so every rank
reads and holds only its shard, ``W[r]`` = rows ``r * ceil(out / R) ...`` of each ``(out, in)`` weight
(``Shard(0)`` of a DTensor). The HF Trainer recognises such a model, skips its DDP wrap and leaves
gradient reduction to FSDP2 (reduce-scatter of ``g``, so each rank ends with the gradient rows of its
shard). Nothing here is distributed machinery of its own:

- the sparsity mask is laid out like its weight with ``distribute_tensor`` (same mesh, same
  placements, local slicing only) and enforced on the local shard (:class:`~sparseheal.heal.full.MaskKeeper`);
- the gradient is masked in a post-accumulate-grad hook of the sharded parameter, which FSDP2 calls
  after its reduce-scatter: ``g_r' = g_r * m_r`` before clipping and the optimizer step;
- saving gathers the full state dict to rank 0 (``torch.distributed.checkpoint.state_dict``) and
  writes a normal HF directory from a plain, unsharded model.

accelerate's own FSDP plugin (``accelerate launch --use_fsdp``, ``ACCELERATE_USE_FSDP=true``) is not
used: accelerate 1.15 enables it only for GPU-like device types (on CPU it silently trains with DDP),
and it shards the model inside ``Trainer.train``, after the mask keeper has bound to the parameters.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from sparseheal.errors import ConfigError
from sparseheal.settings import Settings, setting

__all__ = [
    "FsdpSettings",
    "world_size",
    "check_fsdp",
    "is_sharded",
    "local",
    "shard_like",
    "full_masks",
    "load_sharded",
    "unshard_for_save",
]

log = logging.getLogger(__name__)

_LAUNCH = "torchrun --nproc_per_node N -m sparseheal heal ... --fsdp"


def world_size() -> int:
    """Processes of this launch (``WORLD_SIZE`` set by torchrun / accelerate launch; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _accelerate_fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


@dataclass
class FsdpSettings(Settings):
    """Fully sharded healing over the ranks of a multi-process launch."""

    fsdp: bool = setting(False, "shard the model over the ranks of a torchrun / accelerate launch (FSDP2; "
                                "docs/distributed.md).")


def check_fsdp(fsdp: bool, merge: str, save_steps: int | None, resume: bool, device: str | None) -> None:
    """Refuses the combinations that fully sharded healing does not support (before any heavy work).

    Raises:
        ConfigError: accelerate's FSDP plugin was requested; ``--fsdp`` without a multi-process
            launch; ``--fsdp`` with ``--merge`` (merging needs the full weights: run
            ``sparseheal merge`` on the adapter afterwards), with ``--save-steps`` / ``--resume``
            (transformers 5.24 refuses optimizer checkpoints of a model sharded at load time), or with
            ``--device`` (each rank uses its own device: ``cuda:LOCAL_RANK``, or the CPU without a GPU).
    """
    if _accelerate_fsdp_requested():
        raise ConfigError("--fsdp", "accelerate's FSDP plugin (accelerate launch --use_fsdp, "
                          "ACCELERATE_USE_FSDP=true) is not supported: launch without it and pass --fsdp "
                          f"({_LAUNCH})")
    if not fsdp:
        return
    if world_size() < 2:
        raise ConfigError("--fsdp", f"needs two or more processes; launch with {_LAUNCH}")
    if merge != "none":
        raise ConfigError("--merge", "cannot merge under --fsdp (the base weights are sharded); heal with "
                          "--merge none and run sparseheal merge on the adapter afterwards")
    if save_steps or resume:  # the Trainer refuses optimizer checkpoints of such a model
        raise ConfigError("--save-steps" if save_steps else "--resume",
                          "checkpoints and --resume are not available with --fsdp (transformers cannot "
                          "checkpoint the optimizer of a model sharded at load time); leave them unset")
    if device is not None:
        raise ConfigError("--device", "leave it unset with --fsdp: each rank uses cuda:LOCAL_RANK (the CPU "
                          "without a GPU)")


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter or gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of ``tensor``: the local shard of a DTensor (a view), else ``tensor`` itself.

    Call it under ``torch.no_grad()`` to write into the shard in place.
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mask`` (the full (out, in) bool tensor, the same on every rank) cut like ``weight``'s local shard.

    For a DTensor weight this is ``distribute_tensor`` on the weight's mesh and placements without
    communication (each rank slices its own part); for a plain weight it is the mask on its device.
    """
    mask = mask.to(weight.device)
    if not is_sharded(weight):
        return mask
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None).to_local()


def full_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks as full CPU tensors on every rank (a sharded mask is all-gathered: call it on every rank)."""
    return {name: (mask.full_tensor() if is_sharded(mask) else mask).cpu() for name, mask in masks.items()}


def load_sharded(model_dir: str, dtype: str | None, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> nn.Module:
    """Loads ``model_dir`` sharded over all ranks of this launch (FSDP2, one unit per decoder layer)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from sparseheal.models import torch_dtype as to_torch_dtype

    torch_dtype = to_torch_dtype(dtype, None)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, use_safetensors=None if allow_pickle else True,
        trust_remote_code=trust_remote_code, distributed_config=DistributedConfig(fsdp_size=world_size()),
    )
    model.config.use_cache = False
    log.info("loaded %s sharded over %d ranks (FSDP2)", model_dir, world_size())
    return model.eval()


def unshard_for_save(model: nn.Module) -> nn.Module | None:
    """What rank 0 writes after sharded training; ``None`` on the other ranks (call it on every rank).

    A PEFT model returns itself on rank 0 (its adapters are replicated plain tensors, the sharded base
    is not saved). Otherwise the full state dict is gathered to rank 0 (a collective) and loaded into a
    plain copy of the model built on the meta device, so rank 0 holds the weights once.
    """
    rank = int(os.environ.get("RANK", "0"))
    if hasattr(model, "peft_config"):
        if rank != 0:
            return None
        # PEFT 0.21 takes any ``_tp_size`` (FSDP-only loading sets 1) for tensor parallelism and would
        # all-gather the whole sharded base while saving the adapter, a collective rank 0 cannot do alone.
        model.get_base_model()._tp_size = None
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # full tensors on rank 0, {} elsewhere
    if rank != 0:
        return None
    return _plain_copy(model, state)


def _plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.distributed_config = None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state
        owner, _, attr = name.rpartition(".")
        module = plain.get_submodule(owner)
        if module._buffers.get(attr) is not None and module._buffers[attr].is_meta:
            module._buffers[attr] = local(buffer).detach().cpu()
    plain.tie_weights()
    plain.config.use_cache = False
    return plain.eval()
