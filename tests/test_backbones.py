"""The second and third backbone families: our loop reproduces HF's own forward on small random RoBERTa
and DistilBERT classifiers, with padding; any other architecture is refused with one sentence before
any training."""

from __future__ import annotations

import pytest
import torch
from transformers import (AlbertConfig, AlbertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

from helpers import job_config, make_batch
from tokenprune.backbones import family_of
from tokenprune.encoder import PrunableEncoder
from tokenprune.errors import UserError
from tokenprune.runner import run_job
from test_encoder import DropPositions


def small_roberta(num_labels: int = 2) -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=6000, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=80, type_vocab_size=1, pad_token_id=1,
                        num_labels=num_labels)
    return RobertaForSequenceClassification(cfg).eval()


def small_distilbert(num_labels: int = 2) -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=6000, dim=64, n_layers=3, n_heads=4, hidden_dim=128,
                           max_position_embeddings=80, num_labels=num_labels)
    return DistilBertForSequenceClassification(cfg).eval()


def roberta_batch(lengths):
    ids, mask, _ = make_batch(lengths)
    return ids.masked_fill(mask == 0, 1), mask  # RoBERTa pads with id 1 (its padding_idx)


@pytest.mark.parametrize("build", [small_roberta, small_distilbert], ids=["roberta", "distilbert"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_our_loop_matches_hf_forward(build, attention):
    model = build()
    ids, mask = roberta_batch([17, 9, 30])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        for mode in ("gather", "mask"):
            ours = PrunableEncoder(model, mode=mode, attention=attention)(ids, mask).logits
            torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_roberta_positions_count_real_tokens_only():
    """The same example alone and padded in a batch gets the same logits (positions from real tokens)."""
    model = small_roberta()
    ids, mask = roberta_batch([12, 25])
    with torch.no_grad():
        alone = PrunableEncoder(model)(ids[:1, :12], mask[:1, :12]).logits
        batched = PrunableEncoder(model)(ids, mask).logits
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("build", [small_roberta, small_distilbert], ids=["roberta", "distilbert"])
def test_gather_and_mask_agree_on_other_families(build):
    model = build()
    ids, mask = roberta_batch([20, 14])
    policy = lambda: DropPositions(after={0: lambda b, p: p % 3 == 1}, before={2: lambda b, p: p > 8})  # noqa: E731
    with torch.no_grad():
        gathered = PrunableEncoder(model, policy(), mode="gather")(ids, mask).logits
        masked = PrunableEncoder(model, policy(), mode="mask")(ids, mask).logits
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=0)


def test_albert_is_refused_with_one_sentence():
    model = AlbertForSequenceClassification(AlbertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                                         num_hidden_layers=1, embedding_size=16))
    with pytest.raises(UserError) as raised:
        family_of(model)
    message = str(raised.value)
    assert "runs BERT-style classifiers (BERT, RoBERTa, DistilBERT)" in message and "albert" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_tiny_roberta_config_builds_a_roberta_and_runs_a_job(tmp_path):
    cfg = job_config(tmp_path, "model=tiny_roberta", "task=sst2", "method=topk", "speedup=2")
    record = run_job(cfg, tmp_path / "job")
    assert record["status"] == "ok", record.get("error")
    assert record["model"] == "tiny_roberta"
    assert record["flops_speedup"] == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("build", [small_roberta, small_distilbert], ids=["roberta", "distilbert"])
def test_fine_tuning_loss_takes_a_bert_tokenizers_pair_batch(build):
    """HF's forward of RoBERTa (one token type) and DistilBERT (none) gets no token_type_ids from a
    BERT tokenizer's pair batch (types 0 and 1)."""
    from tokenprune.train import classification_loss
    model = build()
    ids, mask = roberta_batch([12, 8])
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    loss = classification_loss(model, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                                       "labels": torch.tensor([0, 1])})
    assert torch.isfinite(loss)


def test_tiny_roberta_runs_a_sentence_pair_task(tmp_path):
    cfg = job_config(tmp_path, "model=tiny_roberta", "task=mrpc", "method=tome", "speedup=1.5")
    record = run_job(cfg, tmp_path / "job")
    assert record["status"] == "ok", record.get("error")
    assert record["flops_speedup"] == pytest.approx(1.5, rel=0.1)
