"""Per-stage Lightning loggers built from the ``logger`` config group, and closing them safely.

The group holds partially-instantiated loggers (built once at the top); each stage calls them
with its own name: CSV/TensorBoard ``version=<stage>`` (``logs/<stage>/``), W&B one run per
stage (``job_type=<stage>``) grouped by sweep. dwskd's :class:`CSVLogger` is Lightning's, except
that a resumed stage keeps the rows written before the interruption.
"""

from __future__ import annotations

import csv
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

LoggerFactory = Callable[..., Logger]


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger; ``keep_until=(epoch, step)`` keeps the earlier rows on resume.

    Lightning deletes ``metrics.csv`` when a logger opens a non-empty folder. A stage resumed
    from a checkpoint taken after epoch ``e`` (global step ``s``) keeps every row of epochs
    ``<= e`` (rows without an epoch: steps ``< s``); the epoch being replayed is logged anew.
    """

    def __init__(self, *args: Any, keep_until: tuple[int, int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.keep_until = keep_until

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        kept, header = self._rows_to_keep(path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = super().experiment
        if kept:
            with path.open("w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(kept)
            writer.metrics_keys = list(header)
        return writer

    def _rows_to_keep(self, path: Path) -> tuple[list[dict[str, str]], list[str]]:
        if self.keep_until is None or not path.is_file():
            return [], []
        epoch, step = self.keep_until
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])

        def keep(row: Mapping[str, str]) -> bool:
            if row.get("epoch"):
                return int(float(row["epoch"])) <= epoch
            return bool(row.get("step")) and int(float(row["step"])) < step

        return [r for r in rows if keep(r)], header


def stage_loggers(
    factories: Mapping[str, LoggerFactory],
    save_dir: Path,
    stage: str,
    group: str,
    keep_until: tuple[int, int] | None = None,
) -> list[Logger]:
    """One fresh logger per configured kind, named for ``stage``."""
    loggers = []
    for factory in factories.values():
        cls = getattr(factory, "func", factory)
        if isinstance(cls, type) and issubclass(cls, WandbLogger):
            kw = factory.keywords if hasattr(factory, "keywords") else {}
            name = f"{kw.get('name') or 'dwskd'}-{stage}"
            group_name = kw.get("group") or group
            logger = factory(save_dir=str(save_dir), name=name, job_type=stage, group=group_name)
        elif isinstance(cls, type) and issubclass(cls, CSVLogger):
            logger = factory(save_dir=str(save_dir), version=stage, keep_until=keep_until)
        else:
            logger = factory(save_dir=str(save_dir), version=stage)
        loggers.append(logger)
    return loggers


def wandb_group(data_name: str, method_name: str) -> str:
    """Runs of one multirun sweep share a group (the sweep folder); single runs: data-method."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return f"{data_name}-{method_name}"


def finish_loggers() -> None:
    """Close a W&B run even after a crash, so the next job of a multirun starts cleanly."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def log_results(loggers: list[Logger], results: Mapping[str, Any], images: Mapping[str, Path]):
    """Send the test metrics and the report's plots to the loggers (one more "test" run)."""
    flat = {
        f"test/{name}/{key}": value
        for name, entry in results["models"].items()
        for key, value in entry["test"].items()
        if isinstance(value, int | float)
    }
    for logger in loggers:
        logger.log_metrics(flat)
        if hasattr(logger, "log_image"):
            for key, path in images.items():
                logger.log_image(key=f"plots/{key}", images=[str(path)])
        logger.finalize("success")
    finish_loggers()
