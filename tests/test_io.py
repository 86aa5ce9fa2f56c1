"""dwskd.io (atomic writes, refusals to overwrite, time stamps) and the run dir's lock (issue 20).

Light on purpose: no model, no training; the lock's holder is a second Python process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dwskd import io, rundir
from tests.conftest import REPO


# ------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("previous")

    def fail_halfway(tmp: Path) -> None:
        tmp.write_text("half")
        raise ValueError("the serialiser failed")  # not an I/O failure: raised as it is

    with pytest.raises(ValueError, match="the serialiser failed"):
        io.atomic_write(target, fail_halfway)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_json_refuses_nan_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "record.json"
    with pytest.raises(ValueError, match="not JSON compliant"):
        io.write_json(target, {"acc": math.nan})
    assert not target.exists()
    io.write_json(target, {"acc": 0.5})
    assert io.read_json(target) == {"acc": 0.5}
    assert io.read_json(tmp_path / "absent.json") is None


def test_file_sha256_and_now_iso(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert io.file_sha256(tmp_path / "a") == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", io.now_iso())


def test_io_imports_no_torch() -> None:
    code = "import sys, dwskd.io; print(sorted({'torch', 'timm', 'lightning'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# ------------------------------------------------------------------- refusals
def test_refuse_existing_names_the_path_and_the_option(tmp_path: Path) -> None:
    free, taken = tmp_path / "new.csv", tmp_path / "preds.csv"
    taken.write_text("x")
    io.refuse_existing(free)  # nothing there: accepted
    with pytest.raises(FileExistsError) as refused:
        io.refuse_existing(free, taken)
    assert str(refused.value) == (
        f"{taken} already exists; refusing to overwrite it. Choose another out= path."
    )
    with pytest.raises(FileExistsError) as refused:
        io.refuse_existing(taken, option=None)  # an API call: no option to advise
    assert str(refused.value) == f"{taken} already exists; refusing to overwrite it."


def test_refuse_existing_folder_accepts_only_an_empty_or_new_folder(tmp_path: Path) -> None:
    io.refuse_existing_folder(tmp_path / "new")
    io.refuse_existing_folder(tmp_path)  # empty: may be written into
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError) as refused:
        io.refuse_existing_folder(tmp_path, "out", "or leave it out for a new folder")
    assert str(refused.value) == (
        f"out={tmp_path} exists and is not an empty folder; dwskd never overwrites results. "
        "Choose another out= folder (or leave it out for a new folder)."
    )
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        io.refuse_existing_folder(tmp_path / "metrics.json")  # a file is no folder


def test_check_writable_names_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("x")
    out = tmp_path / "blocker" / "preds.csv"
    with pytest.raises(io.OutputError) as refused:
        io.check_writable(out, "out")
    assert str(refused.value) == (
        f"out={out} cannot be written: {tmp_path / 'blocker'} is a file, not a folder. Choose "
        "another out= in a folder you can write (nothing was done)."
    )
    io.check_writable(tmp_path / "a" / "b" / "c.csv")  # missing folders are made later


# ------------------------------------------------------------------- the run dir's lock
HOLD = (
    "import sys, time; from dwskd import rundir; lock = rundir.RunLock(sys.argv[1]); lock.acquire(); "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding ``<tmp_path>/run.lock`` (killed at the end if still alive)."""
    lock_file = rundir.RunLayout(tmp_path).lock_file
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_file)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path: Path, holder) -> None:
    started = time.monotonic()
    with pytest.raises(rundir.RunDirError) as refused:
        rundir.open_run_dir(tmp_path, {"seed": 1})
    assert time.monotonic() - started < 2.0  # timeout 0: refused, not queued
    holder_name = rf"pid {holder.pid} on \S+ since \d{{4}}-"
    assert re.search(
        rf"{re.escape(str(tmp_path))} is in use by another dwskd run \({holder_name}",
        str(refused.value),
    )
    lock = rundir.RunLock(
        rundir.RunLayout(tmp_path).lock_file
    )  # past the probe, at the lock itself
    with pytest.raises(rundir.RunDirError, match=rf"\({holder_name}"):
        lock.acquire()
    # a refused try leaves the holder's name in the file for the next one
    assert f"pid {holder.pid} on " in rundir.RunLayout(tmp_path).lock_file.read_text()
    assert not (tmp_path / "record.json").exists()


def test_the_os_releases_the_lock_of_a_killed_holder(tmp_path: Path, holder) -> None:
    holder.kill()  # SIGKILL: no clean-up runs in the holder
    holder.wait()
    run_dir = rundir.open_run_dir(tmp_path, {"seed": 1})
    try:
        assert run_dir.writer
        assert rundir.RunLayout(tmp_path).lock_file.read_text().startswith(f"pid {os.getpid()} on ")
    finally:
        run_dir.close()
    assert not rundir.RunLayout(tmp_path).lock_file.exists()  # refused-before-start: no trace


def test_a_released_lock_can_be_taken_again_in_the_same_process(tmp_path: Path) -> None:
    config = {"seed": 1}
    first = rundir.open_run_dir(tmp_path, config)
    first.start(config, "cmd")
    first.close()
    again = rundir.open_run_dir(tmp_path, config)
    again.close()
    assert json.loads((tmp_path / "record.json").read_text())["command"] == "cmd"
