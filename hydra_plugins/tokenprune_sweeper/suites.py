"""tokenprune's sweeper: the cartesian product of the swept values, as Hydra's basic sweeper makes
it, plus three rules that make tokenprune sweeps read well.

1. A task suite is one job per member task: `task=glue` in a multirun becomes `task=cola`, …,
   `task=wnli`, crossed with every other swept value. A suite is a file in `conf/task/` with a
   `suite:` list, so the list has one home.
2. A method field goes to the methods that have it: in `method=bert,powerbert method.lambda=1e-4,1e-3`
   the powerbert jobs take each λ and bert, which has no field `lambda`, runs once without it: its
   config is that of a plain bert run, so the two share a record (resume). A field no method of the
   sweep has stops the sweep before any job. Hydra composes a multirun's primary config, with the
   default method (bert) and every unswept override, before this sweeper runs, and bert's closed
   config would refuse `method.phi=...` there; so run.py hands `method.X=...` to Hydra as
   `++method.X=...` (add or override), and this sweeper turns it back into the plain override for
   the jobs whose method has X (method_fields.py has the details).
3. A method with one operating point declares it in its config (`fixed_speedup`, bert's 1.0): its
   jobs at any swept `speedup` run once, at that speedup, so `method=bert,trbert speedup=2,3` gives
   one bert job and two trbert jobs instead of bert jobs that fail half way through the sweep.

The sweep's start logs what rules 2 and 3 did. At the end it prints how many jobs ended ok, skipped
and failed, and exits non-zero when any failed (the other jobs have all run and written their
records by then).

Built on Hydra's public plugin interface (`hydra.plugins.sweeper.Sweeper`): the overrides are parsed
with Hydra's override parser, each job's config is composed once before launching (as every Hydra
sweeper does), and the jobs go to whichever launcher the config names, in batches of
`max_batch_size`.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.tokenprune_sweeper import method_fields

log = logging.getLogger(__name__)


class SweepFailed(CompactHydraException):
    """Some jobs of the sweep failed; their records say why."""


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _index(job: List[str], key: str) -> Optional[int]:
    return next((i for i, o in enumerate(job) if _key_value(o)[0] == key), None)


def _number(value: str) -> float | str:
    """A speedup's value as a number where it is one (a typo stays text, for the runner to refuse)."""
    try:
        return float(value)
    except ValueError:
        return value


def cartesian(overrides: List[Override]) -> List[List[str]]:
    """Every combination of the swept values, in Hydra's basic sweeper's order; a later override of
    a key replaces an earlier one (the command line replaces `hydra.sweeper.params`)."""
    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise CompactHydraException(
                f"{override.input_line}: this sweeper enumerates values (a,b,c, range(), glob()), not intervals."
            )
    return [list(job) for job in itertools.product(*choices.values())]


def unique(jobs: List[List[str]]) -> List[List[str]]:
    """The jobs less repeats (a speedup counts by its number: speedup=1 is speedup=1.0), in order."""
    seen, kept = set(), []
    for job in jobs:
        same = tuple((k, _number(v)) if k == "speedup" else o for o, (k, v) in zip(job, map(_key_value, job)))
        if same not in seen:
            seen.add(same)
            kept.append(job)
    return kept


def _status(job: JobReturn) -> str:
    """The status of a job's record; `failed` for a job that raised instead of returning one."""
    try:
        record = job.return_value
    except Exception as e:  # Hydra prints the job's overrides; the sweep goes on to the others
        log.error(f"the job raised {e.__class__.__name__}: {e}")
        return "failed"
    return record.get("status", "failed") if isinstance(record, dict) else "failed"


class SuiteSweeper(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None):
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self._composed: dict[str, DictConfig] = {}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _compose(self, choice: str) -> DictConfig:
        """The config with one group choice (e.g. task=glue) over the defaults, composed once."""
        if choice not in self._composed:
            self._composed[choice] = self.hydra_context.config_loader.load_sweep_config(self.config, [choice])
        return self._composed[choice]

    def _method_of(self, job: List[str]) -> str:
        at = _index(job, "method")
        return _key_value(job[at])[1] if at is not None else self.config.hydra.runtime.choices.method

    def expand_suites(self, jobs: List[List[str]]) -> List[List[str]]:
        """Each job of a suite (task=glue) becomes one job per member task."""
        expanded = []
        for job in jobs:
            at = _index(job, "task")
            members = self._compose(f"task={_key_value(job[at])[1]}").task.get("suite") if at is not None else None
            if not members:
                expanded.append(job)
                continue
            prefix = job[at].partition("=")[0]
            expanded += [job[:at] + [f"{prefix}={member}"] + job[at + 1 :] for member in members]
        return expanded

    def fit_method_fields(self, jobs: List[List[str]]) -> List[List[str]]:
        """Each `method.X=` override goes, as a plain override, to the jobs whose method has a field
        X, and is left out of the others."""
        swept = list(dict.fromkeys(f for job in jobs for f in map(method_fields.field_of, job) if f))
        if not swept:
            return jobs
        methods = list(dict.fromkeys(self._method_of(job) for job in jobs))
        fields = {m: list(self._compose(f"method={m}").method) for m in methods}
        for field in swept:
            method_fields.check_sweep(field, fields)
            takers = [m for m in methods if field in fields[m]]
            others = [m for m in methods if m not in takers]
            left_out = f"; left out of {', '.join(others)} (no field {field}), whose jobs run once whatever its value" if others else ""
            log.info(f"method.{field} goes to the jobs of {', '.join(takers)}{left_out}.")
        kept = []
        for job in jobs:
            own = fields[self._method_of(job)]
            kept.append([method_fields.plain(o) for o in job if method_fields.field_of(o) in (None, *own)])
        return kept

    def fix_speedups(self, jobs: List[List[str]]) -> List[List[str]]:
        """The jobs of a method with one operating point (`fixed_speedup` in its config) at other
        speedup targets move to that speedup (and `unique` then keeps one of them)."""
        moved: dict[tuple[str, float], int] = {}  # jobs moved, by (method, its fixed speedup)
        fixed_jobs = []
        for job in jobs:
            at, method = _index(job, "speedup"), self._method_of(job)
            fixed = self._compose(f"method={method}").method.get("fixed_speedup") if at is not None else None
            if fixed is not None and _number(_key_value(job[at])[1]) != float(fixed):
                job = job[:at] + [f"{job[at].partition('=')[0]}={fixed}"] + job[at + 1 :]
                moved[method, fixed] = moved.get((method, fixed), 0) + 1
            fixed_jobs.append(job)
        for (method, fixed), n in moved.items():
            log.info(
                f"method={method} has one operating point (fixed_speedup: {fixed} in its config): its {n} jobs at "
                f"other speedup targets run once at speedup={fixed}."
            )
        return fixed_jobs

    def jobs(self, arguments: List[str]) -> List[List[str]]:
        """The overrides of every job of the sweep, after the three rules."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        jobs = unique(self.fix_speedups(self.fit_method_fields(self.expand_suites(cartesian(overrides)))))
        log.info(f"Sweep: {len(jobs)} jobs.")
        return jobs

    def sweep(self, arguments: List[str]) -> Any:
        jobs = self.jobs(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        size = self.max_batch_size or max(len(jobs), 1)
        returns = []
        for start in range(0, len(jobs), size):
            batch = jobs[start : start + size]
            self.validate_batch_is_legal(batch)  # a config that does not compose stops the sweep before its batch
            returns.append(self.launcher.launch(batch, initial_job_idx=start))

        counts: dict[str, int] = {}
        for batch in returns:
            for job in batch:
                status = _status(job)
                counts[status] = counts.get(status, 0) + 1
        total = sum(counts.values())
        summary = ", ".join(f"{counts[s]} {s}" for s in ("ok", "skipped", "failed") if counts.get(s))
        log.info(f"Sweep finished: {total} jobs: {summary}. Records under {sweep_dir}")
        if counts.get("failed"):
            raise SweepFailed(
                f"{counts['failed']} of {total} jobs failed ({summary}): their result.json under "
                f"{sweep_dir} holds the error; re-run the same command to redo only those."
            )
        return returns
