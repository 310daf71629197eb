"""Mistakes a user can make on the command line, each caught before any work and said in one sentence."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig, OmegaConf

from tokenprune import flops
from tokenprune.errors import UserError


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# (config path, test, what it must be): the fields a user types, each checked before any work.
FIELD_CHECKS = [
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number, e.g. seed=1"),
    ("data.source", lambda v: v in ("local", "hub"), "local or hub"),
    ("budget.max_train", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null for all"),
    ("budget.max_calib", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null"),
    ("budget.max_dev", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null for all"),
    ("budget.epochs", _positive_int, "a whole number >= 1"),
    ("budget.finetune_epochs", _positive_int, "a whole number >= 1"),
    ("train.patience", _positive_int, "a whole number >= 1"),
    ("train.lr", lambda v: _number(v) and v > 0, "a positive number, e.g. 5e-5"),
    ("train.batch_size", _positive_int, "a whole number >= 1"),
    ("train.eval_batch_size", _positive_int, "a whole number >= 1"),
    ("train.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("train.warmup_ratio", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train.grad_clip", lambda v: _number(v) and v > 0, "a positive number"),
    ("measure.flops_mode", lambda v: v in flops.MODES, f"one of {', '.join(flops.MODES)}"),
    ("measure.timing", lambda v: isinstance(v, bool), "true or false"),
    ("measure.control", lambda v: isinstance(v, bool), "true or false"),
    ("measure.n_latency", _positive_int, "a whole number >= 1"),
    ("measure.n_throughput", _positive_int, "a whole number >= 1"),
    ("measure.batch_size", _positive_int, "a whole number >= 1"),
    ("measure.warmup", lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0"),
    ("measure.repeats", _positive_int, "a whole number >= 1"),
    ("measure.threads", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null"),
    ("threads", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null"),
    ("resume", lambda v: isinstance(v, bool), "true or false"),
    ("logger.mode", lambda v: v in ("offline", "online", "disabled"), "offline, online or disabled"),
]


def check_config(cfg: DictConfig) -> None:
    """Raise a UserError with one sentence for the first mistake found."""
    if cfg.task.get("suite"):
        raise UserError(
            f"task={cfg.task.name} is a suite of {len(cfg.task.suite)} tasks ({', '.join(cfg.task.suite)}): "
            f"add -m to run one job per task, e.g. python run.py -m task={cfg.task.name}."
        )
    if not _number(cfg.speedup):
        raise UserError(f"speedup={cfg.speedup!r} is not a number: give a target speedup >= 1, e.g. speedup=2.")
    if cfg.speedup < 1:
        raise UserError(f"speedup={cfg.speedup} is below 1: it is a target speedup over the full model, so give a value >= 1, e.g. speedup=2.")
    fixed = cfg.method.get("fixed_speedup")
    if fixed is not None and cfg.speedup != fixed:
        raise UserError(
            f"method={cfg.method.name} runs only at speedup={fixed:g} (its one operating point), not {cfg.speedup}: drop the speedup "
            f"override (in a multirun, its jobs at other targets are collapsed onto speedup={fixed:g} for you)."
        )
    for path, ok, expected in FIELD_CHECKS:
        value = OmegaConf.select(cfg, path, default="<missing>")
        if path.startswith("logger.mode") and cfg.logger.name == "none":
            continue
        if not ok(value):
            raise UserError(f"{path}={value!r} is not valid: it must be {expected}.")
