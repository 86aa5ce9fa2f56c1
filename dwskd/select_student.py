"""``python -m dwskd.select_student`` / ``dwskd-select``: write a weight-selected student to a file.

Example (offline, local teacher weights)::

    python -m dwskd.select_student teacher=vit_small teacher.source=file teacher.file=vit_s.safetensors \\
        model=vit_tiny model.depth=6 selection.offset=1 out=student_b.safetensors

Writes ``out`` (the student's state dict, keys exactly those of ``timm.create_model``) and
``out.plan.json`` (the :class:`~dwskd.selection.SelectionPlan`, also in the file's metadata).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from dwskd import CONFIG_DIR
from dwskd.commands import plain_user_errors
from dwskd.io import check_writable, refuse_existing

if TYPE_CHECKING:  # torch and timm load where they are used: --help stays instant
    from torch import nn

    from dwskd.models import TeacherHead
    from dwskd.selection import SelectionPlan, SelectionRecipe

log = logging.getLogger(__name__)


def recipe_from_config(selection: DictConfig) -> SelectionRecipe:
    """The ``selection:`` config block as a recipe (lists become plain Python lists)."""
    from dwskd.selection import SelectionRecipe

    return SelectionRecipe(**OmegaConf.to_container(selection, resolve=True))


def load_teacher(cfg: DictConfig) -> tuple[nn.Module, TeacherHead]:
    """The teacher with its weights (dwskd's one teacher loader) and what became of its head."""
    from dwskd.models import ModelConfigError
    from dwskd.models import load_teacher as load

    if cfg.teacher.source == "fit":
        raise ModelConfigError(
            "teacher.source=fit is not supported by dwskd-select (use hub, file or random). "
            "To train the teacher first run `python -m dwskd.run`, or pass its saved weights "
            "with teacher.source=file teacher.file=PATH."
        )
    class_names = OmegaConf.to_container(cfg.class_names) if cfg.get("class_names") else None
    return load(
        cfg.teacher,
        num_classes=cfg.num_classes,
        in_chans=cfg.in_chans,
        img_size=cfg.img_size,
        class_names=class_names,
    )


def teacher_provenance(cfg: DictConfig) -> dict[str, str | None]:
    """What the plan needs to name the teacher; timm adapted it to our input while loading."""
    t = cfg.teacher
    weights = {"hub": t.get("tag"), "file": t.get("file"), "random": None}[t.source]
    return {
        "name": t.name,
        "source": t.source,
        "weights": None if weights is None else str(weights),
        "loaded_as": f"in_chans={cfg.in_chans} img_size={cfg.img_size} "
        f"num_classes={cfg.num_classes} depth={t.get('depth')}",
    }


def check_out(out: Path) -> None:
    """A .safetensors path that can be written and overwrites nothing: checked before any work."""
    from dwskd.models import ModelConfigError
    from dwskd.selection import plan_sidecar

    if out.suffix != ".safetensors":
        raise ModelConfigError(f"out={out} must end in .safetensors.")
    refuse_existing(out, plan_sidecar(out))
    check_writable(out, "out")


def run(cfg: DictConfig) -> SelectionPlan:
    """Select the student configured by ``cfg`` from its teacher and write it to ``cfg.out``."""
    from dwskd.models import create_model
    from dwskd.selection import initialize_from_teacher, save_selection

    out = Path(cfg.out)
    check_out(out)
    recipe = recipe_from_config(cfg.selection)
    teacher, head = load_teacher(cfg)
    if not head.trained and recipe.head == "auto":
        recipe = dataclasses.replace(
            recipe, head="reinit"
        )  # an untrained head is not worth copying
    student = create_model(
        cfg.model, num_classes=cfg.num_classes, in_chans=cfg.in_chans, img_size=cfg.img_size
    )
    plan = initialize_from_teacher(student, teacher, recipe)
    plan.teacher = teacher_provenance(cfg)
    save_selection(out, student.state_dict(), plan)
    log.info(
        "wrote %s (teacher blocks %s, head %s)",
        out,
        plan.teacher_blocks,
        "re-initialised" if plan.head_reinitialised else "selected",
    )
    return plan


@hydra.main(config_path=CONFIG_DIR, config_name="select", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    with plain_user_errors():
        run(cfg)


def main() -> None:
    """Console script ``dwskd-select``."""
    _hydra_main()


if __name__ == "__main__":
    main()
