"""The analysis layer: result records in, Pareto frontiers, tables and figures out.

- `analysis.pareto`: the library (loading, accuracy drop, frontiers, interpolation, hypervolume, seeds).
- `analysis.figures`: the plots, sized for a paper, and the `python -m analysis.figures --results DIR --out DIR` command.
- `analysis.names`: the names of tasks, methods and metrics that people read.
- `analysis/notebooks/`: jupytext notebooks that walk a results directory through both.
"""
