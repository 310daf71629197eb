"""Resume: an ok record of the very same job is reused, never recomputed.

The same job is the same resolved config (less where its outputs go and how it is watched) on the same
inputs (the content of its data files, tokenizer and local model weights: `fingerprint.job_inputs`)
at the same code version. Its record is found in its own output directory (a re-run into the same
sweep directory) or in the cache's record index (the same command run again into a new directory).
An index entry checks itself like every cache entry: a damaged one counts as missing and is written
again from the output directory's copy, or by the job that recomputes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tokenprune import results
from tokenprune.cache import Cache
from tokenprune.errors import UserError
from tokenprune.fingerprint import job_inputs
from tokenprune.provenance import git_commit

log = logging.getLogger(__name__)


def job_key(config: dict) -> dict:
    """What makes two jobs the same job: the resolved config, less where its outputs go and how it is
    watched (the record index adds the inputs and the code version to it)."""
    return {k: v for k, v in config.items() if k not in ("logger", "resume", "cache_dir")}


def _index_key(config: dict, inputs: dict | None, commit: str | None) -> dict:
    return {"job": job_key(config), "inputs": inputs, "git_commit": commit}


def finished_record(cfg: DictConfig, output_dir: Path) -> dict | None:
    """An ok record of this very job, copied into `output_dir` when it was found elsewhere; or None."""
    config = OmegaConf.to_container(cfg, resolve=True)
    inputs = job_inputs(cfg)
    key = _index_key(config, inputs, git_commit())
    indexed = Cache(cfg.cache_dir).get("records", key)
    candidates = [output_dir / results.RECORD_NAME] + ([indexed / results.RECORD_NAME] if indexed else [])
    for path in candidates:
        try:
            record = results.read(path)
            examples = results.examples_of(path.parent, record)
        except (OSError, ValueError):  # damaged: treated as missing
            continue
        if (record.get("status") == "ok" and job_key(record.get("config") or {}) == key["job"]
                and record.get("inputs") == inputs):
            if path != candidates[0]:
                record = {**record, "output_dir": str(output_dir)}
                results.save(record, output_dir, examples=examples)
            elif indexed is None and record.get("git_commit") == key["git_commit"]:
                # the index lost its copy (or never had it): write it again
                remember(cfg, record, examples)
            log.info(f"resume: {cfg.task.name}/{cfg.method.name} at {cfg.speedup}x is already done ({path}); not recomputed")
            return record
    return None


def remember(cfg: DictConfig, record: dict, examples: dict | None = None) -> None:
    """Index an ok record (and its per-example outputs) by its job key, for `finished_record`."""
    key = _index_key(record["config"], record.get("inputs"), record["git_commit"])

    def make(tmp: Path) -> None:
        if examples is not None:
            results.write_examples(examples, tmp)
        results.write(record, tmp)

    try:
        Cache(cfg.cache_dir).get_or_make("records", key, make)
    except (OSError, UserError) as e:  # the record itself is written; only the index entry is missing
        log.warning(f"could not index the record for resume: {e}")
