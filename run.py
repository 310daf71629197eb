"""tokenprune's entry point: compose the config, run one job.

    python run.py                                   # bert on SST-2, offline defaults
    python run.py -m method=trbert,adapler task=glue speedup=2,3,5
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from tokenprune.runner import run_job


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    # a parallel launcher's job count (joblib's n_jobs) sets each job's torch threads when `threads` is null
    record = run_job(cfg, hydra_cfg.runtime.output_dir, parallel_jobs=hydra_cfg.launcher.get("n_jobs"))
    if hydra_cfg.mode == RunMode.RUN and record["status"] == "failed":
        print(f"\nFailed: {record['error']}", file=sys.stderr)
        sys.exit(1)
    return record


if __name__ == "__main__":
    main()
