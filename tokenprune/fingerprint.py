"""What a result depends on besides its config: the content of the data files a job reads, the
tokenizer's files and a local model folder's weights.

The config names where these are, not what they hold: a data file edited in place, or a model folder
whose weights were swapped, has the same config. Their SHA-256 hashes therefore enter the fine-tuning
key (`finetune.backbone_key`, which every method phase extends) and the resume key (`resume`).

Hashing is paid once per file version: each hash is remembered in `<cache_dir>/file-hashes.json` by
path, size, modification and change time (the change time moves on every write and cannot be set
back), so a later job only stats the files. A file written in the last 2 s is hashed every time
(`cache.settled`). Hub ids (models, tokenizers, `data.source=hub`) are
identified by their names, which the config already holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from tokenprune.cache import Cache, file_sha256, settled
from tokenprune.data.load import split_file
from tokenprune.errors import UserError
from tokenprune.models import tokenizer_source, weights_source

log = logging.getLogger(__name__)

MEMO_NAME = "file-hashes.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

_memos: dict[Path, dict[str, dict]] = {}  # memo file -> {path: {stat, sha256}}, as this process knows it


def file_hash(path: str | os.PathLike, memo_file: Path) -> str:
    """SHA-256 of a file's content, remembered in `memo_file` by path, size, mtime and ctime."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): check that it exists and is readable.") from e
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = _memos.setdefault(memo_file, _read_memo(memo_file))
    entry = memo.get(str(path))
    if entry is not None and entry.get("stat") == stat:
        return entry["sha256"]
    try:
        sha = file_sha256(path)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): check that it is readable.") from e
    if settled(st):
        memo[str(path)] = {"stat": stat, "sha256": sha}
        _write_memo(memo_file, {str(path): memo[str(path)]})
    return sha


def _read_memo(memo_file: Path) -> dict:
    try:
        memo = json.loads(memo_file.read_text())
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: it only costs hashing again
        return {}


def _write_memo(memo_file: Path, new: dict) -> None:
    """Add `new` to the memo on disk (merged with what other jobs wrote meanwhile), atomically."""
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_memo(memo_file), **new}
        fd, tmp = tempfile.mkstemp(dir=memo_file.parent, prefix=".file-hashes.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, memo_file)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:  # an unwritable cache: the hash is still right, only not remembered
        log.debug(f"could not remember file hashes in {memo_file}: {e}")


def _folder_hashes(folder: str | None, memo_file: Path, weights: bool) -> dict[str, str] | None:
    """{file name: hash} of a local model folder's weight files and config.json (`weights`), or of its
    other top-level files (the tokenizer's); None for a hub id or no folder."""
    if folder is None or not os.path.isdir(folder):
        return None
    hashes = {}
    for path in sorted(Path(folder).iterdir()):
        is_weights = path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")
        wanted = (is_weights or path.name == "config.json") if weights else not is_weights
        if wanted and path.is_file():
            hashes[path.name] = file_hash(path, memo_file)
    return hashes


def job_inputs(cfg: DictConfig, splits: tuple[str, ...] | None = None) -> dict:
    """The content behind a job's config: {data: {split: hash}, tokenizer: {file: hash}, weights:
    {file: hash}} (None where it comes from the hub, or for a random init). `splits`: only these
    splits' data files (None: every file the task reads); an ERASER folder's docs/ adds one hash over
    its files' hashes; a synthetic task has data None (its config holds everything). A missing data file hashes to None: loading
    it says what to do."""
    memo_file = Cache(cfg.cache_dir).root / MEMO_NAME
    data = None
    fmt = cfg.task.get("format")
    # a synthetic task's config holds everything it is made from; an ERASER folder is always local
    if (cfg.data.source == "local" or fmt == "eraser") and not cfg.task.get("suite") and fmt != "synthetic":
        data = {}
        for split in splits or list(cfg.task.files):
            path = split_file(cfg.task, cfg.data, split)
            if path.is_dir():  # a datasets folder (format hf): every file in it
                data[split] = {str(f.relative_to(path)): file_hash(f, memo_file)
                               for f in sorted(path.rglob("*")) if f.is_file()}
            else:
                data[split] = file_hash(path, memo_file) if path.is_file() else None
        docs = split_file(cfg.task, cfg.data, "train").parent / "docs"
        if fmt == "eraser" and docs.is_dir():  # its documents: one hash over each file's hash
            digest = hashlib.sha256()
            for f in sorted(docs.iterdir()):
                if f.is_file():
                    digest.update(f"{f.name}\t{file_hash(f, memo_file)}\n".encode())
            data["docs"] = digest.hexdigest()
    return {
        "data": data,
        "tokenizer": _folder_hashes(tokenizer_source(cfg.model), memo_file, weights=False),
        "weights": _folder_hashes(weights_source(cfg.model), memo_file, weights=True),
    }
