"""Pareto analysis of tokenprune records: frontiers, accuracy drop, speedup at a fixed drop,
accuracy at a fixed speedup, hypervolume, and mean ± spread over seeds.

Records (`result.json`, read with `tokenprune.results.load`) are the only input. The conventions:

- **Setting**: `model/budget`, plus the FLOPs accounting mode when it is not `canonical`. Points
  of different settings never share a frontier, a reference or a table cell.
- **Speedup axis**: any column of `AXES` (`flops_speedup`, `wallclock_speedup_b1`,
  `throughput_speedup`). A record whose value on that axis is null (timing off, say) is left out on
  that axis only.
- **Drop**: `reference − metric` per record, in metric points (metrics are 0–100). The reference
  is the full model (method `bert`) on the same dev examples with the same seed: the record's own
  `baseline_metric` (measured in the same job), else the metric of the `bert` record of the same
  task, setting and seed; for a method that re-trains the backbone, its equal-training control
  (`control_metric`: the full model trained as many more steps) where that is stronger.
- **Point**: one operating point, i.e. the records of one (task, setting, method, speedup_target),
  averaged over seeds: `<col>_mean`, `<col>_std` (sample std, ddof=1; NaN for one seed) and `n`.
  The point's speedup (`speedup`, `speedup_std`) is the mean over the same seeds.
- **Frontier**: the points no other point dominates, maximising speedup and metric (or, equally,
  minimising drop). Dominated points drop out; of two identical points one is kept.
- **Interpolation**: between adjacent frontier points, linear in log(speedup). Every interpolated
  value is flagged (`kind == "interpolated"`); a value at the end of the measured range is a bound
  (`"lower bound"`) or missing (`"not reached"`), never extrapolated.
- **Hypervolume**: the area the frontier dominates in (log2 speedup, drop) space above the reference
  point **(log2 speedup = 0, drop = `ref_drop`)**, i.e. (speedup 1×, full-model metric − `ref_drop`
  points), `ref_drop = 5` by default. Units: metric points × doublings of speedup. A point at 4× with a
  1-point drop scores log2(4) · (5 − 1) = 8. Points below 1× or worse than the reference add nothing.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from analysis import names
from tokenprune import results

FULL_MODEL = "bert"  # the reference's method name in records (its config, conf/method/bert.yaml, has fixed_speedup: 1.0)
AXES: dict[str, str] = {
    "flops_speedup": "FLOPs speedup",
    "wallclock_speedup_b1": "wall-clock speedup, batch 1",
    "throughput_speedup": "throughput speedup, batched",
}
DROPS: tuple[float, ...] = (0.5, 1.0, 2.0)  # metric points
SPEEDUPS: tuple[float, ...] = (2.0, 3.0)  # for accuracy at a fixed speedup
HV_REF_DROP = 5.0  # hypervolume reference: (log2 speedup 0, full-model metric - 5 points)
POINT_KEY = ["task", "setting", "method", "speedup_target"]
RUN_KEY = ["task", "setting", "method", "seed", "speedup_target"]
NUMERIC = [
    "seed", "speedup_target", "metric", "baseline_metric", "metric_drop", "flops_speedup",
    "wallclock_speedup_b1", "throughput_speedup", "n_eval", "duration_s",
]
REPORTED_DIR = Path(__file__).resolve().parents[1] / "experiments" / "reference"
REPORTED_COLUMNS = [
    "method", "task", "model", "metric_name", "metric", "speedup", "speedup_accounting", "split", "source", "status",
]

# ---- loading ------------------------------------------------------------------------------------


def load(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Every record under `paths` (all statuses), typed, with a `setting` column."""
    return prepare(results.load(paths))


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns as floats and a `setting` column; works on `results.load`'s frame."""
    df = df.copy()
    for column in NUMERIC:
        if column in df:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    df["setting"] = [_setting(r) for r in df.to_dict("records")] if len(df) else pd.Series(dtype=str)
    return df


def _setting(record: dict) -> str:
    parts = [str(record.get(k)) for k in ("model", "budget") if _present(record.get(k))]
    mode = record.get("flops_mode")
    if _present(mode) and mode != "canonical":
        parts.append(f"flops={mode}")
    return "/".join(parts) or "-"


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


@dataclass
class Selection:
    """The usable records (`ok`) and what was left out, by reason."""

    ok: pd.DataFrame
    statuses: dict[str, int]
    left_out: dict[str, int] = field(default_factory=dict)

    def message(self) -> str:
        total = sum(self.statuses.values())
        status = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items()))
        line = f"{total} records ({status})"
        if self.left_out:
            line += "; left out: " + ", ".join(f"{n} {why}" for why, n in self.left_out.items())
        line += f"; {len(self.ok)} used."
        versions = code_versions(self.ok)
        return line + (f" {versions}" if versions else "")


def code_versions(ok: pd.DataFrame) -> str | None:
    """One sentence naming the code versions (`git_commit`) of the used records when there are several,
    with how many records each; None when they share one. A table across versions compares code too."""
    if "git_commit" not in ok or ok["git_commit"].dropna().nunique() < 2:
        return None
    short = ok["git_commit"].dropna().map(lambda c: c[:7] + c[40:])  # a dirty tree's -dirty-<hash> kept
    counts = ", ".join(f"{v} ({n})" for v, n in short.value_counts().sort_index().items())
    return f"The records come from {short.nunique()} code versions: {counts}."


def select(df: pd.DataFrame) -> Selection:
    """The `ok` records with a metric, each (task, setting, method, seed, target) once (the latest
    run wins: re-runs supersede older records), each with its reference metric and `drop`."""
    statuses = df["status"].fillna("?").value_counts().to_dict() if len(df) else {}
    left_out = {s: int(n) for s, n in statuses.items() if s != "ok"}
    ok = df[df["status"] == "ok"]
    no_metric = ok["metric"].isna()
    if no_metric.any():
        left_out["ok without a metric"] = int(no_metric.sum())
    ok = ok[~no_metric]
    order = ok.assign(_t=ok["started_at"].fillna("")).sort_values(["_t", "path"]).drop(columns="_t")
    latest = order.drop_duplicates(RUN_KEY, keep="last")
    if len(latest) < len(ok):
        left_out["superseded re-runs"] = len(ok) - len(latest)
    return Selection(ok=add_drop(latest.sort_values(RUN_KEY).reset_index(drop=True)), statuses=statuses, left_out=left_out)


RESULTS_ENV = "TOKENPRUNE_RESULTS"


def results_dirs(default: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Where the notebooks read records: `$TOKENPRUNE_RESULTS` (one or more paths separated by
    `os.pathsep`), else the Hydra output folders `multirun/` and `outputs/` at the repository root."""
    value = os.environ.get(RESULTS_ENV)
    if value:
        return [Path(p).expanduser() for p in value.split(os.pathsep) if p]
    root = Path(__file__).resolve().parents[1]
    candidates = [Path(p) for p in default] if default is not None else [root / "multirun", root / "outputs"]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise FileNotFoundError(
            f"no results to read: set {RESULTS_ENV} to a directory of runs (e.g. {RESULTS_ENV}=multirun/2025-01-01), "
            f"or run a sweep first (python run.py -m experiment=debug); looked in {', '.join(map(str, candidates))}.")
    return found


def usable(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Selection:
    """`select(load(paths))`."""
    return select(load(paths))


# ---- accuracy drop and the full model -----------------------------------------------------------


def add_drop(ok: pd.DataFrame) -> pd.DataFrame:
    """Adds `reference_metric`, `reference_source` and `drop` (= reference - metric, in points):
    the full model on the same dev examples and seed (the job's own baseline, else the `bert` record
    of the same task, setting and seed), or the job's equal-training control where that is stronger."""
    ok = ok.copy()
    full = ok[ok["method"] == FULL_MODEL].groupby(["task", "setting", "seed"])["metric"].mean().rename("_full")
    ok = ok.join(full, on=["task", "setting", "seed"])
    own = ok["baseline_metric"].notna()
    ok["reference_metric"] = ok["baseline_metric"].where(own, ok["_full"])
    ok["reference_source"] = np.where(own, "same job", np.where(ok["_full"].notna(), "bert record", "none"))
    if "control_metric" in ok:  # a method that re-trains the backbone: the stronger of the two references
        control = pd.to_numeric(ok["control_metric"], errors="coerce")
        stronger = control.notna() & (control > ok["reference_metric"])
        ok["reference_metric"] = ok["reference_metric"].where(~stronger, control)
        ok["reference_source"] = np.where(stronger, "equal-training control", ok["reference_source"])
    ok["drop"] = ok["reference_metric"] - ok["metric"]
    return ok.drop(columns="_full")


def reference(ok: pd.DataFrame) -> pd.DataFrame:
    """The full model per (task, setting): `metric_name`, `mean`, `std`, `n` (seeds) and `source`.
    From the `bert` records where there are any, else from the other records' `baseline_metric`
    (one value per seed)."""
    rows = []
    for (task, setting), group in ok.groupby(["task", "setting"], sort=True):
        full = group[group["method"] == FULL_MODEL]
        if len(full):
            values, source = full.groupby("seed")["metric"].mean(), "bert records"
        else:
            values, source = group.dropna(subset=["baseline_metric"]).groupby("seed")["baseline_metric"].first(), "baseline_metric"
        if not len(values):
            continue
        rows.append({
            "task": task, "setting": setting, "metric_name": _first(group["metric_name"]),
            "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "n": len(values), "source": source,
        })
    return pd.DataFrame(rows, columns=["task", "setting", "metric_name", "mean", "std", "n", "source"])


def _first(series: pd.Series):
    values = series.dropna()
    return values.iloc[0] if len(values) else None


# ---- seeds --------------------------------------------------------------------------------------


def mean_over_seeds(df: pd.DataFrame, by: Sequence[str] = POINT_KEY, columns: Sequence[str] = ("metric", "drop")) -> pd.DataFrame:
    """Mean ± spread over seeds: one row per `by` group with `<col>_mean`, `<col>_std` (sample std,
    ddof=1; NaN when there is one seed) and `n` (rows in the group)."""
    grouped = df.groupby(list(by), sort=True, dropna=False)
    out = grouped.size().rename("n").to_frame()
    for column in columns:
        out[f"{column}_mean"] = grouped[column].mean()
        out[f"{column}_std"] = grouped[column].std(ddof=1)
    return out.reset_index()


def points(ok: pd.DataFrame, axis: str = "flops_speedup", include_full_model: bool = False) -> pd.DataFrame:
    """Operating points on `axis`: the records with a value on that axis, averaged over seeds per
    (task, setting, method, speedup_target). Columns: the key, `metric_name`, `n`, `metric_mean/std`,
    `drop_mean/std`, `speedup` and `speedup_std` (the axis, mean and std), `seeds`."""
    _check_axis(axis)
    rows = ok[ok[axis].notna() & (ok[axis] > 0)]
    if not include_full_model:
        rows = rows[rows["method"] != FULL_MODEL]
    columns = [*POINT_KEY, "metric_name", "n", "metric_mean", "metric_std", "drop_mean", "drop_std", "speedup", "speedup_std", "seeds"]
    if rows.empty:
        out = pd.DataFrame(columns=columns)
    else:
        out = mean_over_seeds(rows.assign(speedup=rows[axis]), columns=("metric", "drop", "speedup"))
        out = out.rename(columns={"speedup_mean": "speedup"})
        extra = rows.groupby(POINT_KEY, sort=True, dropna=False).agg(
            metric_name=("metric_name", _first), seeds=("seed", lambda s: sorted(int(v) for v in s.dropna())))
        out = out.merge(extra.reset_index(), on=POINT_KEY, how="left")[columns]
    out.attrs["axis"] = axis
    return out


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"unknown speedup axis {axis!r}: use one of {', '.join(AXES)}")


# ---- frontiers ----------------------------------------------------------------------------------


def pareto_mask(x: Sequence[float], y: Sequence[float], minimize_y: bool = False) -> np.ndarray:
    """True for the points that no other point dominates, maximising x and y (or x and -y with
    `minimize_y`). Of identical points only the first is kept; NaNs are never on the frontier."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if minimize_y:
        y = -y
    keep = np.isfinite(x) & np.isfinite(y)
    for i in np.flatnonzero(keep):
        others = keep.copy()
        others[i] = False
        at_least = others & (x >= x[i]) & (y >= y[i])
        better = at_least & ((x > x[i]) | (y > y[i]))
        duplicate_before = at_least & (x == x[i]) & (y == y[i]) & (np.arange(len(x)) < i)
        if better.any() or duplicate_before.any():
            keep[i] = False
    return keep


def pareto_front(pts: pd.DataFrame, x: str = "speedup", y: str = "metric_mean", minimize_y: bool = False) -> pd.DataFrame:
    """The frontier rows of `pts`, sorted by `x` ascending (so `y` gets worse along it)."""
    if pts.empty:
        return pts.copy()
    return pts[pareto_mask(pts[x], pts[y], minimize_y)].sort_values(x, kind="stable")


def mark_frontiers(pts: pd.DataFrame, x: str = "speedup", y: str = "metric_mean") -> pd.DataFrame:
    """Adds `on_frontier` (per task, setting and method) and `on_overall_frontier` (per task and
    setting, over all methods) to the points."""
    pts = pts.copy()
    pts["on_frontier"] = False
    pts["on_overall_frontier"] = False
    for _, group in pts.groupby(["task", "setting", "method"], sort=False):
        pts.loc[group.index, "on_frontier"] = pareto_mask(group[x], group[y])
    for _, group in pts.groupby(["task", "setting"], sort=False):
        pts.loc[group.index, "on_overall_frontier"] = pareto_mask(group[x], group[y])
    return pts


@dataclass(frozen=True)
class OnFrontier:
    """A value read off a frontier: `kind` is `measured` (a frontier point), `interpolated`
    (between two, linear in log-speedup), `lower bound` (at the end of the measured range: the
    method does at least this well) or `not reached` (value NaN)."""

    value: float
    kind: str

    @property
    def interpolated(self) -> bool:
        return self.kind == "interpolated"


def speedup_at_drop(pts: pd.DataFrame, max_drop: float, x: str = "speedup", drop: str = "drop_mean") -> OnFrontier:
    """The largest speedup whose drop is at most `max_drop` points, on the frontier of `pts`
    (maximise speedup, minimise drop). Between the last frontier point within the drop and the next
    one it is interpolated linearly in log-speedup; with every frontier point within the drop it is
    the fastest one, a lower bound."""
    front = pareto_front(pts, x, drop, minimize_y=True)
    s, d = front[x].to_numpy(float), front[drop].to_numpy(float)
    within = np.flatnonzero(d <= max_drop + 1e-12)
    if not len(within):
        return OnFrontier(math.nan, "not reached")
    i = within[-1]  # drops rise along the frontier, so `within` is a prefix
    if i == len(s) - 1:
        return OnFrontier(float(s[i]), "measured" if math.isclose(d[i], max_drop) else "lower bound")
    if math.isclose(d[i], max_drop):
        return OnFrontier(float(s[i]), "measured")
    t = (max_drop - d[i]) / (d[i + 1] - d[i])
    return OnFrontier(float(math.exp(math.log(s[i]) + t * (math.log(s[i + 1]) - math.log(s[i])))), "interpolated")


def metric_at_speedup(pts: pd.DataFrame, speedup: float, x: str = "speedup", y: str = "metric_mean") -> OnFrontier:
    """The metric on the frontier of `pts` at `speedup`: interpolated linearly in log-speedup between
    the frontier points either side; below the slowest frontier point, that point's metric (a lower
    bound: it is at least as fast as asked); above the fastest, not reached."""
    front = pareto_front(pts, x, y)
    s, m = front[x].to_numpy(float), front[y].to_numpy(float)
    if not len(s) or speedup > s[-1] * (1 + 1e-12):
        return OnFrontier(math.nan, "not reached")
    exact = np.flatnonzero(np.isclose(s, speedup))
    if len(exact):
        return OnFrontier(float(m[exact[0]]), "measured")
    if speedup < s[0]:
        return OnFrontier(float(m[0]), "lower bound")
    i = np.flatnonzero(s < speedup)[-1]
    t = (math.log(speedup) - math.log(s[i])) / (math.log(s[i + 1]) - math.log(s[i]))
    return OnFrontier(float(m[i] + t * (m[i + 1] - m[i])), "interpolated")


def hypervolume(pts: pd.DataFrame, ref_drop: float = HV_REF_DROP, x: str = "speedup", drop: str = "drop_mean") -> float:
    """Area dominated by the frontier of `pts` in (log2 speedup, drop) space, bounded by the
    reference point (log2 speedup = 0, drop = `ref_drop`), i.e. (1×, full-model metric - ref_drop).
    Units: points × doublings. With frontier points sorted by speedup (drop rising), it is the
    staircase sum Σ_i (u_i - u_{i-1}) · max(ref_drop - drop_i, 0), u = log2 speedup, u_0 = 0."""
    front = pareto_front(pts, x, drop, minimize_y=True)
    area, previous = 0.0, 0.0
    for s, d in zip(front[x].to_numpy(float), front[drop].to_numpy(float)):
        u = math.log2(s)
        if u <= previous:
            continue
        area += (u - previous) * max(ref_drop - d, 0.0)
        previous = u
    return area


# ---- summaries and tables -----------------------------------------------------------------------


def summary(ok: pd.DataFrame, axis: str = "flops_speedup", drops: Sequence[float] = DROPS,
            speedups: Sequence[float] = SPEEDUPS, ref_drop: float = HV_REF_DROP) -> pd.DataFrame:
    """One row per (task, setting, method) on `axis`: `speedup_at_drop_<d>` (+ `_kind`) for each
    drop, `metric_at_<s>x` (+ `_kind`) for each speedup, `hypervolume`, `n_points`, `min_seeds` and
    `max_seeds` (per point), and the full model's `reference_metric`, `reference_std` and
    `reference_seeds`."""
    pts = points(ok, axis)
    ref = reference(ok).set_index(["task", "setting"])
    rows = []
    for (task, setting, method), group in pts.groupby(["task", "setting", "method"], sort=True):
        row = {"task": task, "setting": setting, "method": method, "axis": axis,
               "metric_name": _first(group["metric_name"]), "n_points": len(group),
               "min_seeds": int(group["n"].min()), "max_seeds": int(group["n"].max()),
               "reference_metric": ref["mean"].get((task, setting), math.nan),
               "reference_std": ref["std"].get((task, setting), math.nan),
               "reference_seeds": ref["n"].get((task, setting), 0)}
        for d in drops:
            at = speedup_at_drop(group, d)
            row[f"speedup_at_drop_{d:g}"], row[f"speedup_at_drop_{d:g}_kind"] = at.value, at.kind
        for s in speedups:
            at = metric_at_speedup(group, s)
            row[f"metric_at_{s:g}x"], row[f"metric_at_{s:g}x_kind"] = at.value, at.kind
        row["hypervolume"] = hypervolume(group, ref_drop)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs.update(axis=axis, ref_drop=ref_drop)
    return out


def format_at(value: float, kind: str, unit: str = "×", digits: int = 2) -> str:
    """`2.41×` measured, `≈2.41×` interpolated, `≥2.41×` lower bound, `—` not reached. A speedup
    below 1 is a slowdown and says so, `0.60× (slower)`, never as a bound (`≥0.60×` would read as
    "maybe faster")."""
    if kind == "not reached" or value is None or not np.isfinite(value):
        return "—"
    text = f"{value:.{digits}f}{unit}"
    if unit == "×" and value < 1:
        return ("≈" if kind == "interpolated" else "") + text + " (slower)"
    return {"interpolated": "≈" + text, "lower bound": "≥" + text}.get(kind, text)


def speedup_table(summ: pd.DataFrame, max_drop: float = 1.0) -> pd.DataFrame:
    """Speedup at ≤ `max_drop` points drop, methods × tasks (a task column per setting when a task
    has several), as formatted strings (see `format_at`), under three rows that say what it is read
    against: the task's metric, the full model's metric (mean ± std over its seeds) and the seeds per
    point. Tasks and methods by the names people read (`analysis.names`)."""
    column = f"speedup_at_drop_{max_drop:g}"
    if summ.empty:
        return pd.DataFrame()
    if column not in summ:
        raise ValueError(f"the summary has no {column}: pass drops=(..., {max_drop}) to summary()")
    summ = summ.copy()
    several = summ.groupby("task")["setting"].nunique()
    summ["column"] = [names.task(t) if several[t] == 1 else f"{names.task(t)} ({s})" for t, s in zip(summ["task"], summ["setting"])]
    summ["cell"] = [format_at(v, k) for v, k in zip(summ[column], summ[f"{column}_kind"])]
    summ["row"] = summ["method"].map(names.method)
    table = summ.pivot(index="row", columns="column", values="cell").fillna("n/a")
    table = table.reindex(sorted(table.index, key=lambda m: (_method_rank(summ, m), m)))
    header = {}
    for col, group in summ.groupby("column"):
        first = group.iloc[0]
        std = f" ± {first['reference_std']:.2f}" if np.isfinite(first["reference_std"]) else ""
        seeds = (group["min_seeds"].min(), group["max_seeds"].max())
        header[col] = {
            "metric": names.metric(first["metric_name"]),
            "full model": f"{first['reference_metric']:.2f}{std} ({first['reference_seeds']} seed{'s' if first['reference_seeds'] != 1 else ''})"
                          if np.isfinite(first["reference_metric"]) else "n/a",
            "seeds per point": f"{seeds[0]}" if seeds[0] == seeds[1] else f"{seeds[0]}–{seeds[1]}",
        }
    table = pd.concat([pd.DataFrame(header).reindex(columns=table.columns), table])
    table.columns.name, table.index.name = None, "method"
    table.attrs["header_rows"] = 3  # metric, full model, seeds: a rule under them in LaTeX
    return table


def _method_rank(summ: pd.DataFrame, display_name: str) -> int:
    """Known methods in the order of `names.METHODS`, a user's own after them."""
    order = [names.method(m) for m in names.METHODS]
    return order.index(display_name) if display_name in order else len(order)


TABLE_NOTE = ("Speedup at which the drop in the task's metric against the full model (same task and seed) is at most {drop:g} "
              "point(s), read off each method's Pareto frontier ({axis}, mean over seeds); the rows above the methods "
              "give the task's metric, the full model's score and the seeds behind each point. "
              "Plain: a measured point. ≈: interpolated between two measured frontier points (linear in log "
              "speedup), not measured. ≥: every measured point is within the drop, so the method reaches at least "
              "its fastest measured speedup. (slower): within the drop the method is slower than the full model. "
              "—: no measured point is within the drop. n/a: no records.")


def to_markdown(table: pd.DataFrame, note: str = "") -> str:
    """A GitHub-flavoured Markdown table (index as the first column) with an optional note below."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|"]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + (f"\n\n{note}\n" if note else "\n")


def to_latex(table: pd.DataFrame, caption: str = "", label: str = "") -> str:
    """A booktabs LaTeX table (needs \\usepackage{booktabs})."""
    def cell(text) -> str:
        text = str(text)
        for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"), ("_", r"\_")):
            text = text.replace(a, b)
        for a, b in (("≥", r"$\geq$"), ("≈", r"$\approx$"), ("×", r"$\times$"), ("±", r"$\pm$"), ("–", "--"), ("—", "--")):
            text = text.replace(a, b)
        return text

    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join([cell(table.index.name or ""), *map(cell, table.columns)]) + r" \\", r"\midrule"]
    for i, (index, row) in enumerate(table.iterrows()):
        if i and i == table.attrs.get("header_rows"):
            lines.append(r"\midrule")
        lines.append(" & ".join([cell(index), *map(cell, row.tolist())]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(r"\caption{" + cell(caption).replace("`", "") + "}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ---- FLOPs against wall clock ---------------------------------------------------------------------


def flops_vs_wallclock(ok: pd.DataFrame) -> pd.DataFrame:
    """Per operating point with both a FLOPs and a wall-clock speedup: the means over seeds and
    `realised` = wall-clock speedup / FLOPs speedup (1: the FLOPs promise holds; < 1: time lost to
    overheads the FLOPs count does not see)."""
    rows = ok[(ok["method"] != FULL_MODEL) & ok["flops_speedup"].notna() & ok["wallclock_speedup_b1"].notna()]
    columns = [*POINT_KEY, "n", "flops_speedup", "wallclock_speedup_b1", "wallclock_speedup_b1_std",
               "throughput_speedup", "realised", "realised_throughput"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = mean_over_seeds(rows, columns=("flops_speedup", "wallclock_speedup_b1", "throughput_speedup"))
    out = out.rename(columns={"flops_speedup_mean": "flops_speedup", "wallclock_speedup_b1_mean": "wallclock_speedup_b1",
                              "throughput_speedup_mean": "throughput_speedup"})
    out["realised"] = out["wallclock_speedup_b1"] / out["flops_speedup"]
    out["realised_throughput"] = out["throughput_speedup"] / out["flops_speedup"]
    return out[columns]


def promise_summary(fw: pd.DataFrame) -> pd.DataFrame:
    """Per method: how much of the FLOPs speedup shows up as wall-clock speedup (batch 1) over its
    points: median and range of `realised`, and how many points are slower than the full model."""
    if fw.empty:
        return pd.DataFrame(columns=["method", "points", "median_realised", "min_realised", "max_realised", "slower_than_full"])
    grouped = fw.groupby("method")
    return pd.DataFrame({
        "points": grouped.size(),
        "median_realised": grouped["realised"].median(),
        "min_realised": grouped["realised"].min(),
        "max_realised": grouped["realised"].max(),
        "slower_than_full": grouped["wallclock_speedup_b1"].apply(lambda s: int((s < 1).sum())),
    }).reset_index()


# ---- what the wall clock was timed on ---------------------------------------------------------------


def timed_on(record: dict, axis: str) -> str:
    """How a record's `axis` was timed: the batch size and the hardware, e.g. `batch 1, Intel Xeon
    Processor, 1 thread` or `batch 32, NVIDIA H200`; "" for the FLOPs axis."""
    if axis == "flops_speedup":
        return ""
    timing = record.get("timing") if isinstance(record.get("timing"), dict) else {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    measure = config.get("measure") or {}
    hardware = record.get("hardware") if isinstance(record.get("hardware"), dict) else {}
    if axis == "wallclock_speedup_b1":
        batch = "batch 1"
    else:
        size = timing.get("batch_size") or measure.get("batch_size")
        batch = f"batch {size}" if size else "batch size not recorded"
    device = timing.get("device_name")
    if device and device != "cpu":
        where = device
    elif hardware.get("cpu"):
        threads = timing.get("threads") or measure.get("threads")
        cpu = " ".join(w for w in str(hardware["cpu"]).replace("(R)", "").replace("(TM)", "").split() if w != "CPU")
        where = cpu.split(" @ ")[0] + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
    else:
        where = "hardware not recorded"
    return f"{batch}, {where}"


def timing_setups(ok: pd.DataFrame, axis: str) -> list[str]:
    """The distinct `timed_on` of the records with a value on `axis` (one, unless records from
    several machines or batch sizes are mixed)."""
    rows = ok[ok[axis].notna()] if axis in ok else ok.iloc[:0]
    return sorted({timed_on(r, axis) for r in rows.to_dict("records")} - {""})


# ---- numbers reported in the papers ---------------------------------------------------------------


def load_reported(paths: str | os.PathLike | Iterable[str | os.PathLike] | None = None) -> pd.DataFrame:
    """The papers' reported points (`experiments/reference/*.csv` by default), READ rows only, with
    the `axis` each belongs on (`*` for the full model at 1×, drawn on every axis)."""
    if paths is None:
        paths = [REPORTED_DIR]
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such reference file or directory (give CSVs like experiments/reference/*.csv)")
        files.extend(sorted(p.glob("*.csv")) if p.is_dir() else [p])
    frames = [pd.read_csv(f, comment="#").assign(file=f.name) for f in files]
    if not frames:
        return pd.DataFrame(columns=[*REPORTED_COLUMNS, "file", "axis"])
    df = pd.concat(frames, ignore_index=True)
    missing = set(REPORTED_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"reference CSVs need the columns {REPORTED_COLUMNS}; missing {sorted(missing)}")
    df = df[df["status"].str.upper() == "READ"].copy()
    df["axis"] = df["speedup_accounting"].map(accounting_axis)
    return df.reset_index(drop=True)


def accounting_axis(accounting: str) -> str | None:
    """Which of our axes a reported speedup belongs on, from its `speedup_accounting`."""
    accounting = str(accounting).lower()
    if accounting == "full_model":
        return "*"
    for prefix, axis in (("flops", "flops_speedup"), ("wallclock", "wallclock_speedup_b1"), ("throughput", "throughput_speedup")):
        if accounting.startswith(prefix):
            return axis
    return None


def accounting_label(accounting: str) -> str:
    """How a paper measured its speedup, for people: `wallclock_k80_batch128` -> `wall clock, K80
    batch 128`; `flops_static_6_of_12_layers` -> `FLOPs, static 6 of 12 layers`."""
    head, *words = str(accounting).split("_")
    if head == "full":
        return "full model"
    words = [re.sub(r"^batch(\d+)$", r"batch \1", w) for w in words]
    words = [w.upper() if re.fullmatch(r"[a-z]+\d+", w) else w for w in words]  # hardware: k80 -> K80
    head = {"flops": "FLOPs", "wallclock": "wall clock", "throughput": "throughput"}.get(head, head)
    return ", ".join([head, " ".join(words)]) if words else head
