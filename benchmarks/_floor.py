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
trace of one product) and from minute to minute (the floor measured 188 s before a 4-minute prune and
242 s after it), so a floor measured apart from the prune is only good to that spread. Two measures:

- :func:`prune_floor`: every kernel timed in interleaved rounds over several seconds, median taken (the
  prune benchmark runs it before and after every prune);
- :func:`paired_prune`: the prune itself, run in this process, and after every layer one round of the
  same kernels and bare passes (on a copy of layer 0 and one real batch, outside the prune's timing), so
  that each layer's share of the floor is measured within seconds of the layer's own work.

Magnitude pruning does no matrix products. Its floor is the selection it needs, timed on in-memory
copies of every prunable weight of the model: ``|W|``, the k-th lowest of each matrix
(``torch.kthvalue``), the mask written into the weight (``masked_fill_``) and the mask packed to bits.
What it leaves out is the driver's loop and the private copies of the loaded file's pages.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["prune_floor", "paired_prune", "magnitude_floor"]


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


def _probe(lm, model_name: str, batch: int, seqlen: int) -> tuple[dict[str, Callable], Callable, dict]:
    """The floor's kernels on the shapes of ``lm``'s layers: its linears and causal attention on random
    inputs, the Gram products, and the bare passes of a copy of layer 0 on a real calibration batch.

    Returns:
        kernels by name; a function from one time per kernel to a layer's seconds per batch (products of
        pass 1 and pass 2, SparseGPT's Gram sums, bare passes 1 and 2); what the FLOP count needs.
    """
    from sparseheal.models import decoder_layers
    from sparseheal.sparsity.calibrate import CalibrationSettings, capture_layer_inputs
    from sparseheal.sparsity.pipeline import calibration_tokens

    _, layers = decoder_layers(lm)
    draw = CalibrationSettings(nsamples=batch, seqlen=seqlen)  # real C4 text, as the prune sees it
    tokens = calibration_tokens(model_name, draw, os.environ.get("SPARSEHEAL_DATA_DIR"))
    (hidden, per_layer), = capture_layer_inputs(lm, layers, tokens, batch, torch.device("cpu"))
    kwargs = per_layer[0]  # layer 0's arguments
    hidden = hidden.clone()
    layer = copy.deepcopy(layers[0])  # in memory, dense, whatever the prune does to the model's own
    order, distinct = _call_order(layer, hidden, kwargs)
    linears = {name: layer.get_submodule(name) for name in order}
    x = {name: torch.randn(batch * seqlen, mod.in_features) for name, mod in linears.items()}  # (B*T, in)
    heads = lm.config.num_attention_heads
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim) for _ in range(3))  # (B, H, T, d_head)
    kernels = {name: (lambda n=name: F.linear(x[n], linears[n].weight)) for name in order}
    kernels["attention"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    kernels.update({f"gram:{n}": (lambda n=n: x[n].t() @ x[n]) for n in distinct})  # SparseGPT's X Xᵀ
    kernels["pass 1"] = _stopped_before(layer, linears[order[-1]], hidden, kwargs)
    kernels["pass 2"] = lambda: layer(hidden, **kwargs)

    def costs(t: dict) -> dict:
        lin = sum(t[n] for n in order)
        return {"pass1": lin - t[order[-1]] + t["attention"], "pass2": lin + t["attention"],
                "gram": sum(t[f"gram:{n}"] * (linears[n].in_features + 1) / (2 * linears[n].in_features)
                            for n in distinct),  # the upper triangle's share of the full product
                "bare1": t["pass 1"], "bare2": t["pass 2"], "lin": lin, "attention": t["attention"]}

    lin_flops = {n: 2 * batch * seqlen * m.in_features * m.out_features for n, m in linears.items()}
    flops = {"lin": sum(lin_flops.values()), "last": lin_flops[order[-1]],
             "attention": 2 * batch * heads * seqlen * (seqlen + 1) * head_dim,
             "gram": sum(batch * seqlen * linears[n].in_features * (linears[n].in_features + 1)
                         for n in distinct)}
    return kernels, costs, flops


def _totals(per_layer: list[dict], n_batches: int) -> dict:
    """Seconds of the whole prune from each layer's seconds per batch (the last layer has no pass 2)."""
    last = len(per_layer) - 1
    sums = {key: sum(c[key] for c in per_layer) for key in per_layer[0]}
    floor = sums["pass1"] + sum(c["pass2"] for c in per_layer[:last])
    bare = sums["bare1"] + sum(c["bare2"] for c in per_layer[:last])
    return {"floor_s": round(floor * n_batches, 2),
            "sparsegpt_floor_s": round((floor + sums["gram"]) * n_batches, 2),
            "bare_passes_s": round(bare * n_batches, 2)}


@torch.no_grad()
def prune_floor(model_name: str, nsamples: int, seqlen: int, batch: int) -> dict:
    """Measures the floor of a calibrated prune of ``model_name`` over ``nsamples`` x ``seqlen`` tokens."""
    from sparseheal.models import decoder_layers, load_model
    from sparseheal.sparsity.heap import heap_kept

    lm, _, _ = load_model(model_name, "float32", "cpu")
    lm.eval()
    n_layers = len(decoder_layers(lm)[1])
    kernels, costs, flops = _probe(lm, model_name, batch, seqlen)
    with heap_kept():  # the allocator as the prune's layer loop has it
        cost = costs(_medians(kernels))
    n_batches = math.ceil(nsamples / batch)
    total = (n_layers * (flops["lin"] - flops["last"] + flops["attention"])
             + (n_layers - 1) * (flops["lin"] + flops["attention"])) * n_batches
    return {
        "batch": batch,
        "tflop": round(total / 1e12, 2),
        "linear_gflop_s": round(flops["lin"] / cost["lin"] / 1e9, 1),
        "attention_gflop_s": round(flops["attention"] / cost["attention"] / 1e9, 1),
        "hessian_tflop": round(flops["gram"] * n_layers * n_batches / 1e12, 2),
        **_totals([cost] * n_layers, n_batches),
        "threads": torch.get_num_threads(),
    }


@torch.no_grad()
def paired_prune(model_name: str, method: str, nsamples: int, seqlen: int, batch: int, workdir: str) -> dict:
    """Prunes ``model_name`` at 50% (unstructured) in this process as ``sparseheal prune`` does (parked
    layers, the same driver), timing one round of the floor's kernels after every layer, outside the
    prune's own time. Returns the prune's seconds, the floor and bare passes summed layer by layer, and
    both ratios."""
    from sparseheal.models import decoder_layers, load_model
    from sparseheal.registry import PRUNERS
    from sparseheal.sparsity.calibrate import CalibrationSettings, prune_model
    from sparseheal.sparsity.parking import parking_for
    from sparseheal.sparsity.pipeline import calibration_tokens

    draw = CalibrationSettings(nsamples=nsamples, seqlen=seqlen)
    tokens = calibration_tokens(model_name, draw, os.environ.get("SPARSEHEAL_DATA_DIR"))
    lm, _, _ = load_model(model_name, "float32", "cpu")
    lm.eval()
    kernels, costs, _ = _probe(lm, model_name, batch, seqlen)
    parking = parking_for(workdir, sum(p.numel() * p.element_size() for p in lm.parameters()), lm.device)
    per_layer, probing = [], 0.0

    def park(layer) -> None:
        nonlocal probing
        if parking is not None:
            parking(layer)
        start = time.perf_counter()
        per_layer.append(costs(_medians(kernels, rounds=1)))
        probing += time.perf_counter() - start

    pruner = PRUNERS.get(method)
    options = pruner.settings() if pruner.settings else None
    start = time.perf_counter()
    prune_model(lm, pruner, tokens, None, 0.5, batch, "cpu", options=options, park=park)
    prune_s = time.perf_counter() - start - probing
    assert len(per_layer) == len(decoder_layers(lm)[1])
    totals = _totals(per_layer, math.ceil(nsamples / batch))
    floor = totals["sparsegpt_floor_s" if method == "sparsegpt" else "floor_s"]
    return {"method": method, "prune_s": round(prune_s, 2), "probe_s": round(probing, 2), **totals,
            "x_floor": round(prune_s / floor, 3),
            "x_bare_passes": round(prune_s / totals["bare_passes_s"], 3),
            "bare_x_floor": round(totals["bare_passes_s"] / totals["floor_s"], 3)}


@torch.no_grad()
def magnitude_floor(model_name: str) -> dict:
    """Times the selection of a magnitude prune (``|W|``, the k-th lowest of each whole matrix, the masked
    write, the packed mask) on in-memory copies of every prunable weight of ``model_name``, at 50%; and,
    as ``magnitude_bare_s``, sparseheal's own selection (with its exact count under ties) on the same."""
    from sparseheal.models import decoder_layers, load_model, prunable_linears, weight_view
    from sparseheal.sparsity.magnitude import magnitude_scores
    from sparseheal.sparsity.masks import apply_mask, mask_from_scores, pack_mask

    lm, _, _ = load_model(model_name, "float32", "cpu")
    _, layers = decoder_layers(lm)
    weights = [weight_view(m).detach().clone() for layer in layers for m in prunable_linears(layer).values()]
    del lm, layers

    def minimal(w: torch.Tensor) -> None:
        flat = w.abs().reshape(1, -1)  # (1, out * in)
        kth = flat.kthvalue(flat.shape[1] // 2, dim=1, keepdim=True).values
        keep = (flat > kth).reshape(w.shape)  # (out, in)
        w.masked_fill_(~keep, 0.0)
        pack_mask(keep)

    def ours(w: torch.Tensor) -> None:
        keep = mask_from_scores(magnitude_scores(w), None, 0.5, per_row=False)
        apply_mask(w, keep)
        pack_mask(keep)

    def select_all(select) -> float:
        copies = [w.clone() for w in weights]  # written by the masked fill; not timed
        start = time.perf_counter()
        for w in copies:
            select(w)
        return time.perf_counter() - start

    times: dict = {minimal: [], ours: []}
    for select in times:  # warm-up
        select_all(select)
    for _ in range(5):
        for select, runs in times.items():
            runs.append(select_all(select))
    return {"magnitude_floor_s": round(statistics.median(times[minimal]), 3),
            "magnitude_bare_s": round(statistics.median(times[ours]), 3), "matrices": len(weights),
            "weights_m": round(sum(w.numel() for w in weights) / 1e6, 1)}
