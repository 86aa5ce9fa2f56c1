"""dwskd: small medical-image classifiers from one large pretrained model.

Dual-model weight selection + self-knowledge distillation. The command-line tools are
``dwskd`` (train: :mod:`dwskd.run`), ``dwskd-select``, ``dwskd-predict``, ``dwskd-eval`` and
``dwskd-export``. The small Python API below is imported lazily: ``import dwskd`` loads
neither torch nor Lightning nor timm, the first use of a name does.

* :func:`select_weights` — weight selection into a student, in place
  (:func:`dwskd.selection.initialize_from_teacher`; recipe: :class:`SelectionRecipe`);
* :func:`load_model` — a run dir's deployed model (or any exported model folder);
* :func:`predict_files` — predictions of a model folder or run dir for image files
  (:func:`dwskd.inference.predict_files`; the command line is :mod:`dwskd.predict`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwskd.lazy import lazy_exports

__version__ = "0.1.0"


def _config_dir() -> str:
    """The Hydra config directory: ``dwskd/conf`` in an installed wheel, else ``<checkout>/conf``."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(package / "conf")  # missing: Hydra's error names the directory it looked in


#: Absolute path of the Hydra configs (``config.yaml``, ``select.yaml``, the groups): what the
#: ``@hydra.main`` entry points use, and ``initialize_config_dir(config_dir=...)`` accepts.
CONFIG_DIR: str = _config_dir()

# public name -> (module, attribute), imported on first use
_LAZY: dict[str, tuple[str, str]] = {
    "select_weights": ("dwskd.selection", "initialize_from_teacher"),
    "SelectionRecipe": ("dwskd.selection", "SelectionRecipe"),
    "SelectionPlan": ("dwskd.selection", "SelectionPlan"),
    "predict_files": ("dwskd.inference", "predict_files"),
}

__all__ = [
    "CONFIG_DIR",
    "SelectionPlan",
    "SelectionRecipe",
    "__version__",
    "load_model",
    "predict_files",
    "select_weights",
]


def load_model(
    path: str | Path, model_name: str | None = None, option: str = "model"
) -> tuple[Any, dict[str, Any]]:
    """``(model, config)`` of a model folder, or of a finished run dir's deployed model.

    ``model_name`` (``student_a``, ``student_b``, ``teacher``) picks another export of a run
    dir. The model is in eval mode; ``config`` is the folder's ``config.json`` (preprocessing:
    :func:`dwskd.model_folder.preprocessing_of`).
    """
    from dwskd.model_folder import load_model_folder, resolve_model_folder

    return load_model_folder(resolve_model_folder(Path(path), model_name, option), option)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


if TYPE_CHECKING:  # static analysers see the lazy names
    from dwskd.inference import predict_files
    from dwskd.selection import SelectionPlan, SelectionRecipe
    from dwskd.selection import initialize_from_teacher as select_weights
