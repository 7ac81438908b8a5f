"""OWL: outlier-weighed layer-wise sparsity (Yin et al. 2023, https://arxiv.org/abs/2310.05175).

Layers whose Wanda scores hold more outliers are pruned less. For decoder layer l, with ``A`` the Wanda
scores ``|W_ij| * ||X_j||`` of all its linears together, measured on the dense model (each layer fed the
dense outputs of the layers before it), the outlier ratio is

    D_l = #{a in A_l : a > M * mean(A_l)} / |A_l|

The keep-ratios spread the min-max-normalised ratios over a band of width 2λ and are shifted so that
the model's pruned share, weighted by the layers' prunable parameter counts n_l, equals the target s:

    k_l = 2λ (D_l - min D) / (max D - min D) + c,   c such that  sum_l n_l (1 - k_l) = s sum_l n_l

and layer l is pruned at sparsity ``s_l = 1 - k_l`` (the reference code shifts by the unweighted mean;
for decoders whose layers are all the same size, as LLaMA's, the two agree). Each linear of the layer
then prunes ``floor(in_features * s_l)`` weights per row (Wanda) or per block (SparseGPT), so the
achieved share is at most the target, by less than one weight per row.

The outlier ratios cost one extra pass of the dense model over the calibration samples (the layers'
forward passes and the Wanda column norms), before the pruning pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseheal.checks import above_zero
from sparseheal.errors import ConfigError
from sparseheal.layout import layer_weights
from sparseheal.models import decoder_layers
from sparseheal.settings import Settings, setting
from sparseheal.sparsity.capture import at_layer, capture_layer_inputs, run_layer
from sparseheal.sparsity.feed import Feeder, eager_experts
from sparseheal.sparsity.wanda import WandaPruner, wanda_scores

__all__ = ["LayerSparsitySettings", "outlier_ratio", "owl_sparsities", "layer_outlier_ratios"]

log = logging.getLogger(__name__)


@dataclass
class LayerSparsitySettings(Settings):
    """How the target sparsity is spread over the decoder layers."""

    layer_sparsity: str = setting("uniform", "uniform (every layer at --sparsity) or owl (outlier-weighed "
                                             "layer ratios; needs calibration).", choices=("uniform", "owl"))
    owl_m: float = setting(5.0, "owl: a score is an outlier above M times its layer's mean score.",
                           check=above_zero)
    owl_lambda: float = setting(0.08, "owl: the largest deviation of a layer's sparsity from the target.",
                                check=above_zero)

    def check_against(self, sparsity: float, pattern: str, needs_calibration: bool, method: str) -> None:
        """The checks that need the prune settings: owl is for unstructured, calibrated pruning."""
        if self.layer_sparsity != "owl":
            return
        if not needs_calibration:
            raise ConfigError("--layer-sparsity", f"owl needs calibration activations; --method {method} "
                                                  "uses none (use wanda or sparsegpt)")
        if pattern != "unstructured":
            raise ConfigError("--layer-sparsity", f"owl varies the sparsity per layer; --pattern {pattern} "
                                                  "fixes it (use --pattern unstructured)")
        if not (self.owl_lambda < sparsity and sparsity + self.owl_lambda < 1):
            raise ConfigError("--owl-lambda", f"{self.owl_lambda} puts layers outside [0, 1) at --sparsity "
                                              f"{sparsity}; it must be below both {sparsity:g} and "
                                              f"{1 - sparsity:g}")


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """D = share of the scores (all tensors together) above ``m`` times their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: list[float], sizes: list[int], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from outlier ratios ``D_l`` and prunable parameter counts ``n_l`` (see the
    module docstring); equal ratios give every layer ``sparsity``.

    Raises:
        ValueError: ``lam`` puts a layer's sparsity outside [0, 1) (the prune stage names ``--owl-lambda``).
    """
    d = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    spread = d.max() - d.min()
    keep = 2 * lam * (d - d.min()) / spread if spread > 0 else torch.zeros_like(d)  # (L,)
    keep = keep + (1 - sparsity) - (n * keep).sum() / n.sum()  # weighted mean of 1 - keep is s
    result = [float(1 - k) for k in keep]
    if any(not 0.0 <= s < 1.0 for s in result):
        raise ValueError(f"gives layer sparsities from {min(result):.3f} to {max(result):.3f}, "
                         "outside [0, 1)")
    return result


@torch.no_grad()
def layer_outlier_ratios(model: nn.Module, tokens: torch.Tensor, m: float, batch_size: int,
                         device: torch.device | str) -> tuple[list[float], list[int]]:
    """The dense statistics pass: each decoder layer's outlier ratio ``D_l`` and prunable parameter count.

    Each layer runs whole on its inputs (with the keyword arguments the model's forward gives it), its
    outputs feeding the next layer, while every prunable matrix (each expert's too) gathers Wanda's
    column norms.

    Args:
        model: the dense model (left unchanged).
        tokens: (N, T) calibration tokens.
        m: the outlier threshold M.
        batch_size: samples per forward pass.
        device: where the layers run.
    """
    _, layers = decoder_layers(model)
    ratios, sizes = [], []
    with eager_experts(model):
        batches = capture_layer_inputs(model, layers, tokens, batch_size, torch.device(device))
        for index, layer in enumerate(tqdm(layers, desc="owl: outlier ratios", unit="layer")):
            home = next(layer.parameters()).device
            layer.to(device)  # one layer on the compute device at a time (already there without --offload)
            pruners = {s.name: WandaPruner(s) for w in layer_weights(layer).values() for s in w.slots()}
            feeder = Feeder(pruners, share=False, stop=False)
            with feeder.installed():
                for batch in at_layer(batches, index):  # the dense outputs feed the next layer
                    run_layer(layer, [batch], in_place=True)
                    feeder.end_batch()
            scores = [wanda_scores(p.slot.view(), p.sq_sum / p.tokens) for p in pruners.values()
                      if p.sq_sum is not None]  # (out, in) each; an expert no token reached has none
            ratios.append(outlier_ratio(scores, m))
            sizes.append(sum(p.slot.view().numel() for p in pruners.values()))
            layer.to(home)
    return ratios, sizes
