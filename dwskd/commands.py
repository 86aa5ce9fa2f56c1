"""Small Hydra commands (predict, evaluate, export): their configs and their ``main()``.

Light on purpose (no torch): ``--help`` and bad arguments are answered before the heavy
imports. Why a ConfigStore: ``conf/`` holds a ``model`` config group, so with
``config_path=conf`` Hydra would read ``model=<path>`` as a choice of that group ("No match
in the defaults list"); a command's own yaml stored under another name, composed with
``config_path=None``, keeps ``model`` a plain value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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

        hydra.main(config_path=None, config_name=command_config(name), version_base="1.3")(run)()

    return main
