"""The cache under two concurrent writers and a killed writer."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tokenprune.cache import Cache, key_hash


def _slow_make(root: str, key: dict, counter: str) -> str:
    def make(tmp: Path) -> None:
        with open(counter, "a") as f:  # one line per build
            f.write("built\n")
        time.sleep(0.5)
        (tmp / "weights.bin").write_bytes(b"x" * 1000)

    return str(Cache(root).get_or_make("finetune", key, make))


def test_entry_is_built_once_and_reused(tmp_path):
    cache, calls = Cache(tmp_path), []
    key = {"model": "tiny", "seed": 1}
    make = lambda tmp: (calls.append(1), (tmp / "w").write_text("1"))
    first = cache.get_or_make("finetune", key, make)
    second = cache.get_or_make("finetune", key, make)
    assert first == second and len(calls) == 1
    assert (first / "w").read_text() == "1" and (first / "key.json").exists()
    assert cache.get_or_make("finetune", {"model": "tiny", "seed": 2}, make) != first
    assert len(calls) == 2


def test_entry_says_how_it_was_built(tmp_path):
    import json

    import torch

    entry = Cache(tmp_path).get_or_make("finetune", {"model": "tiny"}, lambda tmp: (tmp / "w").write_text("1"))
    built = json.loads((entry / "built.json").read_text())
    assert built["torch_threads"] == torch.get_num_threads() and built["build_seconds"] >= 0
    assert built["torch"] == torch.__version__ and built["built_at"]


def test_key_hash_is_order_independent():
    assert key_hash({"a": 1, "b": {"c": 2, "d": 3}}) == key_hash({"b": {"d": 3, "c": 2}, "a": 1})
    assert key_hash({"a": 1}) != key_hash({"a": 2})


def test_two_concurrent_writers_build_once(tmp_path):
    counter = tmp_path / "builds.txt"
    key = {"task": "sst2"}
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_slow_make, [(str(tmp_path / "c"), key, str(counter))] * 2)
    assert paths[0] == paths[1]
    assert counter.read_text().count("built") == 1
    assert (Path(paths[0]) / "weights.bin").stat().st_size == 1000


def test_killed_writer_leaves_no_entry_and_rerun_finishes(tmp_path):
    root = tmp_path / "c"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tokenprune.cache import Cache
        def make(tmp):
            (tmp / "half.bin").write_bytes(b"x")
            print("started", flush=True)
            time.sleep(60)
        Cache({str(root)!r}).get_or_make("finetune", {{"k": 1}}, make)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = Cache(root)
    assert not cache.has("finetune", {"k": 1})
    assert not cache.path("finetune", {"k": 1}).exists()
    path = cache.get_or_make("finetune", {"k": 1}, lambda tmp: (tmp / "done.bin").write_bytes(b"ok"))
    assert (path / "done.bin").exists() and not (path / "half.bin").exists()
    assert not list(path.parent.glob("*.tmp-*")), "stale temporary directories are swept up"
