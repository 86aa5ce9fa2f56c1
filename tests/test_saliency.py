"""Saliency maps and overlays: shapes and ranges per family, localisation, no side effects."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from dwskd.saliency import UnsupportedModelError, saliency_maps, write_overlays

pytest.importorskip("pytorch_grad_cam")

MODELS = {
    "vit": (
        "vit_tiny_patch16_224",
        {"depth": 2, "img_size": 32, "in_chans": 1, "num_classes": 3},
        32,
    ),
    "convnext": ("convnext_atto", {"in_chans": 1, "num_classes": 3}, 64),
    "resnet": ("resnet18", {"in_chans": 1, "num_classes": 3}, 64),
}


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[nn.Module, int]]:
    """Untrained models; ResNet's head made non-negative over its non-negative features.

    Grad-CAM keeps only locations that raise the class logit; with a random head every
    location of a random ResNet can lower every logit, and the correct map is then all
    zeros, which would say nothing about the plumbing tested here.
    """
    torch.manual_seed(0)
    built = {
        key: (timm.create_model(name, pretrained=False, **kw).eval(), size)
        for key, (name, kw, size) in MODELS.items()
    }
    with torch.no_grad():
        built["resnet"][0].fc.weight.abs_()
    return built


def blob_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Noise plus a bright square in the left half: structure that a map can follow."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    x[:, :, size // 4 : size // 2, size // 8 : size // 8 + size // 4] += 2.0
    return x


@pytest.mark.parametrize("family", list(MODELS))
def test_maps_shape_range_not_constant(models, family):
    model, size = models[family]
    maps = saliency_maps(model, blob_images(2, size))
    assert maps.shape == (2, size, size)
    assert maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert all(m.std() > 1e-3 for m in maps)


@pytest.mark.parametrize("family", list(MODELS))
def test_map_follows_shifted_input(models, family):
    model, size = models[family]
    x = blob_images(1, size)
    shifted = torch.roll(x, shifts=size // 2, dims=-1)
    a, b = saliency_maps(model, torch.cat([x, shifted]), [1, 1])
    assert np.abs(a - b).max() > 0.05


class BrightnessNet(nn.Module):
    """Class 0 logit = mean brightness, class 1 = minus it; a plain module with feature_info.

    Grad-CAM for class 0 must therefore highlight the bright region, wherever it is, and for
    class 1 (all gradients negative, removed by Grad-CAM's ReLU) highlight nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, kernel_size=4, stride=4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.stem.weight.fill_(1 / 16)
            self.stem.bias.zero_()
            self.head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
            self.head.bias.zero_()
        self.feature_info = [{"module": "act", "num_chs": 4, "reduction": 4}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.stem(x)).mean(dim=(2, 3)))


def test_gradcam_localises_the_evidence_and_respects_targets():
    model = BrightnessNet().eval()
    left = torch.zeros(1, 1, 32, 32)
    left[..., 12:20, 2:10] = 1.0
    right = torch.flip(left, dims=[-1])
    m_left, m_right = saliency_maps(model, torch.cat([left, right]), [0, 0])
    assert m_left[:, :16].sum() > 5 * m_left[:, 16:].sum()
    assert m_right[:, 16:].sum() > 5 * m_right[:, :16].sum()
    np.testing.assert_allclose(saliency_maps(model, left), m_left[None], atol=1e-6)  # predicted
    assert saliency_maps(model, left, [1]).max() < 1e-3


def test_no_side_effects_on_the_model(models):
    model, size = models["resnet"]
    model.train()
    model.bn1.eval()  # e.g. a frozen BatchNorm kept in eval during training
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():  # callers inside evaluation loops
            saliency_maps(model, blob_images(2, size))
        assert model.training and model.layer1.training and not model.bn1.training
        assert not model.fc.weight.requires_grad and model.conv1.weight.requires_grad
        assert torch.equal(model.conv1.weight.grad, torch.ones_like(model.conv1.weight))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "conv1.weight")
        assert all(not m._forward_hooks for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    finally:
        model.eval()
        model.fc.weight.requires_grad_(True)
        model.conv1.weight.grad = None


def test_vit_rollout(models):
    model, size = models["vit"]
    maps = saliency_maps(model, blob_images(2, size), method="rollout")
    assert maps.shape == (2, size, size)
    assert maps.min() >= 0.0 and maps.max() <= 1.0 and maps[0].std() > 1e-3
    assert all(block.attn.fused_attn == timm.layers.use_fused_attn() for block in model.blocks)
    assert all(not m._forward_hooks for m in model.modules())


def test_rollout_needs_a_vit(models):
    with pytest.raises(UnsupportedModelError, match="rollout"):
        saliency_maps(models["resnet"][0], blob_images(1, 64), method="rollout")


def test_unsupported_model_and_bad_arguments(models):
    plain = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 3))
    with pytest.raises(UnsupportedModelError, match="no saliency target layer for Sequential"):
        saliency_maps(plain, torch.zeros(1, 1, 32, 32))
    model, size = models["convnext"]
    with pytest.raises(ValueError, match="method="):
        saliency_maps(model, blob_images(1, size), method="shap")
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        saliency_maps(model, blob_images(1, size), [0, 1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        saliency_maps(model, torch.zeros(1, size, size))


def raw_images(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (size, size, 1), dtype=np.uint8),
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        rng.integers(0, 256, (size, size), dtype=np.uint8),
    ]


def test_write_overlays_and_refuse_to_overwrite(models, tmp_path):
    model, size = models["resnet"]
    images = blob_images(3, size)
    names = ["case 1/slice.png", "b", "../c"]
    labels = ["normal", "benign", "malignant"]
    out = tmp_path / "overlays"
    paths = write_overlays(model, images, raw_images(96), names, out, labels)
    assert [p.name for p in paths] == ["case_1_slice.png", "b.png", "c.png"]
    assert sorted(out.iterdir()) == sorted(paths)
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.mode in ("RGB", "RGBA")
    with pytest.raises(FileExistsError, match="b.png"):
        write_overlays(model, images[1:2], raw_images(96)[1:2], ["b"], out, labels)
    # One existing output blocks the whole batch: nothing is half-written.
    with pytest.raises(FileExistsError, match="c.png"):
        write_overlays(model, images[1:], raw_images(96)[1:], ["new", "c"], out, labels)
    assert not (out / "new.png").exists()


def test_write_overlays_argument_errors(models, tmp_path):
    model, size = models["resnet"]
    images, raw = blob_images(2, size), raw_images(size)[:2]
    labels = ["a", "b", "c"]
    with pytest.raises(ValueError, match="both map to"):
        write_overlays(model, images, raw, ["x.png", "x"], tmp_path, labels)
    with pytest.raises(ValueError, match="label names"):
        write_overlays(model, images, raw, ["x", "y"], tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        write_overlays(model, images, raw, ["x", "y"], tmp_path, labels, targets=[0, 7])
    with pytest.raises(ValueError, match="uint8"):
        write_overlays(
            model, images, [r.astype(np.float32) for r in raw], ["x", "y"], tmp_path, labels
        )


@pytest.mark.parametrize(
    "kwargs",
    [{"reg_tokens": 2}, {"reg_tokens": 2, "class_token": False, "global_pool": "avg"}],
    ids=["cls+registers", "registers-avgpool"],
)
def test_vit_prefix_tokens_are_skipped(kwargs):
    """Register tokens change the token count; the grid must still be 2x2 patches."""
    model = timm.create_model(
        "vit_tiny_patch16_224", depth=1, img_size=32, in_chans=1, num_classes=3, **kwargs
    ).eval()
    for method in ("gradcam", "rollout"):
        maps = saliency_maps(model, blob_images(2, 32), method=method)
        assert maps.shape == (2, 32, 32) and maps[0].std() > 1e-3
