"""method=tome: Token Merging (Bolya et al., ICLR 2023), training-free, on the fine-tuned backbone.

Kept from the paper: inside every merging layer, after the attention sub-layer and before the FFN, the
layer's keys averaged over heads are the matching features; bipartite soft matching splits the tokens
alternately into A (even slots) and B (odd slots), gives every a its most cosine-similar b, and
merges the r best-matched a into their b by a size-weighted average; sizes add up and every later
attention adds log(size) to the key logits (proportional attention, see encoder.py). [CLS] is never
merged (similarity −inf).

Changed for BERT-style encoders on real lengths:
- the knob is a ratio, not a count: example i merges r_i = round(ratio·n_i) of its n_i current real
  tokens at every merging layer (at most |B|, and at most |A| − 1 since [CLS] stays), so a batch of
  different lengths merges per example and padding never takes part;
- the merging layers are `method.first_layer` to the last (ToMe merges in every layer), or the list
  `method.layers` (e.g. PiToMe's text harness: the last three layers only);
- the ratio is calibrated on the calib split's lengths to meet the FLOPs speedup target: token counts
  depend only on the lengths, so the search is analytic and exact (`merge_counts` mirrors the policy);
- the matching's similarity matrix (|A|·|B|·d_h multiply-adds per example) is counted as selector FLOPs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tokenprune import flops
from tokenprune.encoder import Decision, TokenPolicy, TokenState
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import meet_target


def merged_count(n: Any, ratio: float, kind: str = "tome") -> Any:
    """Tokens an example of n real tokens merges away at one layer: round(ratio·n), at most what the
    matching allows (ToMe: min(|B|, |A| − 1); PiToMe: (n − 1) // 2 pairs, [CLS] aside). float64 for
    tensors and arrays alike, so calibration and inference agree exactly."""
    if isinstance(n, Tensor):
        r = torch.floor(n.to(torch.float64) * ratio + 0.5).long()
        cap = (n // 2).minimum((n + 1) // 2 - 1) if kind == "tome" else (n - 1) // 2
        return r.minimum(cap).clamp(min=0)
    n = np.asarray(n, dtype=np.int64)
    r = np.floor(n.astype(np.float64) * ratio + 0.5).astype(np.int64)
    cap = np.minimum(n // 2, (n + 1) // 2 - 1) if kind == "tome" else (n - 1) // 2
    return np.maximum(np.minimum(r, cap), 0)


def matching_flops(n: Any, head_dim: int, kind: str = "tome") -> Any:
    """The similarity work of one merging layer on n tokens (2 × multiply-adds): ToMe's |A|×|B| matrix,
    PiToMe's n×n matrix (the energy needs every pair; the matching reads its A×B block)."""
    if kind == "tome":
        return 2.0 * ((n + 1) // 2) * (n // 2) * head_dim
    return 2.0 * n * n * head_dim


def key_features(keys: Tensor) -> Tensor:
    """B×n×d_h: the keys averaged over heads, L2-normalised (cosine similarity by a matmul)."""
    return F.normalize(keys.mean(1), dim=-1)


def bipartite_merge(features: Tensor, alive: Tensor, counts: Tensor) -> Tensor:
    """ToMe's bipartite soft matching: B×n long, the slot each token folds into (itself: stays).
    `counts`: tokens to merge away per row. A = even slots, B = odd slots; [CLS] and padding never move,
    padding is never a destination."""
    B, n, _ = features.shape
    a, b = features[:, ::2], features[:, 1::2]
    scores = a @ b.transpose(1, 2)  # B×|A|×|B|
    scores = scores.masked_fill(~alive[:, 1::2][:, None, :], float("-inf"))
    best, best_b = scores.max(-1)
    a_alive = alive[:, ::2].clone()
    a_alive[:, 0] = False  # [CLS]
    best = best.masked_fill(~a_alive, float("-inf"))
    order = torch.sort(best, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    moves = (rank < counts[:, None]) & a_alive
    dest = torch.arange(n, device=features.device).expand(B, n).clone()
    a_slots = dest[:, ::2]
    dest[:, ::2] = torch.where(moves, 2 * best_b + 1, a_slots)
    return dest


def bipartite_merge_one(features: Tensor, r: int) -> Tensor:
    """`bipartite_merge` for one row without padding (batch 1), in fewer operations: 1×n long."""
    n = features.shape[1]
    dest = torch.arange(n, device=features.device)
    if r <= 0:
        return dest[None]
    a, b = features[0, ::2], features[0, 1::2]
    scores = a @ b.T
    scores[0] = float("-inf")  # [CLS]
    best, best_b = scores.max(-1)
    chosen = best.topk(r).indices
    dest[2 * chosen] = 2 * best_b[chosen] + 1
    return dest[None]


class MergePolicy(TokenPolicy):
    """Merge `ratio` of each example's current tokens after the attention of every layer in `layers`."""

    kind = "tome"

    def __init__(self, layers: list[int], ratio: float):
        super().__init__()
        self.layers, self.ratio = sorted(set(int(i) for i in layers)), float(ratio)

    def after_attention(self, layer: int, state: TokenState, probs: Tensor | None) -> Decision | None:
        if layer not in self.layers or self.ratio <= 0:
            return None
        features = key_features(state.keys)
        B, slots = state.mask.shape
        if B == 1 and bool(state.mask.all()):  # batch 1 has no padding: plain integers, a leaner matching
            r = int(merged_count(np.array([slots]), self.ratio, self.kind)[0])
            cost = float(matching_flops(slots, features.shape[-1], self.kind))
            if self.kind == "tome":
                return Decision(merge=bipartite_merge_one(features, r), flops=cost)
            counts = torch.tensor([r])
        else:
            n = state.mask.sum(1)
            counts = merged_count(n, self.ratio, self.kind)
            cost = matching_flops(n.to(torch.float64), features.shape[-1], self.kind)
        return Decision(merge=self.match(layer, features, state.mask, counts), flops=cost)

    def match(self, layer: int, features: Tensor, alive: Tensor, counts: Tensor) -> Tensor:
        return bipartite_merge(features, alive, counts)


def merge_counts(lengths: Any, layers: int, merge_layers: list[int], ratio: float, head_dim: int,
                 kind: str = "tome") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The N×L attention and FFN token counts and the per-example selector FLOPs the policy produces
    on examples of these lengths."""
    n = np.asarray(lengths, dtype=np.int64).copy()
    attn, ffn = np.zeros((len(n), layers), np.int64), np.zeros((len(n), layers), np.int64)
    selector = np.zeros(len(n), np.float64)
    for i in range(layers):
        attn[:, i] = n
        if i in merge_layers and ratio > 0:
            selector += matching_flops(n.astype(np.float64), head_dim, kind)
            n = n - merged_count(n, ratio, kind)
        ffn[:, i] = n
    return attn, ffn, selector


class ToMe(Method):
    """Training-free merging on the cached fine-tuned backbone; the knob is the per-layer ratio."""

    name = "tome"
    policy_class = MergePolicy

    def _merge_layers(self) -> list[int]:
        L = flops.dims(self.job.backbone.config).layers
        chosen = self.cfg.method.get("layers")
        if chosen is not None:
            layers = [int(i) for i in chosen]
            if not layers or any(not 0 <= i < L for i in layers):
                raise UserError(f"method.layers={list(chosen)} must list layers of this {L}-layer model (0..{L - 1}), "
                                f"or be null to merge from method.first_layer on.")
            return sorted(set(layers))
        first = int(self.cfg.method.first_layer)
        if not 0 <= first < L:
            raise UserError(f"method.first_layer={first} is not a layer of this {L}-layer model: give 0..{L - 1}.")
        return list(range(first, L))

    def choose_knob(self, target: float) -> dict:
        config = self.job.backbone.config
        self.merge_layers = self._merge_layers()
        lengths = np.asarray(self.job.splits["calib"]["length"], dtype=np.int64)
        L, head_dim = flops.dims(config).layers, config.hidden_size // config.num_attention_heads
        base = flops.canonical_baseline(lengths, config)
        kind = self.policy_class.kind

        def speedup(ratio: float) -> float:
            attn, ffn, selector = merge_counts(lengths, L, self.merge_layers, ratio, head_dim, kind)
            return flops.speedup(base, flops.canonical_flops(attn, ffn, config, selector))

        self.ratio, achieved = meet_target(
            speedup, target, gentle=0.0, extreme=0.5, method=self.name,
            extreme_means=f"merging half the tokens at layers {self.merge_layers} (an earlier method.first_layer merges more)")
        return {"ratio": self.ratio, "layers": self.merge_layers, "calib_speedup": achieved}

    def policy(self) -> MergePolicy:
        return self.policy_class(self.merge_layers, self.ratio)
