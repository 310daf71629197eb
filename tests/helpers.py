"""Running real jobs from tests: composed in-process, or `python run.py` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["model=tiny", "budget=smoke", "logger=none", "measure.timing=false", "threads=1"]


def job_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*SMOKE, f"cache_dir={tmp_path / 'cache'}", *overrides])


def run_py(tmp_path: Path, *args: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """`python run.py ARGS` on the smoke settings, its records and cache under tmp_path."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    cmd = [sys.executable, "run.py", *flags, *SMOKE, f"cache_dir={tmp_path / 'cache'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}",
           *[a for a in args if not a.startswith("-")]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)
