"""Configs do what they say: presets override, groups build the Lightning objects, sweeps get val."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from dwskd import io, rundir, training
from dwskd.loggers import RunNames
from dwskd.pipeline import optimized_value, run_pipeline
from tests.conftest import compose_config

NAMES = RunNames(name="run", group="group")


def test_experiment_preset_overrides_top_level_keys() -> None:
    """``_self_`` first: a preset's top-level keys win over config.yaml's defaults."""
    assert compose_config(tiny=False).eval.latency_seconds == 1.0
    paper = compose_config("experiment=paper", tiny=False)
    assert paper.eval.latency_seconds == 2.0
    assert paper.trainer.enable_progress_bar is False


@pytest.mark.parametrize("debug", ["fdr", "limit", "overfit"])
def test_debug_presets_set_trainer_limits(debug: str) -> None:
    cfg = compose_config(f"debug={debug}", tiny=False)
    limits = {
        "fdr": ("limit_train_batches", 1),
        "limit": ("limit_train_batches", 5),
        "overfit": ("overfit_batches", 3),
    }
    key, value = limits[debug]
    assert cfg.trainer[key] == value


def test_baselines_inherit_from_base_not_from_dwskd() -> None:
    text = {p.stem: p.read_text() for p in Path("conf/method").glob("*.yaml")}
    for name, body in text.items():
        if name not in ("_base", "dwskd"):
            assert "- _base" in body and "- dwskd" not in body, name
    scratch = compose_config("method=scratch", tiny=False).method
    assert scratch.distill.alpha == scratch.distill.beta == 0.0
    assert scratch.epochs.train == 6 and scratch.init == "random"


def test_callbacks_come_from_the_config_group(tmp_path: Path) -> None:
    cfg = compose_config("callbacks=early_stopping", "callbacks.model_checkpoint.monitor=val/auroc")
    factories = training.build_factories(cfg, NAMES)
    callbacks = training.stage_callbacks(factories, tmp_path, seed=0, logged=False)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    stopping = next(c for c in callbacks if isinstance(c, EarlyStopping))
    assert checkpoint.monitor == stopping.monitor == "val/auroc"
    assert Path(checkpoint.dirpath) == tmp_path
    assert factories.monitor.metric == "auroc"


def test_unsupported_monitor_is_a_clear_error() -> None:
    cfg = compose_config("callbacks.model_checkpoint.monitor=train/loss")
    with pytest.raises(ValueError, match="callbacks.model_checkpoint.monitor=train/loss"):
        training.build_factories(cfg, NAMES)


def test_sweepers_get_the_validation_metric_of_the_deployed_model(tmp_path: Path) -> None:
    results = run_pipeline(compose_config("method=scratch", "eval.latency=false"), tmp_path)
    deployed = results["models"][results["deployed"]]
    assert optimized_value(results, "val/acc") == deployed["val"]["acc"]
    assert optimized_value(results, "val/balanced_acc") == deployed["val"]["balanced_acc"]
    saved = json.loads(rundir.RunLayout(tmp_path).metrics_json.read_text())
    assert saved["run"]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert saved["run"]["stage_seeds"] == {"teacher": 42, "select": 43, "train": 44, "finetune": 45}
    record = rundir.RunLayout(tmp_path).stage_record("train")
    assert record["seed"] == 44 and record["fingerprint"] == rundir.fingerprint(record["config"])


def test_ckpt_path_of_another_stage_is_refused(tmp_path: Path) -> None:
    first = compose_config("method=scratch", "eval.latency=false", "checkpoint.keep=true")
    run_pipeline(first, tmp_path / "first")
    train_ckpt = rundir.RunLayout(tmp_path / "first").last_checkpoint("train")
    teacher_run = compose_config("method=teacher", "eval.latency=false", f"ckpt_path={train_ckpt}")
    with pytest.raises(training.ResumeError, match="'train' stage.*'teacher'"):
        run_pipeline(teacher_run, tmp_path / "second")


def test_unchanged_teacher_file_is_referenced_not_copied(tmp_path: Path) -> None:
    run_pipeline(compose_config("method=teacher", "eval.latency=false"), tmp_path / "teacher")
    weights = rundir.RunLayout(tmp_path / "teacher").weights("teacher", "teacher")
    student = compose_config(
        "method=ws",
        "eval.latency=false",
        "teacher.source=file",
        f"teacher.file={weights}",
        "trainer.max_epochs=null",
        "method.epochs.teacher=0",
        "method.epochs.train=1",
    )
    run_pipeline(student, tmp_path / "ws")
    layout = rundir.RunLayout(tmp_path / "ws")
    export = layout.stage_record("teacher")["exports"]["teacher"]
    assert export == {"reference": str(weights.resolve()), "sha256": io.file_sha256(weights)}
    assert not layout.weights("teacher", "teacher").exists()
    # The reference is checked when the finished stage is loaded again.
    layout.metrics_json.unlink()
    weights.write_bytes(weights.read_bytes()[:-8] + b"changed!")
    with pytest.raises(rundir.RunDirError, match="has changed"):
        run_pipeline(student, tmp_path / "ws")


def test_linear_probe_trains_only_the_new_head_of_a_file_teacher(tmp_path: Path) -> None:
    """teacher.probe_epochs: a new head learns while the pretrained body stays as loaded."""
    from safetensors.torch import load_file, save_file

    from dwskd.models import create_model

    cfg = compose_config("method=teacher", "eval.latency=false")
    source = create_model(cfg.teacher, num_classes=3, in_chans=1, img_size=32)  # 3 != 4 classes
    weights = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    overrides = ("teacher.source=file", f"teacher.file={weights}", "teacher.probe_epochs=1")
    results = run_pipeline(
        compose_config(
            "method=teacher",
            "eval.latency=false",
            "method.epochs.teacher=0",
            "trainer.max_epochs=null",
            *overrides,
        ),
        tmp_path / "run",
    )
    layout = rundir.RunLayout(tmp_path / "run")
    assert results["run"]["stages"]["teacher"]["probe"]["epochs"] == 1
    assert (
        "train/teacher/ce_epoch" in layout.metrics_csv("teacher_probe").read_text().splitlines()[0]
    )
    assert not list((tmp_path / "run").rglob("*.ckpt")), "probe checkpoints left behind"
    trained = load_file(str(layout.final_weights("teacher")))
    body = "blocks.0.mlp.fc1.weight"
    assert torch.equal(trained[body], source.state_dict()[body]), "the probe moved the body"
    assert trained["head.weight"].shape == (4, source.head.weight.shape[1])
