"""The fine-tuned full model: the reference every method is measured against and starts from.

One per (model, task, data, budget, seed, training recipe), trained once and cached: a sweep over
methods and targets fine-tunes each task once. The checkpoint is chosen on calib, never on dev.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from tokenprune import data as task_data
from tokenprune.evaluate import run_eval, score
from tokenprune.fingerprint import job_inputs
from tokenprune.methods.toolbox import Phases
from tokenprune.models import load_backbone
from tokenprune.train import fit


def backbone_key(cfg: DictConfig) -> dict:
    """Everything that determines the fine-tuned backbone, and nothing else."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": {
            **{k: task.get(k) for k in ("name", "format", "files", "header", "columns", "labels", "max_length", "dev_from_train", "hub")},
            # fields added later enter the key only when true, so that older cache entries stay valid
            **{k: task[k] for k in ("group_by_length", "calib_whole_inputs", "synthetic") if task.get(k)},
        },
        "data_source": cfg.data.source,
        "budget": {k: cfg.budget[k] for k in ("max_train", "max_calib", "finetune_epochs")},
        "seed": cfg.seed,
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        # what the config only points at: the train file's content, the tokenizer, a local model's weights
        "inputs": job_inputs(cfg, splits=("train",)),
    }


def finetuned_backbone(cfg: DictConfig, loader: Callable[..., Any], phases: Phases, device: torch.device,
                       log: Callable[..., None]) -> tuple[torch.nn.Module, dict, dict]:
    """(the fine-tuned model in eval mode, what its training kept, its cache key). `loader(split,
    train=...)` gives a split's batches."""
    key = backbone_key(cfg)

    def train(tmp: Path):
        model = load_backbone(cfg.model, task_data.num_labels(cfg.task), cfg.seed)
        torch.manual_seed(cfg.seed)
        calib = loader("calib")

        def evaluate(m):  # checkpoint choice on calib, never on dev
            return score(cfg.task, run_eval(m, None, calib, device))[1]

        info = fit(model, loader("train", train=True), train_cfg=cfg.train, epochs=int(cfg.budget.finetune_epochs),
                   device=device, evaluate=evaluate, log_fn=log, desc="finetune", patience=int(cfg.train.patience))
        return model, info

    model, info, _ = phases.model("finetune", key, train)
    return model, info, key


def equal_training_control(cfg: DictConfig, loader: Callable[..., Any], phases: Phases, device: torch.device,
                           log: Callable[..., None], backbone: torch.nn.Module, key: dict,
                           steps: int) -> tuple[torch.nn.Module, dict]:
    """The full model trained `steps` more steps from the fine-tuned one, with the same recipe (a
    fresh warm-up and decay, the best calib epoch kept): the reference for a method that re-trains
    the backbone for `steps` steps, so that what its extra training alone is worth is not counted
    as the method's. Cached on the backbone and the steps (methods with the same count share it)."""

    def train(tmp: Path):
        model = copy.deepcopy(backbone)
        torch.manual_seed(cfg.seed)
        calib, batches = loader("calib"), loader("train", train=True)

        def evaluate(m):  # checkpoint choice on calib, never on dev
            return score(cfg.task, run_eval(m, None, calib, device))[1]

        info = fit(model, batches, train_cfg=cfg.train, epochs=math.ceil(steps / len(batches)), device=device,
                   evaluate=evaluate, log_fn=log, desc="control", max_steps=steps)
        return model, info

    model, info, _ = phases.model("control", {"backbone": key, "steps": int(steps)}, train)
    return model, info
