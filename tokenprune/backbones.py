"""Backbone families: what the encoder loop needs to know of each architecture it runs.

A family adapter says how a *ForSequenceClassification model of that architecture embeds its input,
where each layer's attention (Q, K, V, output projection) and FFN parts live, and how its head turns
the final [CLS] state into logits. `tokenprune/encoder.py`'s single loop runs every family through
`LayerParts`, so a method works on all of them unchanged.

Supported: BERT (and MiniLM, a BERT), RoBERTa and DistilBERT.

- BERT: word + position + token-type embeddings; post-LN layers; pooler (dense + tanh) on [CLS], dropout,
  a linear classifier.
- RoBERTa: BERT's layers, but position ids start after the padding index (padding_idx + 1 for the
  first real token, counted over real tokens only, padding itself at padding_idx) and a single token
  type; the head (dropout, dense, tanh, dropout, out_proj) reads <s> directly, without a pooler.
- DistilBERT: word + position embeddings (no token types); attention without a dropout after its
  output projection; head: pre_classifier + ReLU on [CLS], dropout, classifier.

Any other architecture is refused by `family_of` with one sentence, before any training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from tokenprune.errors import UserError


@dataclass
class LayerParts:
    """One layer's parts, as the loop calls them: attention, then FFN, each post-LN with a residual."""

    query: nn.Module
    key: nn.Module
    value: nn.Module
    heads: int
    head_dim: int
    attn_dropout: nn.Module  # on the attention probabilities
    attn_out: nn.Module  # output projection
    attn_out_dropout: nn.Module
    attn_norm: nn.Module
    ffn_in: nn.Module
    act: Callable[[Tensor], Tensor]
    ffn_out: nn.Module
    ffn_dropout: nn.Module
    ffn_norm: nn.Module


class Family:
    """A family adapter; the BERT family itself (RoBERTa and DistilBERT override what differs)."""

    name = "bert"
    model_types: tuple[str, ...] = ("bert",)
    token_types = True  # whether HF's forward takes token_type_ids that mean something
    # attributes of the *ForSequenceClassification model every family needs (checked on the meta device)
    required: tuple[str, ...] = ("embeddings", "encoder.layer", "pooler")

    def base(self, model: nn.Module) -> nn.Module:
        return getattr(model, model.base_model_prefix)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).encoder.layer

    def embeddings(self, model: nn.Module) -> nn.Module:
        return self.base(model).embeddings

    def embed(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None) -> Tensor:
        return self.embeddings(model)(input_ids=input_ids, token_type_ids=token_type_ids)

    def parts(self, layer: nn.Module) -> LayerParts:
        sa, out = layer.attention.self, layer.attention.output
        return LayerParts(sa.query, sa.key, sa.value, sa.num_attention_heads, sa.attention_head_size, sa.dropout,
                          out.dense, out.dropout, out.LayerNorm, layer.intermediate.dense,
                          layer.intermediate.intermediate_act_fn, layer.output.dense, layer.output.dropout,
                          layer.output.LayerNorm)

    def head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        """Logits from the final states (B×n×d, [CLS] at slot 0)."""
        base = self.base(model)
        pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
        return model.classifier(model.dropout(pooled))

    def check(self, model: nn.Module) -> None:
        """Every part the loop calls exists (cheap on a model built on the meta device)."""
        base = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if base is None or not hasattr(base, "embeddings") or not hasattr(model, "classifier"):
            raise _refused(model)
        for layer in self.layers(model):
            self.parts(layer)


class RobertaFamily(Family):
    name = "roberta"
    model_types = ("roberta",)
    token_types = False  # one type; a BERT tokenizer's pair types (1) would index past its table

    def embed(self, model, input_ids, attention_mask, token_type_ids):
        embeddings = self.embeddings(model)
        real = attention_mask.long()
        # fairseq's positions: real tokens count from padding_idx + 1, padding sits at padding_idx
        positions = torch.cumsum(real, dim=1) * real + embeddings.padding_idx
        return embeddings(input_ids=input_ids, position_ids=positions)

    def head(self, model, hidden):
        return model.classifier(hidden)  # RobertaClassificationHead reads slot 0 itself


class DistilBertFamily(Family):
    name = "distilbert"
    model_types = ("distilbert",)
    token_types = False  # its forward takes none

    def layers(self, model):
        return self.base(model).transformer.layer

    def embed(self, model, input_ids, attention_mask, token_type_ids):
        return self.embeddings(model)(input_ids=input_ids)

    def parts(self, layer):
        sa, ffn = layer.attention, layer.ffn
        return LayerParts(sa.q_lin, sa.k_lin, sa.v_lin, sa.n_heads, sa.attention_head_size, sa.dropout,
                          sa.out_lin, nn.Identity(), layer.sa_layer_norm, ffn.lin1, ffn.activation, ffn.lin2,
                          ffn.dropout, layer.output_layer_norm)

    def head(self, model, hidden):
        pooled = torch.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))

    def check(self, model):
        base = getattr(model, "distilbert", None)
        if base is None or not hasattr(base, "embeddings") or not hasattr(model, "pre_classifier"):
            raise _refused(model)
        for layer in self.layers(model):
            self.parts(layer)


FAMILIES: tuple[Family, ...] = (Family(), RobertaFamily(), DistilBertFamily())


def supported() -> str:
    return ", ".join(f.name for f in FAMILIES)


def _refused(model: nn.Module) -> UserError:
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return UserError(
        f"The prunable encoder runs BERT-style classifiers (BERT, RoBERTa, DistilBERT), and this model is {kind} "
        f"({type(model).__name__}): choose a model of one of those architectures (model.path)."
    )


def hf_inputs(model: nn.Module, batch: dict, names=("input_ids", "attention_mask", "token_type_ids")) -> dict:
    """The batch's inputs for HF's own forward of `model`: token types only where the family has them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    drop = {"token_type_ids"} if any(model_type in f.model_types and not f.token_types for f in FAMILIES) else set()
    return {k: batch[k] for k in names if k in batch and k not in drop}


def family_of(model: nn.Module) -> Family:
    """The adapter of this *ForSequenceClassification model, or a UserError saying what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            try:
                family.check(model)
            except AttributeError:
                raise _refused(model) from None
            return family
    raise _refused(model)
