"""Reading a task in the ERASER format (DeYoung et al., 2020), e.g. Movie Reviews, with its rationales.

An ERASER folder holds `docs/` (one file per document: its text, tokenised, tokens separated by
spaces, one sentence per line) and one JSON-lines file per split (train.jsonl, val.jsonl,
test.jsonl). Each line is one annotation:

    {"annotation_id": ..., "classification": "POS", "docids": [...] or null,
     "evidences": [[{"docid": ..., "start_token": 12, "end_token": 15, "text": ...}, ...], ...]}

The example's text is its documents' tokens joined by single spaces (documents: `docids`, else the
one named by `annotation_id`, as in Movie Reviews); its label is `classification`; its gold
rationale is every evidence span [start_token, end_token) of those documents (ERASER nests the
evidences in groups; a flat list is read too), turned into character spans of the text, which
`collate.encode` maps onto token positions. The query field is not read (single-text tasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
from omegaconf import DictConfig

from tokenprune.data.synthetic import with_rationale
from tokenprune.errors import UserError


def read_eraser_split(task: DictConfig, folder: Path, split: str) -> datasets.Dataset:
    """One split of an ERASER folder: text_a, text_b (""), label, idx, rationale (char spans)."""
    path = folder / task.files[split]
    if not (folder / "docs").is_dir() or not path.is_file():
        raise UserError(
            f"{folder} is not an ERASER folder with docs/ and {task.files[split]}: download the data set "
            f"(e.g. Movie Reviews from https://www.eraserbenchmark.com) and set task.dir to its folder."
        )
    label_ids = {str(v): i for i, v in enumerate(task.labels)}
    texts, labels, spans = [], [], []
    docs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg}); fix or replace the file.") from None
            if not isinstance(obj, dict) or "classification" not in obj or "annotation_id" not in obj:
                raise UserError(f"{where}: not an ERASER annotation (it needs annotation_id and classification); "
                                "fix or replace the file.")
            label = str(obj["classification"])
            if label not in label_ids:
                raise UserError(f"{where}: classification {label!r} is not one of {list(label_ids)}; "
                                "fix the file or task.labels.")
            words, offset = [], {}  # offset: docid -> index of its first word in `words`
            for docid in obj.get("docids") or [obj["annotation_id"]]:
                if docid not in docs:
                    docs[docid] = _read_doc(folder, str(docid), where)
                offset[docid] = len(words)
                words.extend(docs[docid])
            starts, at = [], 0
            for w in words:
                starts.append(at)
                at += len(w) + 1
            example_spans = []
            for evidence in _flat(obj.get("evidences") or []):
                docid = evidence.get("docid", obj["annotation_id"])
                if docid not in offset:
                    raise UserError(f"{where}: an evidence names document {docid!r}, which is not the example's; "
                                    "fix or replace the file.")
                first, last = offset[docid] + int(evidence["start_token"]), offset[docid] + int(evidence["end_token"]) - 1
                if not offset[docid] <= first <= last < offset[docid] + len(docs[docid]):
                    raise UserError(f"{where}: evidence tokens [{evidence['start_token']}, {evidence['end_token']}) "
                                    f"are outside document {docid!r}; fix or replace the file.")
                example_spans.append([starts[first], starts[last] + len(words[last])])
            texts.append(" ".join(words))
            labels.append(label_ids[label])
            spans.append(example_spans)
    return with_rationale(task, texts, [""] * len(texts), labels, spans)


def _read_doc(folder: Path, docid: str, where: str) -> list[str]:
    path = folder / "docs" / docid
    if not path.is_file():
        raise UserError(f"{where}: its document {path} is missing; the ERASER folder is incomplete.")
    return path.read_text(encoding="utf-8").split()


def _flat(evidences: list) -> list[dict]:
    """ERASER's evidence groups (a list of lists of spans), or a flat list of spans, as one list."""
    out = []
    for item in evidences:
        out.extend(item if isinstance(item, list) else [item])
    return out
