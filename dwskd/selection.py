"""Weight selection (Xu et al., ICLR 2024): initialise a small timm model from a larger one.

For every *student* parameter the teacher tensor with the same name (after mapping the
student's block index to a teacher block) is cut down along each dimension to the
student's size. Two choices define a selection, both recorded in a :class:`SelectionPlan`:

* **layers** — which teacher block feeds student block ``i`` of each block stack
  (``blocks`` in a ViT, ``stages.N.blocks`` in a ConvNeXt, ``layerN`` in a ResNet);
* **elements** — which indices survive along a dimension that shrinks from ``T`` to ``S``.
  The index set depends only on ``(T, S)`` and the recipe, so every tensor that shares a
  dimension (the residual stream, the MLP hidden width, the attention channels) keeps the
  *same* neurons, also for ``random``. A fused ``qkv`` is split into its q, k and v blocks
  first, so the three stay aligned.

``offset`` picks one of ``ceil(T/S)`` phases of every strategy, so students selected with
offsets ``0..ceil(T/S)-1`` hold disjoint (when ``S`` divides ``T``) index sets that together
cover every teacher channel — the complementary pair of dual-model selection.

Everything here is pure (tensors in, tensors out) except :func:`save_selection`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

LAYER_STRATEGIES = ("first_n", "uniform", "last_n", "mid_n")
ELEMENT_STRATEGIES = ("uniform", "consecutive", "random")
HEAD_MODES = ("auto", "select", "reinit")
_FUSED_PARTS = {"qkv": 3, "kv": 2}  # fused projections whose parts must stay aligned
_BLOCK_KEY = re.compile(r"^(?P<stack>(?:.*\.)?(?:blocks|layer\d+))\.(?P<index>\d+)\.(?P<rest>.+)$")

IndexFn = Callable[[int, int], Tensor]


class SelectionError(ValueError):
    """A teacher/student pair or recipe that weight selection cannot serve; says what to change."""


@dataclass(frozen=True)
class SelectionRecipe:
    """How to select: layer strategy (or explicit blocks), element strategy, phase, seed, head.

    ``layers`` is a strategy name, a list of teacher block indices (models with one block
    stack), or one such list per stack (hierarchical models). ``head`` is ``auto`` (select
    when the label spaces match, else re-initialise), ``select`` (must match) or ``reinit``.
    """

    layers: str | Sequence[int] | Sequence[Sequence[int]] = "first_n"
    elements: str = "uniform"
    offset: int = 0
    seed: int = 0
    head: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _normalise_layers(self.layers))
        if self.elements not in ELEMENT_STRATEGIES:
            raise SelectionError(
                f"selection.elements={self.elements!r} is unknown; use one of {ELEMENT_STRATEGIES}."
            )
        if int(self.offset) < 0:
            raise SelectionError(f"selection.offset={self.offset} must be >= 0.")
        if self.head not in HEAD_MODES:
            raise SelectionError(
                f"selection.head={self.head!r} is unknown; use one of {HEAD_MODES}."
            )


def _normalise_layers(layers: object) -> str | tuple:
    """Strategy names stay strings; lists (also OmegaConf ones) become hashable int tuples."""
    if isinstance(layers, str):
        if layers not in LAYER_STRATEGIES:
            raise SelectionError(
                f"selection.layers={layers!r} is unknown; use one of {LAYER_STRATEGIES} "
                "or a list of teacher block indices."
            )
        return layers
    items = list(layers)  # type: ignore[call-overload]
    if items and all(isinstance(x, int | np.integer) for x in items):
        return tuple(int(x) for x in items)
    if items and all(not isinstance(x, str | int) for x in items):
        return tuple(tuple(int(i) for i in x) for x in items)
    raise SelectionError(
        f"selection.layers={layers!r}: give a strategy name, a list of ints, or one list per stage."
    )


@dataclass
class SelectionPlan:
    """Exactly what was selected, so a run can be audited and reproduced.

    ``teacher_blocks[stack][i]`` is the teacher block copied into student block ``i``;
    ``element_indices["T->S"]`` are the teacher indices kept along every dimension that
    shrinks from T to S; ``adapted`` lists tensors reshaped by timm helpers before selection;
    ``teacher`` is free-form provenance (name, source, file) filled in by the caller.
    """

    recipe: SelectionRecipe
    family: str
    teacher_blocks: dict[str, list[int]]
    element_indices: dict[str, list[int]]
    head_reinitialised: bool
    adapted: dict[str, str] = field(default_factory=dict)
    teacher: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------- element selection


def element_indices(
    teacher_size: int, student_size: int, strategy: str = "uniform", offset: int = 0, seed: int = 0
) -> Tensor:
    """Teacher indices to keep along one dimension (sorted, ``student_size`` of them).

    uniform: ``floor(i*T/S) + offset`` (every k-th from offset; spread evenly when S does not
    divide T). consecutive: the ``offset``-th window of S. random: the ``offset``-th window of
    a permutation seeded by (seed, T, S). A dimension that does not shrink is kept whole.
    """
    t, s = int(teacher_size), int(student_size)
    if s > t:
        raise SelectionError(f"student dimension {s} is larger than the teacher's {t}.")
    if s == t:
        return torch.arange(t)
    phases = math.ceil(t / s)
    if not 0 <= offset < phases:
        raise SelectionError(
            f"selection.offset={offset} is out of range for a dimension {t}->{s}; "
            f"use 0..{phases - 1}."
        )
    start = min(offset * s, t - s)
    if strategy == "uniform":
        return torch.arange(s) * t // s + offset
    if strategy == "consecutive":
        return torch.arange(start, start + s)
    if strategy == "random":
        perm = np.random.default_rng([seed, t, s]).permutation(t)
        return torch.from_numpy(np.sort(perm[start : start + s]))
    raise SelectionError(f"selection.elements={strategy!r} is unknown; use {ELEMENT_STRATEGIES}.")


class IndexCache:
    """One index set per (T, S) pair for the whole model: the consistency guarantee.

    Callable as an :data:`IndexFn`; :meth:`record` lists what was used, for the plan.
    """

    def __init__(self, recipe: SelectionRecipe) -> None:
        self.recipe = recipe
        self._cache: dict[tuple[int, int], Tensor] = {}

    def __call__(self, t: int, s: int) -> Tensor:
        if (t, s) not in self._cache:
            r = self.recipe
            self._cache[(t, s)] = element_indices(t, s, r.elements, r.offset, r.seed)
        return self._cache[(t, s)]

    def record(self) -> dict[str, list[int]]:
        return {f"{t}->{s}": idx.tolist() for (t, s), idx in self._cache.items() if t != s}


def select_tensor(weight: Tensor, shape: Sequence[int], indices: IndexFn) -> Tensor:
    """Cut ``weight`` down to ``shape``, dimension by dimension (the paper's core operation)."""
    for dim, (t, s) in enumerate(zip(weight.shape, shape, strict=True)):
        if t != s:
            weight = weight.index_select(dim, indices(t, s))
    return weight


def select_fused(weight: Tensor, shape: Sequence[int], parts: int, indices: IndexFn) -> Tensor:
    """Select inside each of the ``parts`` blocks of a fused projection (q, k, v aligned)."""
    split = weight.reshape(parts, weight.shape[0] // parts, *weight.shape[1:])
    target = (parts, shape[0] // parts, *shape[1:])
    return select_tensor(split, target, indices).reshape(tuple(shape))


# ----------------------------------------------------------------------- layer selection


def layer_indices(
    teacher_depth: int, student_depth: int, strategy: str | Sequence[int], stack: str = "blocks"
) -> list[int]:
    """Teacher block feeding each student block of one stack."""
    t, s = teacher_depth, student_depth
    if s > t:
        raise SelectionError(
            f"student is deeper than the teacher: '{stack}' has {s} blocks in the student "
            f"but {t} in the teacher. Use a shallower student (model.depth) or a deeper teacher."
        )
    if not isinstance(strategy, str):
        chosen = [int(i) for i in strategy]
        if len(chosen) != s or not all(0 <= i < t for i in chosen):
            raise SelectionError(
                f"selection.layers={chosen} for '{stack}': need {s} teacher block indices "
                f"in 0..{t - 1}."
            )
        return chosen
    if strategy == "first_n":
        return list(range(s))
    if strategy == "last_n":
        return list(range(t - s, t))
    if strategy == "mid_n":
        return list(range((t - s) // 2, (t - s) // 2 + s))
    if strategy == "uniform":
        return [round(i * (t - 1) / (s - 1)) for i in range(s)] if s > 1 else [0]
    raise SelectionError(f"selection.layers={strategy!r} is unknown; use {LAYER_STRATEGIES}.")


def block_depths(keys: Sequence[str]) -> dict[str, int]:
    """Number of blocks in each block stack, in order of appearance (``blocks``: 12, ...)."""
    depths: dict[str, int] = {}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            stack, index = match["stack"], int(match["index"])
            depths[stack] = max(depths.get(stack, 0), index + 1)
    return depths


def layer_maps(
    teacher_keys: Sequence[str], student_keys: Sequence[str], layers: str | tuple
) -> dict[str, list[int]]:
    """Per student stack, the teacher block for each student block."""
    teacher_depths, student_depths = block_depths(teacher_keys), block_depths(student_keys)
    absent = [stack for stack in student_depths if stack not in teacher_depths]
    if absent:
        raise SelectionError(
            f"family mismatch: the student's block stack '{absent[0]}' is absent from the "
            f"teacher (teacher stacks: {list(teacher_depths)}). Use a teacher of the same family."
        )
    per_stack = _explicit_per_stack(layers, list(student_depths))
    return {
        stack: layer_indices(teacher_depths[stack], depth, per_stack[stack], stack)
        for stack, depth in student_depths.items()
    }


def _explicit_per_stack(layers: str | tuple, stacks: list[str]) -> dict[str, str | Sequence[int]]:
    if isinstance(layers, str):
        return dict.fromkeys(stacks, layers)
    if layers and isinstance(layers[0], int):
        if len(stacks) != 1:
            raise SelectionError(
                f"selection.layers={list(layers)} is one list, but the student has "
                f"{len(stacks)} block stacks {stacks}: give one list per stack."
            )
        return {stacks[0]: layers}
    if len(layers) != len(stacks):
        raise SelectionError(
            f"selection.layers has {len(layers)} lists for {len(stacks)} stacks {stacks}."
        )
    return dict(zip(stacks, layers, strict=True))


def teacher_key(student_key: str, maps: Mapping[str, list[int]]) -> str:
    """The teacher parameter name that feeds ``student_key`` under the layer maps."""
    match = _BLOCK_KEY.match(student_key)
    if not match or match["stack"] not in maps:
        return student_key
    return f"{match['stack']}.{maps[match['stack']][int(match['index'])]}.{match['rest']}"


# -------------------------------------------------------------- input, pos-embed, head


def adapt_to_student(
    key: str, weight: Tensor, shape: Sequence[int], student: nn.Module
) -> tuple[Tensor, str | None]:
    """Use timm's helpers where selection alone cannot fit: input channels, patch, pos-embed."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    from timm.models import adapt_input_conv

    notes = []
    first_conv = (getattr(student, "pretrained_cfg", None) or {}).get("first_conv")
    if key == f"{first_conv}.weight" and weight.ndim == 4 and weight.shape[1] != shape[1]:
        notes.append(f"input channels {weight.shape[1]}->{shape[1]} (timm adapt_input_conv)")
        weight = adapt_input_conv(shape[1], weight)
    if key == "patch_embed.proj.weight" and tuple(weight.shape[-2:]) != tuple(shape[-2:]):
        notes.append(
            f"patch {tuple(weight.shape[-2:])}->{tuple(shape[-2:])} (resample_patch_embed)"
        )
        weight = resample_patch_embed(weight, list(shape[-2:]))
    if key == "pos_embed" and weight.shape[1] != shape[1]:
        prefix = 0 if getattr(student, "no_embed_class", False) else student.num_prefix_tokens
        grid = list(student.patch_embed.grid_size)
        notes.append(f"pos_embed tokens {weight.shape[1]}->{shape[1]} (resample_abs_pos_embed)")
        weight = resample_abs_pos_embed(weight, new_size=grid, num_prefix_tokens=prefix)
    return weight, "; ".join(notes) or None


def classifier_keys(student: nn.Module, student_state: Mapping[str, Tensor]) -> list[str]:
    """Parameter names of the classifier (timm's ``pretrained_cfg['classifier']``)."""
    names = (getattr(student, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return [f"{n}.{p}" for n in names for p in ("weight", "bias") if f"{n}.{p}" in student_state]


def head_reinitialised(
    teacher_state: Mapping[str, Tensor],
    student_state: Mapping[str, Tensor],
    keys: list[str],
    mode: str,
) -> bool:
    """Whether the student keeps its fresh head: label spaces (class counts) differ, or asked."""
    if not keys or mode == "reinit":
        return bool(keys)
    weight = next((k for k in keys if k.endswith("weight")), keys[0])
    student_classes = student_state[weight].shape[0]
    teacher_shape = tuple(teacher_state[weight].shape) if weight in teacher_state else None
    matches = teacher_shape is not None and teacher_shape[0] == student_classes
    if mode == "select" and not matches:
        raise SelectionError(
            f"impossible head: selection.head=select but '{weight}' has teacher shape "
            f"{teacher_shape} and student shape {tuple(student_state[weight].shape)} "
            "(different label spaces). Use selection.head=auto to re-initialise it."
        )
    return not matches


# ------------------------------------------------------------------ state-dict mapping


def _match_rank(key: str, weight: Tensor, shape: Sequence[int]) -> Tensor:
    """Linear <-> 1x1 conv (ConvNeXt-T uses Linear MLPs, ConvNeXt-atto 1x1 convs)."""
    if weight.ndim == len(shape):
        return weight
    if weight.ndim < len(shape) and all(d == 1 for d in shape[weight.ndim :]):
        return weight.reshape(*weight.shape, *[1] * (len(shape) - weight.ndim))
    if weight.ndim > len(shape) and all(d == 1 for d in weight.shape[len(shape) :]):
        return weight.reshape(weight.shape[: len(shape)])
    raise SelectionError(
        f"'{key}': teacher shape {tuple(weight.shape)} and student shape {tuple(shape)} "
        "have different ranks; the two models are not the same family."
    )


def select_parameter(key: str, weight: Tensor, shape: Sequence[int], indices: IndexFn) -> Tensor:
    """Select one teacher tensor into the student's shape, keeping fused parts aligned."""
    weight = _match_rank(key, weight, shape)
    if any(t < s for t, s in zip(weight.shape, shape, strict=True)):
        raise SelectionError(
            f"student is wider than the teacher at '{key}': teacher shape "
            f"{tuple(weight.shape)}, student shape {tuple(shape)}. Use a smaller student."
        )
    parts = _FUSED_PARTS.get(key.rsplit(".", 2)[-2] if key.count(".") else "")
    try:
        if parts and weight.shape[0] % parts == 0 and shape[0] % parts == 0:
            return select_fused(weight, shape, parts, indices)
        return select_tensor(weight, shape, indices)
    except SelectionError as err:
        raise SelectionError(f"'{key}' ({tuple(weight.shape)} -> {tuple(shape)}): {err}") from err


def _check_teacher_keys(
    wanted: Mapping[str, str], teacher_state: Mapping[str, Tensor], student: nn.Module
) -> None:
    """Family mismatch (most names absent) vs one missing name: two different fixes."""
    missing = [s for s, t in wanted.items() if t not in teacher_state]
    if not missing:
        return
    first, family = missing[0], type(student).__name__
    if len(missing) > len(wanted) // 2:
        raise SelectionError(
            f"family mismatch: {len(missing)}/{len(wanted)} parameters of the student "
            f"({family}) are absent from the teacher, e.g. '{wanted[first]}'; the teacher has "
            f"e.g. {list(teacher_state)[:3]}. Select from a teacher of the same family."
        )
    raise SelectionError(
        f"student parameter '{first}' (shape {tuple(student.state_dict()[first].shape)}) has no "
        f"teacher counterpart '{wanted[first]}'. The teacher is another variant of the family."
    )


def select_state_dict(
    teacher_state: Mapping[str, Tensor], student: nn.Module, recipe: SelectionRecipe
) -> tuple[dict[str, Tensor], SelectionPlan]:
    """Map a teacher state dict onto ``student``: returns exactly the student's keys + plan.

    A re-initialised head keeps the student's own fresh values, so the result loads with
    ``strict=True``.
    """
    student_state = student.state_dict()
    maps = layer_maps(list(teacher_state), list(student_state), recipe.layers)
    heads = classifier_keys(student, student_state)
    reinit = head_reinitialised(teacher_state, student_state, heads, recipe.head)
    wanted = {k: teacher_key(k, maps) for k in student_state if not (reinit and k in heads)}
    _check_teacher_keys(wanted, teacher_state, student)
    indices = IndexCache(recipe)
    selected, adapted = {}, {}
    with torch.no_grad():
        for key, target in student_state.items():
            if key not in wanted:
                selected[key] = target.detach().clone()
                continue
            weight, note = adapt_to_student(key, teacher_state[wanted[key]], target.shape, student)
            if note:
                adapted[key] = note
            selected[key] = select_parameter(key, weight, target.shape, indices).to(target.dtype)
    plan = SelectionPlan(
        recipe=recipe,
        family=type(student).__name__,
        teacher_blocks=maps,
        element_indices=indices.record(),
        head_reinitialised=reinit,
        adapted=adapted,
    )
    return selected, plan


def initialize_from_teacher(
    student: nn.Module, teacher: nn.Module, recipe: SelectionRecipe
) -> SelectionPlan:
    """Select ``teacher``'s weights into ``student`` in place (strict load); returns the plan."""
    if type(student) is not type(teacher):
        raise SelectionError(
            f"family mismatch: student is {type(student).__name__}, teacher is "
            f"{type(teacher).__name__}. Weight selection needs a teacher of the student's family."
        )
    state, plan = select_state_dict(teacher.state_dict(), student, recipe)
    student.load_state_dict(state, strict=True)
    return plan


# ----------------------------------------------------------------------------- saving


def plan_sidecar(path: Path) -> Path:
    """``student.safetensors`` -> ``student.safetensors.plan.json``."""
    return path.with_name(path.name + ".plan.json")


def save_selection(path: Path, state: Mapping[str, Tensor], plan: SelectionPlan) -> None:
    """Write ``state`` as .safetensors (plan JSON in its metadata) and the plan beside it.

    Refuses to overwrite: selected weights are often the input of a long run.
    """
    from safetensors.torch import save_file

    from dwskd.io import atomic_write, refuse_existing, write_text

    path, sidecar = Path(path), plan_sidecar(Path(path))
    refuse_existing(path, sidecar)

    plan_json = json.dumps(plan.to_dict(), indent=1)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    metadata = {"selection_plan": plan_json}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size=size)
    write_text(sidecar, plan_json + "\n")


def read_selection_plan(path: Path) -> dict:
    """The plan stored in a .safetensors written by :func:`save_selection`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "selection_plan" not in metadata:
        raise SelectionError(f"{path} holds no selection plan (not written by dwskd-select).")
    return json.loads(metadata["selection_plan"])
