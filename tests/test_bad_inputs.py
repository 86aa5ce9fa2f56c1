"""Bad inputs that were answered badly (issue 20, item 6): late, wrong or with a traceback.

Missing exports called "an older dwskd"; an unwritable ``out`` failing after all the work;
bad evaluation options as library errors; a full disk as "unexpected pos"; a running run
called "stopped"; weights only their owner could read; the wall time of the last process
only; tracebacks before refusals; 5-10 s for ``--help``. No training here: tiny timm
folders written with ``write_model_folder`` (as in test_bad_exports.py) and fake run dirs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dwskd import export, io, model_folder, rundir
from dwskd.commands import compose_command, is_user_error, user_error
from dwskd.evaluate import EvaluationError
from dwskd.evaluate import run as evaluate
from dwskd.io import OutputError, atomic_write
from dwskd.model_folder import ExportError
from dwskd.predict import run as predict
from tests.conftest import REPO, run_module
from tests.test_bad_exports import write_folder

FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run as the commands see it: metrics.json naming its exports, and exports/."""
    root = tmp_path_factory.mktemp("run")
    write_folder(root / "exports" / "student_a")
    shutil.copytree(root / "exports" / "student_a", root / "exports" / "teacher")
    made = {name: f"exports/{name}" for name in ("student_a", "teacher")}
    (root / "metrics.json").write_text(
        json.dumps({"deployed": "student_a", "run": {"exports": made}})
    )
    return root


def copy_run(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target)
    return target


# ------------------------------------------------------------------- 1. model= messages
def test_deleted_exports_are_called_missing_not_old(run_dir: Path, tmp_path: Path) -> None:
    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "exports")
    with pytest.raises(ExportError, match="exports/ folder is missing") as refused:
        model_folder.resolve_model_folder(run)
    assert "older dwskd" not in str(refused.value)
    assert "Copy it back from the original run dir" in str(refused.value)
    assert "another finished run" in str(refused.value)
    (run / "exports").mkdir()  # one export deleted: named, the others offered
    shutil.copytree(run_dir / "exports" / "teacher", run / "exports" / "teacher")
    with pytest.raises(ExportError, match=r"missing exports/student_a/.*one of \['teacher'\]"):
        model_folder.resolve_model_folder(run)


def test_a_run_that_never_exported_is_still_called_older(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"deployed": "student_a"}))
    with pytest.raises(ExportError, match="an older dwskd made this run"):
        model_folder.resolve_model_folder(tmp_path)


def test_model_name_with_an_export_folder(run_dir: Path) -> None:
    folder = run_dir / "exports" / "student_a"
    assert model_folder.resolve_model_folder(folder, "student_a") == folder  # its own name: fine
    pattern = (
        r"is already a model folder \(of 'student_a'\); model_name= picks a model of a run "
        rf"dir\. Drop model_name=teacher, or give model={run_dir / 'exports' / 'teacher'}\."
    )
    with pytest.raises(ExportError, match=pattern):
        model_folder.resolve_model_folder(folder, "teacher")
    with pytest.raises(ExportError, match=r"give model=<run dir> model_name=student_b"):
        model_folder.resolve_model_folder(folder, "student_b")


# ------------------------------------------------------------------- 2. unwritable out
@pytest.fixture
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder this process cannot write (root ignores mode bits: os.access is told so)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != folder and access(p, mode))
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize(
    "command",
    [
        lambda out: predict(
            compose_command("predict", ["model_dir=nowhere", "input=x", f"out={out}"])
        ),
        lambda out: evaluate(
            compose_command("evaluate", ["model_dir=nowhere", "data.root=x", f"out={out}"])
        ),
        lambda out: export.export_model("nowhere", out, fmt="torchscript"),
    ],
    ids=["predict", "evaluate", "export"],
)
def test_unwritable_out_is_refused_before_any_work(read_only: Path, command) -> None:
    """``model_dir=nowhere``: a check after loading the model would fail on the model instead."""
    out = read_only / "sub" / "preds.pt"
    with pytest.raises(OutputError) as refused:
        command(out)
    assert str(refused.value) == (
        f"out={out} cannot be written: {read_only} is not writable. Choose another out= in a "
        "folder you can write (nothing was done)."
    )


def test_failed_write_into_a_read_only_folder_names_the_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EROFS on the temporary file, and again on its removal: one error, naming the target."""

    def read_only_fs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only_fs)
    target = tmp_path / "preds.csv"
    with pytest.raises(OutputError) as refused:
        atomic_write(target, read_only_fs)
    assert str(refused.value).startswith(f"Cannot write {target}: Read-only file system in")
    assert ".tmp-" not in str(refused.value)
    assert isinstance(refused.value.__cause__, OSError)  # the original, as the cause
    assert refused.value.__context__ is refused.value.__cause__  # no error from the clean-up


# ------------------------------------------------------------------- 3. evaluation options
@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("bootstrap.resamples=0", "bootstrap.resamples=0 must be an integer >= 1"),
        ("calibration_bins=0", "calibration_bins=0 must be an integer >= 1"),
        ("calibration_bins=many", "calibration_bins='many' must be an integer >= 1"),
        ("bootstrap.level=95", r"bootstrap.level=95 must be in \(0, 1\), e.g. 0.95"),
        ("saliency=-1", "saliency=-1 must be an integer >= 0"),
    ],
)
def test_bad_evaluation_options_are_named_before_loading(option: str, message: str) -> None:
    cfg = compose_command("evaluate", ["model_dir=nowhere", "data.root=x", option])
    with pytest.raises(EvaluationError, match=message):
        evaluate(cfg)


# ------------------------------------------------------------------- 4. full disk
def writes_then_fails(error: Exception):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 1000)
        raise error

    return write


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(FULL_DISK)],
    ids=["ENOSPC", "torch_unexpected_pos"],
)
def test_full_disk_is_named_with_the_space_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    target = tmp_path / "student_a.safetensors"
    with pytest.raises(OutputError) as refused:
        atomic_write(target, writes_then_fails(error), size=5_000_000)
    assert str(refused.value).startswith(
        f"No space left on {target} (needed about 5.0 MB, 0.0 MB free on {tmp_path})."
    )
    assert refused.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_short_write_with_space_left_is_not_called_a_full_disk(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="the writer stopped short .*unexpected pos"):
        atomic_write(tmp_path / "last.ckpt", writes_then_fails(RuntimeError(FULL_DISK)))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' own words for ENOSPC; the size needed is the state dict's."""
    import safetensors.torch
    import torch

    def save_file(state, path, metadata=None):
        Path(path).write_bytes(b"x")
        raise safetensors.SafetensorError("I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    target = tmp_path / "stages" / "train" / "student_a.safetensors"
    with pytest.raises(OutputError, match=rf"No space left on {target} \(needed about 0.4 MB"):
        rundir.save_weights(torch.nn.Linear(100, 1000), target)
    assert list(target.parent.iterdir()) == []


def test_full_disk_during_an_export_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_half(model, example, path: Path, meta: dict, opset: int) -> None:
        writes_then_fails(OSError(errno.ENOSPC, "No space left on device"))(path)

    monkeypatch.setitem(export.WRITERS, "torchscript", write_half)
    out = tmp_path / "student.pt"
    with pytest.raises(OutputError, match=rf"No space left on {out} \(needed about"):
        export.export_model(run_dir, out, fmt="torchscript")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- 5. a running run
def test_a_running_run_is_named_before_its_config_is_compared(tmp_path: Path) -> None:
    running = rundir.open_run_dir(tmp_path, {"seed": 1})
    running.start({"seed": 1}, "python -m dwskd.run seed=1")
    try:
        with pytest.raises(
            rundir.RunDirError, match=rf"in use by another dwskd run \(pid {os.getpid()} on "
        ):
            rundir.open_run_dir(tmp_path, {"seed": 2})
        rank1 = rundir.open_run_dir(tmp_path, {"seed": 1}, writer=False)  # DDP rank > 0
        assert not rank1.writer
    finally:
        running.close()
    with pytest.raises(rundir.RunDirError, match="stopped run started with another config"):
        rundir.open_run_dir(tmp_path, {"seed": 2})


# ------------------------------------------------------------------- 6. file modes
@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_written_files_get_the_usual_mode(umask_022, run_dir: Path, tmp_path: Path) -> None:
    import torch

    private = tmp_path / "private.bin"
    atomic_write(private, lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)))
    weights = rundir.save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    folder = write_folder(tmp_path / "exports" / "student_a")  # its weights are not linked
    out = tmp_path / "student.pt"
    export.export_model(run_dir, out, fmt="torchscript", check=False)
    for path in (private, weights, folder / model_folder.WEIGHTS_FILE, out):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


# ------------------------------------------------------------------- 7. wall time over resumes
def test_wall_time_adds_up_over_processes(tmp_path: Path) -> None:
    config = {"seed": 1}
    first = rundir.open_run_dir(tmp_path, config)
    first.start(config, "cmd")
    first._clock -= 5.0  # as if it had run for 5 s
    first.close()  # stopped by an error or Ctrl-C: its time is recorded
    killed = rundir.open_run_dir(tmp_path, config)
    killed.start(config, "cmd")
    assert killed.earlier_wall_time() == pytest.approx(5.0, abs=0.5)
    # killed (SIGKILL) 10 s after it started, its last write 3 s before the kill
    killed.record["running_since"] = time.time() - 10
    killed._save_record()
    now = time.time()
    os.utime(killed.layout.record_json, (now - 3, now - 3))
    killed.lock.release()
    third = rundir.open_run_dir(tmp_path, config)
    third.start(config, "cmd")
    assert third.earlier_wall_time() == pytest.approx(5.0 + 7.0, abs=0.5)
    third.close()
    assert "running_since" not in io.read_json(third.layout.record_json)


# ------------------------------------------------------------------- 8. messages, no traceback
def test_user_errors_print_their_message_alone(run_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    run = copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "exports")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    args = (f"model_dir={run}", f"input={tmp_path / 'x.png'}", f"out={tmp_path / 'p.csv'}")
    done = run_module("dwskd.predict", *args)
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"model_dir={run} is a finished run whose exports/ folder is missing"
    )
    assert done.stderr.count("\n") == 1  # the message, one line, and nothing else
    full = run_module("dwskd.predict", *args, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "ExportError" in full.stderr


def test_a_refused_training_run_prints_its_message_alone(tmp_path: Path) -> None:
    holder = rundir.RunLock(rundir.RunLayout(tmp_path).lock_file)
    holder.acquire()
    try:
        done = run_module("dwskd.run", "method=scratch", f"hydra.run.dir={tmp_path}")
    finally:
        holder.release()
    assert done.returncode == 1
    assert done.stderr.startswith(f"{tmp_path} is in use by another dwskd run (pid {os.getpid()}")
    assert "Traceback" not in done.stderr


def test_only_dwskd_refusals_count_as_user_errors() -> None:
    from dwskd.metrics import classification_metrics

    def caught(call) -> BaseException:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - the error itself is the result
            return err
        raise AssertionError("no error")

    assert is_user_error(caught(lambda: classification_metrics(1)))  # dwskd's option check
    assert is_user_error(rundir.RunDirError("in use"))
    assert not is_user_error(caught(lambda: int("x")))  # a ValueError from elsewhere: a bug
    assert not is_user_error(caught(lambda: {}["key"]))
    from hydra.errors import InstantiationException

    from dwskd.data.checks import DataError

    wrapped = InstantiationException("Error in call to target 'dwskd.data.SyntheticDataModule'")
    wrapped.__cause__ = DataError("data.balance='foo' is not supported")  # a constructor's
    assert user_error(wrapped) is wrapped.__cause__
    assert user_error(ValueError("not raised by dwskd")) is None


# ------------------------------------------------------------------- 9. --help without torch
def test_commands_import_without_torch() -> None:
    modules = (
        "dwskd.predict, dwskd.evaluate, dwskd.select_student, dwskd.select, dwskd.export, dwskd.run"
    )
    code = (
        f"import sys, {modules}; print(sorted({{'torch', 'timm', 'lightning'}} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
