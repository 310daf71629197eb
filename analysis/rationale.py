"""Rationale agreement by layer: which methods keep the tokens that decide the label.

Reads the `rationale` block of every ok record under --results (tasks with gold rationales:
task=needle, task=movies; see tokenprune/rationale.py for the measures) and writes, per task:

- `rationale_<task>.csv`: one row per (method, speedup target, layer): the mean over seeds of
  recall, precision, F1, false-positive rate and kept fraction, and the number of seeds;
- `rationale_recall_<task>.png` / `.pdf`: recall of the gold tokens by layer, one line per method,
  one panel per speedup target (the full model, which drops nothing, has recall 1 at every layer).

    python -m analysis.rationale --results multirun/<date>/<time> --out figures/rationale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402

from analysis import figures, names  # noqa: E402
from analysis.pareto import FULL_MODEL  # noqa: E402
from tokenprune import results  # noqa: E402
from tokenprune.rationale import MEASURES  # noqa: E402


def by_layer(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, target, layer): each measure's mean over seeds, and `seeds`."""
    rows = []
    for record in records.itertuples():
        block = record.rationale
        if record.status != "ok" or not isinstance(block, dict):
            continue
        per_layer = block["per_layer"]
        for layer in range(len(per_layer["recall"])):
            rows.append({"task": record.task, "method": record.method, "speedup_target": float(record.speedup_target),
                         "seed": record.seed, "layer": layer, **{m: per_layer[m][layer] for m in MEASURES}})
    columns = ["task", "method", "speedup_target", "layer", *MEASURES, "seeds"]
    if not rows:
        return pd.DataFrame(columns=columns)
    df = pd.DataFrame(rows)
    keys = ["task", "method", "speedup_target", "layer"]
    table = df.groupby(keys, sort=True)[list(MEASURES)].mean().round(4)
    table["seeds"] = df.groupby(keys, sort=True)["seed"].nunique()
    return table.reset_index()[columns]


def recall_figure(table: pd.DataFrame, task: str):
    """Recall by layer, a panel per speedup target; the full model's line (recall 1) in every panel."""
    rows = table[table.task == task]
    full = rows[rows.method == FULL_MODEL]
    targets = sorted(set(rows[rows.method != FULL_MODEL].speedup_target)) or [1.0]
    with figures.paper_rc("page"):
        fig, axes = figures.panel_figure("page", 1, len(targets), 2.1)
        handles = {}
        for ax, target in zip(axes[0], targets):
            cell = pd.concat([full, rows[(rows.speedup_target == target) & (rows.method != FULL_MODEL)]])
            for method, lines in cell.groupby("method", sort=True):
                label = names.method(method)
                handles[label], = ax.plot(lines.layer + 1, lines.recall, label=label, **figures.style(method))
            ax.set_title(f"{names.task(task)}, {target:g}× target")
            ax.set_xlabel("Layer")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        for ax in axes[0][1:]:
            ax.sharey(axes[0][0])
            ax.tick_params(labelleft=False)
        axes[0][0].set_ylabel("Rationale recall (gold tokens kept)")
        # one legend above the panels, as the suite's other figures: inside a panel it hid the lines
        figures.legend_above(fig, handles, "page")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.rationale", description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", required=True, help="run output directories (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the CSV tables and figures")
    args = parser.parse_args(argv)
    table = by_layer(results.load(args.results))
    if table.empty:
        print(f"No ok record under {', '.join(args.results)} has a rationale block: run a task with gold rationales "
              "(task=needle, or task=movies with its ERASER folder).", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in sorted(set(table.task)):
        path = out / f"rationale_{task}.csv"
        table[table.task == task].to_csv(path, index=False)
        print(path)
        for written in figures.save(recall_figure(table, task), out / f"rationale_recall_{task}", size="page"):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
