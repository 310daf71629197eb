"""The shared pieces of issue 19: the travel rule for a knob's learning rate, the walk of a
regulariser weight to the target, rank correlation, and the `learning` block of a record."""

import logging
import math

import pytest
import torch

from tokenprune import results
from tokenprune.methods.toolbox import (learning_record, rank_correlation, travel, travel_lr, travel_scale,
                                        walk_to_target)


def test_travel_rule_arithmetic():
    assert travel(100, 0.01) == pytest.approx(0.5)  # 0.5·steps·lr
    assert travel_scale(50, 3159) == pytest.approx(3159 / 50)
    lr = travel_lr(5e-4, 3159, 50)
    assert lr == pytest.approx(5e-4 * 3159 / 50)
    assert travel(50, lr) == pytest.approx(travel(3159, 5e-4))  # the paper's travel on this budget
    assert travel_lr(5e-4, 3159, 3159) == pytest.approx(5e-4)  # at the paper's steps: the paper's rate
    assert travel_lr(5e-4, 3159, 1, max_lr=0.1) == 0.1


def test_adam_with_warmup_and_linear_decay_travels_half_steps_times_lr():
    from transformers import get_linear_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 10, 100)
    for _ in range(100):
        opt.zero_grad()
        p.sum().backward()  # a constant gradient: Adam's step is lr every time
        opt.step()
        sched.step()
    assert -float(p.detach()) == pytest.approx(travel(100, 0.01), rel=0.02)


def test_rank_correlation_by_hand():
    scores = [torch.tensor([0.1, 0.5, 0.3, 9.0, 0.0]), [1, 2, 3, 4]]
    signal = [torch.tensor([1.0, 3.0, 2.0, 7.0, 5.0]), [4, 3, 2, 1]]
    masks = [torch.tensor([1, 1, 1, 1, 0]).bool(), None]
    # example 1 over its 4 real tokens: the same order (ρ = 1); example 2: reversed (ρ = −1)
    assert rank_correlation(scores, signal, masks) == pytest.approx(0.0)
    assert rank_correlation(scores[:1], signal[:1], masks[:1]) == pytest.approx(1.0)
    # without the mask the padding slot (score 0, signal 5) breaks the order: ranks [2,4,3,5,1] vs
    # [1,3,2,5,4], Σd² = 12, ρ = 1 − 6·12/(5·24) = 0.4
    assert rank_correlation(scores[:1], signal[:1]) == pytest.approx(0.4)
    assert rank_correlation([[1, 1, 1]], [[1, 2, 3]]) is None  # a constant side says nothing


def test_walk_to_target_brackets_and_refines():
    own = lambda w: 1 + 10 * w  # noqa: E731 (monotone: a larger weight prunes more)
    value, grid = walk_to_target(1.0, own, 2.0, factor=10, tries=4)
    assert [g["value"] for g in grid][:3] == [1.0, 0.1, pytest.approx(math.sqrt(0.1))]
    assert value == pytest.approx(0.1)  # 2.0 exactly
    value, grid = walk_to_target(1e-4, own, 2.0, factor=10, tries=2, refine=False)
    assert len(grid) == 3 and value == pytest.approx(1e-2)  # not bracketed in 2 tries: the nearest
    assert walk_to_target(1.0, own, 2.0, tries=0)[0] == 1.0


def test_walk_to_target_stops_once_the_weight_no_longer_changes_what_is_learned():
    # PoWER-BERT on MRPC: beyond λ 0.3 every layer sits at the travel's floor, below the target
    table = {3e-3: 1.29, 3e-2: 1.34, 3e-1: 1.38, 3.0: 1.38, 30.0: 1.38, 300.0: 1.38}
    calls = []
    own = lambda w: calls.append(w) or table[min(table, key=lambda v: abs(math.log(v / w)))]  # noqa: E731
    value, grid = walk_to_target(3e-3, own, 2.0, factor=10, tries=5)
    assert calls == [3e-3, pytest.approx(3e-2), pytest.approx(3e-1), pytest.approx(3.0)]  # not 30, 300
    assert value == pytest.approx(3e-1)  # the full walk's choice: the first of the equal ones
    assert [g["own_speedup"] for g in grid] == [1.29, 1.34, 1.38, 1.38]
    # flat steps before the weight begins to act are walked through (1.0 -> 1.0 -> 1.5 -> 2.5)
    table = {1e-3: 1.0, 1e-2: 1.0, 1e-1: 1.5, 1.0: 2.5}
    own = lambda w: table[min(table, key=lambda v: abs(math.log(v / w)))]  # noqa: E731
    value, grid = walk_to_target(1e-3, own, 2.0, factor=10, tries=4, refine=False)
    assert [g["value"] for g in grid] == [1e-3, pytest.approx(1e-2), pytest.approx(0.1), pytest.approx(1.0)]


def test_learning_record_warns_at_a_bound_and_goes_in_a_record(caplog, tmp_path):
    with caplog.at_level(logging.WARNING):
        block = learning_record("adapler", {"eta": {"initial": 0.25, "final": [0.3, 1.0, 0.01], "bounds": (0.01, 1.0)}},
                                target=2.0, own_speedup=1.5, calibration={"multiplier": 1.2}, schedule=[0.3, 1.0, 0.01],
                                rank_corr=0.4, signal="saliency")
    eta = block["knobs"]["eta"]
    assert eta["moved"] == pytest.approx(0.75) and eta["at_bound"] == [1, 2]
    assert len(block["warnings"]) == 1 and "optimiser bound" in block["warnings"][0]
    assert "optimiser bound" in caplog.text
    assert block["own_vs_target"] == pytest.approx(0.75) and block["rank_correlation"] == 0.4
    quiet = learning_record("x", {"k": {"initial": 1.0, "final": 0.5, "bounds": (0.0, 1.0)}}, target=2.0,
                            own_speedup=2.0, calibration={})
    assert quiet["warnings"] == [] and quiet["knobs"]["k"]["moved"] == 0.5
    record = results.new_record(task="sst2", method="adapler", status="ok", learning=block)
    path = results.write(record, tmp_path / "job")
    assert results.read(path)["learning"]["knobs"]["eta"]["at_bound"] == [1, 2]


def test_walk_settings_check_tries_and_factor_with_one_sentence():
    from omegaconf import OmegaConf

    from tokenprune.errors import UserError
    from tokenprune.methods.toolbox import walk_settings

    assert walk_settings(OmegaConf.create({"phi_tries": 3, "phi_factor": 4.0}), "phi", "the paper's φ") == (3, 4.0)
    assert walk_settings(OmegaConf.create({}), "alpha", "alpha") == (0, 10.0)
    with pytest.raises(UserError, match=r"method.lambda_tries=-1 is not valid: .*\(0: the paper's λ only\)"):
        walk_settings(OmegaConf.create({"lambda_tries": -1}), "lambda", "the paper's λ")
    with pytest.raises(UserError, match="method.phi_factor=1.0 is not valid"):
        walk_settings(OmegaConf.create({"phi_factor": 1}), "phi", "the paper's φ")
