"""Time of a searched calibration on IMDB: TR-BERT's threshold (and AdapLeR's η scale) set on calib
examples to a FLOPs target, at the methods' own precision (calib_iters / max_scale_iters = 16), three ways:
    bisection   full passes, bisection (the suite's search before issue 21)
    ITP         full passes, ITP (`toolbox.meet_target`: fewer passes)
    ITP+counts  ITP over passes that compute only what the knob changes (`evaluate.CountPasses`: the
                states entering the first decision point computed once, nothing past the last), the
                same counts bit for bit
    +window     ITP+counts that stops once the calib speedup is within calib_rtol (0.5%) above the
                target, AdapLeR's search starting at scale 1 (its learned η as is): what the methods run
A full pass is one gather-mode evaluation of calib in length-sorted batches of `eval_batch_size`.
Untrained selectors (seeded) on MiniLM: a pass over calib costs what a trained one's does. With
`--spread` their weights are drawn at std 1/sqrt(fan-in), so that their scores differ across tokens
as trained ones do (at the default initialisation they score every token nearly alike, and the
speedup is a cliff in the knob that no interpolation can follow: a worst case for the search).
TR-BERT's threshold is searched over logits in [-20, 20] (the method: the unpruned logits' range,
and from τ₀ for its final threshold), AdapLeR's scale over [1e-4, the scale that keeps only [CLS]].

    python experiments/bench_calibration.py --n 200          # IMDB calib of 200 reviews
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_methods as bm  # noqa: E402
from tokenprune import flops  # noqa: E402
from tokenprune.evaluate import CountPasses  # noqa: E402
from tokenprune.methods.adapler import AdapLeRPolicy  # noqa: E402
from tokenprune.methods.toolbox import meet_target  # noqa: E402
from tokenprune.methods.trbert import TrBertPolicy  # noqa: E402


def bisection(speedup_at, target, *, gentle, extreme, steps, geometric=False, **_):
    """The search as it was: bounds, then `steps` bisections (geometric: at the geometric mean)."""
    if (s := speedup_at(gentle)) >= target:
        return gentle, s
    for hi in [extreme] if isinstance(extreme, (int, float)) else extreme:
        if (s_hi := speedup_at(hi)) >= target:
            break
    lo = gentle
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
        s = speedup_at(mid)
        if s >= target:
            hi, s_hi = mid, s
        else:
            lo = mid
    return hi, s_hi


SEARCHES = {  # name: (search, count passes, window)
    "bisection": (bisection, False, False), "ITP": (meet_target, False, False),
    "ITP+counts": (meet_target, True, False), "+window": (meet_target, True, True)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="IMDB calib examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=["trbert"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="minilm", help="minilm, or tiny (a random model, for tests)")
    parser.add_argument("--spread", action="store_true", help="selector weights at std 1/sqrt(fan-in)")
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--rtol", type=float, default=0.005, help="the window of +window (conf: calib_rtol)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = bm.load_model(args.model, torch.device("cpu"))
    rows = bm.imdb_texts(args.n, 0, tokenizer)
    ctx = bm.Context(model, rows, bm.make_batches(rows, args.batch_size, torch.device("cpu")))
    cfg = model.config
    batches = [dict(zip(("input_ids", "attention_mask", "token_type_ids"), b)) for b in ctx.batches]
    print(f"IMDB calib: {len(rows)} reviews, mean {ctx.lengths.mean():.0f} tokens; batches of {args.batch_size}; "
          f"{torch.get_num_threads()} thread(s)")
    records = []
    for name in args.methods:
        for target in args.targets:
            for search_name in args.searches:
                search, counts, window = SEARCHES[search_name]
                torch.manual_seed(0)
                if name == "trbert":
                    policy = TrBertPolicy(cfg.hidden_size, cfg.num_hidden_layers).eval()
                    field, bounds = "tau", dict(gentle=-20.0, extreme=[20.0, math.inf])
                else:
                    policy = AdapLeRPolicy(cfg.num_hidden_layers, cfg.hidden_size).eval()
                    field = "scale"
                    bounds = dict(gentle=1e-4, extreme=(int(ctx.lengths.max()) + 1) / float(policy.eta.detach().min()),
                                  geometric=True, **({"start": 1.0} if window else {}))
                if window:
                    bounds["rtol"] = args.rtol
                if args.spread:
                    bm.spread(policy)
                passes = []
                start = time.perf_counter()
                counted = CountPasses(model, policy, batches, "cpu") if counts else None

                def speedup(knob):
                    setattr(policy, field, knob)
                    passes.append(knob)
                    if counted is None:
                        return bm.flops_speedup(ctx, model, policy)
                    return flops.canonical_speedup(counted(), cfg, cfg)

                with torch.inference_mode():
                    knob, achieved = search(speedup, target, steps=16, method=name, extreme_means="-", **bounds)
                seconds = time.perf_counter() - start
                print(f"  {name} {target:g}x {search_name:10s}: {len(passes):2d} passes, {seconds:6.1f} s "
                      f"({seconds / len(passes):.1f} s/pass); knob {knob:.5g}, calib speedup {achieved:.3f}",
                      flush=True)
                records.append({"method": name, "target": target, "search": search_name, "passes": len(passes),
                                "seconds": seconds, "knob": knob, "calib_speedup": achieved})
    return records


if __name__ == "__main__":
    main()
