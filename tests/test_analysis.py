"""The analysis layer: frontiers, interpolation, hypervolume and seeds on hand-made points; the
figures command and the notebooks on the records fixture (tests/fixtures/records: 4 tasks, the full
model and 4 methods, 1-3 seeds, null wall-clock fields, 1 failed and 2 skipped records)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures  # noqa: E402
from analysis import pareto as P  # noqa: E402
from tokenprune import results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "records"
NOTEBOOKS = sorted((REPO / "analysis" / "notebooks").glob("*.py"))


def pts(*rows: tuple[float, float]) -> pd.DataFrame:
    """Points from (speedup, drop) pairs, with metric = 90 - drop."""
    df = pd.DataFrame(rows, columns=["speedup", "drop_mean"])
    return df.assign(metric_mean=90.0 - df["drop_mean"])


def records(*rows: dict) -> pd.DataFrame:
    base = dict(model="tiny", budget="smoke", status="ok", metric_name="accuracy", speedup_target=1.0, flops_speedup=1.0)
    frame = pd.DataFrame([results.new_record(**{**base, **r}) for r in rows])
    return P.prepare(frame.assign(path=[f"job{i}/result.json" for i in range(len(frame))]))


# ---- frontiers and interpolation ----------------------------------------------------------------


def test_a_dominated_point_drops_out_of_the_frontier():
    front = P.pareto_front(pts((1.5, 0.2), (1.4, 0.5), (2.0, 1.6), (3.0, 1.4), (3.0, 1.4)))
    assert front[["speedup", "drop_mean"]].values.tolist() == [[1.5, 0.2], [3.0, 1.4]]  # duplicates kept once
    assert P.pareto_mask([1, 2, 2, np.nan], [5, 4, 3, 9]).tolist() == [True, True, False, False]
    assert P.pareto_mask([1, 2], [5, 4], minimize_y=True).tolist() == [False, True]


def test_frontiers_per_method_and_across_methods():
    a = pts((1.5, 0.2), (3.0, 1.4)).assign(method="a")
    b = pts((2.0, 0.1), (2.5, 2.0)).assign(method="b")
    marked = P.mark_frontiers(pd.concat([a, b], ignore_index=True).assign(task="t", setting="s"))
    assert marked["on_frontier"].tolist() == [True, True, True, True]
    # across methods, b's 2x point dominates a's 1.5x point, and a's 3x point dominates b's 2.5x point
    assert marked["on_overall_frontier"].tolist() == [False, True, True, False]


def test_speedup_at_a_drop_is_interpolated_linearly_in_log_speedup_and_flagged():
    points = pts((1.5, 0.2), (2.0, 1.6), (3.0, 1.4))  # (2, 1.6) is dominated by (3, 1.4)
    at = P.speedup_at_drop(points, 1.0)
    # t = (1.0 - 0.2) / (1.4 - 0.2) = 2/3 of the way from log 1.5 to log 3
    assert at.value == pytest.approx(1.5 * 2 ** (2 / 3)) and at.value == pytest.approx(2.3811, abs=1e-4)
    assert at.kind == "interpolated" and at.interpolated
    measured = P.speedup_at_drop(points, 0.2)
    assert (measured.value, measured.kind, measured.interpolated) == (1.5, "measured", False)
    assert P.speedup_at_drop(points, 2.0) == P.OnFrontier(3.0, "lower bound")
    assert P.speedup_at_drop(points, 0.1).kind == "not reached" and math.isnan(P.speedup_at_drop(points, 0.1).value)


def test_metric_at_a_fixed_speedup():
    points = pts((1.5, 0.2), (2.0, 1.6), (3.0, 1.4))
    at = P.metric_at_speedup(points, 2.25)
    assert at.value == pytest.approx(89.8 - math.log2(1.5) * 1.2) and at.interpolated
    assert P.metric_at_speedup(points, 3.0) == P.OnFrontier(pytest.approx(88.6), "measured")
    assert P.metric_at_speedup(points, 1.2) == P.OnFrontier(pytest.approx(89.8), "lower bound")
    assert P.metric_at_speedup(points, 4.0).kind == "not reached"


def test_hypervolume_of_a_point_and_of_a_staircase():
    # one point at 4x with a 1-point drop: log2(4) * (5 - 1)
    assert P.hypervolume(pts((4.0, 1.0))) == pytest.approx(8.0)
    assert P.hypervolume(pts((4.0, 1.0)), ref_drop=10) == pytest.approx(18.0)
    # staircase (2x, 0) and (4x, 2), plus a dominated (3x, 3): 1 * 5 + 1 * 3
    assert P.hypervolume(pts((2.0, 0.0), (4.0, 2.0), (3.0, 3.0))) == pytest.approx(8.0)
    # slower than the full model, or worse than the reference: nothing
    assert P.hypervolume(pts((0.8, 0.0), (2.0, 6.0))) == 0.0
    assert P.hypervolume(pts()) == 0.0


# ---- records: drop, seeds, selection ------------------------------------------------------------


def test_drop_is_against_the_full_model_of_the_same_task_and_seed():
    ok = P.select(records(
        dict(task="sst2", method="bert", seed=1, metric=90.0, baseline_metric=90.0),
        dict(task="sst2", method="bert", seed=2, metric=92.0, baseline_metric=92.0),
        dict(task="sst2", method="topk", seed=1, speedup_target=2.0, metric=89.0),  # no baseline: the bert record
        dict(task="sst2", method="topk", seed=2, speedup_target=2.0, metric=91.0),
        dict(task="sst2", method="topk", seed=3, speedup_target=2.0, metric=88.0, baseline_metric=88.5),  # its own
        dict(task="rte", method="topk", seed=1, speedup_target=2.0, metric=60.0),  # no full model at all
    )).ok
    drop = ok.set_index(["task", "method", "seed"])["drop"]
    assert drop[("sst2", "topk", 1)] == pytest.approx(1.0) and drop[("sst2", "topk", 2)] == pytest.approx(1.0)
    assert drop[("sst2", "topk", 3)] == pytest.approx(0.5)
    assert math.isnan(drop[("rte", "topk", 1)])
    ref = P.reference(ok).set_index("task")
    assert ref.loc["sst2", "mean"] == pytest.approx(91.0) and ref.loc["sst2", "n"] == 2
    assert ref.loc["sst2", "std"] == pytest.approx(np.std([90, 92], ddof=1))


def test_mean_and_spread_over_seeds():
    ok = P.select(records(
        *[dict(task="sst2", method="topk", seed=s, speedup_target=2.0, metric=m, baseline_metric=90.0, flops_speedup=f)
          for s, m, f in ((1, 88.0, 1.9), (2, 89.0, 2.0), (3, 90.0, 2.1))],
        dict(task="sst2", method="topk", seed=1, speedup_target=3.0, metric=85.0, baseline_metric=90.0, flops_speedup=3.0),
    )).ok
    points = P.points(ok, "flops_speedup").set_index("speedup_target")
    assert points.loc[2.0, ["n", "metric_mean", "metric_std", "drop_mean"]].tolist() == pytest.approx([3, 89.0, 1.0, 1.0])
    assert points.loc[2.0, "speedup"] == pytest.approx(2.0) and points.loc[2.0, "speedup_std"] == pytest.approx(0.1)
    assert points.loc[2.0, "seeds"] == [1, 2, 3]
    assert points.loc[3.0, "n"] == 1 and math.isnan(points.loc[3.0, "metric_std"])
    spread = P.mean_over_seeds(ok, by=["task"], columns=["metric"])
    assert spread.loc[0, "n"] == 4 and spread.loc[0, "metric_mean"] == pytest.approx(88.0)


def test_select_skips_records_that_are_not_ok_and_superseded_reruns():
    df = records(
        dict(task="sst2", method="topk", seed=1, speedup_target=2.0, metric=80.0, started_at="2025-01-01T00:00:00"),
        dict(task="sst2", method="topk", seed=1, speedup_target=2.0, metric=81.0, started_at="2025-01-02T00:00:00"),
        dict(task="sst2", method="topk", seed=1, speedup_target=3.0, status="failed", metric=None),
        dict(task="mnli", method="topk", seed=1, speedup_target=2.0, status="skipped", metric=None),
    )
    selection = P.select(df)
    assert selection.ok["metric"].tolist() == [81.0]  # the later run wins
    assert selection.left_out == {"failed": 1, "skipped": 1, "superseded re-runs": 1}
    assert "4 records" in selection.message() and "1 used" in selection.message()
    assert "code versions" not in selection.message()  # one version (here: none recorded): nothing to say


def test_records_of_several_code_versions_are_named_in_the_message():
    sha = lambda c: c * 40  # noqa: E731
    rows = [dict(task="sst2", method=m, seed=1, speedup_target=t, metric=80.0, git_commit=c)
            for m, t, c in [("bert", 1.0, sha("a")), ("topk", 2.0, sha("a")), ("trbert", 2.0, sha("b"))]]
    rows.append(dict(task="sst2", method="random", seed=1, speedup_target=2.0, metric=79.0,
                     git_commit=sha("b") + "-dirty-0123456789ab"))
    selection = P.select(records(*rows))
    assert "3 code versions: aaaaaaa (2), bbbbbbb (1), bbbbbbb-dirty-0123456789ab (1)." in selection.message()
    assert P.code_versions(selection.ok[selection.ok["method"].isin(["bert", "topk"])]) is None


def test_the_wallclock_axis_leaves_out_records_without_timing():
    ok = P.usable(FIXTURE).ok
    flops, wall = P.points(ok, "flops_speedup"), P.points(ok, "wallclock_speedup_b1")
    assert {"topk", "trbert"} <= set(flops[flops["task"] == "cola"]["method"])
    assert not {"topk", "trbert"} & set(wall[wall["task"] == "cola"]["method"])
    with pytest.raises(ValueError, match="unknown speedup axis"):
        P.points(ok, "latency")


def test_summary_and_tables_on_the_fixture():
    ok = P.usable(FIXTURE).ok
    summ = P.summary(ok, "flops_speedup")
    assert set(summ["task"]) == {"sst2", "mrpc", "cola", "rte"} and P.FULL_MODEL not in set(summ["method"])
    row = summ.set_index(["task", "method"]).loc[("sst2", "trbert")]
    assert row["speedup_at_drop_2_kind"] == "lower bound" and row["hypervolume"] > 0
    table = P.speedup_table(summ, 1.0)
    assert list(table.columns) == ["CoLA", "MRPC", "RTE", "SST-2"], "tasks by the names people read"
    assert list(table.index) == ["metric", "full model", "seeds per point", "Top-k attention", "TR-BERT", "PoWER-BERT", "DistilBERT"]
    assert table.loc["metric", "MRPC"] == "F1" and table.loc["full model", "SST-2"] == "90.50 ± 0.40 (3 seeds)"
    assert table.loc["seeds per point", "SST-2"] == "1–3"
    assert any(cell.startswith("≈") for cell in table.values.ravel()), "interpolated cells are marked"
    md = P.to_markdown(table, "note")
    assert md.startswith("| method |") and md.rstrip().endswith("note")
    tex = P.to_latex(table)
    assert "\\midrule\nTop-k attention" in tex, "a rule between the full model's rows and the methods'"
    tex = P.to_latex(pd.DataFrame({"a_b": ["≥2.00×", "≈1.50×", "—"]}, index=pd.Index(["x", "y", "z"], name="method")))
    assert r"a\_b" in tex and r"$\geq$2.00$\times$" in tex and r"$\approx$1.50$\times$" in tex and "--" in tex


def test_table_cells_say_what_they_are_and_a_slowdown_is_never_a_bound():
    assert P.format_at(2.41, "measured") == "2.41×"
    assert P.format_at(2.41, "interpolated") == "≈2.41×"
    assert P.format_at(2.41, "lower bound") == "≥2.41×"
    assert P.format_at(0.6, "lower bound") == "0.60× (slower)"  # not "≥0.60×", which reads as "maybe faster"
    assert P.format_at(0.8, "interpolated") == "≈0.80× (slower)"
    assert P.format_at(math.nan, "not reached") == "—"


# ---- reported points ----------------------------------------------------------------------------


def test_reported_points_are_read_rows_only_and_drawn_only_on_a_panel_of_their_own(tmp_path):
    reported = P.load_reported()
    assert len(reported) and set(reported["status"]) == {"READ"}
    assert set(reported["axis"]) == {"*", "flops_speedup", "wallclock_speedup_b1"}
    extra = tmp_path / "extra.csv"
    pd.DataFrame([dict(method="trbert", task="sst2", model="bert-base", metric_name="accuracy", metric=93.0, speedup=3.0,
                       speedup_accounting="flops_trbert", split="dev", source="memory", status="RECALL")]).to_csv(extra, index=False)
    assert P.load_reported([extra]).empty

    ok = P.usable(FIXTURE).ok

    def hollow_per_panel(task):
        fig = figures.task_figure(ok, task, reported=reported)
        panels = [(ax.get_title(), [c for c in ax.collections if (c.get_gid() or "").startswith("reported:")]) for ax in fig.axes]
        legend = [t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()]
        plt.close(fig)
        for _, drawn in panels:
            assert all(len(c.get_facecolors()) == 0 for c in drawn), "reported points are hollow"
        return [(title, len(drawn)) for title, drawn in panels], legend

    # sst2: the two papers' BERT-base rows, DistilBERT's static 2x and PoWER-BERT's K80 wall clock, all on their own panel
    panels, legend = hollow_per_panel("sst2")
    assert panels == [("SST-2: FLOPs", 0), ("SST-2: wall clock, batch 1", 0), ("As reported in the papers", 4)]
    assert "PoWER-BERT (bert-base), reported: wall clock, K80 batch 128, GLUE test" in legend
    fake = ok.assign(task="hyperpartisan")
    fig = figures.task_figure(fake, "hyperpartisan", reported=reported)
    assert len(fig.axes) == 2, "no reported panel for a task the papers did not report"
    plt.close(fig)


def test_every_wallclock_axis_names_its_hardware_and_batch_size():
    ok = P.usable(FIXTURE).ok
    assert figures.axis_label(ok, "wallclock_speedup_b1") == "wall-clock speedup (×)\nbatch 1, Intel Xeon Processor, 1 thread"
    assert figures.axis_label(ok, "throughput_speedup") == "throughput speedup (×)\nbatch 32, Intel Xeon Processor, 1 thread"
    gpu = {"timing": {"device_name": "NVIDIA H200", "batch_size": 64}, "hardware": {"cpu": "AMD EPYC"}}
    assert P.timed_on(gpu, "throughput_speedup") == "batch 64, NVIDIA H200"
    assert P.timed_on({}, "wallclock_speedup_b1") == "batch 1, hardware not recorded"
    for fig in (figures.grid_figure(ok, "wallclock_speedup_b1"), figures.task_figure(ok, "sst2"),
                figures.flops_vs_wallclock_figure(ok)):
        assert any("batch 1, Intel Xeon Processor, 1 thread" in t.get_text() for t in fig.findobj(matplotlib.text.Text))
        plt.close(fig)


# ---- the figures command ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def figures_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = figures.main(["--results", str(FIXTURE), "--out", str(out), "--size", "column"])
    return code, buffer.getvalue(), out


STEMS = ["sst2", "mrpc", "cola", "rte", "grid_flops", "grid_wallclock", "flops_vs_wallclock"]


def test_figures_command_writes_figures_captions_and_tables(figures_run):
    code, printed, out = figures_run
    assert code == 0
    assert "Skipping 3 records that are not ok: 1 failed, 2 skipped." in printed
    assert "15 records have no wallclock_speedup_b1" in printed
    for stem in STEMS:
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000, stem
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 10_000, stem
        assert len((out / f"{stem}.caption.txt").read_text()) > 100, "the caption goes beside the figure, not in it"
    assert "Wall-clock speedups timed at batch 1, Intel Xeon Processor, 1 thread." in (out / "sst2.caption.txt").read_text()
    assert not (out / "mnli.png").exists()  # only skipped records
    md = (out / "speedup_at_1pt_flops.md").read_text()
    assert "| method | CoLA | MRPC | RTE | SST-2 |" in md and "| Top-k attention |" in md and "interpolated" in md
    tex = (out / "speedup_at_1pt_wallclock.tex").read_text()
    assert r"\begin{tabular}{lrrrr}" in tex and r"\toprule" in tex and "Top-k attention" in tex
    assert "Timed at batch 1, Intel Xeon Processor, 1 thread." in tex
    summary = pd.read_csv(out / "summary_flops.csv")
    assert {"speedup_at_drop_0.5", "speedup_at_drop_1", "speedup_at_drop_2", "hypervolume"} <= set(summary.columns)


def pdf_facts(path: Path) -> tuple[float, set[float], bytes]:
    """(page width in points, the font sizes its text is set in, the raw file) of a matplotlib PDF."""
    import re
    import zlib

    data = path.read_bytes()
    width = float(re.search(rb"/MediaBox \[ *[\d.]+ [\d.]+ ([\d.]+) [\d.]+ *\]", data).group(1))
    sizes = set()
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            sizes |= {float(x) for x in re.findall(rb"/F\d+ ([\d.]+) Tf", zlib.decompress(stream))}
        except zlib.error:
            pass
    return width, sizes, data


def test_column_figures_are_a_column_wide_with_text_of_7_pt_or_more_and_no_type3_fonts(figures_run):
    _, _, out = figures_run
    for stem in STEMS:
        width, sizes, data = pdf_facts(out / f"{stem}.pdf")
        assert width == pytest.approx(figures.SIZES["column"] * 72), stem  # placed at column width: 100%
        assert sizes and min(sizes) >= 7, (stem, sizes)
        assert b"/Subtype /Type3" not in data and b"/FontType 3" not in data, f"{stem}: Type 3 font"
        assert b"/FontFile2" in data, f"{stem}: TrueType fonts embedded"
        from PIL import Image

        with Image.open(out / f"{stem}.png") as png:
            assert png.size[0] / png.info["dpi"][0] == pytest.approx(figures.SIZES["column"], abs=0.01)


@pytest.mark.parametrize("size", list(figures.SIZES))
def test_every_text_of_every_figure_is_7_pt_or_more(size):
    ok = P.usable(FIXTURE).ok
    built = [figures.task_figure(ok, "sst2", reported=P.load_reported(), size=size),
             figures.grid_figure(ok, "wallclock_speedup_b1", size=size), figures.flops_vs_wallclock_figure(ok, size)]
    for fig in built:
        assert fig.get_size_inches()[0] == pytest.approx(figures.SIZES[size])
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
        assert texts and min(t.get_fontsize() for t in texts) >= 7
        fig.canvas.draw()
        inside = fig.bbox.padded(1)
        for t in texts:  # nothing is cut off at the figure's edge
            box = t.get_window_extent()
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, t.get_text()
        plt.close(fig)


def test_figures_command_explains_bad_input(tmp_path, capsys):
    assert figures.main(["--results", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "output directories" in capsys.readouterr().err
    results.write(results.new_record(task="sst2", method="topk", status="failed", error="x"), tmp_path / "runs" / "0")
    assert figures.main(["--results", str(tmp_path / "runs"), "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "Skipping 1 records that are not ok: 1 failed." in captured.out and "nothing to plot" in captured.err


# ---- notebooks ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Kernels of this very interpreter, from a kernelspec written for the test (no user install)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(str(kernels / "tokenprune-test"), overrides={
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]})
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    return lambda: KernelManager(kernel_name="tokenprune-test", kernel_spec_manager=specs)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_on_the_fixture(notebook, kernel_manager_factory, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    monkeypatch.setenv(P.RESULTS_ENV, str(FIXTURE))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = jupytext.reads(notebook.read_text(), fmt="py:percent")
    client = NotebookClient(nb, km=kernel_manager_factory(), timeout=180,
                            resources={"metadata": {"path": str(REPO / "analysis" / "notebooks")}})
    client.execute(cleanup_kc=True)  # shut the kernel down: the test owns its kernel manager
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "98 used" in text
    # every figure: pareto's two grids and four tasks; flops_vs_wallclock's one
    assert sum("image/png" in o.get("data", {}) for o in outputs) == {"pareto": 6, "flops_vs_wallclock": 1}[notebook.stem]
    assert not [o for o in outputs if o.get("output_type") == "error"]


def test_the_documented_notebook_command_runs(tmp_path):
    """The notebook's own docstring command, `jupytext --execute` (the dev extras have nbconvert for it)."""
    import json
    import shlex
    import subprocess

    notebook = REPO / "analysis" / "notebooks" / "pareto.py"
    documented = next(line for line in notebook.read_text().splitlines() if "jupytext --execute" in line)
    command = shlex.split(documented.split("`")[1])
    assert command[0] == f"{P.RESULTS_ENV}=multirun/2025-01-01" and command[1:3] == ["jupytext", "--execute"]
    out = tmp_path / "pareto.ipynb"  # not beside the notebook, where a user's own .ipynb may be
    subprocess.run([*command[1:], "-o", str(out), "--run-path", str(notebook.parent)], cwd=REPO, check=True, timeout=300,
                   env={**os.environ, P.RESULTS_ENV: str(FIXTURE)}, capture_output=True)
    cells = json.loads(out.read_text())["cells"]
    outputs = [o for cell in cells if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
    assert outputs and not [o for o in outputs if o["output_type"] == "error"]


def test_notebooks_are_percent_scripts_without_committed_ipynb():
    assert {p.stem for p in NOTEBOOKS} == {"pareto", "flops_vs_wallclock"}
    for notebook in NOTEBOOKS:
        text = notebook.read_text()
        assert "format_name: percent" in text and "# %%" in text
        assert "from analysis import figures, pareto" in text
    assert not list((REPO / "analysis" / "notebooks").glob("*.ipynb")) or "*.ipynb" in (REPO / ".gitignore").read_text()
