"""One job end to end: the GLUE smoke sweep, the cache across sweeps, and user mistakes."""

import json
import socket

import pytest

from helpers import METHOD_FIELDS_SWEEP, job_config, run_py
from tokenprune import results
from tokenprune.resume import job_key
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


@pytest.mark.slow
def test_the_bert_job_of_a_sweep_over_method_fields_is_a_plain_bert_run(tmp_path):
    """bert has neither lambda nor phi: it runs once, as a plain `method=bert` run would, so such a
    run finds its record (same resolved config, same resume key) and, recomputed, the same metric."""
    out = run_py(tmp_path, "-m", *METHOD_FIELDS_SWEEP)
    assert out.returncode == 0, out.stderr[-3000:]
    df = results.load(tmp_path / "sweep")
    assert (df.status == "ok").all()
    fields = sorted((r.method, r.speedup_target, r.config["method"].get("lambda"), r.config["method"].get("phi"))
                    for r in df.itertuples())
    assert fields == [("adapler", 2.0, None, 5e-4), ("bert", 1.0, None, None),
                      ("powerbert", 2.0, 1e-4, None), ("powerbert", 2.0, 1e-3, None),
                      ("random", 2.0, 1e-4, None), ("random", 2.0, 1e-3, None)]

    swept = df[df.method == "bert"].iloc[0]
    plain = run_job(job_config(tmp_path, "method=bert", "task=sst2"), tmp_path / "plain")
    assert job_key(plain["config"]) == job_key(swept.config)
    assert plain["started_at"] == swept.started_at, "resumed from the sweep's record"
    again = run_job(job_config(tmp_path, "method=bert", "task=sst2", "resume=false"), tmp_path / "again")
    assert again["status"] == "ok" and again["started_at"] != swept.started_at
    assert again["metric"] == swept.metric and job_key(again["config"]) == job_key(swept.config)


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


def test_bert_and_topk_records_carry_sane_flops_and_timing(tmp_path):
    timing_on = ["measure.timing=true", "measure.n_latency=4", "measure.n_throughput=8", "measure.warmup=1", "measure.repeats=1"]
    bert = run_job(job_config(tmp_path, "task=wnli", *timing_on), tmp_path / "bert")
    topk = run_job(job_config(tmp_path, "task=wnli", "method=topk", "speedup=2", *timing_on), tmp_path / "topk")
    assert bert["status"] == topk["status"] == "ok"
    assert bert["flops_speedup"] == 1.0 and bert["flops_per_example"] == bert["baseline_flops_per_example"]
    assert bert["metric"] == bert["baseline_metric"]
    assert topk["baseline_flops_per_example"] >= topk["flops_per_example"]
    assert topk["flops_speedup"] == pytest.approx(2.0, rel=0.1)
    assert topk["baseline_flops_per_example"] == bert["baseline_flops_per_example"], "same backbone, same examples"
    for record in (bert, topk):
        for field in ("latency_ms_b1", "baseline_latency_ms_b1", "wallclock_speedup_b1", "throughput_speedup"):
            assert record[field] is not None and record[field] > 0
        # the speedup is total baseline time over total method time (the means' ratio), whatever the
        # load; the medians beside it can differ from it when the machine is busy
        t = record["timing"]
        assert record["wallclock_speedup_b1"] == pytest.approx(t["baseline_latency_ms_b1_mean"] / t["latency_ms_b1_mean"], rel=1e-6)
    layers = topk["tokens_per_layer"]["ffn"]
    assert layers[0] > layers[1] == layers[-1], "tokens drop after layer 1's attention and stay down"


def test_timing_off_leaves_timing_fields_null(tmp_path):
    record = run_job(job_config(tmp_path, "task=wnli"), tmp_path / "job")
    assert record["status"] == "ok"
    assert record["latency_ms_b1"] is None and record["wallclock_speedup_b1"] is None and record["timing"] is None


def test_per_example_outputs_are_kept_beside_the_record_and_follow_it_on_resume(tmp_path):
    from tokenprune.data import compute_metrics

    cfg = job_config(tmp_path, "task=mrpc", "method=topk", "speedup=2")
    record = run_job(cfg, tmp_path / "a")
    assert record["status"] == "ok" and record["examples"] == "examples.npz"
    examples = results.read_examples(tmp_path / "a" / "result.json")
    assert len(examples) == record["n_eval"] and examples["idx"].is_unique
    # the record's metrics are recomputed exactly from the kept outputs
    assert compute_metrics("f1_accuracy", examples["prediction"].to_numpy(), examples["label"].to_numpy()) == record["metrics"]
    baseline = compute_metrics("f1_accuracy", examples["baseline_prediction"].to_numpy(), examples["label"].to_numpy())
    assert baseline["f1"] == record["baseline_metric"]

    resumed = run_job(cfg, tmp_path / "b")  # the same job in a new directory: from the record index
    assert resumed["output_dir"] == str(tmp_path / "b")
    assert results.read_examples(tmp_path / "b").equals(examples)
