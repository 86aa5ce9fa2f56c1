"""``dwskd.export``: ONNX / TorchScript / torch.export files that compute what PyTorch computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwskd import export, model_folder
from tests.conftest import REPO

PREPROCESSING = model_folder.Preprocessing(
    in_chans=1, img_size=32, mean=(0.45,), std=(0.22,), label_names=("normal", "nodule", "mass")
)
PROVENANCE = {"model": "student_a", "deployed": True, "method": "dwskd", "seed": 7}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run dir as far as exports go: metrics.json naming the deployed model + its folder."""
    import timm

    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", depth=2, img_size=32, in_chans=1, num_classes=3
    )
    model_folder.write_model_folder(
        root / "exports" / "student_a", model, PREPROCESSING, PROVENANCE
    )
    (root / "metrics.json").write_text(json.dumps({"deployed": "student_a"}))
    return root


@pytest.fixture(scope="module")
def folder(run_dir: Path) -> Path:
    return run_dir / "exports" / "student_a"


@pytest.fixture(scope="module")
def onnx_export(run_dir: Path) -> dict:
    pytest.importorskip("onnxruntime")
    return export.export_model(run_dir, run_dir.parent / "out" / "student.onnx", fmt="onnx")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(logits).float().softmax(-1)


def test_onnx_matches_pytorch_on_any_batch_size(onnx_export: dict, folder: Path) -> None:
    import onnxruntime

    assert onnx_export["model_folder"] == str(folder)  # the run dir's deployed model
    assert set(onnx_export["max_abs_dprob"]) == {4, 1}
    assert max(onnx_export["max_abs_dprob"].values()) <= export.TOLERANCE
    session = onnxruntime.InferenceSession(onnx_export["out"], providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("image", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 32, 32]  # symbolic batch
    model, _ = model_folder.load_model_folder(folder)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 32, 32)
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            expected = probabilities(model(x))
        assert (probabilities(torch.from_numpy(logits)) - expected).abs().max() <= 1e-4


def test_onnx_metadata_round_trip(onnx_export: dict, folder: Path) -> None:
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(onnx_export["out"]).metadata_props}
    config = model_folder.read_config(folder)
    assert props["preprocessing"] == export.preprocessing_metadata(config)
    assert export.preprocessing_from_metadata(props) == model_folder.preprocessing_of(config)
    assert props["preprocessing"]["interpolation"] == "box"
    assert props["provenance"]["seed"] == 7 and props["provenance"]["exported"]["opset"] == 18
    assert props["interface"]["output"] == "logits"
    assert export.read_metadata(Path(onnx_export["out"])) == props


@pytest.mark.filterwarnings(r"ignore:.*torch\.jit.* is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".pt"), ("torch_export", ".pt2")])
def test_pytorch_formats_round_trip(fmt: str, suffix: str, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / f"student{suffix}"
    written = export.export_model(folder, out, fmt=fmt)
    assert max(written["max_abs_dprob"].values()) <= export.TOLERANCE
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out), map_location="cpu")
    else:
        loaded = torch.export.load(str(out)).module()
    model, config = model_folder.load_model_folder(folder)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    meta = export.read_metadata(out)
    assert export.preprocessing_from_metadata(meta) == model_folder.preprocessing_of(config)
    assert meta["provenance"]["exported"]["format"] == fmt


def test_refuses_existing_out_wrong_suffix_and_non_model(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "student.pt"
    out.write_text("earlier result")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export.export_model(folder, out, fmt="torchscript")
    assert out.read_text() == "earlier result"
    with pytest.raises(model_folder.ExportError, match=r"must end in \.pt2"):
        export.export_model(folder, tmp_path / "student.onnx", fmt="torch_export")
    with pytest.raises(model_folder.ExportError, match="neither a model folder"):
        export.export_model(tmp_path, tmp_path / "student.ts", fmt="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt"]


def test_missing_onnx_packages_say_how_to_install(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"onnxruntime.*dwskd\[export\]"):
        export.export_model(folder, tmp_path / "student.onnx")
    assert not list(tmp_path.iterdir())


def test_failed_parity_check_writes_nothing(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def write_stub(model, example, path: Path, meta: dict, opset: int) -> None:
        path.write_bytes(b"a wrong export")

    def uniform_runner(path: Path, fmt: str):
        return lambda x: torch.zeros(len(x), 3)  # other probabilities than the model's

    monkeypatch.setitem(export.WRITERS, "torchscript", write_stub)
    monkeypatch.setattr(export, "load_runner", uniform_runner)
    with pytest.raises(export.ExportCheckError, match="Nothing was written"):
        export.export_model(folder, tmp_path / "student.pt", fmt="torchscript")
    assert not list(tmp_path.iterdir())  # neither out nor its temporary file


def test_cli_config_takes_a_path_as_model_dir(tmp_path: Path) -> None:
    """conf/ has a `model` config group; the path is `model_dir=`, a plain value."""
    from dwskd.commands import compose_command

    cfg = compose_command("export", [f"model_dir={tmp_path}", "out=a.onnx"])
    assert (cfg.model_dir, cfg.format, cfg.opset, cfg.check) == (str(tmp_path), "onnx", 18, True)


def test_help_exits_zero() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "dwskd.export", "--help"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "format=onnx|torchscript|torch_export" in done.stdout
