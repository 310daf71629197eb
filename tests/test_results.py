"""Records: schema, atomic writes, loading many into a DataFrame, the table CLI."""

import json

import pytest

from tokenprune import results

REQUIRED = (
    "task method model seed speedup_target status error metric_name metric metrics baseline_metric "
    "flops_per_example baseline_flops_per_example flops_speedup latency_ms_b1 baseline_latency_ms_b1 "
    "wallclock_speedup_b1 throughput_speedup tokens_per_layer n_eval config git_commit versions hardware "
    "started_at duration_s"
).split()


def make(**kw):
    base = dict(task="sst2", method="bert", model="tiny", seed=1, speedup_target=1.0, status="ok", metric=80.0)
    return results.new_record(**{**base, **kw})


def test_record_has_every_required_field():
    record = make()
    assert set(REQUIRED) <= set(record)


def test_write_is_whole_and_rejects_bad_records(tmp_path):
    path = results.write(make(), tmp_path / "job")
    assert json.loads(path.read_text())["metric"] == 80.0
    assert not list((tmp_path / "job").glob(".result.*")), "no temporary file is left behind"
    with pytest.raises(ValueError, match="unknown record fields"):
        results.write({**make(), "typo_field": 1}, tmp_path / "bad")
    with pytest.raises(ValueError, match="status"):
        results.write(make(status="done"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "result.json").exists()


def test_load_gathers_records_and_skips_corrupted_ones(tmp_path, caplog):
    results.write(make(task="sst2"), tmp_path / "a" / "0")
    results.write(make(task="mrpc", status="skipped", metric=None), tmp_path / "a" / "1")
    results.write(make(task="rte", method="topk", speedup_target=2.0, metric=60.0), tmp_path / "b" / "0")
    (tmp_path / "a" / "2").mkdir()
    (tmp_path / "a" / "2" / "result.json").write_text('{"task": "cola", "stat')  # killed mid-write by hand
    df = results.load([tmp_path / "a", tmp_path / "b"])
    assert sorted(df.task) == ["mrpc", "rte", "sst2"]
    assert set(REQUIRED) <= set(df.columns)
    assert "unreadable record" in caplog.text and "a/2/result.json" in caplog.text


def test_load_of_a_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="output directories"):
        results.load(tmp_path / "nope")


def test_cli_prints_a_table(tmp_path, capsys):
    results.write(make(), tmp_path / "0")
    results.write(make(method="topk", speedup_target=2.0, metric=75.5), tmp_path / "1")
    assert results.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "75.50" in out and "2 ok" in out


def test_summary_line_says_what_a_job_found_and_where_its_record_is():
    record = make(method="topk", speedup_target=2.0, metric_name="accuracy", metric=80.5, baseline_metric=82.1,
                  metric_drop=1.6, flops_speedup=2.04, wallclock_speedup_b1=1.31, throughput_speedup=1.65,
                  timing={"batch_size": 32}, output_dir="out/job", wandb_run={"id": "abc123"})
    line = results.summary_line(record)
    assert line == ("Result: sst2 · topk · target 2× · FLOPs 2.04× · wall clock 1.31× at batch 1, 1.65× at batch 32 · "
                    "accuracy 80.50, full model 82.10 (drop 1.60) · record out/job/result.json · W&B run abc123")
    reused = results.summary_line({**record, "started_at": "2026-01-01T00:00:00+00:00"}, reused=True)
    assert reused.startswith("Result (reused: computed 2026-01-01T00:00:00+00:00, not recomputed): sst2 · topk")
    assert reused.endswith("W&B run abc123 of that job")
    untimed = results.summary_line({**record, "wallclock_speedup_b1": None, "wandb_run": None}, reused=True)
    assert "wall clock not timed" in untimed and untimed.endswith("no W&B run")
    skipped = make(task="mnli", status="skipped", error="MNLI train is not local: use data.source=hub.\nmore", output_dir="o")
    assert results.summary_line(skipped, path="o/result.json") == (
        "Skipped: mnli · bert · target 1× · MNLI train is not local: use data.source=hub. · record o/result.json")
    assert results.summary_line(make(status="failed", error="ValueError: x")).startswith("Failed: sst2 · bert · target 1× · ValueError: x")


def test_table_and_cli_show_every_record_with_reason_budget_and_path(tmp_path, capsys):
    results.write(make(metric_name="accuracy", baseline_metric=80.0, metric_drop=0.0, flops_speedup=1.0), tmp_path / "0")
    results.write(make(method="topk", speedup_target=2.0, metric=75.5, budget="quick"), tmp_path / "1")
    results.write(make(task="mnli", status="skipped", metric=None, budget="quick", error="MNLI train is not local."), tmp_path / "2")
    results.write(make(task="rte", status="failed", metric=None, budget="quick", error="RuntimeError: boom\ntraceback"), tmp_path / "3")
    assert results.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    shared, header, *rows = out.split("\n\n")[0].splitlines()
    assert shared == "All jobs: model tiny, seed 1"  # the same in every row: said once
    assert header.split() == ["task", "method", "budget", "target", "status", "metric", "full", "model", "drop", "FLOPs",
                              "wall", "b1", "batched", "record", "reason"]
    assert "75.50" in out and out.rstrip().endswith("4 jobs: 2 ok, 1 skipped, 1 failed")
    skipped = next(r for r in rows if r.startswith("mnli"))
    assert "quick" in skipped and "2/result.json" in skipped and skipped.endswith("MNLI train is not local.")
    assert next(r for r in rows if r.startswith("rte")).endswith("RuntimeError: boom")  # one line of the error

    assert results.main([str(tmp_path), "--status", "failed"]) == 0
    assert "rte" in capsys.readouterr().out
    with pytest.raises(SystemExit) as help_exit:
        results.main(["--help"])
    assert help_exit.value.code == 0 and "DIR" in capsys.readouterr().out
    assert results.main([str(tmp_path / "nope")]) == 2


def test_records_are_readable_by_the_group(tmp_path):
    import os

    old = os.umask(0o002)
    try:
        path = results.write(make(), tmp_path / "shared")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o664  # as the umask says, not mkstemp's private 0600
