"""Weights files (one loader, weights_only), input-size check, latency, provenance."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from dwskd import machine, models
from dwskd.models import (
    ModelConfigError,
    check_input_size,
    load_weights_file,
    measure_latency,
    read_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
EXTENSIONS = ("safetensors", "pth", "ckpt")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests.conftest.one_thread)."""


def tiny_vit(seed: int = 0, **kwargs) -> nn.Module:
    """A 2-block ViT-T on 32 px grey images, every tensor distinct (timm's init has constants)."""
    kwargs = {"depth": 2, "img_size": 32, "in_chans": 1, "num_classes": 3, **kwargs}
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def assert_same_weights(model: nn.Module, source: nn.Module) -> None:
    got, want = model.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


class DwskdLike(nn.Module):
    """The attribute layout of dwskd's LightningModule: ``students``, ``ema``, ``teacher``."""

    def __init__(self, students: list[nn.Module], teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)
        self.ema = nn.ModuleList(tiny_vit(seed=100 + i) for i in range(len(students)))
        if teacher is not None:
            self.teacher = teacher


def save_dwskd_ckpt(path: Path, container: nn.Module) -> Path:
    state = {k: v for k, v in container.state_dict().items()}
    hparams = {"lr": 1e-3, "names": ["student_a"]}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 1}, path)
    return path


def save_weights(path: Path, model: nn.Module) -> Path:
    """``model`` as the file kind its suffix names (a dwskd-like .ckpt for ``.ckpt``)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".ckpt":
        save_dwskd_ckpt(path, DwskdLike([model], teacher=tiny_vit(seed=7)))
    else:
        torch.save(state, path)
    return path


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("ext", [*EXTENSIONS, "pt", "bin"])
def test_weights_file_round_trip(ext: str, tmp_path: Path) -> None:
    source = tiny_vit(seed=1)
    path = save_weights(tmp_path / f"weights.{ext}", source)
    target = tiny_vit(seed=2)
    assert load_weights_file(target, path) is False  # same label space: head kept
    assert_same_weights(target, source)


def test_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    source = tiny_vit(seed=1)
    wrapped = {f"model._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "lightning_wrapper.ckpt")
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pth")
    for name in ("lightning_wrapper.ckpt", "ddp.pth"):
        target = tiny_vit(seed=2)
        load_weights_file(target, tmp_path / name)
        assert_same_weights(target, source)


def test_dwskd_ckpt_loads_its_one_student_not_ema_or_teacher(tmp_path: Path) -> None:
    student = tiny_vit(seed=1)
    container = DwskdLike([student], teacher=tiny_vit(seed=9))
    path = save_dwskd_ckpt(tmp_path / "teacher_stage.ckpt", container)
    assert {k.split(".")[0] for k in container.state_dict()} == {"students", "ema", "teacher"}
    state = read_state_dict(path)
    assert state.keys() == student.state_dict().keys()
    assert torch.equal(state["head.weight"], student.state_dict()["head.weight"])
    assert not torch.equal(state["head.weight"], container.ema[0].state_dict()["head.weight"])


def test_dwskd_ckpt_with_two_students_is_refused(tmp_path: Path) -> None:
    path = save_dwskd_ckpt(tmp_path / "last.ckpt", DwskdLike([tiny_vit(1), tiny_vit(2)]))
    with pytest.raises(ModelConfigError) as err:
        load_weights_file(tiny_vit(), path)
    message = str(err.value)
    for prefix in ("students.0.", "students.1.", "ema.0.", "ema.1."):
        assert prefix in message
    assert "teacher.file" in message and str(path) in message
    assert "student_a.safetensors" in message


def test_real_lightning_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    """A genuine Lightning 2.x file (callbacks, optimizer, loops, OmegaConf/Path hparams)."""
    import lightning as L
    from omegaconf import OmegaConf

    class TinyModule(L.LightningModule):
        def __init__(self, cfg, out_dir: Path) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.students = nn.ModuleList([tiny_vit(seed=1).train()])
            self.ema = nn.ModuleList([tiny_vit(seed=2).train()])

        def training_step(self, batch, _index):
            x, y = batch
            return nn.functional.cross_entropy(self.students[0](x), y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.students.parameters(), lr=1e-3)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}

    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 0]))
    module = TinyModule(OmegaConf.create({"model": {"depth": 2}, "lr": 1e-3}), tmp_path)
    trainer = L.Trainer(
        max_steps=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "genuine.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, map_location="cpu", weights_only=False)  # our own file: inspect it
    assert {"hyper_parameters", "callbacks", "optimizer_states", "loops"} <= raw.keys()
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    assert "omegaconf.dictconfig.DictConfig" in unsafe  # torch alone would refuse this file
    target = tiny_vit(seed=3)
    load_weights_file(target, path)
    assert_same_weights(target, module.students[0])


# ------------------------------------------------------------------------ broken files
def broken_bytes(kind: str, ext: str, tmp_path: Path) -> bytes:
    if kind == "empty":
        return b""
    if kind == "garbage":
        return random.Random(0).randbytes(4096)
    valid = save_weights(tmp_path / f"valid.{ext}", tiny_vit()).read_bytes()
    if kind == "truncated":
        return valid[: len(valid) // 2]
    other = "pth" if ext == "safetensors" else "safetensors"  # "foreign": another format
    return save_weights(tmp_path / f"other.{other}", tiny_vit()).read_bytes()


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "foreign"])
@pytest.mark.parametrize("ext", EXTENSIONS)
def test_broken_file_is_one_clear_error(ext: str, kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"teacher.{ext}"
    path.write_bytes(broken_bytes(kind, ext, tmp_path))
    with pytest.raises(ModelConfigError) as err:
        load_weights_file(tiny_vit(), path)
    message = str(err.value)
    assert "teacher.file" in message and str(path) in message
    assert "Re-export it, or point teacher.file at a .safetensors/.pth/.ckpt" in message


@pytest.mark.parametrize("content", [[1, 2, 3], torch.zeros(3), {"epoch": 1}, {"model": "x"}])
def test_file_without_state_dict_is_refused(content, tmp_path: Path) -> None:
    path = tmp_path / "not_weights.pth"
    torch.save(content, path)
    with pytest.raises(ModelConfigError, match=r"teacher\.file=.*not_weights\.pth"):
        read_state_dict(path)


class Payload:
    """Unpickling this creates ``marker``: stands for any code a hostile file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("ext", ["pth", "ckpt"])
def test_pickled_code_is_never_run(ext: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / f"hostile.{ext}"
    state = {k: v for k, v in tiny_vit().state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": Payload(marker)}, path)
    with pytest.raises(ModelConfigError, match="weights_only=True") as err:
        read_state_dict(path, option="model.file")
    assert not marker.exists()
    assert "model.file" in str(err.value) and "io.open" in str(err.value)  # what it would call
    torch.load(path, weights_only=False)  # the payload is live: a plain pickle load runs it
    assert marker.exists()


def test_missing_file_names_the_file_a_run_writes(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError) as err:
        read_state_dict(tmp_path / "nope.safetensors")
    assert "teacher.file=" in str(err.value)
    assert "<run dir>/stages/teacher/teacher.safetensors" in str(err.value)


def test_other_architecture_does_not_fit(tmp_path: Path) -> None:
    path = save_weights(tmp_path / "wide.safetensors", tiny_vit(embed_dim=96, num_heads=3))
    with pytest.raises(ModelConfigError, match="does not fit"):
        load_weights_file(tiny_vit(), path)


# ------------------------------------------------------------------------ input size
def changes_output(model: nn.Module, size: int, rows: slice) -> bool:
    """Does the output move when only image rows ``rows`` change?"""
    x = torch.randn(1, 1, size, size)
    y = x.clone()
    y[..., rows, :] += 5
    with torch.no_grad():
        return not torch.equal(model.eval()(x), model(y))


def test_vit_ignores_the_border_that_check_input_size_refuses() -> None:
    vit40 = tiny_vit(img_size=40)
    assert not changes_output(vit40, 40, slice(32, 40))  # the premise: rows 32..39 unseen
    with pytest.raises(ModelConfigError) as err:
        check_input_size(vit40, 40)
    message = str(err.value)
    assert "data.img_size=40" in message and "16x16" in message and "36%" in message
    assert "use data.img_size=32 or 48" in message.lower()


def test_valid_sizes_and_cnns_pass() -> None:
    vit = tiny_vit()
    for size in (32, 48, 64):
        check_input_size(vit, size)
    with pytest.raises(ModelConfigError, match=r"model\.img=16\."):
        check_input_size(vit, 8, option="model.img")  # below one patch: only the size above
    convnext = timm.create_model("convnext_atto", in_chans=1, num_classes=3)
    assert changes_output(convnext, 40, slice(32, 40))  # 40 px is not a multiple of 32, yet seen
    check_input_size(convnext, 40)


# ------------------------------------------------------------------------ latency
def test_measure_latency_reports_spread_and_threads() -> None:
    model = tiny_vit().train()
    result = measure_latency(model, in_chans=1, img_size=32, batch_size=2, min_run_time=0.05)
    assert result["median_ms"] > 0 and result["iqr_ms"] >= 0
    assert result["threads"] == torch.get_num_threads() == 1
    assert result["batch_size"] == 2 and result["runs"] >= result["blocks"] >= 1
    assert result["device"] == "cpu"
    assert model.training  # training mode restored
    assert (
        measure_latency(model, in_chans=1, img_size=32, min_run_time=0.01, threads=2)["threads"]
        == 2
        and torch.get_num_threads() == 1
    )


# ------------------------------------------------------------------------ provenance
def test_package_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = machine.package_versions()
    assert set(machine.PACKAGES) == set(versions)
    assert torch.__version__.split("+")[0] == versions["torch"].split("+")[0]
    assert versions["timm"] == timm.__version__
    monkeypatch.setattr(machine, "PACKAGES", ("no-such-distribution-xyz",))
    assert machine.package_versions() == {"no-such-distribution-xyz": None}


def test_git_commit_of_this_checkout() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    info = machine.git_commit()
    assert info is not None and re.fullmatch(r"[0-9a-f]{40}", info["commit"])
    assert isinstance(info["dirty"], bool)


def test_git_commit_outside_a_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(machine, "__file__", str(tmp_path / "machine.py"))
    assert machine.git_commit() is None
    monkeypatch.setattr(machine.shutil, "which", lambda _name: None)
    assert machine.git_commit() is None


def test_tiny_vit_seeds_give_distinct_weights() -> None:
    """tiny_vit's seed gives distinct weights (the round trips above would pass vacuously)."""
    a, b = tiny_vit(seed=1), copy.deepcopy(tiny_vit(seed=2))
    assert not torch.equal(a.state_dict()["head.weight"], b.state_dict()["head.weight"])


def test_head_match_keeps_the_rows_of_the_tasks_classes(tmp_path: Path) -> None:
    """A union teacher (lung_COVID, ...) keeps its COVID / NonCOVID rows for the lung task."""
    labels = ["brain_glioma", "chest_NORMAL", "lung_COVID", "lung_NonCOVID"]
    source = tiny_vit(num_classes=4)
    path = tmp_path / "union.safetensors"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path), metadata={"label_names": json.dumps(labels)})
    assert models.matched_rows(labels, ["COVID", "NonCOVID"]) == [2, 3]
    student_task = tiny_vit(seed=1, num_classes=2)
    rows = models.load_matched_head(student_task, path, ["COVID", "NonCOVID"])
    assert rows == [2, 3]
    assert torch.equal(student_task.head.weight, source.head.weight[[2, 3]])
    assert torch.equal(student_task.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    with pytest.raises(models.ModelConfigError, match="matches 0 teacher labels"):
        models.load_matched_head(tiny_vit(num_classes=2), path, ["cat", "dog"])
    unlabelled = tmp_path / "plain.safetensors"
    save_file(state, str(unlabelled))
    with pytest.raises(models.ModelConfigError, match="needs the label names"):
        models.load_matched_head(tiny_vit(num_classes=2), unlabelled, ["COVID", "NonCOVID"])


def test_results_a_sweep_archives_do_not_make_the_code_dirty(tmp_path: Path) -> None:
    """A sweep writes experiments/results/ while it runs; its runs' code is still clean."""
    import importlib.util
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "dwskd").mkdir(parents=True)
    shutil.copy(machine.__file__, repo / "dwskd" / "machine.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    spec = importlib.util.spec_from_file_location("copied_machine", repo / "dwskd" / "machine.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    (repo / "experiments" / "results" / "runs").mkdir(parents=True)
    (repo / "experiments" / "results" / "runs" / "metrics.json").write_text("{}")
    assert copied.git_commit()["dirty"] is False
    (repo / "dwskd" / "new.py").write_text("")
    assert copied.git_commit()["dirty"] is True
