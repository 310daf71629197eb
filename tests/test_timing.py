"""Wall-clock timing returns sane fields (no absolute thresholds: timings are noisy on shared CPUs)."""

import math

import datasets
import torch
from omegaconf import OmegaConf

from test_encoder import tiny_model
from tokenprune import timing
from tokenprune.methods.topk import TopKPolicy


def examples(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 40, (1,), generator=g))
        ids = [101] + torch.randint(1000, 5000, (length - 2,), generator=g).tolist() + [102]
        rows.append({"input_ids": ids, "token_type_ids": [0] * length, "length": length})
    return rows


FIELDS = ("latency_ms_b1", "latency_ms_b1_p90", "baseline_latency_ms_b1", "baseline_latency_ms_b1_p90",
          "wallclock_speedup_b1", "throughput", "baseline_throughput", "throughput_speedup")


def test_timing_fields_are_sane():
    model, backbone = tiny_model(), tiny_model(seed=1)
    policy = TopKPolicy(1, 0.5)
    threads_before = torch.get_num_threads()
    out = timing.time_method(model, policy, backbone, examples(), "cpu", n_latency=5, n_throughput=10,
                             batch_size=4, warmup=1, repeats=2, threads=1)
    for key in FIELDS:
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0, key
    assert out["latency_ms_b1_p90"] >= out["latency_ms_b1"]
    assert out["baseline_latency_ms_b1_p90"] >= out["baseline_latency_ms_b1"]
    assert out["throughput_speedup"] == out["throughput"] / out["baseline_throughput"]
    assert out["threads"] == 1 and out["device"] == "cpu"
    assert (out["n_latency"], out["n_throughput"], out["batch_size"], out["repeats"]) == (5, 10, 4, 2)
    assert torch.get_num_threads() == threads_before, "the thread count is given back"
    assert not model.training and not backbone.training


def test_measure_follows_the_config():
    model = tiny_model()
    off = OmegaConf.create({"timing": False})
    assert timing.measure(model, None, model, examples(), off, "cpu") == {}
    cfg = OmegaConf.create({"timing": True, "n_latency": 3, "n_throughput": 50, "batch_size": 8, "warmup": 1,
                            "repeats": 1, "threads": None})
    dev = datasets.Dataset.from_list(examples())  # what the runner passes: an encoded split
    out = timing.measure(model, None, model, dev, cfg, "cpu", seed=3)
    assert out["n_latency"] == 3 and out["n_throughput"] == 12, "a sample no larger than the data"
    assert out["threads"] == torch.get_num_threads()
