"""model.compile: students trained through torch.compile, checkpoints and exports keep plain keys.

Inductor works on this CPU but compiling a ViT costs ~35 s, so these tests give
``torch.compile`` a backend that runs the captured graph as is: the same Dynamo tracing and
the same ``OptimizedModule`` wrappers (the source of ``_orig_mod.`` keys), no code generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

from dwskd.distill import DistillOptions
from dwskd.models import create_model
from dwskd.module import DistillModule
from dwskd.pipeline import run_pipeline
from tests.conftest import compose_config

TINY_VIT = {"name": "vit_tiny_patch16_224", "family": "vit", "depth": 1}


@dataclass
class CompileCalls:
    modules: list[torch.nn.Module] = field(default_factory=list)  # passed to torch.compile
    graphs: int = 0  # graphs Dynamo captured from them (their forward really ran compiled)


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> CompileCalls:
    """Record what torch.compile gets; compile it with a counting, code-generation-free backend."""
    calls = CompileCalls()
    real = torch.compile

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        calls.graphs += 1
        return graph.forward

    def record(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        calls.modules.append(model)
        return real(model, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", record)
    return calls


def test_every_model_config_has_compile_off_by_default() -> None:
    for model in sorted(p.stem for p in (Path(__file__).parent.parent / "conf/model").glob("*")):
        assert compose_config(f"model={model}").model.compile is False, model


def test_compiled_module_trains_and_checkpoints_plain_keys(
    compiled: CompileCalls, tmp_path: Path, one_thread: None
) -> None:
    students = [create_model(TINY_VIT, num_classes=3, in_chans=1, img_size=32) for _ in range(2)]
    keys = set(students[0].state_dict())
    module = DistillModule(
        students,
        stage="train",
        class_names=["a", "b", "c"],
        options=DistillOptions(alpha=1.0, beta=1.0),
        optimizer=torch.optim.AdamW,
        lr=1e-3,
        compile_students=True,
    )
    data = TensorDataset(torch.randn(8, 1, 32, 32), torch.randint(0, 3, (8,)))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = students[0].blocks[0].attn.qkv.weight.detach().clone()
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert compiled.modules == students and compiled.graphs > 0  # not the EMA copies
    assert not torch.equal(before, students[0].blocks[0].attn.qkv.weight)  # it trained
    assert all(type(s) is type(module.ema[0]) for s in module.students)  # students stay eager
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    assert {k.removeprefix("students.0.") for k in state if k.startswith("students.0.")} == keys


@pytest.mark.slow  # a whole compiled pipeline: make test-full
def test_model_compile_pipeline_exports_plain_keys(
    compiled: CompileCalls, tmp_path: Path, one_thread: None
) -> None:
    overrides = ("method=scratch", "method.epochs.finetune=1", "eval.latency=false")
    cfg = compose_config(*overrides, "model.compile=true")
    results = run_pipeline(cfg, tmp_path)
    assert len(compiled.modules) == 2 and compiled.graphs > 0  # train and fine-tune stages
    weights = sorted((tmp_path / "exports").rglob("*.safetensors"))
    assert weights, list(tmp_path.rglob("*"))
    for path in weights:
        with safe_open(path, "pt") as f:
            assert not [k for k in f.keys() if "_orig_mod" in k], path
    assert results["models"]["student_a"]["test"]["acc"] >= 0
