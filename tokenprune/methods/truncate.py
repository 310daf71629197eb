"""method=truncate: the static baseline for long texts. Every example keeps only its first k tokens,
[CLS] and the k − 1 after it (no [SEP] is added back), and the model is fine-tuned at that length.

Choosing k. The target decides k per task from the length distribution of `calib`: the largest k
whose canonical FLOPs speedup on calib's lengths, every example cut to min(n, k), meets `speedup`
(the speedup only grows as k falls, so a scan from the task's max_length down finds it). A target
that even k = 1 cannot reach stops with one sentence. The achieved speedup is measured on dev, whose
lengths may differ from calib's (SST-2's train, hence calib, is mostly short phrases; its dev is
whole sentences): the record reports both (`knob.expected_speedup` on calib, `flops_speedup` on dev).

How it runs. A token policy acting before layer 0 keeps positions 0..k−1 (a hard decision, so in
`gather` mode the tail is physically removed before any layer runs). It goes through the same
encoder loop as every method, on the same dev tensors as the baseline, so FLOPs come from the trace
and the timing includes the cut itself: the embeddings of the dropped tail (a few percent of a layer)
and the gather are paid inside the timed forward. Re-encoding dev at max_length k instead would hand
the method shorter inputs prepared outside the clock, and the runner evaluates and times every
method on one encoded dev split, so the policy is both the more honest and the only uniform choice.

What it fine-tunes from (`method.init`): `backbone` (default) continues from the cached fine-tuned
backbone, like every other method, for `budget.epochs` epochs on training inputs cut to k (the same
computation as the policy in mask mode, done by slicing); best checkpoint by the task metric on calib,
cut the same way. `pretrained` starts from the pre-trained weights instead (a model fine-tuned only
at length k). Cached on the backbone key, k, init, lr and epochs. When k reaches the task's
max_length nothing is cut and the backbone is used as it is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from tokenprune import data as task_data
from tokenprune import flops
from tokenprune.encoder import Decision, TokenPolicy, TokenState
from tokenprune.errors import UserError
from tokenprune.methods.base import Method
from tokenprune.methods.toolbox import calib_score, meet_target
from tokenprune.models import load_backbone
from tokenprune.train import classification_loss, fit


class TruncatePolicy(TokenPolicy):
    """Before layer 0, keep the first k positions ([CLS] at 0 and the next k − 1)."""

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        self.k = k

    def before_layer(self, layer: int, state: TokenState) -> Decision | None:
        if layer != 0:
            return None
        return Decision(keep=state.positions < self.k)


def truncate_batch(batch: dict, k: int) -> dict:
    """The batch cut to its first k columns (what the policy keeps, done by slicing)."""
    return {key: v[:, :k] if torch.is_tensor(v) and v.ndim == 2 else v for key, v in batch.items()}


def truncation_speedup(lengths: Any, k: int, config: Any) -> float:
    """Canonical FLOPs speedup of cutting every example to min(n, k) tokens, on these lengths."""
    n = np.asarray(lengths, dtype=np.int64)
    cut = np.minimum(n, k)
    return flops.speedup(flops.canonical_baseline(n, config), flops.canonical_baseline(cut, config))


def choose_k(lengths: Any, config: Any, target: float, max_length: int) -> int:
    """The largest k <= max_length whose speedup on `lengths` is at least `target`."""
    n = np.asarray(lengths, dtype=np.int64)
    k, _ = meet_target(lambda k: truncation_speedup(n, int(k), config), target, gentle=max_length, extreme=1,
                       scan=range(min(max_length, int(n.max())), 0, -1), method="truncate",
                       extreme_means="even keeping only [CLS]")
    return int(k)


class Truncate(Method):
    name = "truncate"

    def train_phases(self, target: float) -> None:
        job, cfg = self.job, self.cfg
        init = str(cfg.method.init)
        if init not in ("backbone", "pretrained"):
            raise UserError(f"method.init={cfg.method.init!r} is not valid: it must be backbone or pretrained.")
        self.k = k = choose_k(job.splits["calib"]["length"], job.backbone.config, target, int(cfg.task.max_length))
        if k >= int(cfg.task.max_length):  # nothing is cut: the backbone as it is
            self.truncated = job.backbone
            job.info["truncate"] = {"k": k, "trained": False}
            return
        lr = float(cfg.method.lr) if cfg.method.lr is not None else float(cfg.train.lr)
        key = {"backbone": job.backbone_key, "k": k, "init": init, "lr": lr, "epochs": int(cfg.budget.epochs)}

        def train(tmp: Path):
            if init == "backbone":
                model = copy.deepcopy(job.backbone)
            else:
                model = load_backbone(cfg.model, task_data.num_labels(cfg.task), cfg.seed)
            model.to(job.device)
            policy = TruncatePolicy(k)
            torch.manual_seed(cfg.seed)

            def step(m: nn.Module, batch: dict) -> Tensor:
                return classification_loss(m, truncate_batch(batch, k))

            def evaluate(m: nn.Module) -> float:  # checkpoint choice on calib (cut to k), never on dev
                return calib_score(job, m, policy)

            info = fit(model, job.loader("train", train=True), train_cfg=OmegaConf.merge(cfg.train, {"lr": lr}),
                       epochs=int(cfg.budget.epochs), device=job.device, evaluate=evaluate, step_fn=step,
                       log_fn=job.log, desc="truncate")
            return model, {**info, "k": k, "init": init}

        self.truncated, info, _ = job.phases.model("truncate", key, train)
        self.retrained_steps = info["history"][-1]["steps"]
        job.info["truncate"] = {"k": k, "trained": True, "init": init, "lr": lr, "best_calib_score": info.get("best_score"),
                                "best_epoch": info.get("best_epoch"), "train_seconds": info.get("train_seconds")}

    def choose_knob(self, target: float) -> dict:
        lengths = np.asarray(self.job.splits["calib"]["length"])
        k = self.k
        return {"k": k, "expected_speedup": truncation_speedup(lengths, k, self.job.backbone.config),
                "calib_fraction_cut": float((lengths > k).mean()),
                "calib_tokens_kept": float(np.minimum(lengths, k).sum() / lengths.sum())}

    def model(self) -> nn.Module:
        return self.truncated

    def policy(self) -> TruncatePolicy | None:
        return TruncatePolicy(self.k) if self.k < int(self.cfg.task.max_length) else None
