"""The compute floor of a calibrated prune, measured on this machine in the same run.

The work the layer-by-layer algorithm needs, per batch of B calibration sequences of T tokens, for a
model of L decoder layers whose linears have shapes (in_i, out_i):

- pass 1 (statistics, dense layer): every linear up to the input of the last one the layer calls
  (down_proj), and the attention products; L layers;
- pass 2 (propagation, pruned layer): the whole layer; L - 1 layers (the last layer's outputs feed nothing).

FLOPs: a linear costs ``2 B T in out``; causal attention ``2 B H T (T + 1) d_head`` for QKᵀ and PV
together (query t meets t + 1 keys). The floor in seconds is the same sum of the kernels' own times,
each measured here on the layer's shapes (``F.linear`` and ``F.scaled_dot_product_attention``, causal),
so the floor holds nothing but matrix products at this machine's rate. A second, "bare-layer" floor is
the layer's own forward (norms, rotary embedding, activation and residuals included) for the same passes,
without hooks, statistics or mask selection.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

__all__ = ["prune_floor"]


class _Stop(Exception):
    pass


def _seconds(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _call_order(layer, hidden, kwargs) -> list[str]:
    """Names of the layer's linears in the order one forward calls them."""
    order, handles = [], []
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda _m, _i, n=name: order.append(n)))
    layer(hidden, **kwargs)
    for handle in handles:
        handle.remove()
    return order


def _stopped_forward(layer, last: str, hidden, kwargs) -> None:
    """The layer's forward up to the input of its last linear."""
    def stop(_module, _inputs):
        raise _Stop

    handle = layer.get_submodule(last).register_forward_pre_hook(stop)
    try:
        layer(hidden, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def prune_floor(model_name: str, nsamples: int, seqlen: int, batch: int) -> dict:
    """Measures the floor of a calibrated prune of ``model_name`` over ``nsamples`` x ``seqlen`` tokens."""
    from sparseheal.models import decoder_layers, load_model
    from sparseheal.sparsity.calibrate import capture_layer_inputs

    lm, _, _ = load_model(model_name, "float32", "cpu")
    lm.eval()
    _, layers = decoder_layers(lm)
    config = lm.config
    tokens = torch.randint(0, config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    (hidden, kwargs), = capture_layer_inputs(lm, layers[0], tokens, batch, torch.device("cpu"))
    layer = layers[0]
    order = _call_order(layer, hidden, kwargs)
    linears = {name: layer.get_submodule(name) for name in order}
    x = {name: torch.randn(batch * seqlen, mod.in_features) for name, mod in linears.items()}  # (B*T, in)
    t_lin = {name: _seconds(lambda n=name: F.linear(x[n], linears[n].weight)) for name in order}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim) for _ in range(3))  # (B, H, T, d_head)
    t_attn = _seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    t_full = _seconds(lambda: layer(hidden, **kwargs))
    t_stats = _seconds(lambda: _stopped_forward(layer, order[-1], hidden, kwargs))
    n_layers, n_batches = len(layers), math.ceil(nsamples / batch)
    all_lin = sum(t_lin.values())
    per_batch = n_layers * (all_lin - t_lin[order[-1]] + t_attn) + (n_layers - 1) * (all_lin + t_attn)
    lin_flops = {n: 2 * batch * seqlen * m.in_features * m.out_features for n, m in linears.items()}
    attn_flops = 2 * batch * heads * seqlen * (seqlen + 1) * head_dim
    flops = (n_layers * (sum(lin_flops.values()) - lin_flops[order[-1]] + attn_flops)
             + (n_layers - 1) * (sum(lin_flops.values()) + attn_flops)) * n_batches
    return {
        "batch": batch,
        "tflop": round(flops / 1e12, 2),
        "linear_gflop_s": round(sum(lin_flops.values()) / all_lin / 1e9, 1),
        "attention_gflop_s": round(attn_flops / t_attn / 1e9, 1),
        "floor_s": round(per_batch * n_batches, 2),
        "bare_layer_floor_s": round((n_layers * t_stats + (n_layers - 1) * t_full) * n_batches, 2),
        "kernels_share_of_layer": round((all_lin + t_attn) / t_full, 3),
        "threads": torch.get_num_threads(),
    }
