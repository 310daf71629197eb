"""Rationale agreement: how well the tokens a method keeps match a task's gold rationales, per layer.

AdapLeR (Modarressi et al., 2022, §5.3) compares the tokens it keeps with the human rationales of
ERASER data sets. Here, for every job on a task with gold rationales (`rationale_tokens`, from
`collate.encode`), at every layer, among the tokens still alive after that layer's decisions (those
entering its FFN, as `PrunableEncoder`'s `on_layer` reports them):

    recall               gold tokens alive / gold tokens
    precision            gold tokens alive / tokens alive
    f1                   their harmonic mean (0 where both are 0)
    false_positive_rate  non-gold tokens alive / non-gold tokens
    kept_fraction        tokens alive / tokens (a method keeping tokens blindly has recall ≈ this)

Tokens are the real tokens of the input less the special ones ([CLS], [SEP]), which no rationale
holds and [CLS] is never dropped. Each figure is computed per example and averaged over the dev
examples with a non-empty gold rationale (macro average, as ERASER's token-level scores).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

MEASURES = ("recall", "precision", "f1", "false_positive_rate", "kept_fraction")
TOP_FRACTIONS = (0.1, 0.25, 0.5)


class RationaleAgreement:
    """An `on_layer` observer for `evaluate.run_eval` that accumulates the figures above."""

    def __init__(self, split, special_ids: list[int], num_layers: int):
        """`split`: an encoded split with `idx`, `input_ids` and `rationale_tokens`."""
        special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
        self.gold: dict[int, Tensor] = {}
        self.candidates: dict[int, Tensor] = {}
        for idx, ids, gold in zip(split["idx"], split["input_ids"], split["rationale_tokens"]):
            if not gold:
                continue  # no gold rationale (e.g. cut off by truncation): not counted
            ids = torch.as_tensor(ids, dtype=torch.long)
            candidates = ~torch.isin(ids, special)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[torch.as_tensor(gold, dtype=torch.long)] = True
            self.gold[int(idx)], self.candidates[int(idx)] = mask & candidates, candidates
        self.sums = np.zeros((len(MEASURES), num_layers))
        self.n = 0

    def __call__(self, batch: dict, layer: int, positions: Tensor, alive: Tensor) -> None:
        rows = [b for b, i in enumerate(batch["idx"].tolist()) if i in self.gold]
        if not rows:
            return
        width = batch["input_ids"].shape[1]
        gold = torch.zeros(len(rows), width, dtype=torch.bool)
        candidates = torch.zeros(len(rows), width, dtype=torch.bool)
        for r, b in enumerate(rows):
            i = int(batch["idx"][b])
            gold[r, : len(self.gold[i])] = self.gold[i]
            candidates[r, : len(self.candidates[i])] = self.candidates[i]
        # positions of padding slots may repeat a kept one: add up, never overwrite
        kept = torch.zeros(len(rows), width, dtype=torch.long)
        kept.scatter_add_(1, positions[rows].cpu(), alive[rows].long().cpu())
        kept = (kept > 0) & candidates
        hits = (kept & gold).sum(1).double()
        n_kept, n_gold, n_cand = kept.sum(1).double(), gold.sum(1).double(), candidates.sum(1).double()
        recall = hits / n_gold
        precision = torch.where(n_kept > 0, hits / n_kept.clamp_min(1), 0.0)
        f1 = torch.where(recall + precision > 0, 2 * recall * precision / (recall + precision).clamp_min(1e-12), 0.0)
        negatives = n_cand - n_gold
        fpr = torch.where(negatives > 0, (n_kept - hits) / negatives.clamp_min(1), 0.0)
        for m, values in enumerate((recall, precision, f1, fpr, n_kept / n_cand)):
            self.sums[m, layer] += float(values.sum())
        if layer == 0:
            self.n += len(rows)

    def summary(self) -> dict | None:
        """The record's `rationale` block (None when no evaluated example had a gold rationale)."""
        if self.n == 0:
            return None
        per_layer = {m: [round(float(v), 6) for v in self.sums[k] / self.n] for k, m in enumerate(MEASURES)}
        return {
            "n_examples": self.n,
            "per_layer": per_layer,
            "last_layer": {m: values[-1] for m, values in per_layer.items()},
            "tokens": "real tokens less [CLS]/[SEP], alive after each layer's decisions (entering its FFN)",
            "averaging": "per example, then the mean over dev examples with a gold rationale",
        }


def agreement_for(split, tokenizer, num_layers: int) -> RationaleAgreement | None:
    """An observer for a split with gold rationales; None for a task without them."""
    if "rationale_tokens" not in split.column_names:
        return None
    return RationaleAgreement(split, tokenizer.all_special_ids, num_layers)


def top_fraction_recall(split, tokenizer, rows, fractions=TOP_FRACTIONS) -> dict | None:
    """How well a ranking of tokens finds the gold rationale: for each fraction f, the recall of the
    gold tokens among the top ⌈f·n⌉ of an example's n candidate tokens (real tokens less [CLS]/[SEP])
    by `rows`' scores, averaged per example over those with a gold rationale. A blind ranking
    recalls about f. `rows`: (idx, scores over the example's positions) pairs, e.g. a learned
    method's training signal on calib, so a record says whether that signal points at what decides.
    None for a split without rationales (or no example with one)."""
    agreement = agreement_for(split, tokenizer, 1)
    if agreement is None:
        return None
    sums, n = np.zeros(len(fractions)), 0
    for idx, scores in rows:
        idx = int(idx)
        if idx not in agreement.gold:
            continue
        gold, candidates = agreement.gold[idx], agreement.candidates[idx]
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float64)).ravel()
        width = min(len(scores), len(candidates))
        gold, candidates, scores = gold[:width], candidates[:width], scores[:width]
        if not gold.any():
            continue
        order = scores.masked_fill(~candidates, float("-inf")).argsort(descending=True, stable=True)
        ranked_gold = gold[order[: int(candidates.sum())]].double()
        for k, f in enumerate(fractions):
            top = max(1, math.ceil(f * len(ranked_gold)))
            sums[k] += float(ranked_gold[:top].sum() / ranked_gold.sum())
        n += 1
    if n == 0:
        return None
    return {"recall_at_top": {str(f): round(float(v), 4) for f, v in zip(fractions, sums / n)},
            "n_examples": n, "blind": "a blind ranking recalls about the fraction itself"}
