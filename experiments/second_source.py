"""Brain MRI trained on one source or on two, scored on the same held-out patients.

    python -m experiments.second_source                          # outputs/paper_pretrained
    python -m experiments.second_source --out <sweep dir> --results-dir experiments/results

``data=brain_mri_multisource`` trains on Nickparvar plus half of the ``lgg_tcga_t1c`` patients
and holds the other half out in its test split. ``data=brain_mri`` trains on Nickparvar alone
and scores all of ``lgg_tcga_t1c`` as its external set. This module sets the two side by side
on exactly the held-out patients: the multisource run's per-image test predictions of its lgg
part, and the Nickparvar-only run's external predictions of the same files, each mapped onto
glioma vs notumor with the run's own ``class_map`` and scored by ``dwskd.metrics.score`` (the
scorer of dwskd-eval and of every run's test split; bootstrap intervals, ECE). It answers
one question: does a second source of tumour-free images remove the source shortcut on that
source? It is its own scenario: those patients are held out, not external.

Needs the run dirs (the archive keeps metrics only, not per-image predictions); writes
``second_source.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dwskd.evaluate import build_task
from dwskd.io import now_iso, write_text
from dwskd.metrics import score
from dwskd.rundir import RunLayout, read_results
from experiments.aggregate import code_lines, code_versions, find_runs, mean_std, plain
from experiments.common import RESULTS_DIR, invocation
from experiments.external_table import error_counts

SET, SOURCE = "lgg_tcga_t1c", "lgg"  # the external set, and its source key in the union
ONE, TWO = "brain_mri", "brain_mri_multisource"
TRAINED_ON = {ONE: "Nickparvar only", TWO: "Nickparvar + half the lgg patients"}
CLASSES = ("glioma", "notumor")  # the set's classes; glioma is the positive class
SHOWN = ("scratch", "ws", "dwskd", "teacher")  # the methods both training sets have


@dataclass(frozen=True)
class Predictions:
    """One run's deployed model, per held-out image: its true class and class probabilities."""

    labels: tuple[str, ...]  # the model's classes, the order of ``probs``
    truth: dict[str, str]  # image file name -> true class
    probs: dict[str, list[float]]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def base_name(file: str) -> str:
    """``lgg/TCGA_CS_4941_19960909_11.jpg`` and ``glioma/TCGA_...`` name the same image."""
    return file.rsplit("/", 1)[-1]


def predictions_of(run: Path, results: Mapping) -> Predictions:
    """Multisource: the lgg part of the deployed model's test predictions. Nickparvar-only:
    the deployed model's external predictions of the set (already on the set's classes)."""
    deployed, layout = results["deployed"], RunLayout(run)
    if results["run"]["config"]["data"]["name"] == TWO:
        rows = read_rows(layout.predictions_csv(deployed))
        rows = [r for r in rows if r["file"].startswith(f"{SOURCE}/")]
    else:
        rows = read_rows(layout.external_dir(SET, deployed) / "predictions.csv")
    labels = tuple(k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_"))
    names = [base_name(r["file"]) for r in rows]
    if len(set(names)) != len(names):
        raise SystemExit(f"{run}: two images share a file name; they cannot be matched")
    return Predictions(
        labels,
        {n: r["true_label"] for n, r in zip(names, rows, strict=True)},
        {n: [float(r[f"prob_{c}"]) for c in labels] for n, r in zip(names, rows, strict=True)},
    )


def set_class_map(results: Mapping, labels: Sequence[str]) -> dict | None:
    """The run's own glioma/notumor class map; none where the model's classes are the set's."""
    if set(labels) == set(CLASSES):
        return None
    data = results["run"]["config"]["data"]
    external = data.get("external") or data["sources"]["nickparvar"]["external"]
    return external[SET]["class_map"]


def score_on(images: Sequence[str], predictions: Predictions, class_map: dict | None) -> dict:
    """glioma vs notumor on ``images``, the way dwskd-eval scores an external set."""
    missing = [i for i in images if i not in predictions.probs]
    if missing:
        raise SystemExit(f"{len(missing)} held-out images lack a prediction, e.g. {missing[0]}")
    task = build_task(CLASSES, predictions.labels, class_map)
    probs = task.probabilities(torch.tensor([predictions.probs[i] for i in images]))
    targets = torch.tensor([task.classes.index(predictions.truth[i]) for i in images])
    result = score(probs, targets, task.classes, task.classes.index(CLASSES[0]))
    counts = {"classes": list(task.classes), "positive_class": CLASSES[0]}
    return {**result, **error_counts({**counts, "confusion": result["metrics"]["confmat"]})}


@dataclass(frozen=True)
class Scored:
    """One run's deployed model on the held-out patients."""

    run: Path
    dataset: str
    method: str
    seed: int
    result: dict


def score_runs(out: Path) -> tuple[list[Scored], int]:
    """Every finished brain_mri and multisource run of the sweep, on the held-out images."""
    runs = [r for r in find_runs(out) if r.parts[-3] in (ONE, TWO) and r.parts[-2] in SHOWN]
    loaded = {run: read_results(run) for run in runs}
    predictions = {run: predictions_of(run, loaded[run]) for run in runs}
    held_out = [set(predictions[r].probs) for r in runs if r.parts[-3] == TWO]
    if not held_out:
        raise SystemExit(f"No finished {TWO} run under {out}: nothing is held out yet.")
    if any(h != held_out[0] for h in held_out):
        raise SystemExit(f"The {TWO} runs under {out} hold out different lgg patients.")
    images = sorted(held_out[0])
    scored = [
        Scored(
            run,
            run.parts[-3],
            run.parts[-2],
            int(run.parts[-1].removeprefix("s")),
            score_on(images, predictions[run], set_class_map(loaded[run], predictions[run].labels)),
        )
        for run in runs
    ]
    return scored, len(images)


# ------------------------------------------------------------------------- the table
def summary(scored: Sequence[Scored]) -> list[dict]:
    """Mean ± std over seeds per training data and method, with each seed's AUROC interval."""
    records = []
    for dataset in (ONE, TWO):
        for method in SHOWN:
            runs = sorted(
                (s for s in scored if (s.dataset, s.method) == (dataset, method)),
                key=lambda s: s.seed,
            )
            if not runs:
                continue
            record = {"trained_on": TRAINED_ON[dataset], "method": method, "n": len(runs)}
            for key in ("auroc", "balanced_acc", "specificity", "sensitivity", "ece"):
                record[key] = mean_std(s.result["metrics"][key] for s in runs)[:2]
            for key in ("false_pos", "false_neg"):
                record[key] = mean_std(s.result[key] for s in runs)[:2]
            record["negatives"], record["positives"] = (
                runs[0].result[k] for k in ("negatives", "positives")
            )
            record["intervals"] = [
                tuple(s.result["intervals"]["auroc"][k] for k in ("low", "high")) for s in runs
            ]
            records.append(record)
    return records


def markdown(records: Sequence[dict], n_images: int, code: list[str], command: str) -> str:
    header = [
        "# Brain MRI with a second source of tumour-free images: the held-out patients",
        "",
        f"- aggregated: {now_iso()}; command: `{command}`",
        *code,
        f"- images: the {n_images} slices of the `{SET}` patients that `data={TWO}` holds out "
        "(split by patient); the Nickparvar-only models see them as part of their external set,",
        "  the multisource models as their second source's held-out test part (not external).",
        "- task: glioma vs notumor (glioma positive), each run's own class map, scored by "
        "`dwskd.metrics.score`; deployed model per run; mean ± std over seeds (n).",
        "",
        "| trained on | method | n | AUROC | per-seed 95 % intervals | balanced acc | "
        "specificity | notumor called tumour | gliomas called notumor | ECE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        f"| {r['trained_on']} | {r['method']} | {r['n']} | {plain(*r['auroc'], digits=3)} | "
        + ", ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in r["intervals"])
        + f" | {plain(*r['balanced_acc'], digits=3)} | {plain(*r['specificity'], digits=3)} | "
        f"{plain(*r['false_pos'], digits=0)} of {r['negatives']} | "
        f"{plain(*r['false_neg'], digits=0)} of {r['positives']} | {plain(*r['ece'], digits=3)} |"
        for r in records
    ]
    return "\n".join(header + lines) + "\n"


def write_csv(records: Sequence[dict], path: Path) -> None:
    keys = ("auroc", "balanced_acc", "specificity", "sensitivity", "ece", "false_pos", "false_neg")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "trained_on",
                "method",
                "n",
                *(f"{k}_{s}" for k in keys for s in ("mean", "std")),
                "negatives",
                "positives",
            ]
        )
        for r in records:
            writer.writerow(
                [
                    r["trained_on"],
                    r["method"],
                    r["n"],
                    *(v for k in keys for v in r[k]),
                    r["negatives"],
                    r["positives"],
                ]
            )


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/paper_pretrained"),
        help="the sweep dir holding brain_mri and brain_mri_multisource runs",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    scored, n_images = score_runs(args.out)
    records = summary(scored)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / "second_source.md"
    code = code_lines(code_versions([s.run for s in scored]))
    text = markdown(records, n_images, code, invocation("experiments.second_source", argv))
    write_text(path, text)
    write_csv(records, args.results_dir / "second_source.csv")
    print(text)
    return path


if __name__ == "__main__":
    main()
