"""method=random: PoWER-BERT's per-layer keep schedule with tokens chosen at random.

The same phases 1-2 as PoWER-BERT (shared through the cache: same keys), the same calibrated
configuration at the same target (fractions of each example's real length, scaled on `calib`), and a
phase 3 trained like PoWER-BERT's (from the phase-2 weights, best calib epoch kept), except that after
layer j's attention the round(f_j·n) kept tokens are [CLS] plus a random draw among the tokens still
in play. Training draws afresh at every step (a generator seeded with `seed`); evaluation is
deterministic per example: each token's draw is a hash of (seed, the example's token ids, its
original position, the layer), so it does not depend on batching, padding or mode. The gap to
`powerbert` at the same target is what the learned (significance) choice of tokens is worth.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenprune.encoder import TokenState, backbone_parts
from tokenprune.methods.powerbert import HardExtractPolicy, PowerBert

_M = 0x7FFFFFFF  # hashing mod 2^31 keeps every product inside int64


def _mix(x: Tensor, rounds: int = 3) -> Tensor:
    """An integer hash of int64 values in [0, 2^31) (xorshift-multiply rounds; no overflow)."""
    for _ in range(rounds):
        x = x ^ (x >> 15)
        x = (x * 1103515245 + 12345) & _M
        x = x ^ (x >> 13)
    return x


class RandomPolicy(HardExtractPolicy):
    """Keep round(f_j·n) tokens after layer j's attention: [CLS] plus a uniform random choice among
    the real tokens still in play. No attention probabilities are needed."""

    def __init__(self, fractions: Any, seed: int = 0):
        super().__init__(fractions)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._ids: Tensor | None = None  # the current forward's input ids (from the embeddings hook)
        self._table: Tensor | None = None  # B×N int64: per-example, per-original-position hash

    def needs_significance(self, layer: int) -> bool:
        return False

    def capture(self, input_ids: Tensor) -> None:
        self._ids = input_ids

    def start(self, state: TokenState) -> None:
        ids, self._ids, self._table = self._ids, None, None
        if self.training or ids is None:
            return
        # per example: a hash of its real token ids, each mixed with its position
        N = ids.shape[1]
        pos = torch.arange(N, device=ids.device)
        real = pos[None, :] < state.lengths[:, None]
        terms = _mix((ids.long() & _M) ^ _mix(pos + 7919 * (self.seed + 1) & _M)[None, :])
        example = _mix(torch.where(real, terms, 0).sum(1) & _M)  # B: < 2^31 · 512 < 2^40, no overflow
        self._table = _mix(example[:, None] ^ _mix(pos + 104729)[None, :])

    def scores(self, layer: int, state: TokenState, probs: Tensor | None) -> Tensor:
        if self._table is not None:
            per_slot = self._table.gather(1, state.positions)
            return _mix(per_slot ^ _mix(torch.full_like(per_slot, layer + 31))).double()  # exact: < 2^31
        u = torch.rand(state.mask.shape, generator=self.generator)
        return u.to(state.mask.device)


def attach_ids(model: nn.Module, policy: RandomPolicy):
    """Give the policy each forward's input ids (for its per-example draws), from a pre-hook on the
    model's embeddings (the encoder passes policies no ids). Returns the hook's handle."""
    embeddings = backbone_parts(model)[0].embeddings

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            policy.capture(ids)

    return embeddings.register_forward_pre_hook(hook, with_kwargs=True)


class RandomDrop(PowerBert):
    name = "random"
    retrain_kind = "random-retrain"

    def make_policy(self, fractions: Any) -> RandomPolicy:
        return RandomPolicy(fractions, seed=int(self.cfg.seed))

    def attach(self, model: nn.Module, policy: RandomPolicy) -> None:
        attach_ids(model, policy)


__all__ = ["RandomDrop", "RandomPolicy", "attach_ids"]
