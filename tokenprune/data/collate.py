"""Tokenising splits and batching them with dynamic padding (each batch padded to its longest)."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

# Below this many rows a progress bar is noise; above it, tokenising takes long enough to show one.
_QUIET_BELOW = 5000
_BATCH_COLUMNS = ["input_ids", "token_type_ids", "labels", "idx"]
_List = getattr(datasets, "List", datasets.Sequence)  # datasets < 4 only has Sequence


def encode(ds: datasets.Dataset, tokenizer: Any, max_length: int, pair: bool | None = None) -> datasets.Dataset:
    """Add `input_ids`, `token_type_ids`, `labels` and `length` (real tokens, [CLS]/[SEP] included).

    Texts are truncated to `max_length` (pairs: `longest_first`). `pair=None` infers from the data:
    a pair task is one with any non-empty `text_b`. A split with gold rationales (a `rationale`
    column of character spans of `text_a`) also gets `rationale_tokens`: the positions of the tokens
    of text_a that overlap a span (a span cut off by truncation loses its tokens).
    """
    if pair is None:
        pair = any(ds["text_b"])
    regression = ds.features["label"].dtype.startswith("float")
    rationales = "rationale" in ds.column_names

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(
            batch["text_a"],
            batch["text_b"] if pair else None,
            truncation="longest_first",
            max_length=max_length,
            return_token_type_ids=True,
            return_attention_mask=False,
            return_offsets_mapping=rationales,
        )
        out = {
            "input_ids": enc["input_ids"],
            "token_type_ids": enc["token_type_ids"],
            "labels": batch["label"],
            "length": [len(ids) for ids in enc["input_ids"]],
        }
        if rationales:
            out["rationale_tokens"] = [
                rationale_positions(enc.sequence_ids(i), offsets, spans)
                for i, (offsets, spans) in enumerate(zip(enc["offset_mapping"], batch["rationale"]))
            ]
        return out

    features = ds.features.copy()
    features["input_ids"] = _List(datasets.Value("int32"))
    features["token_type_ids"] = _List(datasets.Value("int8"))
    features["labels"] = datasets.Value("float32" if regression else "int64")
    features["length"] = datasets.Value("int32")
    if rationales:
        features["rationale_tokens"] = _List(datasets.Value("int32"))
    quiet = len(ds) < _QUIET_BELOW and datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return ds.map(tokenize, batched=True, features=features, desc="Tokenising")
    finally:
        if quiet:
            datasets.enable_progress_bars()


def rationale_positions(sequence_ids: list, offsets: list, spans: list) -> list[int]:
    """Positions of the tokens of the first text whose characters overlap one of `spans` ([start, end))."""
    return [i for i, (seq, (start, end)) in enumerate(zip(sequence_ids, offsets))
            if seq == 0 and end > start and any(start < s_end and end > s_start for s_start, s_end in spans)]


def collate(batch: dict[str, list], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows fetched together (a dict of lists) → tensors padded to the longest row."""
    ids = batch["input_ids"]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(ids), width), dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row, types) in enumerate(zip(ids, batch["token_type_ids"])):
        input_ids[i, : len(row)] = torch.as_tensor(row)
        token_type_ids[i, : len(row)] = torch.as_tensor(types)
        attention_mask[i, : len(row)] = 1
    labels = batch["labels"]
    label_dtype = torch.float32 if isinstance(labels[0], float) else torch.long
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "labels": torch.tensor(labels, dtype=label_dtype),
        "idx": torch.tensor(batch["idx"], dtype=torch.long),
    }


class LengthAwareBatches(Sampler[list[int]]):
    """Lists of row positions, one per batch.

    shuffle: a new seeded order every epoch (the same sequence of epochs for the same seed).
    sort_by_length: batches of similar length, longest first (a batch that does not fit in memory
    fails at once); with shuffle too, the batches are formed from the sorted order, then shuffled.
    """

    def __init__(self, lengths: list[int] | None, n: int, batch_size: int, shuffle: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.lengths is not None:
            order = np.argsort(-self.lengths, kind="stable")
        elif self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).numpy()
        else:
            order = np.arange(self.n)
        batches = [order[i : i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]
        if self.lengths is not None and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator)]
        return iter(batches)


def make_loader(
    ds: datasets.Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    sort_by_length: bool = False,
    pad_token_id: int = 0,
) -> DataLoader:
    """Batches of an `encode`d split: dicts of `input_ids`, `attention_mask`, `token_type_ids`,
    `labels`, `idx`, padded to the batch's longest row with `pad_token_id` (0 for BERT vocabularies).
    """
    lengths = ds["length"] if sort_by_length else None
    sampler = LengthAwareBatches(lengths, len(ds), batch_size, shuffle, seed)
    # batch_size=None: each sampler item is a whole batch, fetched from Arrow in one read.
    return DataLoader(
        ds.select_columns(_BATCH_COLUMNS),
        sampler=sampler,
        batch_size=None,
        collate_fn=partial(collate, pad_token_id=pad_token_id),
    )
