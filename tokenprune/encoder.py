"""PrunableEncoder: the one forward loop over a BERT-style backbone's layers, with token policies.

The loop calls each layer's own sub-modules (Q/K/V projections, attention output, FFN), never HF's
`BertLayer.forward`, whose plumbing changes between transformers versions. A `TokenPolicy` plugs in
at two points of every layer i:

    (a) before_layer(i, state)           from the hidden states entering layer i (TR-BERT, AdapLeR);
    (b) after_attention(i, state, probs) after layer i's attention sub-layer (residual + LayerNorm),
                                         before its FFN, from that layer's attention probabilities
                                         (PoWER-BERT, LTP, LAT).

Both return a `Decision` or None. A decision can be hard (`keep`, a bool B×n mask), a merge (`merge`:
the slot each token folds into, ToMe/PiToMe; gather mode only) or soft: an
additive log-mask on the attention logits of keys (`key_logmask`, accumulated over the rest of the
forward) and/or a multiplicative mask on the hidden states (`hidden_scale`, applied once, there).
[CLS] is always kept: hard decisions never drop it and soft masks leave it untouched.

Two modes, same decisions:
    mask    shapes stay fixed; a hard-dropped token stops being attended to and its state is frozen
            at its last complete state (the input of the layer that dropped it). Training, soft removal.
    gather  dropped tokens are physically removed. Each row keeps its own tokens in their original
            order ([CLS] at index 0); rows shorter than the batch's longest kept count are padded and
            masked. Padding never survives a gather. `restore=True` scatters every dropped token's
            last state back to its original position, giving a full-length output.

Merging (ToMe's bipartite merge, decided by the policy, applied here): every token folded into another
is removed and its destination becomes the size-weighted average of itself and what it absorbed;
sizes add up and every later attention adds log(size) to each key's logits (proportional attention),
so a merged token counts as the tokens it stands for. Each example merges its own tokens; padding and
[CLS] never take part. With `restore=True` a merged-away token's position gets the final state of the
token it was folded into (ToMe's unmerge by sources).

Every forward returns the logits and a `Trace`: per example, the real tokens entering each layer's
attention and FFN, and the FLOPs the policy's own selector spent (see flops.py). An optional
`on_layer(layer, positions, alive)` callback sees, at every layer, which original positions are
still alive after that layer's decisions (entering its FFN), e.g. for rationale agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenprune.backbones import Family, LayerParts, family_of

MODES = ("mask", "gather")
ATTENTIONS = ("sdpa", "eager")


@dataclass
class TokenState:
    """What a policy sees at a plug-in point. All B×n tensors are over the current slots."""

    hidden: Tensor  # B×n×d: the layer's input at (a); the attention sub-layer's output at (b)
    mask: Tensor  # B×n bool: real tokens still in play (False: padding, or dropped earlier)
    positions: Tensor  # B×n long: each slot's original position in the input (0 is [CLS])
    lengths: Tensor  # B long: real input lengths
    key_logmask: Tensor | None  # B×n float: soft key mask accumulated so far (None: none yet)
    layer: int
    mode: str
    sizes: Tensor | None = None  # B×n float: input tokens each slot stands for (None: no merge yet, all 1)
    keys: Tensor | None = None  # at (b): B×H×n×d_h, this layer's attention keys (ToMe's matching features)
    # at (b), where the policy asked for it (`needs_significance`): B×n, the attention each key
    # received, averaged over heads, from real queries other than itself (PoWER-BERT's score; itself
    # included where the policy's `significance_with_self` says so: LTP's score)
    significance: Tensor | None = None


@dataclass
class Decision:
    """A policy's decision over the current slots (B×n). Every field is optional.

    keep:         bool, hard: False drops the token from here on ([CLS] and padding: ignored).
    key_logmask:  float, soft: added to the attention logits of these keys in this and every later
                  attention (at (b): from the next layer on); decisions add up (a product of masks).
    hidden_scale: float, soft: multiplies the hidden states now (at (a): the layer's input; at (b):
                  the FFN's input, so the FFN's residual carries it too).
    merge:        long, gather mode only: the slot each token folds into (itself: it stays). Folded tokens
                  go; a destination becomes the size-weighted average of itself and its sources.
                  [CLS], padding and destinations that are not alive real tokens are ignored.
    flops:        the selector's own FLOPs for this decision, per example (B,) or one number.
    """

    keep: Tensor | None = None
    merge: Tensor | None = None
    key_logmask: Tensor | None = None
    hidden_scale: Tensor | None = None
    flops: Tensor | float | None = None

    @classmethod
    def soft(cls, mask: Tensor, on: str = "keys", flops: Tensor | float | None = None, floor: float = -1e4) -> Decision:
        """A soft mask m in [0, 1] acting on the keys (log m on their logits), the hidden states (×m),
        or both. The log is floored (AdapLeR's −1e4) so m = 0 stays finite and differentiable."""
        if on not in ("keys", "hidden", "both"):
            raise ValueError(f"on must be 'keys', 'hidden' or 'both', not {on!r}")
        logmask = torch.log(mask).clamp_min(floor) if on in ("keys", "both") else None
        scale = mask if on in ("hidden", "both") else None
        return cls(key_logmask=logmask, hidden_scale=scale, flops=flops)


class TokenPolicy(nn.Module):
    """Base class of token policies: decides nothing. Subclasses override what they use.

    It is an nn.Module so learned selectors train through the encoder (their parameters are the
    encoder's, and `encoder.train()` reaches them). A policy may keep per-forward state (e.g. soft
    masks for a length loss): `start` is called at the beginning of every forward.
    """

    # `state.significance` counts the attention a token pays itself (LTP's score) or not (PoWER-BERT's)
    significance_with_self = False

    def start(self, state: TokenState) -> None:
        """Called once per forward, after the embeddings, before layer 0."""

    def decision_points(self, num_layers: int) -> tuple[tuple[int, str], tuple[int, str]]:
        """(first, last) plug-in points where this policy can decide anything, each (layer, "before" |
        "after"): `before_layer` or `after_attention` of that layer. A pass that only counts tokens
        (calibration) reuses the states entering the first point's layer, which no knob changes, and
        runs nothing past the last, after which the counts cannot change. Default: every point."""
        return (0, "before"), (num_layers - 1, "after")

    def needs_attention(self, layer: int) -> bool:
        """True where `after_attention` needs layer `layer`'s attention probabilities; only there are
        they computed (explicit softmax instead of the fused kernel)."""
        return False

    def needs_significance(self, layer: int) -> bool:
        """True where `after_attention` needs only the attention each token received
        (`state.significance`), not the probabilities: the encoder then computes attention a few
        heads at a time and keeps the column sums, never a B×H×n×n buffer (same matmuls, same FLOPs).
        Outside inference (grad enabled) the probabilities are computed and the score derived from them."""
        return False

    def before_layer(self, layer: int, state: TokenState) -> Decision | None:
        return None

    def after_attention(self, layer: int, state: TokenState, probs: Tensor | None) -> Decision | None:
        """`probs`: B×H×n×n softmax(QKᵀ/√d_h + mask), before attention dropout; None unless asked."""
        return None


@dataclass
class Trace:
    """Per-example token counts of one forward: what flops.py turns into FLOPs."""

    attn_tokens: Tensor  # B×L long: real tokens entering each layer's attention
    ffn_tokens: Tensor  # B×L long: real tokens entering each layer's FFN
    selector_flops: Tensor  # B float64: FLOPs of the policy's own selectors
    lengths: Tensor  # B long: real input lengths


@dataclass
class EncoderOutput:
    logits: Tensor  # B×C (C = 1: regression)
    trace: Trace
    hidden: Tensor  # last hidden states: B×n×d over the final slots; full length B×N×d in mask mode or with restore
    mask: Tensor  # B×n bool: slots of `hidden` holding tokens kept to the end (restore: the input's real tokens)
    positions: Tensor  # B×n long: original position of each slot of `hidden`


def backbone_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(base model, classifier) of a supported *ForSequenceClassification model (see backbones.py)."""
    return family_of(model).base(model), model.classifier


def check_runnable(model: nn.Module) -> None:
    """Raise a UserError for a model this loop cannot run (an architecture without a family adapter,
    or one missing a part the loop calls). Cheap on a model built on the meta device (no weights)."""
    family_of(model)


def received_attention(probs: Tensor, alive: Tensor, all_real: bool = False, with_self: bool = False) -> Tensor:
    """B×n: the attention each key receives from real queries other than itself (`with_self`: itself
    included), summed over the heads of `probs` (B×h×n×n); `all_real`: every query is real (no
    padding row to leave out)."""
    if all_real:
        columns = probs.sum((1, 2))
    else:  # summed over heads first: one B×n×n buffer, 1/h of probs
        columns = probs.sum(1).mul_(alive[:, :, None].to(probs.dtype)).sum(1)
    if with_self:
        return columns
    self_attention = (probs.diagonal(dim1=2, dim2=3) * alive[:, None, :].to(probs.dtype)).sum(1)
    return columns - self_attention


class _Tokens:
    """The token bookkeeping of one forward: which slots are alive, where they came from, the soft
    key mask, the selector FLOPs, the restore buffer, and the attention masks derived from them."""

    def __init__(self, alive: Tensor, lengths: Tensor, soft_dtype: torch.dtype):
        B, N = alive.shape
        self.alive = alive
        self.positions = torch.arange(N, device=alive.device).expand(B, N)
        self.lengths = lengths
        self.counts = lengths  # real tokens alive per example
        self.key_logmask: Tensor | None = None
        self.selector_flops = torch.zeros(B, dtype=torch.float64, device=alive.device)
        self.dropped = False  # a hard decision has dropped something (mask mode freezes those tokens)
        self.buffer: Tensor | None = None  # restore: B×(N+1)×d, the last column takes writes to ignore
        self.soft_dtype = soft_dtype
        self.sizes: Tensor | None = None  # B×n float once a token has been merged: proportional attention
        self.merged_into: Tensor | None = None  # restore: B×N long, a merged-away position's destination (-1: none)
        self._masks: dict = {}

    def changed(self) -> None:
        self._masks = {}

    def _all_alive(self) -> bool:
        if "all" not in self._masks:
            self._masks["all"] = bool(self.alive.all())
        return self._masks["all"]

    def sdpa_mask(self) -> Tensor | None:
        """None, a bool key mask, or (with soft masks or sizes) an additive one; B×1×1×n, broadcast over queries."""
        if self.key_logmask is not None or self.sizes is not None:
            return self.additive_mask()
        if "sdpa" not in self._masks:
            self._masks["sdpa"] = None if self._all_alive() else self.alive[:, None, None, :]
        return self._masks["sdpa"]

    def additive_mask(self) -> Tensor | None:
        if "add" not in self._masks:
            if self.key_logmask is None and self.sizes is None and self._all_alive():
                mask = None
            else:
                soft = 0.0 if self.key_logmask is None else self.key_logmask.to(self.soft_dtype)
                if self.sizes is not None:  # proportional attention: a key of size s counts s times
                    soft = soft + torch.log(self.sizes).to(self.soft_dtype)
                # -inf, not a large negative: a dropped key then gets exactly zero weight, as after a gather
                mask = torch.where(self.alive, soft, float("-inf")).to(self.soft_dtype)[:, None, None, :]
            self._masks["add"] = mask
        return self._masks["add"]

    def state(self, layer: int, hidden: Tensor, mode: str, keys: Tensor | None = None,
              significance: Tensor | None = None) -> TokenState:
        return TokenState(hidden, self.alive, self.positions, self.lengths, self.key_logmask, layer, mode,
                          self.sizes, keys, significance)

    def merge(self, dest: Tensor, hidden: Tensor) -> Tensor:
        """Fold every alive token whose `dest` is another alive slot into that slot (size-weighted average,
        sizes add), then gather the survivors. One level: a destination does not itself move."""
        B, n = dest.shape
        if B == 1 and self._all_alive():
            return self._merge_one(dest[0].long(), hidden)
        slots = torch.arange(n, device=dest.device).expand(B, n)
        dest = dest.long()
        target_alive = self.alive.gather(1, dest.clamp(0, n - 1))
        moves = self.alive & target_alive & (dest != slots) & (dest >= 0) & (dest < n)
        moves[:, 0] = False  # [CLS] is never merged away
        dest = torch.where(moves, dest, slots)
        stays = ~moves
        dest = torch.where(stays.gather(1, dest), dest, slots)  # a destination that moves itself: no chain
        moves = dest != slots
        if not bool(moves.any()):
            return hidden
        sizes = self.sizes if self.sizes is not None else hidden.new_ones(B, n, dtype=torch.float32)
        sizes = sizes * self.alive  # padding weighs nothing
        weights = sizes.to(hidden.dtype)[..., None]
        total = torch.zeros_like(hidden).scatter_add_(1, dest[..., None].expand_as(hidden), hidden * weights)
        new_sizes = torch.zeros_like(sizes).scatter_add_(1, dest, sizes)
        merged = total / new_sizes.clamp_min(1e-12).to(hidden.dtype)[..., None]
        hidden = torch.where(moves.any(1)[:, None, None] & ~moves[..., None], merged, hidden)
        hidden = torch.where(self.alive[..., None], hidden, hidden.new_zeros(()))  # padding stays inert
        self.sizes = torch.where(self.alive, new_sizes, torch.ones_like(new_sizes))
        if self.merged_into is not None:
            rows, cols = moves.nonzero(as_tuple=True)
            self.merged_into[rows, self.positions[rows, cols]] = self.positions[rows, dest[rows, cols]]
        return self.gather(self.alive & ~moves, hidden)

    def _merge_one(self, dest: Tensor, hidden: Tensor) -> Tensor:
        """`merge` for one row without padding (batch 1 after the first gather): the same arithmetic in
        fewer operations, since per-layer overhead is what batch-1 latency pays for."""
        n = dest.shape[0]
        slots = torch.arange(n, device=dest.device)
        dest = dest.clamp(0, n - 1)
        dest[0] = 0  # [CLS] is never merged away
        dest = torch.where(dest.index_select(0, dest) == dest, dest, slots)  # a destination that moves itself: no chain
        kept = (dest == slots).nonzero().squeeze(1)
        if kept.shape[0] == n:
            return hidden
        sizes = self.sizes[0] if self.sizes is not None else hidden.new_ones(n, dtype=torch.float32)
        row = hidden[0]
        total = torch.zeros_like(row).index_add_(0, dest, row * sizes.to(row.dtype)[:, None])
        new_sizes = torch.zeros_like(sizes).index_add_(0, dest, sizes)
        if self.merged_into is not None:
            moved = (dest != slots).nonzero().squeeze(1)
            self.merged_into[0, self.positions[0, moved]] = self.positions[0, dest[moved]]
        new_sizes = new_sizes.index_select(0, kept)
        hidden = (total.index_select(0, kept) / new_sizes.to(row.dtype)[:, None])[None]
        K = kept.shape[0]
        self.sizes = new_sizes[None]
        self.positions = self.positions.index_select(1, kept)
        if self.key_logmask is not None:
            self.key_logmask = self.key_logmask.index_select(1, kept)
        self.alive = self.alive.new_ones(1, K)
        self.counts = self.counts.new_full((1,), K)
        self.changed()
        return hidden

    def unmerge(self, full: Tensor) -> Tensor:
        """Restore: every merged-away position takes the state of the token it was (finally) folded into."""
        owner = torch.arange(full.shape[1], device=full.device).expand_as(self.merged_into)
        for _ in range(full.shape[1]):
            step = self.merged_into.gather(1, owner)
            nxt = torch.where(step >= 0, step, owner)
            if torch.equal(nxt, owner):
                break
            owner = nxt
        return full.gather(1, owner[..., None].expand_as(full))

    def save_last_states(self, last: Tensor) -> None:
        """Restore: write the alive slots' states at their original positions (survivors are written
        again later, so only the dropped ones' writes last)."""
        N = self.buffer.shape[1] - 1
        index = torch.where(self.alive, self.positions, N)
        self.buffer.scatter_(1, index[..., None].expand(-1, -1, last.shape[-1]), last)

    def gather(self, keep: Tensor, hidden: Tensor) -> Tensor:
        """Physically keep the `keep` slots of every row, in their order; rows padded to the longest."""
        B, n = keep.shape
        counts = keep.sum(1)
        self.counts = counts
        self.changed()
        K = int(counts.max())
        if K == n:  # the longest row keeps everything: no column can go, the dropped are only masked
            self.alive = keep
            return hidden
        if B == 1:
            index = keep[0].nonzero().T
            self.alive = keep.new_ones(1, K)
        else:
            # a stable sort puts each row's kept slots first, in their original order
            index = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :K]
            self.alive = torch.arange(K, device=keep.device) < counts[:, None]
        self.positions = self.positions.gather(1, index)
        if self.key_logmask is not None:
            self.key_logmask = self.key_logmask.gather(1, index)
        if self.sizes is not None:
            self.sizes = self.sizes.gather(1, index)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


class PrunableEncoder(nn.Module):
    """A HF *ForSequenceClassification model of a supported family (BERT, RoBERTa, DistilBERT) run by our own layer loop, with a token policy.

    embeddings → layers (with the policy's decisions) → pooler → dropout → classifier: the model's
    own head, so logits are the model's (C = 1: a regression head). `attention="eager"` computes every
    layer's attention explicitly (e.g. for FLOP counting); otherwise sdpa is used except where the
    policy asks for probabilities.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: TokenPolicy | None = None,
        mode: str = "gather",
        restore: bool = False,
        attention: str = "sdpa",
        on_layer: Callable[[int, Tensor, Tensor], None] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
        self.family: Family = family_of(model)  # fail early on a model this loop cannot run
        self.model = model  # the one registered copy of its weights (state_dict and parameters)
        self.policy = policy
        self.mode = mode
        self.restore = restore
        self.attention = attention
        self.on_layer = on_layer  # observer: (layer, positions B×n, alive B×n) after the layer's decisions
        self.training = model.training  # start in the model's mode (a new Module would say "train")
        # a profiler (experiments/bench_methods.py): `sections.mark(name)` charges the time since the
        # previous mark to `name`; None (the default) costs one test per mark
        self.sections = None

    @property
    def base(self) -> nn.Module:
        return self.family.base(self.model)

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        entering: tuple[int, Tensor] | None = None,
        counts_only: bool = False,
    ) -> EncoderOutput:
        """The forward. Two options for passes that only count tokens (a calibration's search, where
        one policy's knob changes between passes over the same batches):
        entering=(k, states): start at layer k from `states_entering(k, ...)` of the same batch; the
            policy must decide nothing before layer k (its `decision_points`), so those states are
            what the full forward would compute there.
        counts_only: only the trace is wanted. No layer past the policy's last decision point runs
            (the counts cannot change after it) and `logits` is None."""
        return self._run(input_ids, attention_mask, token_type_ids, entering=entering, counts_only=counts_only)

    def states_entering(self, layer: int, input_ids: Tensor, attention_mask: Tensor | None = None,
                        token_type_ids: Tensor | None = None) -> Tensor:
        """The hidden states entering `layer` (after the padding columns no row needs are gone), for
        `forward(..., entering=(layer, states))`: with the policy's own attention path, which must
        decide nothing before `layer`."""
        return self._run(input_ids, attention_mask, token_type_ids, stop_before=layer)

    def _run(self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None, *,
             entering: tuple[int, Tensor] | None = None, counts_only: bool = False,
             stop_before: int | None = None):
        B, N = input_ids.shape
        alive = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        lengths = alive.sum(1)
        family = self.family
        policy, gather = self.policy, self.mode == "gather"
        partial = entering is not None or counts_only or stop_before is not None
        if partial and (self.restore or self.on_layer is not None):
            raise ValueError("entering, counts_only and states_entering are for counting passes: "
                             "not with restore or on_layer")
        layers = [family.parts(layer) for layer in family.layers(self.model)]
        L = len(layers)
        mark = self.sections.mark if self.sections is not None else None
        start = 0
        if entering is None:
            hidden = family.embed(self.model, input_ids, alive, token_type_ids)
        else:
            start, hidden = entering
        tokens = _Tokens(alive, lengths, hidden.dtype)

        if gather and self.restore:
            tokens.buffer = torch.cat([hidden, hidden.new_zeros(B, 1, hidden.shape[-1])], dim=1)
            tokens.merged_into = torch.full((B, N), -1, dtype=torch.long, device=hidden.device)
        if gather and int(lengths.max()) < N:  # padding columns no row needs: gone before layer 0
            if entering is None:
                hidden = tokens.gather(alive, hidden)
            else:  # the states entering layer `start` are past this gather already: its bookkeeping only
                tokens.gather(alive, hidden.new_empty(B, N, 0))
        if policy is not None:
            policy.start(tokens.state(start, hidden, self.mode))
        mark and mark("embeddings")

        first_point, last_point = policy.decision_points(L) if policy is not None else (None, None)
        if entering is not None and policy is not None and first_point[0] < start:
            raise ValueError(f"the policy can decide before layer {start}: a pass cannot start there")
        stop, decided = None, False
        if counts_only:
            if policy is None:  # nothing can change: the counts are the lengths
                counts = lengths[:, None].expand(B, L)
                return EncoderOutput(None, Trace(counts, counts, tokens.selector_flops, lengths),
                                     hidden, tokens.alive, tokens.positions)
            stop = last_point
        # no decision before `start`: every earlier layer processed what entered layer `start`
        attn_counts, ffn_counts = [tokens.counts] * start, [tokens.counts] * start
        with_self = policy is not None and policy.significance_with_self
        for i in range(start, L if stop_before is None else stop_before):
            layer = layers[i]
            if policy is not None:
                decision = policy.before_layer(i, tokens.state(i, hidden, self.mode))
                mark and mark("selector")
                if decision is not None:
                    decided = True
                    hidden = self._apply_decision(tokens, decision, hidden)
                    mark and mark("gather")
            attn_counts.append(tokens.counts)
            if stop == (i, "before"):
                break
            need_probs = policy is not None and policy.needs_attention(i)
            need_sig = policy is not None and policy.needs_significance(i)
            h, probs, keys, sig = self._attention(layer, hidden, tokens, need_probs, need_sig, with_self)
            mark and mark("attention")
            if policy is not None:
                decision = policy.after_attention(i, tokens.state(i, h, self.mode, keys, sig), probs)
                del probs, keys  # B×H×n×n: free it before the FFN allocates
                mark and mark("selector")
                if decision is not None:
                    decided = True
                    h = self._apply_decision(tokens, decision, h, hidden)
                    mark and mark("gather")
            ffn_counts.append(tokens.counts)
            if stop == (i, "after"):
                break
            if self.on_layer is not None:
                self.on_layer(i, tokens.positions, tokens.alive)
            out = self._ffn(layer, h)
            if not gather and tokens.dropped:
                # mask mode: a dropped token keeps its last complete state, as restore does after a gather
                out = torch.where(tokens.alive[..., None], out, hidden)
            hidden = out
            mark and mark("ffn")
        if stop_before is not None:
            if decided:
                raise ValueError(f"the policy decided before layer {stop_before}: the states entering it "
                                 "depend on its knob, so they cannot be reused")
            return hidden

        if counts_only:  # past the last decision point nothing changes: every later layer gets what is left
            ffn_counts += [tokens.counts] * (len(attn_counts) - len(ffn_counts))
            attn_counts += [tokens.counts] * (L - len(attn_counts))
            ffn_counts += [tokens.counts] * (L - len(ffn_counts))
            trace = Trace(torch.stack(attn_counts, 1), torch.stack(ffn_counts, 1), tokens.selector_flops, lengths)
            return EncoderOutput(None, trace, hidden, tokens.alive, tokens.positions)

        logits = family.head(self.model, hidden)
        mark and mark("head")

        if policy is None:  # nothing can have changed: the counts are the lengths
            attn = ffn = lengths[:, None].expand(B, L)
        else:
            attn, ffn = torch.stack(attn_counts, 1), torch.stack(ffn_counts, 1)
        trace = Trace(attn, ffn, tokens.selector_flops, lengths)
        if gather and self.restore:
            tokens.save_last_states(hidden)
            full = tokens.buffer[:, :N]
            if bool((tokens.merged_into >= 0).any()):
                full = tokens.unmerge(full)
            return EncoderOutput(logits, trace, full, alive, torch.arange(N, device=alive.device).expand(B, N))
        return EncoderOutput(logits, trace, hidden, tokens.alive, tokens.positions)

    def _apply_decision(self, tokens: _Tokens, decision: Decision, hidden: Tensor, last: Tensor | None = None) -> Tensor:
        """Apply a decision to `hidden` (the states the policy saw). `last` holds each token's last
        complete state, the layer's input, which restore and mask mode keep for a dropped token;
        None before a layer, where that is `hidden` itself (after any soft scaling)."""
        B = hidden.shape[0]
        if decision.flops is not None:
            tokens.selector_flops = tokens.selector_flops + torch.as_tensor(
                decision.flops, dtype=torch.float64, device=hidden.device)
        if decision.hidden_scale is not None:
            scale = torch.cat([decision.hidden_scale.new_ones(B, 1), decision.hidden_scale[:, 1:]], dim=1)
            hidden = hidden * scale[..., None].to(hidden.dtype)
        if last is None:
            last = hidden
        if decision.key_logmask is not None:
            logmask = torch.cat([decision.key_logmask.new_zeros(B, 1), decision.key_logmask[:, 1:]], dim=1)
            tokens.key_logmask = logmask if tokens.key_logmask is None else tokens.key_logmask + logmask
            tokens.changed()
        if decision.merge is not None:
            if self.mode != "gather":
                raise ValueError("a merge decision runs in gather mode only (mode='gather')")
            if self.restore:
                tokens.save_last_states(last)
            hidden = tokens.merge(decision.merge, hidden)
        if decision.keep is not None:
            keep = decision.keep.bool() & tokens.alive
            keep[:, 0] = True
            if self.mode == "gather":
                if self.restore:
                    tokens.save_last_states(last)
                hidden = tokens.gather(keep, hidden)
            else:
                tokens.alive = keep
                tokens.counts = keep.sum(1)
                tokens.dropped = True
                tokens.changed()
        return hidden

    def _attention(
        self, layer: LayerParts, x: Tensor, tokens: _Tokens, need_probs: bool, need_significance: bool = False,
        with_self: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(the attention sub-layer's output, the probabilities if asked, the keys (ToMe's matching
        features), the significance if asked)."""
        B, n, _ = x.shape
        heads, head_dim = layer.heads, layer.head_dim
        grad = torch.is_grad_enabled()
        q, k, v = (self._fused_qkv(layer, x) if not grad else (layer.query(x), layer.key(x), layer.value(x)))
        q = q.view(B, n, heads, head_dim).transpose(1, 2)
        k = k.view(B, n, heads, head_dim).transpose(1, 2)
        v = v.view(B, n, heads, head_dim).transpose(1, 2)
        scale = head_dim**-0.5
        probs = sig = None
        if (need_significance and not need_probs and not grad and self.attention == "sdpa" and x.device.type == "cpu"
                and B * heads * n * n * q.element_size() > self.SIGNIFICANCE_CHUNK_BYTES):
            context, sig = self._attention_significance(q * scale, k, v, tokens, with_self)
        elif need_probs or need_significance or self.attention == "eager":
            scores = torch.matmul(q * scale, k.transpose(-1, -2))  # scaling q is n×d work, not n²
            mask = tokens.additive_mask()
            if grad:
                probs = (scores if mask is None else scores + mask).softmax(-1)
            else:  # in place: one B×H×n×n buffer, not two (big transient buffers cost page faults on CPU)
                if mask is not None:
                    scores += mask
                probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            context = torch.matmul(layer.attn_dropout(probs), v)
            if need_significance:
                sig = received_attention(probs, tokens.alive, with_self=with_self) / heads
        else:
            p = layer.attn_dropout.p if layer.attn_dropout.training else 0.0  # the layer's own mode, as its dropout modules
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens.sdpa_mask(), dropout_p=p, scale=scale)
        context = context.transpose(1, 2).reshape(B, n, heads * head_dim)
        h = layer.attn_norm(layer.attn_out_dropout(layer.attn_out(context)) + x)
        return h, (probs if need_probs else None), k, sig


    def _fused_qkv(self, layer: LayerParts, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference: Q, K and V from one matmul with the three projections' weights stacked (one
        kernel instead of three: the per-layer fixed cost that short inputs pay). The stacked copy is
        kept per layer and rebuilt when a weight changes (their version counters)."""
        parts = (layer.query, layer.key, layer.value)
        if any(type(p) is not nn.Linear for p in parts):
            return layer.query(x), layer.key(x), layer.value(x)
        tensors = [t for p in parts for t in (p.weight, p.bias) if t is not None]
        if any(t.is_inference() for t in tensors):  # no version counter to tell a change by
            return layer.query(x), layer.key(x), layer.value(x)
        stamp = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        cache = self.__dict__.setdefault("_qkv_cache", {})
        entry = cache.get(id(layer.query))  # LayerParts are rebuilt per forward; the modules are not
        if entry is None or entry[0] != stamp:
            weight = torch.cat([p.weight for p in parts]).detach()
            bias = torch.cat([p.bias for p in parts]).detach() if all(p.bias is not None for p in parts) else None
            entry = cache[id(layer.query)] = (stamp, weight, bias)
        return F.linear(x, entry[1], entry[2]).split([p.out_features for p in parts], dim=-1)

    # bytes of attention probabilities computed at once by `_attention_significance`: a few heads of
    # a row, small enough to stay in cache (a B×H×n×n buffer at 512 tokens is tens of MB); a whole
    # B×H×n×n buffer no larger is computed at once (short inputs: one matmul, no per-row loop)
    SIGNIFICANCE_CHUNK_BYTES = 4 << 20

    def _attention_significance(self, q: Tensor, k: Tensor, v: Tensor, tokens: _Tokens,
                                with_self: bool = False) -> tuple[Tensor, Tensor]:
        """Explicit attention a few heads of one row at a time (inference on CPU, where a big transient
        buffer costs page faults and cache misses; a GPU takes the one-buffer path): the context and
        each key's significance (`received_attention`), with no B×H×n×n buffer. The same matmuls as
        one batched explicit attention, so the same FLOPs."""
        B, H, n, _ = q.shape
        heads = max(1, min(H, self.SIGNIFICANCE_CHUNK_BYTES // max(1, n * n * q.element_size())))
        mask = tokens.additive_mask()
        alive = tokens.alive
        context = torch.empty_like(q)
        sig = q.new_zeros(B, n)
        for b in range(B):
            real = alive[b]
            full_row = mask is None  # no padding and nothing masked: every query is real
            for h0 in range(0, H, heads):
                scores = torch.matmul(q[b, h0:h0 + heads], k[b, h0:h0 + heads].transpose(-1, -2))
                if mask is not None:
                    scores += mask[b]
                probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
                torch.matmul(probs, v[b, h0:h0 + heads], out=context[b, h0:h0 + heads])
                sig[b] += received_attention(probs[None], real[None], full_row, with_self)[0]
        return context, sig / H
    @staticmethod
    def _ffn(layer: LayerParts, h: Tensor) -> Tensor:
        return layer.ffn_norm(layer.ffn_dropout(layer.ffn_out(layer.act(layer.ffn_in(h)))) + h)
