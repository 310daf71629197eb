"""Reading a task's splits, from local files or the HuggingFace hub, into `datasets.Dataset`s.

Every split comes out with the same four columns: `text_a` (str), `text_b` (str, "" for
single-text tasks), `label` (class id, or a float score for regression) and `idx` (row number
within the source split, 0-based, header excluded).

Local formats (`task.format`): `tsv` (tab-separated, quoting off: GLUE's text holds stray `"`),
`csv` (comma-separated, quoted fields), each with a header line or without one (`task.header`);
`jsonl` (one JSON object per line); and `hf`, a folder written by `datasets`' `save_to_disk`. A
`*.gz` text file is gunzipped. `task.dir` is a folder under `data.root`, or any absolute path.
Two formats also give each example its gold rationale (an extra column `rationale`: character
spans of `text_a`): `eraser`, a folder in the ERASER format (`data/eraser.py`), and `synthetic`, the
needle task generated from its config alone, no file read (`data/synthetic.py`).

`load_splits` then makes the job's splits:

1. `dev_from_train` tasks (Hyperpartisan, which has one labelled file) are first cut into train
   and dev, stratified, with the task's own fixed seed, so every job and method sees the same split.
   A task whose data has no dev split at all gets the same cut with `DEV_CUT`.
2. `calib` is held out of train (never dev): a stratified sample drawn with the job seed, before
   train is capped, so it does not depend on `max_train`. With `calib_whole_inputs` (SST-2) it is
   drawn from the train texts that no other train text contains (the whole sentences), and every
   phrase of a calib sentence leaves train.
3. train is capped to `budget.max_train`, each dev set to `budget.max_dev` (seeded samples).

Sampled rows keep their file order.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, NoReturn

import datasets
import numpy as np
from omegaconf import DictConfig

from tokenprune import hub as hf_hub
from tokenprune.data import synthetic
from tokenprune.data.eraser import read_eraser_split
from tokenprune.errors import SkipJob, UserError

log = logging.getLogger(__name__)

# Salts that give each sampling step its own random stream for the same job seed.
_CALIB, _TRAIN, _DEV = 1, 2, 3
FORMATS = ("tsv", "csv", "jsonl", "hf", "eraser", "synthetic")
# The fields every task declares; the others have defaults (header: true, the rest null or false).
REQUIRED_FIELDS = ("name", "dir", "format", "files", "columns", "labels", "metric", "max_length")
# ERASER folders name their own columns; a synthetic task has no files at all (its `synthetic` block)
FORMAT_FIELDS = {"eraser": ("name", "dir", "format", "files", "labels", "metric", "max_length"),
                 "synthetic": ("name", "format", "synthetic", "labels", "metric", "max_length")}
DEV_CUT = {"fraction": 0.1, "seed": 0}  # dev cut out of train when the data has no dev split


def is_regression(task: DictConfig) -> bool:
    return task.labels is None


def num_labels(task: DictConfig) -> int:
    return 1 if is_regression(task) else len(task.labels)


def data_root(data: DictConfig) -> Path:
    """`data.root` as an absolute path (a relative root is taken from the current directory)."""
    return Path(os.path.expanduser(str(data.root))).resolve()


def load_splits(
    task: DictConfig, data: DictConfig, budget: DictConfig, seed: int
) -> dict[str, datasets.Dataset]:
    """train, calib, dev (+ extra dev sets such as MNLI's `dev_mismatched`) for one job.

    Raises `SkipJob` when the task's train split is not available locally (MNLI, QNLI, QQP here),
    `UserError` for a missing data root or dev file, a malformed file, or a budget that leaves no
    training data.
    """
    if task.get("suite") is not None:
        raise UserError(
            f"task={task.name} is a suite of tasks; run it as a sweep with -m, "
            "or pick one of its tasks."
        )
    check_task(task)
    if task.format == "synthetic":  # generated from the config: data.source and data.root play no part
        raw = synthetic.generate_splits(task)
    elif data.source == "hub" and task.format != "eraser":  # ERASER: always a local folder
        raw = {split: _read_hub_split(task, split) for split in _hub_splits(task)}
    elif data.source == "local" or task.format == "eraser":
        raw = {split: read_split(task, data, split) for split in task.files}
    else:
        raise UserError(f"data.source must be 'local' or 'hub', not {data.source!r}.")

    cut = task.get("dev_from_train")
    if cut is None and "dev" not in raw:
        cut = DEV_CUT
        log.info(f"task {task.name} has no dev split: dev is {cut['fraction']:.0%} of train, cut with seed "
                 f"{cut['seed']} (task.dev_from_train sets another cut)")
    if cut is not None:
        # The split seed is the task's, not the job's: every job must see the same train/dev.
        full = raw.pop("train")
        dev_rows = _sample(full, round(cut["fraction"] * len(full)), cut["seed"], 0, stratify=True)
        raw["dev"] = full.select(dev_rows)
        raw["train"] = full.select(_complement(len(full), dev_rows))

    train = raw.pop("train")
    n_calib = budget.max_calib
    if n_calib is None:
        n_calib = min(1000, len(train) // 10)
    if n_calib >= len(train):
        raise UserError(
            f"budget.max_calib={n_calib} leaves no training examples for task {task.name} "
            f"({len(train)} train rows); lower it."
        )
    if task.get("calib_whole_inputs"):
        # SST-2's train holds every phrase of its sentences, dev whole sentences: a calib of phrases
        # is far shorter than dev, and knobs calibrated on it overshoot their target on dev.
        whole = _whole_inputs(train["text_a"])
        calib_rows = whole[_sample(train.select(whole), n_calib, seed, _CALIB, stratify=True)]
        leaving = _parts_of(train["text_a"], train.select(calib_rows)["text_a"])
    else:
        calib_rows = _sample(train, n_calib, seed, _CALIB, stratify=True)
        leaving = calib_rows
    splits = {"calib": train.select(calib_rows)}
    train = train.select(_complement(len(train), leaving))
    splits["train"] = _cap(train, budget.max_train, seed, _TRAIN)
    for i, name in enumerate(sorted(raw)):
        splits[name] = _cap(raw[name], budget.max_dev, seed, _DEV + i)
    order = ["train", "calib", "dev"]
    return {k: splits[k] for k in order + sorted(set(splits) - set(order))}


def split_file(task: DictConfig, data: DictConfig, split: str) -> Path:
    """The local file (or, for format hf, folder) a split is read from: under the data root, or under
    `task.dir` when that is an absolute path (the data root is then unused)."""
    return data_root(data) / Path(os.path.expanduser(str(task.dir))) / task.files[split]


def check_task(task: DictConfig) -> None:
    """A task config (ours, or a user's own) has what loading needs; else one sentence says what to add."""
    missing = [k for k in FORMAT_FIELDS.get(task.get("format"), REQUIRED_FIELDS) if k not in task]
    if missing:
        raise UserError(
            f"task {task.get('name', '?')} has no {', '.join(missing)}: add {'them' if len(missing) > 1 else 'it'} to its "
            "YAML file (every field is described in the README's \"Your own task\" and in conf/task/sst2.yaml)."
        )
    if task.format not in FORMATS:
        raise UserError(f"task.format of task {task.name} must be one of {', '.join(FORMATS)}, not {task.format!r}.")
    if task.format == "synthetic":
        synthetic.check_spec(task)
        return
    if "train" not in task.files:
        raise UserError(f"task.files of task {task.name} has no train file: give files: {{train: <file>, dev: <file>}}.")
    for key in ("text_a", "label") if task.format != "eraser" else ():
        if task.columns.get(key) is None:
            raise UserError(f"task.columns of task {task.name} has no {key}: say which column holds it.")


def read_split(task: DictConfig, data: DictConfig, split: str) -> datasets.Dataset:
    """One split of a task from local files, uncapped (e.g. MNLI's dev sets, whose train is absent).
    `task.dir` is a folder under the data root, or an absolute path (then the data root is unused)."""
    own_folder = Path(os.path.expanduser(str(task.dir)))
    root = data_root(data)
    if not own_folder.is_absolute() and not root.is_dir():
        raise UserError(
            f"The data root {root} does not exist: set data.root (or the TOKENPRUNE_DATA "
            "environment variable) to the folder with the task data, or use data.source=hub."
        )
    path = split_file(task, data, split)
    if task.format == "eraser":  # a user's folder: its own sentence when it is not there
        return read_eraser_split(task, root / own_folder, split)
    if not path.exists():
        if split == "train" and task.get("missing_train"):
            raise SkipJob(task.missing_train.format(path=path))
        if own_folder.is_absolute():
            raise UserError(f"{path} is missing: check task.dir and task.files of task {task.name}.")
        raise UserError(
            f"{path} is missing: set data.root (or the TOKENPRUNE_DATA environment variable) to "
            f"a folder with {task.dir}/{task.files[split]}, or use data.source=hub."
        )
    if task.format == "hf":
        return _to_dataset(task, _read_saved(path, task))
    if not path.is_file():
        raise UserError(f"{path} is a folder, not a {task.format} file: point task.files at the file, or set "
                        "format: hf if it is a folder written by datasets' save_to_disk.")
    readers = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl}
    try:
        return _to_dataset(task, readers[task.format](path, task))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} cannot be read as UTF-8): save it as UTF-8, "
                        f"or gzip it as {path.name}.gz if it is a compressed file.") from None
    except csv.Error as e:
        raise UserError(f"{path} cannot be read as CSV ({e}): save it as plain comma-separated text, "
                        "with quotes around fields that hold commas or line breaks.") from None


# --- local formats -------------------------------------------------------------------------


def _open_text(path: Path):
    # utf-8-sig drops MRPC's BOM; newline="\n" so a stray \r never splits a row.
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8-sig", newline="\n")


def _read_tsv(path: Path, task: DictConfig) -> Iterator[tuple[str, dict[str, str]]]:
    """(location, {text_a, text_b, label}) per data row. Quoting is off: GLUE text holds stray `"`."""
    with _open_text(path) as f:
        lines = ((n, line.rstrip("\n").removesuffix("\r")) for n, line in enumerate(f, start=1))
        yield from _by_column(path, task, ((n, line.split("\t")) for n, line in lines if line), "tab-separated")


def _read_csv(path: Path, task: DictConfig) -> Iterator[tuple[str, dict[str, str]]]:
    """As `_read_tsv`, for comma-separated text with quoted fields (which may hold commas and line
    breaks); a row's location is the line it ends on."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        yield from _by_column(path, task, ((reader.line_num, row) for row in reader if row), "comma-separated")


def _by_column(path: Path, task: DictConfig, rows: Iterable[tuple[int, list[str]]], kind: str
               ) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of fields picked by the task's columns: header names with a header line, else indexes."""
    n_fields = None
    index: dict[str, int] = {}
    for lineno, fields in rows:
        where = f"{path} line {lineno}"
        if n_fields is None:
            n_fields = len(fields)
            other, separator = {"tab-separated": ("csv", ","), "comma-separated": ("tsv", "\t")}[kind]
            hint = (f"; the line is one field: if the file is {other.upper()}, set format: {other}"
                    if n_fields == 1 and separator in fields[0] else "")
            if task.get("header", True):
                index = {k: fields.index(_pick(spec, fields, where, hint)) for k, spec in _columns(task)}
                continue
            index = {k: int(spec) for k, spec in _columns(task)}
            if max(index.values()) >= n_fields:
                _malformed(where, f"only {n_fields} fields, the task reads field {max(index.values())}{hint}")
        if len(fields) != n_fields:
            _malformed(where, f"expected {n_fields} {kind} fields, found {len(fields)}")
        yield where, {k: fields[i] for k, i in index.items()}


def _read_jsonl(path: Path, task: DictConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            where = f"{path} line {lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _malformed(where, f"invalid JSON ({e.msg})")
            if not isinstance(obj, dict):
                _malformed(where, "not a JSON object")
            yield where, {k: obj[_pick(spec, obj, where)] for k, spec in _columns(task)}


def _columns(task: DictConfig) -> list[tuple[str, Any]]:
    return [(k, spec) for k, spec in task.columns.items() if spec is not None]


def _pick(spec: Any, present: Iterable[str], where: str, hint: str = "") -> str:
    """The column a spec names; a list of names means the first one present (e.g. MNLI's label)."""
    names = [spec] if isinstance(spec, str) else list(spec)
    present = list(present)
    for name in names:
        if name in present:
            return name
    _malformed(where, f"no column {' or '.join(map(repr, names))} (the columns are {', '.join(map(repr, present))}){hint}")


def _read_saved(path: Path, task: DictConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a dataset folder written by `save_to_disk` (one split)."""
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{path} is not a folder written by datasets' save_to_disk ({e}): save the split with "
                        "Dataset.save_to_disk, or give the data as csv, tsv or jsonl.") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(f"{task.files.get('train')}/{name}" for name in ds)
        raise UserError(f"{path} holds the splits {', '.join(ds)}: point each of task.files at one of them ({splits}).")
    yield from _dataset_rows(task, ds, {k: _pick(spec, ds.column_names, str(path)) for k, spec in _columns(task)},
                             f"{path} row")


def _dataset_rows(task: DictConfig, ds: datasets.Dataset, columns: dict[str, str], where: str
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a `datasets.Dataset`; `columns`: our field -> its column. Class ids are taken in the
    order of `task.labels`."""
    table = {k: ds[c] for k, c in columns.items()}
    for i in range(len(ds)):
        yield f"{where} {i}", {k: _class_name(task, k, table[k][i]) for k in columns}


def _to_dataset(task: DictConfig, rows: Iterable[tuple[str, dict[str, Any]]]) -> datasets.Dataset:
    """Check and convert raw rows, given as (location for errors, raw fields). Unknown labels never map."""
    regression = is_regression(task)
    label_ids = None if regression else {str(v): i for i, v in enumerate(task.labels)}
    text_a, text_b, labels = [], [], []
    for where, row in rows:
        for key in ("text_a", "text_b"):
            if key in row and not isinstance(row[key], str):
                _malformed(where, f"{key} is not a string")
        raw = row["label"]
        if regression:
            try:
                value = math.nan if isinstance(raw, bool) else float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                _malformed(where, f"label {raw!r} is not a finite number")
            labels.append(value)
        else:
            if str(raw) not in label_ids:
                _malformed(where, f"label {raw!r} is not one of {list(label_ids)}")
            labels.append(label_ids[str(raw)])
        text_a.append(row["text_a"])
        text_b.append(row.get("text_b", ""))
    label_feature = (
        datasets.Value("float64") if regression else datasets.ClassLabel(names=list(label_ids))
    )
    features = datasets.Features(
        text_a=datasets.Value("string"),
        text_b=datasets.Value("string"),
        label=label_feature,
        idx=datasets.Value("int64"),
    )
    return datasets.Dataset.from_dict(
        {"text_a": text_a, "text_b": text_b, "label": labels, "idx": list(range(len(labels)))},
        features=features,
    )


def _malformed(where: str, reason: str) -> NoReturn:
    raise UserError(f"{where}: {reason}; fix or replace the file.")


# --- hub -------------------------------------------------------------------------------------


def _hub_splits(task: DictConfig) -> list[str]:
    return [s for s, name in task.hub.splits.items() if name is not None]


def _check_hub_reachable() -> None:
    reason = hf_hub.unreachable()
    if reason is not None:
        raise UserError(
            f"data.source=hub cannot reach {reason}: connect to the network, set "
            "HF_HUB_OFFLINE=1 to use a cached copy, or use data.source=local with data.root "
            "(or TOKENPRUNE_DATA) pointing at the task files."
        )


def _read_hub_split(task: DictConfig, split: str) -> datasets.Dataset:
    hub = task.hub
    if not hf_hub.offline():
        _check_hub_reachable()
    try:
        ds = datasets.load_dataset(hub.path, hub.name, split=hub.splits[split])
    except Exception as e:  # the hub raises many kinds; all mean "could not get it"
        raise UserError(
            f"Loading {hub.path} ({hub.name}, split {hub.splits[split]}) from the HF hub failed "
            f"({type(e).__name__}: {e}); check the network or the HF cache, or use "
            "data.source=local with data.root (or TOKENPRUNE_DATA)."
        ) from e
    cols = {k: c for k, c in hub.columns.items() if c is not None}
    return _to_dataset(task, _dataset_rows(task, ds, cols, f"{hub.path} ({hub.name}) split {hub.splits[split]} row"))


def _class_name(task: DictConfig, key: str, value: Any) -> Any:
    """Labels in a `datasets.Dataset` may be class ids (ClassLabel, or a bool) in the order of `task.labels`."""
    if key != "label" or is_regression(task) or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, np.integer)) and 0 <= int(value) < len(task.labels):
        return str(task.labels[int(value)])
    return value  # out of range: left for _to_dataset to reject


# --- sampling --------------------------------------------------------------------------------


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt])


def _sample(ds: datasets.Dataset, k: int, seed: int, salt: int, stratify: bool) -> np.ndarray:
    """k row positions, sorted. Stratified: each class gets its share (largest remainder)."""
    n = len(ds)
    k = max(0, min(int(k), n))
    rng = _rng(seed, salt)
    if not stratify or not isinstance(ds.features["label"], datasets.ClassLabel):
        return np.sort(rng.choice(n, size=k, replace=False))
    labels = np.asarray(ds["label"])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * k / n
    take = np.floor(quota).astype(int)
    for c in np.argsort(-(quota - take), kind="stable")[: k - take.sum()]:
        take[c] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=int)


def _whole_inputs(texts: list[str]) -> np.ndarray:
    """Positions of the texts that no other text contains (for SST-2: its whole sentences).

    Candidates containing a text share its rarest word pair, so each text is compared only with the
    texts in that pair's posting list (a one-word text: its word's)."""
    words = [t.split() for t in texts]
    keys = [list(zip(w, w[1:])) or [(x,) for x in w] for w in words]
    postings: dict[tuple, list[int]] = {}
    for i, w in enumerate(words):
        for key in {*zip(w, w[1:]), *((x,) for x in w)}:
            postings.setdefault(key, []).append(i)
    stripped = [f" {t.strip()} " for t in texts]  # spaces: a match ends at word boundaries
    whole = []
    for i, k in enumerate(keys):
        rarest = min(k, key=lambda key: len(postings[key]), default=None)
        others = [] if rarest is None else postings[rarest]
        if not any(j != i and len(stripped[j]) > len(stripped[i]) and stripped[i] in stripped[j] for j in others):
            whole.append(i)
    return np.asarray(whole, dtype=int)


def _parts_of(texts: list[str], wholes: list[str]) -> np.ndarray:
    """Positions of the texts contained in one of `wholes` (the calib sentences and their phrases)."""
    joined = "\n".join(f" {w.strip()} " for w in wholes)
    return np.asarray([i for i, t in enumerate(texts) if t.strip() and f" {t.strip()} " in joined], dtype=int)


def _complement(n: int, rows: np.ndarray) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[rows] = False
    return np.flatnonzero(keep)


def _cap(ds: datasets.Dataset, k: int | None, seed: int, salt: int) -> datasets.Dataset:
    if k is None or k >= len(ds):
        return ds
    return ds.select(_sample(ds, k, seed, salt, stratify=False))
