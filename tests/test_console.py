"""What a person sees: a job's last line, a sweep's closing table, a failed sweep's reasons, log files
without progress bars, the resolved config at a job's start."""

from __future__ import annotations

import pytest

from helpers import run_py
from tokenprune import results
from tokenprune.console import compact_config


def last_lines(text: str, n: int) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-n:]


@pytest.mark.slow
def test_a_job_ends_with_its_result_and_a_rerun_says_it_reused_it(tmp_path):
    first = run_py(tmp_path, "task=wnli")
    assert first.returncode == 0, first.stderr[-3000:]
    record = results.read(tmp_path / "run" / "result.json")
    [line] = last_lines(first.stdout, 1)
    assert line.endswith(results.summary_line(record, tmp_path / "run" / "result.json"))
    assert "Result: wnli · bert · target 1× · FLOPs 1.00× · wall clock not timed · accuracy" in line

    log = (tmp_path / "run" / "run.log").read_text()
    assert "\r" not in log and "it/s" not in first.stderr, "no progress bars off a terminal"
    assert "finetune epoch 1/1: eval score" in log, "the milestones are logged"
    assert "finetune epoch 1/1: step 2/8, loss" in log, "and a line at each quarter of an epoch"
    assert "Config (resolved; in full in" in log and "task: {name: wnli, dir: WNLI" in log

    again = run_py(tmp_path, "task=wnli")
    assert again.returncode == 0
    [line] = last_lines(again.stdout, 1)
    assert "Result (reused: computed" in line and "· no W&B run" in line


@pytest.mark.slow
def test_a_sweep_ends_with_the_table_of_its_jobs(tmp_path):
    out = run_py(tmp_path, "-m", "task=wnli,mnli", "method=bert,topk", "speedup=2")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "sweep"
    lines = last_lines(out.stdout, 8)
    assert lines[0] == f"Sweep {sweep}:" and lines[1] == "All jobs: model tiny, budget smoke, seed 1"
    assert lines[2].split()[:4] == ["task", "method", "target", "status"]
    assert lines[3].split()[:4] == ["wnli", "bert", "1×", "ok"] and lines[4].split()[:4] == ["wnli", "topk", "2×", "ok"]
    for line in lines[5:7]:
        task, method, target, status, path, *reason = line.split()
        assert (task, status) == ("mnli", "skipped")
        assert " ".join(reason) == results.read(sweep / path)["error"], "a skipped job's row ends with its reason"
    assert lines[7] == f"4 jobs: 2 ok, 2 skipped. This table again: python -m tokenprune.results {sweep}"


def test_a_failed_sweep_ends_with_the_reasons(tmp_path):
    out = run_py(tmp_path, "-m", "task=wnli,rte", f"data.root={tmp_path / 'nowhere'}")
    assert out.returncode != 0
    tail = last_lines(out.stdout, 3)
    assert tail[-2] == f"2 jobs: 2 failed. This table again: python -m tokenprune.results {tmp_path / 'sweep'}"
    table = out.stdout[out.stdout.rindex(f"Sweep {tmp_path / 'sweep'}:"):]
    for task in ("wnli", "rte"):
        row = next(line for line in table.splitlines() if line.startswith(task))
        assert "failed" in row and row.endswith(f"The data root {tmp_path / 'nowhere'} does not exist: set data.root "
                                                 "(or the TOKENPRUNE_DATA environment variable) to the folder with the task "
                                                 "data, or use data.source=hub.")


def test_compact_config_is_a_line_per_group():
    text = compact_config({"speedup": 2.0, "seed": 1, "task": {"name": "sst2", "files": {"train": "train.tsv"}},
                           "method": {"name": "topk"}})
    assert text.splitlines() == ["speedup: 2.0, seed: 1", "task: {name: sst2, files: {train: train.tsv}}", "method: {name: topk}"]
