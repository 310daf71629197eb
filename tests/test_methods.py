"""Every registered method honours the method interface: it fits, calibrates to a smoke target within
10% on dev, and records each of its phases in the one shape. A new method is checked by adding its
name to the registry (tokenprune/methods/__init__.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import job_config, tiny_model
from tokenprune.methods import REGISTRY, Job
from tokenprune.methods.base import CallOrderError
from tokenprune.methods.topk import TopK
from tokenprune.runner import run_job

TARGET = 2.0


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods")  # one cache: one fine-tuning for every method


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_fits_calibrates_and_records_its_phases(name, root, tmp_path):
    cfg = job_config(root, "task=mrpc", f"method={name}")
    target = cfg.method.get("fixed_speedup") or TARGET  # the full model has one operating point
    cfg.speedup = target
    record = run_job(cfg, tmp_path)
    assert record["status"] == "ok", record.get("error")
    assert record["flops_speedup"] == pytest.approx(target, rel=0.10)
    phases = record["method_info"]["phases"]
    assert "finetune" in phases  # every method starts from the cached fine-tuned backbone
    for kind, phase in phases.items():
        assert set(phase) == {"cached", "seconds", "path"}, kind
        assert isinstance(phase["cached"], bool) and phase["seconds"] >= 0
        assert (Path(phase["path"]) / "key.json").is_file(), kind


def test_the_call_order_is_enforced():
    model = tiny_model()
    cfg = OmegaConf.create({"method": {"name": "topk", "layer": 1}})
    job = Job(cfg=cfg, splits={"calib": {"length": [20, 30, 40, 50]}}, tokenizer=None, backbone=model,
              backbone_key={}, phases=None, device=torch.device("cpu"))
    method = TopK(job)
    with pytest.raises(CallOrderError, match="fit\\(target\\), calibrate\\(target\\), evaluated\\(\\)"):
        method.calibrate(2.0)
    method.fit(2.0)
    with pytest.raises(CallOrderError):
        method.evaluated()
    with pytest.raises(CallOrderError):
        method.fit(2.0)
    knob = method.calibrate(2.0)
    model_out, policy = method.evaluated()
    assert model_out is model and policy.keep_fraction == knob["keep_fraction"]
    with pytest.raises(CallOrderError):
        method.evaluated()
