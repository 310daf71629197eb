"""TR-BERT: reward and baseline, policy-gradient sign, selection points, [CLS], batch_max, phase
caching, and the smoke budget end to end."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tokenprune.encoder import PrunableEncoder
from tokenprune.methods.trbert import (TrBertPolicy, policy_loss, rank_targets, reward, score_layers,
                                       selection_points)

from helpers import make_batch, tiny_model

CONF = Path(__file__).resolve().parents[1] / "conf"




def test_reward_and_baseline_by_hand():
    task = torch.tensor([0.5, 1.0, 0.2, 0.4])
    frac = torch.tensor([0.5, 0.25, 1.0, 0.5])
    r = reward(task, frac, alpha=2.0)
    assert torch.allclose(r, torch.tensor([-1.5, -1.5, -2.2, -1.4]))
    # K = 2: baselines -1.5 and -1.8, advantages 0, 0, -0.4, +0.4
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert policy_loss(r, nll, rollouts=2).item() == pytest.approx((0 + 0 - 0.4 * 3 + 0.4 * 4) / 4)
    # a constant reward over an example's rollouts teaches nothing
    assert policy_loss(torch.full((4,), -1.0), nll, 2).item() == 0.0


def test_rank_targets():
    scores = torch.tensor([[0.1, 0.9, 0.5, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    assert torch.allclose(rank_targets(scores, mask), torch.tensor([[1 - 2 / 3, 1.0, 1 - 1 / 3, 0.0]]))


def test_selection_points_and_score_layers():
    assert selection_points(6) == [1, 3] and selection_points(12) == [1, 6] and selection_points(4) == [1, 2]
    assert score_layers(12) == (8, [0, 5]) and score_layers(6) == (4, [0, 2])
    model = tiny_model(layers=6)
    policy = TrBertPolicy(64, 6).eval()
    policy.tau = 0.3  # drops some
    out = PrunableEncoder(model, policy, mode="gather")(*make_batch([30, 24]))
    attn = out.trace.attn_tokens
    changes = {i for i in range(1, 6) if not torch.equal(attn[:, i], attn[:, i - 1])}
    assert changes <= {1, 3} and 1 in changes
    # the selectors' FLOPs: 2·(32·64 + 32) per token they ran on; none where only [CLS] is left
    per_token = 2 * (32 * 64 + 32)
    ran = torch.tensor([30, 24]) + torch.where(attn[:, 1] > 1, attn[:, 1], 0)
    assert torch.allclose(out.trace.selector_flops, per_token * ran.double())


def test_policy_gradient_raises_log_prob_of_better_rollout():
    model = tiny_model()
    policy = TrBertPolicy(64, 4).train()
    enc = PrunableEncoder(model, policy, mode="mask")
    model.eval()
    policy.action = "sample"
    torch.manual_seed(3)
    ids, mask, types = make_batch([40])
    ids, mask, types = (x.repeat(2, 1) for x in (ids, mask, types))  # 2 rollouts of one example
    with torch.no_grad():
        enc(ids, mask, types)
    first = policy.records[0]
    assert not torch.equal(first["action"][0], first["action"][1])

    def point1_nll():  # NLL of each row's point-1 actions under the current selector
        z = policy.selectors[0](first["input"])
        a = first["action"].float()
        c = first["cand"].float()
        return (-(a * torch.nn.functional.logsigmoid(z) + (1 - a) * torch.nn.functional.logsigmoid(-z)) * c).sum(1)

    before = point1_nll().detach()
    loss = policy_loss(torch.tensor([1.0, 0.0]), policy.nll(), rollouts=2)  # rollout 0 is the better one
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    after = point1_nll().detach()
    assert after[0] < before[0]  # the better rollout's actions became more likely
    assert after[1] > before[1]  # the worse one's less


def test_cls_always_kept_and_padding_never():
    model = tiny_model()
    policy = TrBertPolicy(64, 4).eval()
    policy.tau = float("inf")  # nothing passes the threshold
    out = PrunableEncoder(model, policy, mode="gather")(*make_batch([12, 7, 3]))
    assert (out.trace.attn_tokens[:, 1:] == 1).all() and (out.positions[:, 0] == 0).all()
    policy.tau = float("-inf")  # everything passes: still no padding
    out = PrunableEncoder(model, policy, mode="gather")(*make_batch([12, 7, 3]))
    assert out.trace.attn_tokens[:, -1].tolist() == [12, 7, 3]
    policy.train()
    policy.action, policy.tau = "sample", 0.0  # rollouts sample σ(z − tau)
    with torch.no_grad():
        policy.selectors[0].fc2.bias.fill_(-50.0)  # p ≈ 0 at point 1
        out = PrunableEncoder(model, policy, mode="mask")(*make_batch([12, 7, 3]))
    assert (out.trace.attn_tokens[:, 1] == 1).all() and out.mask[:, 0].all()


def test_batch_max_on_and_off():
    model = tiny_model()
    policy = TrBertPolicy(64, 4).eval()
    batch = make_batch([30, 26, 22, 20], seed=1)
    with torch.no_grad():
        hidden = model.bert.embeddings(input_ids=batch[0])
    policy.action = "full"
    enc = PrunableEncoder(model, policy, mode="gather")
    enc(*batch)
    z = policy.records[0]["logits"][policy.records[0]["cand"]]
    policy.action = "threshold"
    policy.tau = float(z.detach().quantile(0.7))
    off = enc(*batch).trace.attn_tokens[:, 1]
    policy.batch_max = True
    on = enc(*batch).trace.attn_tokens[:, 1]
    assert len(set(off.tolist())) > 1  # each row its own count
    assert len(set(on.tolist())) == 1 and on[0] == off.max()  # every row the batch's largest
    del hidden


def compose_job(cache_dir, speedup):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["method=trbert", "model=tiny", "budget=smoke", "logger=none",
                                            "measure.timing=false", f"cache_dir={cache_dir}", f"speedup={speedup}",
                                            "threads=1"])


def test_smoke_end_to_end_and_phase_caching(tmp_path, data_root):
    from tokenprune.runner import run_job

    cache = tmp_path / "cache"
    cfg = compose_job(cache, 2)
    cfg.data.root = str(data_root)
    rec = run_job(cfg, tmp_path / "x2")
    assert rec["status"] == "ok", rec.get("error")
    assert abs(rec["flops_speedup"] / rec["speedup_target"] - 1) <= 0.10
    info = rec["method_info"]
    assert 2 <= info["knob"]["calib_speedup"] <= 2 * (1 + 0.005)  # calib_rtol's window
    # what each knob search cost: τ₀ for phase E, then the final threshold from τ₀
    searches = info["calibration_searches"]
    assert [s["name"] for s in searches] == ["threshold", "threshold from tau0"]
    assert all(s["passes"] > 0 and s["seconds"] >= 0 for s in searches)
    trbert_phases = {"trbert-scores", "trbert-rl", "teacher-logits", "trbert-joint"}
    assert set(info["phases"]) >= trbert_phases
    assert not any(info["phases"][p]["cached"] for p in trbert_phases)
    # the learning block: B′ on, the selectors' rate by the travel rule, phase E at the calibrated threshold
    learning = rec["learning"]
    assert learning["init_selector"] and "trbert-init" in info["phases"]
    assert learning["selector_lr"] == pytest.approx(min(3e-5 * 2346 / learning["steps"], 1e-2))
    assert -1 <= learning["rank_correlation"] <= 1 and "phase-B" in learning["rank_correlation_signal"]
    joint_key = json.loads((Path(info["phases"]["trbert-joint"]["path"]) / "key.json").read_text())
    assert joint_key["tau"] == pytest.approx(learning["calibration"]["from"], abs=1e-6)  # E trained at τ₀ (the record rounds it to 6 decimals)
    assert learning["calibration"]["to"] == pytest.approx(info["knob"]["threshold_logit"], abs=1e-6)
    assert learning["own_speedup"] > 1 and len(learning["alpha_grid"]) >= 2
    assert info["knob"]["alpha_joint"] == learning["alpha_joint"] in [g["value"] for g in learning["alpha_grid"]]
    assert learning["rollouts_seen"] == learning["rollouts"] * info["train_examples"] * info["epochs"]
    assert len(learning["knobs"]["keep_rate"]["final"]) == 2 and learning["warnings"] == []

    cfg = compose_job(cache, 1.5)
    cfg.data.root = str(data_root)
    rec = run_job(cfg, tmp_path / "x1.5")
    assert rec["status"] == "ok", rec.get("error")
    cached = {p: v["cached"] for p, v in rec["method_info"]["phases"].items()}
    assert cached["trbert-scores"] and cached["trbert-rl"] and cached["teacher-logits"] and not cached["trbert-joint"]
    assert abs(rec["flops_speedup"] / 1.5 - 1) <= 0.10
