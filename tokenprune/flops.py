"""Analytic FLOPs from the tokens each layer really processed (a `Trace`, or an `EvalResult`).

Canonical count, the suite's one accounting for every method, per example: 2 × the multiply-adds of every matmul,
over real tokens only. A layer with n tokens into its attention and n' into its FFN costs

    8·n·d² + 4·n²·d            Q, K, V and output projections; QKᵀ and AV
    + 4·n'·d·d_ff              the FFN's two matrices

plus the pooler (2·d²), the classifier (2·d·C) and the FLOPs the policy's selectors report.
Embeddings, biases, LayerNorm, softmax and activations are not counted. The baseline is the full
backbone unpruned on the same real lengths. Speedup = Σ baseline / Σ method (a ratio of sums).

The papers' own accountings, to set numbers beside theirs (all returned as FLOPs = 2·MACs where
the paper counts MACs):

    trbert     TR-BERT's MACs table, macs(n) = 12·n·d² + 2·n²·d per layer (no head but the classifier's
               d·C, no embeddings, no pooler); its selector cost is the policy's own report.
    adapler    AdapLeR's polynomials, fitted to TensorFlow-profiler counts of BERT-base (d = 768,
               12 layers): they include AdapLeR's own predictor at every layer, biases, LayerNorm etc.
               Their constants are BERT-base's, so for other sizes the absolute values are wrong and
               only the ratio is indicative.
    powerbert  the §1.1 split on the padded length (ℓ₀ = N): a layer's count is the padded length
               until a real token has been dropped (padding is eliminated first), no head.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("canonical", "trbert", "adapler", "powerbert")


@dataclass(frozen=True)
class Dims:
    d: int  # hidden size
    d_ff: int  # FFN inner size
    layers: int
    num_labels: int


def dims(config: Any) -> Dims:
    """The sizes FLOPs depend on, from a HF config (or anything with the same attribute names)."""
    d_ff = getattr(config, "intermediate_size", None) or config.hidden_dim  # DistilBERT: hidden_dim
    return Dims(int(config.hidden_size), int(d_ff), int(config.num_hidden_layers), int(config.num_labels))


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# --- canonical ---------------------------------------------------------------------------------

def layer_flops(n_attn: Any, n_ffn: Any, d: int, d_ff: int) -> np.ndarray:
    """Canonical FLOPs of one layer with n_attn tokens into attention and n_ffn into the FFN."""
    a, f = _array(n_attn), _array(n_ffn)
    return 8 * a * d * d + 4 * a * a * d + 4 * f * d * d_ff


def head_flops(d: int, num_labels: int) -> float:
    """Pooler (d×d) and classifier (d×C) on [CLS]."""
    return 2.0 * d * d + 2.0 * d * num_labels


def canonical_flops(attn_tokens: Any, ffn_tokens: Any, config: Any, selector_flops: Any = None) -> np.ndarray:
    """Per-example FLOPs from N×L token counts (the model's own layers) and the selectors' FLOPs."""
    dm = dims(config)
    total = layer_flops(attn_tokens, ffn_tokens, dm.d, dm.d_ff).sum(axis=-1) + head_flops(dm.d, dm.num_labels)
    if selector_flops is not None:
        total = total + _array(selector_flops)
    return total


def canonical_baseline(lengths: Any, config: Any) -> np.ndarray:
    """Per-example FLOPs of the unpruned backbone on the real lengths."""
    dm = dims(config)
    n = _array(lengths)
    return dm.layers * layer_flops(n, n, dm.d, dm.d_ff) + head_flops(dm.d, dm.num_labels)


# --- the papers' accountings -------------------------------------------------------------------

def trbert_layer_macs(n: Any, d: int = 768) -> np.ndarray:
    """TR-BERT's `macs_list.json` entry for n tokens: 12·n·d² + 2·n²·d."""
    n = _array(n)
    return 12 * n * d * d + 2 * n * n * d


def trbert_macs_table(d: int = 768, max_len: int = 1024) -> list[int]:
    """TR-BERT's table, entries n = 0..max_len (its published file has d = 768, max_len = 1024)."""
    return [12 * n * d * d + 2 * n * n * d for n in range(max_len + 1)]


def _trbert_macs(attn: np.ndarray, ffn: np.ndarray, dm: Dims) -> np.ndarray:
    # macs(n) split at the FFN so that decisions after attention are counted too; equal to the
    # table entry when n_attn = n_ffn and d_ff = 4d
    per_layer = 4 * attn * dm.d**2 + 2 * attn**2 * dm.d + 2 * ffn * dm.d * dm.d_ff
    return per_layer.sum(axis=-1) + dm.d * dm.num_labels


# AdapLeR's fitted constants: its published code's TF-profiler FLOPs of BERT-base as a quadratic in length
_ADAPLER_N2, _ADAPLER_N = 3156.0, 14233554.0  # per layer, its predictor included
_ADAPLER_EMB = 6152.0
_BERT_N2, _BERT_N, _BERT_CONST = 37872.0, 170216500.0, 1183490.0 - 1537.0


def adapler_bert_flops(n: Any, num_labels: int, layers: int = 12) -> np.ndarray:
    """AdapLeR's F_BERT(n); its layer terms are scaled by layers/12 for a backbone of another depth."""
    n = _array(n)
    return (layers / 12) * (_BERT_N2 * n * n + _BERT_N * n) + _BERT_CONST + 1537.0 * num_labels


def adapler_method_flops(attn_tokens: Any, num_labels: int) -> np.ndarray:
    """AdapLeR's F_AdapLeR(n_1..n_L): n_ℓ = tokens processed by each layer (first column: layer 0)."""
    n = _array(attn_tokens)
    return (1183537.0 + 1537.0 * (num_labels - 1) + _ADAPLER_EMB * n[..., 0]
            + (_ADAPLER_N2 * n * n + _ADAPLER_N * n).sum(axis=-1))


def _powerbert_macs(attn: np.ndarray, ffn: np.ndarray, lengths: np.ndarray, padded_len: int, dm: Dims) -> np.ndarray:
    # padding is eliminated first, so a count is the padded length until a real token goes
    pad = lambda x: np.where(x < lengths[:, None], x, float(padded_len))  # noqa: E731
    a, f = pad(attn), pad(ffn)
    return (4 * a * dm.d**2 + 2 * a**2 * dm.d + 2 * f * dm.d * dm.d_ff).sum(axis=-1)


def _warn_adapler(dm: Dims) -> None:
    if dm.d != 768:
        warnings.warn(f"flops mode 'adapler' uses constants fitted to BERT-base (d=768); this model has "
                      f"d={dm.d}, so its absolute FLOPs are off and only the speedup is indicative", stacklevel=3)


# --- one entry point ---------------------------------------------------------------------------

def method_flops(
    attn_tokens: Any,
    ffn_tokens: Any,
    config: Any,
    selector_flops: Any = None,
    lengths: Any = None,
    mode: str = "canonical",
    padded_len: int | None = None,
) -> np.ndarray:
    """Per-example FLOPs of a run (N×L token counts of the model's own layers) in accounting `mode`.
    `lengths` (real input lengths) and `padded_len` are needed by `powerbert` only."""
    attn, ffn, dm = _array(attn_tokens), _array(ffn_tokens), dims(config)
    if mode == "canonical":
        return canonical_flops(attn, ffn, config, selector_flops)
    if mode == "trbert":
        selector = 0.0 if selector_flops is None else _array(selector_flops)
        return 2 * _trbert_macs(attn, ffn, dm) + selector
    if mode == "adapler":
        _warn_adapler(dm)
        return adapler_method_flops(attn, dm.num_labels)
    if mode == "powerbert":
        if lengths is None or padded_len is None:
            raise ValueError("flops mode 'powerbert' needs the real lengths and padded_len (the length it pads to)")
        return 2 * _powerbert_macs(attn, ffn, _array(lengths), padded_len, dm)
    raise ValueError(f"unknown flops mode {mode!r}; choose one of {MODES}")


def baseline_flops(lengths: Any, config: Any, mode: str = "canonical", padded_len: int | None = None) -> np.ndarray:
    """Per-example FLOPs of the full backbone (its own config) on the real lengths, in `mode`."""
    n, dm = _array(lengths), dims(config)
    if mode == "canonical":
        return canonical_baseline(n, config)
    full = np.repeat(n[:, None], dm.layers, axis=1)
    if mode == "trbert":
        return 2 * _trbert_macs(full, full, dm)
    if mode == "adapler":
        _warn_adapler(dm)
        return adapler_bert_flops(n, dm.num_labels, dm.layers)
    if mode == "powerbert":
        if padded_len is None:
            raise ValueError("flops mode 'powerbert' needs padded_len (the length it pads to)")
        return 2 * _powerbert_macs(full, full, n, padded_len, dm)
    raise ValueError(f"unknown flops mode {mode!r}; choose one of {MODES}")


def speedup(baseline: Any, method: Any) -> float:
    """Σ baseline / Σ method: a ratio of sums over examples, not a mean of ratios."""
    return float(_array(baseline).sum() / _array(method).sum())


def canonical_speedup(counts: Any, config: Any, baseline_config: Any) -> float:
    """The canonical FLOPs speedup of a pass's counts (anything with `attn_tokens`, `ffn_tokens`,
    `selector_flops`, `lengths`: an `EvalResult`, a `Counts`) against the full backbone on the same
    lengths: `summarize`'s `flops_speedup`, without the other accountings."""
    ours = canonical_flops(counts.attn_tokens, counts.ffn_tokens, config, counts.selector_flops)
    return speedup(canonical_baseline(counts.lengths, baseline_config), ours)


def summarize(
    result: Any,
    baseline: Any,
    config: Any,
    baseline_config: Any,
    mode: str = "canonical",
    padded_len: int | None = None,
) -> dict:
    """The FLOPs fields of a result record from an `EvalResult` (and the backbone's own, for its
    token counts; None: the unpruned counts). `config` is the evaluated model's, `baseline_config`
    the full backbone's (a student may have fewer layers). `padded_len` for `powerbert`: the length
    the paper pads to; default the longest example."""
    if mode not in MODES:
        raise ValueError(f"unknown flops mode {mode!r}; choose one of {MODES}")
    lengths = _array(result.lengths)
    padded = int(padded_len if padded_len is not None else lengths.max())
    speedups, means = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adapler caveat is in the docs, not once per record
        for m in MODES:
            ours = method_flops(result.attn_tokens, result.ffn_tokens, config, result.selector_flops,
                                lengths, m, padded)
            base = baseline_flops(lengths, baseline_config, m, padded)
            speedups[m] = speedup(base, ours)
            means[m] = (float(ours.mean()), float(base.mean()))
    if mode == "adapler":
        _warn_adapler(dims(config))
    if baseline is not None:
        base_tokens = {"attention": _array(baseline.attn_tokens).mean(axis=0).tolist(),
                       "ffn": _array(baseline.ffn_tokens).mean(axis=0).tolist()}
    else:
        unpruned = [float(lengths.mean())] * dims(baseline_config).layers
        base_tokens = {"attention": unpruned, "ffn": unpruned}
    return {
        "flops_mode": mode,
        "flops_per_example": means[mode][0],
        "baseline_flops_per_example": means[mode][1],
        "flops_speedup": speedups[mode],
        "flops_speedups": speedups,
        "tokens_per_layer": {
            "attention": _array(result.attn_tokens).mean(axis=0).tolist(),
            "ffn": _array(result.ffn_tokens).mean(axis=0).tolist(),
        },
        "baseline_tokens_per_layer": base_tokens,
    }
