"""Content-addressed artifacts: fine-tuned backbones, method phases, teacher logits, saliencies.

An entry is a directory named by a hash of everything that determines it (its key). It is built in a
temporary directory beside its final place and renamed into place only when complete, under a file
lock, so two jobs asking for the same entry build it once, and a job killed mid-build leaves no entry
(only a stale temporary directory, swept up by the next build of that key).

Each entry also keeps `built.json`: how it was built (torch threads, code commit, when, how long).
The key says what an entry is; this says what a bit-exact re-run needs: on a CPU, training at another
torch thread count sums floats in another order and ends on other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from tokenprune.provenance import build_info

log = logging.getLogger(__name__)

# Bump when a change to training code makes old entries wrong; it is part of every key.
CODE_VERSION = 2  # 2: one file layout for every model phase (info.json beside the weights)


def key_hash(key: dict) -> str:
    blob = json.dumps({"code_version": CODE_VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Cache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def path(self, kind: str, key: dict) -> Path:
        return self.root / kind / key_hash(key)

    def has(self, kind: str, key: dict) -> bool:
        return (self.path(kind, key) / "key.json").exists()

    def get_or_make(self, kind: str, key: dict, make: Callable[[Path], None]) -> Path:
        """The entry's directory; `make(tmp_dir)` fills a fresh directory when there is none yet."""
        final = self.path(kind, key)
        if (final / "key.json").exists():
            log.info(f"cache hit: {kind} {final.name}")
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if (final / "key.json").exists():  # another job built it while we waited
                log.info(f"cache hit after wait: {kind} {final.name}")
                return final
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
                # key.json last: its presence marks the entry complete.
                (tmp / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True, default=str))
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final
