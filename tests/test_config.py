"""Every config composes; suites expand into one job per task; bert sweeps collapse onto speedup 1;
a method field reaches the methods that have it; user mistakes on the command line get one sentence."""

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.utils import JobReturn, JobStatus

from analysis.pareto import FULL_MODEL
from helpers import METHOD_FIELDS_SWEEP, run_py, sweep_jobs, tokenprune_sweeper
from hydra_plugins.tokenprune_sweeper.method_fields import MethodFieldError
from hydra_plugins.tokenprune_sweeper.suites import SweepFailed
from tokenprune.errors import UserError
from tokenprune.checks import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GLUE = ["cola", "sst2", "mrpc", "rte", "stsb", "qnli", "mnli", "qqp", "wnli"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_job(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes(task):
    cfg = compose_job(f"task={task}", "logger=none")
    assert cfg.task.name == task
    if not cfg.task.get("suite"):
        assert cfg.task.max_length in (64, 128, 256, 512)
        assert cfg.task.metric in ("accuracy", "f1_accuracy", "matthews", "pearson_spearman")


@pytest.mark.parametrize("group", ["method", "model", "budget", "logger"])
def test_every_option_composes(group):
    for option in options(group):
        cfg = compose_job(f"{group}={option}")
        assert cfg[group].name == option


def test_only_the_full_model_has_a_fixed_speedup():
    """bert's one operating point is declared once, in its config; the analysis names it the reference."""
    fixed = {m: compose_job(f"method={m}").method.get("fixed_speedup") for m in options("method")}
    assert {m: s for m, s in fixed.items() if s is not None} == {FULL_MODEL: 1.0}


def test_suites_name_their_tasks():
    assert list(compose_job("task=glue").task.suite) == GLUE
    assert list(compose_job("task=long").task.suite) == ["imdb", "news20", "hyperpartisan"]


def test_every_config_field_is_commented():
    """Each key carries a comment on its line or on the line above, or sits inside a commented block."""
    for path in CONF.rglob("*.yaml"):
        commented_parents: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
        previous = ""
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
                previous = stripped or previous
                continue
            indent = len(line) - len(line.lstrip())
            commented_parents = [(i, c) for i, c in commented_parents if i < indent]
            commented = "#" in line or previous.startswith("#") or any(c for _, c in commented_parents)
            assert commented, f"{path.relative_to(CONF)}:{n}: '{stripped.split(':')[0]}' has no comment"
            commented_parents.append((indent, commented))
            previous = stripped


def test_a_suite_becomes_one_job_per_task():
    jobs = sweep_jobs("method=bert,topk", "task=glue", "seed=1,2")
    assert len(jobs) == 9 * 2 * 2
    assert sorted({o for job in jobs for o in job if o.startswith("task=")}) == sorted(f"task={t}" for t in GLUE)
    assert len(sweep_jobs("task=glue,long,imdb")) == 9 + 3  # imdb, in long and named too, runs once


def test_full_model_jobs_collapse_onto_speedup_one():
    jobs = sweep_jobs("method=bert,topk", "task=sst2,mrpc", "speedup=1.5,2,3")
    bert = [j for j in jobs if "method=bert" in j]
    assert sorted(bert) == [["method=bert", "task=mrpc", "speedup=1.0"], ["method=bert", "task=sst2", "speedup=1.0"]]
    assert len([j for j in jobs if "method=topk" in j]) == 2 * 3


def test_the_sweep_launches_in_batches_and_ends_with_a_summary(tmp_path, caplog):
    sweeper, arguments = tokenprune_sweeper("method=topk", "task=sst2", "speedup=1.5,2,3",
                                            "hydra.sweeper.max_batch_size=2", f"hydra.sweep.dir={tmp_path}")
    batches = []

    def launch(batch, initial_job_idx):  # Hydra's launcher, less the jobs: the speedup=3 job raises
        batches.append((initial_job_idx, len(batch)))
        returns = []
        for overrides in batch:
            job = JobReturn(overrides=overrides, status=JobStatus.FAILED if "speedup=3" in overrides else JobStatus.COMPLETED)
            job.return_value = RuntimeError("boom") if job.status == JobStatus.FAILED else {"status": "ok"}
            returns.append(job)
        return returns

    sweeper.launcher = SimpleNamespace(launch=launch)
    caplog.set_level(logging.INFO)
    with pytest.raises(SweepFailed, match="^1 of 3 jobs failed") as e:
        sweeper.sweep(arguments)
    assert batches == [(0, 2), (2, 1)] and "\n" not in str(e.value)
    assert "Sweep finished: 3 jobs: 2 ok, 1 failed." in caplog.text and "RuntimeError: boom" in caplog.text
    assert (tmp_path / "multirun.yaml").is_file()


def test_a_job_given_twice_runs_once():
    assert sweep_jobs("method=bert,bert", "task=sst2", "speedup=1,1.0") == [["method=bert", "task=sst2", "speedup=1"]]


def test_a_method_field_goes_to_the_methods_that_have_it():
    assert sweep_jobs(*METHOD_FIELDS_SWEEP) == [
        ["method=bert", "task=sst2", "speedup=1.0"],  # no lambda, no phi: once, as a plain bert run
        ["method=powerbert", "method.lambda=0.0001", "task=sst2", "speedup=2"],
        ["method=powerbert", "method.lambda=0.001", "task=sst2", "speedup=2"],
        ["method=random", "method.lambda=0.0001", "task=sst2", "speedup=2"],
        ["method=random", "method.lambda=0.001", "task=sst2", "speedup=2"],
        ["method=adapler", "method.phi=0.0005", "task=sst2", "speedup=2"],  # no lambda: once, with its phi
    ]
    assert compose_job("method=bert", "task=sst2", "speedup=1.0") == compose_job("method=bert", "task=sst2")


def test_a_method_field_no_method_of_the_sweep_has_stops_it_in_one_sentence():
    with pytest.raises(MethodFieldError, match="no method of this sweep has a field lamda") as e:
        sweep_jobs("method=bert,topk", "method.lamda=1e-3", "speedup=2")
    assert "topk: name, layer" in str(e.value) and "\n" not in str(e.value)


def test_a_single_run_with_a_field_its_method_lacks_names_the_method_and_its_fields(tmp_path):
    out = run_py(tmp_path, "method=bert", "method.lambda=1e-3")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "method=bert has no field lambda (its fields: name, fixed_speedup)" in out.stderr
    assert not (tmp_path / "run" / "result.json").exists(), "stopped before the job"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=glue"], "add -m"),
        (["speedup=0.5"], "below 1"),
        (["method=bert", "speedup=2"], "runs only at speedup=1"),
        (["seed=1.5"], "whole number"),
    ],
)
def test_command_line_mistakes_get_one_sentence(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        check_config(compose_job(*overrides))
    assert "\n" not in str(e.value)
