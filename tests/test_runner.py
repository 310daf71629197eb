"""One job end to end: the GLUE smoke sweep, the cache across sweeps, and user mistakes."""

import json
import socket

import pytest

from helpers import job_config, run_py
from tokenprune import results
from tokenprune.runner import run_job


@pytest.mark.slow
def test_glue_smoke_sweep_then_again_finetunes_each_task_once(tmp_path):
    first = run_py(tmp_path, "-m", "method=bert", "task=glue")
    assert first.returncode == 0, first.stderr[-3000:]
    df = results.load(tmp_path / "sweep")
    assert sorted(df.status.value_counts().items()) == [("ok", 6), ("skipped", 3)]
    assert set(df[df.status == "skipped"].task) == {"mnli", "qnli", "qqp"}
    assert all("data.source=hub" in e for e in df[df.status == "skipped"].error)
    ok = df[df.status == "ok"]
    assert (ok.flops_speedup == 1.0).all() and (ok.metric == ok.baseline_metric).all()
    assert (first.stdout + first.stderr).count("building finetune") == 6

    again = run_py(tmp_path, "-m", "method=bert", "task=glue", "resume=false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "building finetune" not in again.stdout + again.stderr
    assert (again.stdout + again.stderr).count("cache hit: finetune") == 6


def test_single_run_of_a_suite_asks_for_multirun(tmp_path):
    out = run_py(tmp_path, "task=glue")
    assert out.returncode == 1
    assert "add -m" in out.stderr and "Traceback" not in out.stderr


def test_unknown_option_lists_the_choices(tmp_path):
    out = run_py(tmp_path, "task=sst3")
    assert out.returncode != 0
    assert "Could not find 'task/sst3'" in out.stderr and "sst2" in out.stderr


def test_missing_data_fails_in_one_sentence_and_builds_nothing(tmp_path):
    record = run_job(job_config(tmp_path, f"data.root={tmp_path / 'nowhere'}"), tmp_path / "job")
    assert record["status"] == "failed" and record["traceback"] is None
    for name in ("data.root", "TOKENPRUNE_DATA", "data.source=hub"):
        assert name in record["error"]
    assert json.loads((tmp_path / "job" / "result.json").read_text())["status"] == "failed"
    assert not (tmp_path / "cache" / "finetune").exists()


def test_hub_model_without_network_fails_within_seconds(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    record = run_job(job_config(tmp_path, "model=bert_base"), tmp_path / "job")
    assert record["status"] == "failed" and "cannot be reached" in record["error"]
    assert record["duration_s"] < 30
