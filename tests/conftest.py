"""Shared fixtures: the real Hydra config composed in-process with tiny limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO / "conf")
REAL_DATA = Path(os.environ.get("DWSKD_DATA_DIR", REPO.parent / "shared" / "data"))

# Small enough for a few seconds per stage on 2 CPU cores, but every stage and code path runs.
TINY = [
    "data.img_size=32",
    "data.n_train=96",
    "data.n_val=32",
    "data.n_test=48",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.depth=2",
    "teacher.depth=4",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "eval.latency_seconds=0.05",
    "eval.plots=false",  # plots take most of a tiny run's report; tests that check them turn them on
]


def compose_config(*overrides: str, tiny: bool = True) -> DictConfig:
    """Compose conf/config.yaml exactly as `python -m dwskd.run` would, plus overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*(TINY if tiny else []), *overrides])


@pytest.fixture
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real datasets not found at {REAL_DATA} (set DWSKD_DATA_DIR to run these)")
    return REAL_DATA


@pytest.fixture
def one_thread():
    """Several test processes share 2 cores; OpenMP spinning with 2 threads is far slower then."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_module(
    module: str, *args: str, cwd: Path = REPO, **extra_env: str
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` offline, as a user runs a command; output captured."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    env.update(extra_env)
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
