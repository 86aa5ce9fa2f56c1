"""The stage pipeline: teacher -> selection -> train (SKD / baselines) -> fine-tune -> test.

Data flows one way: config -> datamodule + teacher -> selection -> module -> trainer -> report.
Stages talk to each other only through the files in ``<run dir>/stages/<stage>/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dwskd import distill, models, selection, training
from dwskd.module import DistillModule
from dwskd.report import write_run_report

log = logging.getLogger(__name__)

TEACHER_SOURCES = ("hub", "file", "fit", "random")
REPORT_NAMES = ("student_a", "student_b")


@dataclass
class Run:
    """What every stage needs: the config, the run directory, the data and its shape."""

    cfg: DictConfig
    out_dir: Path
    datamodule: Any
    shape: dict[str, int]
    pending_ckpt: str | None = None
    records: dict[str, Any] = field(default_factory=dict)

    def module(
        self,
        students: list[nn.Module],
        stage: str,
        teacher: nn.Module | None = None,
        distill_cfg: dict | None = None,
    ) -> DistillModule:
        cfg, dm = self.cfg, self.datamodule
        balance = cfg.data.get("balance", "none") == "loss"
        return DistillModule(
            students,
            num_classes=dm.num_classes,
            class_names=dm.class_names,
            distill_cfg=distill_cfg or OmegaConf.to_container(cfg.method.distill, resolve=True),
            optimizer=instantiate(cfg.optimizer),
            lr=float(cfg.method.lr[stage]),
            warmup_fraction=cfg.scheduler.warmup_fraction,
            min_lr_ratio=cfg.scheduler.min_lr_ratio,
            teacher=teacher,
            class_weights=dm.class_weights() if balance else None,
        )

    def fit(self, stage: str, module: DistillModule, epochs: int) -> None:
        ckpt, self.pending_ckpt = self.pending_ckpt, None
        L.seed_everything(self.cfg.seed + len(self.records), workers=True)
        training.fit(self.cfg, self.out_dir, stage, module, self.datamodule, epochs, ckpt)


def plain_ce(cfg: DictConfig) -> dict[str, Any]:
    """Distillation settings that reduce DistillModule to cross-entropy training."""
    base = OmegaConf.to_container(cfg.method.distill, resolve=True)
    return dict(base, alpha=0.0, beta=0.0, gamma=0.0, labels=True)


# ------------------------------------------------------------------------ checks
def check_options(run: Run) -> None:
    """Fail before any training on options that cannot work (clear messages, no wasted hours)."""
    method, teacher_cfg = run.cfg.method, run.cfg.teacher
    if teacher_cfg.source not in TEACHER_SOURCES:
        raise ValueError(f"teacher.source={teacher_cfg.source} must be one of {TEACHER_SOURCES}")
    if method.students not in (0, 1, 2):
        raise ValueError(f"method.students={method.students} must be 0 (teacher only), 1 or 2")
    if method.init not in ("select", "random"):
        raise ValueError(f"method.init={method.init} must be 'select' or 'random'")
    if method.deploy not in ("a", "b", "best"):
        raise ValueError(f"method.deploy={method.deploy} must be a, b or best")
    if method.deploy == "b" and method.students < 2:
        raise ValueError("method.deploy=b needs method.students=2")
    d = method.distill
    if not d.labels and run.cfg.data.get("views", 1) != 2:
        raise ValueError(
            "method.distill.labels=false (label-free SKD) needs two augmented views: add data.views=2"
        )

    distill.check_distill_options(d.alpha, d.beta, d.temperature, d.ema_momentum)
    if method.students and method.init == "select":
        teacher = models.create_model(teacher_cfg, **run.shape)
        for recipe in recipes(run.cfg)[: method.students]:
            selection.select_state_dict(teacher.state_dict(), new_student(run), recipe)


def recipes(cfg: DictConfig) -> list[selection.SelectionRecipe]:
    return [
        selection.SelectionRecipe(**OmegaConf.to_container(cfg.method[key], resolve=True))
        for key in ("selection_a", "selection_b")
    ]


def new_student(run: Run) -> nn.Module:
    return models.create_model(run.cfg.model, **run.shape)


# ------------------------------------------------------------------------ stages
def teacher_stage(run: Run) -> nn.Module:
    """Load (hub/file) or create the teacher, then train it on the task for epochs.teacher."""
    cfg, stage = run.cfg, "teacher"
    weights = training.stage_dir(run.out_dir, stage) / "teacher.safetensors"
    done = training.read_done(run.out_dir, stage)
    if done:
        # The stage's own export holds the trained weights: no second hub download or file read.
        log.info("stage teacher: finished earlier, loading %s", weights)
        run.records[stage] = done
        return training.load_weights(models.create_model(cfg.teacher, **run.shape), weights)
    teacher = initial_teacher(run)
    epochs = 0 if cfg.teacher.source == "random" else training.stage_epochs(cfg, stage)
    if epochs > 0:
        run.fit(stage, run.module([teacher], stage, distill_cfg=plain_ce(cfg)), epochs)
    training.save_weights(teacher, weights)
    run.records[stage] = {
        "epochs": epochs,
        "source": cfg.teacher.source,
        "file": cfg.teacher.get("file"),
        "head": cfg.teacher.get("head", "auto"),
    }
    training.write_done(run.out_dir, stage, run.records[stage])
    return teacher


def initial_teacher(run: Run) -> nn.Module:
    tcfg = run.cfg.teacher
    if tcfg.source == "hub":
        return models.create_hub_model(tcfg, **run.shape)
    teacher = models.create_model(tcfg, **run.shape)
    if tcfg.source == "file":
        if not tcfg.get("file"):
            raise ValueError("teacher.source=file needs teacher.file=/path/to/weights.safetensors")
        models.load_weights_file(teacher, tcfg.file)
    elif tcfg.source == "random":
        log.warning("teacher.source=random: the teacher is untrained (meant for tests only)")
    if tcfg.get("head", "auto") == "reinit":
        teacher.reset_classifier(run.shape["num_classes"])  # fresh head even for equal label counts
    return teacher


def select_stage(run: Run, teacher: nn.Module | None) -> list[nn.Module]:
    """Create the students: weight selection from the teacher (two recipes) or random init."""
    method = run.cfg.method
    students = [new_student(run) for _ in range(method.students)]
    if method.init != "select":
        return students
    out = training.stage_dir(run.out_dir, "select")
    plans = {}
    for name, student, recipe in zip(REPORT_NAMES, students, recipes(run.cfg), strict=False):
        plan = selection.initialize_from_teacher(student, teacher, recipe)
        plans[name] = plan.to_dict()
        if not (out / f"{name}.safetensors").exists():
            selection.save_selection(out / f"{name}.safetensors", student.state_dict(), plan)
    run.records["select"] = {
        "head_reinitialised": {n: p.get("head_reinitialised") for n, p in plans.items()}
    }
    return students


def train_stage(run: Run, students: list[nn.Module], teacher: nn.Module | None) -> dict[str, float]:
    """SKD between the students (or the baseline's objective); returns per-student val accuracy."""
    stage, names = "train", REPORT_NAMES[: len(students)]
    paths = [training.stage_dir(run.out_dir, stage) / f"{n}.safetensors" for n in names]
    done = training.read_done(run.out_dir, stage)
    if done:
        for student, path in zip(students, paths, strict=True):
            training.load_weights(student, path)
        run.records[stage] = done
        return done["val_acc"]
    module = run.module(students, stage, teacher=teacher)
    run.fit(stage, module, training.stage_epochs(run.cfg, stage))
    metrics = training.evaluate(run.cfg, module, run.datamodule, "val")
    val_acc = {n: metrics[f"val/{short}/acc"] for n, short in zip(names, module.names, strict=True)}
    for student, path in zip(students, paths, strict=True):
        training.save_weights(student, path)
    run.records[stage] = {"val_acc": val_acc, "epochs": training.stage_epochs(run.cfg, stage)}
    training.write_done(run.out_dir, stage, run.records[stage])
    return val_acc


def deployed_name(cfg: DictConfig, val_acc: dict[str, float]) -> str:
    if cfg.method.deploy == "best":
        return max(val_acc, key=val_acc.get)
    return f"student_{cfg.method.deploy}"


def finetune_stage(run: Run, student: nn.Module) -> None:
    """Fine-tune the deployed student alone with cross-entropy on the task."""
    stage = "finetune"
    epochs = training.stage_epochs(run.cfg, stage) if run.cfg.method.epochs.finetune > 0 else 0
    weights = training.stage_dir(run.out_dir, stage) / "student.safetensors"
    if training.read_done(run.out_dir, stage):
        training.load_weights(student, weights)
        return
    if epochs > 0:
        run.fit(stage, run.module([student], stage, distill_cfg=plain_ce(run.cfg)), epochs)
    training.save_weights(student, weights)
    training.write_done(run.out_dir, stage, {"epochs": epochs})


# ------------------------------------------------------------------- test + report
def test_stage(run: Run, students: list[nn.Module], teacher: nn.Module | None) -> tuple[dict, dict]:
    """Evaluate every model (students, their ensemble, teacher) on val and test, with costs.

    Validation metrics of the final weights go into metrics.json too, so that sweeps over
    knobs can be compared and chosen on validation data without looking at test.
    """
    entries: dict[str, dict] = {}
    predictions: dict[str, tuple] = {}
    groups = [("students", students), ("teacher", [teacher] if teacher is not None else [])]
    for group, group_models in groups:
        if not group_models:
            continue
        module = run.module(group_models, "finetune", distill_cfg=plain_ce(run.cfg))
        val = training.evaluate(run.cfg, module, run.datamodule, "val")
        training.evaluate(run.cfg, module, run.datamodule, "test")
        for short, flat in module.test_flat.items():
            name = report_name(group, short)
            entries[name] = {"val": strip_prefix(val, f"val/{short}/"), "test": flat}
            probs, targets = module.test_outputs[short]
            predictions[name] = (probs.numpy(), targets.numpy())
    for name, model in named_models(students, teacher).items():
        entries[name].update(model_costs(run, model))
    if "ensemble" in entries:
        members = [entries[n] for n in REPORT_NAMES[: len(students)]]
        entries["ensemble"].update(
            {k: sum(m[k] for m in members) for k in members[0] if k not in ("val", "test")}
        )
    return entries, predictions


def strip_prefix(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def report_name(group: str, short: str) -> str:
    if group == "teacher":
        return "teacher"
    return "ensemble" if short == "ensemble" else f"student_{short}"


def named_models(students: list[nn.Module], teacher: nn.Module | None) -> dict[str, nn.Module]:
    named = dict(zip(REPORT_NAMES, students, strict=False))
    if teacher is not None:
        named["teacher"] = teacher
    return named


def model_costs(run: Run, model: nn.Module) -> dict[str, float]:
    shape = {"in_chans": run.shape["in_chans"], "img_size": run.shape["img_size"]}
    costs: dict[str, float] = {
        "params": models.count_params(model),
        "flops": models.count_flops(model, **shape),
    }
    if run.cfg.eval.latency:
        costs["latency_ms"] = models.measure_latency_ms(
            model, repeats=run.cfg.eval.latency_repeats, **shape
        )
    return costs


def run_info(run: Run, wall_time: float, deployed: str, command: str | None) -> dict[str, Any]:
    cfg = run.cfg
    return {
        "command": command or "(in-process run)",
        "method": cfg.method.name,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "teacher": cfg.teacher.name,
        "teacher_source": cfg.teacher.source,
        "seed": cfg.seed,
        "deployed": deployed,
        "wall_time_s": round(wall_time, 1),
        "output_dir": str(run.out_dir),
        "stages": run.records,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def prepare(cfg: DictConfig, out_dir: Path) -> Run:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    shape = {
        "num_classes": datamodule.num_classes,
        "in_chans": datamodule.in_chans,
        "img_size": datamodule.img_size,
    }
    return Run(
        cfg=cfg,
        out_dir=Path(out_dir),
        datamodule=datamodule,
        shape=shape,
        pending_ckpt=cfg.get("ckpt_path"),
    )


def run_pipeline(cfg: DictConfig, out_dir: Path, command: str | None = None) -> dict[str, Any]:
    """Run every stage the method needs, then test and write the report. Returns metrics.json."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / "metrics.json").exists():
        raise FileExistsError(
            f"{out_dir}/metrics.json exists: this run is complete. Start a new run (a new "
            "hydra.run.dir) instead of overwriting its results."
        )
    run = prepare(cfg, out_dir)
    check_options(run)
    teacher = teacher_stage(run) if cfg.method.needs_teacher or not cfg.method.students else None
    students = select_stage(run, teacher)
    deployed = "teacher"
    if students:
        val_acc = train_stage(run, students, teacher)
        deployed = deployed_name(cfg, val_acc)
        finetune_stage(run, students[REPORT_NAMES.index(deployed)])
    if rank_zero_only.rank != 0:
        return {}
    entries, predictions = test_stage(run, students, teacher)
    results = {
        "run": run_info(run, time.perf_counter() - start, deployed, command),
        "data": run.datamodule.summary(),
        "deployed": deployed,
        "models": entries,
    }
    csv = out_dir / "logs" / "train" / "metrics.csv"
    if not csv.exists():
        csv = out_dir / "logs" / "teacher" / "metrics.csv"
    paths = write_run_report(out_dir, results, predictions, csv if csv.exists() else None)
    training.log_report(cfg, out_dir, results, paths)
    return results
