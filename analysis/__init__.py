"""The analysis layer: result records in, Pareto frontiers, tables and figures out.

- `analysis.pareto`: the library (loading, accuracy drop, frontiers, interpolation, hypervolume, seeds).
- `analysis.figures`: the plots and the `python -m analysis.figures --results DIR --out DIR` command.
- `analysis/notebooks/`: jupytext notebooks that walk a results directory through both.
"""
