"""The LightningModule: one or two students, their EMA teachers, a frozen teacher; one objective.

Every method is this module with another :class:`~dwskd.objectives.Objective` (CE, mutual
learning, SKD + EMA, teacher KD): the objective computes the named loss terms, the module
sums ``weight · term`` per student, logs each term and the metrics, updates the EMA copies and
evaluates. Loss math lives in :mod:`dwskd.distill`, which terms a method has in
:mod:`dwskd.objectives`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from timm.utils import ModelEmaV3
from torch import nn

from dwskd import distill, objectives
from dwskd.distill import DistillOptions
from dwskd.metrics import classification_metrics, flatten_metrics, scalar_only

STUDENT_NAMES = ("student_a", "student_b")  # the default names of a module's models
# The EMA copies and the frozen teacher are in eval mode on purpose (see DistillModule.train).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def ema_of(student: nn.Module) -> ModelEmaV3:
    """timm's EMA of a student: parameters ``lerp`` towards the student, buffers copied.

    ``exclude_buffers=True`` copies buffers (BN statistics) instead of averaging them, as an
    EMA teacher should; the momentum is set before each update (it follows dwskd's schedule,
    :func:`dwskd.distill.ema_momentum`, not timm's warm-up).
    """
    ema = ModelEmaV3(student, exclude_buffers=True, stochastic_rounding=False)
    ema.module.requires_grad_(False)
    # Its RNG serves bfloat16 stochastic rounding only (off: a plain lerp, as dwskd always did).
    # Dropped so that ddp_spawn can pickle the module: two Generators' temporary states in one
    # pickle can reuse one shared-memory fd ("bad value(s) in fds_to_keep").
    ema._sr_generator = None
    return ema


class DistillModule(L.LightningModule):
    """Trains ``students`` on ``objective``; logs each loss term per student; validates each and
    their ensemble.

    ``stage`` names the stage in checkpoints and ``lr`` is its learning rate (both from the
    pipeline's ``StageSpec``); a module built only to evaluate has neither. ``options`` alone
    (benchmarks, tests) stands for the objective those options imply
    (:func:`dwskd.objectives.implied_by`).

    The EMA copies and the frozen teacher have ``requires_grad=False``: they are never in the
    optimiser, DDP does not all-reduce them, and because every rank applies the same EMA update
    to identical (synchronised) student weights, the EMA stays identical across ranks.
    ``monitor`` (metric, mode) names what checkpointing watches: ``val/<metric>`` is logged as
    the best single student's value (what can be deployed). Final evaluation goes through
    ``predict_step``, whose outputs Lightning returns to the caller.
    ``compile_students`` (``model.compile``) runs each student through ``torch.compile``
    (see :meth:`configure_model`); the students, their EMA copies and the state dict stay as
    they are.
    """

    def __init__(
        self,
        students: Sequence[nn.Module],
        *,
        class_names: Sequence[str],
        objective: objectives.Objective | None = None,
        options: DistillOptions | None = None,
        stage: str | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.01,
        teacher: nn.Module | None = None,
        class_weights: torch.Tensor | None = None,
        monitor: tuple[str, str] = ("acc", "max"),
        compile_students: bool = False,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if objective is None:
            objective = objectives.implied_by(options or DistillOptions().cross_entropy_only())
        self.stage, self.objective = stage, objective
        self.students = nn.ModuleList(students)
        # dwskd's one naming scheme (student_a, student_b, teacher): logged keys, val curves
        self.names = list(names or STUDENT_NAMES[: len(students)])
        if len(self.names) != len(students):
            raise ValueError(f"{len(students)} model(s) need as many names, got {self.names}")
        self.use_ema = objective.uses_ema
        # The averaged copies are submodules (``ema.<i>.*`` in checkpoints); timm's updaters
        # that hold them stay in a plain list, so their wrapper adds no ``module.`` to keys.
        self._ema_updaters = [ema_of(s) for s in students] if self.use_ema else []
        self.ema = nn.ModuleList(u.module for u in self._ema_updaters) if self.use_ema else None
        if objective.uses_teacher and teacher is None:
            raise ValueError(
                f"The {type(objective).__name__} objective (method.distill.gamma > 0, KD from the "
                "teacher) needs a teacher model"
            )
        self.teacher = _frozen_copy(teacher) if objective.uses_teacher else None
        self.class_names = list(class_names)
        self.optimizer_factory, self.lr = optimizer, lr
        self.warmup_fraction, self.min_lr_ratio = warmup_fraction, min_lr_ratio
        self.monitor_metric, self.monitor_mode = monitor
        self.register_buffer("class_weights", class_weights, persistent=False)
        eval_names = self.names + (["ensemble"] if len(students) > 1 else [])
        self.val_metrics = nn.ModuleDict(
            {n: classification_metrics(len(self.class_names)) for n in eval_names}
        )
        self.compile_students = compile_students
        self._compiled: list[nn.Module] = []  # a plain list: not submodules, not in state_dict

    def configure_model(self) -> None:
        """Wrap each student in ``torch.compile`` once, when a trainer first uses this module.

        ``torch.compile(student)`` returns a wrapper around the same module (same parameters,
        so the optimiser, EMA update and device moves act on it); kept in a plain list, it adds
        no ``_orig_mod.`` keys to checkpoints or exports, and the student objects handed back to
        the pipeline stay eager, so later stages, latency figures and copies are unaffected.
        """
        if self.compile_students and not self._compiled:
            self._compiled = [torch.compile(s) for s in self.students]

    def _forwards(self) -> Sequence[nn.Module]:
        """What computes the students' logits: the compiled wrappers if any, else the students."""
        return self._compiled or self.students

    # ----------------------------------------------------------------- training
    def train(self, mode: bool = True) -> DistillModule:
        """Keep the EMA copies and the frozen teacher in eval mode (no dropout, fixed BN stats)."""
        super().train(mode)
        for frozen in (self.ema, self.teacher):
            if frozen is not None:
                frozen.eval()
        return self

    def _views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Student i sees view i (two-view batches: x is B×2×C×H×W); else all see x."""
        if x.dim() == 5:
            return [x[:, i % x.shape[1]] for i in range(len(self.students))]
        return [x] * len(self.students)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        """The objective's terms, summed per student (``Σ weight · term``) and over students.

        Logged per student: every term, ``total`` and ``acc`` (a metric, never a loss term).
        """
        x, y = batch
        models = objectives.Models(self._forwards(), self.ema, self.teacher)
        out = self.objective(models, self._views(x), y, self.class_weights)
        weights = self.objective.weights
        log: dict[str, torch.Tensor] = {}
        totals = []
        for name, terms, z in zip(self.names, out.losses, out.logits, strict=True):
            total = sum(weights[term] * value for term, value in terms.items())
            totals.append(total)
            log.update({f"train/{name}/{term}": v.detach() for term, v in terms.items()})
            log[f"train/{name}/total"] = total.detach()
            log[f"train/{name}/acc"] = (z.argmax(1) == y).float().mean()
        self.log_dict(log, on_step=True, on_epoch=True, batch_size=y.shape[0])
        total = sum(totals)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=y.shape[0])
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.use_ema:
            return
        opts = self.objective.options
        momentum = distill.ema_momentum(
            self.global_step, self.total_steps, opts.ema_momentum, opts.ema_final, opts.ema_schedule
        )
        for updater, student in zip(self._ema_updaters, self.students, strict=True):
            updater.decay = momentum
            updater.update(student)

    # --------------------------------------------------------------- evaluation
    def predict_probs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax outputs of each student and (with two or more) of their mean: the ensemble."""
        probs = {n: s(x).softmax(1) for n, s in zip(self.names, self._forwards(), strict=True)}
        if len(self.names) > 1:
            probs["ensemble"] = torch.stack([probs[n] for n in self.names]).mean(0)
        return probs

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for name, p in self.predict_probs(x).items():
            self.val_metrics[name].update(p, y)
            loss = nn.functional.nll_loss(torch.log(p + 1e-8), y)
            self.log(f"val/{name}/loss", loss, batch_size=y.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        scores = {}
        for name, metrics in self.val_metrics.items():
            flat = scalar_only(flatten_metrics(metrics.compute(), self.class_names, f"val/{name}/"))
            scores[name] = flat[f"val/{name}/{self.monitor_metric}"]
            self.log_dict(flat)
            metrics.reset()
        # The checkpoint monitor: the best single student (what can be deployed).
        pick = max if self.monitor_mode == "max" else min
        self.log(f"val/{self.monitor_metric}", pick(scores[n] for n in self.names), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        for metrics in self.val_metrics.values():
            metrics.reset()

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict:
        """Probabilities of every model (and the ensemble) with the targets: one eval batch."""
        x, y = batch
        probs = {name: p.detach().cpu() for name, p in self.predict_probs(x).items()}
        return {"probs": probs, "targets": y.detach().cpu()}

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Name the stage and models in every .ckpt so a resume can check it belongs here."""
        checkpoint["dwskd"] = {
            "stage": self.stage,
            "models": list(self.names),
            "objective": type(self.objective).__name__,
        }
        if self.teacher is not None:  # the frozen teacher has its own export: not copied again
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.teacher is not None:
            state = checkpoint["state_dict"]
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None or self.lr is None:
            raise RuntimeError("This DistillModule was built to evaluate: it has no optimizer/lr")
        params = [p for p in self.students.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params, lr=self.lr)
        # Stored once: the LR schedule and the EMA momentum schedule share the step count.
        self.total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.total_steps * self.warmup_fraction)
        scheduler = warmup_cosine(optimizer, self.total_steps, warmup, self.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR: linear warm-up to the base LR, then cosine decay to ``min_ratio`` of it.

    torch's own schedulers (``LinearLR`` then ``CosineAnnealingLR``, chained by
    ``SequentialLR``); step ``s`` of the warm-up gets ``(s + 1) / warmup_steps`` of the LR.
    timm's ``CosineLRScheduler`` would start its warm-up from another point (up to 16 % lower
    LRs in the warm-up steps) and needs a hand-written Lightning step hook.
    """
    decay_steps = max(total_steps - warmup_steps, 1)
    base = optimizer.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=decay_steps, eta_min=base * min_ratio
    )
    if warmup_steps <= 0:
        return cosine
    warm = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1
    )
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, [warm, cosine], milestones=[warmup_steps]
    )
