"""The pipeline of one job:

config checks → data → the fine-tuned backbone (cached) → method.fit(target) →
method.calibrate(target) → evaluation on dev (metric, FLOPs from the tokens each layer really
processed, wall clock against the full backbone in the same process; on a task with gold rationales,
the agreement of the kept tokens with them, per layer) → one result record, mirrored to W&B.

Whatever happens, the job ends with a whole record: `ok`, `skipped` (cannot run here; says how to
get what is missing) or `failed` (the error and, for bugs, the traceback).
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tokenprune import data as task_data
from tokenprune import flops, methods, results, timing
from tokenprune.cache import Cache
from tokenprune.checks import check_config, check_model, check_splits
from tokenprune.errors import SkipJob, UserError
from tokenprune.evaluate import run_eval, score
from tokenprune.finetune import equal_training_control, finetuned_backbone
from tokenprune.fingerprint import job_inputs
from tokenprune.methods.base import split_loader
from tokenprune.methods.toolbox import Phases
from tokenprune.models import load_tokenizer, resolve_device
from tokenprune.provenance import DETERMINISM, git_commit, hardware, now, set_threads, versions
from tokenprune.rationale import agreement_for
from tokenprune.resume import finished_record, remember
from tokenprune.tracking import make_tracker

log = logging.getLogger(__name__)


@contextmanager
def timed(times: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = round(time.perf_counter() - start, 3)


def run_job(cfg: DictConfig, output_dir: str | Path, parallel_jobs: int | None = None) -> dict:
    """Run one job end to end and write its record in `output_dir`; returns the record.
    `parallel_jobs`: how many jobs a parallel launcher runs side by side (they share the cores)."""
    started, t0 = now(), time.perf_counter()
    output_dir = Path(output_dir)
    record = results.new_record(
        task=cfg.task.name, method=cfg.method.name, model=cfg.model.name, seed=cfg.seed,
        speedup_target=cfg.speedup, budget=cfg.budget.name, flops_mode=cfg.measure.flops_mode,
        config=OmegaConf.to_container(cfg, resolve=False), git_commit=git_commit(),
        versions=versions(), started_at=started, output_dir=str(output_dir),
    )
    tracker, examples = None, None
    try:
        check_config(cfg)
        record["config"] = OmegaConf.to_container(cfg, resolve=True)
        record["inputs"] = job_inputs(cfg)
        if cfg.resume and (done := finished_record(cfg, output_dir)) is not None:
            log.info(results.summary_line(done, reused=True))
            return done
        set_threads(cfg.get("threads"), parallel_jobs)
        tracker = make_tracker(cfg.logger, record["config"], output_dir, job_type=cfg.method.name,
                               tags=[cfg.task.name, cfg.method.name, cfg.model.name])
        record["wandb_run"] = tracker.run_info()
        fields, examples = run_pipeline(cfg, tracker)
        record.update(fields, examples=results.EXAMPLES_NAME)
        record["status"] = "ok"
    except SkipJob as e:
        record.update(status="skipped", error=str(e))
        log.warning(f"skipped: {e}")
    except UserError as e:
        record.update(status="failed", error=str(e))
        log.error(str(e))
    except Exception as e:  # a bug or a resource failure: keep everything needed to find it
        record.update(status="failed", error=f"{e.__class__.__name__}: {e}", traceback=traceback.format_exc())
        log.exception("job failed")
    finally:
        # No status: the job was resumed (nothing new to write) or interrupted (Ctrl-C, a kill signal
        # turned into SystemExit): an unfinished job leaves no record, and a re-run does it.
        path = None
        if record["status"] is not None:
            record["hardware"] = hardware()
            record["duration_s"] = round(time.perf_counter() - t0, 2)
            path = results.save(record, output_dir, keep_ok=True, examples=examples)
            if record["status"] == "ok":
                remember(cfg, record, examples)
        if tracker is not None:
            tracker.finish(record, path)
    log.info(results.summary_line(record, path))
    return record


def load_data(cfg: DictConfig):
    """(tokenizer, encoded splits): train, calib, dev and any extra dev sets, after the budget's caps."""
    tokenizer = load_tokenizer(cfg.model)
    check_model(cfg, tokenizer)
    raw = task_data.load_splits(cfg.task, cfg.data, cfg.budget, cfg.seed)
    check_splits(cfg, raw)
    return tokenizer, {name: task_data.encode(ds, tokenizer, cfg.task.max_length) for name, ds in raw.items()}


def run_pipeline(cfg: DictConfig, tracker) -> tuple[dict, dict]:
    """(the record's fields, the per-example outputs on dev)."""
    times: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    phases = Phases(Cache(cfg.cache_dir), device)
    target = float(cfg.speedup)

    with timed(times, "data"):
        tokenizer, splits = load_data(cfg)

    def loader(split, **kwargs):
        return split_loader(cfg, splits, tokenizer, split, **kwargs)

    with timed(times, "finetune"):
        backbone, finetune_info, key = finetuned_backbone(cfg, loader, phases, device, tracker.log)
    job = methods.Job(cfg=cfg, splits=splits, tokenizer=tokenizer, backbone=backbone, backbone_key=key,
                      phases=phases, device=device, log=tracker.log)
    method = methods.get(cfg.method.name)(job)
    with timed(times, "fit"):
        method.fit(target)
    with timed(times, "calibrate"):
        knob = method.calibrate(target)
    model, policy = method.evaluated()
    model = model.to(device).eval()

    dev_loader = job.loader("dev")
    with timed(times, "evaluate"):
        agreement = agreement_for(splits["dev"], tokenizer, model.config.num_hidden_layers)
        result = run_eval(model, policy, dev_loader, device, mode="gather", on_layer=agreement)
        baseline = result if (policy is None and model is backbone) else run_eval(backbone, None, dev_loader, device)
    metric_name, metric, metrics = score(cfg.task, result)
    baseline_metric = score(cfg.task, baseline)[1]
    control, control_info = None, None
    if method.retrained_steps and cfg.measure.control:
        with timed(times, "control"):
            control_model, control_info = equal_training_control(cfg, loader, phases, device, tracker.log, backbone, key,
                                                                 method.retrained_steps)
            control = run_eval(control_model, None, dev_loader, device)
        if not np.array_equal(result.idx, control.idx):
            raise RuntimeError("the method and its control were evaluated on dev in different orders")
    control_metric = None if control is None else score(cfg.task, control)[1]
    # drop against the stronger reference: a method that trains the backbone longer is not credited
    # with what the extra training alone gives the full model
    use_control = control_metric is not None and control_metric > baseline_metric
    reference_metric = control_metric if use_control else baseline_metric
    for extra in [s for s in splits if s.startswith("dev_")]:  # e.g. MNLI mismatched
        extra_result = run_eval(model, policy, job.loader(extra), device)
        metrics.update({f"{extra}/{k}": v for k, v in score(cfg.task, extra_result)[2].items()})

    counts = flops.summarize(result, baseline, model.config, backbone.config, mode=cfg.measure.flops_mode,
                             padded_len=cfg.task.max_length)  # PoWER-BERT's mode counts padded positions

    timing_fields: dict = {}
    if cfg.measure.timing:
        with timed(times, "timing"):
            timing_fields = timing.measure(model, policy, backbone, splits["dev"], cfg.measure, device, seed=cfg.seed)

    if not np.array_equal(result.idx, baseline.idx):  # paired comparisons need one order
        raise RuntimeError("the method and the full model were evaluated on dev in different orders")
    examples = {"idx": result.idx, "label": result.labels, "prediction": result.predictions,
                "baseline_prediction": baseline.predictions}
    if control is not None:
        examples["control_prediction"] = control.predictions
    return {
        "metric_name": metric_name, "metric": metric, "metrics": metrics, "baseline_metric": baseline_metric,
        "control_metric": control_metric, "reference": "equal-training control" if use_control else "full model",
        "metric_drop": reference_metric - metric,
        **counts,
        "latency_ms_b1": timing_fields.get("latency_ms_b1"),
        "baseline_latency_ms_b1": timing_fields.get("baseline_latency_ms_b1"),
        "wallclock_speedup_b1": timing_fields.get("wallclock_speedup_b1"),
        "throughput_speedup": timing_fields.get("throughput_speedup"),
        "timing": timing_fields or None,
        "n_eval": len(result.labels),
        "rationale": agreement and agreement.summary(),  # tasks with gold rationales: agreement per layer
        "method_info": {"knob": knob, "phases": phases.record, "finetune": finetune_info,
                        "retrained_steps": method.retrained_steps,
                        "control": control_info and {"steps": method.retrained_steps,
                                                     "best_calib_score": control_info["best_score"],
                                                     "best_epoch": control_info["best_epoch"]},
                        "determinism": DETERMINISM, **job.info},
        "learning": method.learning,
        "phase_times": times,
    }, examples
