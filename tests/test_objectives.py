"""Methods as objectives: named loss terms from dwskd.distill, summed and logged by the module."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dwskd import distill, objectives
from dwskd.distill import DistillOptions
from dwskd.module import DistillModule
from dwskd.pipeline import Context, run_pipeline
from dwskd.rundir import STAGE_SEED_OFFSETS, StageSpec
from experiments import paper
from experiments.common import METHODS, TEACHER_FREE, method_students, needs_teacher
from tests.conftest import compose_config

CLASSES, FEATURES, BATCH = 3, 8, 6
METHOD_NAMES = sorted(p.stem for p in Path("conf/method").glob("*.yaml") if p.stem != "_base")


def linear_models(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(FEATURES, CLASSES) for _ in range(n)]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(BATCH, FEATURES), torch.randint(0, CLASSES, (BATCH,))


def test_self_kd_terms_are_skd_losses_and_weights_sum_to_its_total() -> None:
    students, ema = linear_models(2), linear_models(2)
    for e in ema:
        nn.init.normal_(e.weight)  # an EMA that differs from the students
    x, y = batch()
    options = DistillOptions(alpha=0.5, beta=2.0, temperature=3.0)
    objective = objectives.SelfKD(options)
    out = objective(objectives.Models(students, ema), [x, x], y)
    logits = [s(x) for s in students]
    expected = distill.skd_losses(
        logits, y, alpha=0.5, beta=2.0, temperature=3.0, ema_logits=[e(x) for e in ema]
    )  # one view: the EMA of student i looks at the partner's (the same) batch
    for terms, want in zip(out.losses, expected, strict=True):
        assert list(terms) == ["ce", "partner_kd", "ema_kd"]
        total = sum(objective.weights[k] * v for k, v in terms.items())
        assert torch.equal(total, want["total"])
        assert all(torch.equal(terms[k], want[k]) for k in terms)


def test_teacher_kd_is_ce_plus_hinton_kd_from_the_frozen_teacher() -> None:
    (student,), (teacher,) = linear_models(1), linear_models(1)
    nn.init.normal_(teacher.weight)
    x, y = batch()
    objective = objectives.TeacherKD(DistillOptions(alpha=0, beta=0, gamma=0.7))
    out = objective(objectives.Models([student], teacher=teacher), [x], y)
    terms = out.losses[0]
    assert torch.equal(terms["ce"], F.cross_entropy(student(x), y))
    assert torch.equal(terms["teacher_kd"], distill.kd_loss(student(x), teacher(x), 4.0))
    assert objective.weights == {"ce": 1.0, "teacher_kd": 0.7} and objective.uses_teacher


@pytest.mark.parametrize(
    "cls, change, match",
    [
        (objectives.CrossEntropy, {"beta": 1.0}, "beta=1.0 has no effect with the CrossEntropy"),
        (objectives.Mutual, {"beta": 1.0}, "method.distill.beta"),
        (objectives.TeacherKD, {"alpha": 1.0}, "method.distill.alpha"),
        (objectives.SelfKD, {"gamma": 1.0}, "method.distill.gamma"),
        (objectives.CrossEntropy, {"labels": False}, "labels=false"),
    ],
)
def test_a_knob_the_objective_does_not_use_is_refused(cls, change, match) -> None:
    options = replace(DistillOptions(alpha=0.0, beta=0.0), **change)
    with pytest.raises(ValueError, match=match):
        cls(options)


def test_module_sums_and_logs_each_term_and_keeps_accuracy_out_of_the_losses() -> None:
    options = DistillOptions(alpha=0.5, beta=2.0)
    objective = objectives.SelfKD(options)
    module = DistillModule(linear_models(2), class_names=list("abc"), objective=objective)
    logged: dict[str, torch.Tensor] = {}
    module.log_dict = lambda values, **_: logged.update(values)
    module.log = lambda key, value, **_: logged.__setitem__(key, value)
    x, y = batch()
    loss = module.training_step((x, y), 0)
    out = objective(objectives.Models(module.students, module.ema), [x, x], y)
    assert all("acc" not in terms for terms in out.losses)
    for name in ("student_a", "student_b"):
        keys = {k.split("/")[-1] for k in logged if k.startswith(f"train/{name}/")}
        assert keys == {"ce", "partner_kd", "ema_kd", "total", "acc"}
        terms = {k: logged[f"train/{name}/{k}"] for k in ("ce", "partner_kd", "ema_kd")}
        weighted = terms["ce"] + 0.5 * terms["partner_kd"] + 2.0 * terms["ema_kd"]
        assert torch.allclose(logged[f"train/{name}/total"], weighted)
    assert torch.allclose(loss, logged["train/student_a/total"] + logged["train/student_b/total"])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_yaml_names_its_objective_students_and_teacher(method: str) -> None:
    cfg = compose_config(f"method={method}", tiny=False).method
    options = DistillOptions.from_mapping(dict(cfg.distill))
    objective = objectives.from_config(cfg.objective, options)
    assert isinstance(objective, objectives.Objective)
    assert cfg.students == 0 or cfg.students >= objective.min_students
    assert (method_students(method), needs_teacher(method)) == (
        cfg.students,
        cfg.needs_teacher or not cfg.students,
    )


def test_experiments_read_method_facts_from_the_yamls() -> None:
    assert TEACHER_FREE == ("scratch", "dml")
    assert [m for m in METHODS if method_students(m) == 2] == ["dml", "dwskd"]
    budget = paper.QUICK
    assert paper.epoch_overrides("dwskd", budget) == [
        f"method.epochs.train={budget.student_epochs - budget.finetune_epochs}",
        f"method.epochs.finetune={budget.finetune_epochs}",
    ]
    assert paper.epoch_overrides("ema_only", budget)[-1] == "method.epochs.finetune=0"


def test_stage_specs_take_role_lr_and_seed_offset_from_tables_not_names() -> None:
    cfg = compose_config("method.lr.teacher=0.5", "method.lr.train=0.25", tiny=False)
    ctx = SimpleNamespace(cfg=cfg)
    probe = Context.spec(ctx, "teacher_probe", 3)
    assert probe == StageSpec(
        "teacher_probe", "teacher", 3, 0.5, STAGE_SEED_OFFSETS["teacher_probe"]
    )
    train = Context.spec(ctx, "train")
    assert (train.role, train.epochs, train.lr, train.seed(42)) == ("students", 4, 0.25, 44)


def test_ema_only_is_one_class_one_yaml_and_trains_ce_plus_ema_kd(tmp_path: Path) -> None:
    """The README's worked example: EmaKD equals SelfKD without a partner, and runs end to end."""
    students, ema = linear_models(1), linear_models(1)
    nn.init.normal_(ema[0].weight)
    x, y = batch()
    options = DistillOptions(alpha=0.0, beta=1.0)
    models = objectives.Models(students, ema)
    ema_only = objectives.EmaKD(options)(models, [x], y).losses[0]
    self_kd = objectives.SelfKD(options)(models, [x], y).losses[0]
    assert ema_only.keys() == self_kd.keys() == {"ce", "ema_kd"}
    assert all(torch.equal(ema_only[k], self_kd[k]) for k in ema_only)

    results = run_pipeline(compose_config("method=ema_only", "eval.latency=false"), tmp_path)
    assert set(results["models"]) == {"student_a", "teacher"}
    with (tmp_path / "logs" / "train" / "metrics.csv").open() as f:
        header = next(csv.reader(f))
    assert "train/student_a/ema_kd_step" in header and "train/student_a/ce_step" in header
    assert not any("partner_kd" in c or "train/student_b/" in c for c in header)
