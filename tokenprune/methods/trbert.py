"""method=trbert: TR-BERT (Ye et al., NAACL 2021), dynamic token reduction by a learned policy.

Inference. Two selectors, MLPs d → 32 → 1 (GELU, sigmoid), sit before layers 1 and L//2 (0-based:
layers 1 and 3 of a 6-layer model, 1 and 6 of BERT-base). Each maps the hidden state of every token
still in play to a keep probability p; a token goes on iff p ≥ threshold. [CLS] is always kept,
padding never, and a selection only happens where more than [CLS] is left. The runner runs them in
`gather` mode: dropped tokens are physically removed. In a batch every row keeps its own tokens;
`method.batch_max=true` reproduces the original's batched rule instead (each row keeps its top-K by p,
K = the batch's largest keep count; padding is still never kept). The selectors' FLOPs are charged
on the tokens they really run on (2·(32d + 32) per token), per example, through `Decision.flops`.

Training (each phase cached on the backbone's key and its own parameters):

    B   residual-strategy scores on train from the fine-tuned backbone: for selection point s with
        source layer σ_s (the layer whose output enters it: 0 and L//2 − 1) and reference layer r,
        score_s(t) = |⟨∂CE/∂h^(r)_t, h^(r)_t − h^(σ_s)_t⟩|. r = 2L//3 (8 for BERT-base, 4 for 6 layers,
        as in the original), at least one past the last source.
    B′  (method.init_selector) the selectors regress y_t = 1 − rank_t/n of those scores (L1, mean
        over real tokens), backbone at full length.
    C   backbone frozen (eval mode, no dropout); the selectors train by REINFORCE. Each example is
        tiled K times; at each point a_t ~ Bernoulli(p_t) over real non-[CLS] tokens. Reward
        R = −CE − α·ΔL with ΔL = mean over points of (tokens kept)/(real length); baseline the mean
        of R over the K rollouts of the example; loss mean((R − b)·NLL) with NLL the per-token mean
        Bernoulli NLL summed over points. For the first `guide_rate` of the steps rollout 1 of each
        example takes the heuristic action instead (the top-m tokens by the phase-B score,
        m = round(Σ p), the policy's own expected count), its NLL still the policy's.
        α here is the task's own (alpha), independent of the target, so C is shared by all targets.
    D   the backbone's logits on train (the teacher), cached.
    E   backbone and selectors jointly: the same rollouts, task loss soft cross-entropy to the
        teacher (T = 1; MSE for regression), reward R = −soft-CE − α_E·ΔL, loss mean soft-CE + policy
        loss. α_E = alpha·(target − 1) with calibrate=true (so a harder target trains a policy that
        drops more), alpha itself with calibrate=false.

Then (calibrate=true) the threshold is calibrated on calib, in gather mode with the eval batching: the
threshold whose canonical FLOPs speedup meets the target, within `calib_rtol` above it (an ITP search
on the logit over count passes: `toolbox.meet_target`).

Choices and deviations from the original, on purpose:
  * Rollouts run in `mask` mode (hard masks: for the kept tokens the same as a gather, and a fixed
    shape for the K·B tiled rows); inference runs in `gather` mode.
  * The length penalty is relative to the example's *real* length in training and at evaluation
    alike (the original divides by the padded length in training and the real one in evaluation).
  * [CLS] is not an action: it is excluded from the NLL's per-token mean and from m.
  * log p is computed as logsigmoid (stable) instead of log(p + 1e-6).
  * Phase E detaches the selectors' inputs by default (`detach_selector_input`): the policy loss
    trains the selectors, not the backbone.
  * K, the epochs and the examples of B–E are capped by the budget (`budget.rl_rollouts`,
    `rl_epochs`, `rl_max_examples`); no checkpoint
    selection in C and E (the last epoch's weights; never dev).

What is kept from the paper, and what is scaled to the budget (issue 19):
  kept     the selectors, the phase-B scores, B′'s rank targets and L1 loss, the reward −task − α·ΔL,
           the per-example mean baseline, the REINFORCE loss, the heuristic imitation of phase C,
           phase E's soft cross-entropy to the teacher, the hard rule at inference.
  switched on  phase B′ (init_selector: true), which the original README recommends where data is
           small (IMDB): with few rollouts the selectors must start from the phase-B ranking.
  scaled   the selectors' learning rate by the travel rule (toolbox.travel_lr): Adam moves a parameter
           by at most its lr per step, 0.5·steps·lr in all with warm-up and linear decay; the paper
           trains them at 3e-5 for paper_steps = 3 epochs × ceil(25,000 / 32) = 2,346 steps per phase
           (IMDB), so here selector_lr = min(3e-5 · 2,346 / steps, selector_lr_max), with `steps` the
           phase's own steps (B′, C and E each).
  rollouts the rule: K = min(method.rollouts (the paper's 8), budget.rl_rollouts) per example, on
           min(train, budget.rl_max_examples) examples for min(budget.epochs, budget.rl_epochs)
           epochs; the record's `learning` block gives the rollouts seen (K × examples × epochs)
           against the paper's 8 × 25,000 × 3 = 600,000. What the smaller count cannot give is
           made up by B′'s warm start and the scaled rate, not by more rollouts.
  one operating point  phase E trains at the threshold calibrated on calib for the target with the
           phase-C selectors (rollouts sample σ(z − τ₀), so keep iff z ≥ τ₀ is the mode of the
           policy), and inference recalibrates on calib as a small final correction: the record
           gives τ₀, the final τ and the learned model's own speedup at τ₀ against the target.
  chosen   α_E for the target on calib: from alpha·(target − 1), walked by `alpha_factor` (down while
           the trained model's own calib speedup at τ₀ is above the target, up while below; at most
           `alpha_tries` more phase-E trainings, each cached), keeping the α whose own speedup is
           nearest the target (toolbox.walk_to_target; calib, never dev).
  diagnostics  the rank correlation of the selectors' logits with the phase-B scores on calib (per
           point and example over real non-[CLS] tokens, averaged), and each point's keep rate at
           p ≥ 0.5 before training (fresh selectors) and at τ₀ after.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from tokenprune import flops
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy, TokenState
from tokenprune.errors import UserError
from tokenprune.evaluate import run_eval
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import (calib_speedups, learning_record, meet_target, rank_correlation, rationale_recall,
                                        teacher_logits, travel, travel_lr, walk_settings, walk_to_target)
from tokenprune.train import default_param_groups, fit, task_loss, to_device

log = logging.getLogger(__name__)

CODE = "trbert-2"  # bump when a phase's code changes what it produces


# ---- geometry ------------------------------------------------------------------------------------

def selection_points(layers: int) -> list[int]:
    """0-based layers before which the selectors run: 1 and L//2 (one point when they coincide)."""
    points = sorted({p for p in (1, layers // 2) if 1 <= p < layers})
    if not points:
        raise UserError(f"method=trbert needs a backbone of at least 2 layers, and this one has {layers}.")
    return points


def score_layers(layers: int) -> tuple[int, list[int]]:
    """(reference layer r, source layers σ_s) of the phase-B scores, as layer outputs (0-based).
    The sources are the layers whose outputs enter the selection points; r = 2L//3 as in the original
    (8 of 12, 4 of 6), kept past the last source and inside the model."""
    sources = [p - 1 for p in selection_points(layers)]
    ref = min(max(2 * layers // 3, sources[-1] + 1), layers - 1)
    return ref, sources


# ---- the policy ----------------------------------------------------------------------------------

class Selector(nn.Module):
    """p = σ(w₂ᵀ GELU(W₁h + b₁) + b₂); forward returns the logit."""

    def __init__(self, d: int, hidden: int = 32):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(h))).squeeze(-1)


class TrBertPolicy(TokenPolicy):
    """The two selectors as a token policy.

    action: `threshold` (inference: keep iff logit ≥ tau), `sample` (Bernoulli rollouts, the NLL
    recorded for the policy loss), or `full` (nothing dropped, logits recorded: phase B′).
    """

    def __init__(self, d: int, layers: int, hidden: int = 32):
        super().__init__()
        self.points = selection_points(layers)
        self.selectors = nn.ModuleList(Selector(d, hidden) for _ in self.points)
        self.token_flops = 2.0 * (d * hidden + hidden)  # the two matmuls, per token
        self.action = "threshold"
        self.tau = 0.0  # logit threshold: p ≥ 0.5
        self.batch_max = False
        self.detach_input = True
        self.guide: Tensor | None = None  # B×S×N phase-B scores by original position
        self.guide_rows: Tensor | None = None  # B bool: rows that imitate the heuristic
        self.records: list[dict] = []

    def start(self, state: TokenState) -> None:
        self.records = []

    def decision_points(self, num_layers: int) -> tuple[tuple[int, str], tuple[int, str]]:
        return (self.points[0], "before"), (self.points[-1], "before")

    def before_layer(self, layer: int, state: TokenState) -> Decision | None:
        if layer not in self.points:
            return None
        s = self.points.index(layer)
        alive = state.mask
        counts = alive.sum(1)
        active = counts > 1  # only [CLS] left: no selection, no selector run
        cand = alive.clone()
        cand[:, 0] = False  # [CLS] is not an action
        cand &= active[:, None]
        cost = self.token_flops * counts.to(torch.float64) * active.to(torch.float64)
        h = state.hidden.detach() if self.detach_input else state.hidden
        with torch.enable_grad() if self.training else nullcontext():
            z = self.selectors[s](h)
        if self.action == "full":
            self.records.append({"logits": z, "cand": cand})
            return Decision(flops=cost)
        if self.action == "sample":
            keep = self._sample(s, z, cand, state)
        else:
            keep = self._threshold(z, cand)
        keep[:, 0] = True
        keep = torch.where(active[:, None], keep, alive)
        return Decision(keep=keep, flops=cost)

    def _threshold(self, z: Tensor, cand: Tensor) -> Tensor:
        keep = (z >= self.tau) & cand
        if not self.batch_max:
            return keep
        k = int(keep.sum(1).max())  # the original: every row keeps the batch's largest count, by p
        counts = cand.sum(1).clamp(max=k)  # padding is never kept, even where K exceeds a row's tokens
        if k == 0:
            return keep
        top = z.masked_fill(~cand, float("-inf")).topk(min(k, z.shape[1]), dim=1).indices
        chosen = torch.arange(top.shape[1], device=z.device) < counts[:, None]
        return torch.zeros_like(cand).scatter_(1, top, chosen)

    def _sample(self, s: int, z: Tensor, cand: Tensor, state: TokenState) -> Tensor:
        # rollouts sample around the inference threshold: keep iff z ≥ tau is keep iff σ(z − tau) ≥ 0.5
        with torch.enable_grad() if self.training else nullcontext():
            z = z - self.tau
        p = torch.sigmoid(z.detach())
        action = (torch.bernoulli(p) > 0) & cand
        if self.guide is not None and self.guide_rows is not None and bool(self.guide_rows.any()):
            scores = self.guide[:, s].gather(1, state.positions).masked_fill(~cand, float("-inf"))
            m = torch.round((p * cand).sum(1)).long()
            order = scores.argsort(dim=1, descending=True)
            ranks = order.argsort(dim=1)
            heuristic = (ranks < m[:, None]) & cand
            action = torch.where(self.guide_rows[:, None], heuristic, action)
        a = action.to(z.dtype)
        with torch.enable_grad() if self.training else nullcontext():
            nll = -(a * F.logsigmoid(z) + (1 - a) * F.logsigmoid(-z)) * cand.to(z.dtype)
            nll = nll.sum(1) / cand.sum(1).clamp(min=1).to(z.dtype)
        self.records.append({"nll": nll, "kept": action.sum(1) + 1, "counts": state.mask.sum(1), "action": action,
                             "cand": cand, "input": state.hidden.detach()})
        return action

    # what a rollout left behind, for the losses
    def nll(self) -> Tensor:
        return torch.stack([r["nll"] for r in self.records]).sum(0)

    def kept_fraction(self, lengths: Tensor) -> Tensor:
        """ΔL: mean over the points of the tokens kept there, relative to the real input length
        (where no selection ran, everything still in play counts as kept)."""
        kept = []
        for r in self.records:
            kept.append(torch.where(r["counts"] > 1, r["kept"], r["counts"]).to(torch.float32))
        return torch.stack(kept).mean(0) / lengths.to(torch.float32)


class _Trainer(nn.Module):
    """Backbone + policy through the PrunableEncoder in mask mode, for `train.fit`. A frozen backbone
    stays in eval mode (no dropout) while the selectors train."""

    def __init__(self, backbone: nn.Module, policy: TrBertPolicy, freeze_backbone: bool):
        super().__init__()
        self.backbone, self.policy = backbone, policy
        # not a registered submodule: backbone and policy are already registered here
        object.__setattr__(self, "encoder", PrunableEncoder(backbone, policy, mode="mask"))
        self.freeze = freeze_backbone
        for p in backbone.parameters():
            p.requires_grad_(not freeze_backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.training = mode
        if self.freeze:
            self.backbone.eval()
        return self


# ---- losses --------------------------------------------------------------------------------------

def soft_loss(logits: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row soft cross-entropy to the teacher's distribution (MSE to its output for regression)."""
    if logits.shape[-1] == 1:
        return (logits[:, 0] - teacher[:, 0]) ** 2
    target = F.softmax(teacher / temperature, dim=-1)
    return -(target * F.log_softmax(logits / temperature, dim=-1)).sum(-1)


def reward(task: Tensor, kept_fraction: Tensor, alpha: float) -> Tensor:
    """R = −task loss − α·ΔL (no gradient)."""
    return (-task - alpha * kept_fraction).detach()


def policy_loss(rewards: Tensor, nll: Tensor, rollouts: int) -> Tensor:
    """REINFORCE with the per-example mean baseline: mean over rows of (R − mean_K R)·NLL. Rows are
    example-major (rows i·K … i·K + K − 1 are example i's rollouts)."""
    r = rewards.view(-1, rollouts)
    advantage = (r - r.mean(1, keepdim=True)).flatten()
    return (advantage * nll).mean()


def rank_targets(scores: Tensor, mask: Tensor) -> Tensor:
    """y_t = 1 − rank_t/n over each row's real tokens (best token rank 0); 0 on padding."""
    s = scores.masked_fill(~mask, float("-inf"))
    ranks = s.argsort(dim=1, descending=True).argsort(dim=1).to(torch.float32)
    n = mask.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    return torch.where(mask, 1 - ranks / n, torch.zeros_like(ranks))


# ---- phase B: residual-strategy scores -----------------------------------------------------------

def residual_scores(backbone: nn.Module, loader, device: torch.device, layers: int) -> dict[int, np.ndarray]:
    """{example idx: S×n scores} over real tokens, with the backbone in eval mode."""
    ref, sources = score_layers(layers)
    backbone.eval()
    out: dict[int, np.ndarray] = {}
    for batch in loader:
        batch = to_device(batch, device)
        with torch.enable_grad():
            res = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"], output_hidden_states=True)
            hs = res.hidden_states  # hs[k + 1]: the output of layer k
            loss = task_loss(res.logits, batch["labels"]).sum()
            grad = torch.autograd.grad(loss, hs[ref + 1])[0]
        with torch.no_grad():
            scores = torch.stack([(grad * (hs[ref + 1] - hs[src + 1])).sum(-1).abs() for src in sources], 1)
        lengths = batch["attention_mask"].sum(1)
        for row, idx in enumerate(batch["idx"].tolist()):
            out[idx] = scores[row, :, : int(lengths[row])].float().cpu().numpy()
    return out


class TrBert(Method):
    name = "trbert"

    # ---- config -------------------------------------------------------------------------------
    def _cap(self, field: str) -> int | None:
        """The budget's cap on the RL phases (`budget.rl_rollouts`, `rl_max_examples`, `rl_epochs`):
        a budget scales how much of the costly rollouts a method runs; none set means no cap."""
        cap = self.cfg.budget.get(field)
        return int(cap) if cap else None

    @property
    def rollouts(self) -> int:
        k = int(self.cfg.method.rollouts)
        cap = self._cap("rl_rollouts")
        k = min(k, cap) if cap else k
        if k < 2:
            raise UserError(f"method.rollouts={k}: the mean baseline needs at least 2 rollouts per example; give 2 or more.")
        return k

    @property
    def epochs(self) -> int:
        cap = self._cap("rl_epochs")
        return min(int(self.cfg.budget.epochs), cap) if cap else int(self.cfg.budget.epochs)

    def selector_lr(self, steps: int) -> float:
        """The selectors' rate for a phase of `steps` steps: selector_lr (the paper's 3e-5) ×
        paper_steps / steps, capped at selector_lr_max (the travel rule); as given with travel=false."""
        m = self.cfg.method
        if not m.get("travel", True):
            return float(m.selector_lr)
        return travel_lr(float(m.selector_lr), float(m.paper_steps), steps, m.get("selector_lr_max"))

    def phase_steps(self) -> int:
        return max(1, self.epochs * len(self._loader(True, int(self.cfg.method.batch_size))))

    def alpha(self) -> float:
        """The task's α (phase C; phase E with calibrate=false)."""
        m = self.cfg.method
        if m.alpha is not None:
            return float(m.alpha)
        table = m.alpha_by_task
        return float(table.get(self.cfg.task.name, table.get("default", 1.0)))

    def alpha_joint(self, target: float) -> float:
        """Phase E's α: alpha·(target − 1) when calibrating to the target (0 at 1×, alpha at 2×,
        2·alpha at 3×); alpha itself otherwise."""
        if not self.cfg.method.calibrate:
            return self.alpha()
        return self.alpha() * (target - 1.0)

    def _check(self) -> None:
        m = self.cfg.method
        if not isinstance(m.calibrate, bool):
            raise UserError(f"method.calibrate={m.calibrate!r} is not valid: give true or false.")
        if not 0 <= float(m.guide_rate) <= 1:
            raise UserError(f"method.guide_rate={m.guide_rate} is not valid: give a fraction in [0, 1].")
        if not 0 < float(m.threshold) < 1:
            raise UserError(f"method.threshold={m.threshold} is not valid: give a probability in (0, 1).")
        if self.alpha() < 0:
            raise UserError(f"method.alpha={self.alpha()} is negative: give a length-penalty weight >= 0.")

    # ---- data -------------------------------------------------------------------------------------
    @cached_property
    def train_examples(self):
        """The examples phases B–E use: a seeded sample of train, capped by the budget."""
        ds = self.job.splits["train"]
        cap = self._cap("rl_max_examples")
        if cap and len(ds) > cap:
            rows = np.random.default_rng(self.cfg.seed + 17).permutation(len(ds))[:cap]
            ds = ds.select(sorted(rows.tolist()))
        return ds

    def _loader(self, train: bool, batch_size: int):
        # training batches of similar length (formed from the sorted order, then shuffled): mask
        # mode computes padding too, so this keeps the K-fold rollouts cheap
        return self.job.loader(self.train_examples, train=train, batch_size=batch_size, grouped=True)

    def _key(self, **phase) -> dict:
        n = len(self.train_examples)
        return {"backbone": self.job.backbone_key, "code": CODE, "train_examples": n, **phase}

    def _new_policy(self) -> TrBertPolicy:
        c = self.job.backbone.config
        return TrBertPolicy(int(c.hidden_size), int(c.num_hidden_layers), int(self.cfg.method.selector_hidden))

    def _guide_tensor(self, scores: dict[int, np.ndarray], idx: Tensor, width: int) -> Tensor:
        S = len(selection_points(self.job.backbone.config.num_hidden_layers))
        g = torch.zeros(len(idx), S, width)
        for row, i in enumerate(idx.tolist()):
            sc = scores[i]
            g[row, :, : sc.shape[1]] = torch.from_numpy(sc)
        return g

    # ---- phases -------------------------------------------------------------------------------------
    def train_phases(self, target: float) -> None:
        self._check()
        job, cfg, m = self.job, self.cfg, self.cfg.method
        device = job.device
        layers = int(job.backbone.config.num_hidden_layers)
        torch.manual_seed(cfg.seed)
        eval_bs = int(cfg.train.eval_batch_size)
        ref, sources = score_layers(layers)
        job.info.update(selection_points=selection_points(layers), reference_layer=ref, source_layers=sources,
                        rollouts=self.rollouts, epochs=self.epochs, alpha_rl=self.alpha(),
                        alpha_joint=self.alpha_joint(target), train_examples=len(self.train_examples))

        # B: residual-strategy scores
        key_b = self._key(phase="scores", ref=ref, sources=sources)

        def make_scores(tmp: Path) -> None:
            sc = residual_scores(job.backbone, self._loader(False, eval_bs), device, layers)
            np.savez_compressed(tmp / "scores.npz", **{str(k): v for k, v in sc.items()})

        path = job.phases.get("trbert-scores", key_b, make_scores)
        with np.load(path / "scores.npz") as z:
            scores = {int(k): z[k] for k in z.files}

        # B′: selector init by rank regression (optional)
        policy = self._new_policy()
        init_state = None
        if m.init_selector:
            key_i = {**key_b, "phase": "init", "epochs": self.epochs, "lr": self.selector_lr(self.phase_steps()),
                     "hidden": int(m.selector_hidden), "seed": cfg.seed, "batch_size": int(m.batch_size)}

            def make_init(tmp: Path) -> None:
                torch.manual_seed(cfg.seed)
                pol = self._new_policy()
                self._init_selectors(pol, scores)
                torch.save(pol.state_dict(), tmp / "policy.pt")

            path = job.phases.get("trbert-init", key_i, make_init)
            init_state = torch.load(path / "policy.pt", map_location="cpu")
            key_c_init = key_i
        else:
            key_c_init = None

        # C: selectors alone by REINFORCE, backbone frozen
        key_c = {**key_b, "phase": "rl", "init": key_c_init, "alpha": self.alpha(), "rollouts": self.rollouts,
                 "epochs": self.epochs, "lr": self.selector_lr(self.phase_steps()), "guide_rate": float(m.guide_rate),
                 "hidden": int(m.selector_hidden), "seed": cfg.seed, "batch_size": int(m.batch_size),
                 "train": OmegaConf.to_container(cfg.train, resolve=True)}

        def make_rl(tmp: Path) -> None:
            torch.manual_seed(cfg.seed)
            pol = self._new_policy()
            if init_state is not None:
                pol.load_state_dict(init_state)
            hist = self._reinforce(job.backbone, pol, scores, self.alpha(), joint=False)
            torch.save(pol.state_dict(), tmp / "policy.pt")
            (tmp / "info.json").write_text(json.dumps(hist))

        path = job.phases.get("trbert-rl", key_c, make_rl)
        policy.load_state_dict(torch.load(path / "policy.pt", map_location="cpu"))
        self._model = job.backbone
        self._policy = policy

        if not m.joint:
            return

        # D: the backbone's logits on the training examples (the shared teacher-logits phase)
        teacher = teacher_logits(job, self.train_examples)

        # the operating point E trains at: the threshold the phase-C selectors need for the target on calib
        self.tau0, self.tau0_speedup = self._fit_threshold(job.backbone, policy, target)
        pol_c = policy.state_dict()

        def train_joint(alpha_e: float):
            key_e = {**key_c, "phase": "joint", "rl": key_c, "alpha_joint": alpha_e, "tau": self.tau0,
                     "lr_backbone": float(m.lr), "detach": bool(m.detach_selector_input),
                     "temperature": float(m.teacher_temperature)}

            def train(tmp: Path):
                torch.manual_seed(cfg.seed)
                backbone = copy.deepcopy(job.backbone).to(device)
                pol = self._new_policy()
                pol.load_state_dict(pol_c)
                pol.detach_input = bool(m.detach_selector_input)
                pol.tau = self._tau_for_training()
                # each α the walk trains keeps a W&B curve of its own (no "." in the name: W&B nests dotted keys)
                curve = "trbert joint" if alpha_e == self.alpha_joint(target) else f"trbert joint-alpha{alpha_e:.0e}"
                hist = self._reinforce(backbone, pol, scores, alpha_e, joint=True, teacher=teacher, curve=curve)
                torch.save(pol.state_dict(), tmp / "policy.pt")
                return backbone, hist

            model, info, path = job.phases.model("trbert-joint", key_e, train)
            pol = self._new_policy()
            pol.load_state_dict(torch.load(path / "policy.pt", map_location="cpu"))
            return model, info, pol, job.phases.record["trbert-joint"]

        # E: joint training, α walked to the target on calib (own speedup at the training threshold)
        trained: dict[float, tuple] = {}

        def own_speedup(alpha_e: float) -> float:
            trained[alpha_e] = train_joint(alpha_e)
            model, _, pol, _ = trained[alpha_e]
            return self._speedup_with(model, pol, self._tau_for_training(), self.job.loader("calib"))

        alpha_e, self.alpha_grid = walk_to_target(self.alpha_joint(target), own_speedup, target,
                                                  tries=self.alpha_tries(target),
                                                  factor=walk_settings(m, "alpha", "alpha·(speedup − 1)")[1])
        model, info, policy, phase_record = trained[alpha_e]
        job.phases.record["trbert-joint"] = phase_record  # the chosen α's phase, not the last one walked
        self.alpha_e = alpha_e
        self.own_speedup = next(g["own_speedup"] for g in self.alpha_grid if g["value"] == alpha_e)
        job.info["alpha_joint"] = alpha_e
        self.retrained_steps = info["history"][-1]["steps"]  # phase E; phase C leaves the backbone frozen
        self._model, self._policy = model, policy

    def _tau_for_training(self) -> float:
        """The threshold logit phase E samples around: the calibrated τ₀, or the fixed threshold's logit."""
        m = self.cfg.method
        if m.calibrate:
            return float(self.tau0) if math.isfinite(self.tau0) else 20.0
        return math.log(float(m.threshold) / (1 - float(m.threshold)))

    def alpha_tries(self, target: float) -> int:
        m = self.cfg.method
        tries, _ = walk_settings(m, "alpha", "alpha·(speedup − 1)")
        # α_E = 0 at speedup=1: a walk by factors cannot leave 0
        return tries if bool(m.calibrate) and target != 1.0 and self.alpha_joint(target) > 0 else 0

    def _init_selectors(self, policy: TrBertPolicy, scores: dict[int, np.ndarray]) -> None:
        device, backbone = self.job.device, self.job.backbone
        trainer = _Trainer(backbone, policy, freeze_backbone=True)
        policy.action = "full"

        def step(tr: _Trainer, batch: dict) -> Tensor:
            mask = batch["attention_mask"].bool()
            g = self._guide_tensor(scores, batch["idx"].cpu(), mask.shape[1]).to(device)
            with torch.no_grad():
                tr.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss = 0.0
            for s, rec in enumerate(policy.records):
                y = rank_targets(g[:, s], mask)
                err = (torch.sigmoid(rec["logits"]) - y).abs() * mask
                loss = loss + (err.sum(1) / mask.sum(1)).mean()
            return loss

        groups = [{"params": list(policy.parameters()), "lr": self.selector_lr(self.phase_steps()), "weight_decay": 0.0}]
        try:
            fit(trainer, self._loader(True, int(self.cfg.method.batch_size)), train_cfg=self.cfg.train,
                epochs=self.epochs, device=device, step_fn=step, param_groups=groups, log_fn=self.job.log,
                desc="trbert init")
        finally:
            for p in backbone.parameters():
                p.requires_grad_(True)
            backbone.eval()
            policy.action = "threshold"

    def _reinforce(self, backbone: nn.Module, policy: TrBertPolicy, scores: dict[int, np.ndarray], alpha: float,
                   joint: bool, teacher: dict | None = None, curve: str | None = None) -> dict:
        """Phase C (joint=False: selectors only, heuristic imitation at first) or E (joint=True)."""
        m, device, K = self.cfg.method, self.job.device, self.rollouts
        loader = self._loader(True, int(m.batch_size))
        trainer = _Trainer(backbone, policy, freeze_backbone=not joint)
        guide_steps = 0 if joint else int(float(m.guide_rate) * self.epochs * len(loader))
        state = {"step": 0}
        policy.action = "sample"
        stats: list[dict] = []

        def step(tr: _Trainer, batch: dict) -> Tensor:
            tile = lambda x: x.repeat_interleave(K, dim=0)  # noqa: E731 (example-major rows)
            ids, mask, types = tile(batch["input_ids"]), tile(batch["attention_mask"]), tile(batch["token_type_ids"])
            if state["step"] < guide_steps:
                policy.guide = tile(self._guide_tensor(scores, batch["idx"].cpu(), ids.shape[1])).to(device)
                policy.guide_rows = torch.arange(ids.shape[0], device=device) % K == 0
            else:
                policy.guide = policy.guide_rows = None
            with nullcontext() if joint else torch.no_grad():
                out = tr.encoder(ids, mask, types)
            if joint:
                t = torch.stack([teacher[i] for i in batch["idx"].tolist()]).to(device)
                task = soft_loss(out.logits, tile(t), float(m.teacher_temperature))
            else:
                task = task_loss(out.logits, tile(batch["labels"]), reduction="none")
            frac = policy.kept_fraction(out.trace.lengths)
            r = reward(task, frac, alpha)
            loss = policy_loss(r, policy.nll(), K)
            if joint:
                loss = loss + task.mean()
            if len(stats) < 10_000:
                stats.append({"reward": float(r.mean()), "kept": float(frac.mean()), "task": float(task.detach().mean())})
            return loss

        def after(step_no: int) -> None:
            state["step"] = step_no

        groups = [{"params": list(policy.parameters()), "lr": self.selector_lr(self.phase_steps()), "weight_decay": 0.0}]
        if joint:
            groups += default_param_groups(backbone, float(m.lr), float(self.cfg.train.weight_decay))
        try:
            info = fit(trainer, loader, train_cfg=self.cfg.train, epochs=self.epochs, device=device, step_fn=step,
                       param_groups=groups, after_step=after, log_fn=self.job.log,
                       desc=curve or ("trbert joint" if joint else "trbert rl"))
        finally:
            for p in backbone.parameters():
                p.requires_grad_(True)
            backbone.eval()
            policy.action, policy.guide, policy.guide_rows = "threshold", None, None
        n = max(1, len(stats) // 10)
        info["first"] = {k: float(np.mean([s[k] for s in stats[:n]])) for k in stats[0]} if stats else {}
        info["last"] = {k: float(np.mean([s[k] for s in stats[-n:]])) for k in stats[0]} if stats else {}
        return info

    # ---- the knob -------------------------------------------------------------------------------------
    def _threshold_policy(self, policy: TrBertPolicy, tau: float) -> TrBertPolicy:
        """A copy of `policy`'s selectors deciding at threshold logit `tau` (inference)."""
        pol = self._new_policy()
        pol.load_state_dict(policy.state_dict())
        pol.tau, pol.batch_max, pol.action = tau, bool(self.cfg.method.batch_max), "threshold"
        return pol.to(self.job.device).eval()

    def _speedup_with(self, model: nn.Module, policy: TrBertPolicy, tau: float, loader) -> float:
        pol = self._threshold_policy(policy, tau)
        res = run_eval(model, pol, loader, self.job.device, mode="gather", progress=False)
        return flops.canonical_speedup(res, model.config, self.job.backbone.config)

    def _calib_logits(self, model: nn.Module, policy: TrBertPolicy) -> list[tuple[Tensor, list[Tensor], Tensor]]:
        """Per calib batch: (idx, each point's logits with nothing dropped, the candidates mask)."""
        pol = self._new_policy()
        pol.load_state_dict(policy.state_dict())
        pol.action = "full"
        enc = PrunableEncoder(model, pol.to(self.job.device), mode="mask").eval()
        out = []
        with torch.inference_mode():
            for batch in self.job.loader("calib"):
                batch = to_device(batch, self.job.device)
                enc(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                out.append((batch["idx"].cpu(), [r["logits"].float().cpu() for r in pol.records],
                            [r["cand"].cpu() for r in pol.records]))
        return out

    def _fit_threshold(self, model: nn.Module, policy: TrBertPolicy, target: float,
                       start: float | None = None) -> tuple[float, float]:
        """(τ, calib speedup): a threshold logit whose canonical FLOPs speedup on calib, in gather mode
        with the eval batching, meets the target within calib_rtol (`meet_target` on the logit, passes
        that compute only the layers a threshold changes: `calib_speedups`); from `start` (the τ₀
        phase E trained at) when given, else over the unpruned logits' range."""
        m = self.cfg.method
        lo, hi = math.inf, -math.inf
        for _, logits, cands in self._calib_logits(model, policy):  # the unpruned logits bound the search
            for z, c in zip(logits, cands):
                if c.any():
                    lo, hi = min(lo, float(z[c].min())), max(hi, float(z[c].max()))
        if not math.isfinite(lo):
            lo, hi = -1.0, 1.0
        lo, hi = lo - 1.0, hi + 1.0

        def extremes():  # pruned runs can see logits beyond the unpruned range: widen, then keep only [CLS]
            h = hi
            yield h
            for _ in range(6):
                h += 2 * (h - lo)
                yield h
            yield math.inf

        pol = self._threshold_policy(policy, lo)
        speedup = calib_speedups(self.job, model, pol, "threshold" if start is None else "threshold from tau0")

        def speedup_at(tau: float) -> float:
            pol.tau = tau
            return speedup()

        walk = {} if start is None or not math.isfinite(start) else {"start": start, "start_step": (hi - lo) / 32}
        return meet_target(speedup_at, target, gentle=lo, extreme=extremes(), steps=int(m.calib_iters),
                           rtol=float(self.job.cfg.calib_rtol), **walk,
                           method="trbert", extreme_means="even keeping only [CLS] after layer 0")

    def choose_knob(self, target: float) -> dict:
        m = self.cfg.method
        if not m.calibrate:
            self.tau = math.log(float(m.threshold) / (1 - float(m.threshold)))
            knob = {"threshold": float(m.threshold), "alpha_joint": self.alpha_joint(target), "knob": "alpha"}
        else:
            self.tau, s_hi = self._fit_threshold(self._model, self._policy, target,
                                                 start=self.tau0 if m.joint else None)
            threshold = 1.0 if self.tau == math.inf else 1 / (1 + math.exp(-self.tau))
            knob = {"threshold": threshold, "threshold_logit": self.tau, "calib_speedup": s_hi,
                    "alpha_joint": getattr(self, "alpha_e", self.alpha_joint(target)), "knob": "speedup",
                    "batch_max": bool(m.batch_max)}
        self.learning = self.learning_block(target)
        return knob

    def learning_block(self, target: float) -> dict:
        """The record's `learning` block: each point's keep rate with nothing dropped before it, from the
        fresh selectors at p ≥ 0.5 to the trained ones at the threshold E trained at (τ₀),
        the rank correlation of the logits with the phase-B scores on calib, the operating point."""
        m, job = self.cfg.method, self.job
        layers = int(job.backbone.config.num_hidden_layers)
        torch.manual_seed(self.cfg.seed)
        fresh = self._new_policy()

        def keep_rates(model, policy, tau=0.0) -> list[float]:
            kept = total = None
            for _, logits, cands in self._calib_logits(model, policy):
                k = [float(((z >= tau) & c).sum()) for z, c in zip(logits, cands)]
                n = [float(c.sum()) for c in cands]
                kept = k if kept is None else [a + b for a, b in zip(kept, k)]
                total = n if total is None else [a + b for a, b in zip(total, n)]
            return [a / max(b, 1.0) for a, b in zip(kept, total)]

        trained = self._calib_logits(self._model, self._policy)
        calib_scores = residual_scores(job.backbone, job.loader("calib"), job.device, layers)
        scores, signal, masks = [], [], []
        points = len(selection_points(layers))
        signal_rows, score_rows = [[] for _ in range(points)], [[] for _ in range(points)]
        for idx, logits, cands in trained:
            for row, i in enumerate(idx.tolist()):
                sc = calib_scores[int(i)]
                for s, (z, c) in enumerate(zip(logits, cands)):
                    n = sc.shape[1]
                    scores.append(z[row, :n])
                    signal.append(sc[s])
                    masks.append(c[row, :n])
                    signal_rows[s].append((i, sc[s]))
                    score_rows[s].append((i, z[row, :n]))
        rationale = [rationale_recall(job, sig, sco) for sig, sco in zip(signal_rows, score_rows)]
        steps = self.phase_steps()
        lr = self.selector_lr(steps)
        tau0 = self._tau_for_training() if m.joint else 0.0
        final_tau = self.tau if math.isfinite(self.tau) else 20.0
        rollouts_seen = self.rollouts * len(self.train_examples) * self.epochs
        return learning_record(
            self.name,
            # no clip bounds these (the selectors are free MLPs): no bound to warn about
            {"keep_rate": {"initial": keep_rates(job.backbone, fresh), "final": keep_rates(self._model, self._policy, tau0),
                           "bounds": None, "lr": lr}},
            schedule=keep_rates(self._model, self._policy, final_tau), target=target,
            own_speedup=getattr(self, "own_speedup", None),
            calibration={"kind": "threshold logit, from the one phase E trained at", "from": round(float(tau0), 6),
                         "to": round(float(final_tau), 6), "shift": round(float(final_tau - tau0), 6),
                         "applied": bool(m.calibrate)},
            rank_corr=rank_correlation(scores, signal, masks), signal="phase-B scores (selector logits on calib)",
            extra={"alpha_joint": getattr(self, "alpha_e", None), "alpha_grid": getattr(self, "alpha_grid", None),
                   "selector_lr": lr, "steps": steps, "paper_steps": float(m.paper_steps),
                   "travel": round(travel(steps, lr), 4),
                   "paper_travel": round(travel(float(m.paper_steps), float(m.selector_lr)), 4),
                   "rollouts": self.rollouts, "rollouts_seen": rollouts_seen, "paper_rollouts": 8 * 25000 * 3,
                   "init_selector": bool(m.init_selector),
                   # per selection point, on a task with gold rationales: do phase B and the selectors rank them first?
                   "rationale_recall": None if rationale[0] is None else rationale})

    def policy_at(self, tau: float) -> TrBertPolicy:
        pol = self._new_policy()
        pol.load_state_dict(self._policy.state_dict())
        pol.tau, pol.batch_max, pol.action = tau, bool(self.cfg.method.batch_max), "threshold"
        return pol.to(self.job.device).eval()

    def model(self) -> nn.Module:
        return self._model

    def policy(self) -> TrBertPolicy:
        return self.policy_at(self.tau)

