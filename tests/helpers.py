"""Running real jobs from tests: composed in-process, or `python run.py` in a subprocess; a sweep's
job list without running it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext
from transformers import BertConfig, BertForSequenceClassification

from hydra_plugins.tokenprune_sweeper import method_fields
from hydra_plugins.tokenprune_sweeper.suites import SuiteSweeper

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["model=tiny", "budget=smoke", "logger=none", "measure.timing=false", "threads=1"]
# Issue 23's sweep: each method takes its own fields (powerbert and random lambda, adapler phi, bert none).
METHOD_FIELDS_SWEEP = ["method=bert,powerbert,random,adapler", "method.lambda=1e-4,1e-3", "method.phi=5e-4", "task=sst2", "speedup=2"]


def job_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*SMOKE, f"cache_dir={tmp_path / 'cache'}", *overrides])


def run_py(tmp_path: Path, *args: str, timeout: int = 600, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    """`python run.py ARGS` on the smoke settings, its records and cache under tmp_path (`env`: more
    environment variables, or other values for these)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    cmd = [sys.executable, "run.py", *flags, *SMOKE, f"cache_dir={tmp_path / 'cache'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}",
           *[a for a in args if not a.startswith("-")]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def tiny_model(layers: int = 4, seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    """The tiny random BERT of model=tiny, in eval mode."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=512, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def make_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids) of random examples with these real lengths,
    [CLS] first and [SEP] last, padded with zeros."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1000, 5000, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 101, 102
        mask[b, :n] = 1
    return ids, mask, torch.zeros_like(ids)


def tokenprune_sweeper(*arguments: str) -> tuple[SuiteSweeper, list[str]]:
    """The sweeper of `python run.py -m ARGUMENTS`, set up as Hydra sets it up, and the arguments
    Hydra hands its `sweep`. As in a multirun, the primary config is composed from the overrides that
    are not swept, with the command line as run.py hands it to Hydra; nothing is launched."""
    arguments = method_fields.lenient(arguments)
    parsed = OverridesParser.create().parse_overrides(arguments)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        primary = compose("config", overrides=[a for a, o in zip(arguments, parsed) if not o.is_sweep_override()],
                          return_hydra_config=True)
        sweeper = SuiteSweeper(max_batch_size=primary.hydra.sweeper.max_batch_size, params=primary.hydra.sweeper.params)
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=None)
        sweeper.setup(hydra_context=context, task_function=lambda cfg: None, config=primary)
    return sweeper, [a for a, o in zip(arguments, parsed) if not o.is_hydra_override()]


def sweep_jobs(*arguments: str) -> list[list[str]]:
    """The jobs tokenprune's sweeper makes of `python run.py -m ARGUMENTS`, none of them run."""
    sweeper, task_arguments = tokenprune_sweeper(*arguments)
    return sweeper.jobs(task_arguments)
