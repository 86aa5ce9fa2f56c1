"""The Lightning loggers of a run, built once at the top from the ``logger`` config group.

Two kinds. Per-stage loggers (CSV, TensorBoard) write one folder per stage, ``logs/<stage>/``;
dwskd's :class:`CSVLogger` keeps the rows written before a resume. W&B is run-wide: one W&B run
per dwskd run (:class:`WandbRun`), started once and continued on resume (its id is kept in the
run record). Each stage's Trainer logs into it through a :class:`StageWandbLogger` (its keys
under the stage's name, on the stage's own step axis); the test stage adds the summary, the
plots, the deployed model's predictions table and the model and results artifacts.
"""

from __future__ import annotations

import contextlib
import csv
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from dwskd.rundir import RunDirectory, RunLayout, flatten

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


# ------------------------------------------------------------------------- names
@dataclass(frozen=True)
class RunNames:
    """How a tracker shows the run: ``name`` (the command's overrides), ``group`` (the sweep)."""

    name: str
    group: str


def run_names(data_name: str, method_name: str, seed: int) -> RunNames:
    """From Hydra when it runs the job (``override_dirname``, the sweep folder), else defaults.

    Why: the jobs of a sweep differ only in their overrides, so those make a run readable in a
    runs table, and the sweep folder groups them. Without overrides: ``<data>-<method>-s<seed>``;
    outside a multirun the group is ``<data>-<method>``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    overrides, sweep = "", ""
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        overrides = hydra.job.get("override_dirname") or ""
        if hydra.mode == RunMode.MULTIRUN:
            sweep = Path(hydra.sweep.dir).name
    return RunNames(
        name=overrides or f"{data_name}-{method_name}-s{seed}",
        group=sweep or f"{data_name}-{method_name}",
    )


# ------------------------------------------------------------------------- W&B
class StageWandbLogger(WandbLogger):
    """Lightning's WandbLogger on the run's one W&B run, every key under the stage's name.

    Why a view per stage: each stage's Trainer counts steps from 0, so each stage gets its own
    step axis (``<stage>/global_step``, declared with ``define_metric``) and keys such as
    ``teacher/train/loss`` or ``train/val/student_a/acc``; W&B's own ``_step`` runs on across stages.
    """

    def __init__(self, run: Any, stage: str, save_dir: Path) -> None:
        super().__init__(experiment=run, save_dir=str(save_dir))
        self.stage, self.step_key = stage, f"{stage}/global_step"
        if run is not None:  # None on DDP ranks > 0: Lightning gives them a dummy experiment
            run.define_metric(self.step_key)
            run.define_metric(f"{stage}/*", step_metric=self.step_key)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {f"{self.stage}/{key}": value for key, value in metrics.items()}
        if step is not None:
            row[self.step_key] = step
        self.experiment.log(row)

    @rank_zero_only
    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the run's config already holds the whole resolved config, and each stage's
        module hyperparameters would overwrite the previous stage's under the same keys."""


class WandbRun:
    """The one W&B run of a dwskd run (``logger=wandb``), shared by every stage.

    ``init`` holds ``wandb.init`` settings from the config group; a null ``name`` or ``group``
    takes the run's :class:`RunNames`, a null ``dir`` the run dir (``<run>/wandb/``).
    ``log_model``: log the deployed model's export folder as a ``model`` artifact.
    """

    def __init__(self, *, log_model: bool = True, tags: Any = (), **init: Any) -> None:
        self.init = {**init, "tags": list(tags or ())}
        self.log_model = bool(log_model)
        self.run: Any = None

    def start(self, run_dir: RunDirectory, names: RunNames, config: Mapping[str, Any]) -> None:
        """Start (or, with the id kept in the run record, continue) the W&B run."""
        import wandb

        defaults = {"name": names.name, "group": names.group, "dir": str(run_dir.layout.root)}
        init = {**self.init, **{k: v for k, v in defaults.items() if self.init.get(k) is None}}
        run_id = run_dir.tracker_id("wandb", lambda: secrets.token_hex(6))
        self.run = wandb.init(id=run_id, resume="allow", config=flatten(config), **init)

    def finish(self, failed: bool) -> None:
        """Close the run; a crashed process marks it failed (a resume continues it anyway)."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def log_results(
        self, layout: RunLayout, results: Mapping[str, Any], images: Mapping[str, Path]
    ) -> None:
        """What W&B users compare and fetch: the summary under stable keys, the plots, the
        deployed model's test predictions as a table, the model and results artifacts."""
        import wandb

        run, deployed, info = self.run, results["deployed"], results["run"]
        if run is None:
            return
        run.config.update({"run.deployed": deployed}, allow_val_change=True)
        run.summary.update(summary_figures(results))
        media: dict[str, Any] = {f"plots/{k}": wandb.Image(str(p)) for k, p in images.items()}
        if layout.predictions_csv(deployed).is_file():
            media["deployed/test/predictions"] = predictions_table(layout.predictions_csv(deployed))
        run.log(media)
        if self.log_model:
            aliases = list(dict.fromkeys([str(info["method"]), str(info["data"])]))
            run.log_artifact(model_artifact(run.id, layout, results), aliases=aliases)
        run.log_artifact(results_artifact(run.id, layout))


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def model_figures(entry: Mapping[str, Any]) -> dict[str, float]:
    """A model's headline numbers: ``val/<metric>``, ``test/<metric>``, params, flops, latency."""
    figures = {
        f"{split}/{key}": value
        for split in ("val", "test")
        for key, value in entry.get(split, {}).items()
        if is_number(value)
    }
    figures.update({k: entry[k] for k in ("params", "flops", "latency_ms") if k in entry})
    return figures


def summary_figures(results: Mapping[str, Any]) -> dict[str, Any]:
    """Every model's figures under its name (``student_a/test/acc``, external sets as
    ``<model>/external/<set>/<metric>``), and the deployed model's again under ``deployed/``:
    one key for dashboards and sweeps whichever student was deployed."""
    figures = {name: model_figures(entry) for name, entry in results["models"].items()}
    for set_name, scored in (results.get("external") or {}).items():
        for name, summary in scored.items():
            metrics = (summary.get("metrics") or {}).items()
            external = {f"external/{set_name}/{k}": v for k, v in metrics if is_number(v)}
            figures.setdefault(name, {}).update(external)
    figures["deployed"] = figures.get(results["deployed"], {})
    flat = {f"{name}/{key}": value for name, own in figures.items() for key, value in own.items()}
    return {"deployed/model": results["deployed"], **flat}


def predictions_table(path: Path) -> Any:
    """The per-image predictions CSV as a ``wandb.Table`` (numbers as numbers, so it can be
    charted); read with the csv module: pandas is not a dependency of dwskd."""
    import csv

    import wandb

    with Path(path).open(newline="") as stream:
        header, *rows = list(csv.reader(stream))
    return wandb.Table(columns=header, data=[[_as_number(v) for v in row] for row in rows])


def _as_number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def model_artifact(run_id: str, layout: RunLayout, results: Mapping[str, Any]) -> Any:
    """The deployed model's export folder (timm format: weights + config.json) as ``model``.

    ``immutable``: W&B reads the files in place instead of copying them (a finished run dir
    is never changed), so logging a model costs no disk.
    """
    import wandb

    deployed, info = results["deployed"], results["run"]
    metadata = {"model": deployed, "method": info["method"], "data": info["data"]}
    metadata.update(model_figures(results["models"][deployed]))
    artifact = wandb.Artifact(f"model-{run_id}", type="model", metadata=metadata)
    artifact.add_dir(str(layout.export_dir(deployed)), policy="immutable")
    return artifact


def results_artifact(run_id: str, layout: RunLayout) -> Any:
    """report.md, metrics.json and the plots of the run, as one ``results`` artifact."""
    import wandb

    artifact = wandb.Artifact(f"results-{run_id}", type="results")
    for path in (layout.report_md, layout.metrics_json):
        if path.is_file():
            artifact.add_file(str(path), policy="immutable")
    if layout.plots_dir.is_dir():
        artifact.add_dir(str(layout.plots_dir), name="plots", policy="immutable")
    return artifact


# ------------------------------------------------------------------------- all loggers
def is_run_wide(factory: LoggerFactory) -> bool:
    cls = getattr(factory, "func", factory)
    return isinstance(cls, type) and issubclass(cls, WandbRun)


def check_factory(name: str, factory: LoggerFactory) -> None:
    """Refuse Lightning's WandbLogger as a per-stage logger: it would make one W&B run per stage."""
    cls = getattr(factory, "func", factory)
    if isinstance(cls, type) and issubclass(cls, WandbLogger):
        raise ValueError(
            f"logger {name}: _target_ {cls.__module__}.{cls.__name__} would start one W&B run "
            "per stage; use _target_: dwskd.loggers.WandbRun (see conf/logger/wandb.yaml)."
        )


def stage_logger(
    factory: LoggerFactory, save_dir: Path, stage: str, keep_until: tuple[int, int] | None
) -> Logger:
    """A fresh per-stage logger writing to ``<save_dir>/<name>/<stage>/``."""
    cls = getattr(factory, "func", factory)
    if isinstance(cls, type) and issubclass(cls, CSVLogger):
        return factory(save_dir=str(save_dir), version=stage, keep_until=keep_until)
    return factory(save_dir=str(save_dir), version=stage)


class RunLoggers:
    """Every logger of one run: per-stage kinds as partials, run-wide ones (W&B) as objects."""

    def __init__(self, factories: Mapping[str, LoggerFactory], names: RunNames) -> None:
        for name, factory in factories.items():
            check_factory(name, factory)
        self.per_stage = {k: f for k, f in factories.items() if not is_run_wide(f)}
        self.wandb = [f() for f in factories.values() if is_run_wide(f)]
        self.names = names

    @contextlib.contextmanager
    def session(
        self, run_dir: RunDirectory, config: Callable[[], Mapping[str, Any]]
    ) -> Iterator[None]:
        """Start the run-wide loggers (in the writing process) with ``config()`` (built only
        then), and close them even after a crash, marked failed, so that the next job of a
        multirun starts cleanly."""
        if run_dir.writer and self.wandb:
            recorded = config()
            for run in self.wandb:
                run.start(run_dir, self.names, recorded)
        failed = True
        try:
            yield
            failed = False
        finally:
            for run in self.wandb:
                run.finish(failed)

    def for_stage(
        self, save_dir: Path, stage: str, keep_until: tuple[int, int] | None = None
    ) -> list[Logger]:
        """The loggers of one stage's Trainer: fresh per-stage ones, views of the W&B run."""
        loggers = [stage_logger(f, save_dir, stage, keep_until) for f in self.per_stage.values()]
        return loggers + [StageWandbLogger(run.run, stage, save_dir) for run in self.wandb]

    def log_results(
        self, layout: RunLayout, results: Mapping[str, Any], images: Mapping[str, Path]
    ) -> None:
        """Test metrics to the per-stage loggers (as a ``test`` stage); W&B gets its summary,
        plots, table and artifacts."""
        flat = {
            f"test/{name}/{key}": value
            for name, entry in results["models"].items()
            for key, value in entry["test"].items()
            if is_number(value)
        }
        for factory in self.per_stage.values():
            logger = stage_logger(factory, layout.root, "test", None)
            logger.log_metrics(flat)
            logger.finalize("success")
        for run in self.wandb:
            run.log_results(layout, results, images)
