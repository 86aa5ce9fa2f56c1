"""The one owner of how dwskd writes files: time stamps, atomic writes, refusals to overwrite.

Every command and the run directory (:mod:`dwskd.rundir`) go through here, so that a file is
never half-written (:func:`atomic_write`: a temporary name, then a rename), a failed write is
named once and well (:class:`OutputError`: the path, a full disk with the space needed), an
existing result is never overwritten (:func:`refuse_existing`, :func:`refuse_existing_folder`)
and an output that cannot be written is refused before any work (:func:`check_writable`).

Pure standard library: importing it loads no torch, so the commands' checks stay instant.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OutputError(OSError):
    """A file dwskd was asked to write cannot be written (folder not writable, disk full);
    no partial file was left. The message names the path and what to do."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


def now_iso() -> str:
    """Local time with its UTC offset, to the second (``2026-11-27T14:03:12+01:00``)."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ------------------------------------------------------------------------- refusals
def refuse_existing(*paths: Path | str, option: str | None = "out") -> None:
    """Refuse, before any work, to write over an existing file (or folder) of ``paths``.

    One message everywhere: "<path> already exists; refusing to overwrite it. Choose another
    <option>= path." (``option=None``: no advice, for API callers that pass a path directly).
    """
    for path in paths:
        if Path(path).exists():
            advice = f" Choose another {option}= path." if option else ""
            raise FileExistsError(f"{path} already exists; refusing to overwrite it.{advice}")


def refuse_existing_folder(
    path: Path | str, option: str = "out", alternative: str | None = None
) -> None:
    """Refuse an output folder that exists and is not empty (an empty one may be written into).

    ``alternative``: another way out the command offers, said in brackets after the advice.
    """
    folder = Path(path)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        other = f" ({alternative})" if alternative else ""
        raise FileExistsError(
            f"{option}={path} exists and is not an empty folder; dwskd never overwrites results. "
            f"Choose another {option}= folder{other}."
        )


def check_writable(path: Path | str, option: str = "out") -> None:
    """Refuse, before any work, an output path (file or folder) this process cannot write.

    Why first: evaluating thousands of images and only then failing on a read-only ``out``
    wastes the work. It checks the nearest existing folder at or above ``path``.
    """
    absolute = Path(path).expanduser().absolute()
    blocker = absolute
    while not blocker.exists() and blocker != blocker.parent:
        blocker = blocker.parent
    if not blocker.is_dir():
        why = f"{blocker} is a file, not a folder"
    elif not os.access(blocker, os.W_OK | os.X_OK):
        read_only = os.statvfs(blocker).f_flag & os.ST_RDONLY
        why = f"{blocker} is " + ("on a read-only file system" if read_only else "not writable")
    else:
        return
    raise OutputError(
        f"{option}={path} cannot be written: {why}. Choose another {option}= in a folder you "
        "can write (nothing was done)."
    )


# ------------------------------------------------------------------------- atomic files
def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    size: int | None = None,
    publish: Callable[[Path, Path], None] = os.replace,
) -> Path:
    """Call ``write(tmp)``, then ``publish(tmp, path)`` (a rename): no reader sees a partial file.

    Every dwskd file goes through here, so a failed write is reported once, well: naming
    ``path`` (not the temporary name), a full disk as "No space left on <path> (needed about
    N MB)" (``size``: the expected bytes, when known) instead of a serialiser's "unexpected
    pos", and the temporary file removed without a second error. The temporary name keeps
    ``path``'s suffix (torch.export wants ``.pt2``); the file gets :func:`new_file_mode`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, new_file_mode())
        publish(tmp, path)
    except Exception as err:
        failure = write_failure(path, tmp, err, size)
        if failure is None:
            raise
        raise failure from err
    finally:
        with contextlib.suppress(OSError):  # e.g. EROFS: the failure above is the one to report
            tmp.unlink(missing_ok=True)
    return path


NO_SPACE = {errno.ENOSPC: "No space left on", errno.EDQUOT: "Disk quota exceeded for"}
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
SHORT_WRITE = "unexpected pos"  # torch's archive writer: a write fell short, errno lost
NEARLY_FULL = 64 << 20  # free bytes below which a short write means a full disk


def write_failure(
    path: Path, tmp: Path, err: Exception, size: int | None = None
) -> OutputError | None:
    """A failed write of ``path`` as an error that says what happened; None: not an I/O failure.

    Serialisers report a full disk in their own words: safetensors "No space left on device
    (os error 28)", torch "[enforce fail ...] unexpected pos" (which a quota or a failing
    disk gives too: it counts as a full disk only when the disk has next to nothing free).
    """
    text, code = str(err), getattr(err, "errno", None)
    if code not in NO_SPACE and ("No space left on device" in text or "os error 28" in text):
        code = errno.ENOSPC
    folder = existing_folder(path)
    if code in NO_SPACE or SHORT_WRITE in text:
        written = 0
        with contextlib.suppress(OSError):
            written = tmp.stat().st_size  # what it wrote before it failed
        free = shutil.disk_usage(folder).free
        needed = f"needed about {_mb(size)}" if size else f"needed more than {_mb(written)}"
        if code in NO_SPACE or free < max(size or written, NEARLY_FULL):
            return OutputError(
                errno.ENOSPC if code is None else code,
                f"{NO_SPACE.get(code, NO_SPACE[errno.ENOSPC])} {path} ({needed}, {_mb(free)} "
                f"free on {folder}). Free some space or write to another disk; no partial file "
                "was left.",
            )
        return OutputError(
            errno.EIO,
            f"Could not write {path}: the writer stopped short ({text.strip()}) although "
            f"{_mb(free)} are free on {folder}; a disk quota or a failing disk? No partial file "
            "was left.",
        )
    if code in NOT_WRITABLE:
        return OutputError(
            code,
            f"Cannot write {path}: {os.strerror(code)} in {folder}. Choose a folder you can "
            "write; no partial file was left.",
        )
    return None


def _mb(size: int | None) -> str:
    return f"{(size or 0) / 1e6:.1f} MB"


def existing_folder(path: Path) -> Path:
    """The nearest existing folder at or above ``path``: where missing folders would be made."""
    folder = Path(path).expanduser().absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def new_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` gives a new file (group/others may read it).

    Why: some writers (safetensors) create their file 0600, so a teammate on a shared
    cluster could not read the weights of a run.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):  # Linux: read, do not set
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    umask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    """The parsed file, or None when there is no such file."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
