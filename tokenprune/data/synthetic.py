"""The needle task: a synthetic binary classification task whose deciding tokens are known.

Each example is a run of filler words (common, sentiment-free English words) in which one keyword
decides the label: a positive keyword ("good", "great", ...) makes it positive, a negative one
("bad", "awful", ...) negative, and the modifier "not" right before the keyword flips it ("not good"
is negative). Half of the examples carry the modifier; a share of all examples (`distractor`) also
carries a distractor "not" elsewhere, at least three words away from the keyword, which flips
nothing. So the keyword alone never decides the label, and with distractors the presence of "not"
does not either: the model has to see the keyword and the word before it together, which a token
dropped in the first layers cannot give it.

The gold rationale of an example is the keyword and, when present, its modifier, given as character
spans [start, end) of `text_a`; `collate.encode` maps them onto token positions. Every word of the
vocabularies below is one token of the BERT uncased vocabulary, so an example of w words has w + 2
tokens ([CLS] and [SEP] included), and its length is drawn uniformly in the task's token range.

Everything comes from the task config (`task.synthetic`: sizes, token range, distractor share, seed,
version): the
same config gives the same examples on every machine, and no file is read.
"""

from __future__ import annotations

import datasets
import numpy as np
from omegaconf import DictConfig

from tokenprune.errors import UserError

POSITIVE = ("good", "great", "excellent", "nice", "wonderful", "fine", "perfect", "brilliant")
NEGATIVE = ("bad", "awful", "terrible", "poor", "boring", "horrible", "weak", "dull")
MODIFIER = "not"
FILLER = (
    "the of and to in is was it for on as with by at from this that which are be or an his her their "
    "they we there one two three four five six seven eight nine ten house table window door river road "
    "city town street car train boat bridge tree field garden water stone paper book letter chair wall "
    "floor roof room kitchen school office market church station island mountain valley forest lake "
    "north south east west morning evening night week month year day hour minute time place page line "
    "number color shape size name word story report list plan case point part side end "
    "walked turned opened closed moved carried brought placed held wrote read said told asked called "
    "left right under over near between behind before after during around through across along "
    "red blue green yellow black white brown gray small large long short old new round square"
).split()
SPECIAL_TOKENS = 2  # [CLS] and [SEP]: the token count is the word count plus these
SPLITS = ("train", "dev")
FIELDS = {"train": "a positive number of examples", "dev": "a positive number of examples",
          "min_tokens": "an integer >= 8", "max_tokens": "an integer >= min_tokens",
          "distractor": "a number in [0, 1]", "seed": "an integer", "version": "an integer"}


def check_spec(task: DictConfig) -> None:
    """`task.synthetic` has every generator field, each valid; else one sentence says which."""
    spec = task.get("synthetic")
    if spec is None:
        raise UserError(f"task {task.name} has format: synthetic but no synthetic block: add synthetic: "
                        "{train, dev, min_tokens, max_tokens, distractor, seed, version} (see conf/task/needle.yaml).")
    for key, expected in FIELDS.items():
        value = spec.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if key == "distractor":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
        if ok and key in ("train", "dev"):
            ok = value > 0
        if ok and key == "min_tokens":
            ok = value >= 8
        if ok and key == "max_tokens":
            ok = value >= spec.get("min_tokens", 0)
        if not ok:
            raise UserError(f"task.synthetic.{key}={value!r} of task {task.name} is not valid: it must be {expected}.")
    if list(task.labels) != ["negative", "positive"]:
        raise UserError(f"task {task.name} has format: synthetic, whose labels are [negative, positive], not {list(task.labels)}.")
    if spec.max_tokens > task.max_length:
        raise UserError(f"task.synthetic.max_tokens={spec.max_tokens} of task {task.name} exceeds its max_length="
                        f"{task.max_length}: truncation would cut rationales off; lower max_tokens or raise max_length.")


def generate_splits(task: DictConfig) -> dict[str, datasets.Dataset]:
    """{train, dev}: each a Dataset with text_a, text_b (""), label, idx and rationale (char spans)."""
    check_spec(task)
    spec = task.synthetic
    return {split: _dataset(task, spec[split], np.random.default_rng([int(spec.seed), i]))
            for i, split in enumerate(SPLITS)}


def example(rng: np.random.Generator, n_words: int, distractor: float = 0.5) -> tuple[list[str], int, list[int]]:
    """(words, label, positions of the deciding words) of one example of `n_words` words."""
    words = list(rng.choice(FILLER, size=n_words))
    positive = bool(rng.integers(2))
    negated = bool(rng.integers(2))
    keyword = str(rng.choice(POSITIVE if positive else NEGATIVE))
    at = int(rng.integers(1, n_words))  # the keyword's position; position 0 is left for a modifier
    words[at] = keyword
    rationale = [at]
    if negated:
        words[at - 1] = MODIFIER
        rationale.insert(0, at - 1)
    if rng.random() < distractor:
        # a distractor modifier, at least 3 words from the keyword: it modifies a filler word
        far = [i for i in range(n_words) if abs(i - at) >= 3]
        words[int(rng.choice(far))] = MODIFIER
    return words, int(positive != negated), rationale


def _dataset(task: DictConfig, n: int, rng: np.random.Generator) -> datasets.Dataset:
    spec = task.synthetic
    texts, labels, spans = [], [], []
    for _ in range(n):
        n_words = int(rng.integers(spec.min_tokens, spec.max_tokens + 1)) - SPECIAL_TOKENS
        words, label, rationale = example(rng, n_words, float(spec.distractor))
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
        texts.append(" ".join(words))
        labels.append(label)
        spans.append([[int(starts[i]), int(starts[i]) + len(words[i])] for i in rationale])
    return with_rationale(task, texts, [""] * n, labels, spans)


def with_rationale(task: DictConfig, text_a: list[str], text_b: list[str], labels: list[int],
                   spans: list[list[list[int]]]) -> datasets.Dataset:
    """A split with the loader's four columns plus `rationale`: per example, character spans
    [start, end) of text_a that are its gold rationale. `labels`: class ids."""
    features = datasets.Features(
        text_a=datasets.Value("string"),
        text_b=datasets.Value("string"),
        label=datasets.ClassLabel(names=[str(x) for x in task.labels]),
        idx=datasets.Value("int64"),
        rationale=datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
    )
    return datasets.Dataset.from_dict(
        {"text_a": text_a, "text_b": text_b, "label": labels, "idx": list(range(len(labels))), "rationale": spans},
        features=features,
    )
