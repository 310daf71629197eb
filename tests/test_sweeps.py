"""The named studies (conf/experiment/) and their W&B sweeps (experiments/sweeps/): every combination
of every sweep file composes into a valid job config with Hydra's compose API (no W&B server), and
a sweep runs exactly the jobs that `python run.py -m experiment=<study>` runs.

Composing each of the few hundred grid cells from scratch would take Hydra ~70 ms apiece, so the
config-group choices of a cell (experiment, logger, method, task) are composed with `compose` once
per combination, and the cell's plain values (target, seed, ...) are then set on a copy with
`OmegaConf.update`, which is what `compose` itself does with a plain `key=value` after the defaults
list.
"""

from __future__ import annotations

import copy
import functools
import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from analysis.pareto import FULL_MODEL
from helpers import sweep_jobs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
STUDIES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("_"))  # _study: shared fields
COMMAND = ["${env}", "python", "${program}", "${args_no_hyphens}"]

try:  # the runner's own checks, once its modules import
    from tokenprune.checks import check_config
except ImportError:  # pragma: no cover - the runner's modules are still being written
    check_config = None


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def is_group(key: str) -> bool:
    return (CONF / key).is_dir()


def cells(spec: dict) -> list[dict]:
    """Every combination of a W&B grid's parameters."""
    params = spec["parameters"]
    names = list(params)
    choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


COMPOSED: dict[tuple, object] = {}  # composed configs by their sorted group overrides


def compose_cells(overrides_per_cell: list[list[str]]) -> list:
    """Composes each cell: group overrides with `compose` (cached per combination), then the
    cell's plain `key=value` overrides set as `compose` sets them."""
    parser = OverridesParser.create()
    out = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in overrides_per_cell:
            groups = tuple(sorted(o for o in overrides if is_group(o.partition("=")[0])))
            values = [o for o in overrides if not is_group(o.partition("=")[0])]
            if groups not in COMPOSED:
                COMPOSED[groups] = compose("config", overrides=list(groups))
            cfg = copy.deepcopy(COMPOSED[groups])
            for override in parser.parse_overrides(values):
                assert override.get_key_element() == override.key_or_group, f"{override.input_line}: not a plain key=value"
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
            out.append(cfg)
    return out


def job_of(cfg) -> tuple:
    return cfg.task.name, cfg.method.name, float(cfg.speedup), cfg.seed


def check_job(cfg) -> None:
    """What run.py would refuse, checked here whether or not the runner imports."""
    assert not cfg.task.get("suite"), f"task={cfg.task.name} is a suite: a single run refuses it"
    speedup = float(cfg.speedup)
    assert speedup >= 1, f"speedup {speedup} < 1"
    if cfg.method.get("fixed_speedup") is not None:
        assert speedup == cfg.method.fixed_speedup, f"{cfg.method.name} runs at its fixed_speedup only"
    assert isinstance(cfg.seed, int)
    if check_config is not None:
        check_config(cfg)


@functools.lru_cache(maxsize=None)
def study_jobs(study: str) -> frozenset[tuple]:
    """The jobs of `python run.py -m experiment=<study>`: its hydra.sweeper.params, expanded by the
    tokenprune sweeper (suites into tasks, bert onto speedup 1), each composed."""
    configs = compose_cells(sweep_jobs(f"experiment={study}"))
    for cfg in configs:
        check_job(cfg)
    return frozenset(job_of(cfg) for cfg in configs)


def study_methods(study: str) -> list[str]:
    params = yaml.safe_load((CONF / "experiment" / f"{study}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return [m.strip() for m in str(params["method"]).split(",")]


def test_every_study_has_a_sweep_file():
    assert {"glue_pareto", "long_pareto"} <= set(STUDIES)
    assert [p.stem for p in SWEEPS] == STUDIES


def test_studies_use_only_methods_with_a_config():
    for study in STUDIES:
        for method in study_methods(study):
            assert (CONF / "method" / f"{method}.yaml").is_file(), f"{study}: method {method} has no conf/method/{method}.yaml"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_drives_run_py_with_hydra_overrides(path):
    spec = load_sweep(path)
    assert spec["method"] == "grid" and spec["program"] == "run.py" and spec["command"] == COMMAND
    assert spec["parameters"]["experiment"]["value"] == path.stem
    assert "speedup" not in spec["parameters"], "sweep study.target_speedup: bert cannot take a speedup"
    assert spec["parameters"]["method"]["values"] == study_methods(path.stem), (
        f"the method list of {path.name} differs from conf/experiment/{path.stem}.yaml: add the method to both")
    for name, param in spec["parameters"].items():
        assert ("value" in param) != ("values" in param), f"{name}: give value or values"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_combination_composes_into_a_valid_job(path):
    spec = load_sweep(path)
    grid = cells(spec)
    configs = compose_cells([[f"{k}={v}" for k, v in cell.items()] for cell in grid])
    for cell, cfg in zip(grid, configs):
        check_job(cfg)
        assert (cfg.method.name, cfg.task.name, cfg.seed) == (cell["method"], cell["task"], cell["seed"])
        assert cfg.study.name == path.stem and cfg.logger.name == "wandb" and cfg.logger.mode == "online"
        expected = cfg.method.get("fixed_speedup", float(cell["study.target_speedup"]))
        assert float(cfg.speedup) == expected
    assert {job_of(cfg) for cfg in configs} == study_jobs(path.stem), "the W&B grid and the Hydra study run the same jobs"


def test_suites_are_listed_in_full_and_the_glue_study_counts_its_jobs():
    glue, long = load_sweep(REPO / "experiments/sweeps/glue_pareto.yaml"), load_sweep(REPO / "experiments/sweeps/long_pareto.yaml")
    suite = lambda name: yaml.safe_load((CONF / "task" / f"{name}.yaml").read_text())["suite"]  # noqa: E731
    assert glue["parameters"]["task"]["values"] == suite("glue")
    assert long["parameters"]["task"]["values"] == suite("long")
    jobs = study_jobs("glue_pareto")
    methods = study_methods("glue_pareto")
    reducing = [m for m in methods if m != FULL_MODEL]
    assert len(jobs) == 9 * 3 * (1 + 3 * len(reducing))  # tasks × seeds × (bert once + targets per method)
    assert {s for _, m, s, _ in jobs if m == FULL_MODEL} == {1.0}
    assert {s for _, m, s, _ in jobs if m != FULL_MODEL} == {1.5, 2.0, 3.0}


def test_a_single_run_of_a_study_gets_a_valid_speedup():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert float(compose("config", overrides=["experiment=glue_pareto"]).speedup) == 1.0  # bert, the default method
        assert float(compose("config", overrides=["experiment=glue_pareto", "method=bert", "study.target_speedup=3"]).speedup) == 1.0
        assert float(compose("config", overrides=["experiment=glue_pareto", "speedup=3"]).speedup) == 3.0  # as a multirun sets it
        debug = compose("config", overrides=["experiment=debug"])
        assert (debug.model.name, debug.budget.name, debug.logger.name) == ("tiny", "smoke", "none")
