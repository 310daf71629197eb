"""The static baselines: method=distilbert (a shallower distilled student) and method=truncate (the
first k tokens). Layer maps and weight copies, the distillation loss on hand-made numbers, the
truncation policy, the choice of k, DistilBERT→BERT conversion, and both methods end to end on the
tiny model and smoke budget (speedup within 10% of the target, phase caching, clear errors)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertModel

from tokenprune.encoder import PrunableEncoder
from tokenprune.errors import UserError
from tokenprune.methods import distilbert as db
from tokenprune.methods.truncate import TruncatePolicy, choose_k, truncate_batch, truncation_speedup
from tokenprune.runner import run_job

CONF = Path(__file__).resolve().parents[1] / "conf"


def bert(layers: int, seed: int = 0, num_labels: int = 2, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=200, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, 200, (n,), generator=g)
        ids[b, 0] = 101 % 200
        mask[b, :n] = 1
    return ids, mask, torch.zeros_like(ids)


# --- distilbert: depth, layer map, initialisation ---------------------------------------------------


@pytest.mark.parametrize("L,k,expected", [(4, 2, [1, 3]), (4, 3, [0, 1, 3]), (6, 3, [1, 3, 5]),
                                          (12, 6, [1, 3, 5, 7, 9, 11])])
def test_student_copies_the_mapped_teacher_layers(L, k, expected):
    assert db.layer_map(L, k) == expected
    teacher = bert(L)
    student = db.init_student(teacher, expected)
    assert student.config.num_hidden_layers == k and teacher.config.num_hidden_layers == L
    t_layers, s_layers = teacher.bert.encoder.layer, student.bert.encoder.layer
    for i, j in enumerate(expected):
        t_state, s_state = t_layers[j].state_dict(), s_layers[i].state_dict()
        assert s_state.keys() == t_state.keys()
        for name in s_state:
            assert torch.equal(s_state[name], t_state[name]), (i, j, name)
        if j != i:  # and not the same-index teacher layer
            assert not torch.equal(s_layers[i].attention.self.query.weight, t_layers[i].attention.self.query.weight)
    for part in ("bert.embeddings", "bert.pooler", "classifier"):
        s, t = student.get_submodule(part).state_dict(), teacher.get_submodule(part).state_dict()
        assert all(torch.equal(s[n], t[n]) for n in t)


def test_identity_map_reproduces_the_teacher():
    teacher = bert(4)
    student = db.init_student(teacher, db.layer_map(4, 4)).eval()
    ids, mask, types = batch([9, 5])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids, attention_mask=mask).logits,
                              teacher(input_ids=ids, attention_mask=mask).logits, atol=1e-6)


@pytest.mark.parametrize("L,target,k", [(6, 1.5, 4), (6, 2, 3), (6, 3, 2), (6, 6, 1), (4, 2, 2), (4, 4, 1),
                                        (12, 2, 6), (6, 1, 6)])
def test_depth_is_round_L_over_target(L, target, k):
    assert db.depth_for(L, target) == k


@pytest.mark.parametrize("L,target", [(6, 4), (6, 5), (6, 13), (4, 3), (4, 1.5), (4, 9)])
def test_unreachable_depth_says_so_in_one_sentence(L, target):
    with pytest.raises(UserError) as e:
        db.depth_for(L, target)
    msg = str(e.value)
    assert "cannot reach" in msg and "\n" not in msg and msg.endswith(".")
    assert f"{L / 2:g}" in msg  # it lists the reachable targets


# --- distilbert: the loss ---------------------------------------------------------------------------


def test_soft_term_is_tempered_kl_times_t_squared():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
    T = 2.0
    ps, pt = np.exp(s.numpy() / T), np.exp(t.numpy() / T)
    ps, pt = ps / ps.sum(1, keepdims=True), pt / pt.sum(1, keepdims=True)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(1).mean()  # KL(teacher ‖ student), batch mean
    assert db.soft_loss(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-5)
    assert db.soft_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_term_is_the_task_loss_cross_entropy_and_mse_for_regression():
    from tokenprune.train import task_loss

    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    per_row = [-np.log(np.exp(2) / (np.exp(2) + 1)), -np.log(1 / (1 + np.e))]
    assert task_loss(s, y).item() == pytest.approx(np.mean(per_row), rel=1e-5)
    assert task_loss(s, y, reduction="none").tolist() == pytest.approx(per_row, rel=1e-5)
    assert task_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])).item() == pytest.approx(1.0)


def test_cosine_term_over_real_tokens():
    h = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert db.cosine_loss(h, h.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    other = h.clone()
    other[0, 3] = -h[0, 3]  # padding differs: no effect
    assert db.cosine_loss(h, other, mask).item() == pytest.approx(0.0, abs=1e-6)
    other[1, 1] = -h[1, 1]  # one of 5 real tokens opposite: (1 − (−1)) / 5
    assert db.cosine_loss(h, other, mask).item() == pytest.approx(2 / 5, rel=1e-5)


def test_weighted_sum_and_regression_uses_mse_to_the_teacher():
    s, t, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    h, mask = torch.randn(1, 3, 4), torch.ones(1, 3)
    total, terms = db.distillation_loss(s, t, y, temperature=2.0, alpha_ce=0.3, alpha_hard=0.7, alpha_cos=5.0,
                                        student_hidden=h, teacher_hidden=h, mask=mask)
    assert total.item() == pytest.approx(0.3 * db.soft_loss(s, t, 2.0).item() + 0.7 * F.cross_entropy(s, y).item(), rel=1e-5)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-6)
    total, terms = db.distillation_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([2.0]),
                                        temperature=2.0, alpha_ce=1.0, alpha_hard=0.0)
    assert terms["soft"].item() == pytest.approx(4.0) and total.item() == pytest.approx(4.0)


# --- distilbert: the hub initialisation (conversion offline; the download cannot be tested here) ----


def test_distilbert_weights_convert_to_an_equivalent_bert():
    torch.manual_seed(0)
    distil = DistilBertModel(DistilBertConfig(vocab_size=200, dim=32, n_heads=4, hidden_dim=128, n_layers=2,
                                              max_position_embeddings=64)).eval()
    teacher = bert(4)
    student = db.bert_from_distilbert(distil, teacher).eval()
    assert student.config.num_hidden_layers == 2
    ids, mask, _ = batch([9, 6])
    with torch.no_grad():
        want = distil(input_ids=ids, attention_mask=mask).last_hidden_state
        got = student.bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.ones_like(ids)).last_hidden_state
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    with pytest.raises(UserError, match="DistilBERT's shape"):
        db.bert_from_distilbert(distil, bert(4, hidden=64))


def test_hub_init_offline_fails_with_a_sentence(tmp_path):
    with pytest.raises(UserError, match="not reachable"):
        db.load_distilbert(str(tmp_path / "no-such-distilbert"))


# --- truncate -------------------------------------------------------------------------------------


def test_truncation_keeps_exactly_the_first_k_real_tokens():
    model = bert(4)
    ids, mask, types = batch([12, 7, 3])
    k = 5
    with torch.no_grad():
        out = PrunableEncoder(model, TruncatePolicy(k), mode="gather")(ids, mask, types)
        sliced = model(**{n: v[:, :k] for n, v in
                          dict(input_ids=ids, attention_mask=mask, token_type_ids=types).items()}).logits
    assert out.trace.attn_tokens.tolist() == [[5] * 4, [5] * 4, [3] * 4]
    assert out.trace.ffn_tokens.tolist() == out.trace.attn_tokens.tolist()
    assert out.positions.shape[1] == k
    for b, n in enumerate([12, 7, 3]):
        kept = out.positions[b][out.mask[b]].tolist()
        assert kept == list(range(min(n, k)))  # [CLS] at 0, then the next ones, in order
    assert torch.allclose(out.logits, sliced, atol=1e-5)  # the same as the model on the cut input
    cut = truncate_batch({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])}, k)
    assert cut["input_ids"].shape == (3, 5) and torch.equal(cut["input_ids"], ids[:, :5]) and cut["labels"].shape == (3,)


def test_k_is_the_largest_length_meeting_the_target():
    config = bert(4).config
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=200)
    for target in (1.3, 2.0, 3.0):
        k = choose_k(lengths, config, target, max_length=64)
        assert truncation_speedup(lengths, k, config) >= target > truncation_speedup(lengths, k + 1, config)
    assert choose_k(lengths, config, 1.0, max_length=64) == 64
    with pytest.raises(UserError, match="cannot reach speedup=500"):
        choose_k(lengths, config, 500, max_length=64)


# --- end to end on the tiny model ----------------------------------------------------------------


def job_cfg(cache: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["model=tiny", "budget=smoke", "logger=none", "measure.timing=false",
                                            "threads=1", f"cache_dir={cache}", *overrides])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher_passes():
    return []


@pytest.fixture(autouse=True)
def count_teacher_passes(monkeypatch, teacher_passes):
    real = db.teacher_hidden_states

    def counting(*args, **kwargs):
        teacher_passes.append("hidden")
        return real(*args, **kwargs)

    monkeypatch.setattr(db, "teacher_hidden_states", counting)


def test_distilbert_end_to_end_meets_exact_targets_and_reuses_teacher_logits(cache, tmp_path, teacher_passes):
    first = run_job(job_cfg(cache, "method=distilbert", "speedup=2"), tmp_path / "a")
    assert first["status"] == "ok", first.get("error")
    assert first["flops_speedup"] == pytest.approx(2.0, rel=0.1)
    knob = first["method_info"]["knob"]
    assert knob["layers"] == 2 and knob["layer_map"] == [1, 3]
    assert first["tokens_per_layer"]["attention"].__len__() == 2  # the student's own layers
    assert first["method_info"]["phases"]["teacher-logits"]["cached"] is False
    assert teacher_passes == ["hidden"]  # one pass for the hidden states
    second = run_job(job_cfg(cache, "method=distilbert", "speedup=4"), tmp_path / "b")
    assert second["status"] == "ok", second.get("error")
    assert second["flops_speedup"] == pytest.approx(4.0, rel=0.1)
    assert second["method_info"]["knob"]["layer_map"] == [3]
    assert teacher_passes == ["hidden"]  # the new student reused the cached teacher targets
    phases = second["method_info"]["phases"]
    assert phases["teacher-logits"]["cached"] and phases["teacher-hidden"]["cached"]
    assert phases["teacher-logits"]["path"] == first["method_info"]["phases"]["teacher-logits"]["path"]
    assert len(list((cache / "teacher-logits").glob("*/key.json"))) == 1


def test_truncate_end_to_end_meets_the_target(cache, tmp_path):
    record = run_job(job_cfg(cache, "method=truncate", "speedup=2", "task=mrpc"), tmp_path)
    assert record["status"] == "ok", record.get("error")
    assert record["flops_speedup"] == pytest.approx(2.0, rel=0.1)
    k = record["method_info"]["knob"]["k"]
    assert max(record["tokens_per_layer"]["attention"]) <= k and record["method_info"]["truncate"]["trained"]


@pytest.mark.parametrize("overrides,phrase", [
    (("method=distilbert", "speedup=0.5"), "below 1"),
    (("method=truncate", "speedup=0.5"), "below 1"),
    (("method=distilbert", "speedup=3"), "cannot reach speedup=3"),
    (("method=distilbert", "speedup=9"), "cannot reach speedup=9"),
])
def test_bad_targets_fail_with_one_sentence(cache, tmp_path, overrides, phrase):
    record = run_job(job_cfg(cache, *overrides), tmp_path)
    assert record["status"] == "failed"
    assert phrase in record["error"] and "\n" not in record["error"] and not record.get("traceback")
