"""Reading and writing ``sparsity_masks.safetensors`` (one bit-packed keep-mask per pruned linear)."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sparseheal.checks import MASKS_FILE, check_safetensors
from sparseheal.errors import ConfigError
from sparseheal.layout import masked_weight
from sparseheal.models import hash_weights, model_skeleton, read_as_loaded
from sparseheal.records import read_record
from sparseheal.sources import read_tensor, weight_files
from sparseheal.sparsity.masks import PackedMask, pack_mask, unpack_mask
from sparseheal.sparsity.patterns import Pattern, parse

__all__ = [
    "save_masks",
    "load_masks",
    "masks_meta",
    "masks_from_zeros",
    "check_masks_match",
    "check_masks_file",
    "weights_hash",
    "stamp_masks",
    "check_masks_belong",
    "check_own_masks",
    "check_masks_hold",
    "ORDER_PREFIX",
    "load_input_orders",
    "carry_input_orders",
    "module_rules",
    "export_masks",
]

log = logging.getLogger(__name__)

_FORMAT = "packbits-msb-v1"
ORDER_PREFIX = "input_order/"  # + mask key: the input order its N:M groups run along (int32)
_LAYOUT_KEYS = ("layout_version", "modules", "plan")  # metadata that describes the masks, not the run


def save_masks(
    masks: dict[str, torch.Tensor | PackedMask], path: str | os.PathLike, meta: dict | None = None,
    input_orders: dict[str, torch.Tensor] | None = None,
) -> None:
    """Saves keep-masks (bool tensors or PackedMask) bit-packed; shapes and ``meta`` go into the metadata,
    and each permuted input order (``(in,)`` or ``(E, in)``) as an int32 tensor ``input_order/KEY``."""
    tensors = {name: m.bits if isinstance(m, PackedMask) else pack_mask(m.cpu()) for name, m in masks.items()}
    tensors.update(_order_tensors(input_orders or {}))
    header = {
        "format": _FORMAT,
        "shapes": json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
        **{k: str(v) for k, v in (meta or {}).items()},
    }
    save_file(tensors, str(path), metadata=header)


def masks_meta(path: str | os.PathLike, flag: str = "--masks") -> dict[str, str]:
    """The metadata of a masks file (its header only; no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (OSError, ValueError, SafetensorError) as err:
        raise ConfigError(flag, f"{path} is not a readable masks file ({type(err).__name__})") from err
    if meta.get("format") != _FORMAT:
        raise ConfigError(flag, f"{path} is not a sparseheal masks file")
    return meta


def _packed_size(shape: list[int]) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return (numel + 7) // 8


def load_masks(
    path: str | os.PathLike, packed: bool = False, flag: str = "--masks"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads keep-masks (bool tensors by module name, or :class:`PackedMask` with ``packed``, an eighth
    of the memory) and the file's metadata; a damaged file is a ConfigError naming ``flag``."""
    check_safetensors(path, flag, "masks file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ConfigError(flag, f"{path} is not a sparseheal masks file")
            shapes = json.loads(meta["shapes"])
            bits = {name: fh.get_tensor(name) for name in fh.keys() if not name.startswith(ORDER_PREFIX)}
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(flag, f"{path} is not a readable masks file ({type(err).__name__})") from err
    for name, packed_bits in bits.items():
        if name not in shapes or packed_bits.numel() != _packed_size(shapes[name]):
            needed = _packed_size(shapes.get(name) or [0])
            raise ConfigError(flag, f"{path}: the mask of {name} holds {packed_bits.numel()} bytes, its "
                                    f"recorded shape {shapes.get(name)} needs {needed}")
    if packed:
        return {name: PackedMask(b, tuple(shapes[name])) for name, b in bits.items()}, meta
    return {name: unpack_mask(b, shapes[name]) for name, b in bits.items()}, meta


def masks_from_zeros(model: nn.Module, names: list[str], packed: bool = False) -> dict[str, torch.Tensor]:
    """Masks for a model pruned elsewhere: kept = (W != 0) (bit-packed with ``packed``), by mask key."""
    masks = {}
    for name in names:
        keep = masked_weight(model, name).param.detach().ne(0).cpu()  # the parameter's shape
        masks[name] = PackedMask.pack(keep) if packed else keep
    return masks


def check_masks_match(model: nn.Module, masks: dict[str, torch.Tensor], source: str = "masks file") -> None:
    """Refuses masks whose keys or shapes do not match the model's linears or fused expert tensors."""
    for name, mask in masks.items():
        weight = masked_weight(model, name)
        if weight is None:
            raise ConfigError("--masks", f"{source} names {name}, which is not a linear layer of the model "
                                         "(nor a fused experts tensor)")
        if tuple(weight.param.shape) != tuple(mask.shape):
            shape = tuple(weight.param.shape)
            raise ConfigError(
                "--masks", f"{source}: {name} has shape {tuple(mask.shape)}, the model's weight {shape}"
            )


def check_masks_file(path: str | os.PathLike, model: str, flag: str = "--masks") -> None:
    """Refuses an unreadable masks file, or one that does not fit ``model``, before any weights load."""
    masks, _ = load_masks(path, packed=True, flag=flag)  # shapes only
    try:
        check_masks_match(model_skeleton(model), masks, str(path))
    except ConfigError as err:
        raise ConfigError(flag, err.message) from err


_HASHES: dict[tuple, str] = {}


def weights_hash(model_dir: str | os.PathLike) -> str:
    """``models.hash_weights`` of a directory, computed once while its weight files stay unchanged."""
    root = Path(model_dir).resolve()
    files = sorted(f for f in root.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    key = (str(root), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _HASHES:
        _HASHES[key] = hash_weights(root)
    return _HASHES[key]


def load_input_orders(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The permuted input orders a masks file holds, by mask key (none: an empty dict)."""
    if not Path(path).is_file():
        return {}
    with safe_open(str(path), framework="pt") as fh:
        keys = [k for k in fh.keys() if k.startswith(ORDER_PREFIX)]
        return {k[len(ORDER_PREFIX):]: fh.get_tensor(k).long() for k in keys}


def module_rules(meta: dict[str, str]) -> dict[str, tuple[Pattern, float]]:
    """Each module's pattern and sparsity as a masks file's ``modules`` metadata states them."""
    modules = json.loads(meta.get("modules") or "{}")
    return {key: (parse(m["pattern"]), float(m.get("sparsity") or 0.0)) for key, m in modules.items()}


def carry_input_orders(source_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Adds to the masks file ``path`` what ``source_dir``'s masks say beyond the bits (the masks a heal
    or a merge kept): the input orders and each module's pattern, which a kernel needs, stay with them."""
    source = Path(source_dir) / MASKS_FILE
    orders = load_input_orders(source)
    layout = {k: v for k, v in masks_meta(source).items() if k in _LAYOUT_KEYS} if source.is_file() else {}
    if not (orders or layout) or not Path(path).is_file():
        return
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    tensors.update(_order_tensors(orders))
    save_file(tensors, str(path), metadata={**meta, **layout})


def _order_tensors(orders: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {ORDER_PREFIX + k: v.to(torch.int32).contiguous() for k, v in orders.items()}


def stamp_masks(path: str | os.PathLike, weights: str) -> None:
    """Records in a masks file the hash of the weights it sits beside (``weights_hash``)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    save_file(tensors, str(path), metadata={**meta, "weights_hash": weights})


def check_masks_belong(path: str | os.PathLike, model_dir: str | os.PathLike, flag: str,
                       meta: dict[str, str] | None = None) -> None:
    """Refuses a model directory's masks file that was written beside other weights.

    A masks file carries ``weights_hash``, the hash of the weight files written with it, and so does
    the directory's record; they must agree (a masks file swapped in from another directory does not).
    Weights changed after both were written are no reason to refuse: verification (``inspect``)
    reports what changed, and a warning is logged. Without a record, the weight files themselves
    are the reference. Masks files written before they carried the hash are not checked.
    """
    expected = (meta if meta is not None else masks_meta(path, flag)).get("weights_hash")
    if expected is None:
        return
    try:
        recorded = (read_record(model_dir) or {}).get("weights_hash")
    except ValueError:  # an unreadable record: the weight files decide
        recorded = None
    actual = weights_hash(model_dir)
    reference, where = (recorded, f"{Path(model_dir) / 'sparseheal.json'} records weights") if recorded \
        else (actual, f"{model_dir} holds weights")
    if reference != expected:
        raise ConfigError(flag, f"{path} was written for weights {expected}, but {where} {reference}: the "
                                "masks belong to another model; restore the directory's own masks, or delete "
                                "the file to take the masks from the zero weights (W != 0)")
    if actual != expected:
        log.warning(
            "%s: the weights (%s) changed since the masks were written (for %s)", model_dir, actual, expected)


def check_masks_hold(model_dir: str | os.PathLike, path: str | os.PathLike, flag: str) -> None:
    """Refuses a masks file that prunes positions where the directory's weights are not zero (inverted
    masks, or another model's of the same shapes: a healer would zero kept weights or revive pruned
    ones). Reads the weight files tensor by tensor, as the model holds them, before any model loads."""
    skeleton = model_skeleton(str(model_dir))
    masks, _ = load_masks(path, packed=True, flag=flag)
    files = weight_files(model_dir)
    for name, mask in masks.items():
        weight = masked_weight(skeleton, name)
        param = weight.state_name
        value = read_as_loaded(skeleton, {param: tuple(weight.param.shape)},
                               functools.partial(read_tensor, files))
        alive = int((value[param][~mask.unpack()] != 0).sum())
        if alive:
            raise ConfigError(flag, f"{path} prunes {alive} positions of {name} that hold non-zero "
                                    "weights: the masks do not belong to these weights; restore the "
                                    "directory's own masks, or delete the file to take the masks from the "
                                    "zero weights")


def masks_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / MASKS_FILE


def check_own_masks(model_dir: str | os.PathLike, flag: str) -> None:
    """Refuses a directory whose masks file was written beside other weights (before any heavy work)."""
    path = masks_path(model_dir)
    if path.is_file():
        check_masks_belong(path, model_dir, flag)


def export_masks(masks_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes ``out_dir`` (which must not exist): one ``KEY.npy`` bool keep-mask per weight in its stored
    shape, ``KEY.input_order.npy`` for permuted inputs, and ``masks.json`` (shapes, each module's pattern
    and the file's metadata), for readers that do not want the packed format."""
    import numpy as np

    from sparseheal.records import atomic_dir

    masks, meta = load_masks(masks_file)
    orders = load_input_orders(masks_file)
    with atomic_dir(out_dir) as tmp:
        for key, mask in masks.items():
            np.save(tmp / f"{key}.npy", mask.numpy())
        for key, order in orders.items():
            np.save(tmp / f"{key}.input_order.npy", order.numpy().astype(np.int32))
        info = {"format": "one KEY.npy bool keep-mask per weight (True = kept), in the stored shape",
                "shapes": {k: list(m.shape) for k, m in masks.items()},
                "modules": json.loads(meta.get("modules") or "{}"), "input_orders": sorted(orders),
                "metadata": {k: v for k, v in meta.items() if k not in ("shapes", "modules")}}
        (tmp / "masks.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out_dir)
