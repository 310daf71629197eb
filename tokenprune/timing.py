"""Wall clock of a method against the full backbone, in the same process.

Both run through the PrunableEncoder in `gather` mode (physical removal: a masked run is never timed),
alternated example by example and pass by pass so that drift in the machine's speed hits both, after
warm-up, with the torch thread count fixed and recorded.

    batch 1     a fixed, seeded sample of examples; each example's latency is the median of `repeats`
                runs; reported: median and p90 over examples, and the speedup Σ baseline / Σ method
                (a ratio of sums, as for FLOPs).
    batched     another fixed sample, sorted by length and cut into batches padded to their longest
                row (dynamic padding, for the method and the baseline alike); throughput = examples per
                second of the median of `repeats` full passes.

On CUDA the clock is CUDA events with synchronisation; on CPU `time.perf_counter`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from tokenprune.encoder import PrunableEncoder, TokenPolicy


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.device = device
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def seconds(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def alternated(run_method: Callable[[], Any], run_full: Callable[[], Any], clock: _Clock, repeats: int,
               first: int = 0) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` runs of each, alternated round by round (the method first in even rounds,
    counted from `first`), so that drift on a shared machine hits both sides alike."""
    times_method, times_full = [], []
    for r in range(repeats):
        order = ((run_method, times_method), (run_full, times_full))
        for run, times in order if (first + r) % 2 == 0 else order[::-1]:
            times.append(clock.seconds(run))
    return times_method, times_full


def sdpa_backend(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The kernel scaled_dot_product_attention picks for this model's attention shapes, without a
    mask / with a key mask (e.g. "flash_attention/flash_attention" on CPU): what the baseline is
    timed with (the encoder uses sdpa wherever probabilities are not needed)."""
    from torch.nn.attention import SDPBackend

    c = model.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dtype = dtype or next(model.parameters()).dtype
    q = torch.zeros(1, heads, 64, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 1, 64, dtype=torch.bool, device=device)
    try:
        return "/".join(SDPBackend(torch._fused_sdp_choice(q, q, q, m)).name.lower() for m in (None, mask))
    except (AttributeError, RuntimeError, ValueError):  # a private API: absent or changed in this torch
        return "unknown"


def _batch(rows: Sequence[Mapping], device: torch.device, pad_token_id: int = 0) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask, token_type_ids padded to the longest row."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        if r.get("token_type_ids") is not None:
            types[i, :n] = torch.as_tensor(r["token_type_ids"])
        mask[i, :n] = 1
    return ids.to(device), mask.to(device), types.to(device)


def _sample(n_rows: int, k: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(n_rows, size=min(k, n_rows), replace=False).tolist())


def time_method(
    model: torch.nn.Module,
    policy: TokenPolicy | None,
    baseline: torch.nn.Module,
    examples: Sequence[Mapping],
    device: torch.device | str,
    *,
    n_latency: int = 64,
    n_throughput: int = 256,
    batch_size: int = 32,
    warmup: int = 3,
    repeats: int = 3,
    threads: int | None = None,
    seed: int = 0,
    pad_token_id: int = 0,
) -> dict:
    """Batch-1 latency and batched throughput of `model` + `policy` against `baseline` (the full
    backbone), on encoded examples (rows with `input_ids`, optionally `token_type_ids`)."""
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    singles = [_batch([examples[i]], device, pad_token_id) for i in _sample(len(examples), n_latency, rng)]
    pool = [examples[i] for i in _sample(len(examples), n_throughput, rng)]
    pool.sort(key=lambda r: -len(r["input_ids"]))
    batches = [_batch(pool[i:i + batch_size], device, pad_token_id) for i in range(0, len(pool), batch_size)]

    method = PrunableEncoder(model, policy, mode="gather")
    full = PrunableEncoder(baseline, None, mode="gather")
    modes = (model.training, baseline.training, policy.training if policy is not None else None)
    method.eval(), full.eval()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    clock = _Clock(device)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for enc in (method, full):
                    for x in singles[:4]:
                        enc(*x)
                    enc(*batches[0])

            lat_method, lat_base = [], []
            for j, x in enumerate(singles):
                runs_m, runs_b = alternated(lambda: method(*x), lambda: full(*x), clock, repeats, first=j)
                lat_method.append(float(np.median(runs_m)))
                lat_base.append(float(np.median(runs_b)))

            def one_pass(enc: PrunableEncoder) -> None:
                for b in batches:
                    enc(*b)

            pass_method, pass_base = alternated(lambda: one_pass(method), lambda: one_pass(full), clock, repeats)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        model.train(modes[0]), baseline.train(modes[1])
        if policy is not None:
            policy.train(modes[2])

    lat_method_ms, lat_base_ms = 1e3 * np.array(lat_method), 1e3 * np.array(lat_base)
    throughput = len(pool) / float(np.median(pass_method))
    baseline_throughput = len(pool) / float(np.median(pass_base))
    return {
        "latency_ms_b1": float(np.median(lat_method_ms)),
        "latency_ms_b1_p90": float(np.percentile(lat_method_ms, 90)),
        "latency_ms_b1_mean": float(lat_method_ms.mean()),
        "baseline_latency_ms_b1": float(np.median(lat_base_ms)),
        "baseline_latency_ms_b1_p90": float(np.percentile(lat_base_ms, 90)),
        "baseline_latency_ms_b1_mean": float(lat_base_ms.mean()),
        "wallclock_speedup_b1": float(lat_base_ms.sum() / lat_method_ms.sum()),
        "throughput": throughput,
        "baseline_throughput": baseline_throughput,
        "throughput_speedup": throughput / baseline_throughput,
        "threads": used_threads,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "sdpa_backend": sdpa_backend(baseline, device),
        "n_latency": len(singles),
        "n_throughput": len(pool),
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": repeats,
    }


def measure(
    model: torch.nn.Module,
    policy: TokenPolicy | None,
    baseline: torch.nn.Module,
    examples: Sequence[Mapping],
    measure_cfg: Mapping,
    device: torch.device | str,
    seed: int = 0,
) -> dict:
    """`time_method` with the runner's `measure` config (n_latency, n_throughput, batch_size, warmup,
    repeats, threads); {} when `measure.timing` is off."""
    if not measure_cfg.get("timing", True):
        return {}
    return time_method(
        model, policy, baseline, examples, device,
        n_latency=int(measure_cfg.get("n_latency", 64)),
        n_throughput=int(measure_cfg.get("n_throughput", 256)),
        batch_size=int(measure_cfg.get("batch_size", 32)),
        warmup=int(measure_cfg.get("warmup", 3)),
        repeats=int(measure_cfg.get("repeats", 3)),
        threads=measure_cfg.get("threads"),
        seed=seed,
    )
