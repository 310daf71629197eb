"""FLOPs: the analytic count against torch's FLOP counter, the papers' modes, evaluation, topk's knob."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig

from test_encoder import DropPositions, make_batch, tiny_model
from test_ltp import hard_ltp
from tokenprune import flops
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy
from tokenprune.errors import UserError
from tokenprune.evaluate import run_eval
from tokenprune.methods.base import Job
from tokenprune.methods.topk import TopK, TopKPolicy, calibrate_keep_fraction, topk_counts


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


class MLPSelector(DropPositions):
    """A small selector network (d→8→1) run on the alive tokens before layer 1, reporting its FLOPs."""

    def __init__(self, d, **rules):
        super().__init__(**rules)
        self.net = torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))

    def before_layer(self, layer, state):
        decision = super().before_layer(layer, state)
        if layer != 1:
            return decision
        self.net(state.hidden)  # batch 1 after a gather: every slot is a real token
        n = state.mask.sum(1)
        return Decision(keep=None if decision is None else decision.keep, flops=2.0 * n * (64 * 8 + 8 * 1))


def cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and AV: 2·b·h·s_q·s_k·(d_k + d_v); torch counts sdpa only for its CUDA kernels."""
    b, h, s_q, d_k = query_shape
    return 2 * b * h * s_q * key_shape[2] * (d_k + value_shape[3])


def counted(model, policy, ids, attention):
    """torch's count of one forward (no matmul in the embeddings, so they add nothing)."""
    encoder = PrunableEncoder(model, policy, mode="gather", attention=attention)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = encoder(ids)
    return counter.get_total_flops(), out.trace


POLICIES = {
    "none": lambda: None,
    "before": lambda: DropPositions(before={1: lambda b, p: p % 3 == 1, 3: lambda b, p: p > 12}),
    "after": lambda: DropPositions(after={0: lambda b, p: p % 4 == 2, 2: lambda b, p: p % 2 == 1}),
    "topk": lambda: TopKPolicy(1, 0.4),
    "ltp": hard_ltp,
    "selector": lambda: MLPSelector(64, after={2: lambda b, p: p % 2 == 0}),
}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_canonical_count_matches_torch_flop_counter(tiny, name, attention):
    ids, _, _ = make_batch([33])
    total, trace = counted(tiny, POLICIES[name](), ids, attention)
    if name != "none":
        assert len(set(trace.attn_tokens[0].tolist() + trace.ffn_tokens[0].tolist())) > 1, "counts vary by layer"
    analytic = flops.canonical_flops(trace.attn_tokens, trace.ffn_tokens, tiny.config, trace.selector_flops)
    assert analytic[0] == pytest.approx(total, rel=0.01)
    if name == "none":
        assert flops.canonical_baseline([33], tiny.config)[0] == pytest.approx(total, rel=0.01)


def test_layer_formula():
    # 8·n·d² + 4·n²·d + 4·n'·d·d_ff
    assert flops.layer_flops(10, 4, d=8, d_ff=32) == 8 * 10 * 64 + 4 * 100 * 8 + 4 * 4 * 8 * 32
    cfg = SimpleNamespace(hidden_size=8, intermediate_size=32, num_hidden_layers=2, num_labels=3)
    got = flops.canonical_flops([[10, 10]], [[10, 4]], cfg, selector_flops=[5.0])
    assert got[0] == flops.layer_flops(10, 10, 8, 32) + flops.layer_flops(10, 4, 8, 32) + 2 * 64 + 2 * 8 * 3 + 5


def test_speedup_is_a_ratio_of_sums():
    assert flops.speedup([10.0, 30.0], [5.0, 30.0]) == pytest.approx(40 / 35)


def test_trbert_table_reproduces_the_published_one():
    table = flops.trbert_macs_table(d=768)
    assert len(table) == 1025
    assert all(table[n] == 12 * n * 768**2 + 2 * n**2 * 768 for n in range(1025))
    assert 12 * table[384] == 35_332_816_896  # BERT-base at 384 tokens, as in the reference
    assert flops.trbert_layer_macs(384) == table[384]


def test_trbert_mode_on_a_trace():
    cfg = BertConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_labels=2)
    lengths = np.array([100, 40])
    kept1, kept2 = np.array([60, 20]), np.array([30, 10])
    counts = np.stack([lengths] + [kept1] * 5 + [kept2] * 6, axis=1)  # TR-BERT's [1, 5, 6] blocks
    selector = np.array([123.0, 45.0])
    got = flops.method_flops(counts, counts, cfg, selector, mode="trbert")
    macs = flops.trbert_layer_macs
    expected = 2 * (macs(lengths) + 5 * macs(kept1) + 6 * macs(kept2) + 768 * 2) + selector
    np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(flops.baseline_flops(lengths, cfg, mode="trbert"), 2 * (12 * macs(lengths) + 768 * 2))


def test_adapler_mode_is_its_polynomials():
    cfg = BertConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_labels=3)
    n = np.array([50.0])
    assert flops.baseline_flops(n, cfg, mode="adapler")[0] == pytest.approx(
        37872 * 50**2 + 170216500 * 50 + 1183490 - 1537 + 1537 * 3)
    counts = np.array([[50] * 4 + [30] * 4 + [10] * 4])
    expected = 1183537 + 1537 * 2 + 6152 * 50 + sum(3156 * c**2 + 14233554 * c for c in counts[0])
    assert flops.method_flops(counts, counts, cfg, mode="adapler")[0] == pytest.approx(expected)
    with pytest.warns(UserWarning, match="BERT-base"):
        flops.baseline_flops(n, BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6), mode="adapler")


def test_powerbert_mode_counts_padding_until_a_real_token_goes():
    cfg = BertConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_labels=2)
    lengths = np.array([10])
    attn, ffn = np.array([[10, 10, 6]]), np.array([[10, 6, 6]])
    d, dff, N = 16, 64, 32
    layer = lambda a, f: 2 * (4 * a * d * d + 2 * a * a * d + 2 * f * d * dff)  # noqa: E731
    got = flops.method_flops(attn, ffn, cfg, lengths=lengths, mode="powerbert", padded_len=N)
    assert got[0] == layer(N, N) + layer(N, 6) + layer(6, 6)
    assert flops.baseline_flops(lengths, cfg, mode="powerbert", padded_len=N)[0] == 3 * layer(N, N)
    with pytest.raises(ValueError, match="padded_len"):
        flops.baseline_flops(lengths, cfg, mode="powerbert")


# --- evaluation ---------------------------------------------------------------------------------

def loader(lengths_per_batch, num_labels=2, seed=0):
    batches, start = [], 0
    for i, lengths in enumerate(lengths_per_batch):
        ids, mask, types = make_batch(lengths, seed=seed + i)
        labels = torch.rand(len(lengths)) if num_labels == 1 else torch.randint(0, num_labels, (len(lengths),))
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
                        "idx": torch.arange(start, start + len(lengths))})
        start += len(lengths)
    return batches


def test_run_eval_and_its_flops(tiny):
    data = loader([[30, 25, 20], [12, 9]])
    full = run_eval(tiny, None, data, "cpu")
    pruned = run_eval(tiny, TopKPolicy(1, 0.5), data, "cpu")
    assert full.attn_tokens.shape == (5, 4) and full.lengths.tolist() == [30, 25, 20, 12, 9]
    assert full.idx.tolist() == [0, 1, 2, 3, 4] and len(full.labels) == 5 and full.predictions.dtype.kind == "i"
    assert pruned.ffn_tokens[:, 1].tolist() == [15, 13, 10, 6, 5]  # round(n/2), from layer 1's FFN on
    per_example = flops.method_flops(pruned.attn_tokens, pruned.ffn_tokens, tiny.config, pruned.selector_flops,
                                     pruned.lengths)
    assert per_example.shape == (5,) and flops.summarize(pruned, None, tiny.config, tiny.config)["flops_speedup"] > 1
    assert flops.summarize(full, None, tiny.config, tiny.config)["flops_speedup"] == pytest.approx(1.0)
    assert not tiny.training


def test_student_with_fewer_layers_is_measured_against_the_full_backbone(tiny):
    data = loader([[20, 10]])
    student_cfg = BertConfig(**{**tiny.config.to_dict(), "num_hidden_layers": 2})
    from transformers import BertForSequenceClassification
    student = BertForSequenceClassification(student_cfg).eval()
    result = run_eval(student, None, data, "cpu")
    assert result.attn_tokens.shape == (2, 2)
    record = flops.summarize(result, None, student.config, tiny.config)
    assert record["flops_speedup"] == pytest.approx(2.0, rel=0.01)
    assert set(record["flops_speedups"]) == set(flops.MODES)
    assert len(record["tokens_per_layer"]["attention"]) == 2 and len(record["baseline_tokens_per_layer"]["attention"]) == 4


def test_regression_predictions_are_floats():
    model = tiny_model(num_labels=1)
    result = run_eval(model, None, loader([[8, 6]], num_labels=1), "cpu")
    assert result.predictions.dtype.kind == "f" and result.predictions.shape == (2,)


# --- topk's knob ----------------------------------------------------------------------------------

LENGTHS = [12, 30, 64, 64, 45, 23, 7, 51, 38, 64]


@pytest.mark.parametrize("target", [1.0, 1.3, 1.8, 2.5])
def test_topk_knob_meets_its_target(tiny, target):
    f = calibrate_keep_fraction(LENGTHS, tiny.config, layer=1, target=target)
    base = flops.canonical_baseline(LENGTHS, tiny.config)

    def speedup(fraction):
        attn, ffn = topk_counts(LENGTHS, 4, 1, fraction)
        return flops.speedup(base, flops.canonical_flops(attn, ffn, tiny.config))

    assert speedup(f) >= target
    assert f == 1.0 or speedup(min(1.0, f + 1e-6)) < target, "the largest fraction that meets it"
    # the policy really produces the counts the calibration assumed
    data = loader([LENGTHS[:5], LENGTHS[5:]])
    result = run_eval(tiny, TopKPolicy(1, f), data, "cpu")
    assert flops.summarize(result, None, tiny.config, tiny.config)["flops_speedup"] == pytest.approx(speedup(f))


def test_topk_unreachable_target_is_a_user_error(tiny):
    with pytest.raises(UserError, match="cannot reach speedup=50") as err:
        calibrate_keep_fraction(LENGTHS, tiny.config, layer=1, target=50)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def fake_job(model, layer=1):
    cfg = OmegaConf.create({"method": {"name": "topk", "layer": layer}})
    return Job(cfg=cfg, splits={"calib": {"length": LENGTHS}}, tokenizer=None, backbone=model, backbone_key={},
               phases=None, device=torch.device("cpu"))


def test_topk_method(tiny):
    method = TopK(fake_job(tiny))
    method.fit(1.5)
    knob = method.calibrate(1.5)
    assert set(knob) == {"keep_fraction", "layer"} and knob["layer"] == 1 and 0 < knob["keep_fraction"] < 1
    model, policy = method.evaluated()
    assert isinstance(policy, TokenPolicy) and policy.keep_fraction == knob["keep_fraction"]
    assert model is tiny
    with pytest.raises(UserError, match="method.layer=7"):
        method = TopK(fake_job(tiny, layer=7))
        method.fit(1.5)
        method.calibrate(1.5)
