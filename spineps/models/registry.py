"""Where the models come from, and loading them once per process.

Precedence for each phase: command-line flag > environment variable
(``SPINEPS_SEMANTIC_MODEL`` / ``SPINEPS_INSTANCE_MODEL``) > the folder bundled inside the
package (``spineps/data/models/t2w_semantic/`` and ``spineps/data/models/instance/``).
The flag and the variable are resolved in :class:`spineps.settings.Settings`; this module
adds the bundled fallback, reads each folder's ``inference_config.json`` and builds the
segmenter its ``modeltype`` names. Everything heavy (torch, nnU-Net) is imported here,
lazily, and only when a model needs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from spineps.errors import ModelError, ResourceError, SpinepsError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from spineps.models.folder import ModelConfig
    from spineps.pipeline import InstanceSegmenter, SemanticSegmenter
    from spineps.settings import Settings

__all__ = [
    "BUNDLED_SEMANTIC",
    "BUNDLED_INSTANCE",
    "ModelChoice",
    "bundled_model_dir",
    "resolve_models",
    "resolve_device",
    "load_segmenters",
    "load_instance_segmenter",
]

log = logging.getLogger(__name__)

BUNDLED_SEMANTIC = "t2w_semantic"
BUNDLED_INSTANCE = "instance"

_HOW_TO = ("give a model folder with --semantic-model DIR or the SPINEPS_SEMANTIC_MODEL environment variable "
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
        base = resources.files("spineps").joinpath("data", "models", name)
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


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU is a
    usage error."""
    if device == "cpu":
        return "cpu"
    import torch

    has_cuda = bool(torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("auto", "cuda"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return "cuda" if has_cuda else "cpu"


def _config(choice: ModelChoice) -> "ModelConfig":
    from spineps.models.folder import read_model_config

    assert choice.folder is not None
    cfg = read_model_config(choice.folder)  # ModelError naming the folder when broken
    return cfg


def _log_precision(settings: "Settings", device: str) -> None:
    from spineps.models.precision import describe, resolve_precision

    log.info("network precision: %s (--precision %s; %s)", resolve_precision(settings.precision, device),
             settings.precision, describe() if device == "cpu" else device)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))
    log.debug("torch uses %d thread(s)", torch.get_num_threads())


def load_segmenters(settings: "Settings") -> tuple["SemanticSegmenter", Optional["InstanceSegmenter"]]:
    """Resolve, validate and load both models (once per process, before any scan).

    Raises ``ModelError`` (exit 78) when no semantic model is available, when a folder is
    broken, or when its ``modeltype`` does not fit its phase. Without an instance model
    the run writes the semantic mask only (logged as a warning).
    """
    sem_choice, ins_choice = resolve_models(settings)
    if sem_choice.folder is None:
        raise ModelError(f"no semantic model available (none bundled with this installation); {_HOW_TO}")
    sem_cfg = _config(sem_choice)
    if sem_cfg.modeltype != "nnunet":
        raise ModelError(f"this folder holds a {sem_cfg.modeltype!r} model, but the semantic phase needs an "
                         f"'nnunet' model; {_HOW_TO}", sem_choice.folder)
    ins_cfg = _instance_config(ins_choice) if ins_choice.folder is not None else None

    device = resolve_device(settings.device)
    _set_threads(settings.omp_nthreads)
    _log_precision(settings, device)
    log.info("semantic model: %s (%s, from %s)", sem_cfg.log_name, sem_choice.folder, sem_choice.source)

    try:
        from spineps.semantic.predict import NnUNetSemanticSegmenter
    except ImportError as exc:
        raise ModelError(f"the nnU-Net semantic segmenter cannot be imported ({exc})", sem_choice.folder) from exc
    semantic = _build(lambda: NnUNetSemanticSegmenter.from_folder(
        sem_choice.folder, device=device, nprocs=settings.nprocs, n4=settings.n4, precision=settings.precision,
        engine=settings.engine),
        sem_choice)

    instance = None
    if ins_cfg is not None:
        instance = _load_instance(settings, ins_choice, ins_cfg, device)
    else:
        log.warning("no instance model available (none bundled, none given with --instance-model or "
                    "SPINEPS_INSTANCE_MODEL): only the semantic masks are written")
    return semantic, instance


def load_instance_segmenter(settings: "Settings") -> "InstanceSegmenter":
    """The instance model alone (``spineps instance``): flag > environment > bundled;
    ``ModelError`` (78) when there is none or it is broken."""
    _sem_choice, ins_choice = resolve_models(settings)
    if ins_choice.folder is None:
        raise ModelError("no instance model available (none bundled with this installation); give a model folder "
                         "with --instance-model DIR or the SPINEPS_INSTANCE_MODEL environment variable")
    cfg = _instance_config(ins_choice)
    device = resolve_device(settings.device)
    _set_threads(settings.omp_nthreads)
    _log_precision(settings, device)
    return _load_instance(settings, ins_choice, cfg, device)


def _instance_config(choice: ModelChoice) -> "ModelConfig":
    cfg = _config(choice)
    if cfg.modeltype != "unet":
        raise ModelError(f"this folder holds a {cfg.modeltype!r} model, but the instance phase needs a "
                         "'unet' model (give it with --instance-model DIR)", choice.folder)
    return cfg


def _load_instance(settings: "Settings", choice: ModelChoice, cfg: "ModelConfig", device: str) -> "InstanceSegmenter":
    log.info("instance model: %s (%s, from %s)", cfg.log_name, choice.folder, choice.source)
    try:
        from spineps.instance.segmenter import UNetInstanceSegmenter
    except ImportError as exc:
        raise ModelError(f"the instance segmenter cannot be imported ({exc})", choice.folder) from exc
    return _build(lambda: UNetInstanceSegmenter.from_folder(
        choice.folder, device=device, nprocs=settings.nprocs, level_rule=settings.level_rule,
        top_vertebra=settings.top_vertebra, precision=settings.precision, engine=settings.engine), choice)


def _build(factory, choice: ModelChoice):  # type: ignore[no-untyped-def]
    """Run a model factory; anything but a typed error becomes a ModelError naming the folder."""
    try:
        return factory()
    except SpinepsError:
        raise
    except MemoryError as exc:
        raise ResourceError(f"not enough memory to load the {choice.phase} model", choice.folder) from exc
    except Exception as exc:
        raise ModelError(f"the {choice.phase} model cannot be loaded: {type(exc).__name__}: {exc}",
                         choice.folder) from exc
