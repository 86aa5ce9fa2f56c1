"""Self-describing model folders in timm's own format: what a run hands to the outside world.

A folder holds ``model.safetensors`` and a ``config.json`` written by timm's ``save_for_hf``:
architecture and its arguments (``model_args``), and a ``pretrained_cfg`` with the input size,
channels, mean/std, interpolation and label names the model was trained with, plus a
``dwskd`` block (run, command, data, metrics). ``timm.create_model("local-dir:<folder>",
pretrained=True)`` rebuilds the model with its weights; ``timm.data.resolve_data_config``
then gives its preprocessing. dwskd's own preprocessing (:func:`preprocessing_of`) resizes
with area averaging and squashes to a square, which timm names ``box`` / ``squash``; a model
trained with ``data.standardize=true`` has ``"standardize": true`` in config.json: each image
then goes to zero mean / unit std over its own pixels instead of the recorded mean/std.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ExportError(ValueError):
    """A folder that is not a dwskd/timm model folder; the message says what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a model: what training and evaluation used."""

    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...]
    # Each image to zero mean / unit std over its own pixels instead of ``mean``/``std``
    # (``data.standardize``); config.json's top-level ``standardize``, absent in older exports.
    standardize: bool = False

    def data_config(self) -> dict[str, Any]:
        """timm's data config for it (``resolve_data_config`` returns these values)."""
        return {
            "input_size": (self.in_chans, self.img_size, self.img_size),
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": "box",  # area averaging when shrinking, as dwskd resizes
            "crop_pct": 1.0,
            "crop_mode": "squash",  # the whole image, squashed to a square: no crop
        }


def write_model_folder(
    folder: Path,
    model: Any,
    preprocessing: Preprocessing,
    provenance: Mapping[str, Any],
    weights: Path | None = None,
) -> Path:
    """Write ``folder`` (weights + timm config.json with dwskd provenance), atomically.

    ``weights``: an existing safetensors file holding exactly ``model.state_dict()`` (a run's
    stage export); it is hard-linked instead of written again, so an export costs no disk.
    """
    from timm.models import save_for_hf

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model_config = {
            "label_names": list(preprocessing.label_names),
            "standardize": preprocessing.standardize,
            "dwskd": dict(provenance),
        }
        save_for_hf(
            model,
            str(tmp),
            model_config=model_config,
            safe_serialization=True,
            data_config=preprocessing.data_config(),
        )
        _drop_source_fields(tmp / CONFIG_FILE)
        if weights is not None and Path(weights).is_file():
            (tmp / WEIGHTS_FILE).unlink()
            _link_or_copy(Path(weights), tmp / WEIGHTS_FILE)
        else:  # safetensors wrote it 0600: give it the mode of any new file
            from dwskd.io import new_file_mode

            os.chmod(tmp / WEIGHTS_FILE, new_file_mode())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _drop_source_fields(config_path: Path) -> None:
    """timm copies the architecture's hub tag and licence; they do not describe these weights."""
    config = json.loads(config_path.read_text())
    for key in ("tag", "license", "hf_hub_id", "url"):
        config["pretrained_cfg"].pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def holds_state_of(path: Path | None, model: Any) -> bool:
    """Whether a safetensors file has exactly ``model``'s state-dict keys, dtypes and shapes.

    Why: a teacher loaded unchanged from another run's export (a file reference) can then be
    hard-linked into this run's exports instead of written again (85 MB per ViT-S); a file
    that needed adapting (float16, other channels or keys) does not pass and is written.
    """
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    state = model.state_dict()
    with safe_open(str(path), "pt") as f:
        if set(f.keys()) != set(state):
            return False
        for key, tensor in state.items():
            stored = f.get_slice(key)
            if list(stored.get_shape()) != list(tensor.shape):
                return False
            if stored.get_dtype() != _SAFETENSORS_DTYPES.get(str(tensor.dtype)):
                return False
    return True


# torch dtype (as str) -> the dtype name safetensors stores in its header
_SAFETENSORS_DTYPES = {
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.bool": "BOOL",
}


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


DAMAGED = (
    "the file is truncated or damaged. Copy the model folder again from the run it came from "
    "(<run dir>/exports/<model>/)."
)


def read_config(folder: Path, option: str = "model") -> dict[str, Any]:
    """The folder's config.json; a clear error when the folder is not a model folder."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        raise ExportError(
            f"{option}={folder} is not a model folder (no {CONFIG_FILE} + {WEIGHTS_FILE}). Give "
            "a finished run dir or one of its exports/<model>/ folders."
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path} is not valid JSON ({err}): {DAMAGED}") from err
    if not isinstance(config, dict):
        raise ExportError(f"{path} holds a JSON {type(config).__name__}, not a config: {DAMAGED}")
    return config


def preprocessing_of(config: Mapping[str, Any]) -> Preprocessing:
    """The preprocessing recorded in a model folder's config."""
    cfg = config["pretrained_cfg"]
    channels, height, width = cfg["input_size"]
    if height != width:
        raise ExportError(
            f"input_size {cfg['input_size']} is not square; dwskd squashes to one size"
        )
    return Preprocessing(
        in_chans=int(channels),
        img_size=int(height),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        label_names=tuple(config.get("label_names") or cfg.get("label_names") or ()),
        standardize=bool(config.get("standardize", False)),
    )


def load_model_folder(folder: Path, option: str = "model") -> tuple[Any, dict[str, Any]]:
    """The model (eval mode, weights loaded by timm) and the folder's config."""
    import timm

    config = read_config(folder, option)
    check_config_matches_weights(Path(folder), config)
    model = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True)
    return model.eval(), config


def check_config_matches_weights(folder: Path, config: Mapping[str, Any]) -> None:
    """Refuse a config.json whose class or channel counts differ from the weights beside it.

    Why: timm builds the model from config.json and, when the head's size differs from the
    weights', silently starts from a random head: a mixed-up folder would load, exit 0 and
    predict garbage (and extra label_names give CSV headers without values).
    """
    weights = folder / WEIGHTS_FILE
    shapes = weight_shapes(weights)
    cfg = config.get("pretrained_cfg") or {}
    found = {
        "output classes": _weight_dim(shapes, cfg.get("classifier"), axis=0, ndim=2),
        "input channels": _weight_dim(shapes, cfg.get("first_conv"), axis=1, ndim=4),
    }
    for what, claim, value in declared_sizes(config):
        if found[what] is None or value == found[what][0]:
            continue
        actual, key, shape = found[what]
        raise ExportError(
            f"{folder / CONFIG_FILE} does not match its weights: it says {claim}, but "
            f"{weights} has {actual} {what} ({key} of shape {shape}). config.json and "
            f"{WEIGHTS_FILE} must come from the same export: copy the model folder again from "
            f"its run (<run dir>/exports/<model>/), or correct config.json to {actual} {what}."
        )


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape, from the safetensors header only; a damaged file is named."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as err:
        raise ExportError(f"{path} is not a readable safetensors file ({err}): {DAMAGED}") from err


def declared_sizes(config: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(what, as config.json says it, value) for every class and channel count it records."""
    args, cfg = config.get("model_args") or {}, config.get("pretrained_cfg") or {}
    fields = [
        ("output classes", "num_classes", config.get("num_classes")),
        ("output classes", "model_args.num_classes", args.get("num_classes")),
        ("output classes", "pretrained_cfg.num_classes", cfg.get("num_classes")),
        ("input channels", "model_args.in_chans", args.get("in_chans")),
        ("input channels", "pretrained_cfg.input_size[0]", (cfg.get("input_size") or [None])[0]),
    ]
    sizes = [(what, f"{field}={v}", int(v)) for what, field, v in fields if v is not None]
    for field, owner in (("label_names", config), ("pretrained_cfg.label_names", cfg)):
        if owner.get("label_names"):
            count = len(owner["label_names"])
            sizes.append(("output classes", f"{count} {field}", count))
    return sizes


def _weight_dim(
    shapes: Mapping[str, list[int]], modules: Any, axis: int, ndim: int
) -> tuple[int, str, list[int]] | None:
    """(size, key, shape) of the first ``<module>.weight`` of rank ``ndim``; None if absent.

    ``modules``: timm's ``classifier`` / ``first_conv`` name, or a list of them.
    """
    for name in [modules] if isinstance(modules, str) else list(modules or []):
        shape = shapes.get(f"{name}.weight")
        if shape is not None and len(shape) == ndim:
            return shape[axis], f"{name}.weight", shape
    return None


def label_names(config: Mapping[str, Any]) -> Sequence[str]:
    return list(config.get("label_names") or [])


def resolve_model_folder(path: Path, model_name: str | None = None, option: str = "model") -> Path:
    """``model=`` of the commands: a model folder, or a finished run dir (+ ``model_name``).

    A run dir gives its deployed model unless ``model_name`` (student_a, student_b,
    teacher) names another of ``<run dir>/exports/``. A model folder is its own model:
    ``model_name`` naming that model is accepted, another one refused (it would be ignored).
    """
    from dwskd.rundir import RunLayout, read_results

    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        if model_name is None or model_name == _folder_model(path):
            return path
        raise ExportError(_model_name_on_folder(path, model_name, option))
    layout = RunLayout(path)
    if not layout.finished:
        raise ExportError(
            f"{option}={path} is neither a model folder ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a "
            "finished dwskd run dir (metrics.json). Point it at one of those."
        )
    results = read_results(path)
    name = model_name or results["deployed"]
    folder = layout.export_dir(name)
    if not (folder / CONFIG_FILE).is_file():
        raise ExportError(_missing_export(layout, name, results, option))
    return folder


def _folder_model(folder: Path) -> str:
    """The model a folder holds (``student_a`` ...): its config's dwskd.model, else its name."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return str(json.loads((folder / CONFIG_FILE).read_text())["dwskd"]["model"])
    return folder.name


def _model_name_on_folder(folder: Path, model_name: str, option: str) -> str:
    sibling = folder.parent / model_name
    instead = (
        f"{option}={sibling}"
        if (sibling / CONFIG_FILE).is_file()
        else f"{option}=<run dir> model_name={model_name}"
    )
    return (
        f"{option}={folder} is already a model folder (of '{_folder_model(folder)}'); "
        f"model_name= picks a model of a run dir. Drop model_name={model_name}, or give "
        f"{instead}."
    )


def _missing_export(layout: Any, name: str, results: Mapping[str, Any], option: str) -> str:
    """Why a finished run has no ``exports/<name>/``: deleted, never made, or another name."""
    exports = layout.exports_dir
    found = sorted(p.name for p in exports.iterdir()) if exports.is_dir() else []
    made = sorted((results.get("run") or {}).get("exports") or {})  # what the run exported
    where = f"{option}={layout.root}"
    if not found and not made:
        return f"{where} has no exports/: an older dwskd made this run."
    recover = (
        "Copy it back from the original run dir (or a backup), or point "
        f"{option}= at another finished run or an exports/<model>/ folder."
    )
    if not exports.is_dir():
        return (
            f"{where} is a finished run whose exports/ folder is missing (deleted, or the run "
            f"was copied without it; the run made {made}). {recover}"
        )
    if name in made and name not in found:
        others = f" Or use model_name= one of {found}." if found else ""
        return f"{where} is missing exports/{name}/, which the run made. {recover}{others}"
    return f"{where} has no export '{name}'; use model_name= one of {found or made}."
