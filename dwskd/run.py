"""Hydra entry point: ``python -m dwskd.run [group=option ...] [key=value ...]`` (or ``dwskd``).

It only composes the config, runs the stage pipeline in the run's own directory, and prints
where the results are. Everything else lives in :mod:`dwskd.pipeline`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dwskd.pipeline import run_pipeline  # noqa: E402

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def deployed_test_accuracy(results: dict) -> float | None:
    """The number a sweeper optimises: test accuracy of the deployed model."""
    models = results.get("models", {})
    deployed = results.get("deployed")
    return models.get(deployed, {}).get("test", {}).get("acc") if deployed else None


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    command = " ".join(["python -m dwskd.run", *HydraConfig.get().overrides.task])
    results = run_pipeline(cfg, out_dir, command=command)
    if results:
        log.info(
            "deployed %s: test acc %.4f; report: %s",
            results["deployed"],
            deployed_test_accuracy(results),
            out_dir / "report.md",
        )
    return deployed_test_accuracy(results)


if __name__ == "__main__":
    main()
