"""Weight selection: index sets, layer maps, ViT/ConvNeXt mapping, errors, CLI, and function."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from dwskd.models import create_model
from dwskd.select_student import run
from dwskd.selection import (
    SelectionError,
    SelectionRecipe,
    element_indices,
    initialize_from_teacher,
    layer_indices,
    read_selection_plan,
    select_state_dict,
)
from tests.conftest import run_module

ROOT = Path(__file__).resolve().parents[1]
EVEN, ODD = torch.arange(0, 384, 2), torch.arange(1, 384, 2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests.conftest.one_thread)."""


def timm_model(name: str = "vit_tiny_patch16_224", **kwargs) -> torch.nn.Module:
    kwargs = {"num_classes": 4, **kwargs}
    return timm.create_model(name, **kwargs).eval()


def scrambled(model: torch.nn.Module) -> torch.nn.Module:
    """Distinct random values everywhere: timm's init has constant norms/biases/gammas."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    return model


def vit_small(**kwargs) -> torch.nn.Module:
    """A ViT-S teacher with distinct values in every tensor."""
    return scrambled(timm_model("vit_small_patch16_224", **kwargs))


def pick(tensor: torch.Tensor, *index_per_dim: torch.Tensor | None) -> torch.Tensor:
    """Hand-written selection: ``index_per_dim[d]`` along dim d (None keeps the dimension)."""
    for dim, idx in enumerate(index_per_dim):
        if idx is not None:
            tensor = tensor.index_select(dim, idx)
    return tensor


def qkv_rows(idx: torch.Tensor, width: int = 384) -> torch.Tensor:
    return torch.cat([idx, idx + width, idx + 2 * width])


# ------------------------------------------------------------------ index sets


def test_uniform_indices_by_hand():
    assert element_indices(384, 192).tolist() == list(range(0, 384, 2))
    assert element_indices(384, 192, offset=1).tolist() == list(range(1, 384, 2))
    assert element_indices(768, 192, offset=3).tolist() == list(range(3, 768, 4))
    # 96 -> 40 is not divisible (k = 2.4): floor(i * 2.4), spread over the whole range
    ninety_six = element_indices(96, 40).tolist()
    assert ninety_six[:6] == [0, 2, 4, 7, 9, 12] and ninety_six[-1] == 93
    assert element_indices(96, 40, offset=2).tolist()[-1] == 95
    assert element_indices(7, 7, offset=1).tolist() == list(range(7))  # not shrinking: whole
    assert element_indices(384, 192, "consecutive", offset=1).tolist() == list(range(192, 384))


@pytest.mark.parametrize("strategy", ["uniform", "consecutive", "random"])
@pytest.mark.parametrize(("teacher", "student"), [(384, 192), (768, 192)])
def test_complementary_offsets_are_disjoint_and_cover(strategy, teacher, student):
    sets = [
        set(element_indices(teacher, student, strategy, offset, seed=7).tolist())
        for offset in range(teacher // student)
    ]
    assert all(len(s) == student for s in sets)
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == teacher


def test_random_indices_are_seeded():
    first = element_indices(384, 192, "random", seed=3)
    assert torch.equal(first, element_indices(384, 192, "random", seed=3))
    assert not torch.equal(first, element_indices(384, 192, "random", seed=4))
    assert not torch.equal(first, element_indices(384, 192))
    assert torch.equal(first, first.sort().values)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("first_n", [0, 1, 2, 3, 4, 5]),
        ("last_n", [6, 7, 8, 9, 10, 11]),
        ("mid_n", [3, 4, 5, 6, 7, 8]),
        ("uniform", [0, 2, 4, 7, 9, 11]),
        ([0, 1, 2, 3, 4, 11], [0, 1, 2, 3, 4, 11]),
    ],
)
def test_layer_strategies_map_expected_blocks(strategy, expected):
    assert layer_indices(12, 6, strategy) == expected
    teacher, student = vit_small(img_size=32), timm_model(depth=6, img_size=32)
    plan = initialize_from_teacher(student, teacher, SelectionRecipe(layers=strategy))
    assert plan.teacher_blocks == {"blocks": expected}
    for i, j in enumerate(expected):
        assert torch.equal(student.blocks[i].norm1.weight, teacher.blocks[j].norm1.weight[EVEN])
        assert torch.equal(student.blocks[i].mlp.fc2.bias, teacher.blocks[j].mlp.fc2.bias[EVEN])


# ------------------------------------------------------------------ ViT mapping


def test_identity_selection_reproduces_teacher_outputs():
    for name, kwargs in [
        ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32}),
        ("convnext_atto", {}),
    ]:
        teacher = timm_model(name, **kwargs)
        student = timm_model(name, **kwargs)
        x = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(student(x), teacher(x))
        plan = initialize_from_teacher(student, teacher, SelectionRecipe())
        assert torch.equal(student(x), teacher(x)) and not plan.head_reinitialised


def test_vit_small_to_tiny_uniform_values_at_hand_computed_indices():
    teacher, student = vit_small(), timm_model(depth=6)
    plan = initialize_from_teacher(student, teacher, SelectionRecipe(offset=1))
    t, s = teacher.state_dict(), student.state_dict()
    hidden = torch.arange(1, 1536, 2)
    expected = {
        "cls_token": pick(t["cls_token"], None, None, ODD),
        "pos_embed": pick(t["pos_embed"], None, None, ODD),
        "patch_embed.proj.weight": pick(t["patch_embed.proj.weight"], ODD),
        "blocks.3.norm1.weight": t["blocks.3.norm1.weight"][ODD],
        "blocks.3.attn.qkv.weight": pick(t["blocks.3.attn.qkv.weight"], qkv_rows(ODD), ODD),
        "blocks.3.attn.qkv.bias": t["blocks.3.attn.qkv.bias"][qkv_rows(ODD)],
        "blocks.3.attn.proj.weight": pick(t["blocks.3.attn.proj.weight"], ODD, ODD),
        "blocks.5.mlp.fc1.weight": pick(t["blocks.5.mlp.fc1.weight"], hidden, ODD),
        "blocks.5.mlp.fc2.weight": pick(t["blocks.5.mlp.fc2.weight"], ODD, hidden),
        "norm.bias": t["norm.bias"][ODD],
        "head.weight": pick(t["head.weight"], None, ODD),
        "head.bias": t["head.bias"],
    }
    for key, value in expected.items():
        assert torch.equal(s[key], value), key
    assert not plan.head_reinitialised
    assert plan.element_indices["384->192"] == ODD.tolist()


def test_random_selection_is_consistent_across_the_residual_stream_and_qkv():
    teacher, student = vit_small(img_size=32), timm_model(depth=4, img_size=32)
    plan = initialize_from_teacher(student, teacher, SelectionRecipe(elements="random", seed=5))
    idx = torch.tensor(plan.element_indices["384->192"])
    hidden = torch.tensor(plan.element_indices["1536->768"])
    assert not torch.equal(idx, EVEN) and len(set(idx.tolist())) == 192
    t, s = teacher.state_dict(), student.state_dict()
    expected = {
        "cls_token": pick(t["cls_token"], None, None, idx),
        "pos_embed": pick(t["pos_embed"], None, None, idx),
        "patch_embed.proj.bias": t["patch_embed.proj.bias"][idx],
        "norm.weight": t["norm.weight"][idx],
    }
    for b in range(4):
        block = {k[len(f"blocks.{b}.") :]: v for k, v in t.items() if k.startswith(f"blocks.{b}.")}
        for name in ("norm1.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"):
            expected[f"blocks.{b}.{name}"] = block[name][idx]
        expected[f"blocks.{b}.attn.qkv.weight"] = pick(block["attn.qkv.weight"], qkv_rows(idx), idx)
        expected[f"blocks.{b}.attn.proj.weight"] = pick(block["attn.proj.weight"], idx, idx)
        expected[f"blocks.{b}.mlp.fc1.weight"] = pick(block["mlp.fc1.weight"], hidden, idx)
    for key, value in expected.items():
        assert torch.equal(s[key], value), key


def test_complementary_students_hold_every_teacher_channel():
    teacher = vit_small(img_size=32)
    values = []
    for offset in (0, 1):
        student = timm_model(depth=2, img_size=32)
        initialize_from_teacher(student, teacher, SelectionRecipe(offset=offset))
        values.append(set(student.blocks[1].norm1.bias.tolist()))
    teacher_values = set(teacher.blocks[1].norm1.bias.tolist())
    assert values[0].isdisjoint(values[1]) and values[0] | values[1] == teacher_values


def test_pos_embed_and_patch_size_are_resampled():
    teacher = vit_small()  # 224 px, 14x14 grid
    student = timm_model(depth=2, img_size=64)  # 4x4 grid
    plan = initialize_from_teacher(student, teacher, SelectionRecipe())
    resampled = resample_abs_pos_embed(teacher.pos_embed, new_size=[4, 4], num_prefix_tokens=1)
    assert student.pos_embed.shape == (1, 17, 192)
    assert torch.equal(student.pos_embed, resampled[..., EVEN])
    assert "pos_embed" in plan.adapted
    patch8 = timm_model(depth=2, img_size=32, patch_size=8)
    initialize_from_teacher(patch8, teacher, SelectionRecipe())
    expected = resample_patch_embed(teacher.patch_embed.proj.weight, [8, 8])[EVEN]
    assert torch.allclose(patch8.patch_embed.proj.weight, expected)


def test_one_channel_student_sums_rgb():
    teacher, student = vit_small(img_size=32), timm_model(depth=2, img_size=32, in_chans=1)
    plan = initialize_from_teacher(student, teacher, SelectionRecipe())
    rgb = teacher.patch_embed.proj.weight[EVEN]
    assert torch.allclose(student.patch_embed.proj.weight, rgb.sum(dim=1, keepdim=True))
    assert "input channels 3->1" in plan.adapted["patch_embed.proj.weight"]


def test_head_reinitialised_when_label_spaces_differ():
    teacher, student = vit_small(img_size=32, num_classes=10), timm_model(depth=2, img_size=32)
    fresh = student.head.weight.detach().clone()
    plan = initialize_from_teacher(student, teacher, SelectionRecipe())
    assert plan.head_reinitialised and torch.equal(student.head.weight, fresh)
    assert torch.equal(student.blocks[0].norm1.weight, teacher.blocks[0].norm1.weight[EVEN])


# ------------------------------------------------------------------ ConvNeXt and generic


@pytest.mark.parametrize(
    ("name", "depths", "widths"),
    [
        ("convnext_atto", [2, 2, 6, 2], [40, 80, 160, 320]),
        ("convnext_femto", [2, 2, 6, 2], [48, 96, 192, 384]),
    ],
)
def test_convnext_tiny_to_small_convnext(name, depths, widths):
    teacher, student = scrambled(timm_model("convnext_tiny")), timm_model(name, in_chans=1)
    plan = initialize_from_teacher(student, teacher, SelectionRecipe(layers="uniform"))
    assert [len(b) for b in plan.teacher_blocks.values()] == depths
    assert plan.teacher_blocks["stages.2.blocks"] == [0, 2, 3, 5, 6, 8]
    assert [student.stages[i].blocks[0].gamma.shape[0] for i in range(4)] == widths
    d, h = element_indices(96, widths[0]), element_indices(384, 4 * widths[0])
    t_fc1 = teacher.stages[0].blocks[2].mlp.fc1.weight  # Linear in ConvNeXt-T, 1x1 conv here
    assert torch.equal(student.stages[0].blocks[1].mlp.fc1.weight[..., 0, 0], pick(t_fc1, h, d))
    last = teacher.stages[3].blocks[2].gamma[element_indices(768, widths[3])]
    assert torch.equal(student.stages[3].blocks[1].gamma, last)
    stem = teacher.stem[0].weight.sum(dim=1, keepdim=True)[d]
    assert torch.allclose(student.stem[0].weight, stem)
    assert student(torch.randn(1, 1, 64, 64)).shape == (1, 4)


def test_generic_family_resnet():
    teacher, student = timm_model("resnet34"), timm_model("resnet18")
    plan = initialize_from_teacher(student, teacher, SelectionRecipe(layers="uniform"))
    assert plan.teacher_blocks["layer3"] == [0, 5]
    assert torch.equal(student.layer3[1].conv1.weight, teacher.layer3[5].conv1.weight)


# ------------------------------------------------------------------ errors


def _error_cases():
    small = {"img_size": 32, "depth": 2}
    return {
        "wider": (lambda: (timm_model(**small), vit_small(**small)), "wider", "(1, 1, 384)"),
        "deeper": (
            lambda: (timm_model(**small), timm_model(img_size=32, depth=3)),
            "deeper",
            "3 blocks",
        ),
        "family": (
            lambda: (timm_model("convnext_atto"), timm_model(**small)),
            "family mismatch",
            "ConvNeXt",
        ),
        "head": (
            lambda: (timm_model(**small, num_classes=10), timm_model(**small)),
            "impossible head",
            "(10, 192)",
        ),
    }


@pytest.mark.parametrize("case", ["wider", "deeper", "family", "head"])
def test_errors_name_parameter_and_shapes(case):
    make, message, detail = _error_cases()[case]
    teacher, student = make()
    recipe = SelectionRecipe(head="select" if case == "head" else "auto")
    with pytest.raises(SelectionError, match=message) as err:
        initialize_from_teacher(student, teacher, recipe)
    assert detail in str(err.value)


def test_errors_for_state_dicts_and_recipes():
    student = timm_model(img_size=32, depth=2)
    state = vit_small(img_size=32, depth=2).state_dict()
    with pytest.raises(SelectionError, match=r"'norm\.weight' \(shape \(192,\)\)"):
        select_state_dict(
            {k: v for k, v in state.items() if k != "norm.weight"}, student, SelectionRecipe()
        )
    with pytest.raises(SelectionError, match="family mismatch"):
        select_state_dict(timm_model("convnext_atto").state_dict(), student, SelectionRecipe())
    with pytest.raises(SelectionError, match=r"selection\.offset=2 .* 384->192"):
        select_state_dict(state, student, SelectionRecipe(offset=2))
    with pytest.raises(SelectionError, match="selection.layers"):
        select_state_dict(state, student, SelectionRecipe(layers=[0, 5]))
    for bad in ({"layers": "every_other"}, {"elements": "best"}, {"head": "maybe"}):
        with pytest.raises(SelectionError, match="selection."):
            SelectionRecipe(**bad)


# ------------------------------------------------------------------ CLI


def compose_select(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("select", overrides=overrides)


def test_cli_writes_strictly_loadable_student_and_refuses_overwrite(tmp_path):
    teacher_file = tmp_path / "teacher.safetensors"
    save_file(vit_small(depth=4).state_dict(), str(teacher_file))  # RGB, 224 px, 4 classes
    out = tmp_path / "student.safetensors"
    overrides = [
        "teacher.source=file",
        f"teacher.file={teacher_file}",
        "teacher.depth=4",
        "model.depth=2",
        "selection.layers=uniform",
        "selection.offset=1",
        f"out={out}",
    ]
    cfg = compose_select(overrides)
    plan = run(cfg)
    student = create_model(cfg.model, num_classes=4, in_chans=1, img_size=64)
    student.load_state_dict(load_file(str(out)), strict=True)
    assert plan.teacher_blocks == {"blocks": [0, 3]} and not plan.head_reinitialised
    as_json = json.loads(json.dumps(plan.to_dict()))
    assert read_selection_plan(out) == as_json == json.loads(Path(f"{out}.plan.json").read_text())

    before = out.read_bytes()
    proc = run_module("dwskd.select", *overrides, cwd=tmp_path, PYTHONPATH=str(ROOT))
    assert proc.returncode != 0 and "refusing to overwrite" in proc.stderr + proc.stdout
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.safetensors",
        "student.safetensors.plan.json",
        "teacher.safetensors",
    ]  # nothing littered: no outputs/, .hydra/ or log


@pytest.mark.parametrize("head", ["reinit", "match"])
def test_cli_loads_the_teacher_as_a_run_does(head, tmp_path):
    """dwskd-select and the run share one teacher loader: head=reinit and head=match work."""
    from dwskd.models import load_teacher

    teacher_file = tmp_path / "teacher.safetensors"
    labels = ["lung_COVID", "lung_NonCOVID", "brain_glioma", "brain_notumor"]
    source = vit_small(depth=4)
    save_file(source.state_dict(), str(teacher_file), metadata={"label_names": json.dumps(labels)})
    overrides = [
        "teacher.source=file",
        f"teacher.file={teacher_file}",
        "teacher.depth=4",
        f"teacher.head={head}",
        "model.depth=2",
        "num_classes=2",
        "class_names=[NonCOVID,COVID]",
        f"out={tmp_path / 'student.safetensors'}",
    ]
    cfg = compose_select(overrides)
    plan = run(cfg)
    shape = dict(num_classes=2, in_chans=1, img_size=64)
    teacher, report = load_teacher(cfg.teacher, **shape, class_names=["NonCOVID", "COVID"])
    assert report.changed and report.trained == (head == "match")
    assert plan.head_reinitialised == (head == "reinit")
    if head == "match":
        assert report.rows == (1, 0) and report.how == "matched rows of the source head"
        assert torch.equal(teacher.head.weight, source.head.weight[[1, 0]])
    else:
        assert report.how == "re-initialised"


# ------------------------------------------------------------------ function and speed


def stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes of noisy 32x32 gratings; the class is the orientation (0, 45, 90, 135 deg)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    angle = y * math.pi / 4 + (torch.rand(n, generator=g) - 0.5) * 0.3
    freq, phase = 0.5 + 0.3 * torch.rand(n, generator=g), 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    proj = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]
    x = torch.sin(proj * freq[:, None, None] + phase[:, None, None])
    return (x + 0.8 * torch.randn(n, 32, 32, generator=g))[:, None], y


def small_vit(width: int, depth: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"patch_size": 8, "img_size": 32, "in_chans": 1, "embed_dim": width, "depth": depth}
    return timm_model(**kwargs)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(32):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def test_selected_student_beats_random_init():
    x, y = stripes(256, seed=0)
    x_test, y_test = stripes(256, seed=1)
    teacher = small_vit(192, depth=3, seed=0)
    fit(teacher, x, y, epochs=4, lr=1e-3)
    selected, scratch = small_vit(96, depth=2, seed=1), small_vit(96, depth=2, seed=1)
    initialize_from_teacher(selected, teacher, SelectionRecipe(layers="uniform"))
    before = accuracy(selected, x_test, y_test), accuracy(scratch, x_test, y_test)
    for model in (selected, scratch):
        fit(model, x[:128], y[:128], epochs=1, lr=5e-4)
    after = accuracy(selected, x_test, y_test), accuracy(scratch, x_test, y_test)
    print(
        f"\nteacher {accuracy(teacher, x_test, y_test):.3f}; selected vs random init: "
        f"before training {before[0]:.3f} vs {before[1]:.3f}, "
        f"after one short epoch {after[0]:.3f} vs {after[1]:.3f}"
    )
    assert before[0] > before[1] and after[0] > after[1]


@pytest.mark.parametrize(
    ("teacher_name", "student_name"),
    [
        ("vit_base_patch16_224", "vit_tiny_patch16_224"),
        ("convnext_tiny", "convnext_atto"),
    ],
)
def test_selection_time_from_large_teachers(teacher_name, student_name):
    teacher, student = timm_model(teacher_name, num_classes=1000), timm_model(student_name)
    state = teacher.state_dict()
    start = time.perf_counter()
    selected, plan = select_state_dict(state, student, SelectionRecipe(elements="random"))
    seconds = time.perf_counter() - start
    print(f"\n{teacher_name} -> {student_name}: selection {seconds:.2f} s")
    student.load_state_dict(selected, strict=True)
    assert plan.head_reinitialised
