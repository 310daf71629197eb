"""Intervals from per-example outputs: the resampled metric is the task's own, differences are paired
on matched examples, and seeds enter the interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef

from analysis import pareto
from analysis.uncertainty import cell_intervals, paired_differences, resampled_metric, speedup_within_drop
from tokenprune import results
from tokenprune.data.metrics import compute_metrics


def test_resampled_metrics_are_the_task_metrics_on_each_resample():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, 300)
    prediction = np.where(rng.random(300) < 0.8, label, 1 - label)
    draws = rng.integers(0, 300, size=(25, 300))
    for kind, name in (("accuracy", "accuracy"), ("f1_accuracy", "f1"), ("matthews", "matthews")):
        expected = [compute_metrics(kind, prediction[d], label[d])[name] for d in draws]
        assert resampled_metric(kind, prediction, label, draws) == pytest.approx(expected, abs=1e-9)
    gold3 = rng.integers(0, 3, 300)  # multiclass Matthews
    pred3 = np.where(rng.random(300) < 0.6, gold3, rng.integers(0, 3, 300))
    expected = [100 * matthews_corrcoef(gold3[d], pred3[d]) for d in draws[:5]]
    assert resampled_metric("matthews", pred3, gold3, draws[:5]) == pytest.approx(expected, abs=1e-9)


def test_f1_and_matthews_recomputed_by_hand_on_one_resample():
    label = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    prediction = np.array([1, 0, 0, 1, 1, 0, 1, 1])
    draw = np.array([[0, 0, 2, 3, 4, 5, 5, 7]])  # with repeats, as a bootstrap draws
    y, p = label[draw[0]], prediction[draw[0]]
    tp, fp, fn, tn = (int(((p == a) & (y == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1), (0, 0)))
    f1 = 2 * tp / (2 * tp + fp + fn)
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert resampled_metric("f1_accuracy", prediction, label, draw)[0] == pytest.approx(100 * f1)
    assert resampled_metric("matthews", prediction, label, draw)[0] == pytest.approx(100 * mcc)
    assert 100 * f1 == pytest.approx(100 * f1_score(y, p)) and 100 * mcc == pytest.approx(100 * matthews_corrcoef(y, p))


def write_record(root, name, method, seed, target, prediction, baseline_prediction, label, idx, kind="accuracy"):
    directory = root / name
    examples = {"idx": idx, "label": label, "prediction": prediction, "baseline_prediction": baseline_prediction}
    metric = compute_metrics(kind, prediction, label)["accuracy"]
    baseline = compute_metrics(kind, baseline_prediction, label)["accuracy"]
    record = results.new_record(
        task="sst2", method=method, model="tiny", budget="smoke", seed=seed, speedup_target=target, status="ok",
        metric_name="accuracy", metric=metric, baseline_metric=baseline, flops_speedup=target, flops_mode="canonical",
        config={"task": {"metric": kind}}, started_at="2026-01-01T00:00:00", n_eval=len(idx),
        examples=results.write_examples(examples, directory))
    results.write(record, directory)


@pytest.fixture
def two_methods(tmp_path):
    """Method a is right on 85% of 400 examples, b on the same ones but 20 more wrong; the full model 90%."""
    rng = np.random.default_rng(1)
    for seed in (1, 2, 3):
        label = rng.integers(0, 2, 400)
        idx = rng.permutation(1000)[:400]
        right_a = rng.random(400) < 0.85
        right_b = right_a.copy()
        right_b[np.flatnonzero(right_a)[:20]] = False
        full = np.where(rng.random(400) < 0.9, label, 1 - label)
        for method, right in (("a", right_a), ("b", right_b)):
            prediction = np.where(right, label, 1 - label)
            write_record(tmp_path, f"{method}{seed}", method, seed, 2.0, prediction, full, label, idx)
    return tmp_path


def test_the_paired_difference_is_on_matched_examples_and_shuffling_one_side_widens_it(two_methods, tmp_path):
    ok = pareto.usable(two_methods).ok
    diff = paired_differences(ok, n_resamples=400).set_index(["a", "b"]).loc[("a", "b")]
    assert diff["diff"] == pytest.approx(5.0)  # 20 of 400 examples
    assert diff["lo"] > 0 and diff["beyond"] and diff["n_seeds"] == 3
    paired_width = diff["hi"] - diff["lo"]

    # b's outputs (prediction with its label) reassigned to other examples' ids: b's own metric is
    # unchanged, the pairing with a is lost, and the interval widens
    rng = np.random.default_rng(2)
    for seed in (1, 2, 3):
        path = two_methods / f"b{seed}"
        examples = results.read_examples(path)
        shuffled = {k: examples[k].to_numpy() for k in examples}
        shuffled["idx"] = shuffled["idx"][rng.permutation(len(examples))]
        results.write_examples(shuffled, path)
    ok = pareto.usable(two_methods).ok
    unpaired = paired_differences(ok, n_resamples=400).set_index(["a", "b"]).loc[("a", "b")]
    assert unpaired["diff"] == pytest.approx(5.0)  # the same totals
    assert unpaired["hi"] - unpaired["lo"] > 2 * paired_width


def test_cell_intervals_cover_the_mean_and_count_seeds(two_methods):
    ok = pareto.usable(two_methods).ok
    cells = cell_intervals(ok, n_resamples=300).set_index("method")
    for method in ("a", "b"):
        cell = cells.loc[method]
        assert cell["lo"] < cell["metric_mean"] < cell["hi"] and cell["n_seeds"] == 3
        assert 1 < cell["half_width"] < 6  # ~1.8 points of one accuracy on 400, less over 3 seeds, plus seed spread
    one_seed = cell_intervals(ok[ok.seed == 1], n_resamples=300).set_index("method")
    assert one_seed.loc["a", "n_seeds"] == 1


def test_speedup_within_a_drop_has_a_lower_bound(two_methods):
    ok = pareto.usable(two_methods).ok
    out = speedup_within_drop(ok, max_drop=10.0, n_resamples=200).set_index("method")
    assert out.loc["a", "speedup"] == pytest.approx(2.0)
    assert 1.0 <= out.loc["a", "lower_bound"] <= out.loc["a", "speedup"]


def test_the_command_prints_intervals_and_paired_differences(two_methods, tmp_path, capsys):
    from analysis.uncertainty import main

    assert main(["--results", str(two_methods), "--against", "b", "--resamples", "200", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "± " in printed and "(3)" in printed  # mean ± half-width (seeds)
    assert "+5.0 [" in printed and "▲" in printed  # a beats b beyond the interval
    assert (tmp_path / "out" / "uncertainty_cells.md").is_file() and (tmp_path / "out" / "uncertainty_differences.csv").is_file()


def test_tables_name_the_code_versions_when_the_records_mix_them(two_methods, tmp_path):
    from analysis.uncertainty import write_verdict_tables

    ok = pareto.usable(two_methods).ok
    assert pareto.code_versions(ok) is None
    mixed = ok.assign(git_commit=np.where(ok["method"] == "a", "a" * 40, "b" * 40))
    written = [p for p in write_verdict_tables(mixed, tmp_path / "out", against="b", n_resamples=50) if p.suffix == ".md"]
    assert written and all("2 code versions: aaaaaaa (3), bbbbbbb (3)." in p.read_text() for p in written)


def test_figures_draw_the_bootstrap_interval_and_say_so(two_methods, tmp_path):
    """A Pareto panel's error bars are the cell's 95% interval (not ±1 std) when the records keep their
    examples, each frontier of several points gets a band, the caption says which spread is drawn, and
    make_all writes the verdict tables beside the figures."""
    import matplotlib

    matplotlib.use("Agg")
    from analysis import figures

    for seed in (1, 2, 3):  # a second target for a, so its frontier has two points and a band
        rng = np.random.default_rng(seed)
        same = results.read_examples(two_methods / f"a{seed}" / "result.json")  # the seed's examples
        label, idx = same["label"].to_numpy(), same["idx"].to_numpy()
        prediction = np.where(rng.random(400) < 0.75, label, 1 - label)
        write_record(two_methods, f"a3x{seed}", "a", seed, 3.0, prediction, same["baseline_prediction"].to_numpy(), label, idx)
    ok = pareto.usable(two_methods).ok
    cells = figures.intervals(ok, n_resamples=200)
    a2 = cells[(cells.method == "a") & (cells.speedup_target == 2.0)].iloc[0]
    fig, ax = matplotlib.pyplot.subplots()
    figures.plot_panel(ax, ok, "sst2", "flops_speedup", cells)
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    spans = [seg for c in bars for seg in c.lines[2][-1].get_segments()]  # the vertical error bars
    assert any(s[0][1] == pytest.approx(a2.lo) and s[1][1] == pytest.approx(a2.hi) for s in spans)
    assert any(isinstance(c, matplotlib.collections.PolyCollection) for c in ax.collections)  # the band
    text = figures.caption(ok, ["sst2"], ["flops_speedup"], cells=cells)
    assert "95% interval" in text and "±1 std" not in text
    assert "±1 std" in figures.caption(ok, ["sst2"], ["flops_speedup"], cells=None)
    written = figures.make_all(ok, tmp_path / "figs", axes=("flops_speedup",), formats=("png",))
    names = {p.name for p in written}
    assert {"uncertainty_cells.md", "uncertainty_differences.md", "sst2.png"} <= names
    assert "95% interval" in (tmp_path / "figs" / "sst2.caption.txt").read_text()
