"""Evaluation through the PrunableEncoder: predictions, labels and the tokens every layer processed.

`run_eval` gives an `EvalResult`; `score` its task metrics; `flops.summarize` turns one into the
record's FLOPs fields and the speedup against the full backbone. `CountPasses`: the counts alone, for
a calibration's many passes, computing only what its knob changes.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenprune import data as task_data
from tokenprune.encoder import PrunableEncoder, TokenPolicy


@dataclass
class EvalResult:
    predictions: np.ndarray  # N: class ids, or floats for regression (num_labels == 1)
    labels: np.ndarray | None  # N, as the loader gave them (None: the split has none)
    logits: np.ndarray  # N×C
    attn_tokens: np.ndarray  # N×L: real tokens entering each layer's attention
    ffn_tokens: np.ndarray  # N×L: real tokens entering each layer's FFN
    selector_flops: np.ndarray  # N: the policy's own selector FLOPs
    lengths: np.ndarray  # N: real input lengths ([CLS] and [SEP] included)
    idx: np.ndarray  # N: the examples' `idx`, in evaluation order

    def __len__(self) -> int:
        return len(self.predictions)


def _inputs(batch: dict, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, attention_mask, token_type_ids) of a dict batch on `device` (absent ones None)."""
    mask, types = batch.get("attention_mask"), batch.get("token_type_ids")
    return (batch["input_ids"].to(device), None if mask is None else mask.to(device),
            None if types is None else types.to(device))


@contextlib.contextmanager
def _evaluating(encoder: PrunableEncoder):
    """Eval mode and inference mode inside; the encoder (model and policy) given back in its mode."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        encoder.train(was_training)


def run_eval(
    model: torch.nn.Module,
    policy: TokenPolicy | None,
    loader: Iterable[dict],
    device: torch.device | str,
    mode: str = "gather",
    progress: bool | None = None,
    on_layer: Callable[[dict, int, torch.Tensor, torch.Tensor], None] | None = None,
) -> EvalResult:
    """Evaluate `model` with `policy` over dict batches (`input_ids`, `attention_mask`,
    `token_type_ids`, `labels`, `idx`) under inference mode. The model and policy are put in eval
    mode and given back in the mode they were in. progress: None shows a bar on a terminal only.
    on_layer(batch, layer, positions, alive): called at every layer of every batch with the original
    positions still alive after that layer's decisions (`PrunableEncoder`'s `on_layer`)."""
    encoder = PrunableEncoder(model, policy, mode=mode)
    logits, labels, attn, ffn, selector, lengths, idx = [], [], [], [], [], [], []
    with _evaluating(encoder):
        for batch in tqdm(loader, desc="evaluate", leave=False, disable=None if progress is None else not progress):
            if on_layer is not None:
                encoder.on_layer = functools.partial(on_layer, batch)
            out = encoder(*_inputs(batch, device))
            logits.append(out.logits.float().cpu())
            attn.append(out.trace.attn_tokens.cpu())
            ffn.append(out.trace.ffn_tokens.cpu())
            selector.append(out.trace.selector_flops.cpu())
            lengths.append(out.trace.lengths.cpu())
            if "labels" in batch:
                labels.append(batch["labels"].cpu())
            if "idx" in batch:
                idx.append(batch["idx"].cpu())
    all_logits = torch.cat(logits).numpy()
    predictions = all_logits[:, 0] if all_logits.shape[1] == 1 else all_logits.argmax(-1)
    return EvalResult(
        predictions=predictions,
        labels=torch.cat(labels).numpy() if labels else None,
        logits=all_logits,
        attn_tokens=torch.cat(attn).numpy(),
        ffn_tokens=torch.cat(ffn).numpy(),
        selector_flops=torch.cat(selector).numpy(),
        lengths=torch.cat(lengths).numpy(),
        idx=torch.cat(idx).numpy() if idx else np.arange(len(predictions)),
    )


def score(task, result: EvalResult) -> tuple[str, float, dict]:
    """(primary metric's name, its value, every metric of the task) of an evaluation."""
    metrics = task_data.compute_metrics(task.metric, result.predictions, result.labels)
    name = task_data.PRIMARY[task.metric]
    return name, metrics[name], metrics


@dataclass
class Counts:
    """The token counts of a pass, what `flops.summarize` and `flops.canonical_flops` read."""

    attn_tokens: np.ndarray  # N×L
    ffn_tokens: np.ndarray  # N×L
    selector_flops: np.ndarray  # N
    lengths: np.ndarray  # N


class CountPasses:
    """Passes over one loader that only count tokens, for a search that changes one policy's knob between
    passes (calibration). Each pass computes only what the knob can change: the states entering the
    policy's first decision point are computed once and reused (no knob changes them), and no layer
    past its last decision point runs (the counts there cannot change). The counts are those of
    `run_eval` in gather mode with the same policy, bit for bit: the same batches go through the same
    operations up to the last decision.

    passes = CountPasses(model, policy, loader, device)
    policy.tau = 1.5; counts = passes()      # the policy as it is at the call
    """

    def __init__(self, model: torch.nn.Module, policy: TokenPolicy, loader: Iterable[dict], device: torch.device | str):
        self.encoder = PrunableEncoder(model, policy, mode="gather")
        self.first = policy.decision_points(self.encoder.num_layers)[0][0]
        self.batches = []
        with _evaluating(self.encoder):
            for batch in loader:
                inputs = _inputs(batch, device)
                states = self.encoder.states_entering(self.first, *inputs) if self.first > 0 else None
                self.batches.append((inputs, states))

    def __call__(self) -> Counts:
        attn, ffn, selector, lengths = [], [], [], []
        with _evaluating(self.encoder):
            for inputs, states in self.batches:
                entering = None if states is None else (self.first, states)
                trace = self.encoder(*inputs, entering=entering, counts_only=True).trace
                attn.append(trace.attn_tokens.cpu())
                ffn.append(trace.ffn_tokens.cpu())
                selector.append(trace.selector_flops.cpu())
                lengths.append(trace.lengths.cpu())
        return Counts(torch.cat(attn).numpy(), torch.cat(ffn).numpy(), torch.cat(selector).numpy(),
                      torch.cat(lengths).numpy())
