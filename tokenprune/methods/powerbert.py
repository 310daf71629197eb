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

Tried and not kept: each non-[CLS] token covering a span of the bins 1..N−1 (scaled by the mean of r
over it), so that every bin learns from every example. On SST-2 `quick` at 2x, seeds 1/2/3, at the
same λ the walk kept, it gave flatter schedules (spread 0.36/0.17/0.23 against 0.39/0.23/0.33) and
accuracy 77.87/75.80/79.01 against 78.67/79.01/79.47.

The knob. `method.lambda` (null: the paper's per-task value) sets the learned configuration. By
default (`method.calibrate: true`) its shape is kept and scaled to the speedup target: f_j(s)
= min(1, s·f_j), with s the largest scale whose canonical FLOPs speedup on `calib`'s real lengths
meets `speedup` (bisection, analytic: counts depend only on lengths). Phases 1-2 are shared by all
targets; phase 3 is keyed on the scaled configuration. With `speedup=1` (the default: no target) or
`calibrate: false`, the learned configuration is used as it is: λ is the knob, as in the
paper (`python run.py -m method=powerbert method.lambda=1e-4,3e-4,1e-3`).

What is kept from the paper, and what is scaled to the budget (issue 19):
  kept     the Soft-Extract layer, the loss CE + Σ_j λ·j·Σ_k r_j[k], r initialised to 1 and clipped to
           [0, 1], the read-out, Hard-Extract and the re-training phase; the paper's λ as the start
           of the walk below.
  scaled   LR_SOFT_EXTRACT. Adam moves a parameter by at most its learning rate per step, and with
           warm-up and linear decay the total movement is 0.5·steps·lr. The paper's search runs
           `paper_steps` = 3 epochs × ceil(train size / BATCH_SIZE) (its table; 3159 on SST-2), so the
           retention parameters can travel 0.5·paper_steps·LR_SOFT_EXTRACT (0.79 on SST-2). Here
           lr = LR_SOFT_EXTRACT · paper_steps / steps (toolbox.travel_lr), with `steps` this budget's
           search steps: the same travel on any budget. Without it, a quick budget's search moved r
           by 0.047 and returned a flat schedule.
  chosen   λ for the target: with a target (speedup > 1, calibrate=true) the search starts at the
           paper's λ and walks by `lambda_factor` (down while the learned configuration's own calib
           speedup is above the target, up while below; at most `lambda_tries` more searches, each
           cached, then the geometric midpoint of the bracket); the λ whose own speedup is nearest the
           target is kept (toolbox.walk_to_target; calib, never dev). Adam moves every retention
           parameter at about its lr whatever λ's size once λ·j outweighs the task gradient, so λ only
           shapes the schedule near the task gradient's scale, which the budget and model decide.
           Above that scale every layer's parameters fall at the same rate and the schedule is flat
           (SST-2 `quick`, seed 1, own calib speedup by λ: 2e-4 1.69x, 2e-3 2.16x, both decreasing
           with depth; 2e-2 2.24x, 6.3e-2 2.82x, 2e-1 3.53x, flat: 0.33 → 0.31 at 6.3e-2). So a λ that
           reaches 3x on SST-2 by itself learns a flat schedule: at the paper's travel a
           depth-decreasing one stops near 2x. Further up every parameter reaches the floor
           1 − travel and a larger λ learns the same schedule (MRPC `quick`: λ 0.3, 3 and 30 all gave
           0.734 at every layer), so the walk stops at a step that leaves the own speedup unchanged
           (toolbox.walk_to_target). Calibration then scales the chosen configuration by a
           multiplier, recorded in the `learning` block with the learned per-layer schedule and its
           own speedup.
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
from tokenprune.methods.toolbox import (calib_score, learning_record, meet_target, travel, travel_lr,
                                        walk_settings, walk_to_target)
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
    def paper_entry(self) -> dict:
        m = self.cfg.method
        return (m.get("paper") or {}).get(self.cfg.task.name) or m.fallback

    def hparams(self) -> tuple[float, float]:
        """(λ, LR_SOFT_EXTRACT): the config's, or the paper's value for this task (its hyper-parameter
        table), or the fallback. LR_SOFT_EXTRACT is the paper's rate, before the travel rule."""
        m = self.cfg.method
        paper = self.paper_entry()
        lam = m.get("lambda")
        lam = float(paper["lambda"] if lam is None else lam)
        lr = m.get("lr_soft_extract")
        lr = float(paper["lr_soft_extract"] if lr is None else lr)
        if not (math.isfinite(lam) and lam >= 0):
            raise UserError(f"method.lambda={lam} is not valid: give a number >= 0, e.g. method.lambda=3e-4.")
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"method.lr_soft_extract={lr} is not valid: give a positive number, e.g. 1e-3.")
        return lam, lr

    def search_steps(self) -> int:
        return int(self.cfg.budget.epochs) * len(self.job.loader("train", train=True))

    def paper_steps(self) -> float | None:
        """The paper recipe's search steps for this task (config `paper_steps`; null: no travel rule)."""
        steps = self.cfg.method.get("paper_steps")
        if steps is None:
            steps = self.paper_entry().get("paper_steps")
        return None if steps is None else float(steps)

    def soft_lr(self) -> float:
        """The retention parameters' learning rate: LR_SOFT_EXTRACT · paper_steps / steps (the travel rule),
        or LR_SOFT_EXTRACT itself when `method.travel` is false or no paper_steps is known."""
        _, lr = self.hparams()
        paper_steps = self.paper_steps()
        if not self.cfg.method.get("travel", True) or paper_steps is None:
            return lr
        return travel_lr(lr, paper_steps, self.search_steps())

    def lambda_tries(self, target: float) -> int:
        """How many more λ the walk may search for this target: `lambda_tries` with a target to meet, 0
        otherwise (speedup=1 or calibrate=false: λ is the knob, as in the paper)."""
        tries, _ = walk_settings(self.cfg.method, "lambda", "the paper's λ")
        return tries if bool(self.cfg.method.calibrate) and target != 1.0 else 0

    def search_key(self, lam: float | None = None) -> dict:
        lam = self.hparams()[0] if lam is None else lam
        return {"backbone": self.job.backbone_key, "phase": "powerbert-search", "lambda": lam,
                "lr_soft_extract": self.soft_lr(), "epochs": int(self.cfg.budget.epochs), "lr": float(self.cfg.train.lr)}

    def _layers(self) -> int:
        return flops.dims(self.job.backbone.config).layers

    # -- phase 2
    def search(self, lam: float | None = None) -> tuple[nn.Module, dict]:
        """Phase 2 (cached) at λ (default: the config's): the searched model and the learned configuration."""
        job, cfg = self.job, self.cfg
        lam = self.hparams()[0] if lam is None else lam
        lr_soft = self.soft_lr()
        # each λ the walk searches keeps its own curve (W&B, logs): the paper's λ is the plain name
        search_name = "powerbert-search" if lam == self.hparams()[0] else f"powerbert-search-lambda{lam:.0e}"  # no "." (W&B nests dotted keys)

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
                       log_fn=job.log, desc=search_name)
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

        model, learned, _ = job.phases.model("powerbert-search", self.search_key(lam), train)
        log.info(f"powerbert search (λ={lam:g}): learned keep fractions {['%.3f' % f for f in learned['fractions']]}")
        return model, learned

    def learned_speedup(self, learned: dict) -> float:
        """The learned configuration's own canonical FLOPs speedup on calib (before any scaling)."""
        return config_speedup(self.job.splits["calib"]["length"], self.job.backbone.config, learned["fractions"])

    def search_for(self, target: float) -> tuple[nn.Module, dict, list[dict]]:
        """Phase 2 at the λ chosen for the target on calib (one λ without a target): (model, learned, grid)."""
        found: dict[float, tuple] = {}

        def own_speedup(lam: float) -> float:
            found[lam] = (*self.search(lam), self.job.phases.record["powerbert-search"])
            return self.learned_speedup(found[lam][1])

        lam, grid = walk_to_target(self.hparams()[0], own_speedup, target, tries=self.lambda_tries(target),
                                   factor=walk_settings(self.cfg.method, "lambda", "the paper's λ")[1])
        model, learned, phase_record = found[lam]
        self.job.phases.record["powerbert-search"] = phase_record  # the chosen λ's phase, not the last one walked
        self.retrained_steps += learned["history"][-1]["steps"]
        return model, learned, grid

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
        return {
            "knob": "speedup" if by_target else "lambda",
            "lambda": learned["lambda"], "lr_soft_extract": learned["lr_soft_extract"],
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

    def retrain(self, searched: nn.Module, fractions: list[float], lam: float | None = None) -> nn.Module:
        job, cfg = self.job, self.cfg
        key = {"backbone": job.backbone_key, "search": self.search_key(lam), "fractions": fractions,
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
        searched, learned, grid = self.search_for(target)
        # the schedule phase 3 re-trains at is the target's: calibrated here, on calib's lengths
        self.knob = self.configure(learned, target)
        self.learning = self.learning_block(learned, grid, target)
        self._model = self.retrain(searched, self.knob["fractions"], learned["lambda"])
        self._policy = self.make_policy(self.knob["fractions"]).eval()
        self.attach(self._model, self._policy)

    def learning_block(self, learned: dict, grid: list[dict], target: float) -> dict:
        """The record's `learning` block: the retention mass per layer (mean r_j, from 1), the learned
        schedule, its own calib speedup against the target and the calibration multiplier."""
        retention = learned.get("retention_sums")
        N = learned["max_length"]
        mass = [round((float(r) - 1.0) / (N - 1), 6) for r in retention] if retention else learned["fractions"]
        steps = int(learned["history"][-1]["steps"])
        paper_steps = self.paper_steps()
        _, paper_lr = self.hparams()
        return learning_record(
            self.name,
            {"retention": {"initial": [1.0] * len(mass), "final": mass, "bounds": (0.0, 1.0),
                           "lr": learned["lr_soft_extract"]}},
            schedule=learned["fractions"], target=target, own_speedup=self.learned_speedup(learned),
            calibration={"kind": "multiplier on the keep fractions", "multiplier": round(float(self.knob["scale"]), 6),
                         "applied": self.knob["knob"] == "speedup"},
            extra={"lambda": learned["lambda"], "lambda_grid": grid, "steps": steps, "paper_steps": paper_steps,
                   "travel": round(travel(steps, learned["lr_soft_extract"]), 4),
                   "paper_travel": None if paper_steps is None else round(travel(paper_steps, paper_lr), 4)})

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
