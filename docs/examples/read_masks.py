"""Reads a sparseheal masks file with numpy alone (and safetensors' numpy reader): the format of
docs/artifacts.md#mask-format, in a few lines.

    masks, modules, orders = read_masks("pruned/sparsity_masks.safetensors")
    masks["model.layers.0.mlp.up_proj"]         # bool array in the weight's stored shape, True = kept
    modules["model.layers.0.mlp.up_proj"]       # {"pattern": "2:4", "kind": "nm", "n": 2, "m": 4, ...}
"""

import json

import numpy as np
from safetensors import safe_open

ORDER_PREFIX = "input_order/"


def read_masks(path: str) -> tuple[dict[str, np.ndarray], dict[str, dict], dict[str, np.ndarray]]:
    """(keep-masks by weight, each weight's pattern, the permuted input orders) of a masks file."""
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
        shapes = json.loads(meta["shapes"])
        masks = {}
        for key, shape in shapes.items():
            bits = np.unpackbits(f.get_tensor(key), bitorder="big")  # most significant bit first
            masks[key] = bits[: int(np.prod(shape))].reshape(shape).astype(bool)
        orders = {k[len(ORDER_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(ORDER_PREFIX)}
    return masks, json.loads(meta.get("modules", "{}")), orders
