"""Loss functions and EMA helpers for self-knowledge distillation (pure torch, no Lightning).

Every distillation term in dwskd goes through :func:`kd_loss`, so there is exactly one
place where the KL direction, the temperature scaling and the batch reduction are
decided. The Lightning module only sums and logs the named terms returned by
:func:`skd_losses` (the mdistiller pattern: a dict of named losses, the loop sums them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

MOMENTUM_SCHEDULES = ("constant", "cosine")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD loss ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Convention (the same as timm's ``DistillationTeacher`` task and torchdistill's
    ``KDLoss``): KL is summed over classes and averaged over the batch (``batchmean``),
    then multiplied by ``T²`` so that the gradient scale does not shrink as T grows.
    The teacher side is detached: gradients only ever reach the student.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def _partner_logits(logits: Sequence[Tensor], i: int) -> Tensor:
    """Mean logits of every student except ``i``: the peer teacher of student ``i`` (stop-grad)."""
    others = [z.detach() for j, z in enumerate(logits) if j != i]
    return torch.stack(others).mean(dim=0)


def skd_losses(
    logits: Sequence[Tensor],
    targets: Tensor | None,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    ema_logits: Sequence[Tensor] | None = None,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> list[dict[str, Tensor]]:
    """Named loss terms of each student: ``total = ce + alpha·partner_kd + beta·ema_kd``.

    One dict per student. A term is present only when it applies, so logs never show
    fake zeros: ``ce`` when ``targets`` is given (label-free SKD passes ``None``),
    ``partner_kd`` when there are 2+ students (KD from the mean of the others' logits),
    ``ema_kd`` when ``ema_logits`` is given and ``beta > 0`` (KD from ``ema_logits[i]``).
    """
    if ema_logits is not None and len(ema_logits) != len(logits):
        raise ValueError(
            f"skd_losses got {len(logits)} student logits but {len(ema_logits)} EMA logits; "
            "pass one EMA output per student (or ema_logits=None)."
        )
    use_ema = ema_logits is not None and beta > 0
    if targets is None and len(logits) < 2 and not use_ema:
        raise ValueError(
            "Nothing to train: label-free SKD (no targets) needs a partner student or an EMA "
            "teacher with method.beta > 0."
        )
    losses = []
    for i, z in enumerate(logits):
        terms: dict[str, Tensor] = {}
        if targets is not None:
            terms["ce"] = F.cross_entropy(
                z, targets, weight=class_weights, label_smoothing=label_smoothing
            )
        if len(logits) > 1:
            terms["partner_kd"] = kd_loss(z, _partner_logits(logits, i), temperature)
        if use_ema:
            terms["ema_kd"] = kd_loss(z, ema_logits[i], temperature)
        weights = {"ce": 1.0, "partner_kd": alpha, "ema_kd": beta}
        terms["total"] = sum(weights[name] * value for name, value in terms.items())
        losses.append(terms)
    return losses


@torch.no_grad()
def ema_momentum(
    step: int,
    total_steps: int | float,
    base: float,
    final: float | None = None,
    schedule: str = "constant",
) -> float:
    """EMA momentum at ``step``: ``constant`` (= base) or ``cosine`` from base to final.

    The cosine ramp is BYOL's / DINO's ``final - (final - base)·(cos(π·t) + 1)/2`` with
    ``t = step / total_steps`` clipped to [0, 1]; ``final`` defaults to 1.0 as in BYOL,
    so the auxiliary teacher freezes gradually towards the end of training.
    """
    if schedule == "constant":
        return float(base)
    if schedule != "cosine":
        raise ValueError(
            f"method.distill.ema_schedule={schedule!r} is unknown; "
            f"choose one of {MOMENTUM_SCHEDULES}."
        )
    final = 1.0 if final is None else final
    if not 0 <= final <= 1:
        raise ValueError(f"method.distill.ema_final={final} must be in [0, 1] (null means 1.0).")
    progress = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    return float(final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0)


def check_distill_options(
    alpha: float,
    beta: float,
    temperature: float,
    momentum: float,
    *,
    prefix: str = "method.distill.",
) -> None:
    """Reject distillation options that would silently train nonsense (NaN fails too)."""
    if not alpha >= 0:
        raise ValueError(f"{prefix}alpha={alpha} must be >= 0 (weight of the partner KD term).")
    if not beta >= 0:
        raise ValueError(f"{prefix}beta={beta} must be >= 0 (weight of the EMA-teacher KD term).")
    if not temperature > 0:
        raise ValueError(f"{prefix}temperature={temperature} must be > 0 (try 1 to 8).")
    if not 0 <= momentum < 1:
        raise ValueError(
            f"{prefix}ema_momentum={momentum} must satisfy 0 <= momentum < 1 (e.g. 0.999); "
            "1 would freeze the EMA teacher at its initial weights."
        )


EMA_TARGETS = ("self", "ensemble")


@dataclass(frozen=True)
class DistillOptions:
    """The ``method.distill`` block as one typed, validated object (checked when built).

    ``alpha``: partner KD weight; ``beta``: EMA-teacher KD weight; ``gamma``: KD from the
    frozen large teacher; ``labels=False``: label-free SKD (needs two augmented views).
    """

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    temperature: float = 4.0
    label_smoothing: float = 0.0
    labels: bool = True
    ema_momentum: float = 0.99
    ema_final: float | None = None
    ema_schedule: str = "constant"
    ema_target: str = "self"

    def __post_init__(self) -> None:
        check_distill_options(self.alpha, self.beta, self.temperature, self.ema_momentum)
        if not self.gamma >= 0:
            raise ValueError(f"method.distill.gamma={self.gamma} must be >= 0 (teacher KD weight).")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(
                f"method.distill.label_smoothing={self.label_smoothing} must be in [0, 1)."
            )
        if self.ema_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(
                f"method.distill.ema_schedule={self.ema_schedule!r} is unknown; "
                f"choose one of {MOMENTUM_SCHEDULES}."
            )
        if self.ema_target not in EMA_TARGETS:
            raise ValueError(
                f"method.distill.ema_target={self.ema_target!r} is unknown; choose one of "
                f"{EMA_TARGETS}."
            )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> DistillOptions:
        """Build from a config mapping; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"method.distill has unknown option(s) {unknown}; known: {sorted(known)}."
            )
        return cls(**options)

    def cross_entropy_only(self) -> DistillOptions:
        """The same options with every KD term off: plain CE training (teacher, fine-tune)."""
        return replace(self, alpha=0.0, beta=0.0, gamma=0.0, labels=True)
