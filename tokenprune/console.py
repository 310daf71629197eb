"""What a person sees on the console around Hydra jobs, as a Hydra callback (conf/config.yaml,
`hydra.callbacks.console`):

- at each job's start, its resolved config, one line per group (in full in `.hydra/config.yaml`);
- at a sweep's end, the table of its jobs (`results.table`: what each found, or why it was skipped
  or failed, and where its record is), then the counts. A sweep with failed jobs exits non-zero.

Each job's own last line, `results.summary_line`, comes from the runner.
"""

from __future__ import annotations

import atexit
import logging
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tokenprune import results

log = logging.getLogger(__name__)


class SweepHadFailures(CompactHydraException):
    """Some jobs of the sweep failed; the table above says why."""


def compact_config(config: dict) -> str:
    """One line for the top-level values, then one line per group (`task: {name: sst2, ...}`)."""
    plain = {k: v for k, v in config.items() if not isinstance(v, dict)}
    lines = [_flow(plain)[1:-1]] if plain else []
    lines += [f"{k}: {_flow(v)}" for k, v in config.items() if isinstance(v, dict)]
    return "\n".join(lines)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False, allow_unicode=True).strip()


def _natural(text: str) -> list:
    """Sort key that puts job 2 before job 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def sweep_report(sweep_dir: Path) -> tuple[str, int]:
    """(the table of the jobs under `sweep_dir` with the counts below it, how many failed). A job
    folder that Hydra started (it holds `.hydra/`) but that holds no record is a job that was killed
    or interrupted: it gets a row too."""
    frame = results.load(sweep_dir)
    recorded = {Path(p).parent.resolve() for p in frame["path"]}
    started = [d.parent for d in sweep_dir.glob("**/.hydra") if d.parent != sweep_dir]
    missing = [d for d in started if d.resolve() not in recorded]
    if missing:
        rows = [results.new_record(status="no record", error="no result.json: the job was killed or interrupted; "
                                   "re-run the same command to run it") | {"path": str(d / results.RECORD_NAME)}
                for d in missing]
        frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: _natural(str(frame["path"].iloc[i])))]
    statuses = list(frame["status"])
    failed = sum(s not in ("ok", "skipped") for s in statuses)
    lines = [f"Sweep {sweep_dir}:", results.table(frame, root=sweep_dir), "",
             f"{results.counts(statuses)}. This table again: python -m tokenprune.results {sweep_dir}"]
    if failed:
        lines.append("Running the same command again runs the jobs that did not end ok and reuses the others.")
    return "\n".join(lines), failed


class Console(Callback):
    def __init__(self) -> None:
        self._sweep_dir: Path | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            job = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                   for k, v in config.items() if k != "hydra"}  # hydra's own fields do not all resolve in a job
        except Exception as e:  # an interpolation that fails here fails the job too, with its own message
            log.warning(f"the config does not resolve ({e})")
            return
        output = Path(config.hydra.runtime.output_dir) / str(config.hydra.output_subdir or ".hydra")
        log.info(f"Config (resolved; in full in {output / 'config.yaml'}):\n{compact_config(job)}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(config.hydra.sweep.dir)  # `now` is resolved once per sweep: read it here
        # Hydra calls on_multirun_end only when the sweeper returns; a sweeper that raises when jobs
        # failed (to exit non-zero) skips it, so the table is printed at exit then.
        atexit.register(self._print_table)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._print_table)
        failed = self._print_table()
        if failed:
            raise SweepHadFailures(f"{failed} job(s) of the sweep failed: their reasons are in the table above.")

    def _print_table(self) -> int:
        if self._sweep_dir is None or not self._sweep_dir.is_dir():
            return 0  # the sweep stopped before any job started
        text, failed = sweep_report(self._sweep_dir)
        print("\n" + text, flush=True)
        return failed
