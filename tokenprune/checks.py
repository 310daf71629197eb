"""Mistakes a user can make, each caught before any work (or, for the model and the data, before any
training) and said in one sentence."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification

from tokenprune import flops
from tokenprune.data import num_labels
from tokenprune.encoder import check_runnable
from tokenprune.errors import UserError
from tokenprune.models import model_config, tokenizer_source


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# (config path, test, what it must be): the fields a user types, each checked before any work.
FIELD_CHECKS = [
    # numpy's and torch's seeds both take 0 .. 2**32-1
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
     "a whole number from 0 to 4294967295, e.g. seed=1"),
    ("task.max_length", lambda v: _positive_int(v) and v >= 2, "a whole number >= 2 ([CLS] and [SEP] take two), e.g. 128"),
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


def check_model(cfg: DictConfig, tokenizer) -> None:
    """The model and tokenizer, checked on the model's config and its architecture built without
    weights (the meta device), before any training: a model the prunable loop cannot run, a tokenizer
    that is not the model's, a max_length beyond the model's positions."""
    config = model_config(cfg.model, num_labels(cfg.task))
    with torch.device("meta"):
        check_runnable(AutoModelForSequenceClassification.from_config(config))
    rows, entries = config.vocab_size, len(tokenizer)
    source, model = tokenizer_source(cfg.model), cfg.model.name
    if entries > rows:
        raise UserError(
            f"The tokenizer from {source} has {entries} entries but model={model}'s embedding has {rows} rows, so "
            f"some tokens would have no embedding: use the model's own tokenizer (model.tokenizer=null)."
        )
    if entries < rows - len(set(tokenizer.all_special_ids)):
        raise UserError(
            f"The tokenizer from {source} has {entries} entries against model={model}'s {rows}-row embedding, so "
            f"most words would become unknown tokens: put the model's tokenizer files (tokenizer.json or vocab.txt) "
            f"in {source}, or point model.tokenizer at the model's own tokenizer."
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and cfg.task.max_length > positions:
        raise UserError(
            f"task.max_length={cfg.task.max_length} is more than model={model}'s {positions} positions: "
            f"set task.max_length={positions} or less."
        )


def check_splits(cfg: DictConfig, splits: dict) -> None:
    """Every split holds examples after loading and the budget's caps."""
    for name, ds in splits.items():
        if len(ds) == 0:
            raise UserError(
                f"The {name} split of task {cfg.task.name} is empty after loading and the budget's caps: "
                f"check the files under data.root={cfg.data.root} and the budget.max_* values."
            )


def check_command_line(hydra_cfg: DictConfig, config_loader) -> None:
    """What Hydra lets through: `experiment` is an optional group, so an unknown name composes the
    default job, and of two `experiment=` overrides the last wins. `hydra_cfg`: the `hydra` node of a
    composed config (its `overrides.task` and `runtime.choices`); `config_loader`: Hydra's, which
    lists the studies in conf/experiment."""
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    given = [o for o in parsed if o.key_or_group == "experiment"]
    if len(given) > 1 or any(o.is_sweep_override() for o in given):
        names = ", ".join(o.input_line.partition("=")[2] for o in given)
        raise UserError(
            f"experiment= was given more than one study ({names}), and a command runs one: keep one experiment= "
            f"override (run the others as separate commands)."
        )
    chosen = hydra_cfg.runtime.choices.get("experiment")
    experiments = sorted(e for e in config_loader.get_group_options("experiment") if not e.startswith("_"))  # _study: shared fields
    if chosen is not None and chosen not in experiments:
        raise UserError(f"experiment={chosen} is not a study in conf/experiment: choose one of {', '.join(experiments)}.")


def check_output_folder(folder: str | os.PathLike, setting: str) -> None:
    """The folder Hydra writes a run's (or a sweep's) outputs to can be created and written; `setting`
    names the config value that sets it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"The output folder {folder} cannot be written ({e.strerror}): set {setting} to a writable folder.") from e


class CommandLineChecks(Callback):
    """Hydra calls this before the run or the sweep starts (conf/config.yaml, hydra.callbacks), so a
    mistake on the command line stops it with one sentence before any job. Hydra turns a callback's
    exceptions into warnings, hence the exit."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, output_setting: str) -> None:
        try:
            check_command_line(config.hydra, GlobalHydra.instance().config_loader())
            check_output_folder(OmegaConf.select(config, output_setting), output_setting)
        except UserError as e:
            print(e, file=sys.stderr)
            sys.exit(1)
