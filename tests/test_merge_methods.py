"""method=tome and method=pitome on the tiny model at a smoke target: training-free on the cached
fine-tuned backbone, the per-layer ratio calibrated on calib, the target met on dev within 10%."""

from __future__ import annotations

import pytest

from helpers import job_config
from tokenprune.runner import run_job


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("merge_methods")  # one cache: one fine-tuning


@pytest.mark.parametrize("name, extra", [("tome", []), ("pitome", []), ("pitome", ["method.layers=[1,2,3]"])],
                         ids=["tome", "pitome", "pitome_last_three"])
def test_merging_method_meets_a_smoke_target(root, tmp_path, name, extra):
    target = 1.5 if extra else 2.0  # merging only in the last three of 4 layers reaches less
    cfg = job_config(root, "task=sst2", f"method={name}", f"speedup={target}", *extra)
    record = run_job(cfg, tmp_path)
    assert record["status"] == "ok", record.get("error")
    assert record["flops_speedup"] == pytest.approx(target, rel=0.10)
    knob = record["method_info"]["knob"]
    assert 0 < knob["ratio"] <= 0.5
    assert knob["layers"] == ([1, 2, 3] if extra else [0, 1, 2, 3])
    assert record["method_info"]["phases"]["finetune"]["cached"] in (True, False)
    tokens = record["tokens_per_layer"]
    assert tokens["ffn"][-1] < tokens["attention"][0], "tokens were merged away"


def test_an_unreachable_target_is_one_sentence(root, tmp_path):
    cfg = job_config(root, "task=sst2", "method=tome", "speedup=50", "method.layers=[3]")
    record = run_job(cfg, tmp_path)
    assert record["status"] == "failed" and "cannot reach speedup=50" in record["error"]
