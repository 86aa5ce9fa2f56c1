"""Hydra entry point: ``python -m dwskd.run [group=option ...] [key=value ...]`` (or ``dwskd``).

It only composes the config, runs the stage pipeline in the run's own directory, and returns
``optimized_metric`` (a validation metric of the deployed model by default) to sweepers.
Hydra's own ``.hydra/`` output is off (``hydra.output_subdir: null``): dwskd writes those files
itself once the run dir is accepted, so a refused run changes nothing there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from dwskd import CONFIG_DIR  # noqa: E402  (conf/ of a checkout, dwskd/conf/ of a wheel)
from dwskd.commands import plain_user_errors  # noqa: E402

log = logging.getLogger(__name__)


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """The three files Hydra would write to ``.hydra/``: config, hydra config, overrides."""
    hydra_cfg = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
    }


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from dwskd.pipeline import optimized_value, run_pipeline

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    command = " ".join(["python -m dwskd.run", *HydraConfig.get().overrides.task])
    with plain_user_errors():  # a refusal prints its message, not a traceback
        results = run_pipeline(cfg, out_dir, command=command, hydra_files=hydra_files(cfg))
    if not results:
        return None
    value = optimized_value(results, cfg.optimized_metric)
    log.info(
        "deployed %s: %s %s (the value returned to sweepers); report: %s",
        results["deployed"],
        cfg.optimized_metric,
        "n/a" if value is None else f"{value:.4f}",
        out_dir / "report.md",
    )
    return value


if __name__ == "__main__":
    main()
