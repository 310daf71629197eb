"""Result records: one `result.json` per job, the single source of truth for tables and figures.

`write` is atomic (a temporary file renamed into place), so a record is either whole or absent.
`load` gathers the records under any directories into a pandas DataFrame.
`python -m tokenprune.results DIR [DIR ...]` prints them as a table.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

RECORD_NAME = "result.json"
EXAMPLES_NAME = "examples.npz"  # per-example outputs beside an ok record (`write_examples`)
STATUSES = ("ok", "failed", "skipped")

# Every record has these keys; fields a job could not fill are null, never made up.
FIELDS = (
    "task", "method", "model", "seed", "speedup_target", "budget", "status", "error", "traceback",
    "metric_name", "metric", "metrics", "baseline_metric", "control_metric", "reference", "metric_drop",
    "flops_mode", "flops_per_example", "baseline_flops_per_example", "flops_speedup", "flops_speedups",
    "latency_ms_b1", "baseline_latency_ms_b1", "wallclock_speedup_b1", "throughput_speedup", "timing",
    "tokens_per_layer", "baseline_tokens_per_layer", "n_eval", "examples", "method_info", "phase_times",
    "config", "inputs", "git_commit", "versions", "hardware", "started_at", "duration_s", "output_dir",
)

TABLE_COLUMNS = [
    "task", "method", "model", "seed", "speedup_target", "status", "metric_name", "metric",
    "baseline_metric", "flops_speedup", "wallclock_speedup_b1", "throughput_speedup", "n_eval", "duration_s",
]


def new_record(**fields) -> dict:
    record = dict.fromkeys(FIELDS)
    record.update(fields)
    return record


def write(record: dict, directory: str | os.PathLike, keep_ok: bool = False) -> Path:
    """Write `record` as `directory/result.json`, atomically. With `keep_ok`, an ok record already
    there is never replaced by a record that is not ok: that one goes to `result.<status>.json`."""
    unknown = set(record) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown record fields: {sorted(unknown)}")
    if record.get("status") not in STATUSES:
        raise ValueError(f"record status must be one of {STATUSES}, not {record.get('status')!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / RECORD_NAME
    if keep_ok and record["status"] != "ok" and final.exists():
        try:
            if read(final).get("status") == "ok":
                final = directory / f"result.{record['status']}.json"
                log.warning(f"{directory} holds an ok record; this {record['status']} one goes to {final.name}")
        except (OSError, ValueError):
            pass
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".result.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def write_examples(examples: dict[str, np.ndarray], directory: str | os.PathLike) -> str:
    """Per-example outputs of a job (`idx`, `label`, `prediction`, `baseline_prediction`: one entry
    per dev example, in one order) as `directory/examples.npz`, atomically; returns the file name
    the record keeps. Any two records on the same examples can then be compared paired, and their
    metrics recomputed."""
    lengths = {k: len(v) for k, v in examples.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-example outputs of unequal lengths: {lengths}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".examples.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in examples.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / EXAMPLES_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return EXAMPLES_NAME


def examples_of(directory: str | os.PathLike, record: dict) -> dict[str, np.ndarray] | None:
    """The per-example outputs kept beside `record` in `directory`, as arrays (None: it keeps none)."""
    if not record.get("examples"):
        return None
    path = Path(directory) / record["examples"]
    try:
        with np.load(path) as saved:
            return {k: saved[k] for k in saved.files}
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path}: damaged per-example outputs ({e})") from e


def read_examples(record_path: str | os.PathLike, record: dict | None = None) -> pd.DataFrame:
    """The per-example outputs beside a record (`result.json` or its directory), one row per dev
    example: idx, label, prediction, baseline_prediction."""
    path = Path(record_path)
    directory = path if path.is_dir() else path.parent
    record = read(directory / RECORD_NAME) if record is None else record
    examples = examples_of(directory, record)
    if examples is None:
        raise FileNotFoundError(f"{directory}: this record keeps no per-example outputs (it predates them, or did not end ok).")
    return pd.DataFrame(examples)


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy / torch
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save(record: dict, directory: str | os.PathLike, keep_ok: bool = False,
         examples: dict[str, np.ndarray] | None = None) -> Path | None:
    """`write` (after its per-example outputs, `write_examples`, when given), and when `directory`
    cannot be written (no permission, a full disk), write to `$TMPDIR/tokenprune-records/<directory>`
    instead and say where: a finished result is never lost. Returns where the record went (None,
    with the record in the log, when nowhere could be written)."""

    def write_all(target: str | os.PathLike) -> Path:
        if examples is not None:
            write_examples(examples, target)
        return write(record, target, keep_ok)

    try:
        return write_all(directory)
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / "tokenprune-records" / Path(directory).resolve().relative_to("/")
        try:
            path = write_all(fallback)
        except OSError as again:
            log.error(f"the record could not be written to {directory} ({e.strerror}) nor to {fallback} "
                      f"({again.strerror}); here it is: {json.dumps(record, default=_jsonable)}")
            return None
        log.warning(f"{directory} cannot be written ({e.strerror}): the record went to {path} instead; "
                    f"copy it back once the disk is fixed.")
        return path


def read(path: str | os.PathLike) -> dict:
    """A record; ValueError when the file is not JSON or not a JSON object."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds JSON but not a record (a {type(record).__name__}, not an object)")
    return record


def find(paths: Iterable[str | os.PathLike]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RECORD_NAME)))
        else:
            raise FileNotFoundError(f"{p} is neither a result.json nor a directory: give the output directories of your runs.")
    return found


def load(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """All records under `paths` (directories searched recursively, or result.json files) as a
    DataFrame, one row per record, with a `path` column. Unreadable records are skipped with a
    warning that names them; the others still load."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = []
    for path in find(paths):
        try:
            record = read(path)
            if "status" not in record:
                raise ValueError("not a tokenprune record (no status field)")
        except (OSError, ValueError) as e:
            log.warning(f"skipping {path}: unreadable record ({e}); re-run that job to rewrite it.")
            continue
        rows.append({**dict.fromkeys(FIELDS), **record, "path": str(path)})
    return pd.DataFrame(rows, columns=[*FIELDS, "path"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m tokenprune.results DIR [DIR ...]   (prints the records under DIRs as a table)")
        return 0 if argv else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        df = load(argv)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if df.empty:
        print(f"No {RECORD_NAME} under {' '.join(argv)}.")
        return 0
    table = df[TABLE_COLUMNS].sort_values(["task", "method", "speedup_target", "seed"])
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False))
    counts = df["status"].value_counts().to_dict()
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
