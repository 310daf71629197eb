"""method=ltp on the tiny model at a smoke target, and its parts: the score, the soft mask, the
threshold learning rate set by the budget."""

from __future__ import annotations

import pytest
import torch

from helpers import job_config
from test_encoder import make_batch, tiny_model
from tokenprune.encoder import PrunableEncoder
from tokenprune.methods.ltp import LTPPolicy, received
from tokenprune.runner import run_job


def hard_ltp(cls=LTPPolicy) -> LTPPolicy:
    """LTP's inference policy on the tiny model (4 layers), pruning at layers 1-3: its attention is near
    uniform (every score near 1/N = 1/32), so the thresholds sit just below that."""
    policy = cls(4, 0.01, 1e-3, 32, hard=True).eval()
    with torch.no_grad():
        policy.thresholds.delta.copy_(torch.tensor([0.0, 0.0310, 0.0312, 0.0314]) - policy.thresholds.base)
    return policy


def test_score_is_attention_received_over_a_fixed_length():
    probs = torch.full((1, 2, 4, 4), 0.25)
    mask = torch.tensor([[True, True, True, False]])
    s = received(probs, mask, norm_length=8)
    torch.testing.assert_close(s, torch.full((1, 4), 2 * 3 * 0.25 / (2 * 8)))


def test_soft_masks_are_sigmoids_and_hard_pruning_drops_below_threshold():
    model = tiny_model()
    ids, mask, types = make_batch([20, 12])
    soft = LTPPolicy(4, 0.01, 1e-3, 32)
    with torch.no_grad():
        PrunableEncoder(model, soft, mode="mask")(ids, mask, types)
    assert len(soft.masks) == 3 and 0 < float(soft.regulariser()) <= 3  # layers 1..3, each a mean in [0, 1]
    hard = LTPPolicy(4, 0.01, 1e-3, 32, hard=True, scale=8.0).eval()
    with torch.no_grad():
        out = PrunableEncoder(model, hard)(ids, mask, types)
    assert (out.trace.ffn_tokens[:, 0] == torch.tensor([20, 12])).all(), "layer 0 never prunes"
    assert (out.trace.ffn_tokens[:, -1] < torch.tensor([20, 12])).all()


@pytest.mark.parametrize("lengths", [[40], [40, 23, 9]])  # no padding row (one example); padding
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 20000, 600])  # one buffer; 3 of 4 heads at a time; one
def test_hard_pruning_keeps_the_same_tokens_without_the_probabilities(lengths, chunk_bytes, monkeypatch):
    """At inference hard LTP takes its score from the encoder's significance (self included, no
    B×H×n×n buffer); the route before, explicit probabilities and `received`, keeps the same tokens."""
    monkeypatch.setattr(PrunableEncoder, "SIGNIFICANCE_CHUNK_BYTES", chunk_bytes)

    class Explicit(LTPPolicy):
        def needs_significance(self, layer):
            return False

        def needs_attention(self, layer):
            return layer > 0

        def after_attention(self, layer, state, probs):
            if probs is not None:
                state.significance = received(probs, state.mask, self.norm_length) * self.norm_length
            return super().after_attention(layer, state, probs)

    model = tiny_model()
    batch = make_batch(lengths)
    with torch.inference_mode():
        a = PrunableEncoder(model, hard_ltp(Explicit), mode="gather")(*batch)
        b = PrunableEncoder(model, hard_ltp(), mode="gather")(*batch)
    counts = b.trace.ffn_tokens
    assert (counts[:, 1:] < counts[:, :-1]).all() and (counts[:, -1] > 1).all()  # prunes at every layer, not all
    assert torch.equal(a.trace.ffn_tokens, b.trace.ffn_tokens) and torch.equal(a.positions, b.positions)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)


def test_ltp_meets_a_smoke_target_and_scales_the_threshold_lr(tmp_path):
    cfg = job_config(tmp_path, "task=sst2", "method=ltp", "speedup=1.5", "measure.control=false")
    record = run_job(cfg, tmp_path / "job")
    assert record["status"] == "ok", record.get("error")
    assert record["flops_speedup"] == pytest.approx(1.5, rel=0.10)
    knob = record["method_info"]["knob"]
    steps = 256 // 32  # smoke: one epoch of 256 examples at batch 32
    assert knob["lr_threshold"] == pytest.approx(2 * 0.0105 / steps, rel=0.2)
    assert {c["lambda"] for c in record["method_info"]["ltp_candidates"]} == {0.05, 0.2}
    assert {"ltp-soft-0.05", "ltp-soft-0.2", "ltp-hard"} <= set(record["method_info"]["phases"])
    learning = record["learning"]  # what training learned, apart from the calibrated scale
    delta = learning["knobs"]["threshold_delta"]
    assert len(delta["final"]) == 4 and delta["final"][0] == 0.0  # layer 0 never prunes: its threshold stays
    assert learning["schedule"] == knob["thresholds"] and learning["calibration"]["multiplier"] == pytest.approx(knob["scale"])
    assert learning["own_speedup"] > 1.0 and learning["own_vs_target"] == pytest.approx(learning["own_speedup"] / 1.5, abs=1e-3)
    assert learning["travel"] == pytest.approx(0.0105, rel=0.2)  # the paper's movement, on the smoke budget's steps
