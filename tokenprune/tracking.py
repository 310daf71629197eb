"""The W&B mirror of a job: config, training curves, the final record as the run summary.

Records stay the source of truth; W&B is for watching. Offline by default (`wandb sync` uploads
later); one run per job, grouped by sweep, tagged by task and method, always finished, marked failed
when the job failed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Record fields charted as W&B summary values (names kept identical to the record's).
SUMMARY_FIELDS = (
    "task", "method", "model", "seed", "budget", "flops_mode", "status", "metric_name", "metric",
    "baseline_metric", "metric_drop", "flops_speedup", "flops_per_example",
    "baseline_flops_per_example", "wallclock_speedup_b1", "latency_ms_b1", "baseline_latency_ms_b1",
    "throughput_speedup", "n_eval", "duration_s", "speedup_target", "error",
)


class Tracker:
    """No tracking: the interface every tracker has."""

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def finish(self, record: dict) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, logger: DictConfig, config: dict, name: str, group: str, tags: list[str]):
        import wandb

        self._wandb = wandb
        Path(logger.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger.project, entity=logger.entity, mode=logger.mode, dir=logger.dir,
            group=logger.group or group, name=name, tags=tags, config=config, reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def finish(self, record: dict) -> None:
        try:
            for key in SUMMARY_FIELDS:
                if record.get(key) is not None:
                    self.run.summary[key] = record[key]
            for group in ("metrics", "flops_speedups"):
                for key, value in (record.get(group) or {}).items():
                    self.run.summary[f"{group}/{key}"] = value
            tokens, base = record.get("tokens_per_layer"), record.get("baseline_tokens_per_layer")
            if tokens:
                rows = [[i, attn, ffn, base["attention"][i] if base and i < len(base["attention"]) else None]
                        for i, (attn, ffn) in enumerate(zip(tokens["attention"], tokens["ffn"]))]
                columns = ["layer", "tokens_attention", "tokens_ffn", "baseline_tokens"]
                self.run.log({"tokens_per_layer": self._wandb.Table(columns=columns, data=rows)})
        except Exception as e:  # the record is already written; tracking never stops a sweep
            log.warning(f"W&B summary incomplete: {e}")
        finally:
            self.run.finish(exit_code=0 if record.get("status") in ("ok", "skipped") else 1)


def make_tracker(logger: DictConfig, config: dict, name: str, group: str, tags: list[str]) -> Tracker:
    if logger.name == "none" or logger.get("mode") == "disabled":
        return Tracker()
    try:
        return WandbTracker(logger, config, name, group, tags)
    except Exception as e:  # tracking must never cost a job its record
        log.warning(f"W&B could not start ({e}); this job is recorded in result.json only.")
        return Tracker()
