"""logger=wandb: one W&B run per dwskd run, read back from the files W&B writes offline.

W&B (0.31) writes an offline run as ``<run>/wandb/offline-run-<time>-<id>/run-<id>.wandb``: a
LevelDB-style log of protobuf records (run with its config, config and summary updates,
history rows, metric definitions, artifacts), the same file ``wandb sync`` uploads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from dwskd import pipeline
from dwskd.io import read_json
from dwskd.loggers import summary_figures
from dwskd.pipeline import run_pipeline
from tests.conftest import CONFIG_DIR, TINY

BLOCK, CHUNK_HEADER = 32768, 7  # LevelDB log: 32 KiB blocks; chunk = crc(4) len(2) type(1)
FULL, LAST = 1, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file, in the order they were written."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # a block's zero-filled trailer
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts.append(data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


@dataclass
class Recorded:
    """What one process recorded into a W&B run."""

    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)
    step_metrics: dict[str, str] = field(default_factory=dict)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None


def values(items: Any) -> dict[str, Any]:
    """Config or summary items of a record as {key: value} (nested keys joined by "/")."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_offline_run(folder: Path) -> Recorded:
    """Replay one ``offline-run-*`` folder's records into config, summary, history keys, ..."""
    seen = Recorded()
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            seen.run = record.run
        updates = {"run": record.run.config.update, "config": record.config.update}.get(kind, [])
        seen.config.update(values(updates))
        if kind == "summary":
            seen.summary.update(values(record.summary.update))
        elif kind == "history":
            seen.history_keys |= set(values(record.history.item))
        elif kind == "metric" and record.metric.step_metric:
            seen.step_metrics[record.metric.glob_name] = record.metric.step_metric
        elif kind == "artifact":
            seen.artifacts.append(record.artifact)
        elif kind == "exit":
            seen.exit_code = record.exit.exit_code
    return seen


def compose_under_hydra(*overrides: str) -> DictConfig:
    """The real config with HydraConfig set, as in ``python -m dwskd.run <overrides>``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Recorded]]:
    """One tiny dwskd run with logger=wandb, killed in its test stage, then resumed."""
    tmp = tmp_path_factory.mktemp("wandb")
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            mp.setenv(var, str(tmp / var.lower()))
        mp.setenv("WANDB_MODE", "offline")
        cfg = compose_under_hydra(
            "logger=wandb", "method.distill.temperature=3.0", "eval.plots=true"
        )
        try:
            with mp.context() as crash:
                crash.setattr(pipeline, "test_stage", _crash)
                with pytest.raises(RuntimeError, match="killed"):
                    run_pipeline(cfg, out)
            run_pipeline(cfg, out)
        finally:
            HydraConfig.instance().cfg = None
    folders = sorted((out / "wandb").glob("offline-run-*"))
    return out, [read_offline_run(f) for f in folders]


def _crash(*args: Any) -> None:
    raise RuntimeError("killed in the test stage")


def test_one_wandb_run_continued_on_resume(wandb_run: tuple[Path, list[Recorded]]) -> None:
    out, recorded = wandb_run
    run_id = read_json(out / "record.json")["trackers"]["wandb"]
    assert len(recorded) == 2, "one offline folder per process: the first and the resumed one"
    assert {r.run.run_id for r in recorded} == {run_id}
    first, resumed = recorded
    assert (first.exit_code, resumed.exit_code) == (1, 0), "the killed process marks it failed"
    # Every stage logged into the one run, under its prefix and on its own step axis.
    for key in ("teacher/train/loss", "train/train/student_b/partner_kd_step", "finetune/val/acc"):
        assert key in first.history_keys, sorted(first.history_keys)
    assert first.step_metrics["train/*"] == "train/global_step"


def test_run_name_group_and_job_type(wandb_run: tuple[Path, list[Recorded]]) -> None:
    run = wandb_run[1][-1].run
    assert "method.distill.temperature=3.0" in run.display_name
    assert (run.run_group, run.job_type) == ("synthetic-dwskd", "dwskd")


def test_config_is_the_full_resolved_config_plus_run_facts(wandb_run) -> None:
    out, recorded = wandb_run
    config = recorded[-1].config
    assert config["method.distill.temperature"] == 3.0
    assert config["model.depth"] == 2 and config["data.name"] == "synthetic"
    assert config["seed"] == 42 and config["run.stage_seeds.train"] == 44
    assert config["run.data.num_classes"] == 4
    deployed = json.loads((out / "metrics.json").read_text())["deployed"]
    assert config["run.deployed"] == deployed


def test_summary_has_stable_keys_for_every_model(wandb_run) -> None:
    out, recorded = wandb_run
    summary, saved = recorded[-1].summary, json.loads((out / "metrics.json").read_text())
    deployed = saved["deployed"]
    assert summary["deployed/model"] == deployed
    assert summary["deployed/test/acc"] == saved[deployed]["test"]["acc"]
    for name in ("deployed", "student_a", "student_b", "ensemble", "teacher"):
        for key in ("val/acc", "test/acc", "test/auroc", "params"):
            assert f"{name}/{key}" in summary, (name, key)
    assert summary["deployed/latency_ms"] == saved[deployed]["latency_ms"] > 0
    assert "teacher/latency_ms" in summary  # the ensemble has no latency of its own


def test_model_and_results_artifacts_and_predictions_table(wandb_run) -> None:
    out, recorded = wandb_run
    run_id = recorded[-1].run.run_id
    artifacts = {a.name: a for a in recorded[-1].artifacts}
    model = artifacts[f"model-{run_id}"]
    assert model.type == "model" and {"dwskd", "synthetic"} <= set(model.aliases)
    assert {"model.safetensors", "config.json"} <= {c.path for c in model.manifest.contents}
    results = {c.path for c in artifacts[f"results-{run_id}"].manifest.contents}
    assert {"report.md", "metrics.json"} <= results and any(p.startswith("plots/") for p in results)
    assert any(k.startswith("deployed/test/predictions/") for k in recorded[-1].history_keys)
    assert any(a.type == "run_table" for a in artifacts.values())
    media = list((out / "wandb").rglob("media/images/plots/*.png"))
    assert any("confmat_student_a" in p.name for p in media), media


def test_summary_names_external_sets_under_each_model() -> None:
    scores = {"auroc": 0.8, "acc": 0.7, "sensitivity": None}
    results = {
        "deployed": "student_b",
        "models": {"student_b": {"test": {"acc": 0.9, "per_class": [1]}, "params": 5}},
        "external": {"nih": {"student_b": {"metrics": scores}, "teacher": {"metrics": scores}}},
    }
    summary = summary_figures(results)
    assert summary["deployed/external/nih/auroc"] == 0.8
    assert summary["teacher/external/nih/acc"] == 0.7
    assert summary["deployed/test/acc"] == 0.9 and summary["deployed/params"] == 5
    assert not {"deployed/test/per_class", "deployed/external/nih/sensitivity"} & summary.keys()
