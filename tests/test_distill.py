"""Distillation losses and EMA helpers against values computed by hand (numpy, not torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dwskd.distill import check_distill_options, ema_momentum, kd_loss, skd_losses

STUDENT = [[2.0, 1.0, 0.1], [0.5, 0.5, 2.0]]
TEACHER = [[1.0, 3.0, 0.0], [0.0, 1.0, 1.0]]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kd_reference(student, teacher, temperature: float) -> float:
    """T² · mean over samples of sum_c p_t log(p_t / p_s), in plain numpy."""
    p_s = _softmax(np.asarray(student) / temperature)
    p_t = _softmax(np.asarray(teacher) / temperature)
    return float((p_t * np.log(p_t / p_s)).sum(axis=1).mean() * temperature**2)


def _ce_reference(logits, targets) -> float:
    p = _softmax(np.asarray(logits))
    return float(-np.log(p[np.arange(len(targets)), targets]).mean())


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize(
    ("temperature", "by_hand"),
    # per-sample KL at T=1: 0.81637726, 0.21814573; at T=4: 0.05580954, 0.01278394 (× T²)
    [(1.0, 0.5172614950775246), (4.0, 0.5487478932548)],
)
def test_kd_loss_matches_hand_computed_batchmean_t_squared(temperature, by_hand):
    loss = kd_loss(_t(STUDENT), _t(TEACHER), temperature)
    assert loss.item() == pytest.approx(by_hand, rel=1e-9)
    assert loss.item() == pytest.approx(_kd_reference(STUDENT, TEACHER, temperature), rel=1e-9)


def test_kd_loss_is_zero_for_identical_logits_and_never_reaches_teacher():
    student, teacher = _t(STUDENT), _t(TEACHER)
    assert kd_loss(student, student.detach().clone(), 3.0).item() == pytest.approx(0.0, abs=1e-12)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_skd_losses_two_students_with_labels_and_ema():
    targets = torch.tensor([0, 2])
    a, b = _t(STUDENT), _t(TEACHER)
    ema = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[0.3, 0.2, 0.1], [0.0, 2.0, 0.0]]
    losses = skd_losses(
        [a, b], targets, alpha=0.5, beta=2.0, temperature=4.0, ema_logits=[_t(e) for e in ema]
    )
    assert [set(d) for d in losses] == [{"ce", "partner_kd", "ema_kd", "total"}] * 2
    for mine, partner, ema_i, terms in zip(
        (STUDENT, TEACHER), (TEACHER, STUDENT), ema, losses, strict=True
    ):
        ce = _ce_reference(mine, [0, 2])
        partner_kd = _kd_reference(mine, partner, 4.0)
        ema_kd = _kd_reference(mine, ema_i, 4.0)
        assert terms["ce"].item() == pytest.approx(ce, rel=1e-9)
        assert terms["partner_kd"].item() == pytest.approx(partner_kd, rel=1e-9)
        assert terms["ema_kd"].item() == pytest.approx(ema_kd, rel=1e-9)
        assert terms["total"].item() == pytest.approx(ce + 0.5 * partner_kd + 2.0 * ema_kd)


def test_skd_partner_is_stop_grad_mean_of_the_other_students():
    logits = [_t(STUDENT), _t(TEACHER), _t([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])]
    losses = skd_losses(logits, None, alpha=1.0, beta=0.0, temperature=2.0)
    partner_of_0 = (np.asarray(TEACHER) + np.asarray([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])) / 2
    expected = _kd_reference(STUDENT, partner_of_0, 2.0)
    assert losses[0]["partner_kd"].item() == pytest.approx(expected, rel=1e-9)
    losses[0]["total"].backward()
    assert logits[1].grad is None and logits[2].grad is None
    assert logits[0].grad is not None


def test_skd_label_free_has_no_ce_and_total_is_weighted_kd():
    losses = skd_losses([_t(STUDENT), _t(TEACHER)], None, alpha=0.3, beta=1.0, temperature=1.0)
    assert [set(d) for d in losses] == [{"partner_kd", "total"}] * 2
    expected = 0.3 * _kd_reference(TEACHER, STUDENT, 1.0)
    assert losses[1]["total"].item() == pytest.approx(expected, rel=1e-9)


def test_skd_single_student_has_no_partner_term():
    targets = torch.tensor([1, 0])
    only_ce = skd_losses([_t(STUDENT)], targets, alpha=1.0, beta=1.0, temperature=1.0)
    assert set(only_ce[0]) == {"ce", "total"}
    assert only_ce[0]["total"].item() == pytest.approx(_ce_reference(STUDENT, [1, 0]))
    with_ema = skd_losses(
        [_t(STUDENT)], targets, alpha=1.0, beta=1.0, temperature=1.0, ema_logits=[_t(TEACHER)]
    )
    assert set(with_ema[0]) == {"ce", "ema_kd", "total"}
    ema_off = skd_losses(
        [_t(STUDENT)], targets, alpha=1.0, beta=0.0, temperature=1.0, ema_logits=[_t(TEACHER)]
    )
    assert set(ema_off[0]) == {"ce", "total"}


def test_skd_class_weights_and_label_smoothing_reach_the_ce_term():
    targets = torch.tensor([0, 2])
    weights = torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)
    weighted = skd_losses(
        [_t(STUDENT)], targets, alpha=0, beta=0, temperature=1, class_weights=weights
    )
    p = _softmax(np.asarray(STUDENT))
    expected = -(3.0 * np.log(p[0, 0]) + 1.0 * np.log(p[1, 2])) / 4.0  # weighted mean
    assert weighted[0]["ce"].item() == pytest.approx(expected, rel=1e-9)
    smoothed = skd_losses(
        [_t(STUDENT)], targets, alpha=0, beta=0, temperature=1, label_smoothing=0.3
    )
    assert smoothed[0]["ce"].item() != pytest.approx(_ce_reference(STUDENT, [0, 2]))


def test_skd_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="EMA logits"):
        skd_losses(
            [_t(STUDENT)] * 2, None, alpha=1, beta=1, temperature=1, ema_logits=[_t(STUDENT)]
        )
    with pytest.raises(ValueError, match="Nothing to train"):
        skd_losses([_t(STUDENT)], None, alpha=1, beta=1, temperature=1)


def test_module_ema_averages_parameters_and_copies_buffers():
    """The module's EMA (timm's ModelEmaV3): p_ema = m·p_ema + (1-m)·p; buffers copied."""
    from dwskd.module import ema_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    updater = ema_of(model)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        updater.module[0].weight.copy_(torch.tensor([[3.0, -1.0]]))
        model[1].running_mean.fill_(5.0)
    updater.decay = 0.75
    updater.update(model)
    # 0.75 * 3 + 0.25 * 1 = 2.5 ; 0.75 * -1 + 0.25 * 2 = -0.25
    assert updater.module[0].weight.tolist() == [[2.5, -0.25]]
    assert updater.module[1].running_mean.tolist() == [5.0]
    assert model[0].weight.tolist() == [[1.0, 2.0]]
    assert not any(p.requires_grad for p in updater.module.parameters())


def test_ema_momentum_schedules():
    assert ema_momentum(0, 100, 0.99) == 0.99
    assert ema_momentum(73, 100, 0.99) == 0.99
    assert ema_momentum(0, 100, 0.99, 0.999, "cosine") == pytest.approx(0.99)
    assert ema_momentum(50, 100, 0.99, 0.999, "cosine") == pytest.approx(0.9945)
    assert ema_momentum(100, 100, 0.99, 0.999, "cosine") == pytest.approx(0.999)
    assert ema_momentum(500, 100, 0.99, 0.999, "cosine") == pytest.approx(0.999)
    assert ema_momentum(100, 100, 0.996, schedule="cosine") == pytest.approx(1.0)  # BYOL
    quarter = 1.0 - 0.004 * (math.cos(math.pi / 4) + 1) / 2
    assert ema_momentum(25, 100, 0.996, schedule="cosine") == pytest.approx(quarter)
    with pytest.raises(ValueError, match="ema_schedule='linear'"):
        ema_momentum(0, 10, 0.9, schedule="linear")
    with pytest.raises(ValueError, match="ema_final=1.5"):
        ema_momentum(0, 10, 0.9, 1.5, schedule="cosine")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": -1.0}, r"method\.distill\.alpha=-1\.0 must be >= 0"),
        ({"beta": -0.5}, r"method\.distill\.beta=-0\.5 must be >= 0"),
        ({"temperature": 0.0}, r"method\.distill\.temperature=0\.0 must be > 0"),
        ({"temperature": float("nan")}, r"method\.distill\.temperature=nan must be > 0"),
        ({"momentum": 1.0}, r"method\.distill\.ema_momentum=1\.0 must satisfy 0 <= momentum < 1"),
        ({"momentum": -0.1}, r"method\.distill\.ema_momentum=-0\.1 must satisfy"),
    ],
)
def test_check_distill_options_names_the_bad_option(options, message):
    good = {"alpha": 1.0, "beta": 0.5, "temperature": 4.0, "momentum": 0.999}
    check_distill_options(**good)
    with pytest.raises(ValueError, match=message):
        check_distill_options(**{**good, **options})
