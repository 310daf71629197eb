"""method=gate: one learned delete gate after an early layer (MrT5's mechanism, Kallini et al., ICLR
2025; merging.md §3), on the fine-tuned backbone.

Kept from the paper: the gate G = k·σ(LayerNorm(H)·w + b), one scalar per token, k = −30 (2d + 1
parameters besides its LayerNorm), placed after one fixed early layer (`method.after_layer`); in
training it is added to the attention logits of that token as a key in every later layer (soft
deletion, shapes fixed, `mask` mode); at inference tokens with G < k/2 are removed once (hard
deletion, one gather per forward); the regulariser α·mean(G) with α set by a PI controller toward a
target deletion ratio (tokenprune/control.py), so the target enters training directly.

Changed for this suite:
- the target deletion ratio comes from the speedup target: the fraction p of each example's non-[CLS]
  tokens whose deletion after `after_layer` meets the canonical FLOPs target on calib's lengths
  (analytic, the gate's own 2·d FLOPs per token included);
- [CLS] is never deleted; mean(G) runs over real non-[CLS] tokens; the bias starts at −4 (G ≈ −0.5:
  nothing deleted yet), not stated in the paper;
- a learned gate only approximately deletes p; the record keeps the ratio training reached, and the
  hard threshold (k/2 by default) is moved post hoc on calib to meet the target (the record says
  where it moved).

Not yet learned on the CPU budget (measured on SST-2 `quick`, MiniLM, seed 1, 189 steps; the record's
`training_trace` shows the hard and soft deleted ratio and α through training): at the backbone's
learning rate (1e-4) the gate's logits cannot travel from the bias's −4 to the k/2 boundary at 0, so
training deletes nothing (`trained_deleted_ratio` 0.0 at 1.5x, 2x and 3x) and the post-hoc threshold
does all the work (dev accuracy 77.1, 73.2, 64.2: 1.2–1.7 points below topk). A faster gate makes
every token cross together: the regulariser pushes the gate's common direction (the bias and the
mean of LayerNorm(H)), the task loss's veto reaches only tokens still visible (G > −5 or so), and a
token past that point gets no gradient back, so deletion is one-way. Tried at 2x: MrT5's travel
(3.8e-4 after a per-step cap) with the controller on the hard ratio: it wound up while nothing was
deleted, then every token went (ratio 1.0, α → 0, dev accuracy 54.5); 3.8e-4 and the travel rule's
2.6e-3 (MrT5's 5,000 steps at 1e-4), each with the controller on the soft ratio mean(G)/k and its
integral capped (no wind-up): the soft ratio went 0.14 → 0.96 between steps 45 and 72, and
0.02 → 1.0 between steps 9 and 36, training loss at chance after. A controller cannot hold a
one-way, uniform drift. A per-token signal was tried too (not kept): a centred gate, whose logit reads
each token's LayerNorm features less its example's mean with the bias fixed at −4 (so no parameter
moves an example's tokens alike), at the travel rule's 2.6e-3 with the controller on the hard ratio.
Deletion became gradual and per token: at 2x the controller held it near the target (hard ratio 0.07
at step 27, 0.55 at 63, 0.66–0.71 from step 117 against a target of 0.62, α 1.1–1.3); but at 1.5x it
overshot and stayed (0.63 against 0.41, α at 0 from step 126: deletion is still one-way), and at 3x
the trained gate left too many tokens far below the boundary for any threshold to reach 3x (2.75x at
most on calib). Dev accuracy against the design kept here, paired on the same 872 sentences: 2x
70.07 against 73.17 (−3.1 [−6.3, 0.0]), 1.5x 71.22 against 77.06 (−5.9 [−9.2, −2.4]). A gate that
learns which tokens to delete in a few hundred steps, and can give deleted tokens back, is open work."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tokenprune import flops
from tokenprune.control import PIController
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy, TokenState
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import calib_speedups, meet_target
from tokenprune.train import default_param_groups, fit, task_loss

log = logging.getLogger(__name__)

K = -30.0


class DeleteGate(TokenPolicy):
    """The gate before layer `after_layer + 1`: soft (key logits) in training, hard (a gather) with `hard=True`."""

    def __init__(self, d: int, after_layer: int, hard: bool = False, threshold: float = K / 2):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.linear = nn.Linear(d, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, -4.0)
        self.after_layer, self.hard, self.threshold = after_layer, hard, threshold
        self.gates: Tensor | None = None
        self.mask: Tensor | None = None

    def gate(self, hidden: Tensor) -> Tensor:
        return K * torch.sigmoid(self.linear(self.norm(hidden)).squeeze(-1))

    def decision_points(self, num_layers: int) -> tuple[tuple[int, str], tuple[int, str]]:
        return (self.after_layer + 1, "before"), (self.after_layer + 1, "before")

    def before_layer(self, layer: int, state: TokenState) -> Decision | None:
        if layer != self.after_layer + 1:
            return None
        g = self.gate(state.hidden)
        cost = 2.0 * state.hidden.shape[-1] * state.mask.sum(1).to(torch.float64)  # the d→1 projection
        real = state.mask.clone()
        real[:, 0] = False
        self.gates, self.mask = g, real
        if self.hard:
            return Decision(keep=g >= self.threshold, flops=cost)
        return Decision(key_logmask=g, flops=cost)

    def regulariser(self) -> Tensor:
        return (self.gates * self.mask).sum() / self.mask.sum().clamp(min=1)

    def deleted_ratio(self) -> float:
        deleted = (self.gates < K / 2) & self.mask
        return float(deleted.sum() / self.mask.sum().clamp(min=1))

    def soft_deleted_ratio(self) -> float:
        """mean(G)/k over real non-[CLS] tokens: the deletion mass, which moves with every step (the hard
        ratio stays 0 until a token crosses k/2) and equals the hard ratio once the gates saturate."""
        return float(self.regulariser().detach() / K)


def gate_counts(lengths, layers: int, after_layer: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """N×L counts when each example deletes round(ratio·(n − 1)) of its non-[CLS] tokens after `after_layer`."""
    n = np.asarray(lengths, dtype=np.int64)
    kept = n - np.floor((n - 1).astype(np.float64) * ratio + 0.5).astype(np.int64)
    attn = np.repeat(n[:, None], layers, axis=1)
    attn[:, after_layer + 1:] = kept[:, None]
    return attn, attn.copy()


def target_ratio(lengths, config, after_layer: int, target: float) -> float:
    """The deletion ratio whose canonical FLOPs speedup on these lengths meets `target` (gate FLOPs included)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    dm = flops.dims(config)
    base = flops.canonical_baseline(lengths, config)

    def speedup(ratio: float) -> float:
        attn, ffn = gate_counts(lengths, dm.layers, after_layer, ratio)
        return flops.speedup(base, flops.canonical_flops(attn, ffn, config, 2.0 * dm.d * lengths))

    ratio, _ = meet_target(speedup, target, gentle=0.0, extreme=1.0, steps=40, method="gate",
                           extreme_means=f"deleting every token but [CLS] after layer {after_layer} (an earlier method.after_layer deletes more)")
    return ratio


class Gate(Method):
    name = "gate"

    def train_phases(self, target: float) -> None:
        job, cfg, m = self.job, self.cfg, self.cfg.method
        config = job.backbone.config
        L = flops.dims(config).layers
        after = int(m.after_layer)
        if not 0 <= after < L - 1:
            raise UserError(f"method.after_layer={after} must be a layer with another after it: give 0..{L - 2}.")
        ratio = target_ratio(job.splits["calib"]["length"], config, after, target)
        key = {"backbone": job.backbone_key, "phase": "gate", "after_layer": after, "ratio": round(ratio, 6),
               "kp": float(m.kp), "ki": float(m.ki), "epochs": int(cfg.budget.epochs), "lr": float(cfg.train.lr)}
        d = int(config.hidden_size)

        def train(tmp: Path):
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(job.backbone)
            gate = DeleteGate(d, after)
            encoder = PrunableEncoder(model, gate, mode="mask")
            controller = PIController(ratio, float(m.kp), float(m.ki))
            trace = []

            def step(enc, batch):
                out = enc(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
                hard_ratio = gate.deleted_ratio()
                alpha = controller.update(hard_ratio)
                trace.append((hard_ratio, alpha, gate.soft_deleted_ratio()))
                return task_loss(out.logits, batch["labels"]) + alpha * gate.regulariser()

            groups = default_param_groups(model, cfg.train.lr, cfg.train.weight_decay)
            groups.append({"params": list(gate.parameters()), "lr": float(cfg.train.lr), "weight_decay": 0.0})
            info = fit(encoder, job.loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.epochs),
                       device=job.device, step_fn=step, param_groups=groups, log_fn=job.log, desc="gate")
            torch.save(gate.state_dict(), tmp / "gate.pt")
            tail = trace[-max(1, len(trace) // 10):]
            every = max(1, len(trace) // 20)
            return model, {"target_ratio": ratio, "history": info["history"],
                           "final_deleted_ratio": float(np.mean([t[0] for t in tail])),
                           "final_alpha": float(np.mean([t[1] for t in tail])),
                           "final_soft_ratio": float(np.mean([t[2] for t in tail])),
                           "trace": {"step": list(range(0, len(trace), every)),
                                     **{name: [round(t[c], 4) for t in trace[::every]]
                                        for c, name in enumerate(["deleted_ratio", "alpha", "soft_ratio"])}}}

        self._model, self.info, path = job.phases.model("gate", key, train)
        self.retrained_steps += self.info["history"][-1]["steps"]
        self.gate_state = torch.load(path / "gate.pt")
        self.d, self.after = d, after

    def _policy(self, threshold: float) -> DeleteGate:
        gate = DeleteGate(self.d, self.after, hard=True, threshold=threshold)
        gate.load_state_dict(self.gate_state)
        return gate.eval()

    def choose_knob(self, target: float) -> dict:
        policy = self._policy(K)
        passes = calib_speedups(self.job, self._model, policy, "threshold")

        def speedup(threshold: float) -> float:
            policy.threshold = threshold
            return passes()

        # the gentle end deletes nothing (G > k always); raising the threshold toward 0 deletes more
        self.threshold, achieved = meet_target(speedup, target, gentle=K, extreme=[K / 2, -1e-3], steps=20,
                                               rtol=float(self.cfg.calib_rtol),
                                               method=self.name, extreme_means="deleting every token the gate scores below 0")
        return {"threshold": self.threshold, "default_threshold": K / 2, "calib_speedup": achieved,
                "target_ratio": self.info["target_ratio"], "trained_deleted_ratio": self.info["final_deleted_ratio"],
                "trained_soft_ratio": self.info.get("final_soft_ratio"),
                "training_trace": self.info.get("trace"),  # every ~5% of the steps: hard and soft deleted ratio, α
                "final_alpha": self.info["final_alpha"], "after_layer": self.after}

    def model(self) -> nn.Module:
        return self._model

    def policy(self) -> DeleteGate:
        return self._policy(self.threshold)
