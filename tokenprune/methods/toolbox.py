"""What methods share, so that a method module holds only its policy, its phases and its knob.

- `Phases`: every cached phase of a job goes through it. `get` builds an entry when the cache has
  none and records `{cached, seconds, path}` under the phase's kind; `model` is a phase whose product
  is a trained model (train, save beside `info.json`, reload from the entry).
- `teacher_logits`: the fine-tuned backbone's logits on training examples, for the methods that distil.
- `calib_result` / `calib_score`: an evaluation on `calib`, where checkpoints and knobs are chosen
  (never on dev); `calib_speedups`: a knob search's FLOPs speedups on calib, each pass computing only
  what the knob changes.
- `meet_target`: the knob search that meets a speedup target (an ITP search to bisection's
  precision or into a window above the target, in the knob or its log, from a start or from the
  bounds, or a scan), with the one sentence for a target out of reach.
- `travel`, `travel_scale`, `travel_lr`: the learning-rate rule that makes a learned knob able to move
  as far on this budget as in the paper's recipe (see `travel`).
- `choose_for_target`: a regulariser weight chosen from a small grid on calib, so that the learned
  operating point is near the target before calibration corrects it.
- `rank_correlation`, `learning_record`: the `learning` block of a learned method's record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from scipy.stats import spearmanr

from tokenprune.errors import UserError
from tokenprune import flops
from tokenprune.evaluate import CountPasses, EvalResult, run_eval, score
from tokenprune.rationale import top_fraction_recall

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from tokenprune.cache import Cache
    from tokenprune.methods.base import Job


def load_model(path: Path, device: torch.device) -> nn.Module:
    """A saved *ForSequenceClassification model, on `device`, in eval mode."""
    return AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()


class Phases:
    """The cached phases of one job and what the record says of each: `record[kind]` is
    `{cached, seconds, path}` (cached: the entry existed, or another job built it while this one
    waited; seconds: the time to get it, build included)."""

    def __init__(self, cache: Cache, device: torch.device):
        self.cache, self.device = cache, device
        self.record: dict[str, dict] = {}

    def get(self, kind: str, key: dict, make: Callable[[Path], None]) -> Path:
        """The entry's directory; `make(tmp)` fills a fresh directory when there is none yet."""
        built = False

        def build(tmp: Path) -> None:
            nonlocal built
            built = True
            make(tmp)

        start = time.perf_counter()
        path = self.cache.get_or_make(kind, key, build)
        self.record[kind] = {"cached": not built, "seconds": round(time.perf_counter() - start, 2), "path": str(path)}
        return path

    def model(self, kind: str, key: dict, train: Callable[[Path], tuple[nn.Module, dict]]) -> tuple[nn.Module, dict, Path]:
        """A phase that trains a model. `train(tmp)` returns (the trained model, what to keep of its
        training) and may save more files of its own into `tmp`; the model is saved there beside
        `info.json` (with the training time) and reloaded from the entry, so a fresh build and a
        cache hit give the same weights. Returns (model in eval mode, info, entry directory)."""

        def make(tmp: Path) -> None:
            start = time.perf_counter()
            model, info = train(tmp)
            model.save_pretrained(tmp)
            info = {**info, "train_seconds": round(time.perf_counter() - start, 1)}
            (tmp / "info.json").write_text(json.dumps(info, indent=1, default=str))

        path = self.get(kind, key, make)
        return load_model(path, self.device), json.loads((path / "info.json").read_text()), path


# ---- evaluation on calib ---------------------------------------------------------------------------

def calib_result(job: Job, model: nn.Module, policy=None) -> EvalResult:
    """`model` with `policy` on calib, tokens physically removed."""
    return run_eval(model, policy, job.loader("calib"), job.device, mode="gather", progress=False)


def calib_speedups(job: Job, model: nn.Module, policy, name: str = "knob") -> Callable[[], float]:
    """The canonical FLOPs speedup on calib of `model` with `policy` as the policy is at each call, for a
    search that sets the policy's knob between calls. The passes (`CountPasses`) reuse the states
    entering the policy's first decision point and stop at its last: the same counts as
    `calib_result`, for a fraction of its work. What the search cost goes to the record
    (`method_info.calibration_searches`: its name, passes and seconds, the first states included)."""
    start = time.perf_counter()
    passes = CountPasses(model, policy, job.loader("calib"), job.device)
    search = {"name": name, "passes": 0, "seconds": round(time.perf_counter() - start, 2)}
    job.info.setdefault("calibration_searches", []).append(search)

    def speedup() -> float:
        t = time.perf_counter()
        s = flops.canonical_speedup(passes(), model.config, job.backbone.config)
        search["passes"] += 1
        search["seconds"] = round(search["seconds"] + time.perf_counter() - t, 2)
        return s

    return speedup


def calib_score(job: Job, model: nn.Module, policy=None) -> float:
    """The task's primary metric on calib: what checkpoints are chosen by."""
    return float(score(job.cfg.task, calib_result(job, model, policy))[1])


# ---- the teacher ------------------------------------------------------------------------------------

def examples_id(dataset) -> str:
    """A short fingerprint of which examples (by `idx`) a dataset holds."""
    idx = np.asarray(dataset["idx"], dtype=np.int64)
    return f"{len(idx)}:{hashlib.sha256(idx.tobytes()).hexdigest()[:16]}"


def teacher_logits(job: Job, dataset=None) -> dict[int, torch.Tensor]:
    """The fine-tuned backbone's logits (float32) on training examples, by `idx`: all of train, or
    `dataset` (a subset of it). Cached on the backbone and the examples."""
    dataset = job.splits["train"] if dataset is None else dataset
    key = {"backbone": job.backbone_key, "split": "train", "examples": examples_id(dataset),
           "batch_size": int(job.cfg.train.eval_batch_size)}

    def make(tmp: Path) -> None:
        result = run_eval(job.backbone, None, job.loader(dataset), job.device, mode="gather", progress=False)
        np.savez_compressed(tmp / "teacher.npz", idx=result.idx, logits=result.logits)

    path = job.phases.get("teacher-logits", key, make)
    with np.load(path / "teacher.npz") as saved:
        return dict(zip(saved["idx"].tolist(), torch.from_numpy(saved["logits"]).float()))


# ---- the knob -----------------------------------------------------------------------------------------

def meet_target(speedup_at: Callable[[float], float], target: float, *, gentle: float,
                extreme: float | Iterable[float], method: str, extreme_means: str, steps: int = 60,
                geometric: bool = False, scan: Iterable[float] | None = None, rtol: float = 0.0,
                start: float | None = None, start_step: float | None = None) -> tuple[float, float]:
    """(knob, speedup at it): the knob nearest `gentle` (the end that prunes least) whose speedup
    (`speedup_at`, monotone from `gentle` to `extreme`) is at least `target`.

    `extreme` is the end that prunes most, or a sequence of ever more extreme values tried in turn
    (the first that meets the target bounds the search). Between the bounds: the precision of `steps`
    bisections (geometric: in log knob), reached by an ITP search (Oliveira & Takahashi 2021:
    interpolation, truncated and projected so that it never needs more than one pass beyond bisection,
    and far fewer where the speedup is smooth); or, with `scan`, the first value of `scan` that meets
    the target. `rtol` > 0 stops the search as soon as a knob's speedup lies in [target, target·(1 + rtol)]:
    the searches whose every evaluation is a pass over calib take it, since the last passes to
    bisection's precision only move the speedup in its third decimal. `start`: a knob expected near the
    answer (a learned operating point); the bracket is found from it by an exponential search (steps
    of a factor 2, 4, 16, ... when geometric, else of `start_step`, 2·`start_step`, 4·...), so a
    learned point near the target costs a few passes, not a search over the whole range from `gentle`
    to `extreme`. A knob is evaluated once (identical knobs, identical passes). A target even the
    extreme cannot meet is one sentence (`extreme_means` says what the extreme keeps)."""
    seen: dict[float, float] = {}

    def at(knob: float) -> float:
        if knob not in seen:
            seen[knob] = speedup_at(knob)
        return seen[knob]

    extremes = [extreme] if isinstance(extreme, (int, float)) else list(extreme)
    if start is not None:
        if scan is not None or (start_step is None) != geometric:
            raise ValueError("meet_target: a start is for a search without scan, with start_step exactly when not geometric")
        # in u (the knob, or its log) with the speedup growing with u: walk from the start to a bracket
        # inside (gentle, first extreme)
        extreme = extremes[0]
        sign = 1.0 if extreme > gentle else -1.0
        to_u = (lambda k: sign * math.log(k)) if geometric else (lambda k: sign * k)
        u0 = to_u(start)
        to_k = lambda u: start if u == u0 else (math.exp(sign * u) if geometric else sign * u)  # the start exactly
        f = lambda u: at(to_k(u))
        bracket = _walk_from(f, target, u0, math.log(2.0) if geometric else float(start_step),
                             *sorted((to_u(gentle), to_u(extreme))))
        if bracket is not None:
            lo, hi = bracket
            u, s_hi = _itp(f, target, lo, hi, f(lo), f(hi), steps, rtol)
            return to_k(u), s_hi
    achieved = at(gentle)
    if achieved >= target:
        return gentle, achieved
    for hi in extremes:
        best = at(hi)
        if best >= target:
            break
    else:
        raise UserError(
            f"method={method} cannot reach speedup={target:g} on this task: {extreme_means} gives at most "
            f"{best:.2f}x on calib, so lower the speedup target."
        )
    if scan is not None:
        for knob in scan:
            if (s := at(knob)) >= target:
                return knob, s
        return hi, best
    if not math.isfinite(hi):  # nothing to bisect towards: the extreme itself
        return hi, best
    if geometric:
        x, s_hi = _itp(lambda u: at(math.exp(u)), target, math.log(gentle), math.log(hi), achieved, best, steps, rtol)
        return math.exp(x), s_hi
    return _itp(at, target, gentle, hi, achieved, best, steps, rtol)


def _walk_from(at: Callable[[float], float], target: float, start: float, step: float, low: float, high: float
               ) -> tuple[float, float] | None:
    """(below, meets): two points that bracket the target, found from `start` by steps of `step`,
    2·step, 4·step, ... toward the side the target lies on (an exponential search; `at` grows with
    the point); None when the steps leave (low, high) first (the caller's bounds then decide)."""
    if not low < start < high:
        return None
    meets = at(start) >= target
    u = start
    while True:
        nxt = u - step if meets else u + step
        if not low < nxt < high:
            return None
        if (at(nxt) >= target) != meets:
            return (nxt, u) if meets else (u, nxt)
        u, step = nxt, 2 * step


def _itp(f: Callable[[float], float], target: float, lo: float, hi: float, f_lo: float, f_hi: float,
         steps: int, rtol: float = 0.0) -> tuple[float, float]:
    """ITP between lo (f < target) and hi (f ≥ target), lo and hi in either order, to the bracket
    width |hi − lo|/2^steps, or until f at hi is within `rtol` of the target; returns (the bracket's
    end that meets the target, f there)."""
    width = abs(hi - lo)
    eps = width / 2 ** (steps + 1)  # the bracket ends at most 2·eps wide: bisection's precision
    if eps == 0 or not width > 2 * eps:
        return hi, f_hi
    n_max = math.ceil(math.log2(width / (2 * eps))) + 1  # n_{1/2} + n_0, n_0 = 1
    k1, k2 = 0.2 / width, 2.0
    aim = target * (1 + rtol / 2)  # interpolate toward the middle of the window that stops the search
    for j in range(n_max):
        w = abs(hi - lo)
        if not w > 2 * eps or (rtol > 0 and f_hi <= target * (1 + rtol)):
            break
        mid = (lo + hi) / 2
        g_lo, g_hi = f_lo - aim, f_hi - aim  # g_lo < 0 <= g_hi
        x_f = (lo * g_hi - hi * g_lo) / (g_hi - g_lo) if g_hi != g_lo else mid  # regula falsi
        sigma = math.copysign(1.0, mid - x_f)
        delta = k1 * w ** k2
        x_t = x_f + sigma * delta if delta <= abs(mid - x_f) else mid  # truncation
        r = eps * 2 ** (n_max - j) - w / 2
        x = x_t if abs(x_t - mid) <= r else mid - sigma * r  # projection: bisection's guarantee
        y = f(x)
        if y >= target:
            hi, f_hi = x, y
        else:
            lo, f_lo = x, y
    return hi, f_hi


# ---- how far a learned knob can move -----------------------------------------------------------

def travel(steps: int, lr: float) -> float:
    """The most a parameter can move under Adam(W) with warm-up and linear decay to 0: Adam moves a
    parameter by at most about its learning rate per step, and the schedule's area is 0.5·steps·lr
    (a triangle, whatever the warm-up fraction)."""
    return 0.5 * float(steps) * float(lr)


def travel_scale(steps: int, paper_steps: float) -> float:
    """paper_steps / steps: the factor on a knob's learning rate that makes its travel on `steps`
    steps equal the paper recipe's (0.5·steps·lr = 0.5·paper_steps·paper_lr). 1 at the paper's steps."""
    return float(paper_steps) / max(1, int(steps))


def travel_lr(paper_lr: float, paper_steps: float, steps: int, max_lr: float | None = None) -> float:
    """The rule for a learned knob's learning rate: lr = paper_lr · paper_steps / steps, so that the
    movement possible on this budget, 0.5·steps·lr, matches the paper recipe's, 0.5·paper_steps·paper_lr.
    `max_lr` caps it (one step never moves a knob further than that)."""
    lr = float(paper_lr) * travel_scale(steps, paper_steps)
    return min(lr, float(max_lr)) if max_lr is not None else lr


def choose_for_target(values: Iterable[float], own_speedup: Callable[[float], float], target: float
                      ) -> tuple[float, list[dict]]:
    """(value, grid): the regulariser weight of `values` whose learned operating point's own calib
    speedup (`own_speedup(value)`, training included) is nearest `target` in ratio (|log(s/target)|;
    ties: the first). With one value there is no choice. The grid is returned for the record."""
    grid = []
    for v in values:
        s = float(own_speedup(float(v)))
        grid.append({"value": float(v), "own_speedup": round(s, 4)})
    if not grid:
        raise UserError("the regulariser grid is empty: give at least one value.")
    best = min(grid, key=lambda g: abs(math.log(max(g["own_speedup"], 1e-9) / float(target))))
    return best["value"], grid


UNCHANGED = 1e-3  # a step of the walk whose own speedup moves by less than this (relative) changed nothing


def walk_to_target(start: float, own_speedup: Callable[[float], float], target: float, *, factor: float = 10.0,
                   tries: int = 4, refine: bool = True) -> tuple[float, list[dict]]:
    """(value, grid): a regulariser weight for the target, from `start` (the paper's). The learned
    operating point's own speedup grows with the weight, so: evaluate `start`; while its own speedup is
    on the same side of the target, divide (above it) or multiply (below it) by `factor`, at most
    `tries` more values; once the target is bracketed, `refine` tries the geometric midpoint. The value
    whose own speedup is nearest the target in ratio is kept (`choose_for_target`). tries=0: `start`.

    A step that leaves the own speedup where it was (relative change below UNCHANGED), after a step
    that moved it, ends the walk: the weight no longer changes what is learned, so further steps would
    train the same operating point again (PoWER-BERT on MRPC: λ 0.3, 3 and 30 all learned keep
    fractions of 0.734 at every layer, the floor 1 − travel that Adam's step budget allows). The value
    kept is the one the full walk would keep (ties go to the first); only the grid is shorter. Flat
    steps before any step moved it are walked through (a weight too small to act yet)."""
    seen: dict[float, float] = {}

    def at(v: float) -> float:
        if v not in seen:
            seen[v] = float(own_speedup(v))
        return seen[v]

    value, s = float(start), at(float(start))
    above = s > target
    bracket, moved = None, False
    for _ in range(int(tries)):
        nxt = value / factor if above else value * factor
        s_next = at(nxt)
        if (s_next > target) != above:
            bracket = (value, nxt)
            break
        unchanged = abs(s_next / s - 1.0) < UNCHANGED
        if unchanged and moved:
            log.info(f"the walk stops at {nxt:g}: its own speedup {s_next:.4f} is that of {value:g}; "
                     "the weight no longer changes what is learned")
            break
        moved = moved or not unchanged
        value, s = nxt, s_next
    if bracket is not None and refine:
        at(math.sqrt(bracket[0] * bracket[1]))
    return choose_for_target(list(seen), lambda v: seen[v], target)


def walk_settings(method_cfg, knob: str, start_means: str) -> tuple[int, float]:
    """(tries, factor) of the walk for `knob` from `method.<knob>_tries` and `method.<knob>_factor`,
    each checked with one sentence; `start_means` says what tries=0 keeps."""
    tries = method_cfg.get(f"{knob}_tries") or 0
    if not isinstance(tries, int) or tries < 0:
        raise UserError(f"method.{knob}_tries={tries!r} is not valid: give a whole number >= 0 (0: {start_means} only).")
    factor = float(method_cfg.get(f"{knob}_factor", 10.0))
    if not (math.isfinite(factor) and factor > 1):
        raise UserError(f"method.{knob}_factor={factor} is not valid: give a number > 1, e.g. 10.")
    return tries, factor


# ---- the learning block of a record ---------------------------------------------------------------

def rank_correlation(scores: Iterable, signal: Iterable, masks: Iterable | None = None) -> float | None:
    """Spearman's rank correlation of a method's token scores with its training signal, per example
    over its real tokens (`masks`, or every entry), averaged over the examples that have at least 3
    tokens and no constant side. None when no example qualifies."""
    values = []
    scores, signal = list(scores), list(signal)
    masks = list(masks) if masks is not None else [None] * len(scores)
    for a, b, m in zip(scores, signal, masks):
        a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64).ravel()
        b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64).ravel()
        if m is not None:
            m = np.asarray(m.detach().cpu() if isinstance(m, torch.Tensor) else m, dtype=bool).ravel()
            a, b = a[m], b[m]
        if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        values.append(float(spearmanr(a, b).statistic))
    return round(float(np.mean(values)), 4) if values else None


def rationale_recall(job, signal_rows: Iterable, score_rows: Iterable) -> dict | None:
    """On a calib split with gold rationales: how well the method's training signal (`signal_rows`)
    and its own token scores (`score_rows`), each (idx, per-position values) pairs, rank the deciding
    tokens (`rationale.top_fraction_recall`). None on a task without rationales. A method whose
    scores follow its signal (rank correlation) but miss the rationale learned a signal that misses it."""
    split = job.splits["calib"]
    signal = top_fraction_recall(split, job.tokenizer, signal_rows)
    if signal is None:
        return None
    return {"signal": signal, "scores": top_fraction_recall(split, job.tokenizer, score_rows)}


def _rounded(x):
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_rounded(v) for v in x]
    return round(float(x), 6)


def learning_record(method: str, knobs: dict[str, dict], *, target: float, own_speedup: float | None,
                    calibration: dict, schedule: list | None = None, rank_corr: float | None = None,
                    signal: str | None = None, extra: dict | None = None, tol: float = 1e-6) -> dict:
    """The `learning` block of a learned method's record: what training did, apart from calibration.

    knobs: {name: {"initial", "final" (a number or a per-layer list), "bounds": (lo, hi) or None,
    "lr": the learning rate it trained at, optional}}. For each: initial, final, moved (the largest
    |final − initial|) and the entries at a bound of the optimiser's clip; an entry at a bound is a
    warning (in the block and the log). own_speedup: the learned operating point's calib speedup before
    calibration, against `target`; calibration: what calibration then applied (e.g. the multiplier).
    schedule: the learned per-layer schedule; rank_corr: the rank correlation of the method's token
    scores with its own training signal (`signal` names it) on calib."""
    block: dict = {"knobs": {}, "warnings": []}
    for name, k in knobs.items():
        ini, fin = np.asarray(k["initial"], dtype=np.float64), np.asarray(k["final"], dtype=np.float64)
        entry = {"initial": _rounded(k["initial"]), "final": _rounded(k["final"]),
                 "moved": round(float(np.max(np.abs(np.broadcast_to(ini, fin.shape) - fin))) if fin.size else 0.0, 6)}
        if k.get("lr") is not None:
            entry["lr"] = float(k["lr"])
        bounds = k.get("bounds")
        if bounds is not None:
            lo, hi = bounds
            at = [i for i, v in enumerate(np.atleast_1d(fin)) if (lo is not None and v <= lo + tol)
                  or (hi is not None and v >= hi - tol)]
            entry["bounds"], entry["at_bound"] = [lo, hi], at
            if at:
                block["warnings"].append(f"{method}: {name} sits at its optimiser bound {[lo, hi]} at "
                                         f"{'entries' if fin.ndim else 'value'} {at if fin.ndim else float(fin)}")
        block["knobs"][name] = entry
    block["schedule"] = _rounded(schedule) if schedule is not None else None
    block["rank_correlation"] = rank_corr
    block["rank_correlation_signal"] = signal
    block["target"] = float(target)
    block["own_speedup"] = None if own_speedup is None else round(float(own_speedup), 4)
    block["own_vs_target"] = None if own_speedup is None else round(float(own_speedup) / float(target), 4)
    block["calibration"] = calibration
    if extra:
        block.update(extra)
    for w in block["warnings"]:
        log.warning(w)
    return block


__all__ = ["Phases", "load_model", "calib_result", "calib_speedups", "calib_score", "teacher_logits", "examples_id", "meet_target",
           "travel", "travel_scale", "travel_lr", "choose_for_target", "walk_to_target", "rank_correlation", "learning_record"]
