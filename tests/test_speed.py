"""Speed work (issue 21): the significance path computes what explicit probabilities give, the knob
search needs fewer passes and meets the same contract, the methods' benchmark runs."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_batch, tiny_model
from tokenprune.encoder import PrunableEncoder, TokenPolicy
from tokenprune.methods.toolbox import meet_target
from tokenprune.methods.topk import TopKPolicy, significance

REPO = Path(__file__).resolve().parents[1]


class Record(TokenPolicy):
    """Asks for the significance (or the probabilities) at every layer, records it, drops nothing."""

    def __init__(self, probs: bool):
        super().__init__()
        self.probs, self.seen = probs, []

    def needs_attention(self, layer):
        return self.probs

    def needs_significance(self, layer):
        return not self.probs

    def after_attention(self, layer, state, probs):
        self.seen.append((state.hidden, significance(probs, state.mask) if self.probs else state.significance))
        return None


@pytest.mark.parametrize("lengths", [[37], [37, 20, 9]])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 20000, 600])  # one buffer; 3 of 4 heads at a time; one
def test_significance_without_probabilities_matches_explicit(lengths, chunk_bytes, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(PrunableEncoder, "SIGNIFICANCE_CHUNK_BYTES", chunk_bytes)
    batch = make_batch(lengths)
    explicit, chunked = Record(probs=True), Record(probs=False)
    with torch.inference_mode():
        a = PrunableEncoder(model, explicit, mode="gather")(*batch)
        b = PrunableEncoder(model, chunked, mode="gather")(*batch)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    real = batch[1].bool()
    for (h_a, s_a), (h_b, s_b) in zip(explicit.seen, chunked.seen):
        torch.testing.assert_close(h_b, h_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_b[real], s_a[real], atol=1e-6, rtol=1e-5)


def test_significance_while_training_comes_from_probabilities():
    model = tiny_model()
    policy = Record(probs=False)
    batch = make_batch([30, 12])
    PrunableEncoder(model, policy, mode="mask")(*batch)  # grad enabled: the explicit path
    assert len(policy.seen) == 4 and all(s is not None and s.shape == (2, 30) for _, s in policy.seen)


def test_topk_keeps_the_same_tokens_with_and_without_the_buffer():
    model = tiny_model()
    batch = make_batch([50, 31, 8])

    class Explicit(TopKPolicy):  # the pre-issue-21 route: probabilities, then the score
        def needs_significance(self, layer):
            return False

        def needs_attention(self, layer):
            return layer == self.layer

        def after_attention(self, layer, state, probs):
            if probs is not None:
                state.significance = significance(probs, state.mask)
            return super().after_attention(layer, state, probs)

    with torch.inference_mode():
        a = PrunableEncoder(model, Explicit(1, 0.4), mode="gather")(*batch)
        b = PrunableEncoder(model, TopKPolicy(1, 0.4), mode="gather")(*batch)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.trace.attn_tokens, b.trace.attn_tokens)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)


def test_meet_target_interpolates_with_fewer_passes_and_same_contract():
    calls = []

    def speedup(x):  # monotone, smooth
        calls.append(x)
        return 1 + 4 * x ** 1.5

    knob, s = meet_target(speedup, 2.0, gentle=0.0, extreme=1.0, steps=60, method="m", extreme_means="all")
    assert s >= 2.0 and s == speedup(knob)
    assert abs(knob - 0.25 ** (2 / 3)) < 1e-6  # the boundary, to bisection's precision
    assert len(calls) < 30  # 60 bisections + 2 bounds before


def test_meet_target_with_rtol_stops_inside_the_window_with_fewer_passes():
    def search(rtol):
        calls = []

        def speedup(x):  # a fine staircase, as token counts on calib make it
            calls.append(x)
            return 1 + int(4000 * x ** 1.5) / 1000

        return (*meet_target(speedup, 2.0, gentle=0.0, extreme=1.0, steps=16, method="m", extreme_means="all",
                             rtol=rtol), len(calls))

    exact_knob, exact_s, exact_calls = search(0.0)
    knob, s, calls = search(0.005)
    assert 2.0 <= s <= 2.0 * 1.005 and knob >= exact_knob and exact_s >= 2.0
    assert calls <= exact_calls // 2, (calls, exact_calls)
    wide_knob, wide_s, _ = search(10.0)  # the extreme itself is within a wide window: no search
    assert (wide_knob, wide_s) == (1.0, 5.0)


def test_meet_target_on_steps_keeps_the_gentlest_knob_meeting_target():
    def speedup(x):  # a staircase, as token counts make it
        return 1 + int(10 * x) / 5

    knob, s = meet_target(speedup, 2.0, gentle=0.0, extreme=1.0, steps=60, method="m", extreme_means="all")
    assert s >= 2.0 and abs(knob - 0.5) < 1e-9


def test_meet_target_from_a_start_brackets_near_it_and_agrees_with_the_full_search():
    def search(start):
        calls = []

        def speedup(scale):  # AdapLeR-like: flat near 0, saturating far out
            calls.append(scale)
            return 1 + 3 * (1 - math.exp(-scale))

        return (*meet_target(speedup, 2.0, gentle=1e-9, extreme=2000.0, geometric=True, steps=16, method="m",
                             extreme_means="all", rtol=0.005, start=start), calls)

    knob, s, calls = search(None)
    for start in (1.0, 0.01, 1000.0):
        k, s_start, c = search(start)
        assert 2.0 <= s_start <= 2.01 and abs(math.log(k / knob)) < 0.02
        assert c[0] == start and 1e-9 not in c  # the bracket came from the start, not the gentle end
    assert len(search(1.0)[2]) < len(calls)
    with pytest.raises(ValueError):
        meet_target(lambda x: x, 2.0, gentle=0.0, extreme=1.0, method="m", extreme_means="all", start=0.5)


def test_bench_calibration_runs_on_tiny_and_the_window_saves_passes():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import bench_calibration
    finally:
        sys.path.pop(0)
    records = bench_calibration.main(["--model", "tiny", "--n", "12", "--batch-size", "4", "--targets", "2",
                                      "--methods", "trbert", "adapler", "--searches", "ITP+counts", "+window"])
    by = {(r["method"], r["search"]): r for r in records}
    for method in ("trbert", "adapler"):
        exact, window = by[method, "ITP+counts"], by[method, "+window"]
        assert 2.0 <= exact["calib_speedup"] and 2.0 <= window["calib_speedup"] <= 2.0 * 1.005 + 1e-9
        assert window["passes"] < exact["passes"]


def test_bench_methods_runs_on_tiny(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import bench_methods
    finally:
        sys.path.pop(0)
    records = bench_methods.main(["--model", "tiny", "--quick", "--n", "2", "--n-batched", "4", "--batch-size", "2",
                                  "--repeats", "1", "--targets", "2", "--breakdown-target", "2",
                                  "--methods", "topk", "trbert", "distilbert", "tome", "pitome", "ltp", "gate",
                                  "--out", str(tmp_path)])
    got = {(r["method"], r["length"], r["batch"]) for r in records}
    assert {("topk", "imdb", 1), ("topk", "sst2", 2), ("trbert", "imdb", 2), ("distilbert", "sst2", 1)} <= got
    assert {(m, "imdb", b) for m in ("tome", "pitome", "ltp", "gate") for b in (1, 2)} <= got  # every family
    for r in records:
        assert abs(r["flops_speedup"] - 2.0) < 0.35 and r["wall_speedup"] > 0
        assert r["wall_over_flops"] == pytest.approx(r["wall_speedup"] / r["flops_speedup"], abs=0.01)
    broken = [r for r in records if "sections_ms" in r and r["method"] == "topk"]
    assert broken and broken[0]["sections_ms"]["selector"] > 0 and broken[0]["sections_ms"]["ffn"] > 0
    assert "| topk | imdb | 2x |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "records.json").read_text())


def _count_batches():
    """Batches of mixed lengths; the last has padding columns that no row needs."""
    batches = []
    for seed, lengths in enumerate([[30, 12, 7], [25, 25], [40], [18, 9]]):
        ids, mask, types = make_batch(lengths, seed)
        if seed == 3:
            ids, mask, types = (torch.nn.functional.pad(t, (0, 5)) for t in (ids, mask, types))
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return batches


def _knobbed_policy(name: str, d: int, layers: int):
    """(policy in eval mode, the knob's attribute, values from gentle to harsh)."""
    from tokenprune.methods.adapler import AdapLeRPolicy
    from tokenprune.methods.gate import K, DeleteGate
    from tokenprune.methods.ltp import LTPPolicy
    from tokenprune.methods.trbert import TrBertPolicy

    torch.manual_seed(3)
    if name == "trbert":
        return TrBertPolicy(d, layers).eval(), "tau", [-5.0, -0.05, 0.0, 0.05, 5.0]
    if name == "adapler":
        return AdapLeRPolicy(layers, d).eval(), "scale", [1e-3, 1.0, 2.0, 4.0, 8.0]
    if name == "ltp":
        return LTPPolicy(layers, 0.01, 1e-3, 32, hard=True).eval(), "scale", [0.0, 1.0, 8.0, 32.0, 128.0]
    gate = DeleteGate(d, after_layer=0, hard=True)
    torch.nn.init.normal_(gate.linear.weight, std=1.0)
    torch.nn.init.zeros_(gate.linear.bias)
    return gate.eval(), "threshold", [K, 0.75 * K, K / 2, 0.25 * K, -1e-3]


@pytest.mark.parametrize("name", ["trbert", "adapler", "ltp", "gate"])
def test_count_passes_give_run_evals_counts_for_every_knob_with_less_work(name, monkeypatch):
    """Calibration's passes (`CountPasses`: the states entering the first decision point computed once,
    nothing run past the last) count exactly what a full gather-mode evaluation counts, at every knob,
    and run fewer FFNs."""
    from tokenprune.evaluate import CountPasses, run_eval

    model = tiny_model(layers=4)
    batches = _count_batches()
    policy, field, values = _knobbed_policy(name, model.config.hidden_size, 4)
    ffn_calls = []
    real_ffn = PrunableEncoder._ffn
    monkeypatch.setattr(PrunableEncoder, "_ffn", staticmethod(lambda layer, h: ffn_calls.append(1) or real_ffn(layer, h)))
    passes = CountPasses(model, policy, batches, "cpu")
    seen = set()
    for value in values:
        setattr(policy, field, value)
        del ffn_calls[:]
        counts = passes()
        fast = len(ffn_calls)
        del ffn_calls[:]
        full = run_eval(model, policy, batches, "cpu", progress=False)
        assert fast < len(ffn_calls) == 4 * len(batches)
        for field_name in ("attn_tokens", "ffn_tokens", "selector_flops", "lengths"):
            assert np.array_equal(getattr(counts, field_name), getattr(full, field_name)), (value, field_name)
        seen.add(counts.ffn_tokens.tobytes())
    assert len(seen) >= 3  # the knob values really prune differently
