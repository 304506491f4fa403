"""The model-folder contract (``shared/spec/spineps-method.md`` section 3).

A model folder holds ``inference_config.json`` next to its weights. ``read_model_config``
validates every key, fills the documented defaults, ignores unknown keys (kept in
``extra`` for provenance) and raises ``ModelError`` naming the folder and the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from spineps.errors import ModelError
from spineps.labels import DEFAULT_INSTANCE_MAPPING, resolve_label

__all__ = ["ModelConfig", "read_model_config", "CONFIG_NAME", "folder_checksum"]

CONFIG_NAME = "inference_config.json"

MODALITIES = ("T2w", "T1w", "Vibe", "CT", "SEG", "MPR", "T1c", "T2c", "PD", "DIXON")
ACQUISITIONS = ("sag", "cor", "ax", "iso")
MODELTYPES = ("nnunet", "unet", "classifier")
_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


@dataclass(frozen=True)
class ModelConfig:
    """A validated ``inference_config.json``."""

    path: Path
    log_name: str
    modality: tuple[str, ...]
    acquisition: str
    modeltype: str
    orientation: tuple[str, str, str]
    folds: tuple[int, ...]
    inference_augmentation: bool
    spacing_min: tuple[float, float, float]
    spacing_max: tuple[float, float, float]
    default_step_size: float
    labels: dict[int, int]  # network output index -> label value
    expected_inputs: tuple[str, ...] = ("img",)
    has_c1: bool = False
    needs_corp: bool = False
    sacrum_ids: tuple[int, ...] = (26,)
    cutout_size: tuple[int, int, int] = (248, 304, 64)
    corpus_size_cleaning: int = 100
    vert_size_threshold: int = 250
    mapping: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_INSTANCE_MAPPING))
    extra: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed_spacing(self) -> bool:
        return self.spacing_min == self.spacing_max

    def target_spacing(self, input_spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Spacing (in model orientation) to resample an input with ``input_spacing`` (also
        in model orientation) to: each axis clamped into [min, max]."""
        lo, hi = self.spacing_min, self.spacing_max
        return (float(min(max(input_spacing[0], lo[0]), hi[0])), float(min(max(input_spacing[1], lo[1]), hi[1])),
                float(min(max(input_spacing[2], lo[2]), hi[2])))


def _fail(folder: Path, msg: str) -> ModelError:
    return ModelError(f"invalid model folder: {msg}", folder)


def _spacing(folder: Path, value: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    def triple(v: Any) -> tuple[float, float, float]:
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            raise _fail(folder, f"resolution_range entries must be three numbers, got {v!r}")
        try:
            out = (float(v[0]), float(v[1]), float(v[2]))
        except (TypeError, ValueError):
            raise _fail(folder, f"resolution_range entries must be numbers, got {v!r}") from None
        if any(not (x > 0) for x in out):
            raise _fail(folder, f"resolution_range spacings must be positive, got {v!r}")
        return out

    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (list, tuple)) for v in value):
        lo, hi = triple(value[0]), triple(value[1])
        if any(a > b for a, b in zip(lo, hi)):
            raise _fail(folder, f"resolution_range minimum {lo} exceeds maximum {hi}")
        return lo, hi
    t = triple(value)
    return t, t


def _int_map(folder: Path, key: str, value: Any, resolve_values: bool) -> dict[int, int]:
    if not isinstance(value, Mapping) or not value:
        raise _fail(folder, f"'{key}' must be a non-empty object, got {type(value).__name__}")
    out: dict[int, int] = {}
    for k, v in value.items():
        try:
            ik = int(k)
        except (TypeError, ValueError):
            raise _fail(folder, f"'{key}' has a non-integer key {k!r}") from None
        try:
            out[ik] = resolve_label(v) if resolve_values else int(v)
        except (KeyError, TypeError, ValueError):
            raise _fail(folder, f"'{key}' maps {k!r} to unknown label {v!r}") from None
    return out


_REQUIRED = ("log_name", "modality", "acquisition", "modeltype", "model_expected_orientation",
             "available_folds", "inference_augmentation", "resolution_range", "default_step_size", "labels")
_OPTIONAL = ("expected_inputs", "has_c1", "needs_corp", "sacrum_ids", "cutout_size", "corpus_size_cleaning",
             "vert_size_threshold", "mapping")


def _read_raw(folder: Path) -> dict[str, Any]:
    """The JSON object of ``folder/inference_config.json`` with every required key."""
    if not folder.is_dir():
        raise ModelError("model folder does not exist", folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise _fail(folder, f"no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(folder, f"{CONFIG_NAME} is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _fail(folder, f"{CONFIG_NAME} must hold a JSON object")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise _fail(folder, f"{CONFIG_NAME} lacks required key(s) {', '.join(missing)}")
    return raw


def _triple(value: Any) -> tuple[Any, Any, Any]:
    return value[0], value[1], value[2]


def _identity(folder: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """``log_name``, ``modality``, ``acquisition``, ``modeltype``, ``orientation``, checked."""
    log_name = raw["log_name"]
    if not isinstance(log_name, str) or not log_name:
        raise _fail(folder, "'log_name' must be a non-empty string")
    modality = raw["modality"]
    modality = (modality,) if isinstance(modality, str) else modality
    if not isinstance(modality, (list, tuple)) or not modality or not all(m in MODALITIES for m in modality):
        raise _fail(folder, f"'modality' must be one or more of {', '.join(MODALITIES)}, got {raw['modality']!r}")
    if raw["acquisition"] not in ACQUISITIONS:
        raise _fail(folder, f"'acquisition' must be one of {', '.join(ACQUISITIONS)}, got {raw['acquisition']!r}")
    if raw["modeltype"] not in MODELTYPES:
        raise _fail(folder, f"'modeltype' must be one of {', '.join(MODELTYPES)}, got {raw['modeltype']!r}")
    orient = raw["model_expected_orientation"]
    if (not isinstance(orient, (list, tuple)) or len(orient) != 3 or not all(o in _AXES for o in orient)
            or len({_AXES[o] for o in orient}) != 3):
        raise _fail(folder, f"'model_expected_orientation' must be three axis codes like ['P','I','R'], got {orient!r}")
    return {"log_name": log_name, "modality": tuple(modality), "acquisition": raw["acquisition"],
            "modeltype": raw["modeltype"], "orientation": _triple(orient)}


def _folds(folder: Path, folds_raw: Any) -> tuple[int, ...]:
    if isinstance(folds_raw, bool):
        raise _fail(folder, "'available_folds' must be an int or a list of ints")
    if isinstance(folds_raw, int):
        if folds_raw < 1:
            raise _fail(folder, "'available_folds' must be >= 1")
        return tuple(range(folds_raw))
    if isinstance(folds_raw, list) and folds_raw and all(isinstance(f, int) and not isinstance(f, bool)
                                                         for f in folds_raw):
        return tuple(folds_raw)
    raise _fail(folder, f"'available_folds' must be an int or a list of ints, got {folds_raw!r}")


def _inference(folder: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Folds, augmentation, spacing range, step size and labels, checked."""
    folds = _folds(folder, raw["available_folds"])
    aug = raw["inference_augmentation"]
    if not isinstance(aug, (bool, int)):
        raise _fail(folder, "'inference_augmentation' must be a boolean")
    lo, hi = _spacing(folder, raw["resolution_range"])
    step = raw["default_step_size"]
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (0 < step <= 1):
        raise _fail(folder, f"'default_step_size' must be a number in (0, 1], got {step!r}")
    labels = _int_map(folder, "labels", raw["labels"], resolve_values=True)
    if 0 not in labels.values():
        raise _fail(folder, "'labels' must map at least one output index to 0 (background)")
    return {"folds": folds, "inference_augmentation": bool(aug), "spacing_min": lo, "spacing_max": hi,
            "default_step_size": float(step), "labels": labels}


def _optional(folder: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The optional keys present (checked), and the instance models' default input."""
    kwargs: dict[str, Any] = {}
    if "expected_inputs" in raw:
        ei = raw["expected_inputs"]
        if not isinstance(ei, list) or not ei or not all(isinstance(e, str) for e in ei):
            raise _fail(folder, "'expected_inputs' must be a list of strings")
        kwargs["expected_inputs"] = tuple(ei)
    elif raw["modeltype"] == "unet":
        kwargs["expected_inputs"] = ("seg",)
    for key in ("has_c1", "needs_corp"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise _fail(folder, f"'{key}' must be a boolean")
            kwargs[key] = raw[key]
    if "sacrum_ids" in raw:
        s = raw["sacrum_ids"]
        if not isinstance(s, list) or not all(isinstance(x, int) for x in s):
            raise _fail(folder, "'sacrum_ids' must be a list of ints")
        kwargs["sacrum_ids"] = tuple(s)
    if "cutout_size" in raw:
        c = raw["cutout_size"]
        if (not isinstance(c, list) or len(c) != 3 or not all(isinstance(x, int) and x > 0 for x in c)):
            raise _fail(folder, f"'cutout_size' must be three positive ints, got {c!r}")
        if any(x % 8 for x in c):
            raise _fail(folder, f"'cutout_size' must be divisible by 8 on every axis, got {c!r}")
        kwargs["cutout_size"] = tuple(c)
    for key in ("corpus_size_cleaning", "vert_size_threshold"):
        if key in raw:
            if isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 0:
                raise _fail(folder, f"'{key}' must be a non-negative int")
            kwargs[key] = raw[key]
    if "mapping" in raw:
        kwargs["mapping"] = _int_map(folder, "mapping", raw["mapping"], resolve_values=False)
    return kwargs


def read_model_config(folder: Path) -> ModelConfig:
    """Read and validate ``folder/inference_config.json``."""
    folder = Path(folder)
    raw = _read_raw(folder)
    fields = {**_identity(folder, raw), **_inference(folder, raw)}
    kwargs = _optional(folder, raw)
    known = set(_REQUIRED) | set(_OPTIONAL)
    extra = {k: v for k, v in raw.items() if k not in known}
    return ModelConfig(path=folder, **fields, extra=extra, raw=raw, **kwargs)


def folder_checksum(folder: Path, pattern: Optional[str] = None) -> str:
    """SHA-256 over the files of a model folder (names and contents, sorted), for
    provenance in sidecars. ``pattern`` restricts to matching files (glob, recursive)."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob(pattern or "*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
