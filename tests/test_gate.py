"""method=gate (MrT5's delete gate) and the PI controller: soft deletion through the key logits
matches hard deletion, deletion happens once, the controller drives toward its target, and the
method meets a smoke target."""

from __future__ import annotations

import pytest
import torch

from helpers import job_config
from test_encoder import make_batch, tiny_model
from tokenprune.control import PIController
from tokenprune.encoder import PrunableEncoder
from tokenprune.methods.gate import DeleteGate
from tokenprune.runner import run_job


def test_pi_controller_raises_the_weight_until_the_target_is_met_and_never_goes_negative():
    pi = PIController(target=0.5, kp=1.0, ki=0.1)
    assert pi.update(0.0) == pytest.approx(0.5 + 0.05)
    assert pi.update(0.0) > 0.55  # the integral keeps growing while short of the target
    for _ in range(50):
        value = pi.update(1.0)  # overshoot: the weight falls to 0, not below
    assert value == 0.0 and pi.integral == 0.0


def _gate_deleting_odd_positions(d: int) -> DeleteGate:
    """A gate whose G is fixed by position (k on odd slots, 0 elsewhere), so that soft and hard
    deletion of the same tokens can be compared."""
    gate = DeleteGate(d, after_layer=0)
    gate.gate = lambda hidden: torch.where(torch.arange(hidden.shape[1]) % 2 == 1, -30.0, 0.0).expand(hidden.shape[:2])
    return gate


def test_soft_deletion_through_key_logits_matches_hard_deletion_for_cls():
    model = tiny_model()
    ids, mask, types = make_batch([15, 9])
    soft = _gate_deleting_odd_positions(64)
    hard = _gate_deleting_odd_positions(64)
    hard.hard = True
    with torch.no_grad():
        soft_out = PrunableEncoder(model, soft, mode="mask")(ids, mask, types)
        hard_out = PrunableEncoder(model, hard, mode="gather")(ids, mask, types)
    torch.testing.assert_close(soft_out.logits, hard_out.logits, atol=1e-5, rtol=0)
    counts = hard_out.trace.attn_tokens
    assert counts[:, 0].tolist() == [15, 9] and counts[:, 1].tolist() == [8, 5]
    assert (counts[:, 1:] == counts[:, 1:2]).all(), "deleted once, after layer 0"
    assert (hard_out.trace.selector_flops == 2.0 * 64 * torch.tensor([15, 9], dtype=torch.float64)).all()


def test_gate_meets_a_smoke_target(tmp_path):
    cfg = job_config(tmp_path, "task=sst2", "method=gate", "speedup=1.5", "measure.control=false")
    record = run_job(cfg, tmp_path / "job")
    assert record["status"] == "ok", record.get("error")
    assert record["flops_speedup"] == pytest.approx(1.5, rel=0.10)
    knob = record["method_info"]["knob"]
    assert 0 < knob["target_ratio"] < 1 and -30 <= knob["threshold"] < 0
    # what training did is in the record: the soft ratio mean(G)/k is a share, and the trace follows the steps
    trace = knob["training_trace"]
    assert 0 < knob["trained_soft_ratio"] < 1 and trace["step"][0] == 0 and trace["step"] == sorted(trace["step"])
    assert len(trace["alpha"]) == len(trace["deleted_ratio"]) == len(trace["soft_ratio"]) == len(trace["step"])
    assert trace["soft_ratio"][0] == pytest.approx(float(torch.sigmoid(torch.tensor(-4.0))), abs=1e-3)  # the bias's start
    tokens = record["tokens_per_layer"]["attention"]
    assert tokens[1] < tokens[0] and tokens[1] == pytest.approx(tokens[-1])
