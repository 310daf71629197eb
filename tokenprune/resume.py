"""Resume: an ok record of the very same job is reused, never recomputed.

The same job is the same resolved config (less where its outputs go and how it is watched) at the
same code version. Its record is found in its own output directory (a re-run into the same sweep
directory) or in the cache's record index (the same command run again into a new directory).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tokenprune import results
from tokenprune.cache import Cache
from tokenprune.provenance import git_commit

log = logging.getLogger(__name__)


def job_key(config: dict) -> dict:
    """What makes two jobs the same job: the resolved config, less where its outputs go and how it is
    watched (the record index adds the code version to it)."""
    return {k: v for k, v in config.items() if k not in ("logger", "resume", "cache_dir")}


def finished_record(cfg: DictConfig, output_dir: Path) -> dict | None:
    """An ok record of this very job, copied into `output_dir` when it was found elsewhere; or None."""
    config = OmegaConf.to_container(cfg, resolve=True)
    key = {"job": job_key(config), "git_commit": git_commit()}
    candidates = [output_dir / results.RECORD_NAME, Cache(cfg.cache_dir).path("records", key) / results.RECORD_NAME]
    for path in candidates:
        try:
            record = results.read(path)
        except (OSError, ValueError):
            continue
        if record.get("status") == "ok" and job_key(record.get("config") or {}) == key["job"]:
            if path != candidates[0]:
                record = {**record, "output_dir": str(output_dir)}
                _copy_examples(record, path.parent, output_dir)
                results.write(record, output_dir)
            log.info(f"resume: {cfg.task.name}/{cfg.method.name} at {cfg.speedup}x is already done ({path}); not recomputed")
            return record
    return None


def _copy_examples(record: dict, source: Path, target: Path) -> None:
    if record.get("examples"):
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / record["examples"], target / record["examples"])


def remember(cfg: DictConfig, record: dict) -> None:
    """Index an ok record (and its per-example outputs) by its job key, for `finished_record`."""
    key = {"job": job_key(record["config"]), "git_commit": record["git_commit"]}

    def make(tmp: Path) -> None:
        _copy_examples(record, Path(record["output_dir"]), tmp)
        results.write(record, tmp)

    try:
        Cache(cfg.cache_dir).get_or_make("records", key, make)
    except OSError as e:  # the record itself is written; only the index entry is missing
        log.warning(f"could not index the record for resume: {e}")
