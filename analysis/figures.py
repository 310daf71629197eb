"""Figures and tables from result records, sized for a paper.

    python -m analysis.figures --results multirun/ [more dirs] --out figures/ [--size column|page]

writes, for every task with records, `<task>.png/.pdf` (metric against FLOPs speedup and against
wall-clock speedup, log-x), a grid over tasks per speedup axis (`grid_<axis>.png/.pdf`) and the
FLOPs-against-wall-clock figure (`flops_vs_wallclock.png/.pdf`), each with its caption in
`<name>.caption.txt` (for the paper's caption: no caption or title is drawn in the image; the legend
sits above the panels); and per axis the table of speedup at ≤ 1 point drop, task × method
(`speedup_at_1pt_<axis>.md/.tex`), and the full summary (`summary_<axis>.csv`).

`--size column` (the default) makes figures 3.3 in wide, a column of a two-column paper; `page`
6.9 in, a full page. Placed at that width (the saved file is exactly that wide), their text is 7 pt
(ticks, legend) to 8 pt (labels, titles). PDFs embed TrueType fonts (`pdf.fonttype` 42, no Type 3).
Every wall-clock axis says the batch size and hardware it was timed on (from the records). Tasks and
methods go by the names people read (`analysis.names`).

Records that are not `ok` are skipped, with a printed count; records with a null value on an axis
are left off that axis's plots only. The numbers the papers report (`experiments/reference/*.csv`:
other backbones, other hardware, their own speedup accounting) are left out unless asked for with
`--reported`, and then get a panel of their own in each task's figure, never our axes.
All the numbers come from `analysis.pareto`; this module only draws and writes.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from analysis import names
from analysis import pareto as P
from analysis import uncertainty as U

SIZES = {"column": 3.3, "page": 6.9}  # figure widths, inches: a column of a two-column paper, a full page
LABEL_PT, SMALL_PT = 8, 7  # axis labels and titles; ticks, legends and annotations
AXIS_LABELS = {
    "flops_speedup": "FLOPs speedup (×)",
    "wallclock_speedup_b1": "wall-clock speedup (×)",
    "throughput_speedup": "throughput speedup (×)",
}
PANEL_TITLES = {"flops_speedup": "FLOPs", "wallclock_speedup_b1": "wall clock, batch 1", "throughput_speedup": "throughput, batched"}
AXIS_SHORT = {"flops_speedup": "flops", "wallclock_speedup_b1": "wallclock", "throughput_speedup": "throughput"}
DEFAULT_AXES = ("flops_speedup", "wallclock_speedup_b1")
TASK_ORDER = ["cola", "sst2", "mrpc", "rte", "stsb", "qnli", "mnli", "qqp", "wnli", "imdb", "news20", "hyperpartisan"]
# One colour, marker and frontier line style per method, stable across every figure.
KNOWN_METHODS = ["topk", "trbert", "adapler", "powerbert", "distilbert", "truncate", "random", "ltp", "lat"]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h"]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)), (0, (5, 2, 1, 2)), (0, (8, 2)), (0, (2, 2))]
# candidate ticks (×) on log axes, with a rank: the lowest ranks are kept when there are too many
TICKS = {1: 0, 2: 0, 10: 0, 0.5: 1, 3: 1, 5: 1, 20: 1, 50: 1, 100: 1, 0.25: 2, 1.5: 2, 4: 2, 30: 2,
         0.75: 3, 2.5: 3, 6: 3, 8: 3, 15: 3, 1.25: 4, 12: 4}
FRONTIER_BAND = "Frontier over all methods"
DOMINATED = "Dominated point (faded)"
FULL_MODEL_LABEL = "Full model"
INTERVAL_BAND = "95% interval along the frontier"


def paper_style(size: str = "column") -> dict:
    """Matplotlib settings for a figure placed at `size` width: fonts of 7-8 pt, thin lines, TrueType
    fonts embedded in PDF and PS (Type 42: editable, and accepted where Type 3 fonts are not)."""
    _check_size(size)
    return {
        "pdf.fonttype": 42, "ps.fonttype": 42, "font.size": LABEL_PT, "axes.titlesize": LABEL_PT,
        "axes.labelsize": LABEL_PT, "figure.labelsize": LABEL_PT, "xtick.labelsize": SMALL_PT,
        "ytick.labelsize": SMALL_PT, "legend.fontsize": SMALL_PT, "lines.linewidth": 1.1, "lines.markersize": 4,
        "axes.linewidth": 0.6, "grid.linewidth": 0.4, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
        "xtick.major.size": 2.5, "ytick.major.size": 2.5, "legend.handlelength": 2.2, "legend.columnspacing": 1.0,
        "savefig.dpi": 300,
    }


@contextmanager
def paper_rc(size: str = "column"):
    """`paper_style` for the block. Unlike `plt.rc_context`, it restores only the settings it made:
    a notebook's first figure switches on interactive mode (the inline backend), which must stay on."""
    style = paper_style(size)
    saved = {key: matplotlib.rcParams[key] for key in style}
    matplotlib.rcParams.update(style)
    try:
        yield
    finally:
        matplotlib.rcParams.update(saved)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown figure size {size!r}: use one of {', '.join(SIZES)}")


def style(method: str) -> dict:
    """Colour, marker and line style of a method (the full model is black)."""
    if method == P.FULL_MODEL:
        return {"color": "black", "marker": "*", "linestyle": "--"}
    i = KNOWN_METHODS.index(method) if method in KNOWN_METHODS else len(KNOWN_METHODS) + zlib.crc32(method.encode()) % 7
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def order_tasks(tasks: Iterable[str]) -> list[str]:
    tasks = set(tasks)
    return [t for t in TASK_ORDER if t in tasks] + sorted(tasks - set(TASK_ORDER))


def axis_label(ok: pd.DataFrame, axis: str) -> str:
    """The axis's name and, for wall clock, what it was timed on (batch size, hardware) on a second line."""
    if axis == "flops_speedup":
        return AXIS_LABELS[axis]
    setups = P.timing_setups(ok, axis)
    return AXIS_LABELS[axis] + "\n" + ("\n".join(setups) if setups else "not timed")


# ---- panels -------------------------------------------------------------------------------------


def intervals(ok: pd.DataFrame, n_resamples: int = U.N_RESAMPLES) -> pd.DataFrame:
    """The 95% interval of every point (task, setting, method, speedup_target) that has per-example
    outputs: `lo`, `hi` of the metric's mean over seeds (two-level bootstrap over seeds and dev
    examples, `analysis.uncertainty`). Empty when no record keeps its examples."""
    cells = U.cell_intervals(ok, n_resamples)
    return cells[[*P.POINT_KEY, "lo", "hi"]] if len(cells) else pd.DataFrame(columns=[*P.POINT_KEY, "lo", "hi"])


def _with_intervals(pts: pd.DataFrame, cells: pd.DataFrame | None) -> pd.DataFrame:
    """`pts` with `lo`/`hi`: the bootstrap interval where there is one, else mean ± 1 std (NaN
    with one seed), and `spread` saying which."""
    pts = pts.drop(columns=["lo", "hi"], errors="ignore")
    if cells is not None and len(cells) and len(pts):
        pts = pts.merge(cells, on=P.POINT_KEY, how="left")
    else:
        pts = pts.assign(lo=np.nan, hi=np.nan)
    bootstrap = pts["lo"].notna()
    std = pts["metric_std"].astype(float)
    pts["lo"] = pts["lo"].where(bootstrap, pts["metric_mean"] - std)
    pts["hi"] = pts["hi"].where(bootstrap, pts["metric_mean"] + std)
    pts["spread"] = np.where(bootstrap, "interval", "std")
    return pts


def _full_model_interval(ref_row, cells: pd.DataFrame | None, task: str) -> tuple[float, float]:
    """The full model's shaded range: its bootstrap interval, else mean ± 1 std."""
    if cells is not None and len(cells):
        mine = cells[(cells["task"] == task) & (cells["setting"] == ref_row.setting) & (cells["method"] == P.FULL_MODEL)]
        if len(mine):
            return float(mine["lo"].iloc[0]), float(mine["hi"].iloc[0])
    return ref_row.mean - ref_row.std, ref_row.mean + ref_row.std


def plot_panel(ax, ok: pd.DataFrame, task: str, axis: str = "flops_speedup",
               cells: pd.DataFrame | None = None) -> dict[str, Line2D]:
    """Metric against `axis` for one task: each method's points (mean over seeds; error bars: the 95%
    bootstrap interval from `cells` (see `intervals`) where the records keep per-example outputs, else
    ±1 std), its frontier as a line with its interval as a band, dominated points faded, the frontier
    over all methods as a grey line, the full model as a dashed line with its interval (or ±1 std)
    shaded. Returns legend handles by label."""
    P._check_axis(axis)
    rows = ok[ok["task"] == task]
    pts = _with_intervals(P.mark_frontiers(P.points(rows, axis)), cells)
    ref = P.reference(rows)
    several = rows["setting"].nunique() > 1
    handles: dict[str, Line2D] = {}
    xs: list[float] = [1.0]

    for setting, group in pts.groupby("setting", sort=True):
        overall = P.pareto_front(group)
        if group["method"].nunique() > 1 and len(overall) > 1:
            ax.plot(overall["speedup"], overall["metric_mean"], color="0.55", lw=5, alpha=0.25, zorder=1, solid_capstyle="round")
            handles[FRONTIER_BAND] = Line2D([], [], color="0.55", lw=5, alpha=0.25)
    settings = sorted(rows["setting"].unique())
    setting_lines = ["-", "--", ":", "-."]  # when a task has several settings: one line style each, colour per method
    for (setting, method), group in pts.groupby(["setting", "method"], sort=True):
        st = style(method)
        if several:
            st["linestyle"] = setting_lines[settings.index(setting) % len(setting_lines)]
        label = names.method(method) + (f" ({setting})" if several else "")
        xs.extend(group["speedup"])
        for on, alpha in ((True, 1.0), (False, 0.3)):
            part = group[group["on_frontier"] == on]
            if part.empty:
                continue
            yerr = np.vstack([(part["metric_mean"] - part["lo"]).fillna(0).clip(lower=0),
                              (part["hi"] - part["metric_mean"]).fillna(0).clip(lower=0)])
            ax.errorbar(part["speedup"], part["metric_mean"], yerr=yerr, xerr=part["speedup_std"].fillna(0),
                        fmt=st["marker"], color=st["color"], alpha=alpha, capsize=1.5, elinewidth=0.6, zorder=3)
        front = P.pareto_front(group).sort_values("speedup")
        ax.plot(front["speedup"], front["metric_mean"], color=st["color"], linestyle=st["linestyle"], zorder=2)
        if len(front) > 1 and front["lo"].notna().all():
            ax.fill_between(front["speedup"], front["lo"], front["hi"], color=st["color"], alpha=0.12, lw=0, zorder=1)
            handles[INTERVAL_BAND] = Patch(color="0.5", alpha=0.25, lw=0)
        handles[label] = Line2D([], [], color=st["color"], marker=st["marker"], linestyle=st["linestyle"])
        if (~group["on_frontier"]).any():
            handles[DOMINATED] = Line2D([], [], color="0.5", marker="o", linestyle="none", alpha=0.3)

    for r in ref.itertuples():
        line = setting_lines[settings.index(r.setting) % len(setting_lines)] if several else "--"
        ax.axhline(r.mean, color="black", linestyle=line, lw=0.8, zorder=2)
        lo, hi = _full_model_interval(r, cells, task)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.axhspan(lo, hi, color="black", alpha=0.07, lw=0, zorder=0)
        ax.plot([1.0], [r.mean], marker="*", color="black", ms=6, linestyle="none", zorder=4)
        handles[FULL_MODEL_LABEL + (f" ({r.setting})" if several else "")] = Line2D(
            [], [], color="black", linestyle=line, marker="*", ms=6)

    if pts.empty and ref.empty:
        ax.text(0.5, 0.5, f"no records with a\n{P.AXES[axis]}", transform=ax.transAxes, ha="center", va="center",
                color="0.4", fontsize=SMALL_PT)
    _log_x(ax, xs)
    ax.margins(y=0.08)
    ax.grid(True, which="major", alpha=0.3)
    return handles


def plot_reported(ax, reported: pd.DataFrame, task: str) -> dict[str, Line2D]:
    """The papers' reported points of one task on a panel of their own: other backbones, other
    hardware, each paper's own speedup accounting (said in the legend), so never on our axes."""
    mine = reported[(reported["task"] == task) & reported["axis"].notna()]
    handles: dict[str, Line2D] = {}
    for r in mine.itertuples():
        st = style(r.method)
        ax.scatter([r.speedup], [r.metric], marker=st["marker"], s=22, facecolors="none", edgecolors=st["color"],
                   linewidths=1.0, zorder=5, gid=f"reported:{r.method}")
        who = f"{r.model}" if r.method == P.FULL_MODEL else f"{names.method(r.method)} ({r.model})"
        label = f"{who}, reported: {P.accounting_label(r.speedup_accounting)}, GLUE {r.split}"
        handles[label] = Line2D([], [], marker=st["marker"], markerfacecolor="none", markeredgecolor=st["color"],
                                linestyle="none", mew=1.0)
    _log_x(ax, [*mine["speedup"], 1.0])
    ax.margins(y=0.12)
    ax.set_title("As reported in the papers")
    ax.set_xlabel("speedup as reported (×)")
    ax.set_ylabel(f"{names.metric(P._first(mine['metric_name']))} (0–100)")
    ax.grid(True, which="major", alpha=0.3)
    return handles


def _log_x(ax, xs: Sequence[float]) -> None:
    xs = [x for x in xs if x is not None and np.isfinite(x) and x > 0]
    lo, hi = min(min(xs), 1.0) / 1.12, max(max(xs), 1.5) * 1.12
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    _speedup_ticks(ax.xaxis, lo, hi)


def _speedup_ticks(axis, lo: float, hi: float, most: int = 4) -> None:
    candidates = sorted((rank, t) for t, rank in TICKS.items() if lo <= t <= hi)
    ticks = sorted(t for _, t in candidates[:most])
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))


def _metric_name(ok: pd.DataFrame, task: str) -> str:
    return names.metric(P._first(ok.loc[ok["task"] == task, "metric_name"]))


def _seeds(ok: pd.DataFrame) -> int:
    return int(ok.groupby(P.POINT_KEY, dropna=False).size().max()) if len(ok) else 0


def spread_note(ok: pd.DataFrame, cells: pd.DataFrame | None) -> str:
    """What the error bars and shades of a figure are: the bootstrap interval, ±1 std, or which is which."""
    keys = ok[P.POINT_KEY].drop_duplicates()
    with_interval = 0 if cells is None or cells.empty else len(keys.merge(cells[P.POINT_KEY], on=P.POINT_KEY))
    interval = (f"the {U.CONFIDENCE:.0%} interval of that mean (two-level bootstrap over seeds and dev examples, "
                "the task's metric recomputed on each resample)")
    if with_interval == len(keys):
        return f"Error bars, the band along each frontier and the full model's shade: {interval}."
    if with_interval == 0:
        return "Error bars and the full model's shade: ±1 std over seeds (no per-example outputs kept)."
    return (f"Error bars, bands and shades: {interval} for the {with_interval} of {len(keys)} points whose records keep "
            "per-example outputs, ±1 std over seeds for the others.")


def caption(ok: pd.DataFrame, tasks: Sequence[str], axes: Sequence[str], reported: pd.DataFrame | None = None,
            cells: pd.DataFrame | None = None) -> str:
    """The caption of a metric-against-speedup figure: what is drawn, the settings, the seeds, which
    spread the error bars show, what the wall clock was timed on, and what the reported panel is."""
    rows = ok[ok["task"].isin(tasks)]
    seeds = _seeds(rows)
    text = (f"{', '.join(names.task(t) for t in tasks)}: dev metric (0-100) against speedup over the full model (log "
            f"scale); {', '.join(sorted(rows['setting'].unique()))}. Each point is the mean over seeds "
            f"({'up to ' if seeds > 1 else ''}{seeds} per point). {spread_note(rows, cells)} Lines: each method's "
            "Pareto frontier (maximise metric and speedup); faded markers: dominated points; thick grey line: the "
            "frontier over all methods. Dashed line and star: the full model.")
    for axis in axes:
        if axis != "flops_speedup":
            text += f" {AXIS_LABELS[axis].split(' (')[0].capitalize()}s timed at {'; '.join(P.timing_setups(rows, axis)) or 'no timing recorded'}."
    drawn = _reported_rows(reported, tasks)
    if len(drawn):
        models = ", ".join(sorted(set(drawn["model"])))
        text += (f" Last panel: numbers reported in the papers, on other backbones ({models}) and other hardware, each "
                 "with its own speedup accounting (in the legend); not comparable with our axes and not part of our "
                 "frontiers.")
    return text


def _reported_rows(reported: pd.DataFrame | None, tasks: Sequence[str]) -> pd.DataFrame:
    if reported is None or reported.empty:
        return pd.DataFrame(columns=[*P.REPORTED_COLUMNS, "axis"])
    return reported[reported["task"].isin(tasks) & reported["axis"].notna()]


# ---- figures ------------------------------------------------------------------------------------


def panel_figure(size: str, nrows: int, ncols: int, panel_height: float):
    """A constrained-layout figure `SIZES[size]` wide, its panels `panel_height` tall."""
    fig = plt.figure(figsize=(SIZES[size], panel_height * nrows + 0.1), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


CHAR_INCHES = 0.5 * SMALL_PT / 72  # a character of legend text at 7 pt, on the wide side (0.5 em)
HANDLE_INCHES = 0.4  # a legend entry's handle and the gap after it


def legend_above(fig, handles: dict[str, Line2D], size: str) -> None:
    """The legend above the panels, inside the figure: as many columns as fit across it (at most 4),
    labels too long for a column wrapped; the figure grows by the legend's height."""
    if not handles:
        return
    ordered = dict(sorted(handles.items(), key=lambda item: _legend_rank(item[0])))
    width = SIZES[size]
    longest = max(len(label) for label in ordered)
    ncol = max(1, min(4, int(width / (CHAR_INCHES * longest + HANDLE_INCHES))))
    labels = [textwrap.fill(label, int((width / ncol - HANDLE_INCHES) / CHAR_INCHES)) for label in ordered]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig.set_figheight(fig.get_figheight() + 0.14 * math.ceil(lines / ncol) + 0.1)
    fig.legend(list(ordered.values()), labels, loc="outside upper center", frameon=False, ncol=ncol)


def _legend_rank(label: str) -> tuple:
    """Methods first (in their style order), then the frontier band, dominated points, the full
    model and the papers' points."""
    order = [names.method(m) for m in KNOWN_METHODS]
    method = label.split(" (")[0]
    for rank, start in enumerate((FRONTIER_BAND, DOMINATED, FULL_MODEL_LABEL), 1):
        if label.startswith(start):
            return rank, 0, label
    if ", reported:" in label:
        return 4, 0, label
    return 0, order.index(method) if method in order else len(order), label


def task_figure(ok: pd.DataFrame, task: str, axes: Sequence[str] = DEFAULT_AXES, reported: pd.DataFrame | None = None,
                size: str = "column", cells: pd.DataFrame | None = None):
    """One task, one panel per speedup axis (stacked at column width, side by side at page width),
    plus the papers' reported points on a panel of their own when `reported` has any for the task."""
    theirs = _reported_rows(reported, [task])
    n = len(axes) + (1 if len(theirs) else 0)
    with paper_rc(size):
        nrows, ncols = (n, 1) if size == "column" else (1, n)
        fig, panels = panel_figure(size, nrows, ncols, 2.0 if size == "column" else 2.5)
        panels = list(panels.flat)
        handles: dict[str, Line2D] = {}
        for ax, axis in zip(panels, axes):
            handles.update(plot_panel(ax, ok, task, axis, cells))
            ax.set_xlabel(axis_label(ok[ok["task"] == task], axis))
            ax.set_ylabel(f"{_metric_name(ok, task)} (0–100)")
            ax.set_title(f"{names.task(task)}: {PANEL_TITLES[axis]}")
        for ax in panels[1:len(axes)]:
            ax.sharey(panels[0])
        if len(theirs):
            handles.update(plot_reported(panels[-1], theirs, task))
        legend_above(fig, handles, size)
    return fig


def grid_figure(ok: pd.DataFrame, axis: str = "flops_speedup", tasks: Sequence[str] | None = None,
                size: str = "column", cells: pd.DataFrame | None = None):
    """One panel per task on one speedup axis (2 panels a row at column width, up to 4 at page width)."""
    tasks = order_tasks(ok["task"].unique()) if tasks is None else list(tasks)
    with paper_rc(size):
        ncols = max(1, min(2 if size == "column" else 4, len(tasks)))
        nrows = max(1, math.ceil(len(tasks) / ncols))
        fig, panels = panel_figure(size, nrows, ncols, 1.5 if size == "column" else 1.7)
        handles: dict[str, Line2D] = {}
        for ax, task in zip(panels.flat, tasks):
            handles.update(plot_panel(ax, ok, task, axis, cells))
            ax.set_title(f"{names.task(task)} ({_metric_name(ok, task)})")
        for ax in list(panels.flat)[len(tasks):]:
            ax.set_visible(False)
        fig.supxlabel(axis_label(ok, axis))
        fig.supylabel("dev metric (0–100)")
        legend_above(fig, handles, size)
    return fig


def flops_vs_wallclock_figure(ok: pd.DataFrame, size: str = "column"):
    """Where FLOPs promises break: wall-clock speedup (batch 1) against FLOPs speedup per point, with
    the promise line (wall clock = FLOPs) and the break-even line (1×); and the realised share."""
    fw = P.flops_vs_wallclock(ok)
    with paper_rc(size):
        nrows, ncols = (2, 1) if size == "column" else (1, 2)
        fig, panels = panel_figure(size, nrows, ncols, 2.0 if size == "column" else 2.5)
        left, right = panels.flat
        handles: dict[str, Line2D] = {}
        for method, group in fw.groupby("method", sort=True):
            st = style(method)
            left.errorbar(group["flops_speedup"], group["wallclock_speedup_b1"], yerr=group["wallclock_speedup_b1_std"].fillna(0),
                          fmt=st["marker"], color=st["color"], capsize=1.5, elinewidth=0.6, alpha=0.85)
            right.scatter(group["flops_speedup"], group["realised"], marker=st["marker"], color=st["color"], s=10, alpha=0.85)
            handles[names.method(method)] = Line2D([], [], color=st["color"], marker=st["marker"], linestyle="none")
        values = [*fw["flops_speedup"], *fw["wallclock_speedup_b1"], 1.0, 1.5]
        lo, hi = min(v for v in values if v > 0) / 1.12, max(values) * 1.12
        left.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, linestyle="--")
        left.axhline(1.0, color="black", lw=0.6, linestyle=":")
        handles["Wall clock = FLOPs (promise kept)"] = Line2D([], [], color="0.4", linestyle="--")
        handles["1× (no faster than the full model)"] = Line2D([], [], color="black", linestyle=":")
        for ax in (left, right):
            _log_x(ax, values)
        left.set_yscale("log")
        left.set_ylim(lo, hi)
        _speedup_ticks(left.yaxis, lo, hi)
        left.set_ylabel(axis_label(ok, "wallclock_speedup_b1"))
        left.set_title("Wall clock against FLOPs (all tasks)")
        right.axhline(1.0, color="0.4", lw=0.8, linestyle="--")
        right.set_ylabel("wall clock / FLOPs speedup")
        right.set_title("Share of the FLOPs speedup realised")
        for ax in (left, right):
            ax.set_xlabel(AXIS_LABELS["flops_speedup"])
            ax.grid(True, alpha=0.3)
        if fw.empty:
            left.text(0.5, 0.5, "no records with both speedups", transform=left.transAxes, ha="center", color="0.4")
        legend_above(fig, handles, size)
    return fig


def flops_vs_wallclock_caption(ok: pd.DataFrame) -> str:
    setups = "; ".join(P.timing_setups(ok, "wallclock_speedup_b1")) or "no timing recorded"
    return ("Wall-clock speedup at batch 1 against FLOPs speedup, one marker per (task, method, target), mean over "
            "seeds, error bars ±1 std of the wall-clock speedup; dashed: wall clock = FLOPs, dotted: 1× (no faster "
            f"than the full model). Second panel: the share of the FLOPs speedup realised in time. Timed at {setups}.")


def save(fig, stem: Path, formats: Sequence[str] = ("png", "pdf"), size: str = "column") -> list[Path]:
    """Writes the figure at its own size (exactly `SIZES[size]` wide), PNG at 300 dpi, fonts embedded."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with paper_rc(size):
        for fmt in formats:
            path = stem.with_suffix(f".{fmt}")
            fig.savefig(path)
            paths.append(path)
    plt.close(fig)
    return paths


def write_caption(text: str, stem: Path) -> Path:
    path = stem.with_name(stem.name + ".caption.txt")
    path.write_text(text + "\n")
    return path


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
        if axis != "flops_speedup":
            note += f" Timed at {'; '.join(P.timing_setups(ok, axis)) or 'no timing recorded'}."
        stem = out / f"speedup_at_{max_drop:g}pt_{short}"
        title = f"**{P.AXES[axis][0].upper() + P.AXES[axis][1:]} at ≤ {max_drop:g} point drop** (task × method)\n\n"
        stem.with_suffix(".md").write_text(title + (P.to_markdown(table, note) if len(table) else "No records.\n"))
        stem.with_suffix(".tex").write_text(P.to_latex(table, caption=note, label=f"tab:speedup-{short}") if len(table) else "% no records\n")
        written += [stem.with_suffix(".md"), stem.with_suffix(".tex")]
    return written


# ---- command line -------------------------------------------------------------------------------


def make_all(ok: pd.DataFrame, out: Path, axes: Sequence[str] = DEFAULT_AXES, reported: pd.DataFrame | None = None,
             formats: Sequence[str] = ("png", "pdf"), max_drop: float = 1.0, size: str = "column") -> list[Path]:
    """Every figure (with its caption file) and table for the usable records `ok` (from
    `pareto.select`) into `out`. `reported`: the papers' points, drawn on their own panel of each
    task's figure (None: left out)."""
    written = []
    cells = intervals(ok)
    for task in order_tasks(ok["task"].unique()):
        written += save(task_figure(ok, task, axes, reported, size, cells), out / task, formats, size)
        written.append(write_caption(caption(ok, [task], axes, reported, cells), out / task))
    for axis in axes:
        stem = out / f"grid_{AXIS_SHORT[axis]}"
        written += save(grid_figure(ok, axis, size=size, cells=cells), stem, formats, size)
        written.append(write_caption(caption(ok, order_tasks(ok["task"].unique()), [axis], cells=cells), stem))
    if {"flops_speedup", "wallclock_speedup_b1"} <= set(axes):
        written += save(flops_vs_wallclock_figure(ok, size), out / "flops_vs_wallclock", formats, size)
        written.append(write_caption(flops_vs_wallclock_caption(ok), out / "flops_vs_wallclock"))
    written += write_tables(ok, out, axes, max_drop)
    written += U.write_verdict_tables(ok, out, max_drop=max_drop)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.figures", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="+", required=True, metavar="DIR", help="directories (searched recursively) or result.json files")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the figures and tables go")
    parser.add_argument("--size", choices=list(SIZES), default="column",
                        help="figure width: column (3.3 in, the default) or page (6.9 in); text is 7-8 pt at that width")
    parser.add_argument("--axes", nargs="+", default=list(DEFAULT_AXES), choices=list(P.AXES), help="speedup axes to plot")
    parser.add_argument("--reported", nargs="*", default=None, metavar="CSV_OR_DIR",
                        help="draw the papers' reported points (other backbones and hardware) on a panel of their own in each "
                             "task's figure: from experiments/reference/, or the CSVs or folders given (default: not drawn)")
    parser.add_argument("--drop", type=float, default=1.0, help="accuracy drop (points) of the speedup table (default 1)")
    parser.add_argument("--formats", nargs="+", default=["png", "pdf"], help="figure formats (default png pdf)")
    args = parser.parse_args(argv)

    matplotlib.use("Agg")
    try:
        records = P.load(args.results)
        reported = None if args.reported is None else P.load_reported(args.reported or None)
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
    written = make_all(selection.ok, out, args.axes, reported, args.formats, args.drop, args.size)
    print(f"Wrote {len(written)} files to {out}/ ({args.size} width, {SIZES[args.size]} in)")
    table = out / f"speedup_at_{args.drop:g}pt_{AXIS_SHORT[args.axes[0]]}.md"
    if table.exists():
        print("\n" + table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
