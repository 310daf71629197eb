"""tokenprune's entry point: compose the config, run one job.

    python run.py                                   # bert on SST-2, offline defaults
    python run.py -m method=trbert,adapler task=glue speedup=2,3,5

A `method.X=...` override is handed to Hydra as `++method.X=...`, so that a sweep over methods can
give each method its own fields (hydra_plugins/tokenprune_sweeper/method_fields.py says how).
"""

import os
import sys

if not sys.stderr.isatty():
    # Progress bars only on a terminal: into a file (a redirected stderr, a cluster job's .err file)
    # every refresh of every bar would be written; the milestones are logged. tqdm reads TQDM_*
    # defaults when it is first imported, so this comes first.
    os.environ.setdefault("TQDM_DISABLE", "1")

import hydra  # noqa: E402
from hydra import compose  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from hydra_plugins.tokenprune_sweeper import method_fields  # noqa: E402
from tokenprune.runner import run_job  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.RUN and any(map(method_fields.field_of, hydra_cfg.overrides.task)):
        method = hydra_cfg.runtime.choices.method
        own = compose(hydra_cfg.job.config_name, overrides=[f"method={method}"]).method  # without the overrides
        method_fields.check_single_run(method, own, hydra_cfg.overrides.task)
    # a parallel launcher's job count (joblib's n_jobs) sets each job's torch threads when `threads` is null
    record = run_job(cfg, hydra_cfg.runtime.output_dir, parallel_jobs=hydra_cfg.launcher.get("n_jobs"))
    if hydra_cfg.mode == RunMode.RUN and record["status"] == "failed":
        print(f"\nFailed: {record['error']}", file=sys.stderr)
        sys.exit(1)
    return record


if __name__ == "__main__":
    sys.argv = method_fields.lenient(sys.argv)
    main()
