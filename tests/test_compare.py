"""experiments.compare: any sweep's runs grouped by what was swept, on fake and real run dirs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import compare
from tests.conftest import REPO, TINY

SWEEP = "multirun/2026-01-01_00-00-00_000000"


def fake_run(
    run_dir: Path, config: dict, acc: float, overrides: list[str] = (), external: float = 0.8
) -> None:
    """A finished run: metrics.json shaped like dwskd.pipeline's, optional overrides.yaml."""
    model = {
        "val": {"acc": acc, "balanced_acc": acc, "auroc": 0.9},
        "test": {"acc": acc - 0.1, "balanced_acc": acc - 0.1, "auroc": 0.8},
        "params": 2_500_000,
        "flops": 10,
        "latency_ms": 3.0,
    }
    results = {
        "run": {"config": config, "seed": config["seed"], "output_dir": str(run_dir)},
        "deployed": "student_b",
        "models": {"student_b": model, "teacher": dict(model, params=20_000_000)},
        "external": {"nih": {"student_b": {"metrics": {"auroc": external}}}},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(results))
    if overrides:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def config(run_dir: Path, seed: int, **method: object) -> dict:
    """A resolved config with the keys that differ per run and say nothing about the setting."""
    return {
        "seed": seed,
        "paths": {"output_root": str(run_dir.parent), "data_dir": "/data"},
        "run": {"started": f"2026-01-01T00:0{seed}:00"},
        "logger": {"save_dir": str(run_dir)},
        "data": {"name": "toy", "cache": f"{run_dir}/cache", "mean": [0.5]},
        "method": {"name": "dwskd", "distill": {"temperature": 4.0, "alpha": 1.0}, **method},
    }


def temperature_sweep(root: Path) -> None:
    """Hydra's layout: temperature 1/2/4 x seed 1/2, val acc 0.5 + 0.1 * (index + seed)."""
    job = 0
    for index, temperature in enumerate((1, 2, 4)):
        for seed in (1, 2):
            run_dir = root / SWEEP / f"{job}_dwskd_toy_s{seed}"
            cfg = config(run_dir, seed)
            cfg["method"]["distill"]["temperature"] = temperature
            typed = [f"method.distill.temperature={temperature}", f"seed={seed}"]
            overrides = [*typed, f"paths.output_root={root}", "eval.latency=false"]
            fake_run(run_dir, cfg, 0.5 + 0.1 * (index + seed), overrides, 0.7 + 0.1 * index)
            job += 1


def test_temperature_sweep_gives_one_row_per_temperature_over_its_seeds(tmp_path: Path) -> None:
    temperature_sweep(tmp_path)
    sweep = compare.compare(tmp_path / SWEEP)
    assert sweep.shown == ["method.distill.temperature"]  # not seed, paths, run, logger, cache
    assert sweep.determined == []
    records = sweep.records
    assert [r["method.distill.temperature"] for r in records] == [1, 2, 4]
    assert [(r["n"], r["seeds"]) for r in records] == [(2, "1 2")] * 3
    assert [r["val_acc_mean"] for r in records] == pytest.approx([0.65, 0.75, 0.85])
    assert [r["val_acc_std"] for r in records] == pytest.approx([0.0707107] * 3)
    assert [r["test_acc_mean"] for r in records] == pytest.approx([0.55, 0.65, 0.75])
    assert [r["ext_nih_auroc_mean"] for r in records] == pytest.approx([0.7, 0.8, 0.9])
    assert records[0]["params_mean"] == 2_500_000  # the deployed model's, not the teacher's

    paths = compare.write_comparison(tmp_path / SWEEP, tmp_path / "out", "t")
    assert [p.name for p in paths] == ["t.md", "t.csv", "t_method.distill.temperature.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    with paths[1].open() as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0])[:6] == [
        "method.distill.temperature",
        "n",
        "seeds",
        "deployed",
        "val_acc_mean",
        "val_acc_std",
    ]
    assert {"test_auroc_mean", "ext_nih_auroc_std", "params_mean", "latency_ms_std"} <= set(rows[0])
    assert [row["method.distill.temperature"] for row in rows] == ["1", "2", "4"]
    text = paths[0].read_text()
    assert "swept: `method.distill.temperature`" in text
    assert "| method.distill.temperature | n | deployed | val acc |" in text
    assert "nih AUROC (ext.) | params (M) | latency (ms) |" in text
    assert "| 1 | 2 | student_b x2 | 65.0 ± 7.1 | 65.0 ± 7.1 | 90.0 ± 0.0 | 55.0 ± 7.1 |" in text
    assert "| 70.0 ± 0.0 | 2.50 | 3.00 ± 0.00 |" in text
    assert "![method.distill.temperature](t_method.distill.temperature.png)" in text


def paper_tree(root: Path) -> None:
    """The paper's layout, no overrides.yaml: scenario shows only in the teacher file's path,
    which also names the seed; method.students follows from method.name."""
    for scenario in ("in_domain", "transfer"):
        for method, students in (("dwskd", 2), ("ws", 1)):
            for seed in (1, 2):
                run_dir = root / scenario / "toy" / method / f"s{seed}"
                cfg = config(run_dir, seed, name=method, students=students)
                teacher = root / scenario / "toy/teacher" / f"s{seed}"
                cfg["teacher"] = {"file": f"{teacher}/stages/teacher/teacher.safetensors"}
                acc = 0.6 + 0.1 * (scenario == "transfer") + 0.05 * (method == "ws")
                fake_run(run_dir, cfg, acc + 0.02 * seed)


def test_paper_layout_is_compared_by_method_and_teacher_with_seeds_as_replicates(
    tmp_path: Path,
) -> None:
    paper_tree(tmp_path / "paper")
    sweep = compare.compare(tmp_path / "paper")
    assert sweep.shown == ["method.name", "teacher.file"]
    assert sweep.determined == ["method.students"]
    assert [r["n"] for r in sweep.records] == [2, 2, 2, 2]
    means = {(r["method.name"], r["teacher.file"].split("/")[-7]): r for r in sweep.records}
    assert means["ws", "transfer"]["val_acc_mean"] == pytest.approx(0.78)
    assert means["dwskd", "in_domain"]["val_acc_mean"] == pytest.approx(0.63)
    paths = compare.write_comparison(tmp_path / "paper", tmp_path / "out")
    assert sorted(p.name for p in paths if p.suffix == ".png") == [
        "compare_method.name.png",
        "compare_teacher.file.png",
    ]
    text = paths[0].read_text()
    assert "| dwskd | in_domain | 2 | student_b x2 | 63.0 ± 1.4 |" in text  # shortened path
    assert "also varying, fixed by the swept keys (in the CSV): `method.students`" in text
    with paths[1].open() as stream:
        assert next(csv.reader(stream))[:3] == ["method.name", "teacher.file", "method.students"]


def test_seed_parts_of_other_runs_paths_are_masked_and_overrides_parsed() -> None:
    assert compare.mask_seed("/o/paper/in_domain/toy/teacher/s3/t.safetensors") == (
        "/o/paper/in_domain/toy/teacher/s*/t.safetensors"
    )
    assert (
        compare.mask_seed("/o/multirun/t/12_teacher_toy_s2/x") == "/o/multirun/t/*_teacher_toy_s*/x"
    )
    assert compare.parse_overrides(["+a.b=1", "hydra/launcher=slurm", "~c", "d@e.f=g"]) == {
        "a.b": "1",
        "hydra.launcher": "slurm",
        "c": "(deleted)",
        "e.f": "g",
    }


def test_a_dir_without_finished_runs_says_where_and_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "0_dwskd_toy_s1").mkdir()
    (tmp_path / "0_dwskd_toy_s1/record.json").write_text("{}")  # started, never finished
    with pytest.raises(SystemExit, match=rf"No finished runs .* under {tmp_path}.*metrics\.json"):
        compare.write_comparison(tmp_path)


@pytest.mark.slow
def test_real_multirun_of_two_temperatures_is_compared(tmp_path: Path) -> None:
    """``dwskd.run -m method.distill.temperature=1,2`` (tiny scratch runs, ~10 s), then compare."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", NO_ALBUMENTATIONS_UPDATE="1")
    sweep = ["method=scratch", "method.distill.temperature=1,2", "seed=1", "eval.latency=false"]
    cmd = [sys.executable, "-m", "dwskd.run", "-m", *sweep, f"paths.output_root={tmp_path}", *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (multirun,) = tmp_path.glob("multirun/*")
    compare.main([str(multirun), "--metrics", "test_acc"])
    text = (multirun / "compare.md").read_text()
    assert "2 finished runs, 2 settings; swept: `method.distill.temperature`" in text
    assert f"by `python -m experiments.compare {multirun} --metrics test_acc`" in text
    with (multirun / "compare.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["method.distill.temperature"], r["n"], r["seeds"]) for r in rows] == [
        ("1", "1", "1"),
        ("2", "1", "1"),
    ]
    assert (multirun / "compare_method.distill.temperature.png").is_file()
