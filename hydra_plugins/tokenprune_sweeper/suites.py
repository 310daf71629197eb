"""Hydra's basic sweeper, plus the two rules that make tokenprune sweeps read well.

1. A task suite is one job per member task: `task=glue` in a multirun becomes `task=cola`, …,
   `task=wnli`, crossed with every other swept value. A suite is a file in `conf/task/` with a
   `suite:` list, so the list has one home.
2. The full model has one operating point: a `method=bert` job at any `speedup` runs once, at
   `speedup=1`, so `method=bert,trbert speedup=2,3` gives one bert job and two trbert jobs (said in
   the log) instead of bert jobs that fail half way through the sweep.

At the end it prints how many jobs ended ok, skipped and failed, and exits non-zero when any failed
(the other jobs have all run and written their records by then).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobStatus
from hydra.errors import HydraException

log = logging.getLogger(__name__)

FULL_MODEL = "bert"


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


class SweepFailed(HydraException):
    """Some jobs of the sweep failed; their records say why."""


class SuiteSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._suites: dict[str, list[str] | None] = {}

    def _suite_members(self, task: str) -> list[str] | None:
        if task not in self._suites:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, [f"task={task}"])
            suite = cfg.task.get("suite")
            self._suites[task] = list(suite) if suite else None
        return self._suites[task]

    def expand(self, jobs: List[List[str]]) -> List[List[str]]:
        """Suites into member tasks; full-model jobs at other targets onto speedup 1, once."""
        expanded = []
        for job in jobs:
            task_at = next((i for i, o in enumerate(job) if _key_value(o)[0] == "task"), None)
            members = self._suite_members(_key_value(job[task_at])[1]) if task_at is not None else None
            if members is None:
                expanded.append(job)
                continue
            prefix = job[task_at].partition("=")[0]
            for member in members:
                expanded.append(job[:task_at] + [f"{prefix}={member}"] + job[task_at + 1 :])

        default_method = self.config.method.get("name")
        collapsed, seen, moved = [], set(), 0
        for job in expanded:
            values = dict(_key_value(o) for o in job)
            speedup = next((i for i, o in enumerate(job) if _key_value(o)[0] == "speedup"), None)
            if values.get("method", default_method) == FULL_MODEL and speedup is not None and float(values["speedup"]) != 1.0:
                job = job[:speedup] + [job[speedup].partition("=")[0] + "=1.0"] + job[speedup + 1 :]
                moved += 1
                if tuple(job) in seen or tuple(job[:speedup] + job[speedup + 1 :]) in seen:
                    continue  # the full model already runs at speedup 1 with these settings
            seen.add(tuple(job))
            if speedup is not None and float(values["speedup"]) == 1.0:
                seen.add(tuple(job[:speedup] + job[speedup + 1 :]))
            collapsed.append(job)
        if moved:
            log.info(
                f"method={FULL_MODEL} is the full model and has one operating point: its {moved} jobs at other "
                f"speedup targets run once at speedup=1.0."
            )
        return collapsed

    def split_arguments(self, overrides: List[Override], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        [jobs] = BasicSweeper.split_arguments(overrides, None)
        jobs = self.expand(jobs)
        log.info(f"Sweep: {len(jobs)} jobs.")
        if max_batch_size is None:
            return [jobs]
        return [jobs[i : i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]

    def sweep(self, arguments: List[str]) -> Any:
        returns = super().sweep(arguments)
        counts: dict[str, int] = {}
        for batch in returns:
            for job in batch:
                record = job.return_value if job.status == JobStatus.COMPLETED else None
                status = record.get("status", "failed") if isinstance(record, dict) else "failed"
                counts[status] = counts.get(status, 0) + 1
        total = sum(counts.values())
        summary = ", ".join(f"{counts[s]} {s}" for s in ("ok", "skipped", "failed") if counts.get(s))
        log.info(f"Sweep finished: {total} jobs: {summary}. Records under {self.config.hydra.sweep.dir}")
        if counts.get("failed"):
            raise SweepFailed(
                f"{counts['failed']} of {total} jobs failed ({summary}): their result.json under "
                f"{self.config.hydra.sweep.dir} holds the error; re-run the same command to redo only those."
            )
        return returns
