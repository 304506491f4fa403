"""Where the models come from.

Precedence for each phase: command-line flag > environment variable
(``SPINEPS_SEMANTIC_MODEL`` / ``SPINEPS_INSTANCE_MODEL``) > the folder bundled inside the
package (``spineps/data/models/t2w_semantic/`` and ``spineps/data/models/instance/``).
The flag and the variable are resolved in :class:`spineps.settings.Settings`; this module
adds the bundled fallback and reads and checks each folder's ``inference_config.json``
(its ``modeltype`` must fit its phase). Building the segmenters is ``spineps.loading``'s job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from spineps.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from spineps.models.folder import ModelConfig
    from spineps.settings import Settings

__all__ = [
    "BUNDLED_SEMANTIC",
    "BUNDLED_INSTANCE",
    "ModelChoice",
    "bundled_model_dir",
    "resolve_models",
    "semantic_config",
    "instance_config",
]

log = logging.getLogger(__name__)

BUNDLED_SEMANTIC = "t2w_semantic"
BUNDLED_INSTANCE = "instance"

SEMANTIC_HOW_TO = ("give a model folder with --semantic-model DIR or the SPINEPS_SEMANTIC_MODEL environment variable "
           "(a folder holding inference_config.json, e.g. an official SPINEPS T2w semantic model)")


@dataclass(frozen=True)
class ModelChoice:
    """The folder picked for one phase, and where the choice came from."""

    phase: str  # "semantic" or "instance"
    folder: Optional[Path]
    source: str  # "flag", "env", "bundled" or "none"


def bundled_model_dir(name: str) -> Optional[Path]:
    """``spineps/data/models/<name>/`` when it is installed with the package and holds a
    model config, else None."""
    from importlib import resources

    try:
        base = resources.files("spineps") / "data" / "models" / name
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover
        return None
    path = Path(str(base))
    return path if (path / "inference_config.json").is_file() else None


def resolve_models(settings: "Settings") -> tuple[ModelChoice, ModelChoice]:
    """Flag > environment variable > bundled, for the semantic and the instance phase."""

    def pick(phase: str, given: Optional[Path], source: str, bundled: str) -> ModelChoice:
        if given is not None:
            return ModelChoice(phase, Path(given), source)
        folder = bundled_model_dir(bundled)
        return ModelChoice(phase, folder, "bundled" if folder is not None else "none")

    return (pick("semantic", settings.semantic_model, settings.semantic_model_source, BUNDLED_SEMANTIC),
            pick("instance", settings.instance_model, settings.instance_model_source, BUNDLED_INSTANCE))


def _config(choice: ModelChoice) -> "ModelConfig":
    from spineps.models.folder import read_model_config

    assert choice.folder is not None
    cfg = read_model_config(choice.folder)  # ModelError naming the folder when broken
    return cfg


def semantic_config(choice: ModelChoice) -> "ModelConfig":
    """The semantic model's config: ``ModelError`` (78) when there is no folder, when it is
    broken, or when it holds no ``nnunet`` model."""
    if choice.folder is None:
        raise ModelError(f"no semantic model available (none bundled with this installation); {SEMANTIC_HOW_TO}")
    cfg = _config(choice)
    if cfg.modeltype != "nnunet":
        raise ModelError(f"this folder holds a {cfg.modeltype!r} model, but the semantic phase needs an "
                         f"'nnunet' model; {SEMANTIC_HOW_TO}", choice.folder)
    return cfg


def instance_config(choice: ModelChoice) -> "ModelConfig":
    """The instance model's config: ``ModelError`` (78) when it is broken or holds no ``unet``
    model."""
    cfg = _config(choice)
    if cfg.modeltype != "unet":
        raise ModelError(f"this folder holds a {cfg.modeltype!r} model, but the instance phase needs a "
                         "'unet' model (give it with --instance-model DIR)", choice.folder)
    return cfg
