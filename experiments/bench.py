"""What the framework costs, measured side by side in one process: ``results/bench.md``.

    python -m experiments.bench             # ~3-5 min on 2 CPU cores
    python -m experiments.bench --smoke     # seconds: tiny sizes, checks that it runs
    python -m experiments.bench --device gpu  # CUDA, 16-mixed, 224 px, batch 128:
                                              # results/bench_gpu224.md
    python -m experiments.bench --compile   # adds: model.compile=true vs eager (either device)

1. a framework training step (DistillModule + lightning.Trainer, as the pipeline builds
   it) vs a plain PyTorch loop (same ViT-T, batch, tensors, AdamW, gradient clipping);
2. a dual-model SKD step (two students + EMA teachers) and a KD step (student + frozen
   ViT-S) vs a single-student step;
3. inference latency of ViT-T vs ViT-S vs ViT-B (batch 1 and 32, two image sizes);
   and the ViT-T student's parameters and latency at depth 4, 6, 9 and 12 (the depth sweep's
   trade-off, measured alone);
4. weight-selection time ViT-B -> ViT-T and ViT-S -> ViT-T;
5. train-loader throughput (synthetic, and real lung CT when present) vs training throughput.

Steps are timed start-to-start (data fetch, forward, backward, optimiser, EMA update and
logging all inside) after warm-up steps; every figure is a median of repeats. On the GPU the
clock is read after ``torch.cuda.synchronize()``; the framework runs with Lightning's
``precision="16-mixed"`` and the plain loop with the same ``torch.autocast`` (float16) and
``GradScaler``; latency runs under that autocast too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dwskd.distill import DistillOptions
from dwskd.io import now_iso, write_text
from dwskd.loggers import RunNames
from dwskd.machine import machine_info
from dwskd.models import count_params, create_model, measure_latency
from dwskd.module import DistillModule
from dwskd.selection import SelectionRecipe, initialize_from_teacher
from dwskd.training import build_factories, stage_callbacks
from experiments.common import (
    REPO,
    RESULTS_DIR,
    invocation,
    machine_lines,
    owned_sections,
    set_offline_env,
)

VIT = {
    "ViT-T": "vit_tiny_patch16_224",
    "ViT-S": "vit_small_patch16_224",
    "ViT-B": "vit_base_patch16_224",
}
NUM_CLASSES, IN_CHANS = 4, 1
DEPTHS = (4, 6, 9, 12)  # experiments.evidence depth: ViT-T blocks


@dataclass(frozen=True)
class BenchSettings:
    """Device, sizes and repeats; ``SMOKE`` shrinks everything so that a test can run it."""

    device: str = "cpu"  # "cpu" | "gpu" (CUDA)
    precision: str = "32-true"  # Lightning's name; "16-mixed" = float16 autocast + GradScaler
    img_size: int = 64
    batch_size: int = 32
    steps: int = 15
    warmup: int = 3
    repeats: int = 20
    latency_sizes: tuple[int, ...] = (64, 224)
    latency_batches: tuple[int, ...] = (1, 32)
    latency_min_run_time: float = 1.0
    selection_img_size: int = 224
    loader_batches: int = 30
    n_train: int = 1000


SMOKE = BenchSettings(
    img_size=32,
    batch_size=8,
    steps=2,
    warmup=1,
    repeats=2,
    latency_sizes=(32,),
    latency_batches=(1, 4),
    latency_min_run_time=0.05,
    selection_img_size=32,
    loader_batches=2,
    n_train=32,
)
# What a GPU run measures by default: the sizes real training uses there (as trainer=gpu).
GPU = replace(
    BenchSettings(),
    device="gpu",
    precision="16-mixed",
    img_size=224,
    batch_size=128,
    steps=30,
    warmup=5,
    latency_batches=(1, 128),
    loader_batches=10,
    n_train=1536,
)
NO_CUDA = (
    "experiments.bench: --device gpu needs CUDA, but torch.cuda.is_available() is False on "
    "this machine; run it on a machine with an NVIDIA GPU and a CUDA build of torch, "
    "or use --device cpu (the default)."
)


def settings_for(device: str, smoke: bool) -> BenchSettings:
    """Defaults of ``device`` (``SMOKE`` sizes with ``--smoke``, on either device)."""
    if device == "cpu":
        return SMOKE if smoke else BenchSettings()
    return replace(SMOKE, device="gpu", precision=GPU.precision) if smoke else GPU


@dataclass
class Section:
    """One table of the report: rows of (what, value, unit) and the ratios that matter."""

    title: str
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    ratios: list[tuple[str, float]] = field(default_factory=list)

    def add(self, what: str, value: float, unit: str) -> float:
        self.rows.append((what, value, unit))
        return value


# ---------------------------------------------------------------------------- helpers
def vit(name: str, img_size: int, depth: int | None = None) -> nn.Module:
    cfg = {"name": VIT[name], "family": "vit", "depth": depth}
    return create_model(cfg, num_classes=NUM_CLASSES, in_chans=IN_CHANS, img_size=img_size)


def torch_device(s: BenchSettings) -> torch.device:
    return torch.device("cuda" if s.device == "gpu" else "cpu")


def clock(s: BenchSettings) -> float:
    """``perf_counter`` once the GPU has finished the work queued so far (CUDA is async)."""
    if s.device == "gpu":
        torch.cuda.synchronize()
    return time.perf_counter()


def autocast(s: BenchSettings) -> contextlib.AbstractContextManager:
    """The autocast that Lightning's ``16-mixed`` uses; nothing for full precision."""
    if s.precision == "16-mixed":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def device_name(s: BenchSettings) -> str:
    return "CPU" if s.device == "cpu" else f"GPU ({torch.cuda.get_device_name(0)})"


def where(s: BenchSettings) -> str:
    """For section titles: ``CPU`` (full precision) or ``GPU (name), 16-mixed``."""
    name = device_name(s)
    return name if s.precision == "32-true" else f"{name}, {s.precision}"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.cache
def tensor_dataset(s: BenchSettings) -> TensorDataset:
    """Random images in host memory (made once): the same data for every measured loop."""
    n = s.batch_size * (s.steps + s.warmup + 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN_CHANS, s.img_size, s.img_size, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return TensorDataset(x, y)


def tensor_loader(s: BenchSettings) -> DataLoader:
    """Batches from host memory, moved to the device inside each timed step (both loops)."""
    return DataLoader(tensor_dataset(s), batch_size=s.batch_size, shuffle=True, drop_last=True)


def compose(*overrides: str) -> Any:
    """The project's real config, so that the bench measures what runs use."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# ---------------------------------------------------------------------- training steps
class StepTimer(L.Callback):
    """Start-to-start times of training batches (the last one ends with the epoch)."""

    def __init__(self, s: BenchSettings) -> None:
        self.settings = s
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(clock(self.settings))

    def on_train_epoch_end(self, *args: Any) -> None:
        self.starts.append(clock(self.settings))


def intervals(starts: Sequence[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(starts, starts[1:], strict=False)][warmup:]


def framework_step(
    s: BenchSettings,
    students: list[nn.Module],
    options: DistillOptions,
    teacher: nn.Module | None = None,
) -> float:
    """Median seconds per step of DistillModule under lightning.Trainer (CSV logger on)."""
    return statistics.median(framework_times(s, students, options, teacher)[s.warmup :])


def framework_times(
    s: BenchSettings,
    students: list[nn.Module],
    options: DistillOptions,
    teacher: nn.Module | None = None,
    compile_students: bool = False,
) -> list[float]:
    """Seconds of every step, warm-up included, of DistillModule under the run's own Trainer.

    Trainer, callbacks (checkpointing, LR monitor, step seeding, ...) and loggers come from
    the same factories a run builds (:func:`dwskd.training.build_factories`), with the CSV
    logger and no progress bar; only the batch limits and validation are the bench's.
    """
    trainer_group = "gpu" if s.device == "gpu" else "cpu"
    cfg = compose(
        f"trainer={trainer_group}",
        f"trainer.precision={s.precision}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    )
    module = DistillModule(
        students,
        stage="train",
        class_names=[str(i) for i in range(NUM_CLASSES)],
        options=options,
        optimizer=instantiate(cfg.optimizer),
        lr=1e-3,
        warmup_fraction=cfg.scheduler.warmup_fraction,
        min_lr_ratio=cfg.scheduler.min_lr_ratio,
        teacher=teacher,
        compile_students=compile_students,
    )
    factories = build_factories(cfg, RunNames("bench", "bench"))
    timer = StepTimer(s)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = factories.trainer(
            max_epochs=1,
            limit_train_batches=s.steps + s.warmup,
            limit_val_batches=0,
            default_root_dir=tmp,
            logger=factories.loggers.for_stage(Path(tmp), "train"),
            callbacks=[*stage_callbacks(factories, Path(tmp) / "ckpt", 0, True), timer],
            enable_model_summary=False,
        )
        trainer.fit(module, train_dataloaders=tensor_loader(s))
    return intervals(timer.starts, 0)


def plain_step(s: BenchSettings, model: nn.Module) -> float:
    """Median seconds per step of the loop one would write by hand (same work per step).

    With ``16-mixed`` it does what Lightning's mixed precision does: float16 autocast around
    the forward, a ``GradScaler``, and unscaling before the gradient clipping.
    """
    device = torch_device(s)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "16-mixed")
    starts = []
    for _, (x, y) in zip(range(s.steps + s.warmup), tensor_loader(s), strict=False):
        starts.append(clock(s))
        x, y = x.to(device), y.to(device)
        with autocast(s):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
    starts.append(clock(s))
    return statistics.median(intervals(starts, s.warmup))


def skd_options() -> DistillOptions:
    """The method's default SKD options, from the project's config."""
    distill = compose().method.distill
    return DistillOptions.from_mapping(OmegaConf.to_container(distill, resolve=True))


def training_section(s: BenchSettings) -> tuple[Section, dict[str, float]]:
    """Framework vs plain loop, dual SKD and KD vs single student; returns img/s too."""
    skd = skd_options()
    ce = skd.cross_entropy_only()
    kd = replace(ce, gamma=1.0)
    sec = Section(f"Training step: ViT-T, batch {s.batch_size}, {s.img_size} px, {where(s)}")
    torch.manual_seed(0)
    plain = sec.add(
        "plain PyTorch loop (CE, AdamW, clip)", plain_step(s, vit("ViT-T", s.img_size)), "s/step"
    )
    single = sec.add(
        "framework, one student (CE)", framework_step(s, [vit("ViT-T", s.img_size)], ce), "s/step"
    )
    pair = [vit("ViT-T", s.img_size), vit("ViT-T", s.img_size)]
    dual = sec.add(
        "framework, dual-model SKD (2 students + 2 EMA)", framework_step(s, pair, skd), "s/step"
    )
    teacher = vit("ViT-S", s.img_size)
    kd_step = sec.add(
        "framework, KD from frozen ViT-S",
        framework_step(s, [vit("ViT-T", s.img_size)], kd, teacher),
        "s/step",
    )
    sec.ratios += [
        ("framework / plain loop (one student)", single / plain),
        ("dual-model SKD / single student", dual / single),
        ("KD (frozen ViT-S) / single student", kd_step / single),
    ]
    return sec, {"one student": s.batch_size / single, "dual-model SKD": s.batch_size / dual}


def compile_section(s: BenchSettings) -> Section:
    """A one-student framework step with ``model.compile=true`` vs eager (same data, seed)."""
    ce = skd_options().cross_entropy_only()
    sec = Section(
        f"torch.compile (model.compile=true): framework, one ViT-T student, "
        f"batch {s.batch_size}, {s.img_size} px, {where(s)}"
    )
    steps = {}
    for label, compiled in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        times = framework_times(s, [vit("ViT-T", s.img_size)], ce, compile_students=compiled)
        sec.add(f"{label}: first step (compilation included)", times[0], "s")
        steps[label] = sec.add(
            f"{label}: step after {s.warmup} warm-up steps",
            statistics.median(times[s.warmup :]),
            "s/step",
        )
    sec.ratios.append(("compiled / eager step (one student)", steps["compiled"] / steps["eager"]))
    return sec


# ---------------------------------------------------------------- latency and selection
def latency(s: BenchSettings, model: nn.Module, size: int, batch: int) -> dict[str, Any]:
    """dwskd.models.measure_latency on the bench's device, under its autocast."""
    model = model.to(torch_device(s))
    with autocast(s):
        return measure_latency(
            model,
            in_chans=IN_CHANS,
            img_size=size,
            batch_size=batch,
            min_run_time=s.latency_min_run_time,
        )


def latency_section(s: BenchSettings) -> Section:
    """Batch-1 and batched inference: dwskd.models.measure_latency (median, IQR)."""
    sec = Section(
        f"Inference latency ({where(s)}, eval mode, no grad, {torch.get_num_threads()} threads):"
        " student vs teachers"
    )
    for size in s.latency_sizes:
        for batch in s.latency_batches:
            ms = {}
            for name in VIT:
                timing = latency(s, vit(name, size), size, batch)
                ms[name] = timing["median_ms"]
                unit = "ms (IQR {iqr_ms:.2g} ms, {blocks} blocks, {runs} runs)".format(**timing)
                sec.add(f"{name}, {size} px, batch {batch}", ms[name], unit)
            sec.ratios += [
                (f"ViT-S / ViT-T, {size} px, batch {batch}", ms["ViT-S"] / ms["ViT-T"]),
                (f"ViT-B / ViT-T, {size} px, batch {batch}", ms["ViT-B"] / ms["ViT-T"]),
            ]
    return sec


def depth_section(s: BenchSettings) -> Section:
    """The depth sweep's trade-off (``experiments.evidence depth``) on a quiet machine: the
    sweep's own latency figures are taken while another job shares the cores."""
    size = s.latency_sizes[0]
    sec = Section(
        f"ViT-T student depth ({where(s)}, {size} px, eval mode, no grad, "
        f"{torch.get_num_threads()} threads): parameters and latency"
    )
    ms = {}
    for depth in DEPTHS:
        model = vit("ViT-T", size, depth)
        sec.add(f"depth {depth}, parameters", count_params(model) / 1e6, "M")
        for batch in s.latency_batches:
            ms[depth, batch] = latency(s, model, size, batch)["median_ms"]
            sec.add(f"depth {depth}, batch {batch}", ms[depth, batch], "ms")
    full = max(DEPTHS)
    sec.ratios += [
        (f"depth {d} / depth {full}, batch {b}", ms[d, b] / ms[full, b])
        for d in DEPTHS[:-1]
        for b in s.latency_batches
    ]
    return sec


def selection_section(s: BenchSettings) -> Section:
    size = s.selection_img_size
    sec = Section(f"Weight selection into a 12-block ViT-T ({size} px), median of {s.repeats}")
    student = vit("ViT-T", size)
    recipe = SelectionRecipe(layers="uniform", elements="uniform", offset=1)
    for name in ("ViT-S", "ViT-B"):
        select = functools.partial(initialize_from_teacher, student, vit(name, size), recipe)
        seconds = median_time(select, s.repeats)
        sec.add(f"{name} -> ViT-T", seconds * 1000, "ms")
    return sec


# --------------------------------------------------------------------------- data
def loader_throughput(datamodule: Any, batches: int) -> float:
    """Images per second out of the train loader (augmentation included), after one batch."""
    loader = iter(datamodule.train_dataloader())
    next(loader)
    count, start = 0, time.perf_counter()
    for _, (x, _y) in zip(range(batches), loader, strict=False):
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def data_module(s: BenchSettings, *overrides: str) -> tuple[Any, float]:
    """The configured datamodule, set up; returns it with its setup (decode/generate) seconds."""
    cfg = compose(f"data.img_size={s.img_size}", f"data.batch_size={s.batch_size}", *overrides)
    datamodule = instantiate(cfg.data)
    start = time.perf_counter()
    datamodule.setup("fit")
    return datamodule, time.perf_counter() - start


def data_section(s: BenchSettings, train_rate: dict[str, float]) -> Section:
    sec = Section(f"Data pipeline vs training, {s.img_size} px, batch {s.batch_size}")
    sources = [("synthetic", ["data=synthetic", f"data.n_train={s.n_train}"])]
    real = Path(os.environ.get("DWSKD_DATA_DIR", REPO.parent / "shared" / "data"))
    if (real / "lung_ct_covid").is_dir():
        sources.append(("lung_ct (real)", ["data=lung_ct", f"paths.data_dir={real}"]))
    for label, overrides in sources:
        datamodule, setup_s = data_module(s, *overrides)
        sec.add(f"{label}: setup (generate / decode + cache)", setup_s, "s")
        rate = sec.add(
            f"{label}: train loader", loader_throughput(datamodule, s.loader_batches), "img/s"
        )
        for name, trained in train_rate.items():
            sec.ratios.append((f"{label} loader / training ({name})", rate / trained))
    for name, trained in train_rate.items():
        sec.add(f"training, {name} (framework)", trained, "img/s")
    return sec


# ---------------------------------------------------------------------------- report
def markdown(sections: Sequence[Section], s: BenchSettings, command: str, seconds: float) -> str:
    lines = ["# dwskd benchmark: what the framework costs", ""]
    lines += [f"- command: `{command}` (from the repository root)", f"- date: {now_iso()}"]
    lines += machine_lines(machine_info())
    lines += [
        f"- measured on: {device_name(s)}, precision {s.precision}, {s.img_size} px images, "
        f"batch {s.batch_size} (latency: batch {', '.join(map(str, s.latency_batches))})",
        f"- settings: {s}; whole bench took {seconds / 60:.1f} min",
        "- every figure is a median; steps are timed start-to-start after warm-up steps",
    ]
    for sec in sections:
        lines += ["", f"## {sec.title}", "", "| what | value | unit |", "|---|---|---|"]
        lines += [f"| {what} | {value:.4g} | {unit} |" for what, value, unit in sec.rows]
        if sec.ratios:
            lines += ["", "| ratio | × |", "|---|---|"]
            lines += [f"| {what} | {value:.2f} |" for what, value in sec.ratios]
    return "\n".join(lines) + "\n"


def run_bench(s: BenchSettings, with_compile: bool = False) -> list[Section]:
    if s.device == "gpu":
        torch.backends.cudnn.benchmark = True  # as trainer=gpu, for both loops alike
    training, rates = training_section(s)
    sections = [training, latency_section(s), depth_section(s), selection_section(s)]
    sections.append(data_section(s, rates))
    return sections + ([compile_section(s)] if with_compile else [])


def default_out(s: BenchSettings, smoke: bool) -> Path:
    """``bench.md`` on the CPU, ``bench_gpu<px>.md`` on the GPU; ``_smoke`` for smoke runs."""
    stem = "bench" if s.device == "cpu" else f"bench_gpu{s.img_size}"
    return RESULTS_DIR / f"{stem}{'_smoke' if smoke else ''}.md"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for tests")
    p.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu (default: 64 px, batch 32, fp32) or gpu (CUDA: 224 px, batch 128, 16-mixed)",
    )
    p.add_argument(
        "--compile", action="store_true", help="add model.compile=true vs eager (slow on CPU)"
    )
    p.add_argument("--out", type=Path, help="default experiments/results/bench[_gpu224][_smoke].md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.device == "gpu" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    set_offline_env()
    settings = settings_for(args.device, args.smoke)
    start = time.perf_counter()
    sections = run_bench(settings, with_compile=args.compile)
    command = invocation("experiments.bench", list(argv) if argv is not None else None)
    text = markdown(sections, settings, command, time.perf_counter() - start)
    out = args.out or default_out(settings, args.smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Sections other scripts own (the sweep throughput) stay.
    write_text(out, "\n".join([text, *owned_sections(out)]))
    print(text)
    return out


if __name__ == "__main__":
    main()
