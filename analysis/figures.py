"""Figures and tables from result records.

    python -m analysis.figures --results multirun/ [more dirs] --out figures/

writes, for every task with records, `<task>.png/.pdf` (metric against FLOPs speedup and against
wall-clock speedup, log-x), a grid over tasks per speedup axis (`grid_<axis>.png/.pdf`), the
FLOPs-against-wall-clock figure (`flops_vs_wallclock.png/.pdf`), and per axis the table of speedup at
≤ 1 point drop per task × method (`speedup_at_1pt_<axis>.md/.tex`) and the full summary
(`summary_<axis>.csv`). Records that are not `ok` are skipped, with a printed count; records with a
null value on an axis are left off that axis's plots only. The numbers the papers report
(`experiments/reference/*.csv`) are drawn as hollow "reported" markers where the task matches.
All the numbers come from `analysis.pareto`; this module only draws and writes.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from analysis import pareto as P

AXIS_LABELS = {
    "flops_speedup": "FLOPs speedup (×, log scale)",
    "wallclock_speedup_b1": "wall-clock speedup, batch 1 (×, log scale)",
    "throughput_speedup": "throughput speedup, batched (×, log scale)",
}
AXIS_SHORT = {"flops_speedup": "flops", "wallclock_speedup_b1": "wallclock", "throughput_speedup": "throughput"}
DEFAULT_AXES = ("flops_speedup", "wallclock_speedup_b1")
METRIC_LABELS = {"accuracy": "accuracy", "f1": "F1", "matthews": "Matthews corr.", "spearman": "Spearman corr.", "pearson": "Pearson corr."}
TASK_ORDER = ["cola", "sst2", "mrpc", "rte", "stsb", "qnli", "mnli", "qqp", "wnli", "imdb", "news20", "hyperpartisan"]
# One colour, marker and frontier line style per method, stable across every figure.
KNOWN_METHODS = ["topk", "trbert", "adapler", "powerbert", "distilbert", "truncate", "random", "ltp", "lat"]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 2, 1, 2)), (0, (8, 2)), (0, (2, 2))]
# candidate ticks (×) on log axes, with a rank: the lowest ranks are kept when there are too many
TICKS = {1: 0, 2: 0, 10: 0, 0.5: 1, 3: 1, 5: 1, 20: 1, 50: 1, 100: 1, 0.25: 2, 1.5: 2, 4: 2, 30: 2,
         0.75: 3, 2.5: 3, 6: 3, 8: 3, 15: 3, 1.25: 4, 12: 4}


def style(method: str) -> dict:
    """Colour, marker and line style of a method (the full model is black)."""
    if method == P.FULL_MODEL:
        return {"color": "black", "marker": "*", "linestyle": "--"}
    i = KNOWN_METHODS.index(method) if method in KNOWN_METHODS else len(KNOWN_METHODS) + zlib.crc32(method.encode()) % 7
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def metric_label(metric_name: str | None) -> str:
    return f"{METRIC_LABELS.get(metric_name, metric_name or 'metric')} (dev, 0–100)"


def order_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


# ---- one panel ----------------------------------------------------------------------------------


def plot_panel(ax, ok: pd.DataFrame, task: str, axis: str = "flops_speedup", reported: pd.DataFrame | None = None,
               annotate: bool = True) -> dict[str, Line2D]:
    """Metric against `axis` for one task: each method's points (mean over seeds, error bars ±1 std),
    its frontier as a line, dominated points faded, the frontier over all methods as a grey band, the
    full model as a dashed line (±1 std shaded), and the papers' reported points as hollow markers.
    Returns legend handles by label."""
    P._check_axis(axis)
    rows = ok[ok["task"] == task]
    pts = P.mark_frontiers(P.points(rows, axis))
    ref = P.reference(rows)
    several = rows["setting"].nunique() > 1
    handles: dict[str, Line2D] = {}
    xs: list[float] = [1.0]
    labels: list[tuple] = []  # (x, y, text, colour) of the reported points, placed once the x range is known

    for setting, group in pts.groupby("setting", sort=True):
        overall = P.pareto_front(group)
        if group["method"].nunique() > 1 and len(overall) > 1:
            ax.plot(overall["speedup"], overall["metric_mean"], color="0.55", lw=6, alpha=0.25, zorder=1, solid_capstyle="round")
            handles["frontier over all methods"] = Line2D([], [], color="0.55", lw=6, alpha=0.25)
    settings = sorted(rows["setting"].unique())
    setting_lines = ["-", "--", ":", "-."]  # when a task has several settings: one line style each, colour per method
    for (setting, method), group in pts.groupby(["setting", "method"], sort=True):
        st = style(method)
        if several:
            st["linestyle"] = setting_lines[settings.index(setting) % len(setting_lines)]
        label = method + (f" ({setting})" if several else "")
        xs.extend(group["speedup"])
        for on, alpha in ((True, 1.0), (False, 0.3)):
            part = group[group["on_frontier"] == on]
            if part.empty:
                continue
            ax.errorbar(part["speedup"], part["metric_mean"], yerr=part["metric_std"].fillna(0), xerr=part["speedup_std"].fillna(0),
                        fmt=st["marker"], color=st["color"], alpha=alpha, ms=5, capsize=2, elinewidth=0.8, zorder=3)
        front = P.pareto_front(group)
        ax.plot(front["speedup"], front["metric_mean"], color=st["color"], linestyle=st["linestyle"], lw=1.5, zorder=2)
        handles[label] = Line2D([], [], color=st["color"], marker=st["marker"], linestyle=st["linestyle"], ms=5)
        if (~group["on_frontier"]).any():
            handles["dominated point (faded)"] = Line2D([], [], color="0.5", marker="o", linestyle="none", alpha=0.3, ms=5)

    for r in ref.itertuples():
        label = "full model (bert)" + (f" ({r.setting})" if several else "")
        line = setting_lines[settings.index(r.setting) % len(setting_lines)] if several else "--"
        ax.axhline(r.mean, color="black", linestyle=line, lw=1, zorder=2)
        if np.isfinite(r.std):
            ax.axhspan(r.mean - r.std, r.mean + r.std, color="black", alpha=0.07, lw=0, zorder=0)
        ax.plot([1.0], [r.mean], marker="*", color="black", ms=9, linestyle="none", zorder=4)
        handles[label + ", mean ± std"] = Line2D([], [], color="black", linestyle=line, marker="*", ms=8)

    if reported is not None and len(reported):
        mine = reported[(reported["task"] == task) & reported["axis"].isin([axis, "*"])]
        for r in mine.itertuples():
            st = style(r.method)
            ax.scatter([r.speedup], [r.metric], marker=st["marker"], s=55, facecolors="none", edgecolors=st["color"],
                       linewidths=1.4, zorder=5, gid=f"reported:{r.method}")
            xs.append(r.speedup)
            if annotate and r.method != P.FULL_MODEL:
                labels.append((r.speedup, r.metric, f"{r.method} reported ({r.split})", st["color"]))
        full = mine[mine["method"] == P.FULL_MODEL]
        if annotate and len(full):
            splits = "/".join(f"{m:g} {s}" for m, s in zip(full["metric"], full["split"]))
            labels.append((1.0, full["metric"].max(), f"BERT-base reported ({splits})", "black"))
        for r in mine.drop_duplicates(["method", "model"]).itertuples():
            st = style(r.method)
            label = "BERT-base, reported in papers" if r.method == P.FULL_MODEL else f"{r.method}, reported in paper ({r.model})"
            handles[label] = Line2D(
                [], [], marker=st["marker"], markerfacecolor="none", markeredgecolor=st["color"], linestyle="none", ms=7, mew=1.4)

    if pts.empty and ref.empty:
        ax.text(0.5, 0.5, f"no records with a\n{P.AXES[axis]}", transform=ax.transAxes, ha="center", va="center", color="0.4")
    _log_x(ax, xs)
    ax.margins(y=0.08)
    lo, hi = (math.log(v) for v in ax.get_xlim())
    for x, y, text, color in labels:  # to the left of points in the right third, so labels stay inside
        right = (math.log(x) - lo) / (hi - lo) > 0.66
        ax.annotate(text, (x, y), xytext=(-6 if right else 6, 4), textcoords="offset points", fontsize=6.5, color=color,
                    ha="right" if right else "left")
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel(metric_label(P._first(rows["metric_name"]) if len(rows) else None))
    ax.grid(True, which="major", alpha=0.3)
    return handles


def _log_x(ax, xs: Sequence[float]) -> None:
    xs = [x for x in xs if x is not None and np.isfinite(x) and x > 0]
    lo, hi = min(min(xs), 1.0) / 1.12, max(max(xs), 1.5) * 1.12
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    _speedup_ticks(ax.xaxis, lo, hi)


def _speedup_ticks(axis, lo: float, hi: float, most: int = 5) -> None:
    candidates = sorted((rank, t) for t, rank in TICKS.items() if lo <= t <= hi)
    ticks = sorted(t for _, t in candidates[:most])
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))


def _caption(reported: pd.DataFrame | None, tasks: Sequence[str], axes: Sequence[str], seeds: int) -> str:
    text = (f"Mean over seeds ({'up to ' if seeds > 1 else ''}{seeds} per point); error bars ±1 std. Lines: each method's Pareto frontier "
            "(maximise metric and speedup); faded markers: dominated points. Dashed: the full model.")
    if reported is not None and len(reported):
        drawn = reported[reported["task"].isin(tasks) & reported["axis"].isin([*axes, "*"])]
        if len(drawn):
            parts = sorted({f"{m}: {s}, {a.replace('_', ' ')}" for m, s, a in
                            zip(drawn["method"], drawn["split"], drawn["speedup_accounting"]) if m != P.FULL_MODEL})
            text += ("\nHollow markers: numbers reported in the papers on BERT-base, not our model, and not part of our "
                     "frontiers (" + "; ".join(parts) + ").")
    return text


# ---- figures ------------------------------------------------------------------------------------


def task_figure(ok: pd.DataFrame, task: str, axes: Sequence[str] = DEFAULT_AXES, reported: pd.DataFrame | None = None):
    """One task, one panel per speedup axis, sharing the metric axis."""
    fig, panels = plt.subplots(1, len(axes), figsize=(5.2 * len(axes), 4.6), sharey=True, squeeze=False)
    handles: dict[str, Line2D] = {}
    for ax, axis in zip(panels[0], axes):
        handles.update(plot_panel(ax, ok, task, axis, reported))
        ax.set_title(f"{task}: metric vs {P.AXES[axis]}", fontsize=10)
    for ax in panels[0][1:]:
        ax.yaxis.set_tick_params(labelleft=True)
    rows = ok[ok["task"] == task]
    seeds = int(rows.groupby(P.POINT_KEY, dropna=False).size().max()) if len(rows) else 0
    fig.suptitle(f"{task} ({', '.join(sorted(rows['setting'].unique()))})", fontsize=11)
    caption = _caption(reported, [task], axes, seeds)
    _finish(fig, handles, caption, ncol=3)
    return fig


def grid_figure(ok: pd.DataFrame, axis: str = "flops_speedup", tasks: Sequence[str] | None = None,
                reported: pd.DataFrame | None = None, ncols: int = 3):
    """One panel per task on one speedup axis."""
    tasks = order_tasks(ok["task"].unique()) if tasks is None else list(tasks)
    ncols = max(1, min(ncols, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    fig, panels = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.5 * nrows + 0.9), squeeze=False)
    handles: dict[str, Line2D] = {}
    for ax, task in zip(panels.flat, tasks):
        handles.update(plot_panel(ax, ok, task, axis, reported, annotate=False))
        ax.set_title(task, fontsize=10)
    for ax in list(panels.flat)[len(tasks):]:
        ax.set_visible(False)
    seeds = int(ok.groupby(P.POINT_KEY, dropna=False).size().max()) if len(ok) else 0
    fig.suptitle(f"Metric vs {P.AXES[axis]}, per task", fontsize=11)
    _finish(fig, handles, _caption(reported, tasks, [axis], seeds), ncol=4)
    return fig


def flops_vs_wallclock_figure(ok: pd.DataFrame):
    """Where FLOPs promises break: wall-clock speedup (batch 1) against FLOPs speedup per point, with
    the promise line (wall clock = FLOPs) and the break-even line (1×); right: the realised share."""
    fw = P.flops_vs_wallclock(ok)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.6))
    handles: dict[str, Line2D] = {}
    for method, group in fw.groupby("method", sort=True):
        st = style(method)
        left.errorbar(group["flops_speedup"], group["wallclock_speedup_b1"], yerr=group["wallclock_speedup_b1_std"].fillna(0),
                      fmt=st["marker"], color=st["color"], ms=5, capsize=2, elinewidth=0.8, alpha=0.85)
        right.scatter(group["flops_speedup"], group["realised"], marker=st["marker"], color=st["color"], s=22, alpha=0.85)
        handles[method] = Line2D([], [], color=st["color"], marker=st["marker"], linestyle="none", ms=5)
    values = [*fw["flops_speedup"], *fw["wallclock_speedup_b1"], 1.0, 1.5]
    lo, hi = min(v for v in values if v > 0) / 1.12, max(values) * 1.12
    left.plot([lo, hi], [lo, hi], color="0.4", lw=1, linestyle="--")
    left.axhline(1.0, color="black", lw=0.8, linestyle=":")
    handles["wall clock = FLOPs (promise kept)"] = Line2D([], [], color="0.4", linestyle="--")
    handles["1× (no faster than the full model)"] = Line2D([], [], color="black", linestyle=":")
    for ax in (left, right):
        _log_x(ax, values)
    left.set_yscale("log")
    left.set_ylim(lo, hi)
    _speedup_ticks(left.yaxis, lo, hi)
    left.set_ylabel(AXIS_LABELS["wallclock_speedup_b1"])
    left.set_title("wall-clock vs FLOPs speedup (all tasks)", fontsize=10)
    right.axhline(1.0, color="0.4", lw=1, linestyle="--")
    right.set_ylabel("wall-clock speedup / FLOPs speedup")
    right.set_title("share of the FLOPs speedup realised", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel(AXIS_LABELS["flops_speedup"])
        ax.grid(True, alpha=0.3)
    if fw.empty:
        left.text(0.5, 0.5, "no records with both speedups", transform=left.transAxes, ha="center", color="0.4")
    _finish(fig, handles, "One marker per (task, method, target), mean over seeds; error bars ±1 std of the wall-clock speedup.",
            ncol=4)
    return fig


def _finish(fig, handles: dict[str, Line2D], caption: str, ncol: int) -> None:
    """Panels fill the figure; the legend and the caption hang below it (saving with
    bbox_inches="tight", as `save` and notebooks do, keeps them)."""
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    y = 0.0
    if handles:
        handles = dict(sorted(handles.items(), key=lambda item: _legend_rank(item[0])))
        legend = fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=ncol, fontsize=8,
                            frameon=False, bbox_to_anchor=(0.5, 0.0))
        fig.canvas.draw()
        y = legend.get_window_extent().y0 / fig.bbox.height
    width = int(fig.get_size_inches()[0] * 21)  # characters per caption line at 7 pt
    lines = [textwrap.fill(part, width) for part in caption.split("\n")]
    fig.text(0.5, y - 0.01, "\n".join(lines), ha="center", va="top", fontsize=7, color="0.25")


def _legend_rank(label: str) -> tuple:
    """Methods first (in their style order), then the frontier band, dominated points, the full
    model and the papers' points."""
    method = label.split(",")[0].split(" (")[0]
    known = KNOWN_METHODS.index(method) if method in KNOWN_METHODS else len(KNOWN_METHODS)
    for rank, start in enumerate(("frontier over", "dominated", "full model"), 1):
        if label.startswith(start):
            return rank, 0, label
    if "reported" in label:
        return 4, -1 if label.startswith("BERT-base") else known, label
    return 0, known, label


def save(fig, stem: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=150 if fmt == "png" else None, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


# ---- tables -------------------------------------------------------------------------------------


def write_tables(ok: pd.DataFrame, out: Path, axes: Sequence[str] = DEFAULT_AXES, max_drop: float = 1.0) -> list[Path]:
    """Per axis: `summary_<axis>.csv` (every number of `pareto.summary`) and the speedup at
    ≤ `max_drop` points drop, methods × tasks, as `speedup_at_<d>pt_<axis>.md` and `.tex`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    drops = tuple(sorted(set(P.DROPS) | {max_drop}))
    for axis in axes:
        short = AXIS_SHORT[axis]
        summ = P.summary(ok, axis, drops=drops)
        path = out / f"summary_{short}.csv"
        summ.to_csv(path, index=False)
        written.append(path)
        table = P.speedup_table(summ, max_drop)
        note = P.TABLE_NOTE.format(drop=max_drop, axis=P.AXES[axis])
        stem = out / f"speedup_at_{max_drop:g}pt_{short}"
        title = f"**{P.AXES[axis][0].upper() + P.AXES[axis][1:]} at ≤ {max_drop:g} point drop** (task × method)\n\n"
        stem.with_suffix(".md").write_text(title + (P.to_markdown(table, note) if len(table) else "No records.\n"))
        stem.with_suffix(".tex").write_text(P.to_latex(table, caption=note, label=f"tab:speedup-{short}") if len(table) else "% no records\n")
        written += [stem.with_suffix(".md"), stem.with_suffix(".tex")]
    return written


# ---- command line -------------------------------------------------------------------------------


def make_all(ok: pd.DataFrame, out: Path, axes: Sequence[str] = DEFAULT_AXES, reported: pd.DataFrame | None = None,
             formats: Sequence[str] = ("png", "pdf"), max_drop: float = 1.0) -> list[Path]:
    """Every figure and table for the usable records `ok` (from `pareto.select`) into `out`."""
    written = []
    for task in order_tasks(ok["task"].unique()):
        written += save(task_figure(ok, task, axes, reported), out / task, formats)
    for axis in axes:
        written += save(grid_figure(ok, axis, reported=reported), out / f"grid_{AXIS_SHORT[axis]}", formats)
    if {"flops_speedup", "wallclock_speedup_b1"} <= set(axes):
        written += save(flops_vs_wallclock_figure(ok), out / "flops_vs_wallclock", formats)
    written += write_tables(ok, out, axes, max_drop)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, metavar="DIR", help="directories (searched recursively) or result.json files")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the figures and tables go")
    parser.add_argument("--axes", nargs="+", default=list(DEFAULT_AXES), choices=list(P.AXES), help="speedup axes to plot")
    parser.add_argument("--reference", nargs="*", default=None, metavar="CSV_OR_DIR",
                        help="papers' reported points (default experiments/reference/); give no value to draw none")
    parser.add_argument("--drop", type=float, default=1.0, help="accuracy drop (points) of the speedup table (default 1)")
    parser.add_argument("--formats", nargs="+", default=["png", "pdf"], help="figure formats (default png pdf)")
    args = parser.parse_args(argv)

    matplotlib.use("Agg")
    try:
        records = P.load(args.results)
        reported = P.load_reported(args.reference) if args.reference != [] else None
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    if records.empty:
        print(f"No result.json under {' '.join(args.results)}.", file=sys.stderr)
        return 1
    selection = P.select(records)
    print(f"Records: {selection.message()}")
    not_ok = {s: n for s, n in selection.statuses.items() if s != "ok"}
    if not_ok:
        print(f"Skipping {sum(not_ok.values())} records that are not ok: "
              + ", ".join(f"{n} {s}" for s, n in sorted(not_ok.items())) + ".")
    if selection.ok.empty:
        print("No usable records (status ok with a metric): nothing to plot.", file=sys.stderr)
        return 1
    for axis in args.axes:
        missing = int(selection.ok[axis].isna().sum())
        if missing:
            print(f"{missing} records have no {axis} and are left off its plots.")
    out = Path(args.out)
    written = make_all(selection.ok, out, args.axes, reported, args.formats, args.drop)
    print(f"Wrote {len(written)} files to {out}/")
    table = out / f"speedup_at_{args.drop:g}pt_{AXIS_SHORT[args.axes[0]]}.md"
    if table.exists():
        print("\n" + table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
