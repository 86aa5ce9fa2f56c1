"""Saliency maps (Grad-CAM, ViT attention rollout) and overlay PNGs for trained classifiers.

Why: a small medical-image classifier can score well by looking at burned-in text, rulers or
image borders instead of the anatomy. A heat map over each test image is the cheapest check
that the model looks where a clinician would. Grad-CAM comes from the maintained
``grad-cam`` package (``pytorch_grad_cam``); this module only chooses the target layer for
the architectures dwskd builds with timm (ViT, ConvNeXt, ResNet), turns ViT tokens back into
a patch grid, and guarantees that computing a map leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dwskd.io import refuse_existing

METHODS = ("auto", "gradcam", "rollout")
_IMAGE_SUFFIX = re.compile(r"\.(png|jpe?g|tiff?|bmp|gif|npy|npz|dcm)$", re.IGNORECASE)
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class UnsupportedModelError(ValueError):
    """The model has no layer that Grad-CAM / rollout can be attached to; the message says why."""


def saliency_maps(
    model: nn.Module,
    images: torch.Tensor,
    targets: list[int] | None = None,
    method: str = "auto",
) -> np.ndarray:
    """Heat maps (N, H, W) in [0, 1], one per image, of where ``model`` looks for a class.

    ``images`` are the normalised model inputs (N, C, H, W). ``targets`` are the class indices
    to explain; ``None`` explains each image's predicted class. ``method``: ``"gradcam"``
    (every supported model; what ``"auto"`` picks) or ``"rollout"`` (ViT attention rollout,
    class-agnostic, so ``targets`` are ignored). The model is run in eval mode and its
    train/eval flags, ``requires_grad`` flags, ``.grad`` tensors and hooks are restored
    afterwards, so this can be called in the middle of training or evaluation. An all-zero
    Grad-CAM map is a real answer: no location raises the class score (common untrained).
    """
    _check_images(images, targets)
    vit = _is_vit(model)
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {', '.join(METHODS)}")
    if method == "rollout" and not vit:
        raise UnsupportedModelError(
            f"method='rollout' needs a ViT (attention blocks); {type(model).__name__} is not one. "
            "Use method='gradcam'."
        )
    with _untouched(model):
        param = next(model.parameters(), None)
        device = param.device if param is not None else images.device
        x = images.detach().to(device=device, dtype=torch.float32)
        if method == "rollout":
            maps = _attention_rollout(model, x)
        else:
            maps = _grad_cam(model, x, targets, vit)
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0)


def _check_images(images: torch.Tensor, targets: Sequence[int] | None) -> None:
    """Fail early with the shapes spelled out, rather than deep inside a hook."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {shape}")
    if targets is not None and len(targets) != images.shape[0]:
        raise ValueError(f"{len(targets)} targets for {images.shape[0]} images; give one each")


def _is_vit(model: nn.Module) -> bool:
    """timm ViT-style models (ViT, DeiT, ...): patch embedding, token blocks, prefix tokens."""
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens"))


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Run in eval mode without computing weight gradients, then restore every flag.

    pytorch_grad_cam calls ``model.eval()`` and ``model.zero_grad()``; gradients are only
    needed with respect to activations, so weights are frozen meanwhile (faster, and the
    caller's accumulated ``.grad`` tensors survive). Per-module modes are restored because a
    model in training may deliberately keep, e.g., frozen BatchNorm layers in eval mode.
    """
    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def _grad_cam(
    model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None, vit: bool
) -> np.ndarray:
    """Grad-CAM on the last stage (CNN) or the last block's norm1 (ViT, tokens -> grid)."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("saliency maps need the grad-cam package: pip install grad-cam") from err

    layer, reshape = _vit_target(model, x) if vit else _cnn_target(model)
    wrapped = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape)
    try:
        # Weights are frozen, so the input must carry the graph to the activations.
        with torch.enable_grad():
            return cam(input_tensor=x.clone().requires_grad_(True), targets=wrapped)
    finally:
        # Not ``with cam:``: its __exit__ prints and swallows IndexError.
        cam.activations_and_grads.release()


def _cnn_target(model: nn.Module) -> tuple[nn.Module, Callable | None]:
    """The last feature stage: from timm's ``feature_info``, else ``layer4`` / ``stages``.

    timm records, for every model it builds, which module ends each stage; the last one is
    the deepest layer that still has a spatial map, which is what Grad-CAM needs.
    """
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and "module" in info[-1]:
        layer = model.get_submodule(info[-1]["module"])
        return layer, _channels_first(info[-1].get("num_chs"))
    if isinstance(getattr(model, "layer4", None), nn.Module):  # torchvision ResNet
        return model.layer4, None
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential) and len(stages) > 0:
        return stages[-1], None
    raise UnsupportedModelError(
        f"no saliency target layer for {type(model).__name__}: supported are timm ViT-style "
        "models (patch_embed + blocks) and CNNs with timm's feature_info (ConvNeXt, ResNet, "
        "...) or a layer4/stages attribute. Build the model with timm.create_model."
    )


def _channels_first(num_chs: int | None) -> Callable | None:
    """Some timm stages (Swin-like) output NHWC; Grad-CAM needs NCHW."""
    if num_chs is None:
        return None

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 4 and t.shape[1] != num_chs and t.shape[-1] == num_chs:
            return t.permute(0, 3, 1, 2)
        return t

    return reshape


def _vit_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """Patch grid of an input size: fixed ``grid_size`` unless the ViT takes any image size."""
    embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False) and hasattr(embed, "dynamic_feat_size"):
        return tuple(embed.dynamic_feat_size((height, width)))
    return tuple(embed.grid_size)


def _vit_target(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Callable]:
    """Last block's norm1, with tokens -> (N, C, gh, gw) skipping class/register tokens.

    After the last block only the class token reaches the head, so the final norm has no
    useful gradient on patch tokens; norm1 of the last block feeds the attention that mixes
    patch tokens into the class token (pytorch-grad-cam's ViT recipe).
    """
    block = model.blocks[-1]
    if not hasattr(block, "norm1"):
        raise UnsupportedModelError(f"last ViT block {type(block).__name__} has no norm1")
    prefix = int(model.num_prefix_tokens)
    gh, gw = _vit_grid(model, x.shape[-2], x.shape[-1])

    def reshape(t: torch.Tensor) -> torch.Tensor:
        patches = t[:, prefix:, :]
        if t.ndim != 3 or patches.shape[1] != gh * gw:
            raise UnsupportedModelError(
                f"ViT tokens {tuple(t.shape)} do not match {prefix} prefix + {gh}x{gw} patches"
            )
        return patches.reshape(t.shape[0], gh, gw, t.shape[2]).permute(0, 3, 1, 2)

    return block.norm1, reshape


def _attention_rollout(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): product over blocks of (A + I)/2.

    timm computes attention with fused SDPA, which never materialises the weights; for one
    forward pass each block is switched to its explicit path and the softmax output is
    read at ``attn_drop`` (identity in eval). The flags are restored afterwards.
    """
    attns = [getattr(block, "attn", None) for block in model.blocks]
    if not all(hasattr(a, "fused_attn") and hasattr(a, "attn_drop") for a in attns):
        raise UnsupportedModelError(
            "attention rollout needs timm Attention modules (fused_attn, attn_drop) in every "
            "block; use method='gradcam' for this model."
        )
    weights: list[torch.Tensor] = []
    fused = [a.fused_attn for a in attns]
    hooks = [a.attn_drop.register_forward_hook(lambda m, i, o: weights.append(o)) for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        with torch.no_grad():
            model(x)
    finally:
        for a, flag in zip(attns, fused, strict=True):
            a.fused_attn = flag
        for h in hooks:
            h.remove()
    return _rollout_maps(model, weights, x.shape[-2:])


def _rollout_maps(model: nn.Module, weights: list[torch.Tensor], size: torch.Size) -> np.ndarray:
    """Combine per-block attention into per-patch relevance, upsampled to the input size."""
    n_tokens = weights[0].shape[-1]
    eye = torch.eye(n_tokens, device=weights[0].device)
    rollout = eye.expand(weights[0].shape[0], n_tokens, n_tokens)
    for attn in weights:
        mixed = 0.5 * attn.float().mean(dim=1) + 0.5 * eye  # heads averaged, residual path
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    prefix = int(model.num_prefix_tokens)
    if getattr(model, "cls_token", None) is not None:
        relevance = rollout[:, 0, prefix:]  # what the class token gathered
    else:  # average-pooled ViT: every patch token feeds the head
        relevance = rollout[:, prefix:, prefix:].mean(dim=1)
    gh, gw = _vit_grid(model, int(size[0]), int(size[1]))
    grid = relevance.reshape(-1, 1, gh, gw)
    maps = nn.functional.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
    maps = maps[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    high = maps.amax(dim=(1, 2), keepdim=True)
    return ((maps - low) / (high - low + 1e-7)).cpu().numpy()


def write_overlays(
    model: nn.Module,
    images: torch.Tensor,
    raw: list[np.ndarray],
    names: list[str],
    out_dir: Path,
    label_names: list[str],
    targets: list[int] | None = None,
) -> list[Path]:
    """Write one PNG per image: the raw image with its Grad-CAM heat map blended in.

    Each figure is titled with the predicted label and its probability (and the explained
    class when ``targets`` picks another one), so a reviewer can flip through a folder and
    spot a model that is right for the wrong reason. ``raw`` are the unnormalised uint8
    images (H, W, 1|3) as a person would see them; they may be larger than the model input.
    Existing files are never overwritten: nothing is written if any output already exists.
    """
    if not (len(raw) == len(names) == images.shape[0]):
        raise ValueError(f"{images.shape[0]} images, {len(raw)} raw images, {len(names)} names")
    out_dir = Path(out_dir)
    paths = _overlay_paths(names, out_dir)
    rgbs = [_as_rgb(r) for r in raw]
    probs = _probabilities(model, images)
    if probs.shape[1] != len(label_names):
        raise ValueError(
            f"{len(label_names)} label names for a model with {probs.shape[1]} classes"
        )
    predicted = probs.argmax(axis=1)
    explained = [int(t) for t in targets] if targets is not None else predicted.tolist()
    if any(not 0 <= t < len(label_names) for t in explained):
        raise ValueError(f"targets {explained} outside 0..{len(label_names) - 1}")
    maps = saliency_maps(model, images, explained)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        title = f"pred {label_names[predicted[i]]} (p={probs[i, predicted[i]]:.2f})"
        if explained[i] != predicted[i]:
            title += f" | map: {label_names[explained[i]]}"
        _save_overlay(path, rgbs[i], maps[i], title)
    return paths


def _overlay_paths(names: Sequence[str], out_dir: Path) -> list[Path]:
    """Sanitised, unique ``<name>.png`` paths; refuse before writing if any exists."""
    paths: dict[Path, str] = {}
    for name in names:
        stem = _UNSAFE_CHARS.sub("_", _IMAGE_SUFFIX.sub("", str(name))).strip("._-")
        path = out_dir / f"{(stem or 'image')[:150]}.png"
        if path in paths:
            raise ValueError(f"names {paths[path]!r} and {name!r} both map to {path.name}")
        refuse_existing(path, option=None)
        paths[path] = name
    return list(paths)


def _probabilities(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Softmax class probabilities, computed without changing the model's state."""
    with _untouched(model), torch.no_grad():
        param = next(model.parameters(), None)
        x = images.detach().to(param.device if param is not None else images.device)
        return torch.softmax(model(x.float()).float(), dim=1).cpu().numpy()


def _as_rgb(raw: np.ndarray) -> np.ndarray:
    """uint8 HxW / HxWx1 / HxWx3 -> HxWx3, checked for every image before anything is written."""
    raw = np.asarray(raw)
    channels_ok = raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] in (1, 3))
    if raw.dtype != np.uint8 or not channels_ok:
        raise ValueError(
            f"raw images must be uint8 HxW, HxWx1 or HxWx3; got {raw.dtype} {raw.shape}"
        )
    rgb = raw.reshape(raw.shape[0], raw.shape[1], -1)
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb


def _save_overlay(path: Path, rgb: np.ndarray, cam: np.ndarray, title: str) -> None:
    """Blend with pytorch-grad-cam's jet overlay and save via a pyplot-free Figure."""
    import cv2
    from matplotlib.figure import Figure
    from pytorch_grad_cam.utils.image import show_cam_on_image

    height, width = rgb.shape[:2]
    if cam.shape != (height, width):
        cam = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
    overlay = show_cam_on_image(rgb.astype(np.float32) / 255.0, np.clip(cam, 0, 1), use_rgb=True)
    fig = Figure(figsize=(4, 4.3), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(overlay, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    with path.open("xb") as fh:  # exclusive create: a file appearing meanwhile is not clobbered
        fig.savefig(fh, format="png", bbox_inches="tight")
