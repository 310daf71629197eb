"""tokenprune: dynamic token reduction for BERT-style encoders, measured on one harness."""

__version__ = "0.1.0"
