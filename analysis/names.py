"""The names people read in figures and tables, for the names records use. A task or method not
listed here (a user's own) keeps its record name."""

from __future__ import annotations

TASKS = {
    "cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B", "qnli": "QNLI", "mnli": "MNLI",
    "qqp": "QQP", "wnli": "WNLI", "imdb": "IMDB", "news20": "20 Newsgroups", "hyperpartisan": "Hyperpartisan",
    "needle": "Needle", "movies": "Movie Reviews",
}
METHODS = {
    "bert": "Full model", "topk": "Top-k attention", "trbert": "TR-BERT", "adapler": "AdapLeR",
    "powerbert": "PoWER-BERT", "distilbert": "DistilBERT", "truncate": "Truncation", "random": "Random tokens",
    "ltp": "LTP", "lat": "LAT",
}
METRICS = {
    "accuracy": "accuracy", "f1": "F1", "matthews": "Matthews corr.", "spearman": "Spearman corr.",
    "pearson": "Pearson corr.", "unstated": "metric (unstated)",
}


def task(name: str) -> str:
    return TASKS.get(name, name)


def method(name: str) -> str:
    return METHODS.get(name, name)


def metric(name: str | None) -> str:
    return METRICS.get(name, name or "metric")
