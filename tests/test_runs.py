"""Runs you can trust: exact resume after SIGKILL, the lock, refusals that change nothing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dwskd import rundir
from dwskd.io import atomic_write
from dwskd.pipeline import run_pipeline
from tests.conftest import REPO, TINY, compose_config

ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
# dwskd with an EMA teacher, 4 train epochs of 12 batches: long enough to kill it mid-stage.
RESUME = [
    *TINY,
    "data.n_train=192",
    "trainer.max_epochs=null",
    "method.epochs.train=4",
    "method.epochs.finetune=1",
    "teacher.source=random",
    "trainer.limit_train_batches=12",
    "eval.latency=false",
]


def dwskd_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dwskd.run", *RESUME, *extra, f"hydra.run.dir={run_dir}"]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: content hash and modification time (ns)."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def kill_in_second_epoch(proc: subprocess.Popen, csv_path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` once epoch 0 is checkpointed and logged (the CSV has its epoch row)."""
    deadline = time.monotonic() + timeout
    while not (csv_path.is_file() and "total_epoch" in csv_path.read_text().split("\n", 1)[0]):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run ended before epoch 0 was logged in {csv_path}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted run, and the same command SIGKILLed in the train stage then re-run."""
    root = tmp_path_factory.mktemp("resume")
    whole, resumed = root / "whole", root / "resumed"
    first = subprocess.run(dwskd_command(whole), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    layout = rundir.RunLayout(resumed)
    with (root / "killed.log").open("w") as log:
        proc = subprocess.Popen(dwskd_command(resumed), cwd=REPO, env=ENV, stdout=log, stderr=log)
        kill_in_second_epoch(proc, layout.metrics_csv("train"))
    assert layout.last_checkpoint("train").is_file()
    assert layout.stage_record("train") is None, "killed too late: the stage had finished"
    (root / "csv_before.txt").write_text(layout.metrics_csv("train").read_text())
    again = subprocess.run(
        dwskd_command(resumed), cwd=REPO, env=ENV, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    return whole, resumed


def test_kill_and_resume_gives_the_uninterrupted_metrics(killed_and_resumed) -> None:
    whole, resumed = (rundir.read_results(d) for d in killed_and_resumed)
    assert whole["models"].keys() == resumed["models"].keys()
    for name, entry in whole["models"].items():
        assert resumed["models"][name]["test"] == entry["test"], name
        assert resumed["models"][name]["val"] == entry["val"], name
    stage_resumes = [r for r in resumed["run"]["resumes"] if "stage" in r]
    assert [r["stage"] for r in stage_resumes] == ["train"]
    assert stage_resumes[0]["epoch"] >= 1
    assert whole["run"]["resumes"] == []
    report = rundir.RunLayout(killed_and_resumed[1]).report_md.read_text()
    assert "stage train resumed at epoch" in report


def test_resumed_stage_keeps_its_earlier_csv_rows(killed_and_resumed) -> None:
    """The CSV rows written before the kill stay; the replayed epoch is logged once."""
    whole, resumed = killed_and_resumed
    before = list(csv.DictReader(io.StringIO((resumed.parent / "csv_before.txt").read_text())))
    after_text = rundir.RunLayout(resumed).metrics_csv("train").read_text()
    after = list(csv.DictReader(io.StringIO(after_text)))
    epoch0 = [row for row in before if row.get("epoch") == "0"]
    assert epoch0, "nothing of epoch 0 was on disk before the kill"
    assert all(row in after for row in epoch0), "rows logged before the kill were lost"
    assert after_text == rundir.RunLayout(whole).metrics_csv("train").read_text()


def test_finished_stages_keep_no_checkpoints(killed_and_resumed) -> None:
    for run_dir in killed_and_resumed:
        assert not list(run_dir.rglob("*.ckpt")), "Lightning checkpoints left after the run"
        layout = rundir.RunLayout(run_dir)
        for model in ("student_a", "student_b"):
            assert layout.final_weights(model).is_file()


def test_refused_rerun_changes_no_file(killed_and_resumed) -> None:
    """A finished run dir asked for with another config is refused and touches nothing."""
    run_dir = killed_and_resumed[0]
    before = snapshot(run_dir)
    done = subprocess.run(
        dwskd_command(run_dir, "method.distill.alpha=0"),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "this run is complete, made with another config" in done.stderr
    assert "method.distill.alpha" in done.stderr
    assert snapshot(run_dir) == before, "a refused run changed files in the run dir"
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "method.distill.alpha=0" not in overrides


def test_finished_run_of_the_same_config_is_skipped_with_its_results(tmp_path: Path) -> None:
    """A re-launched sweep continues: the finished job returns its metrics, writes nothing."""
    cfg = compose_config("method=scratch", "eval.latency=false")
    first = run_pipeline(cfg, tmp_path)
    before = snapshot(tmp_path)
    again = run_pipeline(compose_config("method=scratch", "eval.latency=false"), tmp_path)
    assert again == json.loads(rundir.RunLayout(tmp_path).metrics_json.read_text())
    assert again["models"]["student_a"]["val"]["acc"] == first["models"]["student_a"]["val"]["acc"]
    assert snapshot(tmp_path) == before


def test_second_run_into_a_held_dir_names_the_holder(tmp_path: Path) -> None:
    lock = rundir.RunLock(rundir.RunLayout(tmp_path).lock_file)
    lock.acquire()
    try:
        with pytest.raises(rundir.RunDirError, match=f"pid {os.getpid()}"):
            run_pipeline(compose_config("method=scratch"), tmp_path)
    finally:
        lock.release()
    assert not (tmp_path / "record.json").exists()


def test_resume_with_another_config_lists_the_changes(tmp_path: Path) -> None:
    cfg = compose_config("method=scratch", "eval.latency=false")
    run_pipeline(cfg, tmp_path)
    rundir.RunLayout(tmp_path).metrics_json.unlink()  # a run stopped just before its report
    before = snapshot(tmp_path)
    changed = compose_config("method=scratch", "eval.latency=false", "method.lr.train=0.5")
    with pytest.raises(rundir.RunDirError, match=r"method\.lr\.train: 0\.001 -> 0\.5") as err:
        run_pipeline(changed, tmp_path)
    assert "resume.allow_config_changes=true" in str(err.value)
    assert snapshot(tmp_path) == before
    forced = compose_config(
        "method=scratch",
        "eval.latency=false",
        "method.lr.train=0.5",
        "resume.allow_config_changes=true",
    )
    results = run_pipeline(forced, tmp_path)
    restart = results["run"]["resumes"][-1]
    assert restart["config_changes"] == {"method.lr.train": [0.001, 0.5]}


def test_logging_keys_may_change_on_resume(tmp_path: Path) -> None:
    run_pipeline(compose_config("method=scratch", "eval.latency=false"), tmp_path)
    rundir.RunLayout(tmp_path).metrics_json.unlink()
    run_pipeline(
        compose_config(
            "method=scratch", "eval.latency=false", "logger=none", "trainer.log_every_n_steps=3"
        ),
        tmp_path,
    )


def test_old_layout_run_dir_is_refused_with_advice(tmp_path: Path) -> None:
    (tmp_path / "stages" / "train").mkdir(parents=True)
    (tmp_path / "stages" / "train" / "done.json").write_text("{}")
    with pytest.raises(rundir.RunDirError, match="older dwskd"):
        run_pipeline(compose_config("method=scratch"), tmp_path)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    target.write_text("previous")

    def fail_halfway(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, fail_halfway)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_fingerprint_ignores_logging_keys_only() -> None:
    base = {"seed": 1, "logger": {"csv": {"name": "logs"}}, "trainer": {"log_every_n_steps": 5}}
    same = {"seed": 1, "logger": None, "trainer": {"log_every_n_steps": 1}}
    assert rundir.fingerprint(base) == rundir.fingerprint(same)
    assert rundir.fingerprint(base) != rundir.fingerprint({**base, "seed": 2})


@pytest.mark.slow
def test_default_run_dir_stays_lean(tmp_path: Path) -> None:
    """The default run (~3 min on 2 cores) leaves its weights, logs and report: <= 150 MB."""
    run_dir = tmp_path / "default"
    cmd = [sys.executable, "-m", "dwskd.run", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    from experiments.disk_usage import usage

    size = sum(usage(run_dir).values())  # hard-linked exports/ count once, as du counts them
    assert size <= 150e6, f"default run dir holds {size / 1e6:.1f} MB"
    assert not list(run_dir.rglob("*.ckpt"))
