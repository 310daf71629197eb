"""Rationale agreement: the encoder's per-layer report of alive positions, the measures computed from
it (on a hand-made policy whose numbers are worked out below), a needle job's record, and the
analysis's table and figure."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from analysis import rationale as analysis
from helpers import job_config, tiny_model
from tokenprune import results
from tokenprune.encoder import Decision, TokenPolicy
from tokenprune.evaluate import run_eval
from tokenprune.rationale import MEASURES, RationaleAgreement, top_fraction_recall
from tokenprune.runner import run_job

CLS, SEP = 101, 102


class KeepPositions(TokenPolicy):
    """From layer 2 on, keeps only the original positions 0, 1, 2, 4, 5."""

    def before_layer(self, layer, state):
        if layer == 2:
            return Decision(keep=torch.isin(state.positions, torch.tensor([0, 1, 2, 4, 5])))
        return None


def two_examples():
    # example 0: 8 tokens, candidates 1..6, gold {2, 3}; example 1: 6 tokens, candidates 1..4, gold {1}
    ids = [[CLS, 2000, 2001, 2002, 2003, 2004, 2005, SEP], [CLS, 2010, 2011, 2012, 2013, SEP]]
    split = {"idx": [10, 11], "input_ids": ids, "rationale_tokens": [[2, 3], [1]]}
    input_ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
             "labels": torch.tensor([0, 1]), "idx": torch.tensor([10, 11])}
    return split, batch


@pytest.mark.parametrize("mode", ["gather", "mask"])
def test_agreement_per_layer_on_a_known_policy(mode):
    split, batch = two_examples()
    agreement = RationaleAgreement(split, [0, CLS, SEP], num_layers=4)
    run_eval(tiny_model(), KeepPositions(), [batch], "cpu", mode=mode, on_layer=agreement)
    summary = agreement.summary()
    assert summary["n_examples"] == 2
    layers = summary["per_layer"]
    # layers 0-1: everything alive. recall 1; precision 2/6 and 1/4; every non-gold token kept
    for layer in (0, 1):
        assert [layers[m][layer] for m in MEASURES] == pytest.approx([1, (2 / 6 + 1 / 4) / 2, (0.5 + 0.4) / 2, 1, 1], abs=1e-6)
    # layers 2-3: example 0 keeps {1, 2, 4, 5} (hits {2}), example 1 keeps {1, 2, 4} (hits {1})
    expected = {"recall": (0.5 + 1) / 2, "precision": (1 / 4 + 1 / 3) / 2, "f1": (1 / 3 + 1 / 2) / 2,
                "false_positive_rate": (3 / 4 + 2 / 3) / 2, "kept_fraction": (4 / 6 + 3 / 4) / 2}
    for layer in (2, 3):
        assert {m: layers[m][layer] for m in MEASURES} == pytest.approx(expected, abs=1e-6)
    assert summary["last_layer"] == {m: layers[m][-1] for m in MEASURES}


def test_examples_without_a_rationale_are_not_counted():
    split, batch = two_examples()
    split["rationale_tokens"][1] = []
    agreement = RationaleAgreement(split, [0, CLS, SEP], num_layers=4)
    run_eval(tiny_model(), KeepPositions(), [batch], "cpu", on_layer=agreement)
    assert agreement.summary()["n_examples"] == 1
    assert agreement.summary()["last_layer"]["recall"] == pytest.approx(0.5)
    assert RationaleAgreement({"idx": [], "input_ids": [], "rationale_tokens": []}, [CLS], 4).summary() is None


class SpecialIds:
    all_special_ids = [0, CLS, SEP]


def test_top_fraction_recall_by_hand():
    split, _ = two_examples()
    split = datasets.Dataset.from_dict(split)
    # example 0: candidates 1..6 ranked 3, 5, 2, 4, 1, 6 ([CLS] and [SEP] score highest and do not count)
    # example 1: candidates 1..4 ranked 4, 2, 3, 1 (its gold token last)
    rows = [(10, [100, 0.1, 0.5, 0.9, 0.2, 0.6, 0.0, 50]), (11, [9, 0.1, 0.3, 0.2, 0.4, 9]),
            (99, [1, 2, 3])]  # an example outside the split: not counted
    block = top_fraction_recall(split, SpecialIds(), rows)
    # top 10%: ceil(0.6) = 1 and ceil(0.4) = 1 tokens; top 25%: 2 and 1; top 50%: 3 and 2
    assert block["recall_at_top"] == {"0.1": 0.25, "0.25": 0.25, "0.5": 0.5} and block["n_examples"] == 2
    without = datasets.Dataset.from_dict({"idx": [10], "input_ids": [[CLS, 5, SEP]]})
    assert top_fraction_recall(without, SpecialIds(), rows) is None  # no gold rationales: no figure


SMALL_NEEDLE = ["task=needle", "task.synthetic.train=150", "task.synthetic.dev=32", "task.synthetic.min_tokens=64",
                "task.synthetic.max_tokens=96"]


def test_a_needle_job_records_rationale_agreement(tmp_path):
    record = run_job(job_config(tmp_path, *SMALL_NEEDLE, "method=topk", "speedup=2"), tmp_path / "topk")
    assert record["status"] == "ok", record["error"]
    block = results.read(tmp_path / "topk" / results.RECORD_NAME)["rationale"]
    assert block["n_examples"] == 32 and set(block["per_layer"]) == set(MEASURES)
    recall = block["per_layer"]["recall"]
    assert len(recall) == 4 and all(0 <= r <= 1 for r in recall)
    assert recall == sorted(recall, reverse=True)  # a dropped token never comes back
    assert block["per_layer"]["kept_fraction"][-1] < 0.9  # topk at 2x really dropped tokens
    assert json.dumps(block)  # plain JSON in the record
    sst2 = run_job(job_config(tmp_path, "task=wnli", "method=bert"), tmp_path / "wnli")
    assert sst2["status"] == "ok" and sst2["rationale"] is None  # no gold rationales: no block


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "powerbert", "trbert", "adapler"])
def test_every_pruning_method_records_rationale_agreement(tmp_path, method):
    record = run_job(job_config(tmp_path, *SMALL_NEEDLE, f"method={method}", "speedup=2"), tmp_path / method)
    assert record["status"] == "ok", record["error"]
    recall = record["rationale"]["per_layer"]["recall"]
    assert len(recall) == 4 and recall == sorted(recall, reverse=True) and record["rationale"]["last_layer"]["kept_fraction"] < 1
    if method in ("trbert", "adapler"):  # does the training signal, and the learned scores, rank the rationale first?
        blocks = record["learning"]["rationale_recall"]
        for block in blocks if method == "trbert" else [blocks]:
            for ranking in ("signal", "scores"):
                recall_at = block[ranking]["recall_at_top"]
                assert set(recall_at) == {"0.1", "0.25", "0.5"} and all(0 <= r <= 1 for r in recall_at.values())
                assert recall_at["0.1"] <= recall_at["0.25"] <= recall_at["0.5"]


def fake_record(method, target, seed, recall):
    per_layer = {m: list(recall) for m in MEASURES}
    return results.new_record(task="needle", method=method, model="tiny", seed=seed, speedup_target=target,
                              budget="smoke", status="ok", rationale={"n_examples": 10, "per_layer": per_layer})


def test_analysis_writes_the_recall_table_and_figure(tmp_path):
    runs = tmp_path / "runs"
    records = [fake_record("bert", 1.0, 1, [1, 1, 1]), fake_record("topk", 3.0, 1, [1, 0.8, 0.6]),
               fake_record("topk", 3.0, 2, [1, 0.6, 0.4]), fake_record("random", 3.0, 1, [0.5, 0.3, 0.3]),
               fake_record("random", 5.0, 1, [0.3, 0.2, 0.1])]
    for i, record in enumerate(records):
        results.write(record, runs / str(i))
    results.write(results.new_record(task="sst2", method="topk", seed=1, speedup_target=2.0, status="ok"), runs / "plain")
    assert analysis.main(["--results", str(runs), "--out", str(tmp_path / "out")]) == 0
    table = analysis.by_layer(results.load(runs))
    topk = table[(table.method == "topk")]
    assert list(topk.recall) == pytest.approx([1, 0.7, 0.5]) and set(topk.seeds) == {2}
    assert set(table.method) == {"bert", "topk", "random"} and len(table) == 5 * 3 - 3  # topk's two seeds: one row per layer
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {"rationale_needle.csv", "rationale_recall_needle.png", "rationale_recall_needle.pdf"}
    # one legend above the panels (a legend inside a panel hid its lines), naming every method once
    fig = analysis.recall_figure(table, "needle")
    assert [ax.get_legend() for ax in fig.axes] == [None, None] and len(fig.legends) == 1
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["Full model", "Random tokens", "Top-k attention"]


def test_analysis_without_rationale_blocks_says_so(tmp_path, capsys):
    results.write(results.new_record(task="sst2", method="topk", seed=1, speedup_target=2.0, status="ok"), tmp_path / "r")
    assert analysis.main(["--results", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "has a rationale block" in capsys.readouterr().err
