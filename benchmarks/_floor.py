"""The compute floor of a calibrated prune, measured on this machine in the same run.

The work the layer-by-layer algorithm needs, per batch of B calibration sequences of T tokens, for a
model of L decoder layers whose linears have shapes (in_i, out_i):

- pass 1 (statistics, dense layer): every linear up to the input of the last one the layer calls
  (down_proj), and the attention products; L layers;
- pass 2 (propagation, pruned layer): the whole layer; L - 1 layers (the last layer's outputs feed nothing).

FLOPs: a linear costs ``2 B T in out``; causal attention ``2 B H T (T + 1) d_head`` for QKᵀ and PV
together (query t meets t + 1 keys). The floor in seconds is the same sum of the kernels' own times,
each measured here on the layer's shapes (``F.linear`` and ``F.scaled_dot_product_attention``, causal),
so the floor holds nothing but matrix products at this machine's rate. SparseGPT's floor adds its
statistic, the Gram matrix ``XᵀX`` of each distinct linear input (q, k and v share one, gate and up
another). It is symmetric, so what it needs is its upper triangle, ``B T in (in + 1)`` FLOPs: the floor
counts that share of the full product ``XᵀX`` timed on the same shapes.

What the floor leaves out is the layer's own element-wise work (norms, rotary embedding, activation,
residual adds), the statistics' element-wise part and the mask selection. The layer's own work is
measured beside it: ``bare_passes_s`` is the same two passes as the model's decoder layer runs them
(layer 0's forward on a real calibration batch, the first pass stopped at the last linear's input),
with nothing of the prune's added; ``prune / bare passes`` is then what the driver adds (statistics,
selection, hooks, parking), ``bare passes / floor`` what the model's element-wise code costs.

The matrix-product rate of this machine drifts from second to second (110-171 GFLOP/s in one 40 s
trace of one product), so every kernel is timed in ``rounds`` interleaved rounds, spread over several
seconds, and its median taken; the prune benchmark also measures the floor before and after each prune.

Magnitude pruning does no matrix products. Its floor is the selection it needs, timed on in-memory
copies of every prunable weight of the model: ``|W|``, the k-th lowest of each matrix
(``torch.kthvalue``), the mask written into the weight (``masked_fill_``) and the mask packed to bits.
What it leaves out is the driver's loop and the private copies of the loaded file's pages.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

__all__ = ["prune_floor", "magnitude_floor"]


def _medians(kernels: dict, rounds: int = 10) -> dict:
    """Median wall time of each ``kernels[name]()``, timed once per round in turn after one warm-up call
    each, so that a slow stretch of the machine touches every kernel alike."""
    for fn in kernels.values():
        fn()
    times: dict = {name: [] for name in kernels}
    for _ in range(rounds):
        for name, fn in kernels.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _call_order(layer, hidden, kwargs) -> tuple[list[str], list[str]]:
    """Names of the layer's linears in the order one forward calls them, and of those among them that
    read an input no earlier linear read (one statistic each)."""
    seen: list[tuple[torch.Tensor, str]] = []
    handles = []
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda _m, i, n=name: seen.append((i[0], n))))
    layer(hidden, **kwargs)
    for handle in handles:
        handle.remove()
    distinct = [n for k, (x, n) in enumerate(seen) if all(x is not y for y, _ in seen[:k])]
    return [n for _, n in seen], distinct


class _Stop(Exception):
    pass


def _stopped_before(layer, last, hidden, kwargs):
    """A call of ``layer``'s forward that stops when ``last`` (its last linear) is reached."""
    def stop(_module, _inputs):
        raise _Stop

    def run():
        handle = last.register_forward_pre_hook(stop)
        try:
            layer(hidden, **kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
    return run


@torch.no_grad()
def prune_floor(model_name: str, nsamples: int, seqlen: int, batch: int) -> dict:
    """Measures the floor of a calibrated prune of ``model_name`` over ``nsamples`` x ``seqlen`` tokens."""
    from sparseheal.models import decoder_layers, load_model
    from sparseheal.sparsity.calibrate import CalibrationSettings, capture_layer_inputs
    from sparseheal.sparsity.heap import heap_kept
    from sparseheal.sparsity.pipeline import calibration_tokens

    lm, _, _ = load_model(model_name, "float32", "cpu")
    lm.eval()
    _, layers = decoder_layers(lm)
    config = lm.config
    draw = CalibrationSettings(nsamples=batch, seqlen=seqlen)  # real C4 text, as the prune sees it
    tokens = calibration_tokens(model_name, draw, os.environ.get("SPARSEHEAL_DATA_DIR"))
    (hidden, kwargs), = capture_layer_inputs(lm, layers[0], tokens, batch, torch.device("cpu"))
    layer = layers[0]
    order, distinct = _call_order(layer, hidden, kwargs)
    linears = {name: layer.get_submodule(name) for name in order}
    x = {name: torch.randn(batch * seqlen, mod.in_features) for name, mod in linears.items()}  # (B*T, in)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim) for _ in range(3))  # (B, H, T, d_head)
    kernels = {name: (lambda n=name: F.linear(x[n], linears[n].weight)) for name in order}
    kernels["attention"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kernels.update({f"gram:{n}": (lambda n=n: x[n].t() @ x[n]) for n in distinct})  # SparseGPT's X Xᵀ
    kernels["pass 1"] = _stopped_before(layer, linears[order[-1]], hidden, kwargs)
    kernels["pass 2"] = lambda: layer(hidden, **kwargs)
    with heap_kept():  # the allocator as the prune's layer loop has it
        median = _medians(kernels)
    t_lin, t_attn = {name: median[name] for name in order}, median["attention"]
    t_gram = sum(median[f"gram:{n}"] * (linears[n].in_features + 1) / (2 * linears[n].in_features)
                 for n in distinct)  # the upper triangle's share of the full product
    n_layers, n_batches = len(layers), math.ceil(nsamples / batch)
    all_lin = sum(t_lin.values())
    per_batch = n_layers * (all_lin - t_lin[order[-1]] + t_attn) + (n_layers - 1) * (all_lin + t_attn)
    lin_flops = {n: 2 * batch * seqlen * m.in_features * m.out_features for n, m in linears.items()}
    attn_flops = 2 * batch * heads * seqlen * (seqlen + 1) * head_dim
    gram_flops = sum(batch * seqlen * linears[n].in_features * (linears[n].in_features + 1) for n in distinct)
    flops = (n_layers * (sum(lin_flops.values()) - lin_flops[order[-1]] + attn_flops)
             + (n_layers - 1) * (sum(lin_flops.values()) + attn_flops)) * n_batches
    return {
        "batch": batch,
        "tflop": round(flops / 1e12, 2),
        "linear_gflop_s": round(sum(lin_flops.values()) / all_lin / 1e9, 1),
        "attention_gflop_s": round(attn_flops / t_attn / 1e9, 1),
        "floor_s": round(per_batch * n_batches, 2),
        "hessian_tflop": round(gram_flops * n_layers * n_batches / 1e12, 2),
        "sparsegpt_floor_s": round((per_batch + n_layers * t_gram) * n_batches, 2),
        "bare_passes_s": round((n_layers * median["pass 1"] + (n_layers - 1) * median["pass 2"])
                               * n_batches, 2),
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def magnitude_floor(model_name: str) -> dict:
    """Times the selection of a magnitude prune (``|W|``, the k-th lowest of each whole matrix, the masked
    write, the packed mask) on in-memory copies of every prunable weight of ``model_name``, at 50%."""
    from sparseheal.models import decoder_layers, load_model, prunable_linears, weight_view
    from sparseheal.sparsity.masks import pack_mask

    lm, _, _ = load_model(model_name, "float32", "cpu")
    _, layers = decoder_layers(lm)
    weights = [weight_view(m).detach().clone() for layer in layers for m in prunable_linears(layer).values()]
    del lm, layers

    def select_all() -> float:
        copies = [w.clone() for w in weights]  # written by the masked fill; not timed
        start = time.perf_counter()
        for w in copies:
            flat = w.abs().reshape(1, -1)  # (1, out * in)
            kth = flat.kthvalue(flat.shape[1] // 2, dim=1, keepdim=True).values
            keep = (flat > kth).reshape(w.shape)  # (out, in)
            w.masked_fill_(~keep, 0.0)
            pack_mask(keep)
        return time.perf_counter() - start

    select_all()  # warm-up
    seconds = statistics.median(select_all() for _ in range(5))
    return {"magnitude_floor_s": round(seconds, 3), "matrices": len(weights),
            "weights_m": round(sum(w.numel() for w in weights) / 1e6, 1)}
