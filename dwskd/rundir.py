"""The one owner of a run directory: where every file lives, who may write there, what has run.

Layout of ``<run dir>`` (every path comes from :class:`RunLayout`)::

    .hydra/{config,overrides,hydra}.yaml    written by dwskd once the run is accepted
    run.lock                                held (filelock) by the process running here; names it
    record.json                             config the run started with, fingerprint, resumes, time
    stages/<stage>/done.json                a finished stage: seed, config fingerprint, exports
    stages/<stage>/<model>.safetensors      the stage's exported weights (best on validation)
    stages/<stage>/checkpoints/             last.ckpt + best.ckpt, only while the stage runs
    logs/<stage>/metrics.csv                one CSV log per stage (kept across resumes)
    exports/<model>/                        each tested model in timm's folder format
    predictions/<model>_test.csv            per-image test predictions of each model
    external/<set>/<model>/                 a model scored on an external set (dwskd-eval's outputs)
    metrics.json, report.md, plots/         the results; metrics.json marks a finished run

Policy: a finished run (``metrics.json``) is never touched again; a run dir is used by one
process at a time; a stopped run resumes only with the config it started with (the keys in
``IGNORED_KEYS`` aside) unless ``resume.allow_config_changes=true``; every file is written
under a temporary name and renamed (:func:`dwskd.io.atomic_write`), so a crash or a full disk
leaves no partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwskd.io import atomic_write, file_sha256, now_iso, read_json, write_json, write_text

LAYOUT_VERSION = 2
STAGES = ("teacher", "select", "train", "finetune")
# Each stage draws its randomness from seed + this offset (documented in README "Seeds").
STAGE_SEED_OFFSETS = {"teacher": 0, "select": 1, "train": 2, "finetune": 3, "teacher_probe": 4}
# What each training stage trains: the large teacher, the method's students (with its
# objective), or the deployed student alone (cross-entropy). See StageSpec.
STAGE_ROLES = {
    "teacher": "teacher",
    "teacher_probe": "teacher",
    "train": "students",
    "finetune": "finetune",
}
# Keys that change how a run is logged or shown, never what it computes: a resume may change them.
IGNORED_KEYS = (
    "logger",
    "callbacks.progress_bar",
    "callbacks.lr_monitor",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "ckpt_path",
    "resume",
    "checkpoint.keep",
    "optimized_metric",
    "paths.output_root",
    "eval.bootstrap",  # only the report's intervals and calibration bins: the test stage
    "eval.calibration_bins",  # recomputes them on every resume
    "eval.plots",
)


class RunDirError(RuntimeError):
    """A run dir that cannot be used as asked; nothing in it was changed."""


# ------------------------------------------------------------------------- config records
def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": leaf}; lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def relevant(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without the keys that only change logging or display."""
    return {
        k: v
        for k, v in flatten(config).items()
        if not any(k == i or k.startswith(f"{i}.") for i in IGNORED_KEYS)
    }


def fingerprint(config: Mapping[str, Any]) -> str:
    """Short hash of what a config computes (ignored keys left out)."""
    text = json.dumps(relevant(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """{key: [old value, new value]} for every relevant key that differs (absent = None)."""
    before, after = relevant(old), relevant(new)
    keys = sorted(before.keys() | after.keys())
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}


# ------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory; the only place that spells them out."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def record_json(self) -> Path:
        return self.root / "record.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    @property
    def hydra_dir(self) -> Path:
        return self.root / ".hydra"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def predictions_csv(self, model: str, split: str = "test") -> Path:
        """Per-image predictions of ``model`` on ``split`` (file, labels, probabilities)."""
        return self.root / "predictions" / f"{model}_{split}.csv"

    def external_dir(self, set_name: str, model: str) -> Path:
        """``external/<set>/<model>/``: dwskd-eval's outputs (predictions.csv, report, plots)."""
        return self.root / "external" / set_name / model

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    def export_dir(self, model: str) -> Path:
        """``exports/<model>/``: the model in timm's folder format (see dwskd.model_folder)."""
        return self.exports_dir / model

    def done_json(self, stage: str) -> Path:
        return self.stage_dir(stage) / "done.json"

    def weights(self, stage: str, model: str) -> Path:
        return self.stage_dir(stage) / f"{model}.safetensors"

    def checkpoint_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def last_checkpoint(self, stage: str) -> Path:
        return self.checkpoint_dir(stage) / "last.ckpt"

    def logs_dir(self, stage: str) -> Path:
        return self.root / "logs" / stage

    def metrics_csv(self, stage: str) -> Path:
        return self.logs_dir(stage) / "metrics.csv"

    @property
    def finished(self) -> bool:
        return self.metrics_json.is_file()

    def stage_record(self, stage: str) -> dict[str, Any] | None:
        """The record of a finished stage, or None while it still has to run."""
        return read_json(self.done_json(stage))

    def final_weights(self, model: str, *, own: bool = False) -> Path | None:
        """Where ``model``'s final weights are: the last finished stage that exported it.

        ``own=True``: only a file this run wrote (a plain state dict), never a referenced
        outside file (which may be a .pth/.ckpt that needs adapting); else None.
        """
        for stage in reversed(STAGES):
            entry = ((self.stage_record(stage) or {}).get("exports") or {}).get(model, {})
            if "file" in entry:
                return self.stage_dir(stage) / entry["file"]
            if "reference" in entry:
                return None if own else Path(entry["reference"])
        if own:
            return None
        raise RunDirError(f"{self.root} has no finished stage that exported '{model}'.")


def stage_seed(seed: int, stage: str) -> int:
    return int(seed) + STAGE_SEED_OFFSETS[stage]


@dataclass(frozen=True)
class StageSpec:
    """One training stage as data: its name (folder, record, log prefix), what it trains
    (``role``, see STAGE_ROLES), its epochs, learning rate and seed offset.

    Why: the pipeline used to derive a stage's lr and seed from its name's spelling; a spec is
    built once from the config and the tables above, and handed to the module and the trainer.
    """

    name: str
    role: str
    epochs: int
    lr: float
    seed_offset: int

    def seed(self, run_seed: int) -> int:
        return int(run_seed) + self.seed_offset

    @classmethod
    def of(cls, name: str, epochs: int, lr: float) -> StageSpec:
        """The spec of training stage ``name``: role and seed offset from this module's tables."""
        return cls(name, STAGE_ROLES[name], int(epochs), float(lr), STAGE_SEED_OFFSETS[name])


def finished_layout(run_dir: Path) -> RunLayout:
    """The layout of a finished run, for readers (aggregation, reports); refuses other dirs."""
    layout = RunLayout(Path(run_dir))
    if not layout.finished:
        raise RunDirError(f"{run_dir} holds no metrics.json: the run has not finished.")
    return layout


# ------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive lock on ``run.lock`` (filelock's ``flock``): released by the OS even when
    the holder is killed. The holder writes its pid, host and start time into the file, so that
    a refused process can name it.

    Taken with ``timeout=0``: a second process is refused at once, never queued behind a run
    that may take days. Not thread-local, so any thread of the holder may release it; the file
    is kept on release (``preserve_lock_file``), so that there is never a soft-lock fallback,
    whose marker a killed holder would leave behind.
    """

    def __init__(self, path: Path) -> None:
        from filelock import FileLock

        self.path = Path(path)
        self._lock = FileLock(
            self.path,
            timeout=0,
            thread_local=False,
            fallback_to_soft=False,
            preserve_lock_file=True,
            on_acquired=_write_holder,
        )

    def acquire(self) -> None:
        from filelock import Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise self._in_use(self.path.read_text()) from None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def refuse_if_held(self) -> None:
        """Refuse, naming the holder, when another process holds the lock; take and write nothing.

        Why before anything else: "in use by pid N" is the answer to a second command on a
        running run, whatever its options; a config comparison would call it "stopped".
        Why ``fcntl`` here and not filelock: filelock can only test a lock by taking it
        (exclusive, creating the file); a shared probe does neither, so two processes probing at
        once do not refuse each other.
        """
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
        except BlockingIOError:
            raise self._in_use(self.path.read_text()) from None
        finally:
            os.close(fd)

    def _in_use(self, holder: str) -> RunDirError:
        return RunDirError(
            f"{self.path.parent} is in use by another dwskd run "
            f"({holder.strip() or 'unknown process'}). Wait for it to finish or stop that "
            "process; to run in parallel choose another hydra.run.dir."
        )


def _write_holder(fd: int) -> None:
    """filelock's ``on_acquired``: the new holder's name, in place of the last holder's."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}".encode(), 0)


# ------------------------------------------------------------------------- opening a run
def refuse_finished(layout: RunLayout) -> None:
    if layout.finished:
        raise RunDirError(
            f"{layout.metrics_json} exists: this run is complete and dwskd never overwrites "
            "results. Start a new run (a new hydra.run.dir) or move the old one away."
        )


def finished_results(layout: RunLayout, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """A finished run asked for again with the same config: its recorded results, or None.

    Why: a re-launched sweep (any Hydra launcher) then continues where it stopped, and a
    sweeper gets the finished job's metric back, with nothing run or written again. The same
    dir asked for with another config is refused, naming the differences.
    """
    if not layout.finished:
        return None
    record = read_json(layout.record_json) or {}
    changes = config_changes(record.get("config") or {}, config)
    if changes:
        listed = "\n  ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise RunDirError(
            f"{layout.metrics_json} exists: this run is complete, made with another config:\n"
            f"  {listed}\ndwskd never overwrites results. Start a new run (a new "
            "hydra.run.dir), or move the old one away."
        )
    return read_json(layout.metrics_json)


def check_resumable(layout: RunLayout, config: Mapping[str, Any], allow_changes: bool) -> dict:
    """Refuse a stopped run whose config differs (or that an older dwskd made); return changes."""
    record = read_json(layout.record_json)
    if record is None:
        if (layout.root / "stages").is_dir():
            raise RunDirError(
                f"{layout.root} holds stages of a run made by an older dwskd (no record.json); "
                "it cannot be resumed safely. Start a new run in a new hydra.run.dir."
            )
        return {}
    changes = config_changes(record["config"], config)
    if changes and not allow_changes:
        listed = "\n  ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        raise RunDirError(
            f"{layout.root} is a stopped run started with another config:\n  {listed}\n"
            "Resume with the same options, start a new run (a new hydra.run.dir), or add "
            "resume.allow_config_changes=true to resume with these changes (they are recorded)."
        )
    return changes


class RunDirectory:
    """A run dir held by this process: the lock, the record, stage bookkeeping.

    Opening only refuses or locks; :meth:`start` (once the options are checked) writes the
    record and ``.hydra`` files. A run that stops before ``start`` leaves nothing behind.
    """

    def __init__(
        self,
        layout: RunLayout,
        lock: RunLock | None,
        record: dict[str, Any] | None,
        changes: Mapping[str, Any] | None = None,
    ) -> None:
        self.layout, self.lock, self.record = layout, lock, record
        self.changes = dict(changes or {})  # config keys changed since the stopped run started
        self._clock: float | None = None  # time.monotonic() when this process started the run

    @property
    def writer(self) -> bool:
        """Only the process holding the lock writes (DDP ranks > 0 compute, never write)."""
        return self.lock is not None

    def start(
        self,
        config: Mapping[str, Any],
        command: str,
        hydra_files: Mapping[str, str] | None = None,
    ) -> None:
        """Record this start (first start, or a restart with its config changes)."""
        if not self.writer:
            return
        if self.record is None:
            self.record = {
                "layout": LAYOUT_VERSION,
                "command": command,
                "started": now_iso(),
                "fingerprint": fingerprint(config),
                "config": dict(config),
            }
            for name, text in (hydra_files or {}).items():
                write_text(self.layout.hydra_dir / name, text)
        else:
            restart = {"time": now_iso(), "command": command, "config_changes": self.changes}
            self.record.setdefault("restarts", []).append(restart)
            self._count_killed_process()
        self.record["running_since"] = time.time()  # removed by close(): not there = not killed
        self._clock = time.monotonic()
        self._save_record()

    def earlier_wall_time(self) -> float:
        """Seconds this run spent in the processes before this one (0.0 on a first start).

        Why recorded: after a resume the run's cost is every process's time, not the last's.
        """
        return float((self.record or {}).get("wall_time_s", 0.0))

    def _count_killed_process(self) -> None:
        """A process killed (SIGKILL, power loss) before its close() counts until its last
        file write here: the work after that was lost and is done again by this one."""
        since = self.record.pop("running_since", None)
        if since is None:
            return
        last = since
        for path in self.layout.root.rglob("*"):
            if path.is_file() and path != self.layout.lock_file:  # the lock: this process's
                with contextlib.suppress(OSError):
                    last = max(last, path.stat().st_mtime)
        self.record["wall_time_s"] = round(self.earlier_wall_time() + last - since, 3)

    def _stop_clock(self) -> None:
        """Add this process's time to the record (it ends, normally or by an error)."""
        if self._clock is None or self.record is None:
            return
        spent, self._clock = time.monotonic() - self._clock, None
        self.record["wall_time_s"] = round(self.earlier_wall_time() + spent, 3)
        self.record.pop("running_since", None)
        with contextlib.suppress(OSError):  # a full disk: the error being raised matters more
            self._save_record()

    def note_resume(self, stage: str, epoch: int, step: int) -> None:
        entry = {"stage": stage, "epoch": int(epoch), "global_step": int(step), "time": now_iso()}
        self.record.setdefault("stage_resumes", []).append(entry)
        self._save_record()

    def resumes(self) -> list[dict[str, Any]]:
        """Every resume of this run: restarts of the command and the stages they resumed."""
        record = self.record or {}
        return [*record.get("restarts", []), *record.get("stage_resumes", [])]

    def tracker_id(self, tracker: str, new: Callable[[], str]) -> str:
        """This run's id in an outside tracker (``wandb``): made by ``new`` once and kept in
        the record, so that a resumed run continues the same tracker run, not a new one."""
        ids = (self.record if self.record is not None else {}).setdefault("trackers", {})
        if tracker not in ids:
            ids[tracker] = new()
            self._save_record()
        return ids[tracker]

    def _save_record(self) -> None:
        if self.writer and self.record is not None:
            write_json(self.layout.record_json, self.record)

    def close(self) -> None:
        if self.lock is None:
            return
        fresh = self.record is None
        self._stop_clock()
        self.lock.release()
        if fresh:  # refused before anything was written: leave no lock file behind
            self.layout.lock_file.unlink(missing_ok=True)


def open_run_dir(
    root: Path,
    config: Mapping[str, Any],
    *,
    allow_changes: bool = False,
    writer: bool = True,
) -> RunDirectory:
    """Refuse ``root`` (finished, other config, in use) having changed nothing, or lock it.

    The read-only checks run before the lock is taken (taking it writes the holder's pid)
    and again once it is held, in case another run finished or started meanwhile. A running
    holder is named before the config is compared. DDP ranks > 0 (``writer=False``) open the
    dir while rank 0 holds it.
    """
    layout = RunLayout(Path(root))
    refuse_finished(layout)
    lock = RunLock(layout.lock_file)
    if writer:
        lock.refuse_if_held()
    changes = check_resumable(layout, config, allow_changes)
    if not writer:
        return RunDirectory(layout, None, read_json(layout.record_json), changes)
    lock.acquire()
    try:
        refuse_finished(layout)
        changes = check_resumable(layout, config, allow_changes)
    except BaseException:
        lock.release()
        raise
    return RunDirectory(layout, lock, read_json(layout.record_json), changes)


@contextlib.contextmanager
def opened_run_dir(root: Path, config: Mapping[str, Any], **options: Any) -> Iterator[RunDirectory]:
    run_dir = open_run_dir(root, config, **options)
    try:
        yield run_dir
    finally:
        run_dir.close()


def remove_checkpoints(layout: RunLayout, stage: str) -> None:
    """Drop a finished stage's Lightning checkpoints (its exports hold the weights)."""
    shutil.rmtree(layout.checkpoint_dir(stage), ignore_errors=True)


# ------------------------------------------------------------------------- stage runner
@dataclass
class StageOutput:
    """What a stage hands on: its models, the facts to record, and models kept by reference."""

    models: dict[str, Any]
    facts: dict[str, Any]
    references: dict[str, Path] | None = None  # model -> outside weights file used unchanged
    extra_exports: dict[str, Any] | None = None  # exported but not handed on (EMA weights)


class StageRunner:
    """One runner for every stage: load its finished exports, or fit, export and record it.

    ``blank()`` builds the stage's models with any weights (they are overwritten on load);
    ``fit()`` trains them and returns a :class:`StageOutput`. ``load_reference(model, path)``
    loads a referenced outside file the way the stage first loaded it.
    """

    def __init__(
        self,
        run_dir: RunDirectory,
        config: Mapping[str, Any],
        seed: int,
        *,
        keep_checkpoints: bool = False,
        load_reference: Callable[[Any, Path], Any] | None = None,
    ) -> None:
        self.run_dir, self.layout = run_dir, run_dir.layout
        self.config, self.seed = dict(config), int(seed)
        self.keep_checkpoints, self.load_reference = keep_checkpoints, load_reference

    def seed_of(self, stage: str) -> int:
        return stage_seed(self.seed, stage)

    def run(
        self, stage: str, blank: Callable[[], dict[str, Any]], fit: Callable[[], StageOutput]
    ) -> StageOutput:
        record = self.layout.stage_record(stage)
        if record is not None:
            models = blank()
            self._load(stage, record, models)
            return StageOutput(models, record.get("facts", {}))
        import lightning as L  # noqa: PLC0415 - Lightning only where training happens

        L.seed_everything(self.seed_of(stage), workers=True)
        output = fit()
        exports = self._export(stage, output)
        record = {
            "stage": stage,
            "seed": self.seed_of(stage),
            "fingerprint": fingerprint(self.config),
            "config": self.config,
            "finished": now_iso(),
            "exports": exports,
            "facts": output.facts,
        }
        if self.run_dir.writer:
            write_json(self.layout.done_json(stage), record)
            if not self.keep_checkpoints:
                remove_checkpoints(self.layout, stage)
        return output

    def _export(self, stage: str, output: StageOutput) -> dict[str, dict[str, str]]:
        """Save each model's weights (atomically), or record the outside file it came from."""
        references = output.references or {}
        exports: dict[str, dict[str, str]] = {}
        to_save = {**output.models, **(output.extra_exports or {})}
        for name, model in to_save.items():
            if name in references:
                path = Path(references[name]).resolve()
                exports[name] = {"reference": str(path), "sha256": file_sha256(path)}
                continue
            path = self.layout.weights(stage, name)
            if self.run_dir.writer:
                save_weights(model, path)
            exports[name] = {"file": path.name}
        return exports

    def supersede(self, stage: str, name: str, by: str) -> None:
        """``name``'s export of ``stage`` is replaced by that of the later stage ``by``.

        One final file per model: the fine-tuned student makes its pre-fine-tuning copy
        redundant (``checkpoint.keep=true`` keeps it). The record changes first, then the
        file goes, so a crash in between leaves a spare file, never a missing one.
        """
        record = self.layout.stage_record(stage)
        if self.keep_checkpoints or not self.run_dir.writer or record is None:
            return
        entry = record["exports"].get(name, {})
        if "file" not in entry:
            return
        record["exports"][name] = {"superseded_by": by}
        write_json(self.layout.done_json(stage), record)
        (self.layout.stage_dir(stage) / entry["file"]).unlink(missing_ok=True)

    def _load(self, stage: str, record: Mapping[str, Any], models: Mapping[str, Any]) -> None:
        for name, model in models.items():
            entry = record["exports"][name]
            if "superseded_by" in entry:
                continue  # the later stage's record loads this model's final weights
            if "reference" in entry:
                path = Path(entry["reference"])
                if not path.is_file() or file_sha256(path) != entry["sha256"]:
                    raise RunDirError(
                        f"stage {stage} of {self.layout.root} used {path} (sha256 "
                        f"{entry['sha256'][:12]}...), which is missing or has changed since. "
                        "Restore that file or start a new run."
                    )
                self.load_reference(model, path)
            else:
                load_weights(model, self.layout.stage_dir(stage) / entry["file"])


def save_weights(model: Any, path: Path) -> Path:
    """A model's plain state dict as safetensors (loadable by timm and ``teacher.file``)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)), size=size)


def load_weights(model: Any, path: Path) -> Any:
    """Load one of this run's own exports (strict: same architecture by construction)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def read_results(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run, of this layout or an older one (same file name)."""
    return json.loads(finished_layout(run_dir).metrics_json.read_text())
