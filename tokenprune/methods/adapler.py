"""method=adapler: AdapLeR (Modarressi, Mohebbi & Pilehvar, ACL 2022), written from the paper and
its description of the published recipe, not from the published code (§ numbers are the paper's).

Inference: before every layer ℓ (layer 0 included) a contribution predictor (CP_ℓ, an MLP d→32→1)
scores the live tokens; softmax over them gives each one's predicted share p_ℓ(t). A token other
than [CLS] survives iff p_ℓ(t) >= η_ℓ / n_ℓ, with n_ℓ the live length ([CLS] and [SEP] counted) and
η_ℓ a learned per-layer threshold in [0.01, 1]. [CLS] always stays; [SEP] may go. In `gather` mode
the dropped tokens are physically removed, each example keeping its own set.

Phases (each cached; none depends on the speedup target):

  B  saliency   s_t = ‖(∂z_y/∂e_t) ⊙ e_t‖₂ at the embedding output e, z_y the gold logit (the
                output for regression), on the training split, averaged over the best
                `saliency_checkpoints` fine-tuning epochs (by calib score).
  C  training   soft removal (§3.2) with steepness λ rising per epoch; two losses, two optimisers:
                  model (backbone, CPs, classifier): CE + γ Σ_ℓ (L−ℓ) KL(ŝ_ℓ ‖ p_ℓ)
                  thresholds η:                      CE + φ · mean_batch Σ_ℓ n_ℓ
                ŝ_ℓ is the saliency restricted to the soft mask entering layer ℓ, renormalised.
                Checkpoint: the fastest epoch (canonical FLOPs, hard decisions, η as learned)
                whose calib score is within `within` points of the fine-tuned model's calib score
                (equal speedups: the better score); if none is, the epoch with the best calib score.

Knob: `phi`/`gamma` shape training; the `speedup` target is met after training by one multiplier
on all η_ℓ whose canonical FLOPs speedup on calib meets the target, within `calib_rtol` above it
(an ITP search over count passes that starts at 1, η as learned: `toolbox.meet_target`).

Why two optimisers and not `train.fit`: the two parameter groups are trained on *different* losses
(the KL must not move η, the length term must not move the CPs or the backbone), each with its own
grad-norm clip, which one loss and one optimiser cannot express. The loop below reuses train.py's
pieces (parameter groups, warmup schedule, divergence check) and is otherwise fit's loop.

What differs from the published code, and why:
  - The threshold optimiser's gradient goes to the variables its loss used (η). The published
    code took the gradient w.r.t. the [CLS] factor used in the forward (THETA_PR, never updated)
    and applied it to the [CLS] factor of the KL *target* (THETA). Here the [CLS] factor is 1 in
    both the prediction and the target, which is what the published forward computed; nothing
    reshapes the target.
  - Counts come from the tokens each layer really processed, all with the η_ℓ / n_ℓ rule; the
    published FLOPs counted the last layer's survivors with η instead of η / n.
  - λ follows the per-epoch schedule from the first step (the published variable is 1000 for the
    very first step only). The schedule for epoch counts other than 3/5/10 is ours (geometric).
  - By default phase C starts from the cached fine-tuned backbone (method.init=pretrained
    reproduces the published script), and checkpoints are chosen on calib, never on dev.
  - Evaluation removes tokens physically per example (the published batched evaluation masked
    them with −10000 and counted them analytically).
  - With saliency_checkpoints=1 (our budgets' default) the target is the best checkpoint's
    saliency only; >1 re-runs fine-tuning once (same recipe and seed, cached), keeping every epoch.
  - The speedup target is met by scaling η post hoc (the reference's "not the authors' protocol"
    alternative); method.calibrate=false keeps the learned η, as in the paper.

What is kept from the paper, and what is scaled to the budget (issue 19):
  kept     the losses (CE + γ·Σ(L−ℓ)KL for the model, CE + φ·Σ n_ℓ for η), the two optimisers, the
           soft-removal function and β, the paper's λ values (reached at the same points of training),
           η's clip [0.01, 1], the hard rule p ≥ η/n at inference, the checkpoint rule, γ.
  scaled   learning rates of the learned knobs, by the travel rule (toolbox.travel_lr): Adam moves a
           parameter by at most its lr per step, 0.5·steps·lr in all under warm-up and linear decay.
           The paper's recipe (README, SST-2) runs paper_steps = 5 epochs × ceil(67,349 / 32) = 10,525
           steps, so on `steps` steps here
             η:   eta_lr = min(5e-4 · paper_steps / steps, eta_lr_max)  (η may travel 0.5·10,525·5e-4 ≈ 2.6,
                  as in the paper; one step never moves η by more than eta_lr_max = 0.05 of its range)
             CPs: cp_lr  = min(3e-5 · paper_steps / steps, cp_lr_max)  (their own rate; the backbone
                  keeps `lr`; cap 3e-3)
           (quick SST-2, 189 steps: 0.028 and 1.7e-3, below the caps; the caps bind on tiny budgets only)
           Without it, η moved 0.25 → 0.263 and the CPs stayed nearly uniform on a quick budget.
  ramped   λ grows geometrically per step from the first epoch's value to the last's (the paper's
           per-epoch values, reached along the way), instead of jumping per epoch: a jump of 50× made
           Adam's running moments stale and its later steps on η tiny.
  chosen   φ for the target on calib (calibrate=true and a target > 1): starting at the paper's φ,
           walked by `phi_factor` (down while the checkpoint's own calib speedup is above the target,
           up while below; at most `phi_tries` more trainings, each cached; then the bracket's
           geometric midpoint), keeping the φ whose trained model's own speedup is nearest the target
           (toolbox.walk_to_target; calib, never dev). Calibration on calib then applies a multiplier
           on η, recorded in the `learning` block with η's movement, the learned η per layer and the
           rank correlation of CP_0's scores with the saliency target on calib.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from tokenprune import data as task_data
from tokenprune import flops
from tokenprune.backbones import hf_inputs
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy, TokenState, backbone_parts
from tokenprune.errors import UserError
from tokenprune.evaluate import score
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import (calib_result, calib_score, calib_speedups, learning_record, meet_target, rank_correlation,
                                        rationale_recall, travel, travel_lr, walk_settings, walk_to_target)
from tokenprune.train import MODEL_INPUTS, TrainingDiverged, default_param_groups, task_loss, to_device

log = logging.getLogger(__name__)

FLOOR = -1e4  # the log-mask floor of a removed token (the published −10000)


# ---- the pieces, as functions (tested on their own) ----------------------------------------------

def soft_removal(p: Tensor, delta: Tensor, lam: float, beta: float = 0.1) -> Tensor:
    """AdapLeR's soft-removal log-factor e (§3.2): ~0 for p well above δ, ~−1e4 well below,
    clip_[−1e4, 0] min((λ/δ)(p − δ) − β/λ, (p − 1)(β/λ)/(1 − δ)). As λ → ∞ it is the hard rule
    (0 iff p >= δ). δ may exceed 1 (a scaled η); the second branch is then dropped."""
    first = (lam / delta) * (p - delta) - beta / lam
    second = (p - 1) * (beta / lam) / (1 - delta).clamp_min(1e-6)
    second = torch.where(delta < 1, second, torch.zeros_like(second))
    return torch.minimum(first, second).clamp(FLOOR, 0.0)


def restricted_target(saliency: Tensor, logmask: Tensor, real: Tensor) -> Tensor:
    """log ŝ: the saliency restricted to the (soft) mask and renormalised over real tokens; padding −inf."""
    logs = torch.log(saliency.clamp_min(1e-20)) + logmask
    logs = logs.masked_fill(~real, float("-inf"))
    return logs - torch.logsumexp(logs, dim=-1, keepdim=True)


def kl_to_prediction(log_target: Tensor, log_pred: Tensor, real: Tensor) -> Tensor:
    """KL(ŝ ‖ p) per example over the real tokens (B,)."""
    # finite stand-ins at padding first: a −inf − −inf there would make NaN gradients through `where`
    log_target = log_target.masked_fill(~real, 0.0)
    log_pred = log_pred.masked_fill(~real, 0.0)
    target = torch.where(real, log_target.exp(), torch.zeros_like(log_target))
    return (target * (log_target - log_pred)).sum(-1)


def clip_eta(eta: Tensor, lo: float = 0.01, hi: float = 1.0) -> None:
    with torch.no_grad():
        eta.clamp_(lo, hi)


def lambda_schedule(epochs: int, lambdas: Any = None) -> list[float]:
    """λ per epoch: the given list, or the paper's schedule (3, 5, 10 epochs), else geometric 10 → 1e5."""
    if lambdas is not None:
        values = [float(v) for v in lambdas]
        if len(values) != epochs or any(v <= 0 for v in values):
            raise UserError(f"method.lambdas={values} must give one positive λ per epoch ({epochs}), or be null.")
        return values
    if epochs == 3:
        return [50.0 * 50.0**e for e in range(3)]
    if epochs == 5:
        return [10.0 * 10.0**e for e in range(5)]
    if epochs == 10:
        return [10.0 * 3.0**e for e in range(10)]
    if epochs == 1:
        return [10.0]
    return [10.0 * (1e4) ** (e / (epochs - 1)) for e in range(epochs)]


def lambda_at(step: int, total: int, lambdas: list[float]) -> float:
    """λ at optimiser step `step` of `total`: geometric from the first epoch's value to the last's
    (the per-epoch values of a geometric schedule are reached along the way), so λ never jumps."""
    if total <= 1 or len(lambdas) == 1:
        return float(lambdas[0])
    u = min(max(step / (total - 1), 0.0), 1.0)
    return float(lambdas[0] * (lambdas[-1] / lambdas[0]) ** u)


def saliency_of(model: nn.Module, batch: dict) -> Tensor:
    """B×N gradient×input saliency at the embedding output: ‖∂z_y/∂e_t ⊙ e_t‖₂ (padding 0); z_y the
    gold label's logit, or the output of a regression head."""
    base, _ = backbone_parts(model)
    kept: list[Tensor] = []

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        kept.append(leaf)
        return leaf

    handle = base.embeddings.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(**hf_inputs(model, batch, MODEL_INPUTS)).logits
            if logits.shape[-1] == 1:
                gold = logits[:, 0]
            else:
                gold = logits.gather(1, batch["labels"].long()[:, None])[:, 0]
            (grad,) = torch.autograd.grad(gold.sum(), kept[0])
    finally:
        handle.remove()
    sal = (grad * kept[0].detach()).norm(dim=-1)
    return sal * batch["attention_mask"].to(sal.dtype)


# ---- the policy ----------------------------------------------------------------------------------

class AdapLeRPolicy(TokenPolicy):
    """Contribution predictors and thresholds. Training (`self.training` and `lam` set): soft
    removal through key log-masks, recording what the losses need. Otherwise: hard decisions."""

    def __init__(self, layers: int, d: int, hidden: int = 32, eta_init: float = 0.25, beta: float = 0.1):
        super().__init__()
        self.cps = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, 1)) for _ in range(layers))
        self.eta = nn.Parameter(torch.full((layers,), float(eta_init)))
        self.beta = beta
        self.lam: float | None = None  # soft-removal steepness while training
        self.scale = 1.0  # post-hoc multiplier on every η_ℓ (calibration)
        self.d, self.hidden = d, hidden
        self.records: list[dict] = []
        self._logm: Tensor | None = None

    def cp_flops(self, tokens: Tensor) -> Tensor:
        """FLOPs of one CP on `tokens` live tokens per example: 2·(d·h + h) multiply-adds per token."""
        return tokens.to(torch.float64) * 2.0 * (self.d * self.hidden + self.hidden)

    def thresholds(self) -> Tensor:
        return self.eta * self.scale

    def start(self, state: TokenState) -> None:
        self.records = []
        self._logm = torch.zeros(state.mask.shape, dtype=state.hidden.dtype, device=state.hidden.device)

    def soft(self) -> bool:
        return self.training and self.lam is not None

    def decision_points(self, num_layers: int) -> tuple[tuple[int, str], tuple[int, str]]:
        return (0, "before"), (num_layers - 1, "before")  # a CP before every layer, none after

    def before_layer(self, layer: int, state: TokenState) -> Decision:
        live = state.mask
        z = self.cps[layer](state.hidden).squeeze(-1).to(torch.float32)
        cp = self.cp_flops(live.sum(1))
        eta = self.thresholds()[layer]
        if not self.soft():
            logp = z.masked_fill(~live, float("-inf")).log_softmax(-1)
            n = live.sum(1, keepdim=True).to(logp.dtype)
            keep = (logp.exp() >= eta / n) & live
            keep[:, 0] = True
            return Decision(keep=keep, flops=cp)
        logm = self._logm
        logp = (z + logm).masked_fill(~live, float("-inf")).log_softmax(-1)
        mass = torch.where(live, logm.exp(), torch.zeros_like(logm))
        n_in = mass[:, 1:].sum(1, keepdim=True) + 1  # soft live length, [CLS] counted as 1
        delta = eta / n_in
        e = soft_removal(logp.exp(), delta, self.lam, self.beta)
        e = torch.where(live, e, torch.zeros_like(e))
        e = torch.cat([torch.zeros_like(e[:, :1]), e[:, 1:]], dim=1)  # [CLS] is never touched
        new = (logm + e).clamp_min(FLOOR)
        mass_out = torch.where(live, new.exp(), torch.zeros_like(new))
        self.records.append({"logp": logp, "logm": logm, "live": live,
                             "n_out": mass_out[:, 1:].sum(1) + 1, "n_in": n_in[:, 0]})
        self._logm = new
        return Decision(key_logmask=(new - logm).to(state.hidden.dtype), flops=cp)


def make_policy(config: Any, mcfg: Any) -> AdapLeRPolicy:
    return AdapLeRPolicy(int(config.num_hidden_layers), int(config.hidden_size), int(mcfg.cp_hidden),
                         float(mcfg.eta_init), float(mcfg.beta))


def adapler_losses(policy: AdapLeRPolicy, saliency: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_ℓ (L−ℓ)·mean_batch KL(ŝ_ℓ ‖ p_ℓ), mean_batch Σ_ℓ n_ℓ) from a soft forward's records."""
    L = len(policy.records)
    kl = saliency.new_zeros(())
    length = saliency.new_zeros(())
    for layer, r in enumerate(policy.records):
        target = restricted_target(saliency, r["logm"], r["live"])
        per = kl_to_prediction(target, r["logp"], r["live"])
        per = torch.where(r["n_in"] - 1 > 1e-6, per, torch.zeros_like(per))  # nothing but [CLS] left
        kl = kl + (L - layer) * per.mean()
        length = length + r["n_out"].mean()
    return kl, length


# ---- the method ----------------------------------------------------------------------------------

class AdapLeR(Method):
    name = "adapler"

    # -- keys ---------------------------------------------------------------------------------
    def _saliency_key(self) -> dict:
        return {"backbone": self.job.backbone_key, "phase": "adapler-saliency",
                "checkpoints": self._n_checkpoints()}

    def _train_key(self, phi: float) -> dict:
        m = self.cfg.method
        params = {k: OmegaConf.to_container(m, resolve=True)[k] for k in (
            "init", "gamma", "cp_hidden", "eta_init", "eta_min", "eta_max", "beta", "lambdas", "lr", "within")}
        eta_lr, cp_lr = self._knob_lrs()
        params.update(phi=float(phi), eta_lr=eta_lr, cp_lr=cp_lr, lambda_ramp="per-step")
        return {"backbone": self.job.backbone_key, "phase": "adapler-train", "saliency": self._saliency_key(),
                "epochs": int(self.cfg.budget.epochs), "params": params}

    def _steps(self) -> int:
        return max(1, int(self.cfg.budget.epochs) * len(self.job.loader("train", train=True)))

    def _knob_lrs(self) -> tuple[float, float]:
        """(η's lr, the CPs' lr): the paper's rates (eta_lr, cp_lr) scaled by the travel rule
        (toolbox.travel_lr, paper_steps / this budget's steps), or as given with travel=false."""
        m = self.cfg.method
        eta_lr, cp_lr = float(m.eta_lr), float(m.cp_lr)
        if not m.get("travel", True):
            return eta_lr, cp_lr
        steps, paper = self._steps(), float(m.paper_steps)
        return (travel_lr(eta_lr, paper, steps, m.get("eta_lr_max")),
                travel_lr(cp_lr, paper, steps, m.get("cp_lr_max")))

    def _n_checkpoints(self) -> int:
        k = self.cfg.method.saliency_checkpoints
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise UserError(f"method.saliency_checkpoints={k!r} is not valid: give a whole number >= 1 (the paper uses 3).")
        return min(k, int(self.cfg.budget.finetune_epochs))

    # -- phase B ------------------------------------------------------------------------------
    def _checkpoints(self) -> list[nn.Module]:
        """The fine-tuned models whose saliencies are averaged: the cached best, or the k best epochs
        of a fresh run of the same fine-tuning (same recipe, seed and data)."""
        k = self._n_checkpoints()
        if k == 1:
            return [self.job.backbone]
        from tokenprune.models import load_backbone
        from tokenprune.train import fit

        cfg, job = self.cfg, self.job
        model = load_backbone(cfg.model, task_data.num_labels(cfg.task), cfg.seed)
        torch.manual_seed(cfg.seed)
        snapshots: list[tuple[float, dict]] = []

        def evaluate(m):
            s = calib_score(job, m)
            snapshots.append((s, copy.deepcopy({n: v.detach().cpu() for n, v in m.state_dict().items()})))
            return s

        fit(model, job.loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.finetune_epochs),
            device=job.device, evaluate=evaluate, log_fn=job.log, desc="adapler/refinetune",
            patience=int(cfg.train.patience))
        best = sorted(range(len(snapshots)), key=lambda i: -snapshots[i][0])[:k]
        models = []
        for i in best:
            m = copy.deepcopy(model)
            m.load_state_dict(snapshots[i][1])
            models.append(m.to(job.device).eval())
        self.job.info.setdefault("adapler", {})["saliency_epochs"] = [
            {"epoch": i + 1, "calib_score": snapshots[i][0]} for i in best]
        return models

    def _make_saliency(self, tmp: Path) -> None:
        job = self.job
        train = job.splits["train"]
        idx = np.asarray(train["idx"])
        width = int(max(train["length"]))
        total = torch.zeros(len(idx), width, dtype=torch.float32)
        row = {int(v): i for i, v in enumerate(idx)}
        models = self._checkpoints()
        for model in models:
            model.eval()
            for batch in tqdm(job.loader("train"), desc="adapler/saliency", leave=False, mininterval=2):
                batch = to_device(batch, job.device)
                sal = saliency_of(model, batch).cpu()
                rows = torch.tensor([row[int(v)] for v in batch["idx"].cpu()])
                total[rows, : sal.shape[1]] += sal
        torch.save({"idx": torch.as_tensor(idx), "saliency": total / len(models)}, tmp / "saliency.pt")

    def saliency(self) -> tuple[dict[int, int], Tensor]:
        path = self.job.phases.get("adapler-saliency", self._saliency_key(), self._make_saliency)
        blob = torch.load(path / "saliency.pt")
        return {int(v): i for i, v in enumerate(blob["idx"].tolist())}, blob["saliency"]

    # -- phase C ------------------------------------------------------------------------------
    def _start_model(self) -> nn.Module:
        init = self.cfg.method.init
        if init == "finetuned":
            return copy.deepcopy(self.job.backbone)
        if init == "pretrained":
            from tokenprune.models import load_backbone

            return load_backbone(self.cfg.model, task_data.num_labels(self.cfg.task), self.cfg.seed)
        raise UserError(f"method.init={init!r} is not valid: give finetuned (the cached fine-tuned backbone) or pretrained.")

    def _calib_point(self, model: nn.Module, policy: AdapLeRPolicy) -> tuple[float, float]:
        """(calib score, canonical FLOPs speedup on calib) with hard decisions."""
        result = calib_result(self.job, model, policy)
        report = flops.summarize(result, None, model.config, self.job.backbone.config)
        return float(score(self.cfg.task, result)[1]), report["flops_speedup"]

    def _train(self, tmp: Path, phi: float) -> tuple[nn.Module, dict]:
        cfg, job, m = self.cfg, self.job, self.cfg.method
        rows, saliency = self._saliency
        epochs = int(cfg.budget.epochs)
        lambdas = lambda_schedule(epochs, OmegaConf.to_container(m, resolve=True)["lambdas"])
        torch.manual_seed(cfg.seed)
        model = self._start_model().to(job.device)
        policy = make_policy(model.config, m).to(job.device)
        encoder = PrunableEncoder(model, policy, mode="mask")
        gamma = float(m.gamma)
        lo, hi = float(m.eta_min), float(m.eta_max)
        eta_lr, cp_lr = self._knob_lrs()

        model_params = [p for p in list(model.parameters()) + list(policy.cps.parameters()) if p.requires_grad]
        groups = default_param_groups(model, float(m.lr), cfg.train.weight_decay) + \
            default_param_groups(policy.cps, cp_lr, cfg.train.weight_decay)
        opt_model = torch.optim.AdamW(groups, lr=float(m.lr), eps=1e-8)
        opt_eta = torch.optim.AdamW([policy.eta], lr=eta_lr, weight_decay=0.0, eps=1e-8)
        loader = job.loader("train", train=True)
        total = max(1, epochs * len(loader))
        warm = int(cfg.train.warmup_ratio * total)
        sched_model = get_linear_schedule_with_warmup(opt_model, warm, total)
        sched_eta = get_linear_schedule_with_warmup(opt_eta, warm, total)

        ft_score = calib_score(job, job.backbone)
        # each φ the walk trains keeps a W&B curve of its own (no "." in the name: W&B nests dotted keys)
        curve = "adapler" if phi == float(m.phi) else f"adapler-phi{phi:.0e}"
        history, best, step = [], None, 0
        for epoch in range(epochs):
            encoder.train()
            bar = tqdm(loader, desc=f"adapler epoch {epoch + 1}/{epochs}", leave=False, mininterval=2)
            for batch in bar:
                policy.lam = lambda_at(step, total, lambdas)
                batch = to_device(batch, job.device)
                out = encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
                labels = batch["labels"]
                ce = task_loss(out.logits, labels)
                sal = torch.stack([saliency[rows[int(i)], : batch["input_ids"].shape[1]]
                                   for i in batch["idx"].cpu()]).to(job.device)
                kl, length = adapler_losses(policy, sal)
                loss_model, loss_eta = ce + gamma * kl, ce + phi * length
                if not (torch.isfinite(loss_model) and torch.isfinite(loss_eta)):
                    raise TrainingDiverged(f"adapler: the loss became {loss_model.item()} at step {step} "
                                           f"(epoch {epoch + 1}); lower method.lr or check the data.")
                opt_model.zero_grad(set_to_none=True)
                opt_eta.zero_grad(set_to_none=True)
                loss_model.backward(inputs=model_params, retain_graph=True)
                loss_eta.backward(inputs=[policy.eta])
                torch.nn.utils.clip_grad_norm_(model_params, cfg.train.grad_clip)
                torch.nn.utils.clip_grad_norm_([policy.eta], cfg.train.grad_clip)
                opt_model.step()
                opt_eta.step()
                sched_model.step()
                sched_eta.step()
                clip_eta(policy.eta, lo, hi)
                step += 1
                bar.set_postfix(ce=f"{ce.item():.3f}", kl=f"{kl.item():.3f}", n=f"{length.item():.1f}")
                job.log({f"{curve}/ce": ce.item(), f"{curve}/kl": kl.item(), f"{curve}/length": length.item(),
                         f"{curve}/lambda": policy.lam}, step=step)
            encoder.eval()
            score, speed = self._calib_point(model, policy)
            ok = score >= ft_score - float(m.within)
            history.append({"epoch": epoch + 1, "lambda": policy.lam, "calib_score": score,
                            "calib_speedup": speed, "within": ok, "eta": policy.eta.detach().cpu().tolist()})
            log.info(f"adapler epoch {epoch + 1}/{epochs}: calib {score:.2f} (fine-tuned {ft_score:.2f}), "
                     f"speedup {speed:.2f}x, λ={policy.lam:g}")
            rank = (1, round(speed, 3), score) if ok else (0, score, 0.0)  # ties in speed: the better score
            if best is None or rank > best[0]:
                best = (rank, epoch + 1, copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}),
                        copy.deepcopy({k: v.detach().cpu() for k, v in policy.state_dict().items()}))
        model.load_state_dict(best[2])
        torch.save(best[3], tmp / "policy.pt")
        chosen = history[best[1] - 1]
        return model, {"history": history, "chosen_epoch": best[1], "chosen_within": bool(best[0][0]),
                       "finetuned_calib_score": ft_score, "lambdas": lambdas, "phi": phi, "steps": step,
                       "eta_lr": eta_lr, "cp_lr": cp_lr, "own_speedup": chosen["calib_speedup"]}

    def _trained(self, phi: float) -> tuple[nn.Module, dict, Path]:
        return self.job.phases.model("adapler-train", self._train_key(phi), lambda tmp: self._train(tmp, phi))

    def phi_tries(self, target: float) -> int:
        tries, _ = walk_settings(self.cfg.method, "phi", "the paper's φ")
        return tries if bool(self.cfg.method.calibrate) and target != 1.0 else 0

    def train_phases(self, target: float) -> None:
        """Phases B and C; C at the φ walked to the target on calib (the paper's φ without a target)."""
        self._saliency = self.saliency()
        trained: dict[float, tuple] = {}

        def own_speedup(phi: float) -> float:
            trained[phi] = (*self._trained(phi), self.job.phases.record["adapler-train"])
            return trained[phi][1]["own_speedup"]

        phi, self._phi_grid = walk_to_target(float(self.cfg.method.phi), own_speedup, target,
                                             tries=self.phi_tries(target), factor=walk_settings(self.cfg.method, "phi", "the paper's φ")[1])
        self._model, info, path, phase_record = trained[phi]
        self.job.phases.record["adapler-train"] = phase_record  # the chosen φ's phase, not the last one walked
        # phase C trains the backbone every step of every epoch
        self.retrained_steps = int(self.cfg.budget.epochs) * len(self.job.loader("train", train=True))
        self._policy = make_policy(self._model.config, self.cfg.method).to(self.job.device)
        self._policy.load_state_dict(torch.load(path / "policy.pt"))
        self._policy.eval()
        self._info = info
        self.job.info.setdefault("adapler", {})["train"] = info

    # -- knob ---------------------------------------------------------------------------------
    def saliency_agreement(self) -> tuple[float | None, dict | None]:
        """On calib: the rank correlation of CP_0's scores (every token alive) with the saliency target
        (gradient × input of the fine-tuned backbone), per example over real tokens, averaged; and, on
        a task with gold rationales, how well each ranks the deciding tokens (`rationale_recall`)."""
        policy, job = self._policy, self.job
        base, _ = backbone_parts(self._model)
        scores, signal, masks, ids = [], [], [], []
        for batch in job.loader("calib"):
            batch = to_device(batch, job.device)
            sal = saliency_of(job.backbone, batch)
            with torch.no_grad():
                h = base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
                z = policy.cps[0](h).squeeze(-1)
            mask = batch["attention_mask"].bool()
            scores += list(z.cpu())
            signal += list(sal.cpu())
            masks += list(mask.cpu())
            ids += batch["idx"].tolist()
        return (rank_correlation(scores, signal, masks),
                rationale_recall(job, zip(ids, signal), zip(ids, scores)))

    def learning_block(self, target: float, scale: float, applied: bool) -> dict:
        info, m = self._info, self.cfg.method
        eta = self._policy.eta.detach().cpu().tolist()
        steps = int(info.get("steps", self._steps()))
        rank_corr, rationale = self.saliency_agreement()
        return learning_record(
            self.name,
            {"eta": {"initial": float(m.eta_init), "final": eta, "bounds": (float(m.eta_min), float(m.eta_max)),
                     "lr": info.get("eta_lr")}},
            schedule=eta, target=target, own_speedup=info.get("own_speedup"),
            calibration={"kind": "multiplier on every η_ℓ", "multiplier": round(float(scale), 6), "applied": applied},
            rank_corr=rank_corr, signal="saliency (CP_0 scores on calib)",
            extra={"phi": info.get("phi"), "phi_grid": self._phi_grid, "cp_lr": info.get("cp_lr"), "steps": steps,
                   "paper_steps": float(m.paper_steps),
                   "travel_eta": None if info.get("eta_lr") is None else round(travel(steps, info["eta_lr"]), 4),
                   "paper_travel_eta": round(travel(float(m.paper_steps), float(m.eta_lr)), 4),
                   "lambda_first_last": [info["lambdas"][0], info["lambdas"][-1]],
                   "rationale_recall": rationale})

    def choose_knob(self, target: float) -> dict:
        knob = self._choose_knob(target)
        self.learning = self.learning_block(target, knob["eta_scale"], bool(self.cfg.method.calibrate))
        return knob

    def _choose_knob(self, target: float) -> dict:
        policy, model = self._policy, self._model
        eta = policy.eta.detach().cpu().tolist()
        if not self.cfg.method.calibrate:
            policy.scale = 1.0
            return {"eta": eta, "eta_scale": 1.0, "calib_speedup": self._calib_point(model, policy)[1]}

        speedup = calib_speedups(self.job, model, policy, "eta scale")

        def speed(scale: float) -> float:
            policy.scale = scale
            return speedup()

        # at the extreme scale every CP_0 threshold exceeds any share (δ > 1): only [CLS] goes on.
        # The search starts at scale 1, the learned η as is: φ was chosen so that it is near the target
        top = (max(self.job.splits["calib"]["length"]) + 1) / max(min(eta), 1e-6)
        scale, achieved = meet_target(speed, target, gentle=1e-9, extreme=top, geometric=True, start=1.0,
                                      steps=int(self.cfg.method.max_scale_iters), rtol=float(self.cfg.calib_rtol),
                                      method="adapler",
                                      extreme_means="even keeping only [CLS] from layer 0 on")
        policy.scale = scale
        return {"eta": eta, "eta_scale": scale, "calib_speedup": achieved}

    def model(self) -> nn.Module:
        return self._model

    def policy(self) -> AdapLeRPolicy:
        self._policy.eval()
        return self._policy
