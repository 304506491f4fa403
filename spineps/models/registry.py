"""Where the models come from.

Precedence for each phase: command-line flag > environment variable
(``SPINEPS_SEMANTIC_MODEL`` / ``SPINEPS_INSTANCE_MODEL``) > the folder bundled inside the
package (``spineps/data/models/t2w_semantic/`` and ``spineps/data/models/instance/``).
The flag and the variable are resolved in :class:`spineps.settings.Settings`; this module
adds the bundled fallback and reads and checks each folder's ``inference_config.json``
(its ``modeltype`` must fit its phase). Building the segmenters is ``spineps.loading``'s job.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
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
    "DEMONSTRATION_NOTICE",
    "bundled_model_dir",
    "demonstration_model",
    "resolve_models",
    "semantic_config",
    "instance_config",
]

log = logging.getLogger(__name__)

BUNDLED_SEMANTIC = "t2w_semantic"
BUNDLED_INSTANCE = "instance"

SEMANTIC_HOW_TO = ("give a model folder with --semantic-model DIR or the SPINEPS_SEMANTIC_MODEL environment variable "
           "(a folder holding inference_config.json, e.g. an official SPINEPS T2w semantic model)")


#: what every sidecar, log and report says of a bundled model
DEMONSTRATION_NOTICE = ("demonstration model bundled with spineps: trained briefly, mostly on phantoms, far below the "
                        "accuracy of the published SPINEPS models; not for real studies (pass the official SPINEPS "
                        "weights with --semantic-model / --instance-model or SPINEPS_SEMANTIC_MODEL / "
                        "SPINEPS_INSTANCE_MODEL)")
#: the weight files of a model folder (nnU-Net checkpoints, Lightning checkpoints)
_WEIGHT_PATTERNS = ("*.pth", "*.ckpt")


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


def _weight_files(folder: Path) -> list[tuple[str, int, Path]]:
    """(name, size, path) of the folder's weight files, sorted by name."""
    found = {p for pattern in _WEIGHT_PATTERNS for p in folder.rglob(pattern) if p.is_file()}
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p) for p in found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _bundled_weights() -> tuple[tuple[str, tuple[tuple[int, str], ...]], ...]:
    """Per bundled model: its name and the (size, sha256) of its weight files."""
    out = []
    for name in (BUNDLED_SEMANTIC, BUNDLED_INSTANCE):
        folder = bundled_model_dir(name)
        if folder is not None:
            out.append((name, tuple((size, _sha256(p)) for _n, size, p in _weight_files(folder))))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _demonstration_model(folder: str) -> Optional[str]:
    path = Path(folder)
    for name in (BUNDLED_SEMANTIC, BUNDLED_INSTANCE):
        bundled = bundled_model_dir(name)
        if bundled is not None and os.path.realpath(bundled) == os.path.realpath(path):
            return name
    try:
        files = _weight_files(path)
    except OSError:
        return None
    for name, weights in _bundled_weights():
        if weights and [size for _n, size, _p in files] == [size for size, _h in weights] \
                and [_sha256(p) for _n, _s, p in files] == [h for _s, h in weights]:
            return name  # a copy of a bundled model (its weights, whatever else the folder holds)
    return None


def demonstration_model(folder: Optional[Path]) -> Optional[str]:
    """The bundled model's name (``t2w_semantic``, ``instance``) when ``folder`` holds one of
    the bundled demonstration models, else None: the bundled folder itself, or any folder
    whose weight files are the bundled ones (a copy passed with ``--semantic-model``). Cheap
    for other folders: weight files are hashed only when their sizes match."""
    if folder is None:
        return None
    return _demonstration_model(str(folder))


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
