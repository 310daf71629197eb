"""method=topk: a training-free baseline. After layer k's attention, each example keeps a fixed
fraction of its real tokens ([CLS] always), ranked by attention significance (PoWER-BERT's score:
attention received, averaged over heads, self excluded, from real queries only); the kept set goes
on through all later layers.

The knob, the keep fraction, is derived analytically: the largest fraction whose canonical FLOPs
speedup on the `calib` split's lengths meets the target (bisection; the speedup only grows as the
fraction falls).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from tokenprune import flops
from tokenprune.encoder import Decision, TokenPolicy, TokenState
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import meet_target


def kept_count(n: Any, fraction: float) -> Any:
    """Tokens an example of n real tokens keeps: round(fraction·n), at least 1 ([CLS]).
    Computed in float64 for tensors and arrays alike, so calibration and inference agree exactly."""
    if isinstance(n, Tensor):
        return torch.floor(n.to(torch.float64) * fraction + 0.5).long().clamp(min=1).minimum(n)
    n = np.asarray(n)
    return np.minimum(np.maximum(np.floor(n.astype(np.float64) * fraction + 0.5), 1), n).astype(np.int64)


def significance(probs: Tensor, mask: Tensor) -> Tensor:
    """B×n: attention each key receives, averaged over heads, from real queries other than itself.
    (Policies get it from the encoder as `state.significance`, computed without the probabilities'
    buffer; this is the same score from explicit probabilities.)"""
    per_query = probs.mean(1) * mask[:, :, None].to(probs.dtype)  # B×n(query)×n(key), padding rows zeroed
    return per_query.sum(1) - per_query.diagonal(dim1=1, dim2=2)


def keep_top(scores: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
    """B×n bool: [CLS] plus the highest-scoring real tokens, `counts` per row in all."""
    scores = scores.masked_fill(~mask, float("-inf"))
    scores[:, 0] = float("inf")
    k = int(counts.max())
    top = scores.topk(k, dim=1).indices
    chosen = torch.arange(k, device=counts.device) < counts[:, None]
    return torch.zeros_like(mask).scatter_(1, top, chosen)


class TopKPolicy(TokenPolicy):
    """Keep `keep_fraction` of each example's real tokens after layer `layer`'s attention."""

    def __init__(self, layer: int, keep_fraction: float):
        super().__init__()
        self.layer, self.keep_fraction = layer, keep_fraction

    def needs_significance(self, layer: int) -> bool:
        return layer == self.layer

    def after_attention(self, layer: int, state: TokenState, probs: Tensor | None) -> Decision | None:
        if layer != self.layer:
            return None
        counts = kept_count(state.mask.sum(1), self.keep_fraction)
        # the score is sums, not matmuls, so it adds no FLOPs in the canonical count
        return Decision(keep=keep_top(state.significance, state.mask, counts))


def topk_counts(lengths: Any, layers: int, layer: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The N×L attention and FFN token counts the policy produces on examples of these lengths."""
    n = np.asarray(lengths, dtype=np.int64)
    kept = kept_count(n, fraction)
    attn = np.repeat(n[:, None], layers, axis=1)
    ffn = attn.copy()
    attn[:, layer + 1:] = kept[:, None]
    ffn[:, layer:] = kept[:, None]
    return attn, ffn


def calibrate_keep_fraction(lengths: Any, config: Any, layer: int, target: float, iters: int = 60) -> float:
    """The largest keep fraction whose canonical FLOPs speedup on `lengths` is at least `target`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    layers = flops.dims(config).layers
    base = flops.canonical_baseline(lengths, config)

    def speedup(fraction: float) -> float:
        attn, ffn = topk_counts(lengths, layers, layer, fraction)
        return flops.speedup(base, flops.canonical_flops(attn, ffn, config))

    fraction, _ = meet_target(speedup, target, gentle=1.0, extreme=0.0, steps=iters, method="topk",
                              extreme_means=f"keeping only [CLS] from layer {layer} on (an earlier method.layer cuts more)")
    return fraction


class TopK(Method):
    name = "topk"

    def _layer(self) -> int:
        layer = int(self.cfg.method.layer)
        layers = flops.dims(self.job.backbone.config).layers
        if not 0 <= layer < layers:
            raise UserError(f"method.layer={layer} is not a layer of this {layers}-layer model: give 0..{layers - 1}.")
        return layer

    def choose_knob(self, target: float) -> dict:
        self.layer = self._layer()
        lengths = self.job.splits["calib"]["length"]
        self.keep_fraction = calibrate_keep_fraction(lengths, self.job.backbone.config, self.layer, target)
        return {"keep_fraction": self.keep_fraction, "layer": self.layer}

    def policy(self) -> TopKPolicy:
        return TopKPolicy(self.layer, self.keep_fraction)
