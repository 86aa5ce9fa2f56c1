"""``python -m dwskd.evaluate`` / ``dwskd-eval``: score a model on a labelled test-only folder.

Example (a 4-class tumour model on a 2-class external set)::

    python -m dwskd.evaluate model_dir=outputs/brain_mri/dwskd/<run> data.root=/data/hospital_b \\
        'class_map={no_tumor: no_tumor, tumor: [glioma_tumor, meningioma_tumor, pituitary_tumor]}'

Why a separate command: a model is deployed where data differ from its training set, and the
question there is how it does on *that* data, scored the way the run scored its own test
split. Images get the model's own preprocessing (from its config.json); external classes map
onto the model's (several model classes summed into one external class: the task is then
scored on the external classes). Writes into ``out``: ``metrics.json`` (with bootstrap
intervals and ECE), ``report.md``, ``predictions.csv`` and ``plots/`` (confusion matrix,
ROC, reliability diagram); an existing non-empty ``out`` is refused.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from dwskd import CONFIG_DIR, io
from dwskd.commands import accept_renamed_options, plain_user_errors
from dwskd.data.checks import check_several_classes, check_single_label, file_digests, scan_split
from dwskd.inference import (
    InferenceError,
    LoadedModel,
    Predictions,
    check_policy,
    load,
    run_model,
)
from dwskd.io import check_writable, refuse_existing_folder
from dwskd.metrics import INTERVAL_METRICS, require_int, score, scoring_options

if TYPE_CHECKING:  # torch is imported where it is used: --help and refusals stay instant
    import torch


class EvaluationError(InferenceError):
    """Options or data of dwskd.evaluate that cannot work; the message says what to do."""


# ------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class Task:
    """The classes scored: each external class and the model classes summed into it."""

    classes: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]  # model class indices per scored class
    model_labels: tuple[str, ...]

    @property
    def grouped(self) -> bool:
        return any(len(m) > 1 for m in self.members)

    @property
    def dropped(self) -> list[str]:
        """Model classes no external class maps to: their probability is left out."""
        used = {i for m in self.members for i in m}
        return [c for i, c in enumerate(self.model_labels) if i not in used]

    @property
    def renamed(self) -> bool:
        """Whether some scored class is not just the model class of the same name."""
        return any(
            [self.model_labels[i] for i in m] != [c]
            for c, m in zip(self.classes, self.members, strict=True)
        )

    def scored_as(self, model_class: Any) -> str | None:
        """The scored class a model class counts for; None when no scored class covers it."""
        for c, m in zip(self.classes, self.members, strict=True):
            if any(self.model_labels[i] == model_class for i in m):
                return c
        return None

    @property
    def class_map(self) -> dict[str, list[str]]:
        return {
            c: [self.model_labels[i] for i in m]
            for c, m in zip(self.classes, self.members, strict=True)
        }

    def probabilities(self, model_probs: torch.Tensor) -> torch.Tensor:
        """Model probabilities summed per scored class, renormalised if classes were dropped.

        Renormalising restricts the model to the classes present, as a softmax over their
        logits alone would (the usual practice for label subsets, e.g. ImageNet-R).
        """
        import torch

        probs = torch.stack([model_probs[:, list(m)].sum(dim=1) for m in self.members], dim=1)
        if self.dropped:
            probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return probs


def _as_lists(class_map: Any) -> dict[str, list[str]]:
    """``class_map`` as {external: [model classes]}; a single model class becomes a list."""
    if class_map is None:
        return {}
    if OmegaConf.is_config(class_map):
        class_map = OmegaConf.to_container(class_map, resolve=True)
    if not isinstance(class_map, Mapping):
        raise EvaluationError(
            f"class_map={class_map!r} must be a dict, e.g. "
            "'class_map={no_tumor: notumor, tumor: [glioma, meningioma, pituitary]}'."
        )
    return {
        str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in class_map.items()
    }


def _check_class_map(mapping: dict, external: Sequence[str], labels: Sequence[str]) -> None:
    """Every name in the map must exist, and every external class must reach a model class."""
    stray = sorted(set(mapping) - set(external))
    if stray:
        raise EvaluationError(
            f"class_map names {stray}, which are not class folders of data.root "
            f"(found {list(external)})."
        )
    unknown = sorted({m for ms in mapping.values() for m in ms} - set(labels))
    if unknown:
        raise EvaluationError(
            f"class_map maps onto {unknown}, which are not classes of the model "
            f"(its labels: {list(labels)})."
        )
    unmapped = [e for e in external if e not in mapping and e not in labels]
    if unmapped:
        raise EvaluationError(
            f"The classes {unmapped} of data.root are not classes of the model and class_map "
            f"does not map them. The model's labels: {list(labels)}. Add e.g. "
            f"'class_map={{{unmapped[0]}: {labels[0]}}}' (a list of model classes sums them)."
        )


def build_task(external: Sequence[str], labels: Sequence[str], class_map: Any) -> Task:
    """The scored classes: external classes, each with the model classes it covers.

    Order: when every external class covers one model class, the model's order (the model's
    own task, renamed or a subset); when classes are grouped, the sorted external names.
    """
    mapping = _as_lists(class_map)
    _check_class_map(mapping, external, labels)
    groups = {e: mapping.get(e, [e]) for e in external}
    owners: dict[str, str] = {}
    for e, members in groups.items():
        for m in members:
            if m in owners:
                raise EvaluationError(
                    f"Model class {m!r} is mapped from both {owners[m]!r} and {e!r}; "
                    "each model class can count for one external class only."
                )
            owners[m] = e
    if all(len(m) == 1 for m in groups.values()):
        order = sorted(external, key=lambda e: list(labels).index(groups[e][0]))
    else:
        order = sorted(external)
    members = tuple(tuple(list(labels).index(m) for m in groups[e]) for e in order)
    return Task(tuple(order), members, tuple(labels))


def chosen_positive(requested: Any, loaded: LoadedModel, task: Task) -> Any:
    """``positive_class=`` if given, else the run's own positive class, through ``class_map``.

    Why through the map: with ``{sick: COVID, healthy: NonCOVID}`` the positive class must
    stay the one the model calls COVID; a default by position would silently swap
    sensitivity and specificity. A binary renamed task with no way to tell is refused.
    """
    if requested is not None:
        return requested
    trained = loaded.provenance.get("positive_class")
    if not task.renamed:  # the model's own class names (or a subset): as always
        return trained if trained in task.classes else None
    if len(task.classes) != 2 or (trained is None and task.grouped):
        return None  # multiclass, or a multiclass model's classes grouped: index 1 as always
    followed = task.scored_as(trained)
    if followed is None:
        raise EvaluationError(unknown_positive_message(loaded, task, trained))
    return followed


def unknown_positive_message(loaded: LoadedModel, task: Task, trained: Any) -> str:
    """Why the positive class of a renamed binary task is unknown, and the option to give."""
    config = loaded.folder / "config.json"
    if trained is None:
        why = f"the model records no positive class ({config} has no dwskd.positive_class)"
    else:
        why = f"the model's positive class {trained!r} ({config}) is not mapped to any of them"
    return (
        f"class_map renames the model's classes ({task.class_map}) and {why}, so it is unknown "
        f"which of {list(task.classes)} is positive for ROC, sensitivity and specificity. "
        f"Give positive_class=<one of {list(task.classes)}>."
    )


def positive_source(
    requested: Any, chosen: Any, positive: int | None, trained: Any = None
) -> str | None:
    """Where the positive class came from, for the report; ``trained``: the run's own one."""
    if positive is None:
        return None
    if requested is not None:
        return "positive_class="
    if chosen is None:
        return "default: class index 1"
    if trained is not None and trained != chosen:
        return f"the run's data.positive_class {trained!r}, through class_map"
    return "the run's data.positive_class"


def positive_index(task: Task, positive_class: Any) -> int | None:
    """The positive class of a binary task (``positive_class``, default index 1); else None."""
    if len(task.classes) != 2:
        if positive_class is not None:
            raise EvaluationError(
                f"positive_class={positive_class} applies to binary tasks; this one has "
                f"{len(task.classes)} classes {list(task.classes)}."
            )
        return None
    if positive_class is None:
        return 1
    if str(positive_class) in task.classes:
        return task.classes.index(str(positive_class))
    if positive_class in (0, 1):
        return int(positive_class)
    raise EvaluationError(
        f"positive_class={positive_class!r} is not a class of the task {list(task.classes)}."
    )


# ------------------------------------------------------------------------- inputs and options
def check_options(cfg: DictConfig) -> None:
    """Refuse option values that cannot work, naming them, before any model is loaded.

    Why here: a bad value used to surface only deep inside the work, as an IndexError of
    the bootstrap or a torchmetrics error that named no option.
    """
    check_policy(cfg.data.bad_images, "data.bad_images")
    try:
        scoring_options(cfg.bootstrap, cfg.calibration_bins)
        require_int("saliency", cfg.saliency, 0, "an integer >= 0 (0: no saliency maps)")
        require_int("batch_size", cfg.batch_size, 1, "an integer >= 1")
    except ValueError as refused:
        raise EvaluationError(str(refused)) from None
    if cfg.out is not None:
        check_writable(Path(str(cfg.out)), "out")
    else:
        check_writable(Path(str(cfg.output_root)), "output_root")


def check_preprocessing(data: DictConfig, preprocessing: Any, allow_resize: bool) -> dict:
    """Refuse ``data.img_size``/``data.channels`` that differ from the model's, unless allowed.

    The model only works at the size and channels it was trained with; a differing value on
    the command line means the user expects something else, so it is named, not ignored.
    """
    model = {"img_size": preprocessing.img_size, "channels": preprocessing.in_chans}
    asked = {k: data.get(k) for k in model if data.get(k) is not None}
    differ = {k: v for k, v in asked.items() if int(v) != model[k]}
    if differ and not allow_resize:
        listed = ", ".join(
            f"data.{k}={v} but the model takes {model[k]}" for k, v in differ.items()
        )
        raise EvaluationError(
            f"{listed} (its config.json). It is evaluated with its own preprocessing: drop "
            "those options, or add allow_resize=true to resize the images to the model's anyway."
        )
    if differ:
        warnings.warn(f"allow_resize=true: images prepared as the model's {model}", stacklevel=2)
    return {"requested": asked, "used": model}


def labelled_folder(root: Any) -> tuple[Path, dict[str, list[Path]]]:
    """``<root>/test/<class>/*`` when there is a test/ folder, else ``<root>/<class>/*``."""
    root = Path(str(root)).expanduser().absolute()
    if not root.is_dir():
        raise EvaluationError(
            f"data.root={root} does not exist. Lay the test images out as <root>/<class>/<image> "
            "or <root>/test/<class>/<image>."
        )
    folder = root / "test" if (root / "test").is_dir() else root
    files = scan_split(folder)
    check_several_classes(list(files), where=str(folder))
    check_single_label({"test": files}, file_digests(p for ps in files.values() for p in ps))
    return folder, files


def output_dir(cfg: DictConfig, loaded: LoadedModel) -> Path:
    """``out``, or ``<output_root>/evaluate/<model>_<time>``; a non-empty folder is refused."""
    if cfg.out is not None:
        out = Path(str(cfg.out)).expanduser()
    else:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        out = Path(str(cfg.output_root)) / "evaluate" / f"{loaded.name}_{stamp}"
    refuse_existing_folder(out, "out", "or leave it out for a new time-stamped folder")
    return out


# ------------------------------------------------------------------------- the command
@dataclass
class Scored:
    """The task and what is scored on it: task probabilities and targets of readable images."""

    task: Task
    positive: int | None
    predictions: Predictions
    probs: torch.Tensor
    targets: torch.Tensor


def command_line() -> str:
    """The command as typed (under Hydra), for the report; in-process calls say so."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "(in-process evaluation)"
    return " ".join(["python -m dwskd.evaluate", *HydraConfig.get().overrides.task])


def predict_folder(
    cfg: DictConfig, loaded: LoadedModel, files: Mapping[str, list[Path]], task: Task
) -> tuple[Predictions, torch.Tensor]:
    """Predict every image; return the predictions and task targets of the readable ones."""
    import torch

    paths = [p for c in files for p in files[c]]
    labels = [task.classes.index(c) for c in files for _ in files[c]]
    predictions = run_model(
        loaded,
        paths,
        batch_size=cfg.batch_size,
        bad_images=cfg.data.bad_images,
        device=cfg.device,
        progress=cfg.progress,
        option="data.bad_images",
    )
    targets = torch.as_tensor([labels[i] for i in predictions.index], dtype=torch.long)
    missing = [c for i, c in enumerate(task.classes) if not (targets == i).any()]
    if missing:
        raise EvaluationError(f"No readable image left in the class folder(s) {missing}.")
    return predictions, targets


def collect_results(
    cfg: DictConfig, loaded: LoadedModel, preprocessing: dict, folder: Path, scored: Scored
) -> dict[str, Any]:
    """Everything metrics.json holds (the report and the plots are drawn from it)."""
    task, positive, probs, targets = scored.task, scored.positive, scored.probs, scored.targets
    skipped = scored.predictions.skipped
    bootstrap, bins = scoring_options(cfg.bootstrap, cfg.calibration_bins)
    scores = score(probs, targets, task.classes, positive, n_bins=bins, bootstrap=bootstrap)
    return {
        "command": command_line(),
        "time": io.now_iso(),
        "model": {
            "name": loaded.name,
            "folder": str(loaded.folder),
            "architecture": loaded.config.get("architecture"),
            "labels": list(loaded.label_names),
            "provenance": loaded.provenance,
        },
        "data": {
            "root": str(cfg.data.root),
            "folder": str(folder),
            "n_images": len(targets),
            "n_skipped": len(skipped),
            "class_counts": {c: int((targets == i).sum()) for i, c in enumerate(task.classes)},
            "skipped": [{"file": str(p), "error": e} for p, e in skipped],
        },
        "preprocessing": preprocessing,
        "task": {
            "classes": list(task.classes),
            "class_map": task.class_map,
            "dropped_model_classes": task.dropped,
            "positive_class": None if positive is None else task.classes[positive],
        },
        **scores,  # metrics, per_class, calibration, intervals, bootstrap
        "device": str(cfg.device),
    }


def write_outputs(out: Path, results: dict, scored: Scored, folder: Path) -> dict[str, Path]:
    """predictions.csv, the plots, report.md, then metrics.json, by the one renderer."""
    from dwskd.report import write_evaluation

    files = [str(f.relative_to(folder)) for f in scored.predictions.files]
    predictions = (scored.probs.numpy(), scored.targets.numpy())
    return write_evaluation(out, results, predictions, files)


def write_saliency(
    cfg: DictConfig, loaded: LoadedModel, scored: Scored, folder: Path, out: Path
) -> list[Path]:
    """``saliency=N``: overlays of the first N images, for a reviewer to see where it looks.

    The map explains the true class when that is one model class, else the predicted one.
    """
    import torch

    from dwskd.data.folder import read_image
    from dwskd.data.transforms import eval_transform
    from dwskd.saliency import write_overlays

    p = loaded.preprocessing
    files = scored.predictions.files[: int(cfg.saliency)]
    transform = eval_transform(p.img_size, p.mean, p.std, p.standardize)
    decoded = [read_image(f, p.img_size, p.in_chans) for f in files]
    images = torch.stack([transform(image=d)["image"] for d in decoded])
    raw = [read_image(f, _display_size(f), p.in_chans) for f in files]
    names = [str(f.relative_to(folder)) for f in files]
    targets = None
    if not scored.task.grouped:
        targets = [scored.task.members[int(t)][0] for t in scored.targets[: len(files)]]
    labels = list(loaded.label_names)
    return write_overlays(loaded.model, images, raw, names, out / "saliency", labels, targets)


def _display_size(path: Path) -> int:
    """The overlay's side: the image's larger side (squashed as the model's input), <= 512."""
    from PIL import Image

    with Image.open(path) as image:
        return min(max(image.size), 512)


def summary(results: Mapping[str, Any], out: Path) -> str:
    """The headline numbers and where the full report is."""
    m, ci, data = results["metrics"], results["intervals"], results["data"]
    lines = [
        f"evaluated {results['model']['folder']} on {data['n_images']} image(s) of "
        f"{data['folder']} ({data['n_skipped']} skipped)"
    ]
    for key in INTERVAL_METRICS:
        lines.append(f"  {key}: {m[key]:.4f} [{ci[key]['low']:.4f}, {ci[key]['high']:.4f}]")
    lines.append(f"  ece: {m['ece']:.4f}")
    lines.append(f"wrote {out / 'report.md'} and {out / 'metrics.json'}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model_dir`` on ``cfg.data.root`` and write ``out``; every check comes first."""
    check_options(cfg)
    loaded = load(str(cfg.model_dir), cfg.model_name, option="model_dir")
    preprocessing = check_preprocessing(cfg.data, loaded.preprocessing, bool(cfg.allow_resize))
    preprocessing.update(mean=list(loaded.preprocessing.mean), std=list(loaded.preprocessing.std))
    out = output_dir(cfg, loaded)
    folder, files = labelled_folder(cfg.data.root)
    task = build_task(list(files), loaded.label_names, cfg.class_map)
    chosen = chosen_positive(cfg.positive_class, loaded, task)
    positive = positive_index(task, chosen)
    predictions, targets = predict_folder(cfg, loaded, files, task)
    scored = Scored(task, positive, predictions, task.probabilities(predictions.probs), targets)
    results = collect_results(cfg, loaded, preprocessing, folder, scored)
    trained = loaded.provenance.get("positive_class")
    results["task"]["positive_source"] = positive_source(
        cfg.positive_class, chosen, positive, trained
    )
    if int(cfg.saliency) > 0:
        overlays = write_saliency(cfg, loaded, scored, folder, out)
        results["saliency"] = [str(p) for p in overlays]
    write_outputs(out, results, scored, folder)
    print(summary(results, out))
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with plain_user_errors():
        run(cfg)


def main() -> None:
    """Console script ``dwskd-eval``."""
    accept_renamed_options("dwskd-eval")
    _hydra_main()


if __name__ == "__main__":
    main()
