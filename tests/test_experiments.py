"""experiments/: the paper sweep (plan, shared teachers, resume), its aggregation, the bench."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from experiments import aggregate, bench, investigate, paper
from tests.conftest import TINY, compose_config

# The conftest's tiny run, minus trainer.max_epochs (paper.py sets per-stage epochs itself).
SWEEP_TINY = [o for o in TINY if not o.startswith("trainer.max_epochs")]


def write_pretrained_teacher(path: Path, labels: list[str]) -> Path:
    """A stand-in for the shared union teacher: the tiny ViT-S, label names in its metadata."""
    from safetensors.torch import save_file

    from dwskd import models

    cfg = compose_config()
    teacher = models.create_model(cfg.teacher, num_classes=len(labels), in_chans=1, img_size=32)
    state = {k: v.contiguous() for k, v in teacher.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"label_names": json.dumps(labels)})
    return path


# The synthetic classes under a source prefix, plus another source's class: what match keeps.
UNION_LABELS = ["other_x", "syn_normal", "syn_round_bright", "syn_spiculated", "syn_ring_enhancing"]


def quick_settings(tmp_path: Path, *argv: str) -> paper.Settings:
    pretrained = write_pretrained_teacher(tmp_path / "union.safetensors", UNION_LABELS)
    args = paper.parse_args(
        ["--quick", "--out", str(tmp_path), "--pretrained-teacher", str(pretrained), *argv]
    )
    return paper.settings_from_args(args)


def by_key(jobs: list[paper.Job]) -> dict[tuple[str, str, str, int], paper.Job]:
    return {(j.scenario, j.dataset, j.method, j.seed): j for j in jobs}


# ------------------------------------------------------------------------------- the plan
def test_plan_shares_one_teacher_per_scenario_and_orders_teachers_first(tmp_path: Path) -> None:
    jobs = paper.plan_jobs(quick_settings(tmp_path, "--seeds", "1", "2"))
    keys = by_key(jobs)
    # transfer on lung_ct needs the in-domain brain_mri teacher, even though brain_mri is not asked
    assert ("in_domain", "brain_mri", "teacher", 1) in keys
    assert ("in_domain", "brain_mri", "dwskd", 1) not in keys
    # teacher-free methods run once, under in_domain
    assert ("transfer", "lung_ct", "scratch", 1) not in keys
    assert ("in_domain", "lung_ct", "dml", 2) in keys
    for job in jobs:
        position = jobs.index(job)
        if job.teacher_file == tmp_path / "union.safetensors":  # given, made by no job
            assert (job.scenario, job.method) == ("pretrained", "teacher")
        elif job.teacher_file is not None:  # whoever made the teacher file runs earlier
            maker = job.teacher_file.parents[2]
            assert any(j.run_dir == maker for j in jobs[:position]), job.command()
    dwskd = keys[("transfer", "lung_ct", "dwskd", 2)]
    assert dwskd.teacher_file == paper.teacher_weights(tmp_path / "transfer/lung_ct/teacher/s2")
    assert "method.epochs.teacher=0" in dwskd.overrides
    transfer_teacher = keys[("transfer", "lung_ct", "teacher", 2)]
    assert transfer_teacher.teacher_file.parents[2] == tmp_path / "in_domain/brain_mri/teacher/s2"
    pretrained = keys[("pretrained", "lung_ct", "teacher", 1)]
    assert "teacher.head=match" in pretrained.overrides
    assert f"teacher.file={tmp_path / 'union.safetensors'}" in pretrained.overrides
    student = keys[("pretrained", "lung_ct", "ws", 1)]
    assert student.teacher_file == paper.teacher_weights(tmp_path / "pretrained/lung_ct/teacher/s1")


def test_pretrained_scenario_needs_its_file_and_can_probe_instead(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--pretrained-teacher"):
        paper.settings_from_args(
            paper.parse_args(["--quick", "--pretrained-teacher", str(tmp_path / "none.pt")])
        )
    settings = quick_settings(tmp_path, "--pretrained-head", "probe", "--scenarios", "pretrained")
    teacher = by_key(paper.plan_jobs(settings))[("pretrained", "lung_ct", "teacher", 1)]
    assert {"teacher.head=reinit", "teacher.probe_epochs=1"} <= set(teacher.overrides)
    # without the scenario, no file is needed
    args = paper.parse_args(["--quick", "--scenarios", "in_domain", "--pretrained-teacher", "x"])
    assert paper.settings_from_args(args).pretrained_teacher is None


def test_every_student_gets_the_same_number_of_passes(tmp_path: Path) -> None:
    settings = quick_settings(tmp_path, "--student-epochs", "5", "--finetune-epochs", "2")
    for job in paper.plan_jobs(settings):
        if job.method == "teacher":
            continue
        epochs = dict(o.split("=", 1) for o in job.overrides if o.startswith("method.epochs."))
        passes = int(epochs["method.epochs.train"]) + int(epochs["method.epochs.finetune"])
        assert passes == 5, job.command()


@pytest.mark.parametrize(
    "argv",
    [
        ["trainer.max_epochs=1"],
        ["hydra.run.dir=x"],
        ["--finetune-epochs", "9"],
        ["--datasets", "lung_ct", "data.img_size=32"],
    ],
)
def test_options_that_would_break_the_comparison_are_refused(argv: list[str]) -> None:
    with pytest.raises((SystemExit, ValueError)):
        paper.settings_from_args(paper.parse_args(["--quick", *argv]))


def test_a_failed_teacher_job_blocks_its_students_only(tmp_path: Path, monkeypatch) -> None:
    """Phases run in order through Hydra (here faked); a teacher that wrote no weights stops
    the students that need them, and only those."""
    settings = quick_settings(tmp_path, "--scenarios", "in_domain")
    jobs = paper.plan_jobs(settings)
    phases = []

    def launch(jobs: list, root: Path, launch: object, phase: str, archives: tuple) -> None:
        phases.append((phase, sorted(j.method for j in jobs)))
        for job in jobs:  # every job but the teacher "finishes"
            if job.method != "teacher":
                job.run_dir.mkdir(parents=True)
                (job.run_dir / "metrics.json").write_text("{}")

    monkeypatch.setattr(paper, "launch_phase", launch)
    failed = paper.run_jobs(jobs, settings.launch, settings.out)
    assert phases == [("in_domain_teachers", ["teacher"]), ("students", ["dml", "scratch"])]
    assert sorted(j.method for j in failed) == ["dwskd", "kd", "teacher", "ws"]


# --------------------------------------------------------------------- a real quick sweep
@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    root = tmp_path_factory.mktemp("paper")
    pretrained = write_pretrained_teacher(root / "union.safetensors", UNION_LABELS)
    argv = [
        "--quick",
        "--pretrained-teacher",
        str(pretrained),
        "--datasets",
        "synthetic",
        "--transfer-source",
        "synthetic=synthetic",
        "--out",
        str(root / "runs"),
        "--results-dir",
        str(root / "results"),
        "--in-process",
        "--img-size",
        "32",
        *SWEEP_TINY,
    ]
    assert paper.main(argv) == 0
    return root / "runs", root / "results", argv


def read_metrics(runs: Path, scenario: str, method: str) -> dict:
    return json.loads((runs / scenario / "synthetic" / method / "s1" / "metrics.json").read_text())


def teacher_run_dir(runs: Path, scenario: str) -> Path:
    return runs / scenario / "synthetic" / "teacher" / "s1"


@pytest.mark.slow  # the whole --quick sweep (about a minute on 2 cores): make test-full
def test_quick_sweep_runs_every_job_with_the_shared_teacher(quick_sweep: tuple) -> None:
    runs, _, _ = quick_sweep
    for scenario in paper.SCENARIOS:
        teacher_run = read_metrics(runs, scenario, "teacher")
        for method in ("ws", "kd", "dwskd"):
            run = read_metrics(runs, scenario, method)
            stage = run["run"]["stages"]["teacher"]
            assert (stage["epochs"], stage["source"]) == (0, "file")  # loaded, not retrained
            assert stage["file"] == str(paper.teacher_weights(teacher_run_dir(runs, scenario)))
            assert run["models"]["teacher"]["test"]["auroc"] == pytest.approx(
                teacher_run["models"]["teacher"]["test"]["auroc"]
            )
    transfer_teacher = read_metrics(runs, "transfer", "teacher")["run"]
    stage = transfer_teacher["stages"]["teacher"]
    assert (stage["epochs"], stage["source"]) == (1, "file")
    assert stage["file"] == str(paper.teacher_weights(teacher_run_dir(runs, "in_domain")))
    assert not (runs / "transfer" / "synthetic" / "scratch").exists()
    pretrained = read_metrics(runs, "pretrained", "teacher")["run"]["stages"]["teacher"]
    assert pretrained["head"] == "matched rows of the source head"
    assert (pretrained["epochs"], pretrained["file"]) == (1, str(runs.parent / "union.safetensors"))
    assert len(pretrained["val_curve"]["teacher"]) == 1  # one fine-tuning epoch, validated


@pytest.mark.slow  # the whole --quick sweep (about a minute on 2 cores): make test-full
def test_quick_sweep_writes_table_csv_and_plot(quick_sweep: tuple) -> None:
    runs, results, _ = quick_sweep
    text = (results / "paper_quick_cpu32.md").read_text()
    assert "python -m experiments.paper --quick" in text and "CPU cores" in text
    assert "32 px" in text and "torch" in text
    with (results / "paper_quick_cpu32.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    # 6 deployed rows in_domain + 4 in transfer and pretrained each, plus 3 extra rows per
    # two-student run (dml once, dwskd per scenario)
    assert len(rows) == 6 + 4 + 4 + 3 * 4
    dwskd = next(r for r in rows if r["method"] == "dwskd" and r["model"] == "deployed")
    deployed = read_metrics(runs, dwskd["scenario"], "dwskd")
    name = deployed["deployed"]
    assert float(dwskd["acc_mean"]) == pytest.approx(deployed["models"][name]["test"]["acc"])
    assert math.isnan(float(dwskd["acc_std"]))  # one seed: no spread
    assert (results / "paper_quick_cpu32.png").stat().st_size > 1000
    with (results / "paper_quick_cpu32_runs.csv").open() as stream:
        runs_rows = {(r["scenario"], r["method"]): r for r in csv.DictReader(stream)}
    scratch = runs_rows[("in_domain", "scratch")]
    assert len(scratch["val_curve"].split()) == 2  # --quick: two student epochs
    best = max(float(v) for v in scratch["val_curve"].split())  # the epoch it deploys
    assert best == pytest.approx(float(scratch["val_acc"]), abs=1e-4)
    assert "Convergence: epochs to reach scratch's final validation accuracy" in text
    assert "Pretrained teacher" in text and "ws vs scratch:" in text


@pytest.mark.slow  # the whole --quick sweep (about a minute on 2 cores): make test-full
def test_rerun_skips_finished_jobs(quick_sweep: tuple) -> None:
    runs, _, argv = quick_sweep
    files = sorted(runs.glob("*/*/*/s1/metrics.json"))
    before = [p.stat().st_mtime_ns for p in files]
    assert paper.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in files] == before


@pytest.mark.slow  # the whole --quick sweep (about a minute on 2 cores): make test-full
def test_archived_metrics_continue_the_sweep_where_the_run_dirs_are_gone(
    quick_sweep: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A fresh checkout has the committed metrics only: it skips them, and re-trains a teacher
    (same seed, same weights) only for a job that still needs it."""
    import shutil

    runs, results, argv = quick_sweep
    archived = results / "runs" / "paper_quick_cpu32"
    finished = {p.relative_to(runs) for p in runs.glob("*/*/*/s1/metrics.json")}
    assert {p.relative_to(archived) for p in archived.glob("*/*/*/s1/metrics.json")} == finished
    assert (archived / aggregate.META_FILE).is_file()
    shutil.copytree(archived, tmp_path / "results/runs/paper_quick_cpu32")
    missing = Path("pretrained/synthetic/ws/s1/metrics.json")
    (tmp_path / "results/runs/paper_quick_cpu32" / missing).unlink()
    fresh = list(argv)
    fresh[fresh.index("--out") + 1] = str(tmp_path / "fresh")
    fresh[fresh.index("--results-dir") + 1] = str(tmp_path / "results")
    assert paper.main([*fresh, "--dry-run"]) == 0  # lists what the real call then runs
    listing = capsys.readouterr().out.splitlines()
    to_run = [line for line in listing if not line.startswith("#")]
    assert listing[0].startswith(f"# 2 of {len(finished)} jobs to run")
    assert [line.split("hydra.run.dir=")[1] for line in to_run] == [
        str(tmp_path / "fresh/pretrained/synthetic/teacher/s1"),
        str(tmp_path / "fresh/pretrained/synthetic/ws/s1"),
    ]
    assert not (tmp_path / "fresh").exists()  # a dry run writes nothing
    assert paper.main(fresh) == 0
    made = {
        p.relative_to(tmp_path / "fresh")
        for p in (tmp_path / "fresh").glob("*/*/*/s1/metrics.json")
    }
    assert made == {missing, Path("pretrained/synthetic/teacher/s1/metrics.json")}
    again = json.loads(
        (tmp_path / "fresh/pretrained/synthetic/teacher/s1/metrics.json").read_text()
    )
    before = read_metrics(runs, "pretrained", "teacher")["models"]["teacher"]
    assert again["models"]["teacher"]["val"] == before["val"]  # the same teacher, re-trained
    with (tmp_path / "results/paper_quick_cpu32_runs.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == len(finished)  # every run once


# ----------------------------------------------------------------- the teacher study
def study_argv(quick_sweep: tuple, out: Path) -> list[str]:
    runs, _, paper_argv = quick_sweep
    pretrained = paper_argv[paper_argv.index("--pretrained-teacher") + 1]
    return [
        "--quick",
        "--datasets",
        "synthetic",
        "--teacher-epochs",
        "2",  # = the quick paper's in-domain teacher: shared, not trained again
        "--pretrained-teacher",
        pretrained,
        "--paper-root",
        str(runs),
        "--out",
        str(out / "study"),
        "--results-dir",
        str(out / "results"),
        "--in-process",
        "--img-size",
        "32",
        *SWEEP_TINY,
    ]


@pytest.mark.slow  # the whole --quick sweep (about a minute on 2 cores): make test-full
def test_teacher_study_plans_one_teacher_per_strength_and_shares_the_papers_jobs(
    quick_sweep: tuple, tmp_path: Path
) -> None:
    from experiments import teacher_study

    runs = quick_sweep[0]
    argv = [*study_argv(quick_sweep, tmp_path), "--seeds", "1", "2"]
    study = teacher_study.study_from_args(teacher_study.parse_args(argv))
    assert study.strengths() == ["random", "in_domain_e2", "pretrained"]
    jobs = {(j.scenario, j.method, j.seed): j for j in teacher_study.plan_jobs(study)}
    assert jobs[("in_domain_e2", "teacher", 1)].run_dir == runs / "in_domain/synthetic/teacher/s1"
    assert jobs[("pretrained", "teacher", 1)].run_dir == runs / "pretrained/synthetic/teacher/s1"
    assert jobs[("none", "scratch", 2)].run_dir == runs / "in_domain/synthetic/scratch/s2"
    # seed 1 selects from the paper's seed-1 teacher: the paper's own job; seed 2 does not
    assert jobs[("pretrained", "ws", 1)].run_dir == runs / "pretrained/synthetic/ws/s1"
    seed2 = jobs[("pretrained", "ws", 2)]
    assert seed2.run_dir == tmp_path / "study/synthetic/pretrained/ws/s2"
    assert seed2.teacher_file == paper.teacher_weights(runs / "pretrained/synthetic/teacher/s1")
    random_teacher = jobs[("random", "teacher", 1)]
    assert "teacher.source=random" in random_teacher.overrides
    assert not any(key[1] == "teacher" and key[2] == 2 for key in jobs)  # one teacher per strength


@pytest.mark.slow
def test_teacher_study_runs_only_what_the_paper_lacks_and_plots_gain_vs_advantage(
    quick_sweep: tuple, tmp_path: Path
) -> None:
    from experiments import teacher_study

    runs = quick_sweep[0]
    shared = sorted(runs.glob("*/*/*/s1/metrics.json"))
    before = [p.stat().st_mtime_ns for p in shared]
    assert teacher_study.main(study_argv(quick_sweep, tmp_path)) == 0
    assert [p.stat().st_mtime_ns for p in shared] == before  # shared jobs were not run again
    made = sorted(
        p.parent.relative_to(tmp_path / "study")
        for p in (tmp_path / "study").glob("**/metrics.json")
    )
    assert [str(p) for p in made] == [
        "synthetic/random/dwskd/s1",
        "synthetic/random/ws/s1",
        "synthetic/teacher/random",
    ]
    with (tmp_path / "results/teacher_study_quick.csv").open() as stream:
        rows = {r["teacher"]: r for r in csv.DictReader(stream)}
    assert list(rows) == ["random", "in_domain_e2", "pretrained"]
    scratch = read_metrics(runs, "in_domain", "scratch")
    ws = json.loads((runs / "pretrained/synthetic/ws/s1/metrics.json").read_text())
    teacher = read_metrics(runs, "pretrained", "teacher")
    gain = ws["models"]["student_a"]["test"]["acc"] - scratch["models"]["student_a"]["test"]["acc"]
    assert float(rows["pretrained"]["ws_gain_mean"]) == pytest.approx(gain)
    advantage = (
        teacher["models"]["teacher"]["val"]["acc"] - scratch["models"]["student_a"]["val"]["acc"]
    )
    assert float(rows["pretrained"]["advantage_mean"]) == pytest.approx(advantage)
    text = (tmp_path / "results/teacher_study_quick.md").read_text()
    assert "one teacher per strength" in text and "python -m experiments.teacher_study" in text
    assert (tmp_path / "results/teacher_study_quick.png").stat().st_size > 1000


def test_study_verdict_counts_a_gain_only_when_it_exceeds_its_seed_spread() -> None:
    from experiments import teacher_study

    def record(teacher: str, advantage: float, gain: float, std: float, n: int = 3) -> dict:
        return {"dataset": "d", "teacher": teacher, "advantage_mean": advantage,
                "ws_gain_mean": gain, "ws_gain_std": std, "ws_n": n}  # fmt: skip

    records = [
        record("random", -0.3, 0.03, 0.05),  # positive mean inside its spread: noise
        record("e5", 0.04, 0.07, 0.05),
        record("pretrained", 0.18, 0.11, 0.07),
    ]
    assert "advantage of +4.0 points or more (e5 and stronger)" in teacher_study.pays_from(
        records, "d", "ws"
    )
    records[2] = record("pretrained", 0.18, 0.11, float("nan"), n=1)  # one seed proves nothing
    assert "does not beat" in teacher_study.pays_from(records, "d", "ws")


# ------------------------------------------------------------------ the investigation
def investigate_plan(tmp_path: Path, *argv: str) -> investigate.Plan:
    base = ["--out", str(tmp_path), "--paper-root", str(tmp_path / "paper")]
    return investigate.plan_from_args(investigate.parse_args([*base, *argv]))


def test_investigation_plan_shares_the_papers_teacher_and_trains_the_long_one_first(
    tmp_path: Path,
) -> None:
    variants = ["dwskd", "dwskd_long_teacher", "scratch"]
    jobs = investigate.plan_jobs(
        investigate_plan(tmp_path, "--seeds", "1", "2", "--variants", *variants)
    )
    assert [(j.seed, j.scenario) for j in jobs] == [
        (seed, name) for seed in (1, 2) for name in ["teacher_long", *variants]
    ]
    by_name = {j.scenario: j for j in jobs if j.seed == 1}
    paper_teacher = paper.teacher_weights(tmp_path / "paper/in_domain/lung_ct/teacher/s1")
    assert by_name["dwskd"].teacher_file == paper_teacher
    assert by_name["dwskd_long_teacher"].teacher_file == (
        paper.teacher_weights(tmp_path / "lung_ct/teacher_long/s1")
    )
    assert by_name["scratch"].teacher_file is None
    assert "method.epochs.teacher=15" in by_name["teacher_long"].overrides  # 3x the paper's 5
    # the paper's budget: dwskd 3 joint + 1 fine-tune epochs, as in the table
    assert {"method.epochs.train=3", "method.epochs.finetune=1"} <= set(by_name["dwskd"].overrides)


def test_investigation_without_the_papers_teacher_says_how_to_train_it(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--paper-root", str(tmp_path / "none"), "--variants", "ws"]
    with pytest.raises(SystemExit, match="experiments.paper --datasets lung_ct"):
        investigate.main(argv)
    assert not (tmp_path / "lung_ct").exists()


def test_investigation_refuses_runs_without_validation_metrics(tmp_path: Path) -> None:
    fake_run(tmp_path, "dwskd", "toy", 1, 0.5, {"deployed": "student_a", "names": ["student_a"]})
    with pytest.raises(SystemExit, match="no val metrics"):
        investigate.val_metrics(tmp_path / "dwskd/toy/toy/s1")


@pytest.mark.slow
def test_investigation_compares_variants_on_validation_metrics(
    quick_sweep: tuple, tmp_path: Path
) -> None:
    runs, _, _ = quick_sweep
    argv = [
        "--quick", "--img-size", "32", "--dataset", "synthetic", "--seeds", "1",
        "--variants", "dwskd_T1", "teacher",
        "--paper-root", str(runs), "--out", str(tmp_path / "inv"),
        "--results-dir", str(tmp_path / "res"), "--in-process", *SWEEP_TINY,
    ]  # fmt: skip
    assert investigate.main(argv) == 0
    run = json.loads((tmp_path / "inv/synthetic/dwskd_T1/s1/metrics.json").read_text())
    assert run["run"]["config"]["method"]["distill"]["temperature"] == 1
    assert run["run"]["stages"]["teacher"]["file"] == str(
        paper.teacher_weights(teacher_run_dir(runs, "in_domain"))
    )
    with (tmp_path / "res/investigate_synthetic.csv").open() as stream:
        rows = {(r["variant"], r["model"]): r for r in csv.DictReader(stream)}
    deployed = run["models"][run["deployed"]]
    assert float(rows[("dwskd_T1", "deployed")]["acc_mean"]) == pytest.approx(
        deployed["val"]["acc"]
    )
    ensemble = rows[("dwskd_T1", "ensemble")]
    assert float(ensemble["auroc_mean"]) == pytest.approx(run["models"]["ensemble"]["val"]["auroc"])
    teacher = json.loads((tmp_path / "inv/synthetic/teacher/s1/metrics.json").read_text())
    assert float(rows[("teacher", "deployed")]["acc_mean"]) == pytest.approx(
        teacher["models"]["teacher"]["val"]["acc"]
    )
    text = (tmp_path / "res/investigate_synthetic.md").read_text()
    assert "VALIDATION" in text and "T = 1" in text and "CPU cores" in text


# ------------------------------------------------------------------- aggregation maths
def fake_run(root: Path, scenario: str, method: str, seed: int, acc: float, models: dict) -> None:
    entry = {
        "test": {"acc": acc, "balanced_acc": acc, "f1_macro": acc, "auroc": None},
        "params": 1000,
        "flops": 10,
        "latency_ms": 2.0 * seed,
    }
    results = {
        "run": {"wall_time_s": 60.0},
        "deployed": models["deployed"],
        "models": {name: dict(entry) for name in models["names"]},
    }
    path = root / scenario / "toy" / method / f"s{seed}" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))


def test_aggregate_mean_and_sample_std_over_seeds(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    two = {"deployed": "student_b", "names": ["student_a", "student_b", "ensemble", "teacher"]}
    for seed, acc in zip((1, 2, 3), (0.6, 0.7, 0.8), strict=True):
        fake_run(runs, "in_domain", "dwskd", seed, acc, two)
    fake_run(
        runs, "in_domain", "scratch", 1, 0.9, {"deployed": "student_a", "names": ["student_a"]}
    )
    paths = aggregate.write_results(runs, tmp_path / "out", "t")
    records = aggregate.summarise(aggregate.collect_rows(runs))
    dwskd = next(r for r in records if r["method"] == "dwskd" and r["model"] == "deployed")
    assert dwskd["acc_mean"] == pytest.approx(0.7)
    assert dwskd["acc_std"] == pytest.approx(0.1)  # sample std (ddof=1)
    assert dwskd["latency_ms_mean"] == pytest.approx(4.0)
    assert math.isnan(dwskd["auroc_mean"]) and dwskd["deployed"] == "student_b x3"
    assert {r["model"] for r in records if r["method"] == "dwskd"} == {
        "deployed",
        "student_a",
        "student_b",
        "ensemble",
    }
    text = paths[0].read_text()
    assert "| dwskd | deployed (student_b x3) | 3 | 70.0 ± 10.0 |" in text
    assert "| scratch | deployed (student_a x1) | 1 | 90.0 |" in text
    assert "best baseline (scratch): -20.0 accuracy points (more than one std)" in text
    assert "| dataset | scratch | dwskd |" in text  # the summary table, in METHODS order
    assert "| toy | 90.0 / 90.0 (n=1) | 70.0 ± 10.0 / 70.0 ± 10.0 (n=3) |" in text


def test_a_gap_is_weighed_against_the_seed_spread_that_exists() -> None:
    one_seed, spread = {"acc_std": math.nan}, {"acc_std": 0.05}
    assert aggregate.gap_size(3.0, one_seed, one_seed).startswith("one seed each")
    assert aggregate.gap_size(3.0, one_seed, spread) == "within one std"
    assert aggregate.gap_size(-6.0, spread, one_seed) == "more than one std"


def test_convergence_counts_epochs_to_scratchs_best_per_seed() -> None:
    def row(method: str, seed: int, curve: tuple[float, ...]) -> aggregate.Row:
        return aggregate.Row("in_domain", "toy", method, "deployed", seed, {}, "student_a", curve)

    rows = [
        row("scratch", 1, (0.5, 0.7, 0.6)),  # deploys its best epoch: 0.7 is the target
        row("scratch", 2, (0.4, 0.6)),
        row("ws", 1, (0.7, 0.8)),  # reached at epoch 1
        row("ws", 2, (0.5, 0.65)),  # reached at epoch 2
        row("dwskd", 1, (0.6, 0.69)),  # never reached
        row("dwskd", 2, (0.59, 0.61)),
    ]
    records = {r["method"]: r for r in aggregate.convergence(rows)}
    assert (records["ws"]["reached"], records["ws"]["epochs_mean"]) == (2, pytest.approx(1.5))
    assert (records["dwskd"]["reached"], records["dwskd"]["n"]) == (1, 2)
    assert records["dwskd"]["epochs_mean"] == pytest.approx(2.0)
    assert records["scratch"]["epochs_mean"] == pytest.approx(2.0)
    assert aggregate.epochs_to_reach((0.1, 0.2), 0.3) is None
    cells = aggregate.convergence_table(list(records.values()), "in_domain")
    assert cells[2] == "| toy | 2.0 ± 0.0 (2/2 seeds) | 1.5 ± 0.7 (2/2 seeds) | 2.0 (1/2 seeds) |"


def test_aggregate_without_runs_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="No runs"):
        aggregate.write_results(tmp_path, tmp_path / "out", "t")


# ----------------------------------------------------------------------------- bench
@pytest.mark.slow
def test_bench_smoke_measures_every_ratio(tmp_path: Path) -> None:
    from experiments.common import write_section

    write_section(tmp_path / "bench.md", "sweep-throughput", "## Sweep throughput\n| 1 |")
    out = bench.main(["--smoke", "--out", str(tmp_path / "bench.md")])
    text = out.read_text()
    assert text.startswith("# dwskd benchmark")  # rewritten ...
    assert text.count("## Sweep throughput\n| 1 |") == 1  # ... keeping the other script's part
    for ratio in (
        "framework / plain loop",
        "dual-model SKD / single student",
        "ViT-B / ViT-T, 32 px, batch 1",
        "ViT-B -> ViT-T",
        "depth 4 / depth 12, batch 1",
        "synthetic loader / training (one student)",
    ):
        assert ratio in text
    assert "python -m experiments.bench --smoke" in text


@pytest.mark.slow
def test_paper_fans_out_on_hydras_joblib_launcher_and_a_second_call_skips_it(
    tmp_path: Path,
) -> None:
    """``python -m experiments.paper hydra/launcher=joblib``: phases as Hydra multiruns in 2
    local processes; the same command again finds every job finished and runs none."""
    argv = [
        "--quick", "--datasets", "synthetic", "--scenarios", "in_domain",
        "--methods", "scratch", "ws", "--out", str(tmp_path / "runs"),
        "--results-dir", str(tmp_path / "results"), "--no-archive", "--img-size", "32",
        *SWEEP_TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
    ]  # fmt: skip
    assert paper.main(argv) == 0
    runs = tmp_path / "runs" / "in_domain" / "synthetic"
    finished = {
        m: (runs / m / "s1" / "metrics.json").stat().st_mtime_ns
        for m in ("teacher", "scratch", "ws")
    }
    multirun = yaml_of(tmp_path / "runs" / ".jobs" / "launch" / "students" / "multirun.yaml")
    assert multirun["hydra"]["launcher"]["_target_"].endswith("JoblibLauncher")
    assert multirun["hydra"]["launcher"]["n_jobs"] == 2
    job = yaml_of(tmp_path / "runs" / ".jobs" / "job" / "in_domain__synthetic__ws__s1.yaml")
    assert {"override /method": "ws"} in job["defaults"]
    assert paper.main(argv) == 0
    again = {m: (runs / m / "s1" / "metrics.json").stat().st_mtime_ns for m in finished}
    assert again == finished  # nothing ran again


@pytest.mark.parametrize(
    ("overrides", "in_process", "device", "launcher", "launch_overrides", "threads"),
    [
        ([], False, "cpu", "joblib", ("hydra.launcher.n_jobs=2",), 2),  # the measured default
        ([], True, "cpu", "basic", (), None),  # --in-process: the basic launcher only
        ([], False, "gpu", "basic", (), None),  # one job uses the whole GPU
        (["hydra/launcher=basic"], False, "cpu", "basic", (), None),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"], False, "cpu", "joblib",
         ("hydra.launcher.n_jobs=4",), 1),
        (["hydra/launcher=joblib"], False, "cpu", "joblib", (), 1),  # plugin default: a core each
    ],
)  # fmt: skip
def test_cpu_sweeps_default_to_two_joblib_processes_that_share_the_cores(
    monkeypatch: pytest.MonkeyPatch,
    overrides,
    in_process,
    device,
    launcher,
    launch_overrides,
    threads,
) -> None:
    from experiments import launch

    monkeypatch.setattr(launch.os, "cpu_count", lambda: 4)
    chosen, rest = launch.split_launch([*overrides, "seed=3"], in_process, device)
    assert (chosen.launcher, chosen.overrides, chosen.threads) == (
        launcher, launch_overrides, threads
    )  # fmt: skip
    assert rest == ["seed=3"]  # the jobs' own overrides


@pytest.mark.parametrize("user_threads", [None, "3"])
def test_a_joblib_phase_gets_its_thread_share_unless_the_user_set_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_threads: str | None
) -> None:
    import subprocess

    from experiments import launch

    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(cmd=cmd, threads=env.get("OMP_NUM_THREADS"))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    if user_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_threads)
    job = paper.Job("in_domain", "synthetic", "scratch", 1, tmp_path / "r", ("seed=1",))
    chosen = launch.Launch("joblib", ("hydra.launcher.n_jobs=2",), threads=2)
    launch.launch_phase([job], tmp_path, chosen, "students")
    assert seen["threads"] == (user_threads or "2")
    assert "hydra/launcher=joblib" in seen["cmd"] and "hydra.launcher.n_jobs=2" in seen["cmd"]


def yaml_of(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_the_archive_keeps_run_metrics_only_not_the_external_scores_inside_a_run(
    tmp_path: Path,
) -> None:
    run = tmp_path / "runs" / "pretrained" / "brain" / "ws" / "s1"
    (run / "external" / "lgg" / "student_a").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "external" / "lgg" / "student_a" / "metrics.json").write_text("{}")  # also in ^
    archive = paper.Archive(tmp_path / "runs", tmp_path / "archive")
    archive.store_all()
    stored = sorted(p.relative_to(archive.root) for p in archive.root.glob("**/metrics.json"))
    assert stored == [Path("pretrained/brain/ws/s1/metrics.json")]
