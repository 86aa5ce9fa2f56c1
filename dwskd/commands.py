"""What every command shares: plain user errors, and the renamed ``model=`` option.

Light on purpose (no torch): ``--help`` and bad arguments are answered before the heavy
imports. Every command (``dwskd.run``, ``dwskd-select``, ``dwskd-predict``, ``dwskd-eval``,
``dwskd-export``) is a plain ``@hydra.main(config_path=CONFIG_DIR, config_name=<its yaml>)``
that runs its work inside :func:`plain_user_errors`, so a refusal prints its message, not a
traceback.

Why ``model_dir=``: predict, evaluate and export once took the model's path as ``model=``, but
``conf/`` holds a ``model`` config group, so Hydra read ``model=<path>`` as a choice of that
group. They now take ``model_dir=``; :func:`accept_renamed_options` still reads ``model=`` on
their command line, with a one-line warning.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException, InstantiationException
from hydra.experimental.callback import Callback

PACKAGE_DIR = Path(__file__).resolve().parent


class UserError(CompactHydraException):
    """A user error in a multirun job: Hydra prints it compactly (its cause is the original)."""


def is_user_error(err: BaseException) -> bool:
    """dwskd's answer to bad input, whose message says what to do (not a bug's symptom).

    That is an error of dwskd's own classes (RunDirError, DataError, ExportError,
    EvaluationError, OutputError, ...), or a ValueError / FileExistsError raised by dwskd's
    own code (option checks, refusals to overwrite), not one from inside a library.
    """
    if type(err).__module__.partition(".")[0] == "dwskd":
        return True
    return isinstance(err, ValueError | FileExistsError) and _raised_by_dwskd(err)


def user_error(err: BaseException) -> BaseException | None:
    """The user error ``err`` is, or wraps (Hydra's ``instantiate`` wraps the errors of the
    constructors it calls, e.g. a DataError of a datamodule); None for any other error."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err if is_user_error(err) else None


def _raised_by_dwskd(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in the dwskd package."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


@contextlib.contextmanager
def plain_user_errors() -> Iterator[None]:
    """A user error ends the command with its message alone on stderr and exit code 1.

    Why: Hydra prints a traceback before every error, which buries a refusal's message.
    ``HYDRA_FULL_ERROR=1`` still gives the traceback; other errors (bugs) keep theirs. In a
    multirun the error goes on to Hydra as a compact one: the other jobs still run, and
    Hydra names the failed job's overrides above the message. Called inside the task
    function, so Hydra still names the job after the command's module.
    """
    try:
        yield
    except Exception as err:
        refusal = user_error(err)
        if refusal is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if _multirun():
            raise UserError(str(refusal)) from err
        sys.stderr.write(f"{refusal}\n")
        raise SystemExit(1) from err


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def compose_command(name: str, overrides: Sequence[str] = ()) -> Any:
    """``conf/<name>.yaml`` with ``key=value`` overrides, as its command composes it (tests, API)."""
    from hydra import compose, initialize_config_dir

    from dwskd import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


# ------------------------------------------------------------------------- renamed options
#: Options renamed on the command line: old key -> new key (``model=`` was the model's path).
RENAMED_OPTIONS = {"model": "model_dir"}


def accept_renamed_options(command: str, argv: list[str] | None = None) -> list[str]:
    """Rewrite renamed ``key=value`` arguments (``model=``) to their new key, in place in
    ``argv`` (``sys.argv`` by default) before Hydra parses them; one warning line on stderr.

    Only the exact old key: ``model_name=`` and ``model_dir=`` pass unchanged.
    """
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv[1:], start=1):
        key, equals, value = arg.partition("=")
        if equals and key in RENAMED_OPTIONS:
            new = RENAMED_OPTIONS[key]
            argv[i] = f"{new}={value}"
            sys.stderr.write(
                f"{command}: {key}= is deprecated and will be removed; use {new}= "
                f"(read {key}={value} as {new}={value}).\n"
            )
    return argv


class KeepEarlierSweepConfig(Callback):
    """Hydra callback: a sweep launched again into the same sweep dir keeps the first launch's
    ``multirun.yaml`` (renamed ``multirun.<time>.yaml``) instead of writing over it.

    Why: Hydra's sweepers rewrite it at every launch, so a re-launch with other options (whose
    jobs dwskd then refuses) would erase the record of how the sweep's runs were made.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        import datetime as dt

        earlier = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if earlier.is_file():
            stamp = dt.datetime.fromtimestamp(earlier.stat().st_mtime).strftime("%Y%m%d-%H%M%S-%f")
            earlier.rename(earlier.with_name(f"multirun.{stamp}.yaml"))
