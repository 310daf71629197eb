"""method=pitome: Spectrum-Preserving Token Merging (Tran et al., NeurIPS 2024), training-free.

Kept from the paper: ToMe's merge (size-weighted average, proportional attention), with candidates
chosen by an energy score over the cosine similarities c_ij of the layer's key features (averaged
over heads): E_i = (1/n) Σ_j f_m(c_ij), f_m(x) = x if x ≥ m else α·(exp(x − m) − 1). A high energy
means many similar neighbours, a redundant token. The 2k highest-energy tokens are the candidates,
split alternately (by energy rank) into A and B; every a merges into its most similar b (k merges);
low-energy tokens are kept untouched. [CLS] and padding are never candidates.

Changed or chosen here (the reference note marks the schedule as to be checked against the paper):
- margin m_ℓ = `method.margin`·(1 − ℓ/L), looser (lower) in later layers, α = `method.alpha`;
- the sum runs over the example's real tokens, self included, divided by their count n;
- the knob is a ratio (k_i = round(ratio·n_i) per example, at most (n_i − 1)/2), calibrated on calib's
  lengths to the FLOPs target, and merging runs from `method.first_layer` on; `method.layers=[3,4,5]`
  on a 6-layer model reproduces the authors' text harness (last three layers only);
- the n×n similarity matrix is counted as selector FLOPs (the paper's harness counted none, on
  padded lengths).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenprune.methods.tome import MergePolicy, ToMe


def energy(features: Tensor, alive: Tensor, margin: float, alpha: float) -> tuple[Tensor, Tensor]:
    """(B×n energy, B×n×n cosine similarities) over the alive tokens; -inf energy for the rest and [CLS]."""
    sim = features @ features.transpose(1, 2)
    soft = torch.where(sim >= margin, sim, alpha * (torch.exp(sim - margin) - 1))
    soft = soft.masked_fill(~alive[:, None, :], 0.0)
    e = soft.sum(-1) / alive.sum(1, keepdim=True).clamp_min(1)
    e = e.masked_fill(~alive, float("-inf"))
    e[:, 0] = float("-inf")
    return e, sim


def pitome_merge(features: Tensor, alive: Tensor, counts: Tensor, margin: float, alpha: float) -> Tensor:
    """B×n long: the slot each token folds into. Per row: the 2k highest-energy tokens, alternately
    A and B by rank; each a merges into its most similar b."""
    B, n, _ = features.shape
    e, sim = energy(features, alive, margin, alpha)
    order = torch.sort(e, dim=1, descending=True, stable=True).indices  # B×n, by energy
    K = int(counts.max()) if counts.numel() else 0
    dest = torch.arange(n, device=features.device).expand(B, n).clone()
    if K == 0:
        return dest
    a_slots, b_slots = order[:, 0:2 * K:2], order[:, 1:2 * K:2]  # B×K each
    a_sim = sim.gather(1, a_slots[..., None].expand(-1, -1, n)).gather(2, b_slots[:, None, :].expand(-1, K, -1))
    valid_b = torch.arange(K, device=counts.device) < counts[:, None]
    a_sim = a_sim.masked_fill(~valid_b[:, None, :], float("-inf"))
    best_b = a_sim.argmax(-1)  # B×K
    to = b_slots.gather(1, best_b)
    moves = valid_b  # the first k of A merge
    dest.scatter_(1, a_slots, torch.where(moves, to, a_slots))
    return dest


class PiToMePolicy(MergePolicy):
    kind = "pitome"

    def __init__(self, layers: list[int], ratio: float, num_layers: int, margin: float = 0.9, alpha: float = 1.0):
        super().__init__(layers, ratio)
        self.num_layers, self.margin, self.alpha = num_layers, float(margin), float(alpha)

    def match(self, layer: int, features: Tensor, alive: Tensor, counts: Tensor) -> Tensor:
        margin = self.margin * (1 - layer / self.num_layers)
        return pitome_merge(features, alive, counts, margin, self.alpha)


class PiToMe(ToMe):
    name = "pitome"
    policy_class = PiToMePolicy

    def policy(self) -> PiToMePolicy:
        L = int(self.job.backbone.config.num_hidden_layers)
        return PiToMePolicy(self.merge_layers, self.ratio, L, self.cfg.method.margin, self.cfg.method.alpha)
