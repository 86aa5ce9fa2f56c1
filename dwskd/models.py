"""Model creation through timm, teacher weight loading (hub / file), and cost figures.

Everything that touches timm's registry or a weights file lives here, so that the
rest of dwskd only ever sees ``nn.Module`` objects and plain state dicts.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

_FAMILIES_WITH_IMG_SIZE = {"vit"}
_STATE_PREFIXES = ("module.", "model.", "_orig_mod.")


class ModelConfigError(ValueError):
    """A model/teacher option or weights file that cannot work; the message says how to fix it."""


def timm_kwargs(
    cfg: Mapping[str, Any], *, num_classes: int, in_chans: int, img_size: int
) -> dict[str, Any]:
    """``timm.create_model`` arguments of a ``model/`` or ``teacher/`` config, shaped by the data."""
    kwargs: dict[str, Any] = dict(cfg.get("kwargs") or {})
    kwargs.update(num_classes=num_classes, in_chans=in_chans)
    if cfg.get("family") in _FAMILIES_WITH_IMG_SIZE:
        kwargs["img_size"] = img_size
    if cfg.get("depth") is not None:
        if cfg.get("family") != "vit":
            raise ModelConfigError(
                f"model.depth={cfg['depth']} is only supported for ViT models; "
                f"'{cfg['name']}' is {cfg.get('family')}. Use a smaller timm variant instead."
            )
        kwargs["depth"] = int(cfg["depth"])
    return kwargs


def create_model(
    cfg: Mapping[str, Any], *, num_classes: int, in_chans: int, img_size: int
) -> nn.Module:
    """Create a randomly initialised timm model from a ``model/`` or ``teacher/`` config group."""
    kwargs = timm_kwargs(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    try:
        return timm.create_model(cfg["name"], pretrained=False, **kwargs)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ModelConfigError(f"timm cannot create model '{cfg['name']}': {err}") from err


def create_hub_model(
    cfg: Mapping[str, Any], *, num_classes: int, in_chans: int, img_size: int
) -> nn.Module:
    """Create a timm model with hub weights ``name.tag``; offline this fails with advice."""
    name = f"{cfg['name']}.{cfg['tag']}" if cfg.get("tag") else cfg["name"]
    kwargs = timm_kwargs(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # network / hub errors come in many types
        raise ModelConfigError(
            f"teacher.source=hub could not fetch pretrained weights '{name}' "
            f"({type(err).__name__}: {err}). Without internet use a local file: "
            "teacher.source=file teacher.file=/path/to/weights.safetensors, "
            "or train the teacher on your data with teacher.source=fit."
        ) from err


_FIX = (
    "point {option} at a .safetensors/.pth/.ckpt weights file (a dwskd run writes its "
    "trained teacher to <run dir>/stages/teacher/teacher.safetensors)."
)
_DWSKD_PARTS = re.compile(r"(students|ema)\.\d+\.|teacher\.")


def read_state_dict(path: str | Path, *, option: str = "teacher.file") -> dict[str, torch.Tensor]:
    """Read a .safetensors / .pth / .bin / Lightning .ckpt file into a flat tensor dict.

    One reader for every format (timm's ``load_state_dict``: EMA weights first, then
    ``state_dict`` / ``model``; DDP / compile prefixes stripped), always with
    ``torch.load(weights_only=True)`` so that a file can never run code. Any file that is
    not a state dict of tensors becomes a :class:`ModelConfigError` naming ``option``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(
            f"{option}={path} does not exist or is not a file: " + _FIX.format(option=option)
        )
    state = _single_student(_load_checkpoint(path, option), path, option)
    tensors = _strip_prefixes({k: v for k, v in state.items() if torch.is_tensor(v)})
    if not tensors:
        raise ModelConfigError(
            f"{option}={path} holds no weight tensors. Re-export it, or "
            + _FIX.format(option=option)
        )
    return tensors


def _safe_checkpoint_globals() -> list[Any]:
    """Data-only types that Lightning ``.ckpt`` files carry besides the weights.

    ``save_hyperparameters`` pickles Hydra/OmegaConf configs and paths into
    ``hyper_parameters``; unpickling these types only rebuilds data (their ``__setstate__``
    updates ``__dict__``), so allowing them keeps ``weights_only=True`` from refusing a
    genuine checkpoint without letting a file call anything else. timm adds
    ``argparse.Namespace`` itself. User classes (structured-config dataclasses) stay refused.
    """
    import collections
    import pathlib
    import typing

    # typing.List is the pickled object itself, not an annotation
    allowed: list[Any] = [collections.defaultdict, typing.Any, (typing.List, "typing.List")]  # noqa: UP006
    allowed += [bool, dict, float, int, list, str]  # type objects in OmegaConf metadata
    allowed += [pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath]
    allowed += [pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return allowed
    allowed += [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata]
    node_types = ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "PathNode")
    allowed += [getattr(nodes, n) for n in node_types if hasattr(nodes, n)]
    return allowed


def _load_checkpoint(path: Path, option: str) -> dict[str, Any]:
    """timm's loader, with every failure to parse the file turned into one clear error."""
    from timm.models import load_state_dict

    try:
        with torch.serialization.safe_globals(_safe_checkpoint_globals()):
            return load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as err:  # parsers of foreign bytes raise any type
        raise ModelConfigError(_unreadable_message(path, option, err)) from err


def _unreadable_message(path: Path, option: str, err: Exception) -> str:
    """Say why the file failed, without suggesting ``weights_only=False`` as timm does."""
    if isinstance(err.__cause__, pickle.UnpicklingError):  # timm re-raises it as RuntimeError
        names = _refused_globals(path)
        why = (
            f"holds pickled Python objects beyond plain weights ({', '.join(names)})"
            if names
            else "is not a valid weights-only pickle"
        )
        why += "; dwskd reads files with torch.load(weights_only=True) and never runs their code"
    elif path.stat().st_size == 0:
        why = "is empty (an interrupted copy or export?)"
    elif isinstance(err, AttributeError):  # timm's clean_state_dict on a non-mapping
        why = "does not hold a state dict (a mapping of names to tensors)"
    else:
        why = f"cannot be read as a weights file ({type(err).__name__}: {str(err)[:200]})"
    return f"{option}={path} {' '.join(why.split())}. Re-export it, or " + _FIX.format(
        option=option
    )


def _refused_globals(path: Path) -> list[str]:
    """The globals a checkpoint needs beyond torch's and our allowlist (empty for garbage)."""
    allowed = {
        item[1] if isinstance(item, tuple) else f"{item.__module__}.{item.__qualname__}"
        for item in _safe_checkpoint_globals()
    }
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # garbage bytes: nothing to list
        return []
    return sorted(name for name in found if name not in allowed)


def _single_student(state: dict[str, Any], path: Path, option: str) -> dict[str, Any]:
    """The one student of a dwskd ``.ckpt`` (``students.0.*``), prefix stripped.

    A dwskd LightningModule stores its models as ``students.<i>``, ``ema.<i>`` and
    ``teacher``; which of two students to load is not ours to guess, so several students
    is an error. Files without ``students.<i>.`` keys pass through unchanged.
    """
    students = sorted({m.group(0) for k in state if (m := re.match(r"students\.\d+\.", k))})
    if not students:
        return state
    if len(students) > 1:
        found = sorted({m.group(0) for k in state if (m := _DWSKD_PARTS.match(k))})
        raise ModelConfigError(
            f"{option}={path} is a dwskd checkpoint with {len(students)} students "
            f"(prefixes {', '.join(found)}), so which model to load is ambiguous. Use the "
            "run's exported .safetensors of the model you want instead, e.g. "
            "<run dir>/stages/train/student_a.safetensors (or student_b.safetensors)."
        )
    prefix = students[0]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model.`` (a Lightning wrapper attribute), ``module.`` / ``_orig_mod.`` (DDP, compile),
    stripped from the keys (in place) by torch's own helper, until none starts with one: they
    stack in any order (``model._orig_mod.``)."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    before = None
    while before != list(state):
        before = list(state)
        for prefix in _STATE_PREFIXES:
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, bool]:
    """Fit a same-architecture state dict to ``model``: input channels, pos-embed, head.

    Uses timm's own helpers (``adapt_input_conv``, the family's ``checkpoint_filter_fn``).
    Returns the adapted dict and whether the classifier head had to be dropped.

    Why not timm's ``load_pretrained`` (``pretrained_cfg_overlay=dict(file=...)``): it drops
    the head by comparing with the *registry's* ``num_classes`` (1000), not with the file's
    shapes, so a teacher file trained on our 4 classes would lose its matching head; and it
    cannot read a dwskd ``.ckpt`` (``students.0.`` keys) or name what does not fit.
    """
    from timm.models import adapt_input_conv

    target = model.state_dict()
    first_conv = model.pretrained_cfg.get("first_conv")
    weight_key = f"{first_conv}.weight" if first_conv else None
    if weight_key in state and weight_key in target:
        in_chans = target[weight_key].shape[1]
        if state[weight_key].shape[1] != in_chans:
            state = dict(state, **{weight_key: adapt_input_conv(in_chans, state[weight_key])})
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    head_dropped = False
    for key in _classifier_keys(model):
        if key in state and key in target and state[key].shape != target[key].shape:
            state.pop(key)
            head_dropped = True
    return state, head_dropped


def _classifier_keys(model: nn.Module) -> list[str]:
    names = model.pretrained_cfg.get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def load_weights_file(model: nn.Module, path: str | Path, *, what: str = "teacher.file") -> bool:
    """Load a local weights file into ``model`` (head re-initialised if the label space differs).

    Raises a clear error when the file belongs to another architecture or family.
    Returns True when the head was re-initialised.
    """
    return _load_state(model, read_state_dict(path, option=what), path, what)


def load_matched_head(
    model: nn.Module, path: str | Path, class_names: list[str], *, what: str = "teacher.file"
) -> list[int]:
    """``teacher.head=match``: the file's body, and of its head the rows of the task's classes.

    A teacher trained on a union of tasks already knows ``lung_COVID``: keeping that row for
    the task's ``COVID`` keeps what it learnt instead of starting the head from scratch.
    Returns the teacher rows used, in the task's class order.
    """
    labels = file_label_names(path)
    if not labels:
        raise ModelConfigError(
            f"teacher.head=match needs the label names of {what}={path} (safetensors metadata "
            "'label_names' or a config.json beside it); use teacher.head=auto otherwise."
        )
    rows = matched_rows(labels, class_names)
    state = read_state_dict(path, option=what)
    for key in _classifier_keys(model):
        if key in state:
            state[key] = state[key][rows]
    _load_state(model, state, path, what)
    return rows


def matched_rows(teacher_labels: list[str], class_names: list[str]) -> list[int]:
    """Teacher label of each class: the same name, or it after a source prefix (lung_COVID)."""
    rows = []
    for name in class_names:
        hits = [i for i, t in enumerate(teacher_labels) if t == name or t.endswith(f"_{name}")]
        if len(hits) != 1:
            raise ModelConfigError(
                f"teacher.head=match: class {name!r} matches {len(hits)} teacher labels "
                f"({[teacher_labels[i] for i in hits]}) of {teacher_labels}; it needs exactly one. "
                "Use teacher.head=auto (a new head) for this task."
            )
        rows.append(hits[0])
    return rows


def file_label_names(path: str | Path) -> list[str] | None:
    """Label names recorded with a weights file: safetensors metadata or a config.json beside it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("label_names"):
            return list(json.loads(meta["label_names"]))
    config = path.parent / "config.json"
    if config.is_file():
        names = json.loads(config.read_text()).get("label_names")
        return list(names) if names else None
    return None


def _load_state(model: nn.Module, state: dict, path: str | Path, what: str) -> bool:
    state, head_dropped = adapt_state_dict(state, model)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    head = set(_classifier_keys(model)) if head_dropped else set()
    if [k for k in missing if k not in head] or unexpected or wrong:
        raise ModelConfigError(
            f"{what}={path} does not fit model '{model.pretrained_cfg.get('architecture')}': "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]}). "
            "Is it a checkpoint of another model family or size? Set teacher=<matching config>."
        )
    model.load_state_dict(state, strict=not head_dropped)
    if head_dropped:
        log.info("%s: classifier head has another label space; re-initialised", path)
    return head_dropped


TEACHER_SOURCES = ("hub", "file", "fit", "random")
TEACHER_HEADS = ("auto", "reinit", "match")


@dataclass(frozen=True)
class TeacherHead:
    """What became of the teacher's classifier head on load (for records and selection)."""

    changed: bool  # the head differs from the source's (new rows, or a random head)
    how: str  # "kept" | "re-initialised" | "matched rows of the source head"
    rows: tuple[int, ...] = ()  # teacher.head=match: source rows, in the task's class order

    @property
    def trained(self) -> bool:
        """Whether the head was trained for the task's labels (worth selecting from)."""
        return not self.changed or bool(self.rows)


def check_teacher_options(tcfg: Mapping[str, Any]) -> None:
    """``teacher.source`` / ``teacher.head`` values that cannot work, before any loading."""
    if tcfg["source"] not in TEACHER_SOURCES:
        raise ModelConfigError(f"teacher.source={tcfg['source']} must be one of {TEACHER_SOURCES}")
    head = tcfg.get("head") or "auto"
    if head not in TEACHER_HEADS:
        raise ModelConfigError(f"teacher.head={head} must be one of {TEACHER_HEADS}")
    if head == "match" and tcfg["source"] != "file":
        raise ModelConfigError(
            "teacher.head=match needs teacher.source=file (a file with label names)"
        )
    if tcfg["source"] == "file" and not tcfg.get("file"):
        raise ModelConfigError("teacher.source=file needs teacher.file=/path/to/weights")


def load_teacher(
    tcfg: Mapping[str, Any],
    *,
    num_classes: int,
    in_chans: int,
    img_size: int,
    class_names: list[str] | None = None,
) -> tuple[nn.Module, TeacherHead]:
    """The teacher before any training (hub, file or random weights) and its head report.

    The one teacher loader of dwskd: the run's teacher stage and ``dwskd-select`` both call
    it. ``teacher.head``: ``auto`` keeps a loaded head whose label space matches, else a new
    one; ``reinit`` always a new one; ``match`` keeps the source head's rows of the task's
    classes (needs ``class_names``). ``source=fit`` starts from random weights: the run
    trains it.
    """
    check_teacher_options(tcfg)
    shape = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    head, rows = tcfg.get("head") or "auto", ()
    if tcfg["source"] == "hub":
        teacher = create_hub_model(tcfg, **shape)
        changed = teacher.pretrained_cfg.get("num_classes") != num_classes
    elif tcfg["source"] == "file" and head == "match":
        if not class_names:
            raise ModelConfigError(
                "teacher.head=match needs the task's class names (a run has them from its data)"
            )
        teacher = create_model(tcfg, **shape)
        rows = tuple(load_matched_head(teacher, tcfg["file"], list(class_names)))
        changed = True
        log.info("teacher.head=match: teacher head rows %s for %s", list(rows), class_names)
    elif tcfg["source"] == "file":
        teacher = create_model(tcfg, **shape)
        changed = load_weights_file(teacher, tcfg["file"])
    else:  # fit or random: nothing to load
        teacher, changed = create_model(tcfg, **shape), True
        if tcfg["source"] == "random":
            log.warning("teacher.source=random: the teacher is untrained (meant for tests only)")
    if head == "reinit":
        teacher.reset_classifier(num_classes)  # fresh head even for equal label counts
        changed = True
    how = "matched rows of the source head" if rows else ("re-initialised" if changed else "kept")
    return teacher, TeacherHead(changed, how, rows)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, *, in_chans: int, img_size: int) -> int:
    """Forward FLOPs for one image (multiply-add = 2 FLOPs), via torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def check_input_size(model: nn.Module, img_size: int, *, option: str = "data.img_size") -> None:
    """Refuse an image size that a ViT-style model would silently crop.

    timm's patch embedding is a convolution with stride = patch size and no padding: with
    ``img_size`` not a multiple of the patch, the bottom/right border never reaches the model
    (40 px with 16 px patches uses only the top-left 32x32, 36% of every image ignored).
    Models without ``patch_embed`` (CNNs) pass: their padded convolutions see every pixel.
    """
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    used = (img_size // ph * ph) * (img_size // pw * pw)
    if used == img_size * img_size:
        return
    step = math.lcm(ph, pw)
    below, above = img_size // step * step, (img_size // step + 1) * step
    sizes = f"{option}={below} or {above}" if below else f"{option}={above}"
    raise ModelConfigError(
        f"{option}={img_size} is not a multiple of the model's patch size {ph}x{pw}: timm "
        f"would silently ignore the bottom/right border, {1 - used / img_size**2:.0%} of "
        f"every image. Use {sizes}."
    )


def measure_latency(
    model: nn.Module,
    *,
    in_chans: int,
    img_size: int,
    batch_size: int = 1,
    min_run_time: float = 1.0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Forward-pass latency with spread, via ``torch.utils.benchmark.Timer``.

    A single median of a few ``perf_counter`` laps hides noise and thread settings; the
    Timer times blocks of runs (synchronising an accelerator), and the returned dict says
    how many runs, on how many threads and on which device, so figures can be compared.
    The model is timed where it is (eval mode, no grad) and its training mode restored.
    ``median_ms`` / ``iqr_ms`` are per forward pass of one batch of ``batch_size`` images,
    over ``blocks`` timed blocks of ``runs / blocks`` passes (a model slower than
    ``min_run_time`` gets one block, hence an IQR of 0: raise ``min_run_time`` for it).
    """
    from torch.utils.benchmark import Timer

    threads = torch.get_num_threads() if threads is None else int(threads)
    device = next(model.parameters()).device
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    timer = Timer("model(x)", globals={"model": model, "x": x}, num_threads=threads)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)  # warm-up (allocator, kernel choice); the Timer's block sizing adds more
            measured = timer.blocked_autorange(min_run_time=min_run_time)
    finally:
        model.train(was_training)
    return {
        "median_ms": measured.median * 1000,
        "iqr_ms": measured.iqr * 1000,
        "runs": len(measured.times) * measured.number_per_run,
        "blocks": len(measured.times),
        "threads": threads,
        "batch_size": batch_size,
        "device": str(device),
    }
