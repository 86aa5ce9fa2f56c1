"""External test sets: config checks, and the sweep table built from runs' external scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dwskd import external
from experiments import aggregate, external_table
from tests.conftest import compose_config


def test_data_configs_name_their_external_sets_and_a_null_drops_an_inherited_one() -> None:
    brain = compose_config("data=brain_mri", tiny=False)
    sets = external.external_sets(brain.data)
    assert list(sets) == ["lgg_tcga_t1c"]
    assert sets["lgg_tcga_t1c"]["positive_class"] == "glioma"
    assert sets["lgg_tcga_t1c"]["class_map"]["glioma"] == ["glioma", "meningioma", "pituitary"]
    tumour_type = compose_config("data=brain_mri_tumour_type", tiny=False)
    assert external.external_sets(tumour_type.data) == {}  # no notumor class to score
    assert external.external_sets(compose_config("data=synthetic").data) == {}
    chest = compose_config("data=chest_xray", tiny=False)
    assert external.external_sets(chest.data)["nih_cxr"]["class_map"]["abnormal"] == "PNEUMONIA"


def test_a_missing_external_folder_is_refused_before_training_naming_the_option(
    tmp_path: Path,
) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.external\.other\.root=.*does not exist"):
        external.check_external_sets({"other": {"root": str(tmp_path / "absent")}})
    with pytest.raises(ValueError, match=r"data\.external\.other has no root"):
        external.check_external_sets({"other": {"class_map": None}})
    external.check_external_sets({"here": {"root": str(tmp_path)}})  # exists: accepted


def test_evaluation_options_are_dwskd_evals_own_config(tmp_path: Path) -> None:
    spec = {"root": "/x", "class_map": {"a": ["b", "c"]}, "positive_class": "a"}
    options = external.evaluation_options(tmp_path / "model", spec, tmp_path / "out")
    assert options.model_dir == str(tmp_path / "model") and options.data.root == "/x"
    assert OmegaConf.to_container(options.class_map) == {"a": ["b", "c"]}
    assert options.bootstrap.resamples == 1000 and options.progress is False
    assert "hydra" not in options


def score(confusion: list[list[int]], auroc: float, low: float, high: float) -> dict:
    """An external score as dwskd.external.summarise writes it (classes glioma, notumor)."""
    return {
        "n_images": sum(map(sum, confusion)),
        "classes": ["glioma", "notumor"],
        "positive_class": "glioma",
        "metrics": {"auroc": auroc, "balanced_acc": 0.5, "sensitivity": 0.9, "specificity": 0.1},
        "intervals": {
            "auroc": {"value": auroc, "low": low, "high": high},
            "balanced_acc": {"value": 0.5, "low": 0.41, "high": 0.59},
        },
        "confusion": confusion,
    }


def write_run(
    root: Path, method: str, seed: int, acc: float, outside: dict | None, scenario="pretrained"
) -> None:
    results = {
        "run": {"wall_time_s": 1.0},
        "deployed": "student_a",
        "models": {"student_a": {"test": {"acc": acc, "auroc": acc}}},
    }
    if outside is not None:
        results["external"] = {"lgg": {"student_a": outside, "teacher": outside}}
    path = root / scenario / "brain" / method / f"s{seed}" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))


def test_external_table_counts_errors_ranks_and_compares_with_scratch(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # scratch: best at home, worst outside; ws: calls 9 of 10 tumour-free slices tumour.
    for seed, auroc in ((1, 0.40), (2, 0.42)):
        write_run(runs, "scratch", seed, 0.9, score([[8, 2], [5, 5]], auroc, auroc - 0.05, 0.5))
    for seed, auroc in ((1, 0.70), (2, 0.74)):
        write_run(runs, "ws", seed, 0.7, score([[10, 0], [9, 1]], auroc, 0.6, auroc + 0.05))
        write_run(runs, "dwskd", seed, 0.8, score([[9, 1], [2, 8]], 0.6, 0.5, 0.7))
    write_run(runs, "kd", 1, 0.5, None)  # made before external scoring: no external row
    rows = external_table.collect(aggregate.run_paths(runs))
    assert {r.method for r in rows} == {"scratch", "ws", "dwskd"} and len(rows) == 6
    counts = external_table.error_counts(score([[10, 0], [9, 1]], 0.7, 0.6, 0.8))
    assert counts == {"false_pos": 9, "negatives": 10, "false_neg": 0, "positives": 10}
    records = external_table.summarise(rows)
    ws = next(r for r in records if r["method"] == "ws")
    assert ws["auroc_mean"] == pytest.approx(0.72) and ws["false_pos_mean"] == 9
    notes = external_table.rank_notes(records)
    assert notes == ["scratch ranks 1 of 3 in-source and 3 of 3 outside."]
    said = external_table.against_scratch(records)
    assert said[0] == "ws vs scratch outside: +0.310 external AUROC (more than one std)."
    text = "\n".join(external_table.markdown_section(rows))
    assert (
        "| ws | 2 | 70.0 ± 0.0 | 0.700 ± 0.000 | 0.720 ± 0.028 | [0.60, 0.75]; [0.60, 0.79] |"
        in text
    )
    assert "| 9 / 10 | 0 / 10 |" in text  # negatives called positive, positives called negative
    assert "| 50.0 ± 0.0 | [41, 59]; [41, 59] |" in text  # balanced accuracy, each seed's CI


def test_scratch_runs_once_and_joins_every_teacher_scenarios_external_table(
    tmp_path: Path,
) -> None:
    """The sweep files teacher-free runs under in_domain: they are no table of their own."""
    runs = tmp_path / "runs"
    write_run(runs, "scratch", 1, 0.9, score([[8, 2], [5, 5]], 0.4, 0.3, 0.5), "in_domain")
    write_run(runs, "ws", 1, 0.7, score([[10, 0], [9, 1]], 0.7, 0.6, 0.8), "pretrained")
    write_run(runs, "ws", 1, 0.6, score([[10, 0], [9, 1]], 0.6, 0.5, 0.7), "transfer")
    records = external_table.summarise(external_table.collect(aggregate.run_paths(runs)))
    tables = external_table.scenario_tables(records)
    assert [(t[0], [r["method"] for r in t[3]]) for t in tables] == [
        ("pretrained", ["scratch", "ws"]), ("transfer", ["scratch", "ws"]),
    ]  # fmt: skip
    text = "\n".join(external_table.markdown_section(external_table.collect(
        aggregate.run_paths(runs))))  # fmt: skip
    assert "In-domain teacher" not in text and "ws vs scratch outside: +0.300" in text


def test_paper_results_get_an_external_table_and_csv(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "ws", 1, 0.7, score([[10, 0], [9, 1]], 0.7, 0.6, 0.8))
    paths = aggregate.write_results(runs, tmp_path / "out", "t")
    assert (tmp_path / "out" / "t_external.csv") in paths
    assert "### brain on `lgg`" in paths[0].read_text()
    line = (tmp_path / "out" / "t_external.csv").read_text().splitlines()[1]
    assert line.startswith("pretrained,brain,ws,1,lgg,student_a,glioma,0.7,")


# --------------------------------------------------------------------- evidence studies
def test_scarcity_keeps_the_full_runs_steps_up_to_the_cap_and_shares_the_table() -> None:
    from experiments import evidence, paper

    f5, f20, f50, f100 = evidence.variants("scarcity", ["100", "5", "50", "20"])
    assert [v.x for v in (f5, f20, f50, f100)] == [0.05, 0.2, 0.5, 1.0]
    assert (f20.budget.student_epochs, f20.budget.finetune_epochs) == (20, 5)
    assert f20.budget.transfer_epochs == 10  # the teacher's adaptation gets equal steps too
    assert f5.budget.student_epochs == evidence.EPOCH_CAP  # 80 would exceed the cap
    assert f50.extra == ("data.train_fraction=0.5",) and f100.extra == ()
    assert f100.shared() and f100.budget == paper.FULL and not f50.shared()
    e4, e16, e32 = evidence.variants("budget", ["4", "16", "32"])
    assert [(v.budget.student_epochs, v.budget.finetune_epochs) for v in (e4, e16, e32)] == [
        (4, 1), (16, 4), (32, 8),
    ]  # fmt: skip
    assert e4.shared() and not e16.shared()
    robust = evidence.variants("robustness", ["robust"])[0]
    assert robust.extra == ("data.augment=robust",) and robust.budget == paper.FULL


def test_the_robustness_study_runs_only_on_tasks_that_have_an_external_set() -> None:
    from experiments import evidence

    tasks = evidence.STUDIES["robustness"].datasets
    for task in tasks:
        external = compose_config(f"data={task}", tiny=False).data.external
        assert any(v is not None for v in external.values()), task
    # tumour type has none (conf/data/brain_mri_tumour_type.yaml drops lgg_tcga_t1c)
    tumour_type = compose_config("data=brain_mri_tumour_type", tiny=False).data.external
    assert all(v is None for v in tumour_type.values())
    assert "brain_mri_tumour_type" not in tasks
    assert "robust_standardize" not in evidence.STUDIES["robustness"].values  # on request


def test_study_gain_is_paired_with_scratch_of_the_same_seed() -> None:
    from experiments import evidence

    lines = [
        {"dataset": "d", "x": 0.2, "variant": "f20", "method": m, "seed": s, "acc": acc,
         "external_auroc": None}
        for m, s, acc in (("scratch", 1, 0.5), ("scratch", 2, 0.7), ("ws", 1, 0.6), ("ws", 2, 0.8))
    ]  # fmt: skip
    ws = next(r for r in evidence.summarise(lines) if r["method"] == "ws")
    assert ws["gain_mean"] == pytest.approx(0.1) and ws["gain_std"] == pytest.approx(0.0)
    assert ws["acc_std"] == pytest.approx(0.1414, abs=1e-4)  # the spread the pairing removes


def test_study_rows_follow_the_variants_by_size_or_as_listed() -> None:
    from experiments import evidence

    def lines(xs):
        return [{"dataset": "d", "x": x, "variant": str(x), "method": "ws", "seed": 1, "acc": 0.5,
                 "external_auroc": None} for x in xs]  # fmt: skip

    # depth 12 is the table's run, collected first; 12 sorts after 9, not between 1 and 4
    assert [r["x"] for r in evidence.summarise(lines([12.0, 4.0, 6.0, 9.0]))] == [4, 6, 9, 12]
    levers = ["default", "robust", "standardize"]
    assert [r["x"] for r in evidence.summarise(lines(levers))] == levers


def test_study_results_table_and_plot_from_runs(tmp_path: Path) -> None:
    from experiments import evidence, paper

    plan = []
    for variant in evidence.variants("scarcity", ["20", "100"]):
        out = tmp_path / variant.label
        for seed in (1, 2):
            write_run(out, "scratch", seed, 0.5, score([[8, 2], [5, 5]], 0.6, 0.5, 0.7))
            write_run(out, "ws", seed, 0.6 + 0.1 * seed, None)
        settings = paper.Settings(
            variant.label, ("brain",), evidence.METHODS, (1, 2), ("pretrained",),
            variant.budget, "cpu", out, {},
        )  # fmt: skip
        plan.append((variant, settings))
    paths = evidence.write_results("scarcity", plan, tmp_path / "results", "cmd")
    text = paths[0].read_text()
    assert "| brain | f20 | ws | 2 | – | 75.0 ± 7.1 | 25.0 ± 7.1 | – |" in text
    assert "| brain | f100 | scratch | 2 | – | 50.0 ± 0.0 | – | 0.600 ± 0.000 |" in text
    assert "- code: every run at commit `unknown` (8 runs)" in text  # these runs record none
    assert "  - variant f20: `unknown` (4 runs)" in text
    assert (tmp_path / "results" / "scarcity.png").stat().st_size > 10_000


def test_multisource_lever_replaces_brain_mri_only_and_reports_per_source() -> None:
    from experiments import evidence

    multi = evidence.variants("robustness", ["multisource"])[0]
    assert multi.data_of(["chest_xray", "brain_mri"]) == ("brain_mri_multisource",)
    assert evidence.variants("robustness", ["robust"])[0].data_of(["a", "b"]) == ("a", "b")
    lines = [
        {"dataset": "m", "x": "multisource", "variant": "multisource", "method": "ws", "seed": s,
         "acc": 0.7, "external_auroc": None, "by_source": {"lgg": a, "nickparvar": 0.8}}
        for s, a in ((1, 0.5), (2, 0.7))
    ]  # fmt: skip
    record = evidence.summarise(lines)[0]
    assert record["by_source"]["lgg"] == pytest.approx((0.6, 0.1414), abs=1e-4)
    assert evidence.source_cell(record["by_source"]) == "lgg 60.0 ± 14.1; nickparvar 80.0 ± 0.0"


def test_a_table_names_its_code_version_and_flags_a_mix() -> None:
    one = aggregate.code_lines({"abc1234567": 72})
    assert one == ["- code: every run at commit `abc1234567` (72 runs)"]
    mixed = aggregate.code_lines({"abc1234567": 70, "def7654321 (dirty)": 2})
    assert mixed[0].startswith("- **code: mixed or uncommitted versions**")
    assert "`def7654321 (dirty)` (2 runs)" in mixed[0]


def test_temperature_and_depth_sweeps_share_the_tables_teachers(tmp_path: Path) -> None:
    """Only the students vary: their teacher jobs are the table's (one run dir, one config)."""
    import argparse

    from experiments import evidence, launch, paper
    from tests.test_experiments import UNION_LABELS, write_pretrained_teacher

    t1, t2, t4, t8 = evidence.variants("temperature", ["8", "1", "4", "2"])
    assert t4.shared() and t2.extra == ("method.distill.temperature=2",)
    d4, *_, d12 = evidence.variants("depth", ["4", "6", "9", "12"])
    assert d12.shared() and d4.extra == ("model.depth=4",)
    teacher = write_pretrained_teacher(tmp_path / "union.safetensors", UNION_LABELS)
    args = argparse.Namespace(
        datasets=["synthetic"], seeds=[1], device="cpu", pretrained_teacher=teacher,
        results_dir=tmp_path / "results",
    )  # fmt: skip
    settings = evidence.settings_of("temperature", t2, args, launch.Launch())
    table = evidence.settings_of("temperature", t4, args, launch.Launch())
    assert settings.methods == ("dwskd",) and table.name == "paper_pretrained"
    jobs = {j.method: j for j in paper.plan_jobs(settings)}
    shared = {j.method: j for j in paper.plan_jobs(table)}
    assert jobs["teacher"] == shared["teacher"]  # same dir and overrides: trained once
    assert jobs["dwskd"].teacher_file == paper.teacher_weights(shared["teacher"].run_dir)
    assert "method.distill.temperature=2" in jobs["dwskd"].overrides
    assert {a.root.name for a in settings.archives()} == {"temperature_t2", "paper_pretrained"}


def test_teacher_size_trains_union_teachers_with_one_recipe_and_selects_from_each() -> None:
    from experiments import evidence, paper

    jobs = [evidence.union_teacher_job(a, "cpu") for a in ("vit_tiny", "vit_base")]
    for job, arch in zip(jobs, ("vit_tiny", "vit_base"), strict=True):
        assert f"teacher={arch}" in job.overrides and "data=medunion" in job.overrides
        assert f"method.epochs.teacher={evidence.UNION_EPOCHS}" in job.overrides
    assert [j.overrides[4:] for j in jobs][0][:2] == [j.overrides[4:] for j in jobs][1][:2]
    base = evidence.variants("teacher_size", ["vit_base"])[0]
    assert base.extra == ("teacher=vit_base",) and not base.shared()
    assert base.teacher_file == evidence.union_teacher_file("vit_base")
    assert base.teacher_file.parent.name == "teacher" and base.budget == paper.FULL


def test_a_pretrained_only_sweep_has_no_in_domain_section_of_teacher_free_runs(
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    write_run(runs, "scratch", 1, 0.6, None, "in_domain")  # scratch runs once, filed here
    write_run(runs, "ws", 1, 0.7, None, "pretrained")
    text = aggregate.write_results(runs, tmp_path / "out", "t")[0].read_text()
    assert "In-domain teacher" not in text
    pretrained = text.split("## Pretrained teacher")[1]
    assert "| scratch (no teacher) | deployed (student_a x1) | 1 | 60.0 |" in pretrained
