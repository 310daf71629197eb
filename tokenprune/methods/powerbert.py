"""method=powerbert: PoWER-BERT (Goyal et al., ICML 2020), three phases, each cached.

    1. fine-tune        the shared fine-tuned backbone (`job.backbone`, cached by the runner)
    2. search           Soft-Extract after every layer's attention: the token of significance rank k
                        (attention received, averaged over heads, self excluded) is multiplied by a
                        learned retention parameter r_j[k] in [0, 1]; loss = task loss + Σ_j λ·j·Σ_k r_j[k]
                        (L1 weighted by 1-based depth j). r has its own learning rate (LR_SOFT_EXTRACT,
                        no weight decay), the backbone the model's. Cached on (backbone, λ, lr, epochs).
    3. re-train         Hard-Extract at the retention configuration read out of phase 2, scaled on
                        `calib` to the speedup target; trained from the phase-2 weights, best calib
                        epoch kept. Cached on (phase 2, the scaled configuration).

Real lengths, not padded positions. The paper's configuration counts positions of the sequence
padded to max_length N, so its first eliminations remove padding. Here padding is never counted
(FLOPs are over real tokens): the configuration is a keep *fraction* per layer of each example's
real length n. In phase 2 the rank k of a real token (k = 0 is [CLS]) of an n-token example uses the
parameter of rank bin floor(k·N/n), i.e. its relative rank k/n on a grid of N = max_length bins, so
every r_j[k] stands for the same fraction of the sequence whatever the length. The read-out is the
paper's, ℓ_j = max(1, int(Σ_k r_j[k])), made non-increasing, and the fraction is f_j = ℓ_j / N. An
example of n real tokens then keeps round(f_j·n) tokens (at least 1, [CLS] always) after layer j's
attention (`topk.kept_count`). r_j[0], [CLS]'s bin, is held at 1: [CLS] is always kept, so it is no
retention decision (the encoder leaves [CLS] unscaled anyway).

The knob. `method.lambda` (null: the paper's per-task value) sets the learned configuration. By
default (`method.calibrate: true`) its shape is kept and scaled to the speedup target: f_j(s)
= min(1, s·f_j), with s the largest scale whose canonical FLOPs speedup on `calib`'s real lengths
meets `speedup` (bisection, analytic: counts depend only on lengths). Phases 1-2 are shared by all
targets; phase 3 is keyed on the scaled configuration. With `speedup=1` (the default: no target) or
`calibrate: false`, the learned configuration is used as it is: λ is the knob, as in the
paper (`python run.py -m method=powerbert method.lambda=1e-4,3e-4,1e-3`).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokenprune import flops
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy, TokenState
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import calib_score, meet_target
from tokenprune.methods.topk import kept_count, keep_top, significance
from tokenprune.train import default_param_groups, fit, task_loss

log = logging.getLogger(__name__)


# ---- the configuration ---------------------------------------------------------------------------

def read_out(retention: Tensor | np.ndarray) -> list[int]:
    """The paper's read-out of an L×N retention matrix: ℓ_j = max(1, int(Σ_k r_j[k])), then forced
    non-increasing over layers (ℓ_j ≤ ℓ_{j-1}) and at most N."""
    r = torch.as_tensor(np.asarray(retention) if not isinstance(retention, Tensor) else retention.detach().cpu())
    N = r.shape[1]
    counts, prev = [], N
    for row in r.double():
        ell = min(max(1, int(row.sum().item())), prev)
        counts.append(ell)
        prev = ell
    return counts


def layer_counts(lengths: Any, fractions: Any) -> np.ndarray:
    """N×L: tokens each example keeps after each layer's attention (non-increasing, ≥ 1, ≤ n)."""
    n = np.asarray(lengths, dtype=np.int64)
    kept = np.stack([kept_count(n, float(f)) for f in fractions], axis=1)
    return np.minimum.accumulate(kept, axis=1)


def config_counts(lengths: Any, fractions: Any) -> tuple[np.ndarray, np.ndarray]:
    """The N×L attention and FFN token counts Hard-Extract produces on examples of these lengths."""
    n = np.asarray(lengths, dtype=np.int64)
    ffn = layer_counts(n, fractions)
    attn = np.concatenate([n[:, None], ffn[:, :-1]], axis=1)
    return attn, ffn


def config_speedup(lengths: Any, config: Any, fractions: Any) -> float:
    """Canonical FLOPs speedup of a keep-fraction configuration on these real lengths."""
    attn, ffn = config_counts(lengths, fractions)
    return flops.speedup(flops.canonical_baseline(lengths, config), flops.canonical_flops(attn, ffn, config))


def scale_fractions(fractions: Any, scale: float) -> list[float]:
    """The configuration's shape at another level: min(1, s·f_j) (stays non-increasing)."""
    return [min(1.0, scale * float(f)) for f in fractions]


def calibrate_scale(lengths: Any, config: Any, fractions: Any, target: float, method: str = "powerbert",
                    iters: int = 60) -> tuple[float, list[float], float]:
    """(s, scaled fractions, calib speedup): the largest s whose configuration min(1, s·f) meets
    `target` on these lengths. One clear sentence when the target is out of reach."""
    if not target >= 1:
        raise UserError(f"speedup={target} is below 1: give a target speedup >= 1, e.g. speedup=2.")
    fractions = [float(f) for f in fractions]
    s_full = 1.0 / min(fractions)  # every fraction 1: the full model

    def speedup(scale: float) -> float:
        return config_speedup(lengths, config, scale_fractions(fractions, scale))

    scale, _ = meet_target(speedup, target, gentle=s_full, extreme=0.0, steps=iters, method=method,
                           extreme_means="keeping only [CLS] after the first layer's attention")
    if scale == s_full:
        return s_full, scale_fractions(fractions, s_full), config_speedup(lengths, config, [1.0] * len(fractions))
    scaled = scale_fractions(fractions, scale)
    return scale, scaled, config_speedup(lengths, config, scaled)


# ---- the policies --------------------------------------------------------------------------------

def significance_ranks(probs: Tensor, mask: Tensor) -> Tensor:
    """B×n long: each slot's rank by significance among the real tokens, [CLS] first (rank 0);
    padding ranks after every real token."""
    scores = significance(probs, mask).masked_fill(~mask, float("-inf"))
    scores[:, 0] = float("inf")
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


class SoftExtractPolicy(TokenPolicy):
    """Phase 2: after layer j's attention, the rank-k token's state is multiplied by r_j[bin(k)],
    bin(k) = floor(k·N/n) for an example of n real tokens (its relative rank on N bins). Run in
    `mask` mode; `retention` (L×N, in [0, 1]) is a parameter trained with the model."""

    def __init__(self, layers: int, max_length: int):
        super().__init__()
        self.retention = nn.Parameter(torch.ones(layers, max_length))

    @property
    def max_length(self) -> int:
        return self.retention.shape[1]

    def bins(self, ranks: Tensor, lengths: Tensor) -> Tensor:
        N = self.max_length
        n = lengths.clamp(min=1)[:, None]
        return torch.div(ranks * N, n, rounding_mode="floor").clamp(0, N - 1)

    def needs_attention(self, layer: int) -> bool:
        return True

    def after_attention(self, layer: int, state: TokenState, probs: Tensor | None) -> Decision | None:
        ranks = significance_ranks(probs.detach(), state.mask)
        scale = self.retention[layer][self.bins(ranks, state.lengths)]
        scale = torch.where(state.mask, scale, torch.ones_like(scale))  # padding: untouched (never attended)
        return Decision(hidden_scale=scale)

    def l1(self, lam: float) -> Tensor:
        """Σ_j λ·j·Σ_k r_j[k], j 1-based (r ≥ 0, so this is the L1 norm); [CLS]'s fixed bin excluded."""
        depth = torch.arange(1, self.retention.shape[0] + 1, dtype=self.retention.dtype, device=self.retention.device)
        return lam * (depth * self.retention[:, 1:].sum(1)).sum()

    @torch.no_grad()
    def clip_(self) -> None:
        self.retention.clamp_(0.0, 1.0)
        self.retention[:, 0] = 1.0


class HardExtractPolicy(TokenPolicy):
    """Phase 3 and inference: after layer j's attention, each example keeps round(f_j·n) of its n
    real tokens ([CLS] and the most significant others); the rest leave for good. Works in `mask`
    (training) and `gather` (evaluation) modes alike."""

    def __init__(self, fractions: Any):
        super().__init__()
        self.fractions = [float(f) for f in fractions]

    def _changes(self, layer: int) -> bool:
        before = self.fractions[layer - 1] if layer > 0 else 1.0
        return self.fractions[layer] < before  # an equal fraction gives the same counts: nothing to do

    def needs_significance(self, layer: int) -> bool:
        return self._changes(layer)

    def counts(self, layer: int, state: TokenState) -> Tensor:
        return kept_count(state.lengths, self.fractions[layer]).minimum(state.mask.sum(1))

    def scores(self, layer: int, state: TokenState, probs: Tensor | None) -> Tensor:
        return state.significance

    def after_attention(self, layer: int, state: TokenState, probs: Tensor | None) -> Decision | None:
        if not self._changes(layer):
            return None
        counts = self.counts(layer, state)
        # the score is sums, not matmuls: no FLOPs in the canonical count
        return Decision(keep=keep_top(self.scores(layer, state, probs), state.mask, counts))


# ---- the method ----------------------------------------------------------------------------------

def encoder_loss(encoder: nn.Module, batch: dict) -> Tensor:
    out = encoder(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
    return task_loss(out.logits, batch["labels"])


class PowerBert(Method):
    name = "powerbert"
    retrain_kind = "powerbert-retrain"

    # -- hyper-parameters
    def hparams(self) -> tuple[float, float]:
        """(λ, LR_SOFT_EXTRACT): the config's, or the paper's value for this task (its hyper-parameter table), or the fallback."""
        m, task = self.cfg.method, self.cfg.task.name
        paper = (m.get("paper") or {}).get(task) or m.fallback
        lam = m.get("lambda")
        lam = float(paper["lambda"] if lam is None else lam)
        lr = m.get("lr_soft_extract")
        lr = float(paper["lr_soft_extract"] if lr is None else lr)
        if not (math.isfinite(lam) and lam >= 0):
            raise UserError(f"method.lambda={lam} is not valid: give a number >= 0, e.g. method.lambda=3e-4.")
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"method.lr_soft_extract={lr} is not valid: give a positive number, e.g. 1e-3.")
        return lam, lr

    def search_key(self) -> dict:
        lam, lr = self.hparams()
        return {"backbone": self.job.backbone_key, "phase": "powerbert-search", "lambda": lam,
                "lr_soft_extract": lr, "epochs": int(self.cfg.budget.epochs), "lr": float(self.cfg.train.lr)}

    def _layers(self) -> int:
        return flops.dims(self.job.backbone.config).layers

    # -- phase 2
    def search(self) -> tuple[nn.Module, dict]:
        """Phase 2 (cached): the searched model and the learned configuration."""
        job, cfg = self.job, self.cfg
        lam, lr_soft = self.hparams()

        def train(tmp: Path):
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(job.backbone)
            policy = SoftExtractPolicy(self._layers(), int(cfg.task.max_length))
            encoder = PrunableEncoder(model, policy, mode="mask")
            groups = default_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
            groups.append({"params": [policy.retention], "lr": lr_soft, "weight_decay": 0.0})

            def step(enc: nn.Module, batch: dict) -> Tensor:
                return encoder_loss(enc, batch) + policy.l1(lam)

            def after_step(_: int) -> None:
                policy.clip_()

            # no checkpoint choice here: the configuration is what the last epoch learned
            info = fit(encoder, job.loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.epochs),
                       device=job.device, step_fn=step, param_groups=groups, after_step=after_step,
                       log_fn=job.log, desc="powerbert-search")
            retention = policy.retention.detach().cpu()
            torch.save(retention, tmp / "retention.pt")
            counts, N = read_out(retention), retention.shape[1]
            return model, {
                "max_length": N,
                "counts": counts,  # ℓ_j on the N-bin grid
                "fractions": [c / N for c in counts],  # f_j = ℓ_j / N of each example's real length
                "retention_sums": [round(float(s), 4) for s in retention.sum(1)],
                "lambda": lam, "lr_soft_extract": lr_soft, "history": info["history"],
            }

        model, learned, _ = job.phases.model("powerbert-search", self.search_key(), train)
        self.retrained_steps += learned["history"][-1]["steps"]
        log.info(f"powerbert search: learned keep fractions {['%.3f' % f for f in learned['fractions']]}")
        return model, learned

    # -- the configuration for a target
    def configure(self, learned: dict, target: float) -> dict:
        """The re-training and inference configuration: the learned one, scaled to the target on
        calib (by default; `method.calibrate`), or as learned."""
        lengths = self.job.splits["calib"]["length"]
        config = self.job.backbone.config
        fractions = learned["fractions"]
        # speedup=1 (the default) asks for no target: λ alone sets the configuration, as in the paper
        by_target = bool(self.cfg.method.calibrate) and target != 1.0
        if by_target:
            scale, scaled, calib_speedup = calibrate_scale(lengths, config, fractions, target, self.name)
        else:
            scale, scaled, calib_speedup = 1.0, list(fractions), config_speedup(lengths, config, fractions)
        lam, lr_soft = self.hparams()
        return {
            "knob": "speedup" if by_target else "lambda",
            "lambda": lam, "lr_soft_extract": lr_soft,
            "learned_fractions": [round(f, 6) for f in fractions],
            "learned_counts": learned["counts"], "max_length": learned["max_length"],
            "scale": scale,
            "fractions": [round(f, 6) for f in scaled],
            "calib_speedup": calib_speedup,
            "calib_mean_kept": layer_counts(lengths, [round(f, 6) for f in scaled]).mean(0).round(2).tolist(),
        }

    # -- phase 3
    def make_policy(self, fractions: Any) -> TokenPolicy:
        return HardExtractPolicy(fractions)

    def attach(self, model: nn.Module, policy: TokenPolicy) -> None:
        """Hook for subclasses that need the model's inputs (random: per-example seeds)."""

    def retrain(self, searched: nn.Module, fractions: list[float]) -> nn.Module:
        job, cfg = self.job, self.cfg
        key = {"backbone": job.backbone_key, "search": self.search_key(), "fractions": fractions,
               "policy": self.retrain_kind, "epochs": int(cfg.budget.epochs), "lr": float(cfg.train.lr),
               "mode": "gather"}

        def train(tmp: Path):
            torch.manual_seed(cfg.seed)
            model = searched.to(job.device)
            policy = self.make_policy(fractions)
            self.attach(model, policy)
            # Hard extraction: the dropped tokens are removed physically while training too (the
            # paper's Extract layer), which is exact and costs only the tokens kept.
            encoder = PrunableEncoder(model, policy, mode="gather")

            def evaluate(enc: PrunableEncoder) -> float:  # checkpoint choice on calib, never on dev
                return calib_score(job, enc.model, enc.policy)

            info = fit(encoder, job.loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.epochs),
                       device=job.device, evaluate=evaluate, step_fn=encoder_loss, log_fn=job.log,
                       desc=self.retrain_kind)
            return model, info

        model, info, _ = job.phases.model(self.retrain_kind, key, train)
        self.retrained_steps += info["history"][-1]["steps"]
        job.info["retrain"] = {"best_epoch": info["best_epoch"], "best_calib_score": info["best_score"],
                               "train_seconds": info["train_seconds"]}
        return model

    # -- the Method hooks
    def train_phases(self, target: float) -> None:
        searched, learned = self.search()
        # the schedule phase 3 re-trains at is the target's: calibrated here, on calib's lengths
        self.knob = self.configure(learned, target)
        self._model = self.retrain(searched, self.knob["fractions"])
        self._policy = self.make_policy(self.knob["fractions"]).eval()
        self.attach(self._model, self._policy)

    def choose_knob(self, target: float) -> dict:
        """The configuration fit re-trained at: re-training does not change token counts, so the
        calibration done before it stands."""
        return self.knob

    def model(self) -> nn.Module:
        return self._model

    def policy(self) -> TokenPolicy:
        return self._policy


__all__ = ["PowerBert", "SoftExtractPolicy", "HardExtractPolicy", "read_out", "calibrate_scale", "config_speedup",
           "config_counts", "layer_counts", "scale_fractions", "significance_ranks"]
