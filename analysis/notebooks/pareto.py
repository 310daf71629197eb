# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pareto frontiers: accuracy against speedup, per task and method
#
# Walks a results directory (the `result.json` records of one or more sweeps) into the Pareto plots
# and tables. Every number comes from `analysis/pareto.py`, every plot from `analysis/figures.py`.
#
# **Input**: `TOKENPRUNE_RESULTS` (one or more directories, separated by `:`), else the repository's
# `multirun/` and `outputs/`. Open it with `jupytext --to notebook analysis/notebooks/pareto.py`
# (the `.ipynb` is not committed), or run it headless (the dev install has what this needs):
# `TOKENPRUNE_RESULTS=multirun/2025-01-01 jupytext --execute --to notebook analysis/notebooks/pareto.py`.

# %%
import sys
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "analysis" / "pareto.py").is_file())
sys.path.insert(0, str(ROOT))  # the repository, for a checkout that is not pip-installed

from IPython.display import Markdown, display

from analysis import figures, pareto

RESULTS = pareto.results_dirs()
selection = pareto.usable(RESULTS)
ok = selection.ok
print("Reading", ", ".join(map(str, RESULTS)))
print(selection.message())

# %% [markdown]
# ## The full model per task
# From the `bert` records (mean ± std over seeds). Each record's drop is against the full model on
# the same dev examples with the same seed (its own `baseline_metric`).

# %%
pareto.reference(ok)

# %% [markdown]
# ## Operating points and frontiers (FLOPs)
# One row per (task, setting, method, speedup target), averaged over seeds. `on_frontier`: not
# dominated within its method; `on_overall_frontier`: not dominated by any method.

# %%
pareto.mark_frontiers(pareto.points(ok, "flops_speedup")).round(3)

# %% [markdown]
# ## Figures
# Accuracy against FLOPs speedup and against wall-clock speedup (batch 1), log-x, at page width
# (`size="column"` for a column of a paper). The numbers the papers report (`experiments/reference/`:
# BERT-base, their own hardware and speedup accounting) get a panel of their own in each task's
# figure, never our axes, and are never part of our frontiers.

# %%
for axis in ("flops_speedup", "wallclock_speedup_b1"):
    _ = figures.grid_figure(ok, axis, size="page")
print(figures.caption(ok, figures.order_tasks(ok["task"].unique()), ["flops_speedup", "wallclock_speedup_b1"]))

# %%
reported = pareto.load_reported()
for task in figures.order_tasks(ok["task"].unique()):
    _ = figures.task_figure(ok, task, reported=reported, size="page")

# %% [markdown]
# ## Speedup at a fixed accuracy drop
# Read off each method's frontier: `≈` interpolated linearly in log-speedup between two measured
# points; `≥` a lower bound (every measured point is within the drop); `(slower)` slower than the
# full model within the drop; `—` no point within it. The first rows: the task's metric, the full
# model's score and the seeds per point.

# %%
for axis in ("flops_speedup", "wallclock_speedup_b1"):
    summ = pareto.summary(ok, axis)
    for drop in pareto.DROPS:
        display(Markdown(f"**{pareto.AXES[axis]} at ≤ {drop:g} point drop**\n\n" + pareto.to_markdown(pareto.speedup_table(summ, drop))))

# %% [markdown]
# ## Accuracy at a fixed speedup, and hypervolume
# Hypervolume: the area the frontier dominates in (log2 speedup, drop) space above the reference
# point (1×, full model − 5 points); units are points × doublings, larger is better.

# %%
summ = pareto.summary(ok, "flops_speedup")
summ[["task", "method", "metric_at_2x", "metric_at_2x_kind", "metric_at_3x", "metric_at_3x_kind", "hypervolume"]].round(2)

# %%
summ.pivot(index="method", columns="task", values="hypervolume").round(2)

# %% [markdown]
# ## Seeds
# Mean ± std and the number of seeds of every operating point.

# %%
pareto.mean_over_seeds(ok, columns=("metric", "drop", "flops_speedup")).round(3)
