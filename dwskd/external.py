"""External test sets: a run's models scored on images from other sources (``data.external``).

Why in every run: a model that ranks well on its own test split can be at chance in another
hospital (a source shortcut). Each data config names its external sets with the class map
and positive class they need; the test stage scores the deployed model and the teacher on
each of them with ``dwskd-eval``'s own code (the same preprocessing, metrics, bootstrap
intervals and ECE), and writes ``<run>/external/<set>/<model>/`` (report.md, metrics.json,
predictions.csv, plots) beside the run's own report. External sets are for evaluation only:
nothing here trains or chooses on them.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dwskd.rundir import RunLayout

log = logging.getLogger(__name__)

# What metrics.json keeps of each external score (the full record is in the set's folder).
SUMMARY_METRICS = ("acc", "balanced_acc", "auroc", "f1_macro", "ece", "sensitivity", "specificity")


def external_sets(data: DictConfig) -> dict[str, dict[str, Any]]:
    """``data.external`` as plain dicts; a set set to null (``data.external.<set>=null``) is off.

    Null is also how a config that inherits a parent's set drops it (brain_mri_tumour_type has
    no notumor class, so brain_mri's glioma-vs-notumor set cannot score it).
    """
    given = data.get("external")
    sets = OmegaConf.to_container(given, resolve=True) if given else {}
    return {name: spec for name, spec in sets.items() if spec is not None}


def check_external_sets(sets: Mapping[str, Mapping[str, Any]]) -> None:
    """Fail before training when a named set cannot be scored (missing folder, no root)."""
    for name, spec in sets.items():
        root = spec.get("root")
        if not root:
            raise ValueError(
                f"data.external.{name} has no root: give data.external.{name}.root=<folder of "
                "<class>/<image>>, or drop the set with data.external.{name}=null."
            )
        if not Path(str(root)).is_dir():
            raise FileNotFoundError(
                f"data.external.{name}.root={root} does not exist. Put the external set there "
                f"(see its data config), or skip it: data.external.{name}=null "
                "(or eval.external=false for every set)."
            )


def evaluation_options(model_folder: Path, spec: Mapping[str, Any], out: Path) -> DictConfig:
    """``dwskd-eval``'s own config (conf/evaluate.yaml) for one model on one external set."""
    from dwskd import CONFIG_DIR

    base = OmegaConf.load(Path(CONFIG_DIR) / "evaluate.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    given = {
        "model_dir": str(model_folder),
        "data": {"root": str(spec["root"])},
        "class_map": spec.get("class_map"),
        "positive_class": spec.get("positive_class"),
        "out": str(out),
        "progress": False,
    }
    return OmegaConf.merge(base, given)


def summarise(results: Mapping[str, Any], folder: Path, run_root: Path) -> dict[str, Any]:
    """The figures a table needs: headline metrics, their intervals, the confusion matrix."""
    metrics = results["metrics"]
    return {
        "n_images": results["data"]["n_images"],
        "class_counts": results["data"]["class_counts"],
        "classes": results["task"]["classes"],
        "positive_class": results["task"]["positive_class"],
        "metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
        "intervals": results["intervals"],
        "confusion": metrics["confmat"],  # rows: true class, columns: predicted (task classes)
        "report": str((folder / "report.md").relative_to(run_root)),
    }


def score_model(model_folder: Path, spec: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Score one exported model on one set into ``out``; a finished ``out`` is read back.

    It is scored into ``<out>.partial`` and renamed when complete, so that a run killed here
    resumes by scoring again rather than meeting a half-written folder.
    """
    from dwskd import evaluate
    from dwskd.io import read_json

    if (out / "metrics.json").is_file():
        return read_json(out / "metrics.json")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # this run's own unfinished scoring
    results = evaluate.run(evaluation_options(model_folder, spec, partial))
    partial.rename(out)
    return results


def score_external(
    exports: Mapping[str, Path], sets: Mapping[str, Mapping[str, Any]], run_root: Path
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every model in ``exports`` ({name: export folder}) on every set: {set: {model: summary}}."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name, spec in sets.items():
        for model, folder in exports.items():
            out = RunLayout(run_root).external_dir(set_name, model)
            log.info("external set %s: scoring %s", set_name, model)
            results = score_model(Path(folder), spec, out)
            scores.setdefault(set_name, {})[model] = summarise(results, out, run_root)
    return scores
