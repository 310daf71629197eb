"""Result records: one `result.json` per job, the single source of truth for tables and figures.

`write` is atomic (a temporary file renamed into place), so a record is either whole or absent,
and readable by whoever may read its folder (the umask decides, as for any file).
`load` gathers the records under any directories into a pandas DataFrame.
`summary_line` is the one line a job ends with; `table` the table a sweep ends with.
`python -m tokenprune.results DIR [DIR ...]` prints the records under DIRs as that table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

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
    "tokens_per_layer", "baseline_tokens_per_layer", "n_eval", "rationale", "examples", "method_info", "learning", "phase_times",
    "config", "inputs", "git_commit", "versions", "hardware", "started_at", "duration_s", "output_dir", "wandb_run",
)


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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private (0600); a record is for the group too
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
        os.fchmod(fd, 0o666 & ~_umask())  # readable by the group, like the record
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


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


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


# ---- what a person reads: one line per job, one table per sweep ---------------------------------


def _times(value) -> str:
    return "—" if _missing(value) else f"{float(value):.2f}×"


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value, digits: int = 2) -> str:
    return "—" if _missing(value) else f"{float(value):.{digits}f}"


def _target(value) -> str:
    return "—" if _missing(value) else f"{float(value):g}×"


def _reason(record: dict) -> str:
    """The first line of a record's error (a skipped job's reason, a failed job's error)."""
    error = str(record.get("error") or "").strip()
    return error.splitlines()[0] if error else "no reason recorded"


def _batch_size(record: dict) -> int | None:
    timing = record.get("timing") or {}
    measure = (record.get("config") or {}).get("measure") or {}
    return timing.get("batch_size") or measure.get("batch_size")


def summary_line(record: dict, path: str | os.PathLike | None = None, reused: bool = False) -> str:
    """The one line a job ends with: task, method, target; achieved FLOPs and wall-clock speedups; the
    metric and its drop against the full model; where the record is. `path`: the record's file
    (default: `result.json` in its `output_dir`); `reused`: the record of an earlier identical job."""
    path = path or Path(record.get("output_dir") or ".") / RECORD_NAME
    job = f"{record.get('task')} · {record.get('method')} · target {_target(record.get('speedup_target'))}"
    status = record.get("status")
    if status != "ok":
        return f"{str(status).capitalize()}: {job} · {_reason(record)} · record {path}"
    if _missing(record.get("wallclock_speedup_b1")):
        wall = "wall clock not timed"
    else:
        wall = (f"wall clock {_times(record.get('wallclock_speedup_b1'))} at batch 1, "
                f"{_times(record.get('throughput_speedup'))} at batch {_batch_size(record) or '?'}")
    metric = (f"{record.get('metric_name')} {_number(record.get('metric'))}, full model "
              f"{_number(record.get('baseline_metric'))} (drop {_number(record.get('metric_drop'))})")
    run = (record.get("wandb_run") or {}).get("id")
    if reused:
        head = f"Result (reused: computed {record.get('started_at')}, not recomputed)"
        tracking = f" · W&B run {run} of that job" if run else " · no W&B run"
    else:
        head, tracking = "Result", f" · W&B run {run}" if run else ""
    return f"{head}: {job} · FLOPs {_times(record.get('flops_speedup'))} · {wall} · {metric} · record {path}{tracking}"


def table(df: pd.DataFrame, root: str | os.PathLike | None = None) -> str:
    """Records (rows of `load`) as a fixed-width table, in the given order, with the columns of
    `summary_line`: a job that is not ok shows its one-line reason. Model, budget and seed get a
    column only when they differ between rows (else one line above the table says them). Record
    paths are shown relative to `root`."""
    if df.empty:
        return "No records."
    records = df.to_dict("records")
    shared = {k: records[0].get(k) for k in ("model", "budget", "seed") if len({str(r.get(k)) for r in records}) == 1}
    rows = []
    for r in records:
        ok = r.get("status") == "ok"
        row = {"task": r.get("task"), "method": r.get("method")}
        row.update({k: r.get(k) for k in ("model", "budget", "seed") if k not in shared})
        row.update({
            "target": _target(r.get("speedup_target")),
            "status": r.get("status"),
            "metric": f"{r.get('metric_name')} {_number(r.get('metric'))}" if ok else "",
            "full model": _number(r.get("baseline_metric")) if ok else "",
            "drop": _number(r.get("metric_drop")) if ok else "",
            "FLOPs": _times(r.get("flops_speedup")) if ok else "",
            "wall b1": _times(r.get("wallclock_speedup_b1")) if ok else "",
            "batched": _times(r.get("throughput_speedup")) if ok else "",
            "record": _relative(r.get("path"), root),
            "reason": "" if ok else _reason(r),
        })
        rows.append(row)
    columns = [c for c in rows[0] if c != "reason" or any(row["reason"] for row in rows)]
    lines = _aligned(rows, columns, right={"seed", "target", "full model", "drop", "FLOPs", "wall b1", "batched"})
    if shared:
        lines.insert(0, "All jobs: " + ", ".join(f"{k} {v}" for k, v in shared.items()))
    return "\n".join(lines)


def _aligned(rows: list[dict], columns: list[str], right: set[str]) -> list[str]:
    """A header and one line per row, columns two spaces apart; `right` columns right-aligned."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for c, v, w in zip(columns, values, widths)).rstrip()

    return [line(columns), *map(line, cells)]


def _relative(path, root) -> str:
    if not path:
        return ""
    if root is not None:
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve()))
        except ValueError:
            pass
    return str(path)


def counts(statuses: Iterable[str]) -> str:
    """`4 jobs: 2 ok, 1 skipped, 1 failed`."""
    statuses = list(statuses)
    known = ["ok", "skipped", "failed", *sorted(set(statuses) - set(STATUSES))]
    parts = [f"{statuses.count(s)} {s}" for s in known if statuses.count(s)]
    return f"{len(statuses)} job{'s' if len(statuses) != 1 else ''}: {', '.join(parts) or 'none'}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenprune.results",
        description="Print the result records under DIRs as a table: one row per job, with the reason of every "
                    "job that is not ok and where its record is.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="output directories of runs or sweeps (searched recursively), or result.json files")
    parser.add_argument("--status", nargs="+", choices=STATUSES, help="show only records with these statuses")
    parser.add_argument("--sort", nargs="+", default=["task", "method", "speedup_target", "seed"], metavar="FIELD",
                        help="record fields to sort by (default: task method speedup_target seed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        df = load(args.dirs)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    unknown = [f for f in args.sort if f not in df.columns]
    if unknown:
        parser.error(f"--sort: unknown record fields {unknown}; give fields of result.json, e.g. task method seed")
    if args.status:
        df = df[df["status"].isin(args.status)]
    if df.empty:
        print(f"No {RECORD_NAME} under {' '.join(args.dirs)}" + (f" with status {', '.join(args.status)}." if args.status else "."))
        return 0
    df = df.sort_values(args.sort, kind="stable", key=lambda c: c.astype(str) if c.dtype == object else c)
    root = args.dirs[0] if len(args.dirs) == 1 and Path(args.dirs[0]).is_dir() else None
    print(table(df, root))
    print("\n" + counts(df["status"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
