"""GLUE's task metrics with scikit-learn / scipy, all on a 0–100 scale.

Degenerate inputs (constant predictions or labels) give 0 for the correlations, as scikit-learn
does for Matthews, so that a collapsed model ranks last instead of making the metric NaN.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tokenprune.errors import UserError

# The metric each kind is ranked by (model selection, Pareto fronts).
PRIMARY: dict[str, str] = {
    "accuracy": "accuracy",
    "f1_accuracy": "f1",
    "matthews": "matthews",
    "pearson_spearman": "spearman",
}


def compute_metrics(kind: str, predictions: Any, labels: Any) -> dict[str, float]:
    """`predictions`: class ids (or scores for `pearson_spearman`), aligned with `labels`."""
    if kind not in PRIMARY:
        raise UserError(f"task.metric must be one of {sorted(PRIMARY)}, not {kind!r}.")
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.ndim != 1 or pred.shape != gold.shape or len(pred) == 0:
        raise ValueError(f"need two equally long, non-empty 1-d arrays, got {pred.shape} and {gold.shape}")
    if kind == "pearson_spearman":
        pred, gold = pred.astype(float), gold.astype(float)
        return {"pearson": _correlation(stats.pearsonr, pred, gold), "spearman": _correlation(stats.spearmanr, pred, gold)}
    out = {"accuracy": 100.0 * accuracy_score(gold, pred)}
    if kind == "f1_accuracy":
        out["f1"] = 100.0 * f1_score(gold, pred, pos_label=1, average="binary", zero_division=0)
    elif kind == "matthews":
        out = {"matthews": 100.0 * matthews_corrcoef(gold, pred), **out}
    return {k: float(v) for k, v in out.items()}


def _correlation(fn, pred: np.ndarray, gold: np.ndarray) -> float:
    if len(pred) < 2 or np.all(pred == pred[0]) or np.all(gold == gold[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = fn(pred, gold)[0]
    return 0.0 if np.isnan(value) else float(100.0 * value)
