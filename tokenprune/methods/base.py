"""What every method is to the runner.

A job hands its method a `Job` (config, encoded splits, tokenizer, the cached fine-tuned backbone,
the cache, a logger). The runner then calls, in order:

    method.fit()        its own training phases, each cached with `job.cache.get_or_make`
    method.calibrate()  pick the inference knob on `calib` so the FLOPs speedup meets `cfg.speedup`
    method.model()      the model to evaluate (the backbone, or a student)
    method.policy()     the token policy the PrunableEncoder runs in `gather` mode (None: no pruning)

and evaluates `model()` + `policy()` on dev, against the full backbone on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig


@dataclass
class Job:
    cfg: DictConfig  # the resolved job config (task, method, model, budget, speedup, seed, …)
    splits: dict[str, Any]  # encoded `datasets.Dataset`s: train, calib, dev (+ extra dev sets)
    tokenizer: Any
    backbone: torch.nn.Module | None  # the fine-tuned full model (HF *ForSequenceClassification), eval mode
    cache: Any  # tokenprune.cache.Cache
    device: torch.device
    log: Callable[..., None] = lambda metrics, step=None: None  # per-step metrics to the tracker
    backbone_key: dict = field(default_factory=dict)  # the cache key of the backbone; extend it for phases
    info: dict = field(default_factory=dict)  # anything the method wants in the record (`method_info`)

    def loader(self, split: str, *, train: bool = False, batch_size: int | None = None):
        """Batches of a split with dynamic padding: length-sorted for evaluation; for training shuffled
        (seeded), and of similar lengths where the task sets `group_by_length` (long inputs, where a
        random batch is nearly always padded to max_length)."""
        from tokenprune.data import make_loader

        size = batch_size or (self.cfg.train.batch_size if train else self.cfg.train.eval_batch_size)
        grouped = not train or bool(self.cfg.task.get("group_by_length"))
        return make_loader(self.splits[split], size, shuffle=train, seed=self.cfg.seed, sort_by_length=grouped,
                           pad_token_id=self.tokenizer.pad_token_id or 0)


class Method:
    """Base class: the full model, unpruned. Subclasses override what they change."""

    name = "bert"

    def __init__(self, job: Job):
        self.job = job
        self.cfg = job.cfg

    def fit(self) -> None:
        """Train the method's phases (each through the cache). The full model has none."""

    def calibrate(self) -> dict:
        """Choose the inference knob on `calib` for the target speedup; return it for the record."""
        return {}

    def model(self) -> torch.nn.Module:
        return self.job.backbone

    def policy(self):
        """The token policy for the PrunableEncoder, or None for no pruning."""
        return None
