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
# # FLOPs speedup against wall-clock speedup: where the methods' promises break
#
# Token-reduction papers mostly report FLOPs. A FLOPs saving turns into time only if tokens are
# physically removed, the selector is cheap, and the hardware is busy enough for fewer tokens to
# matter (batch-1 latency on a GPU often is not). This notebook puts, per method, the FLOPs speedup
# next to the wall-clock speedup measured in the same job against the full model.
#
# **Input**: `TOKENPRUNE_RESULTS` (one or more directories, separated by `:`), else the repository's
# `multirun/` and `outputs/`. Records without wall-clock fields (timing off) are left out here.

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
print(f"{int(ok['wallclock_speedup_b1'].isna().sum())} usable records have no wall-clock speedup (timing off).")

# %% [markdown]
# ## Per method: how much of the FLOPs speedup shows up in time
# `realised` = wall-clock speedup (batch 1) / FLOPs speedup: 1 keeps the promise, below 1 loses time
# to what FLOPs do not count (selector passes, gathers, kernel launches, memory traffic).

# %%
fw = pareto.flops_vs_wallclock(ok)
pareto.promise_summary(fw).round(3)

# %%
_ = figures.flops_vs_wallclock_figure(ok, size="page")
print(figures.flops_vs_wallclock_caption(ok))

# %% [markdown]
# ## Every operating point
# Sorted from the worst-kept promise. Points slower than the full model (wall-clock speedup < 1)
# are the sharpest breaks.

# %%
fw.sort_values("realised").round(3)

# %%
fw[fw["wallclock_speedup_b1"] < 1].round(3)

# %% [markdown]
# ## The same frontier read on both axes
# Speedup at ≤ 1 point drop, on FLOPs and on wall clock: a method can lead on one and trail on the other.

# %%
for axis in ("flops_speedup", "wallclock_speedup_b1"):
    table = pareto.speedup_table(pareto.summary(ok, axis), 1.0)
    display(Markdown(f"**{pareto.AXES[axis]} at ≤ 1 point drop**\n\n" + pareto.to_markdown(table)))

# %% [markdown]
# Per task, both axes side by side: `figures.task_figure` (shown in `pareto.py`), or
# `python -m analysis.figures --results DIR --out DIR` for every figure as PNG and PDF.
