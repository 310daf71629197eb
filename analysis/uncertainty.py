"""Intervals for verdicts, from the per-example outputs every record keeps (`examples.npz`).

One seed on a few hundred dev examples cannot separate methods 1–2 points apart: the standard error
of one accuracy on 500 examples is about 1.5–2 points, and fine-tuning seeds move small GLUE tasks by
several. So every figure here is a mean over seeds with a 95% interval from a **two-level bootstrap**:
each resample draws the seeds with replacement, then, within each drawn seed, that seed's dev
examples with replacement, and recomputes the task's own metric on the resampled examples (F1,
Matthews and Spearman are not means of per-example scores, so they are recomputed, never averaged).
scipy.stats.bootstrap resamples a single level, so the two levels are drawn here with numpy.

Resamples are shared: within a (task, setting), resample r draws the same examples of a seed for
every record of that seed (pairs are matched on the example `idx`), and the same seed draws for every
cell with the same seeds. So the difference of two methods is paired on the same examples and
seeds, and its interval is the interval of the paired difference, much narrower than the two cells'
intervals would suggest when the methods agree on most examples.

- `cell_intervals`: per (task, setting, method, target): metric mean over seeds, interval, seeds.
- `paired_differences`: per pair of methods at the same (task, setting, target): the mean paired
  difference a − b and its interval; `beyond` when the interval excludes 0.
- `speedup_within_drop`: per (task, setting, method): the frontier's largest speedup whose drop from
  the full model (each record's own baseline on the same examples) is within `max_drop`, and its
  lower bound (the 2.5th percentile over resamples of the drops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.pareto import FULL_MODEL, code_versions, format_at, pareto_front, speedup_at_drop, to_markdown, usable
from tokenprune import results
from tokenprune.data.metrics import PRIMARY, compute_metrics

CONFIDENCE = 0.95
N_RESAMPLES = 1000
GROUP = ["task", "setting"]
CELL = ["task", "setting", "method", "speedup_target"]


# ---- the metric on many resamples at once -----------------------------------------------------------

def resampled_metric(kind: str, prediction: np.ndarray, label: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The task's primary metric (0–100) on each resample: `draws` is R×n indices into the examples.
    Classification metrics come from per-resample confusion counts (exactly scikit-learn's formulas);
    correlations are recomputed one resample at a time."""
    name = PRIMARY[kind]
    if kind == "pearson_spearman":
        return np.array([compute_metrics(kind, prediction[d], label[d])[name] for d in draws])
    classes = int(max(prediction.max(), label.max())) + 1
    codes = (label.astype(np.int64) * classes + prediction.astype(np.int64))[draws]  # R×n
    R, n = codes.shape
    offsets = (np.arange(R) * classes * classes)[:, None]
    confusion = np.bincount((codes + offsets).ravel(), minlength=R * classes * classes).reshape(R, classes, classes)
    correct = np.trace(confusion, axis1=1, axis2=2).astype(float)
    if name == "accuracy":
        return 100.0 * correct / n
    if name == "f1":  # binary, positive class 1; 0 when there is no positive at all (zero_division=0)
        tp = confusion[:, 1, 1].astype(float)
        denominator = 2 * tp + confusion[:, 0, 1] + confusion[:, 1, 0]
        return 100.0 * np.divide(2 * tp, denominator, out=np.zeros(R), where=denominator > 0)
    if name == "matthews":  # multiclass MCC as scikit-learn computes it; 0 when undefined
        true, pred = confusion.sum(2).astype(float), confusion.sum(1).astype(float)
        covariance = correct * n - (true * pred).sum(1)
        denominator = np.sqrt((n * n - (pred * pred).sum(1)) * (n * n - (true * true).sum(1)))
        return 100.0 * np.divide(covariance, denominator, out=np.zeros(R), where=denominator > 0)
    raise ValueError(f"no resampled form of the metric {name!r}")


# ---- the shared resamples ---------------------------------------------------------------------------

@dataclass
class Outputs:
    """One record's per-example outputs, in its seed's canonical example order."""

    label: np.ndarray
    prediction: np.ndarray
    reference_prediction: np.ndarray  # the stronger reference the record measured its drop against


class Resamples:
    """The bootstrap resamples of one (task, setting): per seed, R draws of its examples (shared by
    every record of that seed), and for any list of seeds, R draws of those seeds."""

    def __init__(self, records: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = 0):
        self.n_resamples, self.seed = n_resamples, seed
        self.kind = _metric_kind(records.iloc[0])
        self.order: dict[int, pd.Index] = {}
        self.outputs: dict[str, Outputs] = {}
        self.draws: dict[int, np.ndarray] = {}
        for row in records.itertuples():
            examples = results.read_examples(row.path).set_index("idx")
            s = int(row.seed)
            if s not in self.order:
                self.order[s] = examples.index
                rng = np.random.default_rng([seed, s])
                self.draws[s] = rng.integers(0, len(examples), size=(n_resamples, len(examples)))
            elif not examples.index.sort_values().equals(self.order[s].sort_values()):
                raise ValueError(f"{row.path}: its dev examples differ from other records of seed {s} "
                                 "(another budget or data?): records to compare must share their examples.")
            examples = examples.loc[self.order[s]]
            reference = "control_prediction" if getattr(row, "reference", None) == "equal-training control" else "baseline_prediction"
            self.outputs[row.path] = Outputs(*(examples[k].to_numpy() for k in ("label", "prediction", reference)))
        self._metric: dict[tuple[str, str], np.ndarray] = {}

    def metric(self, path: str, seed: int, which: str = "prediction") -> np.ndarray:
        """R values of the record's metric (or, with which="reference_prediction", its reference's)."""
        key = (path, which)
        if key not in self._metric:
            outputs = self.outputs[path]
            self._metric[key] = resampled_metric(self.kind, getattr(outputs, which), outputs.label, self.draws[seed])
        return self._metric[key]

    def seed_draws(self, seeds: list[int]) -> np.ndarray:
        """R×S positions into `seeds` (the same draws for the same seed list)."""
        rng = np.random.default_rng([self.seed, 1_000_003, *seeds])
        return rng.integers(0, len(seeds), size=(self.n_resamples, len(seeds)))

    def mean_over_seeds(self, per_seed: dict[int, np.ndarray]) -> np.ndarray:
        """R values: for each resample, the mean over its drawn seeds of that seed's resampled value."""
        seeds = sorted(per_seed)
        table = np.stack([per_seed[s] for s in seeds], axis=1)  # R×S
        picks = self.seed_draws(seeds)
        return np.take_along_axis(table, picks, axis=1).mean(1)


def _metric_kind(row) -> str:
    config = row.config if isinstance(row.config, dict) else {}
    kind = (config.get("task") or {}).get("metric")
    if kind not in PRIMARY:
        raise ValueError(f"{row.path}: the record's config names no task metric; re-run it with this version.")
    return kind


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def _with_examples(ok: pd.DataFrame) -> pd.DataFrame:
    return ok[ok["examples"].notna()] if "examples" in ok else ok.iloc[0:0]


def _groups(ok: pd.DataFrame, n_resamples: int, seed: int):
    for key, records in _with_examples(ok).groupby(GROUP, sort=True):
        yield key, records, Resamples(records, n_resamples, seed)


# ---- verdicts -----------------------------------------------------------------------------------------

def cell_intervals(ok: pd.DataFrame, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                   seed: int = 0) -> pd.DataFrame:
    """Per (task, setting, method, target): `metric_mean` over seeds, its interval `lo`–`hi`,
    `half_width`, `n_seeds` and the full model's mean on the same examples (`reference_mean`)."""
    rows = []
    for _, records, rs in _groups(ok, n_resamples, seed):
        for cell, group in records.groupby(["method", "speedup_target"], sort=True):
            values = rs.mean_over_seeds({int(r.seed): rs.metric(r.path, int(r.seed)) for r in group.itertuples()})
            lo, hi = interval(values, confidence)
            rows.append({**dict(zip(GROUP, group.iloc[0][GROUP])), "method": cell[0], "speedup_target": cell[1],
                         "metric_name": group.iloc[0]["metric_name"], "metric_mean": float(group["metric"].mean()),
                         "lo": lo, "hi": hi, "half_width": (hi - lo) / 2, "n_seeds": len(group),
                         "reference_mean": float(group["reference_metric"].mean()),
                         "speedup": float(group["flops_speedup"].mean())})
    return pd.DataFrame(rows)


def paired_differences(ok: pd.DataFrame, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = 0, against: str | None = None) -> pd.DataFrame:
    """Per pair of methods (a, b) at the same (task, setting, target), on their common seeds: `diff`
    = mean over seeds of metric_a − metric_b, its interval, and `beyond` (the interval excludes 0:
    a is better, or worse, beyond its interval). `against`: only pairs with that method as b."""
    rows = []
    for _, records, rs in _groups(ok, n_resamples, seed):
        for target, group in records.groupby("speedup_target", sort=True):
            by_method = {m: {int(r.seed): r.path for r in g.itertuples()} for m, g in group.groupby("method")}
            for a in sorted(by_method):
                for b in sorted(by_method):
                    if a == b or (against is not None and b != against) or (against is None and a > b):
                        continue
                    seeds = sorted(set(by_method[a]) & set(by_method[b]))
                    if not seeds:
                        continue
                    diff = rs.mean_over_seeds({s: rs.metric(by_method[a][s], s) - rs.metric(by_method[b][s], s)
                                               for s in seeds})
                    point = float(np.mean([group[(group.method == a) & (group.seed == s)]["metric"].iloc[0]
                                           - group[(group.method == b) & (group.seed == s)]["metric"].iloc[0]
                                           for s in seeds]))
                    lo, hi = interval(diff, confidence)
                    rows.append({**dict(zip(GROUP, group.iloc[0][GROUP])), "speedup_target": target, "a": a, "b": b,
                                 "diff": point, "lo": lo, "hi": hi, "n_seeds": len(seeds), "beyond": lo > 0 or hi < 0})
    return pd.DataFrame(rows)


def speedup_within_drop(ok: pd.DataFrame, max_drop: float = 1.0, n_resamples: int = N_RESAMPLES,
                        confidence: float = CONFIDENCE, seed: int = 0) -> pd.DataFrame:
    """Per (task, setting, method): the largest speedup on the method's frontier whose mean drop
    (the record's reference − method, same examples: its full model, or its equal-training control
    where that is stronger) is within `max_drop` points (`speedup`, with the kind
    pareto.speedup_at_drop gives it), and `lower_bound`: the lower percentile of that speedup over
    the resamples (a resample where no point is within the drop counts as 1×)."""
    rows = []
    tail = 100 * (1 - confidence) / 2
    for _, records, rs in _groups(ok, n_resamples, seed):
        for method, group in records[records["method"] != FULL_MODEL].groupby("method", sort=True):
            point_rows, drop_draws = [], []
            for target, g in group.groupby("speedup_target", sort=True):
                drops = {int(r.seed): rs.metric(r.path, int(r.seed), "reference_prediction") - rs.metric(r.path, int(r.seed))
                         for r in g.itertuples()}
                drop_draws.append(rs.mean_over_seeds(drops))
                point_rows.append({"speedup": float(g["flops_speedup"].mean()), "drop_mean": float(g["drop"].mean())})
            pts = pd.DataFrame(point_rows)
            at = speedup_at_drop(pts, max_drop)
            draws = np.stack(drop_draws, axis=1)  # R×points
            per_resample = []
            for r in range(rs.n_resamples):
                v = speedup_at_drop(pts.assign(drop_mean=draws[r]), max_drop).value
                per_resample.append(1.0 if math.isnan(v) else v)
            rows.append({**dict(zip(GROUP, group.iloc[0][GROUP])), "method": method, "max_drop": max_drop,
                         "speedup": at.value, "kind": at.kind, "lower_bound": float(np.percentile(per_resample, tail)),
                         "n_points": len(pts), "frontier_points": len(pareto_front(pts, "speedup", "drop_mean", minimize_y=True))})
    return pd.DataFrame(rows)


# ---- tables ---------------------------------------------------------------------------------------------

def _column(task: str, setting: str, target: float, several: bool) -> str:
    return f"{task} {target:g}x" + (f" ({setting})" if several else "")


def cells_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Methods × (task, target): `82.1 ± 1.4 (3)`, the mean over seeds ± the interval's half-width
    (seeds); the full model (bert) in its own row at its one operating point."""
    several = cells.groupby("task")["setting"].nunique().gt(1).to_dict()
    cells = cells.assign(column=[_column(t, s, x, several[t]) for t, s, x in
                                 zip(cells["task"], cells["setting"], cells["speedup_target"])],
                         cell=[f"{m:.1f} ± {h:.1f} ({n})" for m, h, n in
                               zip(cells["metric_mean"], cells["half_width"], cells["n_seeds"])])
    table = cells.pivot(index="method", columns="column", values="cell").fillna("")
    table.columns.name, table.index.name = None, "method"
    return table


def differences_table(diffs: pd.DataFrame) -> pd.DataFrame:
    """Methods × (task, target): `+1.2 [0.3, 2.1] ▲` (a − b, interval; ▲/▼ where a is better/worse
    beyond the interval)."""
    several = diffs.groupby("task")["setting"].nunique().gt(1).to_dict()
    cells = diffs.assign(
        column=[_column(t, s, x, several[t]) for t, s, x in zip(diffs["task"], diffs["setting"], diffs["speedup_target"])],
        cell=[f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" + (" ▲" if lo > 0 else " ▼" if hi < 0 else "")
              for d, lo, hi in zip(diffs["diff"], diffs["lo"], diffs["hi"])])
    table = cells.pivot(index="a", columns="column", values="cell").fillna("")
    table.columns.name, table.index.name = None, "method"
    return table


def verdict_tables(ok: pd.DataFrame, against: str | None = "topk", max_drop: float = 1.0,
                   n_resamples: int = N_RESAMPLES) -> dict[str, tuple[pd.DataFrame, str, pd.DataFrame]]:
    """{name: (table for reading, its note, the full numbers)} for `cells`, `differences` (paired
    against `against`; every pair when it is None or has no records) and `within`. Empty when no
    record keeps per-example outputs."""
    cells = cell_intervals(ok, n_resamples)
    if cells.empty:
        return {}
    if against is not None and against not in set(ok["method"]):
        against = None
    diffs = paired_differences(ok, n_resamples, against=against)
    within = speedup_within_drop(ok, max_drop, n_resamples)
    versus = f"against {against}" if against else "between every two methods (a − b)"
    return {
        "cells": (cells_table(cells), f"Metric mean over seeds ± half-width of its {CONFIDENCE:.0%} interval (number of "
                                      "seeds); two-level bootstrap over seeds and dev examples.", cells),
        "differences": (differences_table(diffs) if not diffs.empty else pd.DataFrame(),
                        f"Paired difference {versus} on the same seeds and dev examples, with its "
                        f"{CONFIDENCE:.0%} interval; ▲/▼ better/worse beyond the interval.", diffs),
        "within": (within.assign(speedup=[format_at(v, k) for v, k in zip(within["speedup"], within["kind"])],
                                 lower_bound=[f"{v:.2f}×" for v in within["lower_bound"]])
                   .set_index("method")[["task", "setting", "speedup", "lower_bound"]] if not within.empty else pd.DataFrame(),
                   f"Largest FLOPs speedup within {max_drop:g} point(s) of the stronger reference, read off each "
                   "method's frontier (`*` interpolated, `≥` a lower bound of the measured range), and its lower "
                   f"{CONFIDENCE:.0%} bound over the resamples.", within),
    }


def write_verdict_tables(ok: pd.DataFrame, out: Path, against: str | None = "topk", max_drop: float = 1.0,
                         n_resamples: int = N_RESAMPLES, echo: bool = False) -> list[Path]:
    """`uncertainty_<name>.md` and `.csv` in `out` for each of `verdict_tables`; the paths written."""
    written = []
    versions = code_versions(ok)
    for name, (table, note, frame) in verdict_tables(ok, against, max_drop, n_resamples).items():
        if table.empty:
            continue
        text = to_markdown(table, f"{note} {versions}" if versions else note)
        if echo:
            print("\n" + text)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"uncertainty_{name}.md").write_text(text)
            frame.to_csv(out / f"uncertainty_{name}.csv", index=False)
            written += [out / f"uncertainty_{name}.md", out / f"uncertainty_{name}.csv"]
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m analysis.uncertainty",
                                     description="Intervals over seeds and dev examples from tokenprune records.")
    parser.add_argument("--results", nargs="+", required=True, help="directories of runs (or result.json files)")
    parser.add_argument("--against", default="topk", help="the method every other is compared with, paired (default topk)")
    parser.add_argument("--max-drop", type=float, default=1.0, help="drop for the speedup-within-a-drop table (points)")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples (default 1000)")
    parser.add_argument("--out", help="also write the tables here as Markdown and CSV")
    args = parser.parse_args(argv)

    selection = usable(args.results)
    ok = selection.ok
    print(selection.message())
    missing = int(ok["examples"].isna().sum()) if "examples" in ok else len(ok)
    if missing:
        print(f"{missing} records keep no per-example outputs (older runs) and are left out of the intervals.")
    if _with_examples(ok).empty:
        print("No records with per-example outputs: run the jobs with this version of tokenprune.")
        return 1
    write_verdict_tables(ok, Path(args.out) if args.out else None, args.against, args.max_drop, args.resamples, echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
