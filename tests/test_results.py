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
