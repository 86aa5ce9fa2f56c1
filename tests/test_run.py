"""End-to-end runs of the real config (synthetic data, tiny limits): every stage and method."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from dwskd.pipeline import run_pipeline
from dwskd.rundir import RunLayout
from tests.conftest import compose_config


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def logged_values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.fixture(scope="module")
def dwskd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dwskd")
    return out, run_pipeline(compose_config("teacher.source=fit", "eval.plots=true"), out)


def test_dwskd_runs_every_stage_and_reports_all_models(dwskd_run: tuple[Path, dict]) -> None:
    out, results = dwskd_run
    for stage in ("teacher", "select", "train", "finetune"):
        assert (out / "stages" / stage).is_dir(), stage
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("student_a", "student_b", "ensemble", "teacher"):
        assert 0.0 <= saved[name]["test"]["acc"] <= 1.0
        assert saved[name]["params"] > 0
    assert saved["teacher"]["params"] > saved["student_a"]["params"]
    assert (
        saved["ensemble"]["params"] == saved["student_a"]["params"] + saved["student_b"]["params"]
    )
    assert saved["deployed"] in ("student_a", "student_b")
    assert (out / "report.md").read_text().count("student_a") >= 1
    plots = {p.name for p in (out / "plots").glob("*.png")}
    expected = {"confmat_student_a.png", "roc_teacher.png", "reliability_ensemble.png"}
    expected |= {"learning_curves_train.png"}
    assert expected | {"learning_curves_teacher.png", "learning_curves_finetune.png"} <= plots
    # Lean: each stage's best weights are exported and its Lightning checkpoints deleted.
    assert not list(out.rglob("*.ckpt"))
    # One final file per model: the fine-tuned student supersedes its pre-fine-tuning copy.
    deployed = saved["deployed"]
    kept = "student_b" if deployed == "student_a" else "student_a"
    assert {p.name for p in (out / "stages").rglob("*.safetensors")} == {
        "teacher.safetensors",
        f"{deployed}.safetensors",
        f"{kept}.safetensors",
    }
    layout = RunLayout(out)
    assert layout.final_weights(deployed) == layout.weights("finetune", deployed)
    assert layout.final_weights(kept) == layout.weights("train", kept)


def test_validation_metrics_of_the_final_weights_are_saved(dwskd_run: tuple[Path, dict]) -> None:
    """Sweeps choose knobs on validation: metrics.json carries val metrics of every model."""
    out, results = dwskd_run
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("student_a", "student_b", "ensemble", "teacher"):
        assert {"acc", "balanced_acc", "f1_macro", "auroc"} <= saved[name]["val"].keys(), name
    # The student that is not deployed keeps its train-stage weights, so its saved val
    # accuracy is the one the train stage measured when it chose which student to deploy.
    kept = "student_b" if results["deployed"] == "student_a" else "student_a"
    train_val = results["run"]["stages"]["train"]["val"][kept]["acc"]
    assert saved[kept]["val"]["acc"] == pytest.approx(train_val)


def test_dwskd_logs_every_loss_term_finite_per_student(dwskd_run: tuple[Path, dict]) -> None:
    out, _ = dwskd_run
    rows = read_metrics_csv(out / "logs" / "train" / "metrics.csv")
    for student in ("student_a", "student_b"):
        for term in ("ce", "partner_kd", "ema_kd", "total"):
            values = logged_values(rows, f"train/{student}/{term}_step")
            assert values, f"train/{student}/{term} was not logged"
            assert all(math.isfinite(v) for v in values)
    assert logged_values(rows, "val/acc")


def test_selected_students_start_from_the_teacher(dwskd_run: tuple[Path, dict]) -> None:
    """The select stage's students hold the teacher's even / odd channels (complementary)."""
    out, _ = dwskd_run
    from dwskd import pipeline, rundir

    with rundir.opened_run_dir(out / "copy", {}) as run_dir:
        ctx = pipeline.prepare(compose_config("teacher.source=fit"), run_dir)
    from dwskd.models import create_model

    teacher = create_model(ctx.cfg.teacher, **ctx.shape)
    rundir.load_weights(teacher, rundir.RunLayout(out).weights("teacher", "teacher"))
    a, b = pipeline.select_stage(ctx, teacher)
    key = "blocks.0.norm1.weight"
    assert torch.equal(a.state_dict()[key], teacher.state_dict()[key][0::2])
    assert torch.equal(b.state_dict()[key], teacher.state_dict()[key][1::2])
    plans = json.loads(rundir.RunLayout(out).done_json("select").read_text())["plans"]
    assert plans["student_a"]["teacher_blocks"] == plans["student_b"]["teacher_blocks"]


def test_rerun_in_same_directory_skips_finished_stages(dwskd_run: tuple[Path, dict]) -> None:
    from dwskd.rundir import RunDirError

    out, results = dwskd_run
    same = run_pipeline(compose_config("teacher.source=fit"), out)  # skipped: recorded results
    assert same == json.loads((out / "metrics.json").read_text())
    with pytest.raises(RunDirError, match="made with another config"):
        run_pipeline(compose_config("teacher.source=fit", "method.distill.alpha=0.5"), out)
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*.safetensors")}
    (out / "metrics.json").rename(out / "metrics.first.json")
    again = run_pipeline(compose_config("teacher.source=fit"), out)
    after = {p: p.stat().st_mtime_ns for p in (out / "stages").rglob("*.safetensors")}
    assert before == after, "a finished stage was trained again"
    assert not list((out / "logs").glob("*/metrics.csv.*")), "logs of finished stages rewritten"
    assert (
        again["models"]["student_a"]["test"]["acc"] == results["models"]["student_a"]["test"]["acc"]
    )


@pytest.mark.parametrize("method", ["scratch", "ws", "kd", "dml", "teacher"])
def test_every_method_runs(method: str, tmp_path: Path) -> None:
    results = run_pipeline(compose_config(f"method={method}", "eval.latency=false"), tmp_path)
    expected = {
        "scratch": {"student_a"},
        "ws": {"student_a", "teacher"},
        "kd": {"student_a", "teacher"},
        "dml": {"student_a", "student_b", "ensemble"},
        "teacher": {"teacher"},
    }[method]
    assert set(results["models"]) == expected
    if method == "kd":
        rows = read_metrics_csv(tmp_path / "logs" / "train" / "metrics.csv")
        assert logged_values(rows, "train/student_a/teacher_kd_step")


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    overrides = ("method=scratch", "eval.latency=false", "trainer.deterministic=true")
    first = run_pipeline(compose_config(*overrides), tmp_path / "one")
    second = run_pipeline(compose_config(*overrides), tmp_path / "two")
    assert first["models"]["student_a"]["test"] == second["models"]["student_a"]["test"]


def test_ckpt_path_resumes_training(tmp_path: Path) -> None:
    first = compose_config("method=scratch", "eval.latency=false", "checkpoint.keep=true")
    run_pipeline(first, tmp_path / "first")
    last = tmp_path / "first" / "stages" / "train" / "checkpoints" / "last.ckpt"
    run_pipeline(
        compose_config(
            "method=scratch", "eval.latency=false", "trainer.max_epochs=2", f"ckpt_path={last}"
        ),
        tmp_path / "resumed",
    )
    rows = read_metrics_csv(tmp_path / "resumed" / "logs" / "train" / "metrics.csv")
    epochs = {int(float(r["epoch"])) for r in rows if r.get("epoch")}
    assert epochs == {1}, f"resumed run should only train epoch 1, trained {sorted(epochs)}"


def test_student_larger_than_teacher_fails_before_training(tmp_path: Path) -> None:
    from dwskd.selection import SelectionError

    cfg = compose_config("model=vit_small", "teacher=vit_tiny", "teacher.depth=4")
    with pytest.raises(SelectionError):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "stages").exists(), "training started before the error"


@pytest.mark.parametrize(
    "override, match",
    [
        ("method.distill.alpha=-1", "alpha"),
        ("method.distill.temperature=0", "temperature"),
        ("method.distill.ema_momentum=1.5", "momentum"),
        ("teacher.source=cloud", "teacher.source"),
        ("eval.bootstrap.resamples=0", r"eval\.bootstrap\.resamples=0 must be an integer >= 1"),
        ("eval.calibration_bins=0", r"eval\.calibration_bins=0 must be an integer >= 1"),
    ],
)
def test_bad_options_fail_before_training(override: str, match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        run_pipeline(compose_config(override), tmp_path)
    assert not (tmp_path / "stages").exists()


def test_teacher_file_of_another_family_is_rejected(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from dwskd.models import ModelConfigError

    other = timm.create_model("resnet18", num_classes=4, in_chans=1)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    cfg = compose_config("teacher.source=file", f"teacher.file={path}")
    with pytest.raises(ModelConfigError, match="does not fit"):
        run_pipeline(cfg, tmp_path / "run")


def test_hub_teacher_offline_suggests_file(tmp_path: Path) -> None:
    from dwskd.models import ModelConfigError

    with pytest.raises(ModelConfigError, match="teacher.source=file"):
        run_pipeline(compose_config("teacher.source=hub", "method=teacher"), tmp_path)


def test_unknown_method_is_a_clear_config_error() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="method"):
        compose_config("method=magic")


@pytest.mark.slow
def test_two_process_cpu_ddp_with_ema(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = compose_config(
        "trainer=ddp_cpu",
        "teacher.source=random",
        "method.epochs.finetune=0",
        "eval.latency=false",
        "checkpoint.ema=true",
    )
    results = run_pipeline(cfg, tmp_path)
    assert {"student_a", "student_b", "ensemble", "teacher"} <= set(results["models"])
    layout = RunLayout(tmp_path)
    key = "blocks.0.mlp.fc1.weight"
    student = load_file(str(layout.final_weights("student_a")))[key]  # no fine-tuning epochs
    ema = load_file(str(layout.weights("train", "ema_student_a")))[key]
    teacher = load_file(str(tmp_path / "stages" / "teacher" / "teacher.safetensors"))[key]
    selected = teacher[0::2][:, 0::2]  # what student A started from (uniform, offset 0)
    assert student.shape == ema.shape == selected.shape
    assert not torch.equal(ema, selected), "the EMA teacher was not updated under DDP"
    assert not torch.equal(ema, student), "the EMA teacher should lag the student"


def test_label_free_skd_trains_on_two_views_without_ce(tmp_path: Path) -> None:
    cfg = compose_config(
        "method.distill.labels=false",
        "data.views=2",
        "teacher.source=random",
        "eval.latency=false",
    )
    run_pipeline(cfg, tmp_path)
    rows = read_metrics_csv(tmp_path / "logs" / "train" / "metrics.csv")
    assert logged_values(rows, "train/student_a/partner_kd_step")
    assert logged_values(rows, "train/student_b/ema_kd_step")
    assert "train/student_a/ce_step" not in rows[0], "label-free SKD must not use the labels"


def test_label_free_skd_without_two_views_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.views=2"):
        run_pipeline(compose_config("method.distill.labels=false"), tmp_path)


@pytest.mark.slow  # tests/test_wandb.py checks the W&B run in depth
def test_wandb_offline_logger_records_each_stage(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_config("method=scratch", "logger=wandb", "eval.latency=false", "eval.plots=true")
    run_pipeline(cfg, tmp_path / "run")
    runs = list((tmp_path / "run").rglob("offline-run-*"))
    assert len(runs) == 1, "expected one W&B run for the whole dwskd run (tests/test_wandb.py)"
    media = list((tmp_path / "run").rglob("media/images/plots/*.png"))
    assert any("confmat_student_a" in p.name for p in media), media


@pytest.mark.slow  # two more pipelines: make test-full
@pytest.mark.parametrize("loaded_score", [1.01, -1.0])
def test_fine_tuning_competes_with_the_loaded_teacher_on_validation(
    loaded_score: float, tmp_path: Path, monkeypatch
) -> None:
    """The loaded weights count as one more candidate epoch: whichever validates better stays.

    The loaded teacher's real score is measured, then replaced by one above (or below) any
    accuracy, so that the outcome does not depend on how a tiny fine-tune happens to go.
    """
    from safetensors.torch import load_file, save_file

    from dwskd import pipeline
    from dwskd.models import create_model
    from dwskd.rundir import RunLayout

    measured = []

    def rigged(ctx, module):
        score, weights = real(ctx, module)
        measured.append(score)
        return loaded_score, weights

    real = pipeline.loaded_score
    monkeypatch.setattr(pipeline, "loaded_score", rigged)
    cfg = compose_config("method=teacher")
    source = create_model(cfg.teacher, num_classes=4, in_chans=1, img_size=32)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    overrides = ("method=teacher", "teacher.source=file", f"teacher.file={path}")
    run_pipeline(compose_config(*overrides, "eval.latency=false"), tmp_path / "run")
    layout = RunLayout(tmp_path / "run")
    facts = json.loads(layout.done_json("teacher").read_text())["facts"]
    assert len(measured) == 1 and 0.0 <= measured[0] <= 1.0
    kept = loaded_score > 1
    assert facts["kept"] == ("loaded weights" if kept else "fine-tuned")
    exported = load_file(str(layout.weights("teacher", "teacher")))
    same = all(torch.equal(exported[k], v) for k, v in source.state_dict().items())
    assert same == kept


@pytest.mark.parametrize("head", ["auto", "reinit"])
def test_teacher_file_keeps_or_reinitialises_head(head: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from dwskd.models import create_model, load_teacher

    cfg = compose_config("teacher.source=file", f"teacher.head={head}")
    shape = {"num_classes": 4, "in_chans": 1, "img_size": 32}
    source = create_model(cfg.teacher, **shape)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    cfg.teacher.file = str(path)
    teacher, report = load_teacher(cfg.teacher, **shape, class_names=["a", "b", "c", "d"])
    assert report.changed == (head == "reinit")
    assert report.how == ("re-initialised" if head == "reinit" else "kept")
    same_body = torch.equal(teacher.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    same_head = torch.equal(teacher.head.weight, source.head.weight)
    assert same_body
    assert same_head == (head == "auto")


def test_plots_can_be_left_out(tmp_path: Path) -> None:
    """eval.plots=false (the tests' default): no plots/, and report.md links none."""
    results = run_pipeline(compose_config("method=scratch", "eval.latency=false"), tmp_path)
    assert results["deployed"] == "student_a"
    assert not list(tmp_path.glob("plots/*.png"))
    assert "(plots/" not in (tmp_path / "report.md").read_text()
