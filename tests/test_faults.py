"""Fault injection: bad inputs and damaged state, each met with one sentence, a rebuild or a
recomputation, never a silently wrong result and never a lost one.

Most cases fail before any training. The cases that need a trained cache entry or a finished record
share one tiny/smoke WNLI job (`trained`), each on a copy of its cache and data. Every case prints
`FAULT <id>: <the line the user sees>` (run with -s to collect them).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from transformers import AlbertConfig, AutoTokenizer, BertConfig, BertForSequenceClassification

from helpers import REPO, SMOKE, job_config
from tokenprune import cache as cache_module
from tokenprune import fingerprint, results
from tokenprune.cache import Cache
from tokenprune.checks import CommandLineChecks, check_command_line, check_config
from tokenprune.errors import UserError
from tokenprune.finetune import backbone_key
from tokenprune.models import packaged_minilm_dir
from tokenprune.runner import run_job

TASK = "wnli"


def say(case: str, line: str) -> None:
    print(f"FAULT {case}: {line}")


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.replace("e.g. ", "").count(". ") == 0 and msg.endswith(".")


def copy_data(src: Path, dst: Path) -> Path:
    """A writable copy of the WNLI data under `dst` (the shared data is never touched)."""
    (dst / "WNLI").mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        shutil.copyfile(src / "WNLI" / f, dst / "WNLI" / f)
    return dst


def config(root: Path, data: Path, *overrides: str):
    """A smoke job on WNLI whose cache is root/cache and whose data is `data`."""
    return job_config(root, f"task={TASK}", f"data.root={data}", *overrides)


def finetune_entries(cache_dir: Path) -> list[Path]:
    """The fine-tuning entries in use (not those moved aside)."""
    return sorted(p for p in (cache_dir / "finetune").glob("*") if "." not in p.name and (p / "key.json").exists())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """One finished job: its data copy, its cache (with the fine-tuned entry and the record index)
    and its ok record."""
    root = tmp_path_factory.mktemp("trained")
    data = copy_data(data_root, root / "data")
    record = run_job(config(root, data), root / "job")
    assert record["status"] == "ok", record["error"]
    return root, data, record


@pytest.fixture
def warm(trained, tmp_path):
    """A copy of the trained job's cache and data under tmp_path: (tmp_path, data, record)."""
    root, data, record = trained
    shutil.copytree(root / "cache", tmp_path / "cache")
    return tmp_path, copy_data(data, tmp_path / "data"), record


# ---- config: one sentence before any work -------------------------------------------------------

CONFIG = [
    ("seed=-1", "seed=-1 is not valid"),
    ("seed=4294967296", "from 0 to 4294967295"),
    ("seed=1.5", "whole number"),
    ("task.max_length=0", "task.max_length=0 is not valid"),
    ("task.max_length=1", "task.max_length=1 is not valid"),
    ("task.max_length=long", "task.max_length='long' is not valid"),
    ("speedup=-2", "below 1"),
    ("budget.max_calib=0", "budget.max_calib=0"),
    ("train.eval_batch_size=0", "train.eval_batch_size=0"),
]


@pytest.mark.parametrize("override, message", CONFIG, ids=[c[0] for c in CONFIG])
def test_config_mistakes_get_one_sentence(override, message):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SMOKE, override])
    with pytest.raises(UserError, match=message) as e:
        check_config(cfg)
    say(override, str(e.value))
    assert one_sentence(str(e.value))


COMMAND_LINE = [
    (["experiment=nosuch"], "experiment=nosuch is not a study in conf/experiment"),
    (["experiment=debug", "experiment=glue_pareto"], "more than one study (debug, glue_pareto)"),
    (["experiment=debug,glue_pareto"], "more than one study (debug,glue_pareto)"),
    (["+experiment=debug", "experiment=debug"], "more than one study"),
]


@pytest.mark.parametrize("overrides, message", COMMAND_LINE, ids=[" ".join(c[0]) for c in COMMAND_LINE])
def test_experiment_mistakes_hydra_lets_through_get_one_sentence(overrides, message):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        # as Hydra's config holds them: the overrides as typed, the group choice the last one made
        hydra_cfg = OmegaConf.create({"overrides": {"task": overrides},
                                      "runtime": {"choices": {"experiment": overrides[-1].split("=")[1]}}})
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            check_command_line(hydra_cfg, loader)
        check_command_line(compose("config", overrides=["experiment=debug"], return_hydra_config=True).hydra, loader)
    say(" ".join(overrides), str(e.value))
    assert one_sentence(str(e.value))


def test_unknown_experiment_stops_run_py_before_any_job(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "run.py", "experiment=nosuch", *SMOKE, f"cache_dir={tmp_path / 'cache'}",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    say("run.py experiment=nosuch", line)
    assert line.startswith("experiment=nosuch is not a study") and one_sentence(line)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists(), "no job ran"


@pytest.mark.parametrize("mode, setting", [("run", "hydra.run.dir"), ("multirun", "hydra.sweep.dir")])
def test_an_output_folder_that_cannot_be_written_stops_the_command(tmp_path, capsys, mode, setting):
    (tmp_path / "a_file").write_text("")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"{setting}={tmp_path / 'a_file' / 'out'}"], return_hydra_config=True)
        with pytest.raises(SystemExit) as e:
            getattr(CommandLineChecks(), f"on_{mode}_start")(config=cfg)
    line = capsys.readouterr().err.strip()
    say(f"{setting} under a file", line)
    assert e.value.code == 1 and f"cannot be written (Not a directory): set {setting}" in line and one_sentence(line)


# ---- data: one sentence before any training -----------------------------------------------------

def _header_only(d):
    (d / "WNLI" / "dev.tsv").write_text((d / "WNLI" / "dev.tsv").read_text().splitlines()[0] + "\n")


def _bad_field_count(d):
    lines = (d / "WNLI" / "train.tsv").read_text().splitlines()
    (d / "WNLI" / "train.tsv").write_text("\n".join(lines[:3] + ["7\tonly two fields"] + lines[3:]) + "\n")


def _unknown_label(d):
    lines = (d / "WNLI" / "dev.tsv").read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tmaybe"
    (d / "WNLI" / "dev.tsv").write_text("\n".join(lines) + "\n")


def _train_is_a_folder(d):
    (d / "WNLI" / "train.tsv").unlink()
    (d / "WNLI" / "train.tsv").mkdir()


DATA = [
    ("data root missing", lambda d: shutil.rmtree(d), [], "does not exist: set data.root"),
    ("dev file empty", lambda d: (d / "WNLI" / "dev.tsv").write_text(""), [], "dev split of task wnli is empty"),
    ("dev file header only", _header_only, [], "dev split of task wnli is empty"),
    ("train file missing", lambda d: (d / "WNLI" / "train.tsv").unlink(), [], "train.tsv is missing"),
    ("train file is a folder", _train_is_a_folder, [], "train.tsv is a folder, not a tsv file"),
    ("row with too few fields", _bad_field_count, [], "train.tsv line 4: expected 4 tab-separated fields"),
    ("label not in the task's labels", _unknown_label, [], "dev.tsv line 3: label 'maybe' is not one of"),
    ("calib takes all of train", lambda d: None, ["budget.max_calib=100000"], "leaves no training examples"),
    ("task folder renamed", lambda d: (d / "WNLI").rename(d / "wnli"), [], "WNLI/train.tsv is missing"),
]


@pytest.mark.parametrize("case, damage, overrides, message", DATA, ids=[c[0] for c in DATA])
def test_bad_data_gets_one_sentence_before_training(tmp_path, data_root, case, damage, overrides, message):
    data = copy_data(data_root, tmp_path / "data")
    damage(data)
    record = run_job(config(tmp_path, data, *overrides), tmp_path / "job")
    say(case, record["error"])
    assert record["status"] == "failed" and message in record["error"] and record["traceback"] is None
    assert not (tmp_path / "cache" / "finetune").exists(), "nothing was trained"


def _flip_one_label(path: Path) -> None:
    lines = path.read_text().splitlines()
    head, label = lines[5].rsplit("\t", 1)
    lines[5] = f"{head}\t{1 - int(label)}"
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("split, refinetuned", [("train", True), ("dev", False)])
def test_a_data_file_edited_in_place_retrains_and_recomputes(warm, caplog, split, refinetuned):
    root, data, record = warm
    caplog.set_level(logging.INFO)
    _flip_one_label(data / "WNLI" / f"{split}.tsv")
    again = run_job(config(root, data), root / "job")  # resume=true: the same command as before
    assert again["status"] == "ok" and again["inputs"]["data"] != record["inputs"]["data"]
    assert "already done" not in caplog.text, "the record of the old rows is not reused"
    assert ("building finetune" in caplog.text) == refinetuned
    assert ("cache hit: finetune" in caplog.text) == (not refinetuned), "dev rows do not enter the fine-tuning"
    say(f"one {split} label flipped in place", next(m for m in caplog.messages if "finetune" in m))


def test_another_data_folder_with_the_same_rows_reuses_the_fine_tuning(warm, caplog):
    root, data, record = warm
    caplog.set_level(logging.INFO)
    moved = data.rename(root / "elsewhere")
    again = run_job(config(root, moved), root / "job")
    assert again["status"] == "ok" and "cache hit: finetune" in caplog.text
    assert again["metric"] == record["metric"], "the same rows give the same result"
    say("data.root moved, same rows", "cache hit: finetune ... (content, not path, is the key)")


def test_another_data_folder_with_other_rows_retrains(warm, caplog):
    root, data, record = warm
    caplog.set_level(logging.INFO)
    other = copy_data(data, root / "other")
    _flip_one_label(other / "WNLI" / "train.tsv")
    again = run_job(config(root, other), root / "job")
    assert again["status"] == "ok" and "building finetune" in caplog.text
    say("data.root pointed at other rows", next(m for m in caplog.messages if "finetune" in m))


def _age(*paths: Path) -> None:
    """Set files' modification time an hour back: written long before (the settled state)."""
    for path in paths:
        old = path.stat().st_mtime - 3600
        os.utime(path, (old, old))


def test_file_hashes_are_remembered_and_a_damaged_memo_is_rebuilt(warm, monkeypatch):
    root, data, _ = warm
    cfg = config(root, data)
    _age(data / "WNLI" / "train.tsv", data / "WNLI" / "dev.tsv")
    expected = fingerprint.job_inputs(cfg)
    memo = root / "cache" / fingerprint.MEMO_NAME
    assert str(data / "WNLI" / "train.tsv") in json.loads(memo.read_text())
    memo.write_text("{not json")
    monkeypatch.setattr(fingerprint, "_memos", {})  # a new process
    assert fingerprint.job_inputs(cfg) == expected
    assert str(data / "WNLI" / "train.tsv") in json.loads(memo.read_text()), "the memo is written again"
    calls = []
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: calls.append(p))
    fingerprint.job_inputs(cfg)
    assert calls == [], "unchanged files are not hashed again"
    say("file-hashes.json garbled", "ignored and written again; the hashes are unchanged")


# ---- model and tokenizer: refused before any training ------------------------------------------

def _model_folder(path: Path, config, tokenizer: bool = False) -> Path:
    path.mkdir(parents=True)
    config.save_pretrained(path)
    if tokenizer:
        AutoTokenizer.from_pretrained(packaged_minilm_dir()).save_pretrained(path)
    return path


def _no_tokenizer_files(tmp: Path) -> list[str]:
    folder = _model_folder(tmp / "model", BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                      intermediate_size=64))
    return ["model=minilm", f"model.path={folder}"]


def _bigger_tokenizer(tmp: Path) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    tokenizer.add_tokens(["tokenprunewordone", "tokenprunewordtwo"])
    tokenizer.save_pretrained(tmp / "tok")
    return [f"model.tokenizer={tmp / 'tok'}"]


def _albert(tmp: Path) -> list[str]:
    folder = _model_folder(tmp / "model", AlbertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                       intermediate_size=64, embedding_size=16), tokenizer=True)
    return ["model=minilm", f"model.path={folder}"]


MODEL = [
    ("model folder without tokenizer files", _no_tokenizer_files, "has 5 entries against model=minilm's 30522-row embedding"),
    ("tokenizer bigger than the embedding", _bigger_tokenizer, "has 30524 entries but model=tiny's embedding has 30522 rows"),
    ("an architecture without a family adapter", _albert,
     "runs BERT-style classifiers (BERT, RoBERTa, DistilBERT), and this model is albert"),
    ("max_length above the positions", lambda tmp: ["task.max_length=1024"], "task.max_length=1024 is more than model=tiny's 512 positions"),
    ("max_length above a small model's positions", lambda tmp: ["model.architecture.max_position_embeddings=64"],
     "task.max_length=128 is more than model=tiny's 64 positions"),
    ("model.path that does not exist", lambda tmp: ["model=minilm", f"model.path={tmp / 'nowhere'}"], "nowhere is not a folder"),
]


@pytest.mark.parametrize("case, setup, message", MODEL, ids=[c[0] for c in MODEL])
def test_a_model_or_tokenizer_this_loop_cannot_use_is_refused_before_training(tmp_path, data_root, case, setup, message):
    record = run_job(config(tmp_path, data_root, *setup(tmp_path)), tmp_path / "job")
    say(case, record["error"])
    assert record["status"] == "failed" and message in record["error"] and record["traceback"] is None
    assert not (tmp_path / "cache" / "finetune").exists(), "refused before the first step"
    assert one_sentence(record["error"])


@pytest.mark.parametrize("changed", ["model.safetensors", "tokenizer.json"])
def test_a_local_model_folder_whose_files_change_gets_a_new_fine_tuning_key(tmp_path, data_root, changed):
    folder = _model_folder(tmp_path / "model", BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                          intermediate_size=64), tokenizer=True)
    BertForSequenceClassification(BertConfig.from_pretrained(folder)).save_pretrained(folder)
    cfg = config(tmp_path, data_root, "model=minilm", f"model.path={folder}")
    before = backbone_key(cfg)
    with open(folder / changed, "r+b") as f:  # one byte changed, the size kept
        f.seek(-2, os.SEEK_END)
        byte = f.read(1)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    after = backbone_key(cfg)
    part = "weights" if changed.endswith("safetensors") else "tokenizer"
    assert before[ "inputs"][part][changed] != after["inputs"][part][changed]
    assert cache_module.key_hash(before) != cache_module.key_hash(after)
    say(f"local model folder: {changed} changed", "a new fine-tuning key: the backbone is fine-tuned again")


# ---- cache entries: damage found, entry moved aside and rebuilt --------------------------------

def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CACHE = [
    ("weights bytes changed", lambda e: _flip_byte(e / "model.safetensors"), "the content of model.safetensors changed"),
    ("weights truncated", lambda e: os.truncate(e / "model.safetensors", 1000), "model.safetensors has 1000 bytes"),
    ("weights missing", lambda e: (e / "model.safetensors").unlink(), "model.safetensors is missing"),
    ("info.json garbled", lambda e: (e / "info.json").write_text("{garbled"), "info.json has"),
    ("config.json bytes changed", lambda e: _flip_byte(e / "config.json"), "the content of config.json changed"),
    ("manifest missing (older code)", lambda e: (e / "manifest.json").unlink(), "no manifest: built by code older than the manifest"),
    ("manifest garbled", lambda e: (e / "manifest.json").write_text("[1, 2"), "key or manifest is unreadable"),
    ("manifest not a file list", lambda e: (e / "manifest.json").write_text("[1, 2]"), "manifest is not a file list"),
    ("key.json garbled", lambda e: (e / "key.json").write_text("{}"), "key.json does not hold its key"),
]


@pytest.mark.parametrize("case, damage, reason", CACHE, ids=[c[0] for c in CACHE])
def test_a_damaged_fine_tuning_entry_is_moved_aside_and_rebuilt(warm, caplog, monkeypatch, case, damage, reason):
    root, data, record = warm
    [entry] = finetune_entries(root / "cache")
    damage(entry)
    monkeypatch.setattr(cache_module, "_verified", set())  # a new process
    caplog.set_level(logging.INFO)
    again = run_job(config(root, data, "resume=false"), root / "job")
    warning = next(m for m in caplog.messages if "is damaged" in m)
    say(f"cache: {case}", warning)
    assert reason in warning and entry.name in warning and "moved to" in warning
    assert f"building finetune {entry.name}" in caplog.text
    assert again["status"] == "ok" and again["metric"] == record["metric"], "rebuilt to the same weights"
    assert [p.name for p in finetune_entries(root / "cache")] == [entry.name]
    assert len(list(entry.parent.glob(f"{entry.name}.damaged-*"))) == 1, "the damaged entry is kept aside"


def test_an_entry_is_hashed_once_per_process_and_again_when_a_file_is_written(tmp_path, monkeypatch):
    cache, key = Cache(tmp_path), {"k": 1}
    entry = cache.get_or_make("phase", key, lambda tmp: (tmp / "w.bin").write_bytes(b"x" * 1000))
    _age(*[p for p in entry.iterdir() if p.name != "key.json"])
    hashed = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: (hashed.append(Path(p).name), real(p))[1])
    for _ in range(3):
        assert cache.get("phase", key) == entry
    assert hashed.count("w.bin") == 1, "hashed once, then only sizes and times are checked"
    _flip_byte(entry / "w.bin")
    assert cache.get("phase", key) is None and not entry.exists(), "a write moves the file's times: hashed again"
    say("cache entry changed during a process", "found at the next use (the file's times moved)")


def test_a_cache_that_cannot_be_written_is_one_sentence_before_training(tmp_path, data_root, monkeypatch):
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "cache")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    record = run_job(config(tmp_path, data_root), tmp_path / "job")
    say("cache folder not writable", record["error"])
    assert record["status"] == "failed" and record["traceback"] is None and one_sentence(record["error"])
    assert "cannot be written (Permission denied)" in record["error"] and "cache_dir" in record["error"]
    assert not (tmp_path / "cache" / "finetune").exists()


def test_a_cache_path_under_a_file_is_one_sentence(tmp_path, data_root):
    (tmp_path / "a_file").write_text("")
    record = run_job(config(tmp_path, data_root, f"cache_dir={tmp_path / 'a_file' / 'cache'}"), tmp_path / "job")
    say("cache_dir under a file", record["error"])
    assert record["status"] == "failed" and "cannot be written (Not a directory)" in record["error"]
    assert record["traceback"] is None and one_sentence(record["error"])


def test_a_full_disk_while_building_an_entry_is_one_sentence_and_leaves_no_entry(tmp_path, data_root, monkeypatch):
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "built.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    record = run_job(config(tmp_path, data_root), tmp_path / "job")
    say("disk full while writing a cache entry", record["error"])
    assert record["status"] == "failed" and "is full (No space left on device)" in record["error"]
    assert record["traceback"] is None and one_sentence(record["error"])
    assert not finetune_entries(tmp_path / "cache") and not list((tmp_path / "cache" / "finetune").glob("*.tmp-*"))


# ---- records: resume never trusts a damaged or foreign record ---------------------------------

def _index_entry(root: Path) -> Path:
    [entry] = [p for p in (root / "cache" / "records").glob("*") if "." not in p.name and (p / "key.json").exists()]
    return entry


RECORDS = [
    ("output record is a JSON list", lambda root: (root / "job" / "result.json").write_text("[1, 2]"), "index"),
    ("output record truncated", lambda root: os.truncate(root / "job" / "result.json", 50), "index"),
    ("output record from code without inputs", lambda root: _drop_inputs(root / "job" / "result.json"), "index"),
    ("index record bytes changed", lambda root: _flip_byte(_index_entry(root) / "result.json"), "output"),
    ("index record deleted", lambda root: shutil.rmtree(_index_entry(root)), "output"),
    ("both copies damaged", lambda root: (_flip_byte(_index_entry(root) / "result.json"),
                                          (root / "job" / "result.json").write_text("3")), "recomputed"),
]


def _drop_inputs(path: Path) -> None:
    record = json.loads(path.read_text())
    del record["inputs"]
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("case, damage, source", RECORDS, ids=[c[0] for c in RECORDS])
def test_resume_treats_a_damaged_record_as_missing_and_repairs_it(warm, trained, caplog, monkeypatch, case, damage, source):
    root, _, record = warm
    data = trained[1]  # the very same job: same data folder (read only here), a copy of its cache and record
    shutil.copytree(trained[0] / "job", root / "job")
    damage(root)
    monkeypatch.setattr(cache_module, "_verified", set())  # a new process
    caplog.set_level(logging.INFO)
    again = run_job(config(root, data), root / "job")
    resumed = next((m for m in caplog.messages if "already done" in m), None)
    if source == "recomputed":
        assert resumed is None and "cache hit: finetune" in caplog.text
    else:
        expected = "records" if source == "index" else str(root / "job")
        assert resumed is not None and expected in resumed
    say(f"records: {case}", resumed or next(m for m in caplog.messages if "is damaged" in m))
    assert again["status"] == "ok" and again["metric"] == record["metric"]
    assert results.read(root / "job" / "result.json")["metric"] == record["metric"], "the output copy is whole"
    assert results.read(_index_entry(root) / "result.json")["metric"] == record["metric"], "the index is whole"
    assert Cache(root / "cache").get("records", _index_key_of(again)) is not None


def _index_key_of(record: dict) -> dict:
    from tokenprune.resume import _index_key
    return _index_key(record["config"], record["inputs"], record["git_commit"])


def test_a_record_that_is_a_json_list_is_unreadable_and_replaced(tmp_path):
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a record"):
        results.read(tmp_path / "result.json")
    path = results.write(results.new_record(status="failed", error="x"), tmp_path, keep_ok=True)
    assert path.name == "result.json" and results.read(path)["status"] == "failed"
    say("result.json a JSON list, then a failed job", "replaced by the job's record (no crash; the sweep goes on)")


# ---- disk: a finished record is never lost ------------------------------------------------------

def _refuse_writes_in(folder: Path, error: OSError, monkeypatch) -> None:
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and str(dir).startswith(str(folder)):
            raise error
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("case, error", [
    ("output disk full", OSError(errno.ENOSPC, "No space left on device")),
    ("output folder read-only", OSError(errno.EROFS, "Read-only file system")),
])
def test_a_finished_record_that_cannot_be_written_goes_to_the_fallback_and_the_index(
        warm, caplog, monkeypatch, case, error):
    root, data, record = warm
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
    _refuse_writes_in(root / "job", error, monkeypatch)
    caplog.set_level(logging.INFO)
    again = run_job(config(root, data, "resume=false"), root / "job")
    warning = next(m for m in caplog.messages if "cannot be written" in m)
    say(case, warning)
    fallback = root / "tmp" / "tokenprune-records" / str(root / "job").lstrip("/") / "result.json"
    assert str(fallback) in warning and results.read(fallback)["metric"] == again["metric"] == record["metric"]
    assert not (root / "job" / "result.json").exists()
    monkeypatch.undo()
    resumed = run_job(config(root, data), root / "job")  # the index has it: nothing is recomputed
    assert resumed["metric"] == record["metric"] and (root / "job" / "result.json").exists()


def test_a_record_that_cannot_be_written_anywhere_is_printed_in_the_log(warm, caplog, monkeypatch):
    root, data, record = warm
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
    _refuse_writes_in(root, OSError(errno.ENOSPC, "No space left on device"), monkeypatch)
    caplog.set_level(logging.INFO)
    again = run_job(config(root, data, "resume=false"), root / "job")
    error = next(m for m in caplog.messages if "could not be written" in m)
    say("every disk full", error.split("; here it is")[0] + "; here it is: {...}")
    assert again["status"] == "ok" and json.loads(error.split("here it is: ", 1)[1])["metric"] == record["metric"]
    assert any("could not index the record" in m for m in caplog.messages)
