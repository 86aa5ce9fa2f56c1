"""Compare the runs of any sweep by what was swept: a table (Markdown, CSV) and a plot per key.

    python -m dwskd.run -m method.distill.temperature=1,2,4 seed=1,2
    python -m experiments.compare outputs/multirun/<time>        # -> <that dir>/compare.*

Every finished run under the directory counts, at any depth: a Hydra multirun's
``<time>/<job>/`` as well as the paper's ``<scenario>/<dataset>/<method>/s<seed>/``. The
columns are the config keys whose value is not the same in every run (the user's override
names where ``.hydra/overrides.yaml`` has them). ``seed`` is the replicate axis: a *setting*
is every other varying key, and its row gives the number of runs and mean ± sample std
(ddof=1) over them of the deployed model's val/test metrics, external AUROC, params and
latency.

Keys that say nothing about the setting are left out: ``hydra.*``, ``paths.*``, ``run.*``,
dwskd's logging/display keys (``dwskd.rundir.IGNORED_KEYS``) and paths into the run's own
dir. Paths into *another* run's dir (a shared teacher of the same seed) have that run's
seed masked (``s2`` -> ``s*``, ``3_teacher_toy_s2`` -> ``*_teacher_toy_s*``): the file a seed
uses is a replicate detail, the kind of run it comes from is the setting. A key whose value
follows from the columns before it (``data.root`` from ``data``) is not shown: the rows are
the same without it, and the CSV and the Markdown's notes still list it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from dwskd.io import now_iso
from dwskd.rundir import IGNORED_KEYS, RunLayout, flatten, read_results
from experiments.aggregate import deployed_summary, mean_std, pct, plain
from experiments.common import invocation

SEED = "seed"
SPLITS = ("val", "test")
SPLIT_METRICS = ("acc", "balanced_acc", "auroc")
COSTS = ("params", "latency_ms")
IGNORED = ("hydra", "paths", "run", *IGNORED_KEYS)
DEFAULT_PLOTTED = ("val_acc", "test_acc")
MAX_LINES = 6  # more combinations of the other keys than this: one pooled line instead
SEED_DIR = re.compile(r"^s\d+$")  # <scenario>/<dataset>/<method>/s<seed>
JOB_DIR = re.compile(r"^\d+_(.+)_s\d+$")  # <job num>_<method>_<data>_s<seed> (conf/hydra)


@dataclass(frozen=True)
class Run:
    """One finished run: its comparable keys, the overrides it was given, its numbers."""

    path: Path
    seed: Any
    keys: dict[str, Any]  # flattened config + group overrides, hashable, ignored keys left out
    overrides: tuple[str, ...]  # override names in the order the user typed them
    deployed: str
    values: dict[str, float | None]


@dataclass(frozen=True)
class Comparison:
    """A sweep's runs grouped into settings: what :func:`markdown` and the CSV show."""

    root: Path
    records: list[dict]  # one per setting, sorted by its values
    shown: list[str]  # the swept keys: a column each, a plot each
    determined: list[str]  # varying keys that follow from the shown ones
    metrics: list[str]
    skipped: list[Path]  # finished runs that record no config

    @property
    def keys(self) -> list[str]:
        return [*self.shown, *self.determined]


# ------------------------------------------------------------------------- collecting
def find_run_dirs(root: Path) -> list[Path]:
    """Finished run dirs at any depth. A run's insides are not searched (a run holds no
    runs), nor hidden dirs (``.hydra``, ``.submitit``): a paper sweep has thousands of files."""
    found = []
    for current, dirs, _ in os.walk(root):
        if RunLayout(Path(current)).finished:
            found.append(Path(current))
            dirs.clear()
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def ignored(key: str) -> bool:
    """Keys that differ per run or per machine without changing what a run computes."""
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in IGNORED)


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """``{key: value text}`` of Hydra overrides, keys spelled like the config's dotted keys
    (``+x`` -> ``x``, ``hydra/launcher`` -> ``hydra.launcher``, ``data@data.sources.b`` ->
    ``data.sources.b``) so that a leaf override and its config key are one column."""
    parsed = {}
    for line in map(str, lines):
        key, _, value = line.partition("=")
        name = key.lstrip("+~").split("@")[-1].replace("/", ".")
        parsed[name] = "(deleted)" if key.startswith("~") else value
    return parsed


def read_overrides(run_dir: Path) -> dict[str, str]:
    path = RunLayout(run_dir).hydra_dir / "overrides.yaml"
    return parse_overrides(yaml.safe_load(path.read_text()) or []) if path.is_file() else {}


def mask_seed(path: str) -> str:
    """A path with the seed part of a run dir masked: another run's file of the same seed."""
    parts = ["s*" if SEED_DIR.match(p) else JOB_DIR.sub(r"*_\1_s*", p) for p in path.split("/")]
    return "/".join(parts)


def comparable(value: Any, own_dirs: Sequence[str]) -> Any:
    """A hashable value that two runs of one setting share: lists as JSON text, paths into
    the run's own dir as one placeholder, paths into another run's dir seed-masked."""
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, str) and "/" in value:
        return "<run dir>" if value.startswith(tuple(own_dirs)) else mask_seed(value)
    return value


def run_keys(results: Mapping, run_dir: Path, overrides: Mapping[str, str]) -> dict[str, Any]:
    """Config leaves, plus group overrides (``data=lung_ct``) that are no leaf; a leaf's
    typed config value wins over its override's text."""
    own = tuple(str(p) for p in (run_dir, results["run"].get("output_dir")) if p)
    config = flatten(results["run"]["config"])
    keys = {k: comparable(v, own) for k, v in config.items() if not ignored(k)}
    for key, text in overrides.items():
        keys.setdefault(key, comparable(text, own))
    return keys


def deployed_values(results: Mapping) -> dict[str, float | None]:
    """The deployed model's numbers: val/test quality, AUROC on each external set, costs."""
    deployed = results["deployed"]
    model = results["models"][deployed]
    values = {f"{s}_{m}": model.get(s, {}).get(m) for s in SPLITS for m in SPLIT_METRICS}
    for set_name, scores in sorted((results.get("external") or {}).items()):
        if deployed in scores:
            values[f"ext_{set_name}_auroc"] = scores[deployed].get("metrics", {}).get("auroc")
    values.update({k: model.get(k) for k in COSTS})
    return values


def read_run(path: Path) -> Run | None:
    """The run at ``path``; None when it records no config (made by an older dwskd)."""
    results = read_results(path)
    config = results.get("run", {}).get("config")
    if not config:
        return None
    overrides = {k: v for k, v in read_overrides(path).items() if not ignored(k)}
    seed = config.get(SEED, results["run"].get(SEED))
    keys = run_keys(results, path, overrides)
    return Run(path, seed, keys, tuple(overrides), results["deployed"], deployed_values(results))


def collect_runs(root: Path) -> tuple[list[Run], list[Path]]:
    """Every finished run under ``root`` that records its config, and those that do not."""
    paths = find_run_dirs(root)
    runs = {path: read_run(path) for path in paths}
    return [r for r in runs.values() if r], [p for p, r in runs.items() if r is None]


# ------------------------------------------------------------------------- swept keys
def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Keys, seed aside, whose value is not the same in every run (absent is a value)."""
    names = set().union(*(r.keys for r in runs)) - {SEED}
    return [k for k in names if len({r.keys.get(k) for r in runs}) > 1]


def by_priority(keys: Iterable[str], runs: Sequence[Run]) -> list[str]:
    """The user's override names first, in the order typed; then a group's ``*.name``; then
    shallow keys before deep ones. The first of keys that vary together is the one shown."""
    typed = list(dict.fromkeys(k for r in runs for k in r.overrides))

    def rank(key: str) -> tuple:
        if key in typed:
            return 0, typed.index(key), 0, key
        return 1, not key.endswith(".name"), key.count("."), key

    return sorted(keys, key=rank)


def split_determined(keys: Sequence[str], runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """(shown, determined): a key whose value follows from the shown keys before it adds
    no row, only width (``data.root`` beside ``data``); such keys are listed, not shown."""
    shown: list[str] = []
    determined: list[str] = []
    for key in keys:
        seen: dict[tuple, Any] = {}
        follows = all(
            seen.setdefault(tuple(r.keys.get(k) for k in shown), r.keys.get(key)) == r.keys.get(key)
            for r in runs
        )
        (determined if follows else shown).append(key)
    return shown, determined


# ------------------------------------------------------------------------- statistics
def order(value: Any) -> tuple:
    """Sort key for mixed setting values: absent first, numbers by size, then text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def metric_names(runs: Sequence[Run]) -> list[str]:
    """val/test metrics, every external set's AUROC that some run has, then the costs."""
    external = sorted({k for r in runs for k in r.values if k.startswith("ext_")})
    quality = [f"{s}_{m}" for s in SPLITS for m in SPLIT_METRICS]
    return [*quality, *external, *COSTS]


def summarise(runs: Sequence[Run], shown: Sequence[str], keys: Sequence[str]) -> list[dict]:
    """One record per setting (the shown keys' values), sorted by them: every varying key's
    value, runs, seeds, deploys, mean/std of every metric over the setting's seeds."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[tuple(run.keys.get(k) for k in shown)].append(run)
    records = []
    for setting in sorted(groups, key=lambda values: tuple(map(order, values))):
        members = groups[setting]
        record: dict[str, Any] = {k: members[0].keys.get(k) for k in keys}
        record.update(n=len(members), runs=members, deployed=deployed_summary(members))
        record["seeds"] = " ".join(str(s) for s in sorted((r.seed for r in members), key=order))
        for metric in metric_names(runs):
            mean, std, _ = mean_std(r.values.get(metric) for r in members)
            record[f"{metric}_mean"], record[f"{metric}_std"] = mean, std
        records.append(record)
    return records


# --------------------------------------------------------------------------- markdown
def value_texts(values: Iterable[Any]) -> dict[Any, str]:
    """Cell text of each value; paths shortened by :func:`path_texts`."""
    values = list(dict.fromkeys(values))
    texts = {v: "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values}
    texts.update(path_texts([v for v in values if isinstance(v, str) and "/" in v]))
    return texts


def path_texts(paths: Sequence[str]) -> dict[str, str]:
    """Paths of one column as the part that tells them apart: among paths to files of one
    name, the folders they do not share (teacher files: ``in_domain/lung_ct`` vs
    ``transfer/lung_ct``); a path alone with its file name, just that name."""
    groups: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        groups[path.rsplit("/", 1)[-1]].append(path)
    texts = {}
    for name, members in groups.items():
        parts = [m.split("/") for m in members]
        head = len(os.path.commonprefix(parts))
        tail = len(os.path.commonprefix([p[::-1] for p in parts]))
        for member, p in zip(members, parts, strict=True):
            middle = "/".join(p[head : len(p) - tail]) if len(members) > 1 else name
            texts[member] = middle or member
    return texts


def metric_label(metric: str) -> str:
    """Column title: ``test_balanced_acc`` -> ``test bal. acc``, ``ext_nih_auroc`` ->
    ``nih AUROC (ext.)``, costs with their unit."""
    if metric.startswith("ext_"):
        return f"{metric.removeprefix('ext_').removesuffix('_auroc')} AUROC (ext.)"
    names = {"params": "params (M)", "latency_ms": "latency (ms)"}
    text = metric.replace("balanced_acc", "bal. acc").replace("auroc", "AUROC")
    return names.get(metric, text.replace("_", " "))


def cell(record: Mapping, metric: str) -> str:
    mean, std = record[f"{metric}_mean"], record[f"{metric}_std"]
    if metric == "params":
        return plain(mean, math.nan, 1e-6, 2)
    if metric == "latency_ms":
        return plain(mean, std, 1.0, 2)
    return pct(mean, std)


def markdown_table(
    records: Sequence[dict], shown: Sequence[str], metrics: Sequence[str]
) -> list[str]:
    """One row per setting: its shown keys, runs, deploys and every metric (%, M, ms)."""
    header = [*shown, "n", "deployed", *map(metric_label, metrics)]
    texts = {k: value_texts(r[k] for r in records) for k in shown}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = [texts[k][r[k]].replace("|", "\\|") for k in shown] + [str(r["n"]), r["deployed"]]
        cells += [cell(r, m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(comparison: Comparison, plots: Mapping[str, str], command: str) -> str:
    """The table with what it was made from: the dir, the command, what varies and how."""
    c = comparison
    lines = [
        f"# Sweep comparison: `{c.root}`",
        "",
        f"- compared: {now_iso()} by `{command}`",
        f"- {sum(r['n'] for r in c.records)} finished runs, {len(c.records)} settings; swept: "
        + (", ".join(f"`{k}`" for k in c.shown) or "nothing but the seed"),
    ]
    if c.determined:
        fixed = ", ".join(f"`{k}`" for k in c.determined)
        lines.append(f"- also varying, fixed by the swept keys (in the CSV): {fixed}")
    if c.skipped:
        lines.append(f"- skipped {len(c.skipped)} runs that record no config (older dwskd)")
    lines += [
        "",
        "Deployed model of each run; mean ± sample std over the seeds of a setting (none for "
        "one seed). Quality in %, params in millions, latency: batch 1, CPU, median ms.",
        "",
        *markdown_table(c.records, c.shown, c.metrics),
    ]
    lines += [line for key, name in plots.items() for line in ("", f"![{key}]({name})")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- csv, png
def write_csv(comparison: Comparison, path: Path) -> Path:
    """Every varying key (raw values), runs, seeds, deploys, mean and std of each metric."""
    stats = [f"{m}_{s}" for m in comparison.metrics for s in ("mean", "std")]
    fields = [*comparison.keys, "n", "seeds", "deployed", *stats]
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in comparison.records)
    return path


def scale(metric: str) -> float:
    """Plots in the table's units: quality in %, params in millions, latency in ms."""
    return {"params": 1e-6, "latency_ms": 1.0}.get(metric, 100.0)


def lines_of(
    records: Sequence[dict], key: str, others: Sequence[str], metric: str
) -> list[tuple[str, dict]]:
    """(label, {key value: (mean, std)}) per combination of the other shown keys; with more
    than MAX_LINES combinations, one line pooling every run of a value (std over them all)."""
    combos: dict[tuple, dict] = defaultdict(dict)
    for r in records:
        combos[tuple(r[k] for k in others)][r[key]] = (r[f"{metric}_mean"], r[f"{metric}_std"])
    if len(combos) <= MAX_LINES:
        texts = {k: value_texts(r[k] for r in records) for k in others}
        ordered = sorted(combos, key=lambda combo: tuple(map(order, combo)))
        return [(combo_label(others, c, texts), combos[c]) for c in ordered]
    pooled: dict[Any, list] = defaultdict(list)
    for r in records:
        pooled[r[key]] += [run.values.get(metric) for run in r["runs"]]
    return [("every other setting pooled", {x: mean_std(v)[:2] for x, v in pooled.items()})]


def combo_label(keys: Sequence[str], values: Sequence, texts: Mapping[str, dict]) -> str:
    return ", ".join(f"{k}={texts[k][v]}" for k, v in zip(keys, values, strict=True))


def sweep_figure(
    records: Sequence[dict], key: str, others: Sequence[str], metrics: Sequence[str]
) -> Figure:
    """One panel per metric against ``key``'s values; lines from :func:`lines_of`."""
    xs = sorted({r[key] for r in records}, key=order)
    fig = Figure(figsize=(max(4.5, 0.7 * len(xs)) * len(metrics), 4.5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        draw_lines(ax, xs, lines_of(records, key, others, metric), scale(metric))
        ax.set(xlabel=key, ylabel=metric_label(metric))
    return fig


def draw_lines(ax: Any, xs: Sequence, lines: Sequence[tuple[str, dict]], factor: float) -> None:
    """x values evenly spaced, in order; numbers joined by lines, categories only marked (a
    line from one dataset to the next means nothing) and set a little apart so that they do
    not hide each other; error bars = std (none for one seed)."""
    numeric = all(isinstance(x, bool | int | float) for x in xs)
    for i, (label, points) in enumerate(lines):
        at = sorted(points, key=order)
        ys = [factor * points[x][0] for x in at]
        errors = [factor * (0.0 if math.isnan(points[x][1]) else points[x][1]) for x in at]
        style, dodge = ("-", 0.0) if numeric else ("none", 0.08 * (i - (len(lines) - 1) / 2))
        positions = [xs.index(x) + dodge for x in at]
        ax.errorbar(positions, ys, yerr=errors, marker="o", capsize=3, ls=style, label=label)
    texts = value_texts(xs)
    slanted = max(map(len, texts.values())) > 8
    ax.set_xticks(
        range(len(xs)),
        [texts[x] for x in xs],
        rotation=40 if slanted else 0,
        ha="right" if slanted else "center",
    )
    if len(lines) > 1 or lines[0][0]:
        ax.legend(fontsize=7)


def plot_name(name: str, key: str) -> str:
    return f"{name}_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"


# ------------------------------------------------------------------------------- main
def compare(root: Path) -> Comparison:
    """Read every finished run under ``root`` and group them into settings; refuse a dir
    with none, saying where and what was looked for."""
    runs, skipped = collect_runs(root)
    if not runs:
        raise SystemExit(
            f"No finished runs with a recorded config under {root}: looked at any depth for "
            "<run dir>/metrics.json (a multirun's <time>/<job>/ or <scenario>/<dataset>/"
            f"<method>/s<seed>/){f'; {len(skipped)} runs record no config' if skipped else ''}."
        )
    shown, determined = split_determined(by_priority(varying_keys(runs), runs), runs)
    records = summarise(runs, shown, [*shown, *determined])
    return Comparison(root, records, shown, determined, metric_names(runs), skipped)


def write_comparison(
    root: Path,
    results_dir: Path | None = None,
    name: str = "compare",
    plotted: Sequence[str] = DEFAULT_PLOTTED,
    command: str | None = None,
) -> list[Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>_<key>.png`` per swept key for every
    finished run under ``root``, into ``results_dir`` (default: ``root`` itself);
    ``command`` (default: the plain one for ``root``) is written into the Markdown."""
    c = compare(Path(root))
    unknown = [m for m in plotted if m not in c.metrics]
    if unknown:
        raise SystemExit(f"Unknown metrics {unknown}; these runs have: {', '.join(c.metrics)}")
    out = Path(results_dir) if results_dir else c.root
    out.mkdir(parents=True, exist_ok=True)
    plots = {key: plot_name(name, key) for key in c.shown}
    for key, file_name in plots.items():
        others = [k for k in c.shown if k != key]
        sweep_figure(c.records, key, others, plotted).savefig(out / file_name, dpi=110)
    csv_path = write_csv(c, out / f"{name}.csv")
    md_path = out / f"{name}.md"
    command = command or invocation("experiments.compare", [str(root)])
    md_path.write_text(markdown(c, plots, command))
    return [md_path, csv_path, *(out / p for p in plots.values())]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "root", type=Path, help="a multirun dir (outputs/multirun/<time>) or any runs root"
    )
    p.add_argument("--results-dir", type=Path, default=None, help="where to write (default: root)")
    p.add_argument("--name", default="compare", help="file name stem (default: compare)")
    p.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_PLOTTED),
        help="metrics to plot against each swept key (default: val_acc test_acc); the table "
        "has them all: val_/test_{acc,balanced_acc,auroc}, ext_<set>_auroc, params, latency_ms",
    )
    args = p.parse_args(argv)
    command = invocation("experiments.compare", None if argv is None else list(argv))
    for path in write_comparison(args.root, args.results_dir, args.name, args.metrics, command):
        print(path)


if __name__ == "__main__":
    main()
