"""Every config composes; suites expand into one job per task; bert sweeps collapse onto speedup 1;
user mistakes on the command line get one sentence."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import HydraContext, RunMode

from hydra_plugins.tokenprune_sweeper.suites import SuiteSweeper
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


def sweep_jobs(*arguments: str) -> list[list[str]]:
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    master = loader.load_configuration("config", overrides=[], run_mode=RunMode.MULTIRUN)
    sweeper = SuiteSweeper()
    sweeper.hydra_context, sweeper.config = HydraContext(config_loader=loader, callbacks=None), master
    overrides = OverridesParser.create().parse_overrides(list(arguments))
    [jobs] = sweeper.split_arguments(overrides, None)
    return jobs


def test_a_suite_becomes_one_job_per_task():
    jobs = sweep_jobs("method=bert,bert", "task=glue", "seed=1,2")
    assert len(jobs) == 9 * 2 * 2
    assert sorted({o for job in jobs for o in job if o.startswith("task=")}) == sorted(f"task={t}" for t in GLUE)
    assert len(sweep_jobs("task=glue,long,imdb")) == 9 + 3 + 1


def test_full_model_jobs_collapse_onto_speedup_one():
    jobs = sweep_jobs("method=bert,topk", "task=sst2,mrpc", "speedup=1.5,2,3")
    bert = [j for j in jobs if "method=bert" in j]
    assert sorted(bert) == [["method=bert", "task=mrpc", "speedup=1.0"], ["method=bert", "task=sst2", "speedup=1.0"]]
    assert len([j for j in jobs if "method=topk" in j]) == 2 * 3


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
