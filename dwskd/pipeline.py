"""The stage pipeline: teacher -> selection -> train (SKD / baselines) -> fine-tune -> test.

Data flows one way: config -> datamodule + teacher -> selection -> module -> trainer -> report.
Objects are built once at the top (:func:`prepare`) and passed down. Every stage goes through
one :class:`~dwskd.rundir.StageRunner` (load its exports if finished, else fit, export, record);
stages hand each other models in memory, files are for resuming and for users.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dwskd import external, io, model_folder, models, objectives, rundir, selection, training
from dwskd.distill import DistillOptions
from dwskd.loggers import run_names
from dwskd.machine import git_commit, machine_info, package_versions
from dwskd.metrics import Bootstrap, scalar_only, score, scoring_options, subset_summary
from dwskd.module import STUDENT_NAMES, DistillModule
from dwskd.objectives import Objective
from dwskd.report import write_run_report
from dwskd.rundir import RunDirectory, StageOutput, StageRunner, StageSpec

log = logging.getLogger(__name__)

# The method.epochs / method.lr entry each stage role reads (rundir.STAGE_ROLES names the roles).
ROLE_SETTINGS = {"teacher": "teacher", "students": "train", "finetune": "finetune"}


@dataclass
class Context:
    """What the stages share, built once at the top from the config."""

    cfg: DictConfig
    run_dir: RunDirectory
    runner: StageRunner
    lightning: training.LightningFactories
    options: DistillOptions
    objective: Objective  # the method's (method.objective), for the students' joint training
    datamodule: Any
    shape: dict[str, int]
    pending_ckpt: str | None = None

    def spec(self, stage: str, epochs: int | None = None) -> StageSpec:
        """A training stage as data: role and seed offset from rundir.py, epochs and lr from
        ``method.epochs`` / ``method.lr`` of its role (``epochs`` given: those instead)."""
        key = ROLE_SETTINGS[rundir.STAGE_ROLES[stage]]
        epochs = stage_epochs(self.cfg, key) if epochs is None else epochs
        return StageSpec.of(stage, epochs, float(self.cfg.method.lr[key]))

    def plain(self) -> Objective:
        """Cross-entropy with the method's label smoothing: teacher, fine-tune, evaluation."""
        return objectives.CrossEntropy(self.options.cross_entropy_only())

    def module(
        self,
        students: list[nn.Module],
        spec: StageSpec | None,
        objective: Objective,
        teacher: nn.Module | None = None,
        names: list[str] | None = None,
    ) -> DistillModule:
        """The LightningModule of training stage ``spec``, or (``spec=None``) one that only
        evaluates. ``model.compile`` compiles the students of the train / fine-tune stages
        (not the teacher's fit, nor evaluation-only modules)."""
        cfg, dm = self.cfg, self.datamodule
        balance = cfg.data.get("balance", "none") == "loss"
        compiles = spec is not None and spec.role != "teacher" and cfg.model.get("compile", False)
        return DistillModule(
            students,
            class_names=dm.class_names,
            objective=objective,
            stage=None if spec is None else spec.name,
            optimizer=None if spec is None else instantiate(cfg.optimizer),
            lr=None if spec is None else spec.lr,
            warmup_fraction=cfg.scheduler.warmup_fraction,
            min_lr_ratio=cfg.scheduler.min_lr_ratio,
            teacher=teacher,
            class_weights=dm.class_weights() if balance else None,
            monitor=(self.lightning.monitor.metric, self.lightning.monitor.mode),
            compile_students=bool(compiles),
            names=names,
        )

    def fit(self, spec: StageSpec, module: DistillModule) -> dict[str, Any]:
        """Train one stage for its epochs from its own seed; returns what to record."""
        ckpt, self.pending_ckpt = self.pending_ckpt, None
        seed = self.datamodule.loader_seed = spec.seed(self.cfg.seed)
        facts = training.fit_stage(
            self.lightning,
            self.run_dir,
            spec.name,
            module,
            self.datamodule,
            spec.epochs,
            seed,
            ckpt,
        )
        return {"epochs": spec.epochs, **facts}

    def evaluate(self, module: DistillModule, split: str) -> training.Evaluation:
        loader = getattr(self.datamodule, f"{split}_dataloader")()
        return training.evaluate(self.lightning, module, loader, self.datamodule.class_names)


def stage_epochs(cfg: DictConfig, stage: str) -> int:
    """``trainer.max_epochs`` (when set) overrides every stage's ``method.epochs.<stage>``."""
    if cfg.trainer.get("max_epochs") is not None:
        return int(cfg.trainer.max_epochs)
    return int(cfg.method.epochs[stage])


# ------------------------------------------------------------------------ checks
def check_options(ctx: Context) -> None:
    """Fail before any training on options that cannot work (clear messages, no wasted hours)."""
    models.check_teacher_options(ctx.cfg.teacher)
    check_method(ctx.cfg.method)
    check_objective(ctx.cfg.method, ctx.objective)
    check_evaluation(ctx.cfg)
    if not ctx.options.labels and ctx.cfg.data.get("views", 1) != 2:
        raise ValueError(
            "method.distill.labels=false (label-free SKD) needs two augmented views: add data.views=2"
        )
    check_models(ctx)


def check_method(method: DictConfig) -> None:
    if method.students not in (0, 1, 2):
        raise ValueError(f"method.students={method.students} must be 0 (teacher only), 1 or 2")
    if method.init not in ("select", "random"):
        raise ValueError(f"method.init={method.init} must be 'select' or 'random'")
    if method.deploy not in ("a", "b", "best"):
        raise ValueError(f"method.deploy={method.deploy} must be a, b or best")
    if method.deploy == "b" and method.students < 2:
        raise ValueError("method.deploy=b needs method.students=2")


def check_objective(method: DictConfig, objective: Objective) -> None:
    """The objective gets the students and the teacher it needs (else it would silently be
    another method: mutual learning without a partner is plain CE)."""
    name = type(objective).__name__
    if method.students and method.students < objective.min_students:
        raise ValueError(
            f"method.students={method.students}: the {name} objective of method={method.name} "
            f"trains at least {objective.min_students} students"
        )
    if method.students and objective.uses_teacher and not method.needs_teacher:
        raise ValueError(
            f"method.needs_teacher=false, but the {name} objective of method={method.name} "
            "distills from the teacher (method.distill.gamma > 0)"
        )


def check_evaluation(cfg: DictConfig) -> None:
    """``optimized_metric`` names a split and metric; tuning on test gets a warning."""
    split, _, metric = str(cfg.optimized_metric).partition("/")
    if split not in ("val", "test") or not metric:
        raise ValueError(
            f"optimized_metric={cfg.optimized_metric} must be <split>/<metric>, e.g. val/acc."
        )
    if split == "test":
        log.warning(
            "optimized_metric=%s: a sweep tuning on test reports optimistic test figures; "
            "use a val/ metric",
            cfg.optimized_metric,
        )
    scoring_options(cfg.eval.bootstrap, cfg.eval.calibration_bins, prefix="eval.")
    if cfg.eval.get("external", True):
        external.check_external_sets(external.external_sets(cfg.data))
    if cfg.eval.get("latency_repeats") is not None:
        log.warning(
            "eval.latency_repeats is deprecated and ignored: latency is measured with "
            "torch.utils.benchmark for eval.latency_seconds per model"
        )


def check_models(ctx: Context) -> None:
    """Input size vs patch size, and a dry run of the weight selection, before any training."""
    method = ctx.cfg.method
    teacher = models.create_model(ctx.cfg.teacher, **ctx.shape)
    models.check_input_size(teacher, ctx.shape["img_size"])
    if not method.students:
        return
    student = new_student(ctx)
    models.check_input_size(student, ctx.shape["img_size"])
    if method.init == "select":
        for recipe in recipes(ctx.cfg)[: method.students]:
            selection.select_state_dict(teacher.state_dict(), student, recipe)


def recipes(cfg: DictConfig) -> list[selection.SelectionRecipe]:
    return [
        selection.SelectionRecipe(**OmegaConf.to_container(cfg.method[key], resolve=True))
        for key in ("selection_a", "selection_b")
    ]


def new_student(ctx: Context) -> nn.Module:
    return models.create_model(ctx.cfg.model, **ctx.shape)


# ------------------------------------------------------------------------ stages
def teacher_stage(ctx: Context) -> nn.Module:
    """Load (hub/file) or create the teacher, then train it on the task for epochs.teacher."""
    tcfg = ctx.cfg.teacher

    def fit() -> StageOutput:
        teacher, head = models.load_teacher(
            tcfg, **ctx.shape, class_names=list(ctx.datamodule.class_names)
        )
        spec = ctx.spec("teacher", 0 if tcfg.source == "random" else None)
        facts = {"epochs": spec.epochs, "source": tcfg.source, "file": tcfg.get("file")}
        facts["head"] = head.how
        probe = int(tcfg.get("probe_epochs") or 0) if tcfg.source in ("file", "hub") else 0
        if probe > 0 and head.changed:
            facts["probe"] = probe_head(ctx, teacher, probe)
        if spec.epochs > 0:
            module = ctx.module([teacher], spec, ctx.plain(), names=["teacher"])
            loaded = loaded_score(ctx, module) if tcfg.source in ("file", "hub") else None
            facts.update(ctx.fit(spec, module))
            if loaded is not None:
                facts.update(keep_loaded_if_better(ctx, teacher, loaded, facts.get("best_score")))
        unchanged_file = tcfg.source == "file" and spec.epochs == 0 and not head.changed
        references = {"teacher": Path(tcfg.file)} if unchanged_file else None
        return StageOutput({"teacher": teacher}, facts, references)

    def blank() -> dict[str, nn.Module]:
        return {"teacher": models.create_model(tcfg, **ctx.shape)}

    return ctx.runner.run("teacher", blank, fit).models["teacher"]


def loaded_score(ctx: Context, module: DistillModule) -> tuple[float, dict[str, torch.Tensor]]:
    """The loaded teacher's monitored validation score, and a copy of its weights."""
    score = ctx.evaluate(module, "val").metrics["teacher"][ctx.lightning.monitor.metric]
    weights = {k: v.detach().clone() for k, v in module.students[0].state_dict().items()}
    return float(score), weights


def keep_loaded_if_better(
    ctx: Context,
    teacher: nn.Module,
    loaded: tuple[float, dict[str, torch.Tensor]],
    best: float | None,
) -> dict[str, Any]:
    """Fine-tuning competes with the loaded weights on validation, like any other epoch.

    Why: fine-tuning a pretrained teacher on a small task can make it worse on validation
    (the union teacher on lung CT); selecting from the worse model would waste what it knew.
    """
    score, weights = loaded
    monitor = ctx.lightning.monitor
    kept = best is None or monitor.best({"loaded": score, "fine-tuned": best}) == "loaded"
    if kept:
        teacher.load_state_dict(weights)
        log.info(
            "teacher: the loaded weights (val %s %.4f) beat fine-tuning", monitor.metric, score
        )
    return {"loaded_val_score": score, "kept": "loaded weights" if kept else "fine-tuned"}


def probe_head(ctx: Context, teacher: nn.Module, epochs: int) -> dict[str, Any]:
    """Linear probe: train only a new head for ``teacher.probe_epochs`` before fine-tuning.

    Why: the first full fine-tuning steps with a random head push large, meaningless
    gradients into pretrained features (the lung CT pilot lost accuracy that way). The
    probe's checkpoints go when it ends: a resume replays it exactly from its seed.
    """
    head = {id(p) for p in teacher.get_classifier().parameters()}
    body = [p for p in teacher.parameters() if id(p) not in head and p.requires_grad]
    for p in body:
        p.requires_grad_(False)
    pending, ctx.pending_ckpt = ctx.pending_ckpt, None  # ckpt_path= is for the stage proper
    try:
        spec = ctx.spec("teacher_probe", epochs)  # the teacher's lr, the probe's own seed
        facts = ctx.fit(spec, ctx.module([teacher], spec, ctx.plain(), names=["teacher"]))
    finally:
        ctx.pending_ckpt = pending
        for p in body:
            p.requires_grad_(True)
    if ctx.run_dir.writer and not ctx.cfg.checkpoint.keep:
        rundir.remove_checkpoints(ctx.run_dir.layout, "teacher_probe")
    return facts


def select_stage(ctx: Context, teacher: nn.Module | None) -> list[nn.Module]:
    """Create the students: weight selection from the teacher (two recipes) or random init.

    Selection is cheap and deterministic, so it runs every time; its record keeps the plans.
    """
    import lightning as L

    method = ctx.cfg.method
    L.seed_everything(ctx.runner.seed_of("select"), workers=True)  # fresh heads, random init
    students = [new_student(ctx) for _ in range(method.students)]
    if method.init != "select" or not students:
        return students
    plans = {}
    for name, student, recipe in zip(STUDENT_NAMES, students, recipes(ctx.cfg), strict=False):
        plans[name] = selection.initialize_from_teacher(student, teacher, recipe).to_dict()
    if ctx.run_dir.writer and ctx.run_dir.layout.stage_record("select") is None:
        io.write_json(ctx.run_dir.layout.done_json("select"), {"stage": "select", "plans": plans})
    return students


def train_stage(
    ctx: Context, students: list[nn.Module], teacher: nn.Module | None
) -> dict[str, dict]:
    """SKD between the students (or the baseline's objective); returns their val metrics."""
    names = list(STUDENT_NAMES[: len(students)])

    def fit() -> StageOutput:
        spec = ctx.spec("train")
        module = ctx.module(students, spec, ctx.objective, teacher)
        facts = ctx.fit(spec, module)
        val = ctx.evaluate(module, "val").metrics
        facts["val"] = {n: val[n] for n in names}
        ema = {}
        if module.use_ema and ctx.cfg.checkpoint.ema:
            ema = {f"ema_{n}": m for n, m in zip(names, module.ema, strict=True)}
        return StageOutput(dict(zip(names, students, strict=True)), facts, extra_exports=ema)

    output = ctx.runner.run("train", lambda: dict(zip(names, students, strict=True)), fit)
    return output.facts["val"]


def deployed_name(cfg: DictConfig, monitor: training.Monitor, val: Mapping[str, dict]) -> str:
    if cfg.method.deploy == "best":
        return monitor.best({name: metrics[monitor.metric] for name, metrics in val.items()})
    return f"student_{cfg.method.deploy}"


def finetune_stage(ctx: Context, name: str, student: nn.Module) -> None:
    """Fine-tune the deployed student alone with cross-entropy on the task."""

    def fit() -> StageOutput:
        # A method without fine-tuning epochs keeps none, even under trainer.max_epochs.
        spec = ctx.spec("finetune", None if ctx.cfg.method.epochs.finetune > 0 else 0)
        facts: dict[str, Any] = {"epochs": spec.epochs, "deployed": name}
        if spec.epochs > 0:
            facts.update(ctx.fit(spec, ctx.module([student], spec, ctx.plain(), names=[name])))
        return StageOutput({name: student}, facts)

    ctx.runner.run("finetune", lambda: {name: student}, fit)
    ctx.runner.supersede("train", name, by="finetune")


# ------------------------------------------------------------------- test + report
def test_stage(ctx: Context, students: list[nn.Module], teacher: nn.Module | None):
    """Evaluate every model (students, their ensemble, teacher) on val and test, with costs.

    Validation metrics of the final weights go into metrics.json too, so that sweeps over
    knobs can be compared and chosen on validation data without looking at test. Both
    splits are scored by dwskd-eval's scorer; test also gets bootstrap intervals.
    """
    entries: dict[str, dict] = {}
    predictions: dict[str, tuple] = {}
    scoring = scoring_options(ctx.cfg.eval.bootstrap, ctx.cfg.eval.calibration_bins, "eval.")
    groups = [("students", students), ("teacher", [teacher] if teacher is not None else [])]
    for group, group_models in groups:
        if not group_models:
            continue
        names = ["teacher"] if group == "teacher" else None  # None: student_a, student_b
        module = ctx.module(group_models, None, ctx.plain(), names=names)  # evaluates only
        val, test = ctx.evaluate(module, "val"), ctx.evaluate(module, "test")
        for name in test.probs:
            entries[name] = score_splits(ctx, val, test, name, scoring)
            predictions[name] = (test.probs[name].numpy(), test.targets.numpy())
            by_source = source_scores(ctx.datamodule, test.probs[name], test.targets)
            if by_source:
                entries[name]["test_by_source"] = by_source
    for name, model in named_models(students, teacher).items():
        entries[name].update(model_costs(ctx, model))
    if "ensemble" in entries:
        members = [entries[n] for n in STUDENT_NAMES[: len(students)]]
        entries["ensemble"].update(
            {k: sum(m[k] for m in members) for k in ("params", "flops") if k in members[0]}
        )
    return entries, predictions


def score_splits(
    ctx: Context,
    val: training.Evaluation,
    test: training.Evaluation,
    name: str,
    scoring: tuple[Bootstrap, int],
) -> dict[str, Any]:
    """One model's val and test metrics by the one scorer; the rest of test's score (intervals,
    per-class figures, reliability bins) as ``test_details``."""
    names, positive = ctx.datamodule.class_names, ctx.datamodule.positive_index
    bootstrap, bins = scoring
    scores = {
        split: score(
            split_eval.probs[name],
            split_eval.targets,
            names,
            positive,
            n_bins=bins,
            bootstrap=bootstrap if split == "test" else None,
        )
        for split, split_eval in (("val", val), ("test", test))
    }
    details = {k: v for k, v in scores["test"].items() if k != "metrics"}
    return {
        "val": scores["val"]["metrics"],
        "test": scores["test"]["metrics"],
        "test_details": details,
    }


def source_scores(datamodule: Any, probs: torch.Tensor, targets: torch.Tensor) -> dict:
    """A union's test split scored per source too: in-source vs a second source's held-out part."""
    if not hasattr(datamodule, "source_indices"):
        return {}
    names = datamodule.class_names
    return {
        key: subset_summary(probs[torch.as_tensor(index)], targets[torch.as_tensor(index)], names)
        for key, index in datamodule.source_indices("test").items()
    }


def named_models(students: list[nn.Module], teacher: nn.Module | None) -> dict[str, nn.Module]:
    named = dict(zip(STUDENT_NAMES, students, strict=False))
    if teacher is not None:
        named["teacher"] = teacher
    return named


def model_costs(ctx: Context, model: nn.Module) -> dict[str, Any]:
    shape = {"in_chans": ctx.shape["in_chans"], "img_size": ctx.shape["img_size"]}
    costs: dict[str, Any] = {
        "params": models.count_params(model),
        "flops": models.count_flops(model, **shape),
    }
    if ctx.cfg.eval.latency:
        latency = models.measure_latency(
            model, min_run_time=float(ctx.cfg.eval.latency_seconds), **shape
        )
        costs["latency_ms"] = latency["median_ms"]
        costs["latency"] = latency
    return costs


def write_exports(ctx: Context, named: Mapping[str, nn.Module], results: dict) -> dict[str, str]:
    """``exports/<model>/`` for every tested model: timm's folder format + dwskd provenance."""
    dm, layout = ctx.datamodule, ctx.run_dir.layout
    preprocessing = model_folder.Preprocessing(
        in_chans=dm.in_chans,
        img_size=dm.img_size,
        mean=tuple(dm.mean),
        std=tuple(dm.std),
        label_names=tuple(dm.class_names),
        standardize=dm.standardize,
    )
    run = results["run"]
    written = {}
    for name, model in named.items():
        entry = results["models"][name]
        provenance = {
            "model": name,
            "deployed": name == results["deployed"],
            "run_dir": str(layout.root),
            "command": run["command"],
            "method": run["method"],
            "data": run["data"],
            "seed": run["seed"],
            "git": run["git"],
            "positive_class": entry["test"].get("positive_class"),
            "metrics": {split: scalar_only(entry[split]) for split in ("val", "test")},
        }
        weights = layout.final_weights(name)  # this run's export, or a referenced file
        folder = model_folder.write_model_folder(
            layout.export_dir(name),
            model,
            preprocessing,
            provenance,
            weights=weights if model_folder.holds_state_of(weights, model) else None,
        )
        written[name] = str(folder.relative_to(layout.root))
    return written


def score_external_sets(ctx: Context, results: Mapping[str, Any]) -> dict[str, dict]:
    """The deployed model and the teacher on every set of ``data.external`` (inference only)."""
    exports, root = results["run"]["exports"], ctx.run_dir.layout.root
    scored = [results["deployed"], *(["teacher"] if "teacher" in exports else [])]
    folders = {name: root / exports[name] for name in dict.fromkeys(scored)}
    return external.score_external(folders, external.external_sets(ctx.cfg.data), root)


def run_info(ctx: Context, wall_time: float, deployed: str, command: str | None) -> dict:
    cfg = ctx.cfg
    return {
        "command": command or "(in-process run)",
        "method": cfg.method.name,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "teacher": cfg.teacher.name,
        "teacher_source": cfg.teacher.source,
        "seed": cfg.seed,
        "stage_seeds": {s: ctx.runner.seed_of(s) for s in rundir.STAGES},
        "deployed": deployed,
        "wall_time_s": round(ctx.run_dir.earlier_wall_time() + wall_time, 1),  # every process
        "output_dir": str(ctx.run_dir.layout.root),
        "resumes": ctx.run_dir.resumes(),
        "stages": {s: r.get("facts", r) for s, r in stage_records(ctx.run_dir.layout).items()},
        "machine": machine_info(),
        "packages": package_versions(),
        "git": git_commit(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def stage_records(layout: rundir.RunLayout) -> dict[str, dict]:
    return {s: r for s in rundir.STAGES if (r := layout.stage_record(s)) is not None}


def prepare(cfg: DictConfig, run_dir: RunDirectory) -> Context:
    """Build everything once: data, Lightning factories, options, the stage runner."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    shape = {
        "num_classes": datamodule.num_classes,
        "in_chans": datamodule.in_chans,
        "img_size": datamodule.img_size,
    }
    runner = StageRunner(
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        cfg.seed,
        keep_checkpoints=bool(cfg.checkpoint.keep),
        load_reference=lambda model, path: models.load_weights_file(model, path),
    )
    names = run_names(cfg.data.name, cfg.method.name, cfg.seed)
    options = DistillOptions.from_mapping(OmegaConf.to_container(cfg.method.distill))
    return Context(
        cfg=cfg,
        run_dir=run_dir,
        runner=runner,
        lightning=training.build_factories(cfg, names),
        options=options,
        objective=objectives.from_config(cfg.method.objective, options),
        datamodule=datamodule,
        shape=shape,
        pending_ckpt=cfg.get("ckpt_path"),
    )


def run_pipeline(
    cfg: DictConfig,
    out_dir: Path,
    command: str | None = None,
    hydra_files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Accept the run dir (or refuse, changing nothing), run every stage, test, report.

    A finished run of the same config is skipped: its recorded results are returned.
    """
    config = OmegaConf.to_container(cfg, resolve=True)
    command = command or "(in-process run)"
    finished = rundir.finished_results(rundir.RunLayout(Path(out_dir)), config)
    if finished is not None:
        log.info("%s is a finished run of this config: skipped, its results returned", out_dir)
        return finished
    with rundir.opened_run_dir(
        Path(out_dir),
        config,
        allow_changes=bool(cfg.resume.allow_config_changes),
        writer=rank_zero_only.rank == 0,
    ) as run_dir:
        ctx = prepare(cfg, run_dir)
        check_options(ctx)
        run_dir.start(config, command, hydra_files)
        return execute(ctx, command)


def execute(ctx: Context, command: str) -> dict[str, Any]:
    """Run every stage with the run's loggers open: one W&B run for all stages (continued on
    resume), closed even after a crash so that the next job of a multirun starts cleanly."""
    with ctx.lightning.loggers.session(ctx.run_dir, lambda: logged_config(ctx)):
        return run_stages(ctx, command)


def logged_config(ctx: Context) -> dict[str, Any]:
    """The config trackers record: the resolved config, plus the run's facts known before
    training (code version, stage seeds, data), so runs can be filtered and compared by them."""
    facts = {
        "git": git_commit(),
        "stage_seeds": {s: ctx.runner.seed_of(s) for s in rundir.STAGES},
        "data": ctx.datamodule.summary(),
        "dir": str(ctx.run_dir.layout.root),
    }
    return {**OmegaConf.to_container(ctx.cfg, resolve=True), "run": facts}


def run_stages(ctx: Context, command: str) -> dict[str, Any]:
    """The stages in order, then the test stage and the report (rank 0 only)."""
    start, cfg, run_dir = time.perf_counter(), ctx.cfg, ctx.run_dir
    needs_teacher = cfg.method.needs_teacher or not cfg.method.students
    teacher = teacher_stage(ctx) if needs_teacher else None
    students = select_stage(ctx, teacher)
    deployed = "teacher"
    if students:
        val = train_stage(ctx, students, teacher)
        deployed = deployed_name(cfg, ctx.lightning.monitor, val)
        finetune_stage(ctx, deployed, students[STUDENT_NAMES.index(deployed)])
    if not run_dir.writer:
        return {}
    entries, predictions = test_stage(ctx, students, teacher)
    results = {
        "run": run_info(ctx, time.perf_counter() - start, deployed, command),
        "data": ctx.datamodule.summary(),
        "deployed": deployed,
        "models": entries,
    }
    layout = run_dir.layout
    results["run"]["exports"] = write_exports(ctx, named_models(students, teacher), results)
    if cfg.eval.get("external", True):
        results["external"] = score_external_sets(ctx, results)
    csvs = {s: layout.metrics_csv(s) for s in rundir.STAGES if layout.metrics_csv(s).is_file()}
    dm = ctx.datamodule
    files = dm.split("test").names
    plots = bool(ctx.cfg.eval.get("plots", True))
    paths = write_run_report(layout, results, predictions, csvs, files, dm.positive_index, plots)
    images = {k: p for k, p in paths.items() if p.suffix == ".png"}
    ctx.lightning.loggers.log_results(layout, results, images)
    return results


def optimized_value(results: Mapping[str, Any], key: str) -> float | None:
    """``optimized_metric`` (e.g. ``val/acc``) of the deployed model: what sweepers optimise."""
    split, _, metric = key.partition("/")
    deployed = results.get("deployed")
    value = results.get("models", {}).get(deployed, {}).get(split, {}).get(metric)
    return None if value is None else float(value)
