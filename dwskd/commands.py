"""Small Hydra commands (predict, evaluate, export): their configs and their ``main()``.

Light on purpose (no torch): ``--help`` and bad arguments are answered before the heavy
imports. Why a ConfigStore: ``conf/`` holds a ``model`` config group, so with
``config_path=conf`` Hydra would read ``model=<path>`` as a choice of that group ("No match
in the defaults list"); a command's own yaml stored under another name, composed with
``config_path=None``, keeps ``model`` a plain value.

Every command (these, ``dwskd.run`` and ``dwskd-select``) runs its work inside
:func:`plain_user_errors`, so a refusal prints its message, not a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
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


def command_config(name: str) -> str:
    """Store ``conf/<name>.yaml`` in Hydra's ConfigStore; return the name to compose."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from dwskd import CONFIG_DIR

    stored = f"dwskd_{name}"
    ConfigStore.instance().store(
        name=stored, node=OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml")
    )
    return stored


def compose_command(name: str, overrides: Sequence[str] = ()) -> Any:
    """The command's config with ``key=value`` overrides, as its CLI composes it (tests, API)."""
    from hydra import compose, initialize

    stored = command_config(name)
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name=stored, overrides=list(overrides))


def hydra_main(name: str, run: Callable[[Any], Any]) -> Callable[[], None]:
    """A console script's ``main()``: Hydra parses ``key=value`` arguments, then ``run(cfg)``."""

    def main() -> None:
        import hydra

        @functools.wraps(run)
        def task(cfg: Any) -> Any:
            with plain_user_errors():
                return run(cfg)

        task.__module__ = _import_name(run)  # Hydra's job name (``-m`` makes it __main__)
        hydra.main(config_path=None, config_name=command_config(name), version_base="1.3")(task)()

    return main


def _import_name(function: Callable) -> str:
    """The module a function comes from, as imported (``dwskd.predict``, also under ``-m``)."""
    spec = getattr(sys.modules.get(function.__module__), "__spec__", None)
    return spec.name if spec is not None else function.__module__


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
