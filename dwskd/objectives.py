"""Methods as objectives: what one training step optimises, as named loss terms.

The pattern of mdistiller's ``Distiller.forward_train`` and timm's ``task/distillation.py``:
an :class:`Objective` maps the models (students, their EMA copies, the frozen teacher), the
batch views and the targets to the students' logits and, per student, a dict of **named,
unweighted** loss terms (``ce``, ``partner_kd``, ``ema_kd``, ``teacher_kd``). It also says how
much each term weighs (:attr:`Objective.weights`, from ``method.distill``); the LightningModule
only sums ``weight · term`` and logs every term. The loss math itself stays in the pure
functions of :mod:`dwskd.distill`; an objective decides which terms a method has.

``conf/method/<name>.yaml`` names its objective (``objective: {_target_: ...}``), so adding a
method is one class here, one YAML and one test (README, "Development").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dwskd import distill
from dwskd.distill import DistillOptions

WEIGHT_OPTIONS = ("alpha", "beta", "gamma")  # the method.distill weights of the KD terms


@dataclass(frozen=True)
class Models:
    """What an objective may use. ``students`` compute logits (eager or compiled); the EMA
    copies and the teacher are frozen (eval mode, no gradient) or ``None`` when unused."""

    students: Sequence[Callable[[Tensor], Tensor]]
    ema: Sequence[nn.Module] | None = None
    teacher: nn.Module | None = None


@dataclass
class StepOutput:
    """The students' logits and, one dict per student, its named unweighted loss terms.

    Metrics (accuracy) are not loss terms: the module computes them from ``logits``.
    """

    logits: list[Tensor]
    losses: list[dict[str, Tensor]]


class Objective:
    """A method's training loss. Subclasses declare their terms and compute them.

    ``term_weights`` maps each term to the ``method.distill`` option that weighs it (``None``:
    weight 1). A non-zero weight of a term the objective does not have is refused when it is
    built, naming the option: a knob that silently does nothing would waste a sweep.
    ``label_free`` objectives accept ``labels=false`` (their KD terms need no labels);
    ``min_students`` is how many students the objective needs to mean what it says.
    """

    term_weights: ClassVar[Mapping[str, str | None]] = {"ce": None}
    label_free: ClassVar[bool] = False
    min_students: ClassVar[int] = 1

    def __init__(self, options: DistillOptions) -> None:
        self.options = options
        name = type(self).__name__
        used = {option for option in self.term_weights.values() if option is not None}
        for option in WEIGHT_OPTIONS:
            value = getattr(options, option)
            if option not in used and value != 0:
                raise ValueError(
                    f"method.distill.{option}={value} has no effect with the {name} objective "
                    f"(its terms: {', '.join(self.term_weights)}); set it to 0 or choose a "
                    "method whose objective has that term."
                )
        if not options.labels and not self.label_free:
            raise ValueError(
                f"method.distill.labels=false: the {name} objective needs the labels "
                "(label-free training is SelfKD's / Mutual's, method=dwskd or dml)."
            )

    @property
    def weights(self) -> dict[str, float]:
        """Each term's weight in a student's total loss."""
        return {
            term: 1.0 if option is None else float(getattr(self.options, option))
            for term, option in self.term_weights.items()
        }

    @property
    def uses_ema(self) -> bool:
        """Whether EMA copies of the students must exist (and be updated after every step)."""
        return self.weights.get("ema_kd", 0.0) > 0

    @property
    def uses_teacher(self) -> bool:
        """Whether the frozen large teacher takes part in training."""
        return self.weights.get("teacher_kd", 0.0) > 0

    def __call__(
        self,
        models: Models,
        views: Sequence[Tensor],
        targets: Tensor,
        class_weights: Tensor | None = None,
    ) -> StepOutput:
        raise NotImplementedError

    def student_logits(self, models: Models, views: Sequence[Tensor]) -> list[Tensor]:
        """Student i sees view i (one view: all see the same batch)."""
        return [student(v) for student, v in zip(models.students, views, strict=True)]

    def cross_entropy(self, z: Tensor, targets: Tensor, class_weights: Tensor | None) -> Tensor:
        return F.cross_entropy(
            z, targets, weight=class_weights, label_smoothing=self.options.label_smoothing
        )


class CrossEntropy(Objective):
    """Plain CE per student: scratch, ws, the teacher, fine-tuning, evaluation modules."""

    def __call__(self, models, views, targets, class_weights=None) -> StepOutput:
        logits = self.student_logits(models, views)
        losses = [{"ce": self.cross_entropy(z, targets, class_weights)} for z in logits]
        return StepOutput(logits, losses)


class TeacherKD(CrossEntropy):
    """method=kd: CE + Hinton KD from the frozen large teacher (``gamma``).

    The teacher sees the first view. timm's distillation task re-normalises the input when
    teacher and student expect another mean/std; here both are built for the same data
    (channels, size, mean/std), so the batch is already the teacher's input.
    """

    term_weights = {"ce": None, "teacher_kd": "gamma"}

    def __call__(self, models, views, targets, class_weights=None) -> StepOutput:
        out = super().__call__(models, views, targets, class_weights)
        if self.uses_teacher:
            with torch.no_grad():
                teacher_logits = models.teacher(views[0])
            for terms, z in zip(out.losses, out.logits, strict=True):
                terms["teacher_kd"] = distill.kd_loss(z, teacher_logits, self.options.temperature)
        return out


class Mutual(Objective):
    """method=dml: CE + KD from the partner (the mean of the other students, stop-grad)."""

    term_weights = {"ce": None, "partner_kd": "alpha"}
    label_free = True
    min_students = 2

    def __call__(self, models, views, targets, class_weights=None) -> StepOutput:
        logits = self.student_logits(models, views)
        opts = self.options
        losses = distill.skd_losses(
            logits,
            targets if opts.labels else None,
            alpha=opts.alpha,
            beta=opts.beta,
            temperature=opts.temperature,
            ema_logits=self.ema_logits(models, views),
            class_weights=class_weights,
            label_smoothing=opts.label_smoothing,
        )
        # The total is the module's to form (Σ weight · term), the same sum in the same order.
        return StepOutput(logits, [{k: v for k, v in t.items() if k != "total"} for t in losses])

    def ema_logits(self, models: Models, views: Sequence[Tensor]) -> list[Tensor] | None:
        return None


class SelfKD(Mutual):
    """method=dwskd: CE + partner KD + KD from the EMA auxiliary teacher (``beta``).

    The EMA teacher of student i looks at the partner's view (a consistency target across
    augmentations; with one view it is the same batch). ``ema_target=ensemble``: every
    student learns from the mean of all EMA outputs. One student is allowed (CE + EMA KD).
    """

    term_weights = {"ce": None, "partner_kd": "alpha", "ema_kd": "beta"}
    min_students = 1

    def ema_logits(self, models: Models, views: Sequence[Tensor]) -> list[Tensor] | None:
        if not self.uses_ema:
            return None
        with torch.no_grad():
            other = [views[(i + 1) % len(views)] for i in range(len(views))]
            logits = [ema(v) for ema, v in zip(models.ema, other, strict=True)]
        if self.options.ema_target == "ensemble":
            mean = torch.stack(logits).mean(0)
            return [mean] * len(logits)
        return logits


class EmaKD(Objective):
    """method=ema_only: one student, CE + KD from its own EMA (dwskd without the partner).

    The worked example of README "Development": a method is one class like this one.
    """

    term_weights = {"ce": None, "ema_kd": "beta"}  # None: weight 1; needs EMA copies (beta > 0)

    def __call__(self, models, views, targets, class_weights=None) -> StepOutput:
        logits = self.student_logits(models, views)
        losses = [{"ce": self.cross_entropy(z, targets, class_weights)} for z in logits]
        if self.uses_ema:
            with torch.no_grad():
                ema = [e(v) for e, v in zip(models.ema, views, strict=True)]
            for terms, z, target in zip(losses, logits, ema, strict=True):
                terms["ema_kd"] = distill.kd_loss(z, target, self.options.temperature)
        return StepOutput(logits, losses)


def from_config(objective: Mapping[str, Any], options: DistillOptions) -> Objective:
    """Build ``method.objective`` (``_target_`` plus any knobs of its own) with the options.

    Why a partial: Hydra would turn the ``DistillOptions`` instance into a config node if it
    were passed to ``instantiate`` directly; the class must receive the validated object.
    """
    from hydra.utils import instantiate  # noqa: PLC0415 - Hydra only where configs are read

    target = objective.get("_target_") if isinstance(objective, Mapping) else None
    if not target:
        raise ValueError(
            "method.objective must name its class, e.g. {_target_: dwskd.objectives.SelfKD}"
        )
    built = instantiate(objective, _partial_=True)(options)
    if not isinstance(built, Objective):
        raise ValueError(f"method.objective._target_={target} is not a dwskd.objectives.Objective")
    return built


def implied_by(options: DistillOptions) -> Objective:
    """The objective that plain ``DistillOptions`` describe (benchmarks and tests built modules
    from options alone): teacher KD if ``gamma``, else SKD if ``alpha``/``beta``, else CE."""
    if options.gamma > 0:
        return TeacherKD(options)
    if options.alpha > 0 or options.beta > 0 or not options.labels:
        return SelfKD(options)
    return CrossEntropy(options)
