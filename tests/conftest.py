import os
from pathlib import Path

import pytest
from hydra.core.plugins import Plugins

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"

# Tests never reach W&B or the hub.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Hydra's plugin scan re-executes the modules under hydra_plugins/ (the sweeper's); scan first, so
# that the classes the tests import from them are the ones Hydra uses.
Plugins.instance()


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not DATA_ROOT.is_dir():
        pytest.fail(f"the task data is expected at {DATA_ROOT} (../shared/data beside the repository)")
    return DATA_ROOT
