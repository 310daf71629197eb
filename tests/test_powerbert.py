"""PoWER-BERT and random dropping: the read-out, Soft-Extract, Hard-Extract in mask ≡ gather, the
random policy's per-example determinism, phase caching, the speedup target end to end, and the
one-sentence errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tokenprune.encoder import PrunableEncoder, TokenState
from tokenprune.errors import UserError
from tokenprune.methods.powerbert import (HardExtractPolicy, SoftExtractPolicy, calibrate_scale, config_counts,
                                          read_out)
from tokenprune.methods.random_drop import RandomPolicy, attach_ids

from helpers import make_batch, tiny_model

CONF = Path(__file__).resolve().parents[1] / "conf"
TOL = 1e-5




# ---- the configuration ---------------------------------------------------------------------------

def test_read_out_is_monotone_at_least_one_and_the_papers_formula():
    torch.manual_seed(0)
    r = torch.rand(6, 32)
    r[2] = 1.0  # a later layer with more mass than an earlier one is capped by it
    r[5] = 0.0  # an empty layer keeps [CLS]
    counts = read_out(r)
    assert counts[0] == max(1, int(r[0].sum()))
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[2] == counts[1] and counts[5] == 1
    assert all(1 <= c <= 32 for c in counts)


def test_counts_follow_real_lengths_keep_cls_and_never_grow():
    lengths = np.array([3, 10, 64, 200])
    attn, ffn = config_counts(lengths, [0.9, 0.5, 0.5, 0.1])
    assert (attn[:, 0] == lengths).all()
    assert (ffn >= 1).all() and (np.diff(ffn, axis=1) <= 0).all() and (ffn <= lengths[:, None]).all()
    assert (attn[:, 1:] == ffn[:, :-1]).all()
    assert ffn[3, 1] == 100 and ffn[1, 1] == 5  # a fraction of each example's own real length


def test_hard_extract_keeps_cls_and_the_configured_counts():
    model = tiny_model()
    ids, mask, types = make_batch([12, 7, 20, 3])
    fractions = [0.75, 0.5, 0.5, 0.2]
    out = PrunableEncoder(model, HardExtractPolicy(fractions), mode="gather")(ids, mask, types)
    _, expected = config_counts(mask.sum(1).numpy(), fractions)
    assert (out.trace.ffn_tokens.numpy() == expected).all()
    assert (out.positions[:, 0] == 0).all() and out.mask[:, 0].all()  # [CLS] at index 0 to the end


def test_calibration_scales_the_shape_and_refuses_what_it_cannot_reach():
    cfg = tiny_model().config
    lengths = np.arange(8, 64)
    shape = [1.0, 0.8, 0.6, 0.4]
    s, scaled, achieved = calibrate_scale(lengths, cfg, shape, 2.0)
    assert achieved >= 2.0 and achieved < 2.1
    assert np.allclose(np.array(scaled) / s, shape)  # same shape, only the level changes
    with pytest.raises(UserError, match="cannot reach speedup=1000"):
        calibrate_scale(lengths, cfg, shape, 1000.0)


# ---- Soft-Extract --------------------------------------------------------------------------------

def attention_with_column_sums(received):
    """B×H×n×n probabilities where key t receives about `received[b][t]` from the other queries."""
    received = torch.tensor(received, dtype=torch.float32)
    B, n = received.shape
    probs = received[:, None, None, :].expand(B, 2, n, n).clone()
    return probs / probs.sum(-1, keepdim=True)


def test_soft_extract_multiplies_the_rank_k_token_by_r_k():
    N = 6
    policy = SoftExtractPolicy(layers=2, max_length=N)
    with torch.no_grad():
        policy.retention[1] = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1])
    # significance order of the 6 tokens: [CLS] first by rule, then 4, 2, 5, 1, 3
    probs = attention_with_column_sums([[0.01, 0.2, 0.5, 0.1, 0.9, 0.3]])
    mask = torch.ones(1, N, dtype=torch.bool)
    state = TokenState(torch.zeros(1, N, 8), mask, torch.arange(N)[None], torch.tensor([N]), None, 1, "mask")
    scale = policy.after_attention(1, state, probs).hidden_scale[0]
    rank = {0: 0, 4: 1, 2: 2, 5: 3, 1: 4, 3: 5}
    for t, k in rank.items():
        assert scale[t].item() == pytest.approx(policy.retention[1, k].item())
    # a shorter example uses its relative rank: rank k of n tokens reads bin floor(k·N/n)
    mask3 = torch.tensor([[True, True, True, False, False, False]])
    probs3 = attention_with_column_sums([[0.01, 0.2, 0.9, 0.0, 0.0, 0.0]])
    state3 = TokenState(torch.zeros(1, N, 8), mask3, torch.arange(N)[None], torch.tensor([3]), None, 1, "mask")
    scale3 = policy.after_attention(1, state3, probs3).hidden_scale[0]
    assert scale3[2].item() == pytest.approx(policy.retention[1, 2].item())  # rank 1 of 3 -> bin 2
    assert scale3[1].item() == pytest.approx(policy.retention[1, 4].item())  # rank 2 of 3 -> bin 4
    # the L1 term weights layer j's mass by λ·j (1-based), [CLS]'s fixed bin excluded
    expected = 1e-3 * (1 * policy.retention[0, 1:].sum() + 2 * policy.retention[1, 1:].sum())
    assert policy.l1(1e-3).item() == pytest.approx(expected.item())


def test_soft_extract_in_the_encoder_scales_ffn_inputs_by_rank_and_trains_r():
    model = tiny_model()
    ids, mask, types = make_batch([12, 7, 20])
    policy = SoftExtractPolicy(4, 32)
    plain = PrunableEncoder(model, None, mode="mask")(ids, mask, types)
    soft = PrunableEncoder(model, policy, mode="mask")(ids, mask, types)
    assert torch.allclose(plain.logits, soft.logits, atol=TOL)
    # in the encoder, layer 0's FFN input is the attention output times r_0[rank bin]
    with torch.no_grad():
        policy.retention[0] = torch.linspace(1.0, 0.05, 32)
    seen = []
    handle = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    plain = PrunableEncoder(model, None, mode="mask")(ids, mask, types)
    halved = PrunableEncoder(model, policy, mode="mask")(ids, mask, types)
    handle.remove()
    ratio = (seen[1] / seen[0]).detach()
    for b, n in enumerate(mask.sum(1).tolist()):
        assert torch.allclose(ratio[b, :n], ratio[b, :n, :1].expand(-1, ratio.shape[-1]), atol=1e-4)  # one factor per token
        factors = sorted(ratio[b, 1:n, 0].tolist(), reverse=True)
        expected = [policy.retention[0, (k * 32) // n].item() for k in range(1, n)]
        assert factors == pytest.approx(expected, abs=1e-4)  # rank k's factor is r_0[floor(k·N/n)]
        assert ratio[b, 0, 0].item() == pytest.approx(1.0)  # [CLS] untouched
    halved.logits.sum().backward()
    assert policy.retention.grad is not None and policy.retention.grad[:, 1:].abs().sum() > 0


# ---- Hard-Extract and random: mask ≡ gather ------------------------------------------------------

@pytest.mark.parametrize("kind", ["powerbert", "random"])
def test_mask_and_gather_give_the_same_logits(kind):
    model = tiny_model()
    ids, mask, types = make_batch([12, 7, 20, 3, 16])
    fractions = [0.8, 0.5, 0.5, 0.25]
    policy = HardExtractPolicy(fractions) if kind == "powerbert" else RandomPolicy(fractions, seed=3)
    if kind == "random":
        attach_ids(model, policy)
    policy.eval()
    with torch.no_grad():
        masked = PrunableEncoder(model, policy, mode="mask")(ids, mask, types)
        gathered = PrunableEncoder(model, policy, mode="gather")(ids, mask, types)
    assert torch.allclose(masked.logits, gathered.logits, atol=TOL)
    assert torch.equal(masked.trace.ffn_tokens, gathered.trace.ffn_tokens)


def test_random_choice_is_per_example_deterministic_and_not_significance():
    model = tiny_model()
    ids, mask, types = make_batch([20, 9, 16])
    fractions = [0.5, 0.5, 0.3, 0.3]
    policy = RandomPolicy(fractions, seed=1).eval()
    attach_ids(model, policy)
    with torch.no_grad():
        batch = PrunableEncoder(model, policy, mode="gather", restore=False)(ids, mask, types)
        alone = PrunableEncoder(model, policy, mode="gather")(ids[1:2, :9], mask[1:2, :9], types[1:2, :9])
        again = PrunableEncoder(model, policy, mode="gather")(ids, mask, types)
        learned = PrunableEncoder(model, HardExtractPolicy(fractions), mode="gather")(ids, mask, types)
    assert torch.allclose(batch.logits[1], alone.logits[0], atol=TOL)  # batching does not change the draw
    assert torch.equal(batch.logits, again.logits)
    kept = lambda out, b: set(out.positions[b][out.mask[b]].tolist())  # noqa: E731
    assert kept(batch, 1) == kept(alone, 0)
    assert any(kept(batch, b) != kept(learned, b) for b in range(3))
    # training draws afresh each step
    policy.train()
    draws = {tuple(PrunableEncoder(model, policy, mode="mask")(ids, mask, types).mask[0].tolist()) for _ in range(5)}
    assert len(draws) > 1


# ---- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(method, speedup, cache_dir, out_dir, *extra):
    from tokenprune.runner import run_job

    overrides = [f"method={method}", f"speedup={speedup}", "model=tiny", "budget=smoke", "logger=none",
                 "measure.timing=false", f"cache_dir={cache_dir}", "threads=1", "resume=false", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run_job(cfg, out_dir)


def entries(cache_dir, kind):
    return [p for p in (Path(cache_dir) / kind).glob("*") if (p / "key.json").exists()]


def test_phases_are_cached_and_each_method_meets_its_target(cache_dir, tmp_path):
    # the paper's λ alone (no walk over λ), so that one search serves both targets
    run = lambda *a: globals()["run"](*a, "method.lambda_tries=0")  # noqa: E731
    first = run("powerbert", 2, cache_dir, tmp_path / "a")
    assert first["status"] == "ok", first.get("error")
    assert abs(first["flops_speedup"] / first["speedup_target"] - 1) < 0.1
    assert first["method_info"]["phases"]["powerbert-search"]["cached"] is False

    second = run("powerbert", 3, cache_dir, tmp_path / "b")
    assert second["status"] == "ok", second.get("error")
    assert abs(second["flops_speedup"] / 3 - 1) < 0.1
    phases = second["method_info"]["phases"]
    assert phases["powerbert-search"]["cached"] is True and phases["powerbert-retrain"]["cached"] is False
    assert len(entries(cache_dir, "finetune")) == 1
    assert len(entries(cache_dir, "powerbert-search")) == 1  # phases 1-2 shared by both targets
    assert len(entries(cache_dir, "powerbert-retrain")) == 2  # phase 3 keyed on the scaled configuration
    k1, k2 = first["method_info"]["knob"], second["method_info"]["knob"]
    assert k1["learned_fractions"] == k2["learned_fractions"] and k2["scale"] < k1["scale"]

    rand = run("random", 2, cache_dir, tmp_path / "c")
    assert rand["status"] == "ok", rand.get("error")
    assert abs(rand["flops_speedup"] / 2 - 1) < 0.1
    assert rand["method_info"]["phases"]["powerbert-search"]["cached"] is True  # PoWER-BERT's phases 1-2
    assert rand["method_info"]["knob"]["fractions"] == k1["fractions"]  # the same schedule at the same target
    assert len(entries(cache_dir, "random-retrain")) == 1


@pytest.mark.parametrize("speedup, words", [(1000, "cannot reach speedup=1000"), (0.5, "below 1")])
def test_unreachable_or_invalid_target_is_one_sentence(cache_dir, tmp_path, speedup, words):
    record = run("powerbert", speedup, cache_dir, tmp_path / "x")
    assert record["status"] == "failed"
    assert words in record["error"] and "\n" not in record["error"] and record["error"].endswith(".")
    assert not record.get("traceback")


def test_lambda_defaults_to_the_papers_value_per_task_and_can_be_swept():
    from tokenprune.methods.base import Job
    from tokenprune.methods.powerbert import PowerBert

    def hparams(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["method=powerbert", "logger=none", *overrides])
        return PowerBert(Job(cfg, {}, None, None, {}, None, torch.device("cpu"))).hparams()

    assert hparams("task=sst2") == (2e-4, 5e-4)
    assert hparams("task=mrpc", "method.lambda=1e-4") == (1e-4, 3e-3)
    assert hparams("task=imdb") == (3e-4, 1e-3)  # not in the paper's table: the fallback


def test_speedup_one_uses_the_learned_configuration(cache_dir, tmp_path):
    record = run("powerbert", 1, cache_dir, tmp_path / "l")
    assert record["status"] == "ok", record.get("error")
    knob = record["method_info"]["knob"]
    assert knob["knob"] == "lambda" and knob["fractions"] == knob["learned_fractions"]


def test_the_learned_schedule_decreases_with_depth_and_the_record_shows_what_training_did(tmp_path):
    record = run("powerbert", 2, tmp_path / "cache", tmp_path / "w")
    assert record["status"] == "ok", record.get("error")
    learning = record["learning"]
    schedule = learning["schedule"]
    assert all(a >= b for a, b in zip(schedule, schedule[1:])) and schedule[0] - schedule[-1] >= 0.3, schedule
    retention = learning["knobs"]["retention"]
    assert retention["initial"] == [1.0] * 4 and retention["moved"] >= 0.3
    # the travel rule: LR_SOFT_EXTRACT (SST-2: 5e-4) × the paper's 3159 steps / this budget's steps
    assert retention["lr"] == pytest.approx(5e-4 * 3159 / learning["steps"])
    assert learning["travel"] == pytest.approx(learning["paper_travel"], rel=1e-3)
    # λ walked to the target on calib: the learned configuration is near it by itself
    assert len(learning["lambda_grid"]) > 1 and 0.67 <= learning["own_vs_target"] <= 1.5
    assert learning["calibration"]["multiplier"] == pytest.approx(record["method_info"]["knob"]["scale"], abs=1e-6)
    assert learning["own_speedup"] == pytest.approx(
        min(learning["lambda_grid"], key=lambda g: abs(np.log(g["own_speedup"] / 2)))["own_speedup"])
