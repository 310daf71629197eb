"""Task metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from tokenprune.data.metrics import PRIMARY, compute_metrics
from tokenprune.errors import UserError


def test_accuracy():
    assert compute_metrics("accuracy", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 75.0}
    assert compute_metrics("accuracy", torch.tensor([2, 0, 1]), np.array([2, 1, 1]))["accuracy"] == pytest.approx(200 / 3)


def test_f1_and_accuracy():
    # TP 2, FP 1, FN 1, TN 1: precision = recall = 2/3, so F1 = 2/3; accuracy 3/5.
    out = compute_metrics("f1_accuracy", [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert out == pytest.approx({"f1": 200 / 3, "accuracy": 60.0})
    # No positive predicted and none in the labels: F1 is 0, not an error.
    assert compute_metrics("f1_accuracy", [0, 0], [0, 0])["f1"] == 0.0


def test_matthews():
    # Same table: (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6.
    out = compute_metrics("matthews", [1, 1, 0, 1, 0], [1, 0, 0, 1, 1])
    assert out == pytest.approx({"matthews": 100 / 6, "accuracy": 60.0})
    assert compute_metrics("matthews", [1, 1, 1], [1, 0, 1])["matthews"] == 0.0  # constant prediction


def test_pearson_spearman():
    # Pearson: deviations x (-1.5, -0.5, 0.5, 1.5), y (-3, -1, 0, 4): 11 / sqrt(5 * 26).
    out = compute_metrics("pearson_spearman", [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0])
    assert out["pearson"] == pytest.approx(100 * 11 / math.sqrt(130))
    assert out["spearman"] == pytest.approx(100.0)  # same order
    # Spearman: rank differences (0, 1, 1, 0): 1 - 6 * 2 / (4 * (16 - 1)) = 0.8.
    assert compute_metrics("pearson_spearman", [1, 2, 3, 4], [1, 3, 2, 4])["spearman"] == pytest.approx(80.0)
    # A collapsed regressor (constant output) scores 0, not NaN.
    assert compute_metrics("pearson_spearman", [2.5, 2.5, 2.5], [1.0, 3.0, 4.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_primary_keys_are_computed():
    assert PRIMARY == {"accuracy": "accuracy", "f1_accuracy": "f1", "matthews": "matthews", "pearson_spearman": "spearman"}
    for kind, key in PRIMARY.items():
        out = compute_metrics(kind, [0, 1, 1, 0], [0, 1, 0, 0])
        assert key in out and all(isinstance(v, float) for v in out.values())


def test_bad_input():
    with pytest.raises(UserError, match="task.metric"):
        compute_metrics("bleu", [1], [1])
    with pytest.raises(ValueError):
        compute_metrics("accuracy", [1, 0], [1])
    with pytest.raises(ValueError):
        compute_metrics("accuracy", [], [])
