"""``python -m dwskd.export`` / ``dwskd-export``: a trained model as one deployable file.

Examples (``model_dir=`` is a finished run dir, giving its deployed model, or a model folder)::

    python -m dwskd.export model_dir=outputs/lung_ct/dwskd/<run> format=onnx out=student.onnx
    python -m dwskd.export model_dir=<run dir> model_name=teacher format=torch_export out=t.pt2
    python -m dwskd.export model_dir=<run dir>/exports/student_a format=torchscript out=a.pt

Every file has one input, ``image``: a float32 batch (N, C, H, W), any N, already resized
and normalised as the model was trained (its preprocessing travels inside the file), and
one output, ``logits`` (N, num_classes): apply softmax for probabilities. Inside the file,
as JSON, ``preprocessing`` (input_size, in_chans, img_size, mean, std, interpolation,
crop_mode, label_names, standardize), ``provenance`` (the run's dwskd block, model, exporter
versions) and ``interface``: ONNX ``metadata_props``; TorchScript ``_extra_files`` and
torch.export ``extra_files`` named ``<key>.json``. :func:`read_metadata` reads them back from
any format.

ONNX uses the exporter torch recommends since 2.9 (``torch.onnx.export(dynamo=True)``):
the TorchScript-based one is deprecated, and torch.export's symbolic batch dimension gives
the dynamic batch without tracing one batch size into the graph. After writing, ``check=true``
runs a random batch of 4 and one of 1 through the written file (onnxruntime for ONNX) and
PyTorch, and refuses to publish the file if max |Δprobability| exceeds ``TOLERANCE``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import importlib.metadata
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from dwskd import CONFIG_DIR, model_folder
from dwskd.commands import accept_renamed_options, plain_user_errors
from dwskd.io import atomic_write, check_writable, refuse_existing

if TYPE_CHECKING:  # torch is imported where it is used: --help and refusals stay instant
    import torch

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "torch_export": (".pt2",)}
TOLERANCE = 1e-4  # max |Δprobability| between the written file and PyTorch
CHECK_BATCHES = (4, 1)  # a batch of 1 catches a batch size traced into the graph
EXAMPLE_BATCH = 4  # export with N > 1: torch.export specialises sizes 0 and 1
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_KEYS = ("preprocessing", "provenance", "interface")
INSTALL_HINT = "pip install 'dwskd[export]' (or `make install`)"


class ExportCheckError(RuntimeError):
    """The written file does not compute what the PyTorch model computes; it was not kept."""


# ------------------------------------------------------------------------- checks first
def check_request(out: Path, fmt: str) -> None:
    """Refuse a bad request before loading anything: unknown format, wrong suffix, existing out."""
    if fmt not in FORMATS:
        raise model_folder.ExportError(f"format={fmt} is not one of {sorted(FORMATS)}.")
    if out.suffix not in FORMATS[fmt]:
        raise model_folder.ExportError(
            f"out={out} does not match format={fmt}: its name must end in "
            f"{' or '.join(FORMATS[fmt])}."
        )
    refuse_existing(out)
    check_writable(out, "out")


def require_onnx(check: bool) -> None:
    """ONNX export needs optional packages; say how to install them instead of a bare ImportError."""
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"format=onnx needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}."
        )


# ------------------------------------------------------------------------- metadata
def preprocessing_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a consumer must do to an image before the model sees it, from the folder's config."""
    pre = model_folder.preprocessing_of(config)
    data = {**pre.data_config(), **config["pretrained_cfg"]}  # what the folder says wins
    return {
        "input_size": [pre.in_chans, pre.img_size, pre.img_size],
        "in_chans": pre.in_chans,
        "img_size": pre.img_size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "interpolation": data["interpolation"],
        "crop_pct": data["crop_pct"],
        "crop_mode": data["crop_mode"],
        "label_names": list(pre.label_names),
        "standardize": pre.standardize,  # true: per-image zero mean / unit std, not mean/std
    }


def preprocessing_from_metadata(meta: Mapping[str, Any]) -> model_folder.Preprocessing:
    """The :class:`~dwskd.model_folder.Preprocessing` recorded in an exported file."""
    pre = meta["preprocessing"]
    return model_folder.Preprocessing(
        in_chans=int(pre["in_chans"]),
        img_size=int(pre["img_size"]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        label_names=tuple(pre["label_names"]),
        standardize=bool(pre.get("standardize", False)),
    )


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_metadata(
    folder: Path, config: Mapping[str, Any], fmt: str, opset: int | None
) -> dict[str, dict[str, Any]]:
    """Everything the file must carry so that it can be used and traced back without its run."""
    import torch

    provenance = {
        **dict(config.get("dwskd") or {}),
        "architecture": config.get("architecture"),
        "num_classes": config.get("num_classes"),
        "model_folder": str(Path(folder).resolve()),
        "exported": {
            "format": fmt,
            "opset": opset if fmt == "onnx" else None,
            "at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "dwskd": _version("dwskd"),
            "torch": torch.__version__,
            "timm": _version("timm"),
        },
    }
    interface = {
        "input": INPUT_NAME,
        "input_layout": "NCHW float32, resized and normalised as in preprocessing",
        "output": OUTPUT_NAME,
        "output_meaning": "logits (N, num_classes); softmax gives probabilities",
        "dynamic_batch": True,
    }
    return {
        "preprocessing": preprocessing_metadata(config),
        "provenance": provenance,
        "interface": interface,
    }


def _as_json(meta: Mapping[str, Any]) -> dict[str, str]:
    return {key: json.dumps(value, sort_keys=True) for key, value in meta.items()}


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a file written by this command (any format), parsed."""
    import torch

    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        return {key: json.loads(props[key]) for key in METADATA_KEYS if key in props}
    files = {f"{key}.json": "" for key in METADATA_KEYS}
    if path.suffix == ".pt2":
        torch.export.load(str(path), extra_files=files)
    else:
        with _quiet_torchscript():
            torch.jit.load(str(path), _extra_files=files, map_location="cpu")
    return {name[: -len(".json")]: json.loads(text) for name, text in files.items() if text}


# ------------------------------------------------------------------------- writers
@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """timm's input-size asserts become trace constants (intended: the size is fixed)."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning
        )
        yield


@contextlib.contextmanager
def _quiet_onnx_passes() -> Iterator[None]:
    """onnxscript logs every graph-optimiser rewrite at INFO, which the CLI's logging shows."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _batch_dim() -> Any:
    import torch

    return torch.export.Dim("batch", min=1)


def write_onnx(
    model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, opset: int
) -> None:
    """The dynamo exporter (torch.export graph -> ONNX); metadata goes into metadata_props."""
    import torch

    with _quiet_onnx_passes():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: _batch_dim()},),
            opset_version=opset,
            verbose=False,
        )
    program.model.metadata_props.update(_as_json(meta))
    program.model.doc_string = (
        f"dwskd classifier: {INPUT_NAME} (N, C, H, W) normalised -> {OUTPUT_NAME} (N, classes); "
        "see metadata_props 'preprocessing' and 'interface'."
    )
    program.save(str(path), external_data=False)  # one self-contained file, as out= promises


def write_torchscript(
    model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, opset: int
) -> None:
    """``torch.jit.trace`` (deprecated upstream, still what many C++/mobile runtimes load)."""
    import torch

    with _quiet_torchscript(), torch.no_grad():
        traced = torch.jit.trace(model, (example,))
        files = {f"{key}.json": text for key, text in _as_json(meta).items()}
        _save_via_memory(path, lambda f: torch.jit.save(traced, f, _extra_files=files))


def write_torch_export(
    model: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict, opset: int
) -> None:
    """``torch.export`` with a symbolic batch dimension, saved as a .pt2 archive."""
    import torch

    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    files = {f"{key}.json": text for key, text in _as_json(meta).items()}
    _save_via_memory(path, lambda f: torch.export.save(program, f, extra_files=files))


def _save_via_memory(path: Path, save: Callable[[io.BytesIO], None]) -> None:
    """Serialise into memory, then write the file from Python.

    Why: torch's archive writer aborts the whole process (SIGABRT, a 5 MB temporary file
    left) when the disk fills; a Python write raises ENOSPC, which dwskd reports and cleans up.
    """
    buffer = io.BytesIO()
    save(buffer)
    Path(path).write_bytes(buffer.getbuffer())


WRITERS = {"onnx": write_onnx, "torchscript": write_torchscript, "torch_export": write_torch_export}


# ------------------------------------------------------------------------- parity
def load_runner(path: Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The written file as a function image batch -> logits, run the way a consumer would."""
    import torch

    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    if fmt == "torchscript":
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = torch.export.load(str(path)).module()
    return module


def max_probability_differences(
    model: torch.nn.Module, runner: Callable, shape: tuple[int, int, int]
) -> dict[int, float]:
    """max |Δprobability| per batch size on random normalised inputs (fixed seed)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    diffs = {}
    for batch in CHECK_BATCHES:
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x).float().softmax(-1)
            got = torch.as_tensor(runner(x)).float().softmax(-1)
        if got.shape != expected.shape:
            raise ExportCheckError(
                f"batch {batch}: output shape {tuple(got.shape)} != {tuple(expected.shape)}"
            )
        diffs[batch] = float((got - expected).abs().max())
    return diffs


def check_parity(
    model: torch.nn.Module, path: Path, fmt: str, shape: tuple[int, int, int]
) -> dict[int, float]:
    """Compare the written file with PyTorch; print the figures; raise if over ``TOLERANCE``."""
    diffs = max_probability_differences(model, load_runner(path, fmt), shape)
    engine = "onnxruntime" if fmt == "onnx" else fmt
    figures = ", ".join(f"{d:.2e} (batch {b})" for b, d in diffs.items())
    print(f"parity {engine} vs PyTorch: max |Δprobability| = {figures}; tolerance {TOLERANCE:g}")
    worst = max(diffs, key=diffs.get)
    if not diffs[worst] <= TOLERANCE:  # also catches NaN
        raise ExportCheckError(
            f"the {fmt} file does not match PyTorch: max |Δprobability| = {diffs[worst]:.3g} > "
            f"{TOLERANCE:g} on a batch of {worst}. Nothing was written. Try another opset= or "
            "format=, or check=false to write it unchecked."
        )
    return diffs


# ------------------------------------------------------------------------- the command
def _publish(tmp: Path, out: Path) -> None:
    """Move the finished file into place without ever replacing one that appeared meanwhile."""
    refusal = f"{out} appeared while exporting; refusing to overwrite it."
    try:
        os.link(tmp, out)  # fails if out exists, even when another process just wrote it
    except FileExistsError:
        raise FileExistsError(refusal) from None
    except OSError:  # a file system without hard links: check, then rename
        if out.exists():
            raise FileExistsError(refusal) from None
        os.replace(tmp, out)


def export_model(
    model: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    model_name: str | None = None,
    opset: int = 18,
    check: bool = True,
    option: str = "model",
) -> dict[str, Any]:
    """Export the model folder (or run dir's model) to ``out``; return what was written.

    ``option``: how messages about ``model`` name it (the command's ``model_dir``)."""
    import torch

    out = Path(out).expanduser()
    check_request(out, fmt)
    if fmt == "onnx":
        require_onnx(check)
    folder = model_folder.resolve_model_folder(Path(model), model_name, option)
    net, config = model_folder.load_model_folder(folder, option)
    meta = build_metadata(folder, config, fmt, opset)
    pre = meta["preprocessing"]
    shape = (pre["in_chans"], pre["img_size"], pre["img_size"])
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=torch.Generator().manual_seed(1))
    diffs = None

    def write(tmp: Path) -> None:
        nonlocal diffs
        WRITERS[fmt](net, example, tmp, meta, opset)
        diffs = check_parity(net, tmp, fmt, shape) if check else None

    size = sum(t.numel() * t.element_size() for t in net.state_dict().values())  # about
    atomic_write(out, write, size=size, publish=_publish)
    dims = ", ".join(map(str, shape))
    print(f"wrote {out} ({fmt} of {folder}): '{INPUT_NAME}' (N, {dims}) -> '{OUTPUT_NAME}'")
    return {
        "out": str(out),
        "format": fmt,
        "model_folder": str(folder),
        "max_abs_dprob": diffs,
        "metadata": meta,
    }


def run(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra config (conf/export.yaml) as a call to :func:`export_model`."""
    return export_model(
        model=str(cfg.model_dir),
        out=cfg.out,
        fmt=cfg.format,
        model_name=cfg.model_name,
        opset=int(cfg.opset),
        check=bool(cfg.check),
        option="model_dir",
    )


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with plain_user_errors():
        run(cfg)


def main() -> None:
    """Console script ``dwskd-export``."""
    accept_renamed_options("dwskd-export")
    _hydra_main()


if __name__ == "__main__":
    main()
