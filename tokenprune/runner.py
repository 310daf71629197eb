"""The pipeline of one job (DESIGN.md, "One job, start to end"):

config checks → data → the fine-tuned backbone (cached) → method.fit → method.calibrate →
evaluation on dev (metric, FLOPs from the tokens each layer really processed, wall clock against the
full backbone in the same process) → one result record, mirrored to W&B.

Whatever happens, the job ends with a whole record: `ok`, `skipped` (cannot run here; says how to
get what is missing) or `failed` (the error and, for bugs, the traceback).
"""

from __future__ import annotations

import json
import logging
import os
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
from tokenprune.errors import SkipJob, UserError
from tokenprune.evaluate import run_eval
from tokenprune.models import load_backbone, load_tokenizer, resolve_device
from tokenprune.tracking import make_tracker
from tokenprune.train import fit
from transformers import AutoModelForSequenceClassification

log = logging.getLogger(__name__)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# (config path, test, what it must be): the fields a user types, each checked before any work.
FIELD_CHECKS = [
    ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number, e.g. seed=1"),
    ("data.source", lambda v: v in ("local", "hub"), "local or hub"),
    ("budget.max_train", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null for all"),
    ("budget.max_calib", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null"),
    ("budget.max_dev", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null for all"),
    ("budget.epochs", _positive_int, "a whole number >= 1"),
    ("train.lr", lambda v: _number(v) and v > 0, "a positive number, e.g. 5e-5"),
    ("train.batch_size", _positive_int, "a whole number >= 1"),
    ("train.eval_batch_size", _positive_int, "a whole number >= 1"),
    ("train.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("train.warmup_ratio", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("train.grad_clip", lambda v: _number(v) and v > 0, "a positive number"),
    ("measure.flops_mode", lambda v: v in flops.MODES, f"one of {', '.join(flops.MODES)}"),
    ("measure.timing", lambda v: isinstance(v, bool), "true or false"),
    ("measure.n_latency", _positive_int, "a whole number >= 1"),
    ("measure.n_throughput", _positive_int, "a whole number >= 1"),
    ("measure.batch_size", _positive_int, "a whole number >= 1"),
    ("measure.warmup", lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0"),
    ("measure.repeats", _positive_int, "a whole number >= 1"),
    ("measure.threads", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null"),
    ("threads", lambda v: v is None or _positive_int(v), "a whole number >= 1, or null"),
    ("resume", lambda v: isinstance(v, bool), "true or false"),
    ("logger.mode", lambda v: v in ("offline", "online", "disabled"), "offline, online or disabled"),
]


def check_config(cfg: DictConfig) -> None:
    """Mistakes a user can make on the command line, each in one sentence, before any work."""
    if cfg.task.get("suite"):
        raise UserError(
            f"task={cfg.task.name} is a suite of {len(cfg.task.suite)} tasks ({', '.join(cfg.task.suite)}): "
            f"add -m to run one job per task, e.g. python run.py -m task={cfg.task.name}."
        )
    if not _number(cfg.speedup):
        raise UserError(f"speedup={cfg.speedup!r} is not a number: give a target speedup >= 1, e.g. speedup=2.")
    if cfg.speedup < 1:
        raise UserError(f"speedup={cfg.speedup} is below 1: it is a target speedup over the full model, so give a value >= 1, e.g. speedup=2.")
    if cfg.method.name == "bert" and cfg.speedup != 1:
        raise UserError(
            f"method=bert is the full model and runs only at speedup=1, not {cfg.speedup}: drop the speedup "
            "override (in a multirun, bert jobs at other targets are collapsed onto speedup=1 for you)."
        )
    for path, ok, expected in FIELD_CHECKS:
        value = OmegaConf.select(cfg, path, default="<missing>")
        if path.startswith("logger.mode") and cfg.logger.name == "none":
            continue
        if not ok(value):
            raise UserError(f"{path}={value!r} is not valid: it must be {expected}.")


DETERMINISM = {
    "cpu": "deterministic at a fixed torch thread count: the same config, seed and threads give the same metric "
           "and kept-token counts, provided the cache entries it reuses were built at that thread count too "
           "(their built.json says); at another thread count float sums run in another order and training "
           "ends on other weights",
    "gpu": "not bit-exact: cuBLAS and fused attention kernels reduce in varying order, so metrics can move "
           "in the last digits and a token scored next to a threshold can flip; timings always vary",
}


def backbone_key(cfg: DictConfig) -> dict:
    """Everything that determines the fine-tuned backbone, and nothing else."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": {
            **{k: task.get(k) for k in ("name", "format", "files", "header", "columns", "labels", "max_length", "dev_from_train", "hub")},
            # fields added later enter the key only when true, so that older cache entries stay valid
            **{k: task[k] for k in ("group_by_length", "calib_whole_inputs") if task.get(k)},
        },
        "data_source": cfg.data.source,
        "budget": {k: cfg.budget[k] for k in ("max_train", "max_calib", "epochs")},
        "seed": cfg.seed,
        "train": OmegaConf.to_container(cfg.train, resolve=True),
    }


@contextmanager
def timed(times: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = round(time.perf_counter() - start, 3)


def score(task: DictConfig, result) -> tuple[str, float, dict]:
    metrics = task_data.compute_metrics(task.metric, result.predictions, result.labels)
    name = task_data.PRIMARY[task.metric]
    return name, metrics[name], metrics


def finetuned_backbone(job: methods.Job) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned full model for (model, task, budget, seed), trained once and cached."""
    cfg, device = job.cfg, job.device
    key = backbone_key(cfg)

    def make(tmp: Path) -> None:
        model = load_backbone(cfg.model, task_data.num_labels(cfg.task), cfg.seed)
        torch.manual_seed(cfg.seed)
        calib_loader = job.loader("calib")

        def evaluate(m):  # checkpoint choice on calib, never on dev
            return score(cfg.task, run_eval(m, None, calib_loader, device))[1]

        start = time.perf_counter()
        info = fit(model, job.loader("train", train=True), train_cfg=cfg.train, epochs=cfg.budget.epochs,
                   device=device, evaluate=evaluate, log_fn=job.log, desc="finetune")
        info["train_seconds"] = round(time.perf_counter() - start, 1)
        model.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=1))

    path = job.cache.get_or_make("finetune", key, make)
    model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    return model, {**json.loads((path / "info.json").read_text()), "cache_path": str(path), "key": key}


def run_job(cfg: DictConfig, output_dir: str | Path) -> dict:
    """Run one job end to end and write its record in `output_dir`; returns the record."""
    started, t0 = results.now(), time.perf_counter()
    output_dir = Path(output_dir)
    record = results.new_record(
        task=cfg.task.name, method=cfg.method.name, model=cfg.model.name, seed=cfg.seed,
        speedup_target=cfg.speedup, budget=cfg.budget.name, flops_mode=cfg.measure.flops_mode,
        config=OmegaConf.to_container(cfg, resolve=False), git_commit=results.git_commit(),
        versions=results.versions(), started_at=started, output_dir=str(output_dir),
    )
    tracker = None
    try:
        check_config(cfg)
        record["config"] = OmegaConf.to_container(cfg, resolve=True)
        if cfg.resume and (done := finished_record(cfg, output_dir)) is not None:
            return done
        set_threads(cfg)
        tracker = make_tracker(
            cfg.logger, record["config"], name=output_dir.name, group=output_dir.parent.name,
            tags=[cfg.task.name, cfg.method.name, cfg.model.name],
        )
        record.update(run_pipeline(cfg, tracker))
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
        if record["status"] is not None:
            record["hardware"] = results.hardware()
            record["duration_s"] = round(time.perf_counter() - t0, 2)
            results.write(record, output_dir, keep_ok=True)
            if record["status"] == "ok":
                remember(cfg, record)
        if tracker is not None:
            tracker.finish(record)
    return record


# ---- resume: an ok record of the same job is reused, never recomputed ----------------------------

def job_key(config: dict) -> dict:
    """What makes two jobs the same job: the resolved config, less where its outputs go and how it is
    watched (the record index adds the code version to it)."""
    return {k: v for k, v in config.items() if k not in ("logger", "resume", "cache_dir")}


def finished_record(cfg: DictConfig, output_dir: Path) -> dict | None:
    """An ok record of this very job: in its output directory (a re-run into the same sweep
    directory), or in the cache's record index (the same command run again)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    key = {"job": job_key(config), "git_commit": results.git_commit()}
    candidates = [output_dir / results.RECORD_NAME, Cache(cfg.cache_dir).path("records", key) / results.RECORD_NAME]
    for path in candidates:
        try:
            record = results.read(path)
        except (OSError, ValueError):
            continue
        if record.get("status") == "ok" and job_key(record.get("config") or {}) == key["job"]:
            if path != candidates[0]:
                record = {**record, "output_dir": str(output_dir)}
                results.write(record, output_dir)
            log.info(f"resume: {cfg.task.name}/{cfg.method.name} at {cfg.speedup}x is already done ({path}); not recomputed")
            return record
    return None


def remember(cfg: DictConfig, record: dict) -> None:
    key = {"job": job_key(record["config"]), "git_commit": record["git_commit"]}
    try:
        Cache(cfg.cache_dir).get_or_make("records", key, lambda tmp: results.write(record, tmp))
    except OSError as e:  # the record itself is written; only the index entry is missing
        log.warning(f"could not index the record for resume: {e}")


def set_threads(cfg: DictConfig) -> None:
    """torch threads for this job: `threads`, or cores / parallel jobs under a parallel launcher,
    so that side-by-side jobs don't oversubscribe the cores."""
    threads = cfg.get("threads")
    if threads is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            n_jobs = HydraConfig.get().launcher.get("n_jobs")
        except (ValueError, AttributeError):  # not under Hydra, or a launcher without n_jobs
            n_jobs = None
        if n_jobs:
            cores = os.cpu_count() or 1
            threads = max(1, cores // (cores if n_jobs < 0 else n_jobs))
    if threads:
        torch.set_num_threads(int(threads))


def run_pipeline(cfg: DictConfig, tracker) -> dict:
    times: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    cache = Cache(cfg.cache_dir)

    with timed(times, "data"):
        tokenizer = load_tokenizer(cfg.model)
        raw = task_data.load_splits(cfg.task, cfg.data, cfg.budget, cfg.seed)
        for name, ds in raw.items():
            if len(ds) == 0:
                raise UserError(
                    f"The {name} split of task {cfg.task.name} is empty after loading and the budget's caps: "
                    f"check the files under data.root={cfg.data.root} and the budget.max_* values."
                )
        splits = {name: task_data.encode(ds, tokenizer, cfg.task.max_length) for name, ds in raw.items()}
    job = methods.Job(cfg=cfg, splits=splits, tokenizer=tokenizer, backbone=None, cache=cache, device=device,
                      log=tracker.log)
    with timed(times, "finetune"):
        backbone, finetune_info = finetuned_backbone(job)
    job.backbone, job.backbone_key = backbone, finetune_info["key"]
    method = methods.get(cfg.method.name)(job)
    with timed(times, "fit"):
        method.fit()
    with timed(times, "calibrate"):
        knob = method.calibrate()

    dev_loader = job.loader("dev")
    model, policy = method.model().to(device).eval(), method.policy()
    with timed(times, "evaluate"):
        result = run_eval(model, policy, dev_loader, device, mode="gather")
        baseline = result if (policy is None and model is backbone) else run_eval(backbone, None, dev_loader, device)
    metric_name, metric, metrics = score(cfg.task, result)
    baseline_metric = score(cfg.task, baseline)[1]
    for extra in [s for s in splits if s.startswith("dev_")]:  # e.g. MNLI mismatched
        extra_result = run_eval(model, policy, job.loader(extra), device)
        metrics.update({f"{extra}/{k}": v for k, v in score(cfg.task, extra_result)[2].items()})

    counts = flops.summarize(result, baseline, model.config, backbone.config, mode=cfg.measure.flops_mode,
                             padded_len=cfg.task.max_length)  # PoWER-BERT's mode counts padded positions

    timing_fields: dict = {}
    if cfg.measure.timing:
        with timed(times, "timing"):
            timing_fields = timing.measure(model, policy, backbone, splits["dev"], cfg.measure, device, seed=cfg.seed)

    return {
        "metric_name": metric_name, "metric": metric, "metrics": metrics, "baseline_metric": baseline_metric,
        "metric_drop": baseline_metric - metric,
        **counts,
        "latency_ms_b1": timing_fields.get("latency_ms_b1"),
        "baseline_latency_ms_b1": timing_fields.get("baseline_latency_ms_b1"),
        "wallclock_speedup_b1": timing_fields.get("wallclock_speedup_b1"),
        "throughput_speedup": timing_fields.get("throughput_speedup"),
        "timing": timing_fields or None,
        "n_eval": len(result.labels),
        "method_info": {"knob": knob, "finetune": {k: v for k, v in finetune_info.items() if k != "key"},
                        "determinism": DETERMINISM, **job.info},
        "phase_times": times,
    }
