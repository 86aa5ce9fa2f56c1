"""experiments.second_source: one-source and two-source brain models on the same held-out images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from experiments import second_source

CLASS_MAP = {"notumor": "notumor", "glioma": ["glioma", "meningioma", "pituitary"]}
# (file, true class, P(tumour)): four held-out lgg slices; the one-source model also saw a fifth
# lgg slice (external) that the two-source model trained on.
HELD_OUT = [("a_1.jpg", "glioma", 0.9), ("a_2.jpg", "notumor", 0.8),
            ("b_1.jpg", "glioma", 0.7), ("b_2.jpg", "notumor", 0.2)]  # fmt: skip


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def write_run(root: Path, dataset: str, method: str, seed: int, rows=HELD_OUT) -> Path:
    run = root / ("in_domain" if method == "scratch" else "pretrained") / dataset / method
    run = run / f"s{seed}"
    external = {"lgg_tcga_t1c": {"class_map": CLASS_MAP, "positive_class": "glioma"}}
    data = {"name": dataset, "external": external}
    if dataset == second_source.TWO:  # a union keeps the set in its Nickparvar source
        data = {"name": dataset, "external": {}, "sources": {"nickparvar": {"external": external}}}
        header = ["file", "true_label", "predicted_label"] + [
            f"prob_{c}" for c in ("glioma", "meningioma", "notumor", "pituitary")
        ]
        lines = [[f"lgg/{f}", t, "x", p / 2, p / 4, 1 - p, p / 4] for f, t, p in rows]
        lines.append(["nickparvar/n.jpg", "pituitary", "x", 0.1, 0.1, 0.1, 0.7])
        write_csv(run / "predictions" / "student_b_test.csv", header, lines)
    else:
        lines = [[f"{t}/{f}", t, "x", p, 1 - p] for f, t, p in [*rows, ("c_1.jpg", "glioma", 0.5)]]
        header = ["file", "true_label", "predicted_label", "prob_glioma", "prob_notumor"]
        write_csv(
            run / "external" / "lgg_tcga_t1c" / "student_b" / "predictions.csv", header, lines
        )
    results = {"deployed": "student_b", "run": {"config": {"data": data}}, "models": {}}
    (run / "metrics.json").write_text(json.dumps(results))
    return run


def test_both_training_sets_are_scored_on_the_same_held_out_images(tmp_path: Path) -> None:
    for seed in (1, 2):
        write_run(tmp_path, second_source.ONE, "ws", seed)
        write_run(tmp_path, second_source.TWO, "ws", seed)
    scored, n_images = second_source.score_runs(tmp_path)
    assert n_images == 4  # the held-out slices only: not c_1 (trained on by the union)
    one = [s for s in scored if s.dataset == second_source.ONE]
    two = [s for s in scored if s.dataset == second_source.TWO]
    # the union's three tumour classes summed into glioma give the same scores
    assert [s.result["metrics"]["auroc"] for s in one] == [
        s.result["metrics"]["auroc"] for s in two
    ]
    assert one[0].result["metrics"]["auroc"] == pytest.approx(0.75)  # 3 of 4 pairs ranked right
    # argmax: a_2 (notumor, P(tumour) 0.8) is called tumour, nothing else is wrong
    assert (one[0].result["false_pos"], one[0].result["negatives"]) == (1, 2)
    assert (two[0].result["false_neg"], two[0].result["positives"]) == (0, 2)
    records = second_source.summary(scored)
    assert [(r["trained_on"], r["method"], r["n"]) for r in records] == [
        ("Nickparvar only", "ws", 2), ("Nickparvar + half the lgg patients", "ws", 2),
    ]  # fmt: skip
    assert records[0]["specificity"] == (0.5, 0.0)
    out = second_source.main(["--out", str(tmp_path), "--results-dir", str(tmp_path / "res")])
    text = out.read_text()
    assert "| Nickparvar only | ws | 2 | 0.750 ± 0.000 |" in text and "1 ± 0 of 2" in text
    assert "- code: every run at commit `unknown` (4 runs)" in text  # the fakes record no git
    assert (tmp_path / "res" / "second_source.csv").read_text().startswith("trained_on,method,n")


def test_held_out_sets_that_differ_or_lack_an_image_are_refused(tmp_path: Path) -> None:
    write_run(tmp_path, second_source.TWO, "ws", 1)
    write_run(tmp_path, second_source.TWO, "ws", 2, HELD_OUT[:3])
    with pytest.raises(SystemExit, match="hold out different lgg patients"):
        second_source.score_runs(tmp_path)
    other = tmp_path / "other"
    write_run(other, second_source.TWO, "dwskd", 1)
    write_run(other, second_source.ONE, "dwskd", 1, HELD_OUT[1:])
    with pytest.raises(SystemExit, match="1 held-out images lack a prediction, e.g. a_1.jpg"):
        second_source.score_runs(other)
    with pytest.raises(SystemExit, match="No finished brain_mri_multisource run"):
        second_source.score_runs(tmp_path / "nothing")
