"""Task data: loading splits (local files or the HF hub), tokenising, batching, metrics."""

from tokenprune.data.collate import collate, encode, make_loader
from tokenprune.data.load import data_root, is_regression, load_splits, num_labels, read_split
from tokenprune.data.metrics import PRIMARY, compute_metrics

__all__ = [
    "PRIMARY",
    "collate",
    "compute_metrics",
    "data_root",
    "encode",
    "is_regression",
    "load_splits",
    "make_loader",
    "num_labels",
    "read_split",
]
