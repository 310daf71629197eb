"""Tasks with gold rationales: the synthetic needle task and the ERASER reader (on a fixture written
here), down to the token positions `encode` gives the rationale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tokenprune.data import encode, load_splits
from tokenprune.data.synthetic import MODIFIER, NEGATIVE, POSITIVE, generate_splits
from tokenprune.errors import UserError
from tokenprune.fingerprint import job_inputs
from tokenprune.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def task_cfg(name: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(REPO / "conf" / "task" / f"{name}.yaml"), overrides)


def small_needle(**synthetic):
    return task_cfg("needle", synthetic={"train": 120, "dev": 40, **synthetic})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.create({"tokenizer": None, "path": None}))


def budget(max_train=None, max_calib=16, max_dev=None):
    return OmegaConf.create({"max_train": max_train, "max_calib": max_calib, "max_dev": max_dev})


def test_needle_is_generated_from_its_config_alone(tokenizer, tmp_path):
    task = small_needle()
    # data.root that does not exist and the hub source play no part
    data = OmegaConf.create({"source": "hub", "root": str(tmp_path / "nothing")})
    first = load_splits(task, data, budget(max_train=50), seed=1)
    again = load_splits(task, data, budget(max_train=50), seed=1)
    assert {k: len(v) for k, v in first.items()} == {"train": 50, "calib": 16, "dev": 40}
    assert first["dev"]["text_a"] == again["dev"]["text_a"] and first["train"]["idx"] == again["train"]["idx"]
    other = generate_splits(small_needle(seed=5))
    assert other["dev"]["text_a"] != generate_splits(task)["dev"]["text_a"]


def test_needle_labels_follow_the_keyword_and_its_modifier(tokenizer):
    task = small_needle(dev=200)
    dev = encode(generate_splits(task)["dev"], tokenizer, task.max_length)
    names = dev.features["label"].names
    assert set(dev["label"]) == {0, 1}
    negated = distracted = 0
    for row in dev:
        assert 64 <= row["length"] <= 512  # every word is one token
        gold = tokenizer.convert_ids_to_tokens([row["input_ids"][i] for i in row["rationale_tokens"]])
        keyword = gold[-1]
        assert keyword in POSITIVE + NEGATIVE and gold[:-1] in ([], [MODIFIER])
        assert row["rationale_tokens"] == list(range(row["rationale_tokens"][-1] - len(gold) + 1, row["rationale_tokens"][-1] + 1))
        positive = (keyword in POSITIVE) != (len(gold) == 2)
        assert names[row["label"]] == ("positive" if positive else "negative")
        negated += len(gold) == 2
        tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
        distracted += tokens.count(MODIFIER) > len(gold) - 1
    # neither the modifier nor a bare "not" decides: both occur about half the time
    assert 70 < negated < 130 and 70 < distracted < 130


def test_without_distractors_every_not_is_a_modifier(tokenizer):
    dev = generate_splits(small_needle(distractor=0))["dev"]
    for text, spans in zip(dev["text_a"], dev["rationale"]):
        assert text.split().count(MODIFIER) == len(spans) - 1


@pytest.mark.parametrize("change, says", [
    ({"synthetic": {"distractor": 1.5}}, "task.synthetic.distractor=1.5"),
    ({"synthetic": {"dev": 0}}, "task.synthetic.dev=0"),
    ({"synthetic": {"max_tokens": 32}}, "task.synthetic.max_tokens=32"),
    ({"synthetic": {"max_tokens": 600}}, "exceeds its max_length=512"),
    ({"labels": ["a", "b"]}, "labels are [negative, positive]"),
])
def test_a_bad_synthetic_config_gets_one_sentence(change, says):
    with pytest.raises(UserError, match=says.replace("[", r"\[").replace("]", r"\]")):
        load_splits(OmegaConf.merge(small_needle(), change), OmegaConf.create({"source": "local", "root": "."}),
                    budget(), seed=1)


def test_a_synthetic_task_has_no_data_inputs(tmp_path):
    cfg = OmegaConf.create({"cache_dir": str(tmp_path), "data": {"source": "local", "root": str(tmp_path)},
                            "task": OmegaConf.to_container(small_needle()),
                            "model": {"name": "tiny", "path": None, "tokenizer": None, "init": "random"}})
    assert job_inputs(cfg)["data"] is None


def write_eraser(folder: Path) -> None:
    """A small Movie Reviews-like folder: 3 docs per split label, evidence spans in groups."""
    (folder / "docs").mkdir(parents=True)
    for split, n in (("train", 12), ("val", 4)):
        lines = []
        for i in range(n):
            label = "POS" if i % 2 else "NEG"
            word = "wonderful" if label == "POS" else "dreadful"
            doc = f"{split}_{label}_{i}.txt"
            (folder / "docs" / doc).write_text(f"the film opens slowly .\nit is {word} and {word} again .\n")
            # words: the film opens slowly . it is W and W again . -> W at 7 and 9
            evidences = [[{"docid": doc, "start_token": 6, "end_token": 8, "text": f"is {word}"}],
                         [{"docid": doc, "start_token": 9, "end_token": 10, "text": word}]]
            lines.append(json.dumps({"annotation_id": doc, "classification": label, "docids": None,
                                     "evidences": evidences, "query": "What is the sentiment of this review?"}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_eraser_reader_gives_labels_texts_and_rationale_tokens(tmp_path, tokenizer):
    write_eraser(tmp_path / "movies")
    task = task_cfg("movies", dir=str(tmp_path / "movies"))
    # an ERASER folder is read from its path whatever data.source says
    splits = load_splits(task, OmegaConf.create({"source": "hub", "root": str(tmp_path / "absent")}),
                         budget(max_calib=4), seed=1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "calib": 4, "dev": 4}
    dev = encode(splits["dev"], tokenizer, 512)
    row = dev[1]
    assert row["text_a"] == "the film opens slowly . it is wonderful and wonderful again ."
    assert dev.features["label"].names[row["label"]] == "POS"
    gold = tokenizer.convert_ids_to_tokens([row["input_ids"][i] for i in row["rationale_tokens"]])
    assert gold == ["is", "wonderful", "wonderful"]
    assert row["rationale_tokens"] == [7, 8, 10]  # [CLS] first
    inputs = job_inputs(OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "task": OmegaConf.to_container(task),
                                          "data": {"source": "hub", "root": str(tmp_path / "absent")},
                                          "model": {"name": "tiny", "path": None, "tokenizer": None, "init": "random"}}))
    assert set(inputs["data"]) == {"train", "dev", "docs"} and all(inputs["data"].values())


def test_a_missing_eraser_folder_gets_one_sentence(tmp_path):
    task = task_cfg("movies", dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="is not an ERASER folder with docs/ and train.jsonl: download"):
        load_splits(task, OmegaConf.create({"source": "local", "root": str(tmp_path)}), budget(), seed=1)


def test_an_evidence_outside_its_document_gets_one_sentence(tmp_path):
    write_eraser(tmp_path / "movies")
    path = tmp_path / "movies" / "val.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    first["evidences"] = [[{"docid": first["annotation_id"], "start_token": 11, "end_token": 40}]]
    path.write_text(json.dumps(first) + "\n")
    task = task_cfg("movies", dir=str(tmp_path / "movies"))
    with pytest.raises(UserError, match=r"val.jsonl line 1: evidence tokens \[11, 40\) are outside"):
        load_splits(task, OmegaConf.create({"source": "local", "root": str(tmp_path)}), budget(max_calib=4), seed=1)
