"""Trainer, logger and checkpoint plumbing shared by every stage.

A stage owns ``<run dir>/stages/<name>/``: Lightning checkpoints (best on ``val/acc`` and
last), the exported weights of each model (``<model>.safetensors``) and ``done.json``. A stage
with ``done.json`` is finished and is skipped when the same command runs again in the same
directory; a stage with only ``checkpoints/last.ckpt`` resumes from it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
# The trainer settings that still apply to a one-process evaluation (no devices/strategy/DDP).
_EVAL_TRAINER_KEYS = (
    "accelerator",
    "precision",
    "limit_val_batches",
    "limit_test_batches",
    "deterministic",
)


def stage_dir(out_dir: Path, stage: str) -> Path:
    return Path(out_dir) / "stages" / stage


def read_done(out_dir: Path, stage: str) -> dict[str, Any] | None:
    """The record of a finished stage, or None when the stage still has to run."""
    path = stage_dir(out_dir, stage) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_done(out_dir: Path, stage: str, record: Mapping[str, Any]) -> None:
    path = stage_dir(out_dir, stage) / DONE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(record), indent=2))


def save_weights(model: nn.Module, path: Path) -> None:
    """Plain timm state dict as safetensors: loadable with ``teacher.source=file`` elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def make_logger(cfg: DictConfig, out_dir: Path, stage: str) -> Any:
    """One logger per stage (CSV/TensorBoard version = stage; one W&B run per stage, grouped)."""
    if cfg.get("logger") is None:
        return False
    target = str(cfg.logger._target_)
    if target.endswith("WandbLogger"):
        logger = instantiate(
            cfg.logger,
            save_dir=str(out_dir),
            name=f"{cfg.logger.name}-{stage}",
            job_type=stage,
            group=cfg.logger.get("group") or wandb_group(cfg),
        )
    else:
        logger = instantiate(cfg.logger, save_dir=str(out_dir), version=stage)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def wandb_group(cfg: DictConfig) -> str:
    """Runs of one multirun sweep share a group (the sweep folder); single runs: data-method."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return f"{cfg.data.name}-{cfg.method.name}"


def log_report(cfg: DictConfig, out_dir: Path, results: dict, paths: Mapping[str, Path]) -> None:
    """Send the test metrics and the report's plots to the logger as one more "test" run."""
    logger = make_logger(cfg, out_dir, "test")
    if not logger:
        return
    flat = {
        f"test/{name}/{key}": value
        for name, entry in results["models"].items()
        for key, value in entry["test"].items()
        if isinstance(value, int | float)
    }
    logger.log_metrics(flat)
    if hasattr(logger, "log_image"):
        for key, path in paths.items():
            if str(path).endswith(".png"):
                logger.log_image(key=f"plots/{key}", images=[str(path)])
    logger.finalize("success")
    finish_loggers()


def finish_loggers() -> None:
    """Close a W&B run even after a crash, so the next job of a multirun starts cleanly."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("max_epochs", None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return kwargs


def stage_epochs(cfg: DictConfig, stage: str) -> int:
    """``trainer.max_epochs`` (when set) overrides every stage's ``method.epochs.<stage>``."""
    if cfg.trainer.get("max_epochs") is not None:
        return int(cfg.trainer.max_epochs)
    return int(cfg.method.epochs[stage])


def build_trainer(cfg: DictConfig, out_dir: Path, stage: str, epochs: int) -> L.Trainer:
    ckpt_dir = stage_dir(out_dir, stage) / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-{epoch:02d}",
        monitor="val/acc",
        mode="max",
        save_top_k=1,
        save_last=True,
    )
    callbacks: list[Any] = [checkpoint]
    logger = make_logger(cfg, out_dir, stage)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RichProgressBar(leave=True))
    return L.Trainer(
        max_epochs=epochs,
        default_root_dir=str(stage_dir(out_dir, stage)),
        logger=logger,
        callbacks=callbacks,
        **trainer_kwargs(cfg),
    )


def resume_path(explicit: str | None, out_dir: Path, stage: str) -> str | None:
    """Explicit ``ckpt_path`` first, else this stage's own ``last.ckpt`` from an interrupted run."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={path} does not exist; give a Lightning .ckpt file")
        return str(path)
    last = stage_dir(out_dir, stage) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def fit(
    cfg: DictConfig,
    out_dir: Path,
    stage: str,
    module: L.LightningModule,
    datamodule: Any,
    epochs: int,
    explicit_ckpt: str | None = None,
) -> None:
    """Fit ``module`` for one stage and restore its best-on-validation weights."""
    trainer = build_trainer(cfg, out_dir, stage, epochs)
    ckpt = resume_path(explicit_ckpt, out_dir, stage)
    if ckpt:
        log.info("stage %s: resuming from %s", stage, ckpt)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    finally:
        finish_loggers()
    best = trainer.checkpoint_callback.best_model_path
    if best:
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)


def evaluate(cfg: DictConfig, module: L.LightningModule, datamodule: Any, split: str) -> dict:
    """Validate or test in one process (exact metrics and predictions, even after DDP training)."""
    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=None,
        **{k: v for k, v in trainer_kwargs(cfg).items() if k in _EVAL_TRAINER_KEYS},
    )
    run = trainer.validate if split == "val" else trainer.test
    run(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
