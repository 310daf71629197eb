"""The W&B mirror of a job: config, training curves, the final record as the run summary, a one-row
table and an artifact.

Records stay the source of truth; W&B is for watching. Offline by default (`wandb sync` uploads
later); one run per job, always finished, marked failed when the job failed. The runs of one sweep
share a group named after the sweep directory (unique to that sweep), their job type is the method,
and their names are unique. Each training phase is charted against its own step (`<phase>/step`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Record fields charted as W&B summary values and as the columns of the run's one-row `result` table
# (names kept identical to the record's).
SUMMARY_FIELDS = (
    "task", "method", "model", "seed", "budget", "flops_mode", "status", "metric_name", "metric",
    "baseline_metric", "metric_drop", "flops_speedup", "flops_per_example",
    "baseline_flops_per_example", "wallclock_speedup_b1", "latency_ms_b1", "baseline_latency_ms_b1",
    "throughput_speedup", "n_eval", "duration_s", "speedup_target", "error",
)
RESULT_TABLE = "result"  # the key of the one-row table; the W&B UI concatenates it over a sweep's runs


class Tracker:
    """No tracking: the interface every tracker has."""

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def run_info(self) -> dict | None:
        """Where the run is (for the record's `wandb_run`); None without one."""
        return None

    def finish(self, record: dict, record_path: Path | None = None) -> None:
        pass


def _short_hash(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:6]


def run_names(output_dir: Path) -> tuple[str, str | None]:
    """(run name, group) of the job writing into `output_dir`: the name is the job's folder plus a
    hash of its full path (unique); the group, in a Hydra multirun, is the sweep folder's date and
    time plus a hash of its full path (shared by the sweep's jobs, unique to the sweep); else None."""
    output_dir = Path(output_dir)
    name = f"{output_dir.name}_{_short_hash(output_dir)}"
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return name, None
    sweep = Path(HydraConfig.get().sweep.dir)
    return name, f"{sweep.parent.name}_{sweep.name}_{_short_hash(sweep)}"


class WandbTracker(Tracker):
    def __init__(self, logger: DictConfig, config: dict, name: str, group: str | None, job_type: str, tags: list[str]):
        import wandb

        self._wandb = wandb
        Path(logger.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger.project, entity=logger.entity, mode=logger.mode, dir=logger.dir,
            group=logger.group or group, job_type=job_type, name=name, tags=tags, config=config,
            reinit="finish_previous", settings=wandb.Settings(console="off", silent=True),
        )
        self._charted: set[str] = set()

    def run_info(self) -> dict:
        offline = self.run.settings.mode == "offline"
        return {"id": self.run.id, "name": self.run.name, "group": self.run.group or None, "job_type": self.run.job_type,
                "project": self.run.project, "mode": self.run.settings.mode,
                "url": None if offline else self.run.url,
                "dir": os.path.dirname(self.run.dir)}  # `wandb sync <dir>` uploads an offline run

    def log(self, metrics: dict, step: int | None = None) -> None:
        """A phase's metrics (`<phase>/<name>`, e.g. `finetune/loss`) are charted against
        `<phase>/step`: the phase's own step, given here as `step` or in the metrics. W&B's own step
        only counts rows (it never goes back), so a phase whose steps start again at 1 keeps every
        row (passing them as W&B's step would drop all but the first phase's)."""
        metrics = dict(metrics)
        phases = {key.rpartition("/")[0] for key in metrics} - {""}
        if step is not None:
            for phase in phases:
                metrics.setdefault(f"{phase}/step", step)
        for key in metrics.keys() - self._charted:
            phase = key.rpartition("/")[0]
            if phase and not key.endswith("/step"):
                self.run.define_metric(f"{phase}/step", hidden=True)
                self.run.define_metric(key, step_metric=f"{phase}/step")
            self._charted.add(key)
        self.run.log(metrics)

    def finish(self, record: dict, record_path: Path | None = None) -> None:
        try:
            scalars = {key: record.get(key) for key in SUMMARY_FIELDS}
            for key, value in scalars.items():
                if value is not None:
                    self.run.summary[key] = value
            for group in ("metrics", "flops_speedups"):
                for key, value in (record.get(group) or {}).items():
                    self.run.summary[f"{group}/{key}"] = value
            self.run.log({RESULT_TABLE: self._wandb.Table(columns=list(scalars), data=[list(scalars.values())])})
            tokens, base = record.get("tokens_per_layer"), record.get("baseline_tokens_per_layer")
            if tokens:
                rows = [[i, attn, ffn, base["attention"][i] if base and i < len(base["attention"]) else None]
                        for i, (attn, ffn) in enumerate(zip(tokens["attention"], tokens["ffn"]))]
                columns = ["layer", "tokens_attention", "tokens_ffn", "baseline_tokens"]
                self.run.log({"tokens_per_layer": self._wandb.Table(columns=columns, data=rows)})
            if record_path is not None:
                artifact = self._wandb.Artifact(f"result-{self.run.id}", type="result",
                                                metadata={k: v for k, v in scalars.items() if v is not None})
                artifact.add_file(str(record_path), name="result.json")
                self.run.log_artifact(artifact)
        except Exception as e:  # the record is already written; tracking never stops a sweep
            log.warning(f"W&B summary incomplete: {e}")
        finally:
            self.run.finish(exit_code=0 if record.get("status") in ("ok", "skipped") else 1)


def make_tracker(logger: DictConfig, config: dict, output_dir: Path, job_type: str, tags: list[str]) -> Tracker:
    """The job's tracker: a W&B run named after `output_dir` (see `run_names`), or no tracking."""
    if logger.name == "none" or logger.get("mode") == "disabled":
        return Tracker()
    try:
        name, group = run_names(output_dir)
        return WandbTracker(logger, config, name, group, job_type, tags)
    except Exception as e:  # tracking must never cost a job its record
        log.warning(f"W&B could not start ({e}); this job is recorded in result.json only.")
        return Tracker()
