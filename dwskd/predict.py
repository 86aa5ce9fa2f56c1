"""``python -m dwskd.predict`` / ``dwskd-predict``: class probabilities for images, as a CSV.

Example::

    python -m dwskd.predict model_dir=outputs/synthetic/dwskd/<run> input=scans/ out=preds.csv

``model_dir`` is a finished run dir (its deployed model, or ``model_name=``) or an exported model
folder; ``input`` an image, a folder (recursive) or a .csv of paths. Writes ``out`` with the
columns ``file, predicted_label, prob_<class>...`` and never overwrites an existing file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
from omegaconf import DictConfig

from dwskd import CONFIG_DIR
from dwskd.commands import accept_renamed_options, plain_user_errors
from dwskd.inference import (
    InferenceError,
    Predictions,
    check_policy,
    list_inputs,
    load,
    run_model,
)
from dwskd.io import atomic_write, check_writable, refuse_existing


def write_predictions(out: Path, predictions: Predictions) -> Path:
    """One row per readable image: file, predicted label, one probability column per class."""
    names = predictions.label_names
    header = ["file", "predicted_label", *(f"prob_{c}" for c in names)]
    rows = [
        [str(f), label, *(f"{v:.6f}" for v in p)]
        for f, label, p in zip(
            predictions.files, predictions.predicted, predictions.probs.tolist(), strict=True
        )
    ]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])

    return atomic_write(out, write)


def summary(predictions: Predictions, model_folder: Path, out: Path) -> str:
    """What a user checks first: how many images, how many skipped (which), where written."""
    n, skipped = len(predictions.files), predictions.skipped
    lines = [f"predicted {n} image(s) with {model_folder}; {len(skipped)} skipped"]
    lines += [f"  skipped {path}: {reason}" for path, reason in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"  ... and {len(skipped) - 10} more")
    lines.append(f"wrote {out}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> Predictions:
    """Predict ``cfg.input`` with ``cfg.model_dir`` and write ``cfg.out`` (checks come first)."""
    out = Path(cfg.out).expanduser()
    refuse_existing(out)  # never overwrite earlier predictions: fail before any model loads
    check_writable(out, "out")
    check_policy(cfg.bad_images)
    files = list_inputs(cfg.input)
    loaded = load(str(cfg.model_dir), cfg.model_name, option="model_dir")
    predictions = run_model(
        loaded,
        files,
        batch_size=cfg.batch_size,
        bad_images=cfg.bad_images,
        device=cfg.device,
        progress=cfg.progress,
    )
    if not predictions.files:
        raise InferenceError(
            f"None of the {len(files)} input image(s) could be read (first: "
            f"{predictions.skipped[0][0]}: {predictions.skipped[0][1]}); nothing written."
        )
    write_predictions(out, predictions)
    print(summary(predictions, loaded.folder, out))
    return predictions


@hydra.main(config_path=CONFIG_DIR, config_name="predict", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with plain_user_errors():
        run(cfg)


def main() -> None:
    """Console script ``dwskd-predict``."""
    accept_renamed_options("dwskd-predict")
    _hydra_main()


if __name__ == "__main__":
    main()
