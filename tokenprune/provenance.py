"""Where a result comes from: the code (git commit), the packages, the machine, the torch thread
count, the time. Records and cache entries both carry it; nothing here depends on the rest of the suite.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

# What a re-run of the same job can be expected to repeat, by device kind (kept in every record).
DETERMINISM = {
    "cpu": "deterministic at a fixed torch thread count: the same config, seed and threads give the same metric "
           "and kept-token counts, provided the cache entries it reuses were built at that thread count too "
           "(their built.json says); at another thread count float sums run in another order and training "
           "ends on other weights",
    "gpu": "not bit-exact: cuBLAS and fused attention kernels reduce in varying order, so metrics can move "
           "in the last digits and a token scored next to a threshold can flip; timings always vary",
}


def git_commit(here: Path | None = None) -> str | None:
    """The commit of the code (of `here`, by default this package's checkout); with uncommitted changes,
    `<sha>-dirty-<hash of the diff>`; None outside a git checkout."""
    here = here or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        # uncommitted changes are named by a hash of their diff, so that records of two different
        # uncommitted states of one commit are never taken for each other (the record index keys on this)
        diff = subprocess.run(["git", "--no-optional-locks", "diff", "HEAD"], cwd=here, capture_output=True,
                              timeout=10).stdout
        if not diff.strip():
            return sha.stdout.strip()
        return f"{sha.stdout.strip()}-dirty-{hashlib.sha256(diff).hexdigest()[:12]}"
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import datasets, hydra, transformers
    import tokenprune

    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "datasets": datasets.__version__, "hydra": hydra.__version__, "tokenprune": tokenprune.__version__,
    }


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_info(seconds: float) -> dict:
    """How a cache entry was built: what a bit-exact re-run needs besides its key (on a CPU, training
    at another torch thread count sums floats in another order and ends on other weights)."""
    return {"torch_threads": torch.get_num_threads(), "git_commit": git_commit(), "torch": torch.__version__,
            "built_at": now(), "build_seconds": round(seconds, 1)}


def set_threads(threads: int | None, parallel_jobs: int | None = None) -> None:
    """torch threads for this job: `threads`, or cores / parallel jobs under a parallel launcher
    (`parallel_jobs`, -1 for one job per core), so that side-by-side jobs don't oversubscribe the cores."""
    if threads is None and parallel_jobs:
        cores = os.cpu_count() or 1
        threads = max(1, cores // (cores if parallel_jobs < 0 else parallel_jobs))
    if threads:
        torch.set_num_threads(int(threads))
