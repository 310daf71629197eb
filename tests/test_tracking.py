"""W&B, offline, read back with W&B's own reader of a run file (`wandb leet inspect --json`): every
training phase keeps its curve, a sweep's runs share a group no other sweep has, and the record
knows its run."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_py
from tokenprune import results, tracking


def run_files(wandb_dir: Path) -> list[Path]:
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))


def wandb_records(run_file: Path) -> list[dict]:
    """The records of an offline run file, as W&B itself reads them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_file), "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_of(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r["type"] == "run")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Sweep A: the full model and PoWER-BERT at 2x on WNLI; sweep B: the full model at seed 2, run
    twice (the second time it is resumed). Offline W&B runs under one folder."""
    tmp = tmp_path_factory.mktemp("wandb")
    common = ["logger=wandb", "logger.mode=offline", f"logger.dir={tmp}", "task=wnli"]
    env = {"WANDB_MODE": "offline", **{f"WANDB_{d}_DIR": str(tmp / d.lower()) for d in ("DATA", "CACHE", "CONFIG")}}
    a = run_py(tmp / "a", "-m", *common, "method=bert,powerbert", "speedup=2", env=env)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_py(tmp / "b", "-m", *common, "method=bert", "seed=2", env=env)
    assert b.returncode == 0, b.stderr[-3000:]
    runs_before_resume = run_files(tmp)
    again = run_py(tmp / "b", "-m", *common, "method=bert", "seed=2", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = {f: wandb_records(f) for f in run_files(tmp)}
    return {"tmp": tmp, "runs": runs, "runs_before_resume": runs_before_resume, "again": again}


def phase_curves(records: list[dict]) -> dict[str, list[int]]:
    """Per phase, the phase steps of its loss rows, after checking that W&B's own step never goes back."""
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    steps = [row["_step"] for row in history]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    curves = collections.defaultdict(list)
    for row in history:
        for key in row:
            if key.endswith("/loss"):
                phase = key.removesuffix("/loss")
                curves[phase].append(row[f"{phase}/step"])
    charted = {r["metric"].get("name"): r["metric"].get("step_metric") for r in records if r["type"] == "metric"}
    for phase in curves:
        assert charted[f"{phase}/loss"] == f"{phase}/step", "each phase is charted against its own step"
    return curves


@pytest.mark.slow
def test_every_phase_of_a_powerbert_run_keeps_its_curve(sweeps):
    """The full model's job fine-tunes (cached for PoWER-BERT's job, which searches, re-trains, then
    trains its equal-training control):
    every phase keeps every one of its steps, 1, 2, ... though each starts again at 1."""
    curves = {run_of(r)["job_type"]: phase_curves(r) for r in sweeps["runs"].values() if run_of(r)["run_group"]}
    assert set(curves["bert"]) == {"finetune"}
    # and its equal-training control: the full model trained as many more steps
    # (each further λ its walk to the target searches keeps a curve of its own)
    walked = {p for p in curves["powerbert"] if p.startswith("powerbert-search-lambda")}
    assert set(curves["powerbert"]) - walked == {"powerbert-search", "powerbert-retrain", "control"}
    for phases in curves.values():
        for phase, steps in phases.items():
            assert len(steps) > 1 and steps == list(range(1, len(steps) + 1)), (phase, steps)


@pytest.mark.slow
def test_a_sweeps_runs_share_a_group_no_other_sweep_has(sweeps):
    tmp, runs = sweeps["tmp"], sweeps["runs"]
    assert len(runs) == 3, "the resumed job started no run"
    by_sweep = collections.defaultdict(list)
    for records in runs.values():
        run = run_of(records)
        by_sweep[run["run_group"]].append(run)
    assert sorted(len(v) for v in by_sweep.values()) == [1, 2] and "" not in by_sweep
    names = [run["display_name"] for rs in by_sweep.values() for run in rs]
    assert len(set(names)) == len(names)
    for sweep in ("a", "b"):
        for record in results.load(tmp / sweep / "sweep").to_dict("records"):
            wandb_run = record["wandb_run"]
            [run] = [run_of(r) for r in runs.values() if run_of(r)["run_id"] == wandb_run["id"]]
            assert run["job_type"] == record["method"] and run["run_group"] == wandb_run["group"]
            assert Path(wandb_run["dir"]).is_dir()
            [records] = [r for r in runs.values() if run_of(r)["run_id"] == wandb_run["id"]]
            assert any(r["type"] == "artifact" and r["artifact"]["type"] == "result" for r in records), "record attached"
            tables = [r["history"]["item"] for r in records if r["type"] == "history" and "result._type" in r["history"]["item"]]
            assert [(t["result._type"], t["result.nrows"], t["result.ncols"]) for t in tables] == [
                ("table-file", 1, len(tracking.SUMMARY_FIELDS))], "the one-row result table"


@pytest.mark.slow
def test_a_resumed_job_says_it_reused_the_record_and_its_run(sweeps):
    output = sweeps["again"].stdout + sweeps["again"].stderr
    [record] = results.load(sweeps["tmp"] / "b" / "sweep").to_dict("records")
    assert f"Result (reused: computed {record['started_at']}, not recomputed)" in output
    assert f"W&B run {record['wandb_run']['id']} of that job" in output
    assert run_files(sweeps["tmp"]) == sweeps["runs_before_resume"]
