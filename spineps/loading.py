"""Building the segmenters of a run from their model folders, once per process, before any scan.

The folders are chosen and checked by ``spineps.models.registry`` (flag > environment >
bundled; ``modeltype`` fits the phase); here the segmenter their ``modeltype`` names is built:
``nnunet`` -> ``spineps.semantic.predict.NnUNetSemanticSegmenter``, ``unet`` ->
``spineps.instance.segmenter.UNetInstanceSegmenter``. Everything heavy (torch, nnU-Net) is
imported here, lazily.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

from spineps.errors import ModelError, ResourceError, SpinepsError
from spineps.models.registry import ModelChoice, instance_config, resolve_models, semantic_config

if TYPE_CHECKING:  # pragma: no cover
    from spineps.models.folder import ModelConfig
    from spineps.models.protocols import InstanceSegmenter, SemanticSegmenter
    from spineps.settings import Settings

__all__ = ["load_segmenters", "load_instance_segmenter", "announce_models"]

log = logging.getLogger("spineps.models.registry")  # the log lines keep the name they always had

_T = TypeVar("_T")


def _log_precision(settings: "Settings", device: str) -> None:
    from spineps.models.precision import describe, resolve_precision

    log.info("network precision: %s (--precision %s; %s)", resolve_precision(settings.precision, device),
             settings.precision, describe() if device == "cpu" else device)


def _set_threads(settings: "Settings") -> int:
    """Every thread pool of the process within the run's CPUs (``Settings.threads``: the
    ``--omp-nthreads`` of each step, at most ``--nprocs``): torch's intra-op (OpenMP) threads,
    ITK's (N4, ``SimpleITK``) and nnU-Net's helper threads (``nnUNet_def_n_proc``, unless the
    user set it; read when nnU-Net is first imported). The segmenters get the same number for
    torch and ONNX Runtime. Returns it."""
    import os

    import torch

    n = settings.threads
    if settings.omp_nthreads > settings.nprocs:
        log.warning("--omp-nthreads %d is more than --nprocs %d (the CPUs this run may use): using %d thread(s)",
                    settings.omp_nthreads, settings.nprocs, n)
    os.environ.setdefault("nnUNet_def_n_proc", str(n))
    torch.set_num_threads(n)
    if settings.n4:
        from spineps.semantic.preprocess import set_itk_threads

        set_itk_threads(n)  # applied when N4 runs (SimpleITK is imported only then)
    log.info("threads: %d per step (--omp-nthreads %d, --nprocs %d; one process, scans one after the other)", n,
             settings.omp_nthreads, settings.nprocs)
    return n


def _device(settings: "Settings") -> str:
    """The run's device (``UsageError`` for CUDA without a GPU), its threads and precision logged."""
    from spineps.models.device import resolve_device

    device = resolve_device(settings.device)
    _set_threads(settings)
    _log_precision(settings, device)
    return device


_SOURCES = {"flag": "--{phase}-model", "env": "${env}", "bundled": "bundled with spineps", "none": "none"}


def _describe_choice(choice: ModelChoice) -> tuple[str, Optional[str]]:
    """``"semantic = <log_name> (<folder>, from --semantic-model)"`` and the bundled model's
    name when it is a demonstration model. Best effort: a broken folder fails at loading."""
    from spineps.models.folder import read_model_config
    from spineps.models.registry import demonstration_model
    from spineps.settings import INSTANCE_MODEL_ENV, SEMANTIC_MODEL_ENV

    if choice.folder is None:
        return f"{choice.phase} = none", None
    try:
        name = read_model_config(choice.folder).log_name
    except SpinepsError:
        name = "(unreadable folder)"
    env = SEMANTIC_MODEL_ENV if choice.phase == "semantic" else INSTANCE_MODEL_ENV
    source = _SOURCES.get(choice.source, choice.source).format(phase=choice.phase, env=env)
    demo = demonstration_model(choice.folder)
    tag = ", a DEMONSTRATION model" if demo else ""
    return f"{choice.phase} = {name} ({choice.folder}, {source}{tag})", demo


def announce_models(settings: "Settings") -> list[str]:
    """The start of every participant run: one INFO line naming every model the run uses
    (phase, name, folder, where the choice came from: flag, environment variable, bundled),
    and a WARNING when any of them is a demonstration model (bundled, or a copy of one). The
    models are only named here (no weights are read); they are loaded after the scans are
    found. Returns the demonstration models' names."""
    sem_choice, ins_choice = resolve_models(settings)
    choices = [ins_choice] if settings.input_kind == "semantic-mask" else [sem_choice, ins_choice]
    described = [_describe_choice(c) for c in choices]
    log.info("models in use: %s", "; ".join(text for text, _demo in described))
    demos = [f"{c.phase} ({demo})" for c, (_t, demo) in zip(choices, described) if demo]
    if demos:
        from spineps.models.registry import DEMONSTRATION_NOTICE

        log.warning("this run uses the %s model%s: %s", " and ".join(demos), "s" if len(demos) > 1 else "",
                    DEMONSTRATION_NOTICE)
    return [demo for _t, demo in described if demo]


def load_segmenters(settings: "Settings") -> tuple["SemanticSegmenter", Optional["InstanceSegmenter"]]:
    """Resolve, validate and load both models (once per process, before any scan).

    Raises ``ModelError`` (exit 78) when no semantic model is available, when a folder is
    broken, or when its ``modeltype`` does not fit its phase. Without an instance model
    the run writes the semantic mask only (logged as a warning).
    """
    sem_choice, ins_choice = resolve_models(settings)
    sem_cfg = semantic_config(sem_choice)
    ins_cfg = instance_config(ins_choice) if ins_choice.folder is not None else None
    sem_folder = sem_choice.folder
    assert sem_folder is not None  # semantic_config raised otherwise
    device = _device(settings)
    log.info("semantic model: %s (%s, from %s)", sem_cfg.log_name, sem_choice.folder, sem_choice.source)
    try:
        from spineps.semantic.predict import NnUNetSemanticSegmenter
    except ImportError as exc:
        raise ModelError(f"the nnU-Net semantic segmenter cannot be imported ({exc})", sem_choice.folder) from exc
    semantic = _build(lambda: NnUNetSemanticSegmenter.from_folder(
        sem_folder, device=device, nprocs=settings.threads, n4=settings.n4, precision=settings.precision,
        engine=settings.engine, allow_unsafe=settings.allow_unsafe_checkpoints, tta=settings.tta,
        probabilities=settings.save_probabilities, n4_helper=True), sem_choice)
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
    cfg = instance_config(ins_choice)
    return _load_instance(settings, ins_choice, cfg, _device(settings))


def _load_instance(settings: "Settings", choice: ModelChoice, cfg: "ModelConfig", device: str) -> "InstanceSegmenter":
    folder = choice.folder
    assert folder is not None  # checked by the callers
    log.info("instance model: %s (%s, from %s)", cfg.log_name, choice.folder, choice.source)
    try:
        from spineps.instance.segmenter import UNetInstanceSegmenter
    except ImportError as exc:
        raise ModelError(f"the instance segmenter cannot be imported ({exc})", choice.folder) from exc
    return _build(lambda: UNetInstanceSegmenter.from_folder(
        folder, device=device, nprocs=settings.threads, precision=settings.precision,
        engine=settings.engine), choice)


def _build(factory: Callable[[], _T], choice: ModelChoice) -> _T:
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
