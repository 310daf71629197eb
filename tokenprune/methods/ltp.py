"""method=ltp: Learned Token Pruning (Kim et al., KDD 2022; methods.md §5), three phases, each cached.

    1. fine-tune     the shared fine-tuned backbone (`job.backbone`, cached by the runner)
    2. soft          learned per-layer thresholds θ_ℓ = final_threshold·ℓ/L + Δθ_ℓ (Δθ learned, from 0) on
                     the attention a token receives, s_ℓ(t) = (1/(H·N)) Σ_h Σ_{i alive} A_h[i, t]; in
                     training each layer's FFN input (so its output too, through the residual) is
                     multiplied by m_ℓ(t) = σ((s_ℓ(t) − θ_ℓ)/T); loss = task + λ·Σ_ℓ mean(m_ℓ). One
                     phase per λ in `method.lambdas`, shared by every target.
    3. hard          the weights fine-tuned with hard pruning at the chosen thresholds (frozen), best
                     calib epoch kept. Inference: token t leaves at layer ℓ iff s_ℓ(t) < max(1e-5, θ_ℓ),
                     physically (gather), [CLS] pinned. The hard score is the encoder's significance
                     with self-attention included (`significance_with_self`): at inference it is
                     computed a few heads at a time, without the B×H×n×n probabilities (issue 21).

Kept from the paper: the score, the threshold parametrisation (layer 0 never prunes: its base is 0),
the sigmoid soft mask with temperature, the λ-weighted mask regulariser, the two stages, thresholds in
their own optimizer group without weight decay.

Changed, and by which rule:
- N is the task's max_length (the paper pads to 128 and divides by the tensor length); with dynamic
  padding this keeps the score on the paper's scale, whatever the batch.
- The regulariser's mean is over real tokens (the paper's includes padding, which only rescales λ).
- λ for the target: each λ of `method.lambdas` trains phase 2 once (cached for all targets); for a
  target, each is scaled to it on calib (below) and the one with the best calib score at the target
  is re-trained in phase 3. A common scale c of the learned thresholds meets the target: θ_ℓ·c, c
  found on calib within `calib_rtol` above the target (`toolbox.meet_target`; c = 0: nothing but the
  1e-5 floor prunes) after phase 2 (to choose λ)
  and again after phase 3 (the final knob; the record says how far c had to move from 1: its `learning`
  block has Δθ per layer, the learned thresholds' own calib speedup at c = 1 against the target, and c).
- The thresholds' learning rate follows the budget. Adam moves a parameter by at most lr per step;
  with warmup and linear decay the total possible movement over S steps is about 0.5·S·lr. The
  paper's recipe (lr 2e-5 for thresholds, SST-2: one epoch of 67k examples at batch 64, ~1,050 steps)
  allows ~0.5·1,050·2e-5 ≈ 0.0105 (`method.threshold_movement`), about final_threshold itself. So
  lr_threshold = 2·threshold_movement / S for this budget's S steps: the thresholds can travel as
  far on a short budget as on the paper's.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from tokenprune import flops
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy, TokenState, received_attention
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import calib_score, calib_speedups, learning_record, meet_target, travel
from tokenprune.train import default_param_groups, fit, task_loss

log = logging.getLogger(__name__)


def received(probs: Tensor, mask: Tensor, norm_length: int) -> Tensor:
    """B×n: s(t) = (1/(H·N)) Σ_h Σ_{i alive} A_h[i, t], N = `norm_length` (fixed, the task's max_length):
    the encoder's significance with self-attention included, over N."""
    return received_attention(probs, mask, with_self=True) / (probs.shape[1] * norm_length)


class Thresholds(nn.Module):
    """θ_ℓ = final_threshold·ℓ/L + Δθ_ℓ, Δθ learned from 0 (layer 0's base is 0: it never prunes)."""

    def __init__(self, layers: int, final_threshold: float):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(layers))
        self.register_buffer("base", final_threshold * torch.arange(layers, dtype=torch.float32) / layers)

    def forward(self) -> Tensor:
        return self.base + self.delta


class LTPPolicy(TokenPolicy):
    """Soft masks (training, `mask` mode) or hard pruning (`hard=True`; evaluation in `gather` mode)
    after the attention of layers 1..L-1. `scale`: the calibrated factor c on every threshold."""

    significance_with_self = True  # the paper's score counts the attention a token pays itself

    def __init__(self, layers: int, final_threshold: float, temperature: float, norm_length: int,
                 hard: bool = False, scale: float = 1.0):
        super().__init__()
        self.thresholds = Thresholds(layers, final_threshold)
        self.temperature, self.norm_length, self.hard, self.scale = temperature, norm_length, hard, scale
        self.masks: list[Tensor] = []

    def start(self, state: TokenState) -> None:
        self.masks = []

    def needs_attention(self, layer: int) -> bool:
        return layer > 0 and not self.hard  # soft masks: the score from the probabilities, with its gradient

    def needs_significance(self, layer: int) -> bool:
        # hard pruning needs only each token's column sum: at inference the encoder then computes the
        # attention a few heads at a time, with no B×H×n×n buffer; same matmuls, same FLOPs
        return layer > 0 and self.hard

    def decision_points(self, num_layers: int) -> tuple[tuple[int, str], tuple[int, str]]:
        return (min(1, num_layers - 1), "after"), (num_layers - 1, "after")

    def threshold(self, layer: int) -> Tensor:
        return self.thresholds()[layer] * self.scale

    def after_attention(self, layer: int, state: TokenState, probs: Tensor | None) -> Decision | None:
        if layer == 0:
            return None
        theta = self.threshold(layer)
        if self.hard:
            s = state.significance / self.norm_length  # = received(probs, ...): averaged over heads, self included
            # the score is sums, not matmuls: no FLOPs in the canonical count
            return Decision(keep=s >= torch.clamp(theta.detach(), min=1e-5))
        s = received(probs, state.mask, self.norm_length)
        m = torch.sigmoid((s - theta) / self.temperature)
        self.masks.append((m * state.mask).sum(1) / state.mask.sum(1).clamp(min=1))
        return Decision(hidden_scale=m)

    def regulariser(self) -> Tensor:
        """Σ_ℓ of the mean soft mask over each example's real tokens, averaged over the batch."""
        return torch.stack(self.masks, 0).sum(0).mean()


class LTP(Method):
    name = "ltp"

    def _settings(self) -> dict:
        m = self.cfg.method
        lambdas = [float(x) for x in m.lambdas]
        if not lambdas or any(not (math.isfinite(x) and x >= 0) for x in lambdas):
            raise UserError(f"method.lambdas={list(m.lambdas)} must be a non-empty list of numbers >= 0, e.g. [0.05,0.2].")
        if not float(m.temperature) > 0:
            raise UserError(f"method.temperature={m.temperature} must be a positive number, e.g. 1e-3.")
        steps = int(self.cfg.budget.epochs) * len(self.job.loader("train", train=True))
        return {"lambdas": lambdas, "temperature": float(m.temperature), "final_threshold": float(m.final_threshold),
                "threshold_movement": float(m.threshold_movement), "steps": steps,
                "lr_threshold": 2.0 * float(m.threshold_movement) / max(1, steps),
                "norm_length": int(self.cfg.task.max_length)}

    def _policy(self, s: dict, **kw) -> LTPPolicy:
        L = flops.dims(self.job.backbone.config).layers
        return LTPPolicy(L, s["final_threshold"], s["temperature"], s["norm_length"], **kw)

    def soft_phase(self, lam: float, s: dict) -> tuple[nn.Module, Tensor, dict]:
        job, cfg = self.job, self.cfg
        key = {"backbone": job.backbone_key, "phase": "ltp-soft", "lambda": lam, "temperature": s["temperature"],
               "final_threshold": s["final_threshold"], "lr_threshold": s["lr_threshold"],
               "epochs": int(cfg.budget.epochs), "lr": float(cfg.train.lr), "norm_length": s["norm_length"]}

        def train(tmp: Path):
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(job.backbone)
            policy = self._policy(s)
            encoder = PrunableEncoder(model, policy, mode="mask")
            groups = default_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
            groups.append({"params": [policy.thresholds.delta], "lr": s["lr_threshold"], "weight_decay": 0.0})

            def step(enc, batch):
                out = enc(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
                return task_loss(out.logits, batch["labels"]) + lam * policy.regulariser()

            info = fit(encoder, job.loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.epochs),
                       device=job.device, step_fn=step, param_groups=groups, log_fn=job.log,
                       desc="ltp-soft" if lam == s["lambdas"][0] else f"ltp-soft-lambda{lam:.0e}")  # a curve per λ
            thresholds = policy.thresholds().detach().cpu()
            torch.save(thresholds, tmp / "thresholds.pt")
            return model, {"lambda": lam, "thresholds": thresholds.tolist(),
                           "threshold_movement": policy.thresholds.delta.detach().abs().tolist(),
                           "history": info["history"]}

        model, info, path = job.phases.model(f"ltp-soft-{lam:g}", key, train)
        self.retrained_steps += info["history"][-1]["steps"]
        return model, torch.load(path / "thresholds.pt"), info

    def hard_policy(self, s: dict, thresholds: Tensor, scale: float) -> LTPPolicy:
        policy = self._policy(s, hard=True, scale=scale)
        with torch.no_grad():
            policy.thresholds.delta.copy_(thresholds - policy.thresholds.base)
        return policy.eval()

    def calibrate_scale(self, model: nn.Module, s: dict, thresholds: Tensor, target: float) -> tuple[float, float]:
        policy = self.hard_policy(s, thresholds, 1.0)
        passes = calib_speedups(self.job, model, policy, "threshold scale")

        def speedup(scale: float) -> float:
            policy.scale = scale
            return passes()

        return meet_target(speedup, target, gentle=0.0, extreme=[2.0, 8.0, 32.0, 128.0], steps=14,
                           rtol=float(self.cfg.calib_rtol), method=self.name,
                           extreme_means="thresholds 128 times the learned ones")

    def hard_phase(self, soft_model: nn.Module, s: dict, thresholds: Tensor, scale: float, soft_key: dict) -> nn.Module:
        job, cfg = self.job, self.cfg
        key = {"soft": soft_key, "phase": "ltp-hard", "thresholds": [round(float(t), 8) for t in thresholds],
               "scale": scale, "epochs": int(cfg.budget.epochs), "lr": float(cfg.train.lr)}

        def train(tmp: Path):
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(soft_model).to(job.device)
            policy = self.hard_policy(s, thresholds, scale)
            encoder = PrunableEncoder(model, policy, mode="gather")

            def step(enc, batch):
                out = enc(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
                return task_loss(out.logits, batch["labels"])

            info = fit(encoder, job.loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.epochs),
                       device=job.device, evaluate=lambda enc: calib_score(job, enc.model, policy),
                       step_fn=step, param_groups=default_param_groups(model, cfg.train.lr, cfg.train.weight_decay),
                       log_fn=job.log, desc="ltp-hard")
            return model, info

        model, info, _ = job.phases.model("ltp-hard", key, train)
        self.retrained_steps += info["history"][-1]["steps"]
        job.info["retrain"] = {"best_epoch": info["best_epoch"], "best_calib_score": info["best_score"]}
        return model

    def train_phases(self, target: float) -> None:
        s = self._settings()
        candidates = []
        for lam in s["lambdas"]:
            model, thresholds, info = self.soft_phase(lam, s)
            scale, achieved = self.calibrate_scale(model, s, thresholds, target)
            calib = calib_score(self.job, model, self.hard_policy(s, thresholds, scale))
            candidates.append({"lambda": lam, "scale": scale, "calib_speedup": achieved, "calib_score": calib,
                               "thresholds": [round(float(t), 6) for t in thresholds], "model": model})
            log.info(f"ltp: λ={lam:g} learned thresholds {candidates[-1]['thresholds']}, scale {scale:.3f}, calib {calib:.2f}")
        best = max(candidates, key=lambda c: c["calib_score"])
        thresholds = torch.tensor(best["thresholds"])
        soft_key = {"backbone": self.job.backbone_key, "lambda": best["lambda"], "settings": {k: v for k, v in s.items()}}
        self._model = self.hard_phase(best["model"], s, thresholds, best["scale"], soft_key)
        self.best, self.settings, self.thresholds = best, s, thresholds
        self.job.info["ltp_candidates"] = [{k: v for k, v in c.items() if k != "model"} for c in candidates]

    def choose_knob(self, target: float) -> dict:
        """Phase 3 changed the weights, so the attention and the counts: the scale is set again on calib."""
        scale, achieved = self.calibrate_scale(self._model, self.settings, self.thresholds, target)
        self.scale = scale
        self.learning = self.learning_block(target)
        return {"lambda": self.best["lambda"], "thresholds": self.best["thresholds"], "scale_before_retrain": self.best["scale"],
                "scale": scale, "calib_speedup": achieved, "lr_threshold": self.settings["lr_threshold"],
                "temperature": self.settings["temperature"]}

    def learning_block(self, target: float) -> dict:
        """The record's `learning` block: how far the thresholds moved from their linear start (Δθ) at the
        chosen λ, the learned per-layer thresholds, their own calib speedup (scale 1, the re-trained
        weights) against the target, and the common scale calibration applied before and after re-training."""
        s = self.settings
        policy = self.hard_policy(s, self.thresholds, 1.0)
        delta = policy.thresholds.delta.detach()
        own = calib_speedups(self.job, self._model, policy, "learned thresholds")()
        return learning_record(
            self.name,
            {"threshold_delta": {"initial": [0.0] * len(delta), "final": delta.tolist(), "bounds": None,
                                 "lr": s["lr_threshold"]}},
            schedule=self.best["thresholds"], target=target, own_speedup=own,
            calibration={"kind": "common scale on the learned thresholds", "multiplier": round(float(self.scale), 6),
                         "before_retrain": round(float(self.best["scale"]), 6), "applied": True},
            extra={"lambda": self.best["lambda"], "steps": s["steps"], "travel": round(travel(s["steps"], s["lr_threshold"]), 6),
                   "paper_travel": s["threshold_movement"]})

    def model(self) -> nn.Module:
        return self._model

    def policy(self) -> LTPPolicy:
        return self.hard_policy(self.settings, self.thresholds, self.scale)
