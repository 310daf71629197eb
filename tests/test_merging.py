"""Merging in the encoder loop (ToMe, PiToMe): a merge folds tokens into others by a size-weighted
average, sizes reach later attentions (proportional attention), a batch merges per example exactly as
each example alone, padding and [CLS] never take part, ratio 0 is the full model, restore unmerges,
and the FLOPs (tokens per layer plus the matching's similarity work) agree with torch's count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_encoder import make_batch, tiny_model
from test_flops import counted
from tokenprune import flops
from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy
from tokenprune.methods.pitome import PiToMePolicy
from tokenprune.methods.tome import MergePolicy, merge_counts


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def policies():
    return {"tome": lambda: MergePolicy([0, 1, 2, 3], 0.3), "pitome": lambda: PiToMePolicy([1, 2, 3], 0.3, 4),
            "tome_last": lambda: MergePolicy([3], 0.4)}


def test_ratio_zero_is_the_full_model_exactly(tiny):
    ids, mask, types = make_batch([20, 14, 9])
    with torch.no_grad():
        full = PrunableEncoder(tiny)(ids, mask, types).logits
        for policy in (MergePolicy([0, 1, 2, 3], 0.0), PiToMePolicy([0, 1, 2, 3], 0.0, 4)):
            assert torch.equal(PrunableEncoder(tiny, policy)(ids, mask, types).logits, full)


@pytest.mark.parametrize("name", ["tome", "pitome", "tome_last"])
def test_a_batch_merges_per_example_as_each_example_alone(tiny, name):
    lengths = [23, 9, 16, 4]
    ids, mask, types = make_batch(lengths)
    with torch.no_grad():
        batched = PrunableEncoder(tiny, policies()[name]())(ids, mask, types)
        for b, n in enumerate(lengths):
            alone = PrunableEncoder(tiny, policies()[name]())(ids[b:b + 1, :n], mask[b:b + 1, :n], types[b:b + 1, :n])
            torch.testing.assert_close(batched.logits[b:b + 1], alone.logits, atol=1e-5, rtol=0)
            assert torch.equal(batched.trace.attn_tokens[b], alone.trace.attn_tokens[0])
            assert torch.equal(batched.trace.ffn_tokens[b], alone.trace.ffn_tokens[0])
    assert (batched.trace.ffn_tokens[:, -1] < torch.tensor(lengths)).all(), "every example merged something"


@pytest.mark.parametrize("name", ["tome", "pitome"])
def test_counts_and_selector_flops_are_what_calibration_predicts(tiny, name):
    lengths = [23, 9, 16, 4, 2]
    ids, mask, types = make_batch(lengths)
    policy = policies()[name]()
    with torch.no_grad():
        trace = PrunableEncoder(tiny, policy)(ids, mask, types).trace
    attn, ffn, selector = merge_counts(lengths, 4, policy.layers, policy.ratio, 16, policy.kind)
    assert np.array_equal(trace.attn_tokens.numpy(), attn) and np.array_equal(trace.ffn_tokens.numpy(), ffn)
    np.testing.assert_allclose(trace.selector_flops.numpy(), selector)


class Record(TokenPolicy):
    """Merges given slots at layer 1 and records what later layers see."""

    def __init__(self, merge):
        super().__init__()
        self.merge, self.seen = merge, {}

    def after_attention(self, layer, state, probs):
        self.seen[layer] = (state.sizes, state.positions.clone(), state.hidden.clone(), state.mask.clone())
        if layer == 1:
            return Decision(merge=self.merge(state))
        return None


def test_a_merge_is_a_size_weighted_average_and_sizes_add_up(tiny):
    ids, mask, types = make_batch([10, 7])

    def merge(state):
        dest = torch.arange(10).expand(2, 10).clone()
        dest[0, 2], dest[0, 4], dest[1, 3] = 5, 5, 1  # row 0: 2 and 4 into 5; row 1: 3 into 1
        dest[1, 8] = 1  # padding: ignored
        dest[0, 0] = 5  # [CLS]: never merged
        return dest

    policy = Record(merge)
    with torch.no_grad():
        out = PrunableEncoder(tiny, policy)(ids, mask, types)
    sizes, positions, _, alive = policy.seen[2]
    assert sizes[0, :8].tolist() == [1, 1, 1, 3, 1, 1, 1, 1] and positions[0, :8].tolist() == [0, 1, 3, 5, 6, 7, 8, 9]
    assert sizes[1, :6].tolist() == [1, 2, 1, 1, 1, 1] and alive[1].sum() == 6
    assert out.trace.ffn_tokens[:, 1].tolist() == [8, 6] and out.trace.attn_tokens[:, 1].tolist() == [10, 7]


def test_merged_state_is_the_mean_of_its_sources(tiny):
    ids, mask, types = make_batch([9])
    seen = {}

    class Probe(TokenPolicy):
        def after_attention(self, layer, state, probs):
            if layer == 1:
                seen["h"] = state.hidden.clone()
                dest = torch.arange(9)[None].clone()
                dest[0, 3] = 6
                return Decision(merge=dest)
            return None

    captured = {}
    encoder = PrunableEncoder(tiny, Probe())
    hook = encoder.layers[1].intermediate.dense.register_forward_hook(lambda m, a, o: captured.update(x=a[0]))
    with torch.no_grad():
        encoder(ids, mask, types)
    hook.remove()
    h, x = seen["h"][0], captured["x"][0]
    assert x.shape[0] == 8
    torch.testing.assert_close(x[5], (h[3] + h[6]) / 2)  # slot 6 became slot 5 after slot 3 left
    torch.testing.assert_close(x[:3], h[:3])


def test_proportional_attention_counts_a_merged_key_as_its_sources(tiny):
    """A token of size 2 gets the attention weight of two identical keys: the encoder adds log 2."""
    ids, mask, types = make_batch([9])
    captured = {}

    class Two(TokenPolicy):
        def after_attention(self, layer, state, probs):
            if layer == 0:
                dest = torch.arange(9)[None].clone()
                dest[0, 3] = 4
                return Decision(merge=dest)
            return None

        def needs_attention(self, layer):
            return layer == 1

    class Spy(Two):
        def after_attention(self, layer, state, probs):
            if layer == 1:
                captured["probs"], captured["sizes"] = probs, state.sizes
            return super().after_attention(layer, state, probs)

    encoder = PrunableEncoder(tiny, Spy(), attention="eager")
    sa = tiny.bert.encoder.layer[1].attention.self
    # layer 1's input is layer 0's output (its last LayerNorm); inference computes Q, K, V in one
    # fused matmul, so a hook on sa.query would never fire
    hook = tiny.bert.encoder.layer[0].output.LayerNorm.register_forward_hook(lambda m, a, o: captured.update(x=o))
    with torch.no_grad():
        encoder(ids, mask, types)
        hook.remove()
        x = captured["x"][0]
        q = sa.query(x).view(8, 4, 16).transpose(0, 1)
        k = sa.key(x).view(8, 4, 16).transpose(0, 1)
        sizes = captured["sizes"][0]
        expected = (q @ k.transpose(1, 2) / 4 + torch.log(sizes)).softmax(-1)
    assert sizes.tolist() == [1, 1, 1, 2, 1, 1, 1, 1]
    torch.testing.assert_close(captured["probs"][0], expected)


def test_restore_gives_merged_positions_their_destination_state(tiny):
    ids, mask, types = make_batch([12, 8])
    with torch.no_grad():
        out = PrunableEncoder(tiny, MergePolicy([1, 2, 3], 0.4), restore=True)(ids, mask, types)
    assert out.hidden.shape[:2] == ids.shape and out.mask.equal(mask.bool())
    row = out.hidden[0]
    distinct = torch.unique(row.round(decimals=5), dim=0).shape[0]
    assert distinct < 12, "merged positions share their destination's final state"


def test_merge_runs_in_gather_mode_only(tiny):
    ids, mask, types = make_batch([10])
    with pytest.raises(ValueError, match="gather mode only"):
        PrunableEncoder(tiny, MergePolicy([1], 0.3), mode="mask")(ids, mask, types)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["tome", "pitome"])
def test_merging_flops_match_torch_flop_counter(tiny, name, attention):
    ids, _, _ = make_batch([33])
    total, trace = counted(tiny, policies()[name](), ids, attention)
    assert len(set(trace.ffn_tokens[0].tolist())) > 1
    assert float(trace.selector_flops[0]) > 0
    analytic = flops.canonical_flops(trace.attn_tokens, trace.ffn_tokens, tiny.config, trace.selector_flops)
    assert analytic[0] == pytest.approx(total, rel=0.01)


def test_pitome_protects_an_isolated_token_and_tome_matches_the_most_similar():
    from tokenprune.methods.pitome import pitome_merge
    from tokenprune.methods.tome import bipartite_merge
    features = torch.zeros(1, 8, 4)
    features[0, 1:7, 0] = 1.0  # six near-duplicates
    features[0, 1:7, 1] = torch.linspace(0, 0.1, 6)
    features[0, 7, 2] = 1.0  # an isolated token
    features[0, 0, 3] = 1.0  # [CLS]
    features = torch.nn.functional.normalize(features, dim=-1)
    alive = torch.ones(1, 8, dtype=torch.bool)
    dest = pitome_merge(features, alive, torch.tensor([3]), margin=0.9, alpha=1.0)
    moved = (dest[0] != torch.arange(8)).nonzero().flatten().tolist()
    assert len(moved) == 3 and 7 not in moved and 0 not in moved
    assert all(1 <= int(dest[0, i]) <= 6 for i in moved), "merged into a near-duplicate"
    dest = bipartite_merge(features, alive, torch.tensor([2]))
    moved = (dest[0] != torch.arange(8)).nonzero().flatten().tolist()
    assert len(moved) == 2 and all(i % 2 == 0 and i > 0 for i in moved) and all(int(dest[0, i]) % 2 == 1 for i in moved)
    assert set(dest[0, moved].tolist()) <= {1, 3, 5}, "never into the isolated token"
