"""What every method is to the runner, and the order in which the runner uses it.

A job hands its method a `Job`: the config, the encoded splits, the tokenizer, the cached fine-tuned
backbone (and its cache key), the job's cached phases, the device and a logger. The runner then
calls, in this order and once each:

    method.fit(target)        train what the target needs, each phase cached through `job.phases`
                              (a method whose training depends on the target decides it here:
                              truncate's k, DistilBERT's depth, PoWER-BERT's re-training schedule,
                              TR-BERT's length penalty)
    method.calibrate(target)  set the inference knob on `calib` so that the FLOPs speedup meets the
                              target; returns the knob for the record
    method.evaluated()        (model, token policy) to evaluate on dev in `gather` mode against the
                              full backbone on the same examples (policy None: no pruning)

The base class enforces that order. A method overrides the hooks: `train_phases`, `choose_knob`,
`model`, `policy`. The base class itself is the full model: no phases, no knob, no pruning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from tokenprune.data import make_loader
from tokenprune.methods.toolbox import Phases


@dataclass
class Job:
    cfg: DictConfig  # the resolved job config (task, method, model, budget, seed, …)
    splits: dict[str, Any]  # encoded `datasets.Dataset`s: train, calib, dev (+ extra dev sets)
    tokenizer: Any
    backbone: torch.nn.Module  # the fine-tuned full model (HF *ForSequenceClassification), eval mode
    backbone_key: dict  # the cache key of the backbone; every phase's key extends it
    phases: Phases  # the job's cached phases (`phases.get`, `phases.model`) and their record
    device: torch.device
    log: Callable[..., None] = lambda metrics, step=None: None  # per-step metrics to the tracker
    info: dict = field(default_factory=dict)  # anything the method wants in the record (`method_info`)

    def loader(self, split: str | Any, *, train: bool = False, batch_size: int | None = None,
               grouped: bool | None = None):
        return split_loader(self.cfg, self.splits, self.tokenizer, split, train=train, batch_size=batch_size,
                            grouped=grouped)


def split_loader(cfg: DictConfig, splits: dict[str, Any], tokenizer: Any, split: str | Any, *, train: bool = False,
                 batch_size: int | None = None, grouped: bool | None = None):
    """Batches of a split (by name, or a dataset) with dynamic padding: length-sorted for evaluation;
    for training shuffled (seeded), and of similar lengths (`grouped`) where the task sets
    `group_by_length` (long inputs, where a random batch is nearly always padded to max_length)."""
    dataset = splits[split] if isinstance(split, str) else split
    size = batch_size or (cfg.train.batch_size if train else cfg.train.eval_batch_size)
    if grouped is None:
        grouped = not train or bool(cfg.task.get("group_by_length"))
    return make_loader(dataset, size, shuffle=train, seed=cfg.seed, sort_by_length=grouped,
                       pad_token_id=tokenizer.pad_token_id or 0)


class CallOrderError(RuntimeError):
    """A method was used out of its order: fit, then calibrate, then evaluated."""


class Method:
    """Base class and the full model, unpruned. Subclasses override the hooks below."""

    name = "bert"
    # optimiser steps the method's phases trained the backbone's weights beyond fine-tuning: the runner
    # trains the full model as long (the equal-training control) when it is not 0
    retrained_steps: int = 0
    # a learned method's `learning` block (toolbox.learning_record): how far its knobs moved, the
    # schedule it learned, its own speedup against the target and what calibration applied; None otherwise
    learning: dict | None = None

    def __init__(self, job: Job):
        self.job = job
        self.cfg = job.cfg
        self._stage = "new"

    # ---- the call order, enforced -------------------------------------------------------------
    def _step(self, expected: str, call: str, then: str) -> None:
        if self._stage != expected:
            raise CallOrderError(f"{type(self).__name__}.{call} was called at stage '{self._stage}'; the order is "
                                 "fit(target), calibrate(target), evaluated(), once each.")
        self._stage = then

    def fit(self, target: float) -> None:
        self._step("new", "fit", "fitting")
        self.train_phases(float(target))
        self._stage = "fitted"

    def calibrate(self, target: float) -> dict:
        self._step("fitted", "calibrate", "calibrating")
        knob = self.choose_knob(float(target))
        self._stage = "calibrated"
        return knob

    def evaluated(self) -> tuple[torch.nn.Module, Any]:
        self._step("calibrated", "evaluated", "evaluated")
        return self.model(), self.policy()

    # ---- what a method overrides --------------------------------------------------------------
    def train_phases(self, target: float) -> None:
        """Train the method's phases for `target`, each through `self.job.phases`. The full model has none."""

    def choose_knob(self, target: float) -> dict:
        """Set the inference knob on calib for `target`; return it for the record."""
        return {}

    def model(self) -> torch.nn.Module:
        """The model to evaluate (the backbone, or one the method trained)."""
        return self.job.backbone

    def policy(self):
        """The token policy the PrunableEncoder runs in `gather` mode, or None for no pruning."""
        return None
