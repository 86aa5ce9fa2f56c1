"""The command line as users call it: a Hydra multirun, launcher configs, real datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dwskd.pipeline import run_pipeline
from tests.conftest import REPO, TINY, compose_config


def two_seed_multirun(tmp_path: Path, *launcher: str) -> list[Path]:
    """``dwskd.run -m seed=1,2`` (tiny scratch runs) with ``launcher`` overrides; its reports."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    sweep = ["method=scratch", "seed=1,2", "eval.latency=false", f"paths.output_root={tmp_path}"]
    cmd = [sys.executable, "-m", "dwskd.run", "-m", *launcher, *sweep, *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted(tmp_path.glob("multirun/*/*/metrics.json"))
    assert len(reports) == 2, done.stderr[-3000:]
    assert {json.loads(p.read_text())["run"]["seed"] for p in reports} == {1, 2}
    return reports


def test_multirun_of_two_jobs_writes_two_reports_and_a_relaunch_skips_them(
    tmp_path: Path,
) -> None:
    """The same multirun again: both finished jobs return their recorded metric (nothing runs
    again), and the first launch's multirun.yaml is kept beside the new one."""
    reports = two_seed_multirun(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in reports}
    sweep_dir = reports[0].parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    again = ["method=scratch", "seed=1,2", "eval.latency=false", f"hydra.sweep.dir={sweep_dir}"]
    cmd = [sys.executable, "-m", "dwskd.run", "-m", *again, f"paths.output_root={tmp_path}", *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in reports} == before  # skipped, not run again
    assert (
        len(list(sweep_dir.glob("multirun.*.yaml"))) == 1
        and (sweep_dir / "multirun.yaml").is_file()
    )


def test_slurm_launcher_and_sweep_presets_compose() -> None:
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=["hydra/launcher=slurm", "experiment=sweep_methods"],
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.sweeper.params.method == "scratch,ws,kd,dml,dwskd,teacher"


@pytest.mark.real_data
@pytest.mark.parametrize(
    "data",
    [  # one real-data smoke run in make test; every dataset loads in tests/test_data.py
        pytest.param("chest_xray", marks=pytest.mark.slow),
        pytest.param("lung_ct", marks=pytest.mark.slow),
        "brain_mri",
        pytest.param("pneumoniamnist", marks=pytest.mark.slow),
    ],
)
def test_smoke_run_on_real_dataset(data: str, real_data_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        f"data={data}",
        "method=scratch",
        f"paths.data_dir={real_data_dir}",
        "data.img_size=32",
        "model.depth=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=3",
        "eval.latency=false",
        "trainer.enable_progress_bar=false",
        tiny=False,
    )
    results = run_pipeline(cfg, tmp_path)
    test = results["models"]["student_a"]["test"]
    assert 0.0 <= test["acc"] <= 1.0
    n_classes = {"chest_xray": 2, "lung_ct": 2, "brain_mri": 4, "pneumoniamnist": 2}[data]
    assert len(test["confmat"]) == n_classes
    assert sum(map(sum, test["confmat"])) > 0
    expected_sets = {"chest_xray": "nih_cxr", "lung_ct": "sarscov2_ct", "brain_mri": "lgg_tcga_t1c"}
    if data in expected_sets:  # scored outside the source: every image of the set, both classes
        score = results["external"][expected_sets[data]]["student_a"]
        assert score["n_images"] == sum(score["class_counts"].values()) > 100
        assert sum(map(sum, score["confusion"])) == score["n_images"]
        assert score["intervals"]["auroc"]["low"] <= score["metrics"]["auroc"]
        assert (tmp_path / score["report"]).is_file()


@pytest.mark.slow
def test_submitit_local_multirun_runs_two_jobs(tmp_path: Path) -> None:
    """The SLURM launcher's plugin and code path (submitit), through its local executor."""
    two_seed_multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert list(tmp_path.glob("multirun/*/.submitit/*/*_log.out")), "submitit did not run the jobs"


def test_optuna_search_composes_over_the_skd_knobs_on_validation() -> None:
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=["hparams_search=dwskd_optuna"],
        )
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == "val/acc" and cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {
        f"method.distill.{k}" for k in ("temperature", "alpha", "beta", "ema_momentum")
    }


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reads_back_the_validation_metric(tmp_path: Path) -> None:
    sweep = [f"hydra.sweep.dir={tmp_path}/multirun", "hydra.sweeper.n_trials=2",
             "hydra.sweeper.sampler.n_startup_trials=2", "method=dwskd"]  # fmt: skip
    cmd = [sys.executable, "-m", "dwskd.run", "-m", "hparams_search=dwskd_optuna", *sweep, *TINY]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    best = (tmp_path / "multirun" / "optimization_results.yaml").read_text()
    assert "best_value" in best and "method.distill.temperature" in best
