"""Lightning plumbing of a stage: trainer, callbacks and loggers from config, fit with resume, predict.

Trainer, callbacks and loggers are instantiated from their config groups once at the top, as
partials (:class:`LightningFactories`); each stage calls them for fresh objects. While a stage
runs, its ``checkpoints/`` hold ``last.ckpt`` (full state, for resume) and ``best.ckpt``
(the monitored best); :mod:`dwskd.rundir` exports the best weights and deletes both afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig
from torch import nn

from dwskd import loggers as stage_logging
from dwskd.io import atomic_write
from dwskd.metrics import classification_metrics, flatten_metrics
from dwskd.rundir import RunDirectory

log = logging.getLogger(__name__)

MONITORABLE = ("acc", "balanced_acc", "f1_macro", "auroc")


class ResumeError(ValueError):
    """A checkpoint that does not belong to the stage it would resume."""


@dataclass(frozen=True)
class Monitor:
    """The validation metric that picks the best epoch and (``method.deploy=best``) the student."""

    key: str = "val/acc"
    mode: str = "max"

    def __post_init__(self) -> None:
        split, _, metric = self.key.partition("/")
        if split != "val" or metric not in MONITORABLE or self.mode not in ("max", "min"):
            raise ValueError(
                f"callbacks.model_checkpoint.monitor={self.key} (mode {self.mode}) is not "
                f"supported: use val/<metric> with metric in {MONITORABLE} and mode max."
            )

    @property
    def metric(self) -> str:
        return self.key.partition("/")[2]

    def best(self, scores: Mapping[str, float]) -> str:
        pick = max if self.mode == "max" else min
        return pick(scores, key=scores.get)


@dataclass
class LightningFactories:
    """The Lightning objects of a run, as partials built once from the config groups."""

    trainer: Callable[..., L.Trainer]
    callbacks: dict[str, Callable[..., Callback]]
    loggers: stage_logging.RunLoggers
    monitor: Monitor
    progress_bar: bool = True


def build_factories(cfg: DictConfig, names: stage_logging.RunNames) -> LightningFactories:
    """Instantiate ``trainer``, ``callbacks`` and ``logger`` groups as partials (template style);
    ``names`` are how trackers (W&B) show the run."""
    trainer_cfg = {k: v for k, v in cfg.trainer.items() if k != "max_epochs"}
    callbacks = {
        name: instantiate(c, _partial_=True)
        for name, c in (cfg.get("callbacks") or {}).items()
        if c is not None and "_target_" in c
    }
    logger_cfg = cfg.get("logger") or {}
    if "_target_" in logger_cfg:  # one logger (logger=csv|wandb|tensorboard)
        logger_cfg = {"logger": logger_cfg}
    loggers = {
        name: instantiate(c, _partial_=True)
        for name, c in logger_cfg.items()
        if c is not None and "_target_" in c
    }
    checkpoint = cfg.callbacks.model_checkpoint
    return LightningFactories(
        trainer=instantiate(trainer_cfg, _partial_=True),
        callbacks=callbacks,
        loggers=stage_logging.RunLoggers(loggers, names),
        monitor=Monitor(checkpoint.monitor, checkpoint.mode),
        progress_bar=bool(cfg.trainer.get("enable_progress_bar", True)),
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes every ``.ckpt`` under a temporary name, then renames: no truncated checkpoints."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class StepSeed(Callback):
    """Seeds torch from (stage seed, global step) before every step: dropout and other
    randomness inside a step is then the same in a resumed stage as in an uninterrupted one."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        torch.manual_seed(self.seed * 1_000_003 + trainer.global_step)


class FlushLoggers(Callback):
    """Write buffered log rows at each checkpoint and epoch start, so a SIGKILL loses no row
    of an epoch that a checkpoint already covers (Lightning flushes every 100 steps only)."""

    def _flush(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.save()

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        self._flush(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._flush(trainer)


class ValCurve(Callback):
    """Each student's monitored validation metric after every epoch, kept in the checkpoints.

    Why: convergence (how many epochs a method needs to reach a baseline's score) is read from
    these curves, and a resumed stage must still have the epochs it ran before the kill.
    Recorded at ``on_validation_end``, before ``ModelCheckpoint`` (always last) saves.
    """

    def __init__(self) -> None:
        self.curve: dict[str, list[float]] = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name in pl_module.names:  # a DistillModule: its students and monitored metric
            value = trainer.callback_metrics.get(f"val/{name}/{pl_module.monitor_metric}")
            if value is not None:
                points = self.curve.setdefault(name, [])
                del points[trainer.current_epoch :]  # a re-validated epoch replaces its value
                points.append(round(float(value), 6))

    def state_dict(self) -> dict[str, Any]:
        return {"curve": self.curve}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = {k: list(v) for k, v in state_dict.get("curve", {}).items()}


def stage_callbacks(factories: LightningFactories, ckpt_dir: Path, seed: int, logged: bool):
    """Fresh callbacks for one stage; checkpoints go to the stage's own folder."""
    callbacks: list[Callback] = [StepSeed(seed), FlushLoggers(), ValCurve()]
    for factory in factories.callbacks.values():
        cls = getattr(factory, "func", None)
        if isinstance(cls, type) and issubclass(cls, ModelCheckpoint):
            callbacks.append(factory(dirpath=str(ckpt_dir)))
        elif isinstance(cls, type) and issubclass(cls, ProgressBar) and not factories.progress_bar:
            continue
        elif isinstance(cls, type) and issubclass(cls, LearningRateMonitor) and not logged:
            continue
        else:
            callbacks.append(factory())
    return callbacks


def check_checkpoint(
    path: Path, stage: str, module: L.LightningModule, option: str
) -> tuple[int, int]:
    """Refuse a checkpoint of another stage or of other models, naming ``option`` and both;
    else return its (epoch, global step). Read once, without running code from it."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = ckpt.get("dwskd") or {}
    if meta.get("stage") not in (None, stage):
        raise ResumeError(
            f"{option}={path} is a checkpoint of the '{meta['stage']}' stage, but the stage to "
            f"resume is '{stage}'. Give a .ckpt from stages/{stage}/checkpoints/ or drop {option}."
        )
    own = module.state_dict()
    theirs = ckpt.get("state_dict", {})
    wrong = [k for k in own if k in theirs and theirs[k].shape != own[k].shape]
    missing = [k for k in own if k not in theirs and not k.startswith("teacher.")]
    if wrong or missing:
        raise ResumeError(
            f"{option}={path} does not fit the '{stage}' stage's models: {len(missing)} missing "
            f"keys (e.g. {missing[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]}). "
            "Was it written by a run with another model/method/data? Drop the option or fix it."
        )
    return int(ckpt.get("epoch", 0)), int(ckpt.get("global_step", 0))


def fit_stage(
    factories: LightningFactories,
    run_dir: RunDirectory,
    stage: str,
    module: L.LightningModule,
    datamodule: Any,
    epochs: int,
    seed: int,
    explicit_ckpt: str | None = None,
) -> dict[str, Any]:
    """Fit ``module`` for one stage (resuming when a checkpoint exists); keep its best weights."""
    layout = run_dir.layout
    ckpt = Path(explicit_ckpt) if explicit_ckpt else layout.last_checkpoint(stage)
    resume = ckpt if ckpt.is_file() else None
    keep_until = None
    if explicit_ckpt and resume is None:
        raise FileNotFoundError(f"ckpt_path={ckpt} does not exist; give a Lightning .ckpt file.")
    if resume is not None:
        option = "ckpt_path" if explicit_ckpt else "last.ckpt"
        epoch, step = check_checkpoint(resume, stage, module, option)
        keep_until = (epoch, step)
        run_dir.note_resume(stage, epoch + 1, step)
        log.info("stage %s: resuming from %s (epoch %d done)", stage, resume, epoch)
    loggers = factories.loggers.for_stage(layout.root, stage, keep_until)
    callbacks = stage_callbacks(factories, layout.checkpoint_dir(stage), seed, bool(loggers))
    trainer = factories.trainer(
        max_epochs=epochs,
        default_root_dir=str(layout.stage_dir(stage)),
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    curve = next(c.curve for c in callbacks if isinstance(c, ValCurve))
    return {**restore_best(trainer, module), "val_curve": curve}


def restore_best(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """Load the best checkpoint's weights into ``module``; say which epoch that was."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    facts: dict[str, Any] = {"epochs_trained": int(trainer.current_epoch)}
    if best and os.path.isfile(best):
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"])
        facts["best_epoch"] = int(ckpt.get("epoch", -1))
        score = trainer.checkpoint_callback.best_model_score
        facts["best_score"] = None if score is None else float(score)
    return facts


@dataclass
class Evaluation:
    """Predictions of every model on one split and their metrics (flat, no prefix)."""

    probs: dict[str, torch.Tensor]
    targets: torch.Tensor
    metrics: dict[str, dict[str, Any]]


def evaluate(
    factories: LightningFactories, module: L.LightningModule, loader: Any, class_names: list[str]
) -> Evaluation:
    """Predict ``loader`` in one process (exact, even after DDP training) and score each model."""
    trainer = factories.trainer(
        devices=1,
        num_nodes=1,
        strategy="auto",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = trainer.predict(module, dataloaders=loader)
    targets = torch.cat([b["targets"] for b in batches])
    probs = {name: torch.cat([b["probs"][name] for b in batches]) for name in batches[0]["probs"]}
    metrics = {}
    for name, p in probs.items():
        collection = classification_metrics(len(class_names))
        collection.update(p, targets)
        metrics[name] = flatten_metrics(collection.compute(), class_names)
    return Evaluation(probs, targets, metrics)


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
