"""experiments.bench: the device option, its defaults and the torch.compile section."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch

from experiments import bench


def test_gpu_without_cuda_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "gpu", "--smoke"])
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message  # printed as is: no traceback
    assert "--device gpu" in message and "--device cpu" in message and "CUDA" in message


def test_each_device_has_its_defaults_and_its_own_results_file() -> None:
    cpu, gpu = bench.settings_for("cpu", smoke=False), bench.settings_for("gpu", smoke=False)
    assert cpu == bench.BenchSettings() and (cpu.img_size, cpu.batch_size) == (64, 32)
    assert (gpu.device, gpu.precision, gpu.img_size, gpu.batch_size) == (
        "gpu",
        "16-mixed",
        224,
        128,
    )
    assert gpu.latency_batches == (1, 128)
    assert bench.default_out(cpu, smoke=False).name == "bench.md"
    assert bench.default_out(gpu, smoke=False).name == "bench_gpu224.md"
    smoke = bench.settings_for("gpu", smoke=True)
    assert smoke.device == "gpu" and smoke.img_size == bench.SMOKE.img_size
    assert bench.default_out(smoke, smoke=True).name == "bench_gpu32_smoke.md"


@pytest.mark.slow  # torch.compile of the bench: make test-full
def test_compile_section_compares_compiled_and_eager_steps(
    monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """Wiring only: the eager backend stands in for inductor (~35 s per ViT on this CPU)."""
    calls = []
    real = functools.partial(torch.compile, backend="eager")
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(m) or real(m, **kw))
    section = bench.compile_section(replace(bench.SMOKE, steps=1))
    assert len(calls) == 1  # the compiled run's one student; the eager run compiles nothing
    assert [what for what, _, _ in section.rows] == [
        "eager: first step (compilation included)",
        "eager: step after 1 warm-up steps",
        "compiled: first step (compilation included)",
        "compiled: step after 1 warm-up steps",
    ]
    ((ratio, value),) = section.ratios
    assert ratio == "compiled / eager step (one student)" and value > 0


def test_sweep_throughput_table_compares_the_two_launches() -> None:
    from experiments.sweep_throughput import markdown, sides

    one, two = sides(2)
    assert one.overrides == () and two.threads == 1
    assert two.overrides == ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    text = markdown([(one, 600.0, 10), (two, 400.0, 10)], "python -m experiments.sweep_throughput")
    assert "| 10 | 10.0 min | 60.0 | 1.00x |" in text
    assert "| 10 | 6.7 min | 90.0 | 1.50x |" in text
    assert f"Faster here: **{two.label}**" in text


def test_a_results_file_section_is_replaced_and_the_rest_kept(tmp_path) -> None:
    """bench.md has two writers: each replaces only its own marked section."""
    from experiments.common import owned_sections, write_section

    path = tmp_path / "bench.md"
    write_section(path, "sweep-throughput", "## Sweep throughput\nold figures")
    assert path.read_text().startswith("<!-- section: sweep-throughput -->\n## Sweep")
    path.write_text("# bench\n\nstep timings\n\n" + "".join(owned_sections(path)))
    write_section(path, "other", "## Other\nkept")
    write_section(path, "sweep-throughput", "## Sweep throughput\nnew figures")
    text = path.read_text()
    assert text.startswith("# bench\n\nstep timings\n")
    assert "new figures" in text and "old figures" not in text
    assert text.count("<!-- section: sweep-throughput -->") == 1 and "## Other\nkept" in text
    assert [s.splitlines()[0] for s in owned_sections(path)] == [
        "<!-- section: other -->",
        "<!-- section: sweep-throughput -->",
    ]


def test_depth_section_gives_each_depths_parameters_and_latency(one_thread: None) -> None:
    section = bench.depth_section(bench.SMOKE)
    params = {w: v for w, v, unit in section.rows if unit == "M"}
    assert list(params) == [f"depth {d}, parameters" for d in bench.DEPTHS]
    assert list(params.values()) == sorted(params.values())  # more blocks, more weights
    # each ViT-T block holds 12 * 192**2 + 13 * 192 weights (qkv, proj, mlp, norms, biases)
    block = 12 * 192**2 + 13 * 192
    assert params["depth 6, parameters"] - params["depth 4, parameters"] == pytest.approx(
        2 * block / 1e6
    )
    timed = [w for w, _, unit in section.rows if unit == "ms"]
    assert len(timed) == len(bench.DEPTHS) * len(bench.SMOKE.latency_batches)
    assert [r for r, _ in section.ratios][:2] == [
        "depth 4 / depth 12, batch 1",
        "depth 4 / depth 12, batch 4",
    ]
