"""Model creation through timm, teacher weight loading (hub / file), and cost figures.

Everything that touches timm's registry or a weights file lives here, so that the
rest of dwskd only ever sees ``nn.Module`` objects and plain state dicts.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors / .pth / .bin / Lightning .ckpt file into a flat tensor dict."""
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(
            f"teacher.file={path} does not exist. Give the path of a .safetensors/.pth "
            "weights file (for example stages/teacher/model.safetensors of an earlier run)."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ModelConfigError(f"{path} holds no state dict (found {type(state).__name__}).")
    return {_strip_prefixes(k): v for k, v in state.items() if torch.is_tensor(v)}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STATE_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, bool]:
    """Fit a same-architecture state dict to ``model``: input channels, pos-embed, head.

    Uses timm's own helpers (``adapt_input_conv``, the family's ``checkpoint_filter_fn``).
    Returns the adapted dict and whether the classifier head had to be dropped.
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
    state, head_dropped = adapt_state_dict(read_state_dict(path), model)
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


@torch.no_grad()
def measure_latency_ms(
    model: nn.Module, *, in_chans: int, img_size: int, batch_size: int = 1, repeats: int = 20
) -> float:
    """Median CPU wall time of one forward pass (ms) after warm-up; a deployment figure."""
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, in_chans, img_size, img_size)
    model_cpu = model.to("cpu")
    for _ in range(3):
        model_cpu(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model_cpu(x)
        times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return float(sorted(times)[len(times) // 2])
