"""Content-addressed artifacts: fine-tuned backbones, method phases, teacher logits, saliencies.

An entry is a directory named by a hash of everything that determines it (its key). It is built in a
temporary directory beside its final place and renamed into place only when complete, under a file
lock, so two jobs asking for the same entry build it once, and a job killed mid-build leaves no entry
(only a stale temporary directory, swept up by the next build of that key).

Each entry also keeps `built.json`: how it was built (torch threads, code commit, when, how long).
The key says what an entry is; this says what a bit-exact re-run needs: on a CPU, training at another
torch thread count sums floats in another order and ends on other weights.

An entry checks itself: `manifest.json` lists the size and SHA-256 of every file written at build.
An entry that fails the check (a file missing, truncated or changed, an unreadable manifest or key,
or no manifest: built by code older than the manifest) is moved aside to `<entry>.damaged-<time>`,
named in the log, and rebuilt. Sizes are checked at every use, contents once per process and again
whenever a file's times move (and at every use while the entry is under 2 s old: file times tick too
coarsely to tell apart a write within the same tick). Hashing a fine-tuned MiniLM entry (91 MB) takes
about 0.1-0.2 s on this project's CPU, against seconds to load and use it, so every entry is hashed
whatever its size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from tokenprune.errors import UserError
from tokenprune.provenance import build_info

log = logging.getLogger(__name__)

# Bump when a change to training code makes old entries wrong; it is part of every key.
CODE_VERSION = 2  # 2: one file layout for every model phase (info.json beside the weights)

KEY_FILE, MANIFEST_FILE = "key.json", "manifest.json"

# What the machine can do to a write: no permission, a read-only disk, a file where a folder should be,
# a full disk or quota.
DISK_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.EDQUOT}


def key_hash(key: dict) -> str:
    blob = json.dumps({"code_version": CODE_VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def settled(st: os.stat_result) -> bool:
    """Whether a file's hash can be remembered by its size and times: file times tick coarsely (a few
    ms), so a write within the tick after hashing would leave them unchanged; a file last written
    more than 2 s ago is past that."""
    return time.time() - st.st_mtime > 2


def _as_json(key: dict) -> dict:
    """`key` as key.json holds it (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _disk_error(e: OSError, root: Path) -> UserError | None:
    """One sentence for what the machine did to a write under the cache folder `root`; None for any
    other OSError (one about another file is not the cache's)."""
    if e.errno not in DISK_ERRNOS or (e.filename and not str(e.filename).startswith(str(root))):
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"The disk of the cache folder {root} is full ({e.strerror}): free some space there "
                         f"or set cache_dir (or TOKENPRUNE_CACHE) to a folder on another disk.")
    return UserError(f"The cache folder {root} cannot be written ({e.strerror}): make it writable or set "
                     f"cache_dir (or TOKENPRUNE_CACHE) to a writable folder.")


# Entries whose contents this process has hashed, with their files' sizes and times: an entry is hashed
# once per process, and again when a file of it is written to (which moves its ctime).
_verified: set[tuple] = set()


class Cache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def path(self, kind: str, key: dict) -> Path:
        return self.root / kind / key_hash(key)

    def has(self, kind: str, key: dict) -> bool:
        return (self.path(kind, key) / KEY_FILE).exists()

    def get(self, kind: str, key: dict) -> Path | None:
        """The entry's directory if it exists and passes its check; None otherwise (a damaged entry is
        moved aside, so that the next `get_or_make` rebuilds it)."""
        final = self.path(kind, key)
        if not (final / KEY_FILE).exists():
            return None
        if self._damage(final, key) is None:
            return final
        try:
            with FileLock(str(final) + ".lock"):
                if (final / KEY_FILE).exists():
                    if (why := self._damage(final, key)) is None:  # rebuilt by another job while we waited
                        return final
                    self._move_aside(kind, final, why)
        except OSError as e:  # a read-only cache: the damaged entry stays where it is, unused
            log.warning(f"cache entry {kind} {final.name} is damaged and could not be moved aside ({e})")
        return None

    def get_or_make(self, kind: str, key: dict, make: Callable[[Path], None]) -> Path:
        """The entry's directory; `make(tmp_dir)` fills a fresh directory when there is none yet, or
        when the one there fails its check."""
        final = self.path(kind, key)
        if (final / KEY_FILE).exists() and self._damage(final, key) is None:
            log.info(f"cache hit: {kind} {final.name}")
            return final
        try:
            return self._build(kind, key, final, make)
        except OSError as e:
            raise _disk_error(e, self.root) or e

    def _build(self, kind: str, key: dict, final: Path, make: Callable[[Path], None]) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if (final / KEY_FILE).exists():
                if (why := self._damage(final, key)) is None:  # another job built it while we waited
                    log.info(f"cache hit after wait: {kind} {final.name}")
                    return final
                self._move_aside(kind, final, why)
            tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
            for stale in final.parent.glob(f"{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a directory without key.json is not an entry
                shutil.rmtree(final)
            tmp.mkdir()
            try:
                log.info(f"cache miss: building {kind} {final.name}")
                start = time.perf_counter()
                make(tmp)
                (tmp / "built.json").write_text(json.dumps(build_info(time.perf_counter() - start), indent=1))
                manifest = {name: {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                            for name in _files(tmp)}
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
                # key.json last: its presence marks the entry complete.
                (tmp / KEY_FILE).write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _damage(self, entry: Path, key: dict) -> str | None:
        """What is wrong with a complete entry (key.json present), or None when it passes its check."""
        try:
            if json.loads((entry / KEY_FILE).read_text()) != _as_json(key):
                return "its key.json does not hold its key"
            manifest = json.loads((entry / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            return "no manifest: built by code older than the manifest"
        except (OSError, ValueError) as e:
            return f"its key or manifest is unreadable ({e.__class__.__name__})"
        if not isinstance(manifest, dict) or not all(isinstance(v, dict) and {"size", "sha256"} <= v.keys()
                                                     for v in manifest.values()):
            return "its manifest is not a file list"
        stamp, all_settled = [str(entry)], True
        for name, expected in manifest.items():
            try:
                st = (entry / name).stat()
            except OSError:
                return f"{name} is missing"
            if st.st_size != expected["size"]:
                return f"{name} has {st.st_size} bytes instead of {expected['size']}"
            stamp.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            all_settled = all_settled and settled(st)
        if tuple(stamp) not in _verified:
            for name, expected in manifest.items():
                try:
                    if file_sha256(entry / name) != expected["sha256"]:
                        return f"the content of {name} changed since it was built"
                except OSError as e:
                    return f"{name} is unreadable ({e.strerror})"
            if all_settled:
                _verified.add(tuple(stamp))
        return None

    @staticmethod
    def _move_aside(kind: str, entry: Path, why: str) -> None:
        aside = entry.with_name(f"{entry.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = entry.with_name(f"{entry.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        os.replace(entry, aside)
        log.warning(f"cache entry {kind} {entry.name} is damaged ({why}): moved to {aside}; rebuilding it")


def _files(directory: Path) -> list[str]:
    """Every file under `directory`, as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
