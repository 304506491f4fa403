"""Every option of one run, as a frozen, typed value (no argparse namespace past the CLI).

``Settings.from_args(namespace, environ)`` turns the parsed command line (plus the
environment, for the model-folder variables) into absolute paths and tuples, and checks
what can be checked without touching the data: the folder rules of the BIDS-Apps
contract (never write into ``bids_dir``). ``to_json()`` is what is saved beside the
outputs (``logs/<run id>_settings.json``) and referenced from the sidecars.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from spineps.errors import NoInputError, UnknownAnalysisLevelError, UsageError
from spineps.fsutil import is_within

__all__ = ["Settings", "available_cpus", "make_run_id", "DEFAULT_MASK_PATTERN"]

ANALYSIS_LEVELS = ("participant", "group")
SEMANTIC_MODEL_ENV = "SPINEPS_SEMANTIC_MODEL"
INSTANCE_MODEL_ENV = "SPINEPS_INSTANCE_MODEL"
CONTAINER_TYPE_ENV = "SPINEPS_CONTAINER_TYPE"
CONTAINER_TAG_ENV = "SPINEPS_CONTAINER_TAG"
#: the semantic masks ``spineps instance`` reads by default (a previous run's outputs)
DEFAULT_MASK_PATTERN = "sub-*/**/*_desc-spine_dseg.nii*"


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. in SLURM jobs)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def make_run_id(analysis_level: str, now: Optional[datetime] = None, pid: Optional[int] = None) -> str:
    """A name unique to this process and moment, e.g. ``participant_20261126T221500Z_pid4242``."""
    now = now or datetime.now(timezone.utc)
    return f"{analysis_level}_{now.strftime('%Y%m%dT%H%M%S')}{now.microsecond // 1000:03d}Z_pid{pid or os.getpid()}"


def _resolve(path: Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


@dataclass(frozen=True)
class Settings:
    """One run's options. Paths are absolute; label tuples hold bare labels (no prefix)."""

    bids_dir: Path  # the input dataset: raw BIDS, or the semantic masks' folder (input_kind "semantic-mask")
    output_dir: Path
    analysis_level: str
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filter_file: Optional[Path] = None
    skip_bids_validation: bool = False
    work_dir: Optional[Path] = None
    nprocs: int = 1
    omp_nthreads: int = 1
    device: str = "auto"
    semantic_model: Optional[Path] = None  # from the flag or the environment; None: bundled default
    instance_model: Optional[Path] = None
    semantic_model_source: str = "bundled"  # "flag", "env" or "bundled"
    instance_model_source: str = "bundled"
    overwrite: bool = False
    n4: bool = True
    precision: str = "auto"  # network precision, one of spineps.models.precision.PRECISIONS
    engine: str = "auto"  # what runs the forward passes on CPU, one of spineps.models.onnx_engine.ENGINES
    #: unpickle semantic checkpoints the safe loader refuses (runs their code): --allow-unsafe-checkpoints
    allow_unsafe_checkpoints: bool = False
    #: segment scans whose suffix is no modality of the semantic model (--allow-modality-mismatch)
    allow_modality_mismatch: bool = False
    level_rule: str = "auto"  # one of spineps.labels.LEVEL_RULES
    top_vertebra: Optional[str] = None  # user anchor: the top-most vertebra in view (e.g. "T12")
    verbosity: int = 0
    run_id: str = field(default_factory=lambda: make_run_id("run"))
    version: str = ""
    container_type: Optional[str] = None  # from SPINEPS_CONTAINER_TYPE (set in the images)
    container_tag: Optional[str] = None  # from SPINEPS_CONTAINER_TAG
    #: "image": the BIDS-App (both phases on T2w scans); "semantic-mask": ``spineps instance``
    #: (the instance phase on existing semantic masks, no image needed)
    input_kind: str = "image"
    mask_pattern: Optional[str] = None  # glob of the semantic masks under bids_dir (input_kind "semantic-mask")
    stop_on_first_crash: bool = False  # stop the participant loop at the first failed scan
    mem_mb: Optional[int] = None  # memory budget (MB) of the resource check instead of the detected memory
    tta: bool = False  # test-time mirroring of the semantic phase, where the model allows it
    save_probabilities: bool = False  # write the semantic network's class probabilities (_probseg)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_args(cls, ns: Any, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Build from a namespace of :func:`spineps.cli.parser.build_parser` and the
        environment. Raises ``UnknownAnalysisLevelError`` (17), ``NoInputError`` (66) for a
        missing ``bids_dir`` and ``UsageError`` (64) for folders that break the rules."""
        environ = os.environ if environ is None else environ
        level = str(ns.analysis_level)
        if level not in ANALYSIS_LEVELS:
            raise UnknownAnalysisLevelError(
                f"unknown analysis level {level!r}; choose one of {', '.join(ANALYSIS_LEVELS)}")
        bids_dir, output_dir = _resolve(ns.bids_dir), _resolve(ns.output_dir)
        _check_dataset_folders(level, bids_dir, output_dir)
        return cls._build(bids_dir, output_dir, level, _options(ns), environ)

    @classmethod
    def from_instance_args(cls, ns: Any, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        """Settings of ``spineps instance MASKS_DIR OUTPUT_DIR``: the participant level on
        semantic masks. Raises ``NoInputError`` (66) for a missing ``MASKS_DIR`` and
        ``UsageError`` (64) when ``OUTPUT_DIR`` is that folder or lies inside it (the outputs
        would overwrite or be taken for input masks)."""
        environ = os.environ if environ is None else environ
        masks_dir, output_dir = _resolve(ns.masks_dir), _resolve(ns.output_dir)
        if not masks_dir.is_dir():
            raise NoInputError("the folder of semantic masks does not exist", masks_dir)
        if is_within(output_dir, masks_dir):
            raise UsageError(f"output_dir {output_dir} is {'the same as' if output_dir == masks_dir else 'inside'} "
                             f"the masks folder {masks_dir}: its outputs would replace or be read as input masks; "
                             "choose a folder outside it")
        # no image: no BIDS validation, no filter file, no semantic model, no N4
        opts = {**_options(ns), "skip_bids_validation": True, "bids_filter_file": None, "semantic_model": None,
                "no_n4": True, "tta": False, "save_probabilities": False}
        base = cls._build(masks_dir, output_dir, "participant", opts,
                          {k: v for k, v in environ.items() if k != SEMANTIC_MODEL_ENV})
        pattern = str(opts["pattern"] or DEFAULT_MASK_PATTERN)
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise UsageError(f"--pattern {pattern!r} must be relative to the masks folder, without '..'")
        return replace(base, input_kind="semantic-mask", mask_pattern=pattern, semantic_model_source="none",
                       n4=False)

    @classmethod
    def _build(cls, bids_dir: Path, output_dir: Path, level: str, opts: Mapping[str, Any],
               environ: Mapping[str, str]) -> "Settings":
        """The settings of checked folders and the options read from a namespace (``_options``)."""
        from spineps import __version__

        work_dir = _work_dir(opts["work_dir"], bids_dir)
        filter_file = _filter_file(opts["bids_filter_file"])
        nprocs = int(opts["nprocs"]) if opts["nprocs"] else available_cpus()
        sem, sem_src = _model_folder(opts["semantic_model"], environ.get(SEMANTIC_MODEL_ENV, ""))
        ins, ins_src = _model_folder(opts["instance_model"], environ.get(INSTANCE_MODEL_ENV, ""))
        device = str(opts["device"] or "auto")
        precision = str(opts["precision"] or "auto")
        engine = str(opts["engine"] or "auto")
        _check_engine(engine, precision, device)
        return cls(
            bids_dir=bids_dir, output_dir=output_dir, analysis_level=level,
            participant_labels=_dedup(opts["participant_label"]), session_labels=_dedup(opts["session_label"]),
            bids_filter_file=filter_file, skip_bids_validation=bool(opts["skip_bids_validation"]), work_dir=work_dir,
            nprocs=nprocs, omp_nthreads=int(opts["omp_nthreads"]) if opts["omp_nthreads"] else nprocs,
            device=device, semantic_model=sem, instance_model=ins, semantic_model_source=sem_src,
            instance_model_source=ins_src, overwrite=bool(opts["overwrite"]), n4=not bool(opts["no_n4"]),
            precision=precision, engine=engine, level_rule=str(opts["level_rule"] or "auto"),
            allow_unsafe_checkpoints=bool(opts["allow_unsafe_checkpoints"]),
            allow_modality_mismatch=bool(opts["allow_modality_mismatch"]),
            top_vertebra=opts["top_vertebra"] or None, verbosity=int(opts["verbose"] or 0),
            run_id=make_run_id(level), version=__version__,
            container_type=environ.get(CONTAINER_TYPE_ENV) or None,
            container_tag=environ.get(CONTAINER_TAG_ENV) or None,
            stop_on_first_crash=bool(opts["stop_on_first_crash"]), tta=bool(opts["tta"]),
            mem_mb=int(opts["mem_mb"]) if opts["mem_mb"] else None, save_probabilities=bool(opts["save_probabilities"]),
        )

    # ---------------------------------------------------------------- derived paths
    @property
    def logs_dir(self) -> Path:
        return self.output_dir / "logs"

    @property
    def log_file(self) -> Path:
        """This run's own log (unique per process: timestamp + pid)."""
        return self.logs_dir / f"{self.run_id}.log"

    @property
    def settings_file(self) -> Path:
        return self.logs_dir / f"{self.run_id}_settings.json"

    def settings_uri(self) -> str:
        """Where the settings are saved, relative to the derivatives root (for sidecars)."""
        return self.settings_file.relative_to(self.output_dir).as_posix()

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def container_info(self) -> Optional[dict[str, str]]:
        """``GeneratedBy.Container`` of the derivatives, when running in an image."""
        if not self.container_type:
            return None
        out = {"Type": self.container_type}
        if self.container_tag:
            out["Tag"] = self.container_tag
        return out

    @property
    def threads(self) -> int:
        """Threads of each parallel step (torch/OpenMP intra-op, ONNX Runtime, N4's ITK):
        ``--omp-nthreads``, never more than ``--nprocs`` (the CPUs the whole run may use; the
        scans run one after the other in this one process)."""
        return max(1, min(int(self.omp_nthreads), int(self.nprocs)))

    def parameters(self) -> dict[str, Any]:
        """The options that change what is computed (for the sidecars' ``Parameters``)."""
        out: dict[str, Any] = {"device": self.device, "precision": self.precision, "engine": self.engine,
                               "n4": self.n4, "level_rule": self.level_rule}
        if self.input_kind != "image":
            out["input"] = self.input_kind
        if self.top_vertebra:
            out["top_vertebra"] = self.top_vertebra
        if self.tta:
            out["tta"] = True
        return out


#: the options a command-line namespace may carry, with the value of an option it lacks (the
#: ``instance`` subcommand has no BIDS options, the BIDS-App no ``--pattern``)
_OPTIONS: dict[str, Any] = {
    "participant_label": None, "session_label": None, "bids_filter_file": None, "skip_bids_validation": False,
    "work_dir": None, "nprocs": None, "omp_nthreads": None, "device": "auto", "semantic_model": None,
    "instance_model": None, "overwrite": False, "no_n4": False, "precision": None, "engine": None,
    "level_rule": None, "top_vertebra": None, "verbose": 0, "pattern": None, "allow_unsafe_checkpoints": False,
    "allow_modality_mismatch": False,
    "stop_on_first_crash": False, "mem_mb": None, "tta": False, "save_probabilities": False,
}


def _options(ns: Any) -> dict[str, Any]:
    """Every option of ``_OPTIONS`` read from a parsed namespace (the default where it has none)."""
    return {name: getattr(ns, name, default) for name, default in _OPTIONS.items()}


def _check_dataset_folders(level: str, bids_dir: Path, output_dir: Path) -> None:
    """The folder rules of the BIDS-Apps contract: the input exists (participant level; the
    group level reads only participant outputs, the raw dataset may be gone), the outputs
    never go into it (except under ``bids_dir/derivatives/<name>/``)."""
    if level == "participant" and not bids_dir.is_dir():
        raise NoInputError("the BIDS dataset folder does not exist", bids_dir)
    if level == "group" and not output_dir.is_dir():
        raise NoInputError("the output folder does not exist: run the participant level first", output_dir)
    if is_within(output_dir, bids_dir) and not is_within(output_dir, bids_dir / "derivatives"):
        raise UsageError(
            f"output_dir {output_dir} is {'the same as' if output_dir == bids_dir else 'inside'} bids_dir "
            f"{bids_dir}; choose a folder outside it, or under {bids_dir / 'derivatives'}")
    if output_dir == bids_dir / "derivatives":
        raise UsageError(f"output_dir must be a folder under {output_dir}, not that folder itself")


def _work_dir(given: Any, bids_dir: Path) -> Optional[Path]:
    work_dir = _resolve(given) if given else None
    if work_dir is not None and is_within(work_dir, bids_dir):
        raise UsageError(f"work dir {work_dir} lies inside bids_dir {bids_dir}; the input dataset is never "
                         "written to: choose a folder outside it")
    return work_dir


def _filter_file(given: Any) -> Optional[Path]:
    filter_file = _resolve(given) if given else None
    if filter_file is not None and not filter_file.is_file():
        raise UsageError(f"--bids-filter-file {filter_file} does not exist")
    return filter_file


def _model_folder(flag: Optional[Path], env_value: str) -> tuple[Optional[Path], str]:
    """A model folder and where it came from: the flag, else the environment variable, else
    ``(None, "bundled")`` (``spineps.models.registry`` adds the bundled folder)."""
    if flag:
        return _resolve(flag), "flag"
    if env_value.strip():
        return _resolve(Path(env_value.strip())), "env"
    return None, "bundled"


def _dedup(labels: Optional[list[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(labels or ()))


def _check_engine(engine: str, precision: str, device: str) -> None:
    """``--engine onnxruntime`` runs float32 networks on CPU: ``UsageError`` (64) for a
    combination that cannot hold, before anything is loaded."""
    if engine != "onnxruntime":
        return
    if precision == "bf16":
        raise UsageError("--engine onnxruntime runs float32 networks; --precision bf16 needs --engine torch (or auto)")
    if device.startswith("cuda"):
        raise UsageError("--engine onnxruntime runs on CPU; with --device cuda use --engine torch (or auto)")
