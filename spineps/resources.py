"""Memory and disk estimates for one scan, checked before the scan is loaded.

A scan that cannot fit should fail with a clear message naming it and the numbers, not
crash the process in the middle (the kernel's OOM killer gives no message at all). The
estimate is computed from the header only (:class:`spineps.geometry.io.HeaderInfo`):

``memory = n_in * IMAGE_BYTES_PER_VOXEL + n_model * MODEL_BYTES_PER_VOXEL``

- ``n_in``: voxels of the input grid. ``IMAGE_BYTES_PER_VOXEL`` covers the float32 image,
  its N4-corrected copy, the oriented/reoriented copies, the uint8 semantic and uint16
  instance masks on the input grid and the compressed writes (measured, see
  ``docs/hostile-inputs.md``).
- ``n_model``: voxels after resampling to the semantic model's spacing
  (:data:`MODEL_SPACING_MM`, the SPINEPS T2w models' 0.75 x 0.75 x 1.65 mm; never fewer
  than ``n_in``). ``MODEL_BYTES_PER_VOXEL`` covers nnU-Net's float32 logits for every
  class, the Gaussian weights and prediction counts of the sliding window and the
  cubic-resampled image.

Available memory is the smallest of ``MemAvailable`` (``/proc/meminfo``), the room left
under a cgroup limit (v2 ``memory.max`` minus ``memory.current`` plus reclaimable
``inactive_file``; v1 ``memory.limit_in_bytes``) and ``SPINEPS_MEMORY_LIMIT_MB`` when set.
Free disk is ``shutil.disk_usage`` of the output folder, capped by
``SPINEPS_DISK_LIMIT_MB`` when set. Unknown values (no ``/proc``) are not checked.

Both variables exist for schedulers that know better than the kernel (e.g. a SLURM job's
``--mem`` on a node without cgroup accounting) and for tests.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from spineps.errors import InputError, ResourceError

if TYPE_CHECKING:  # pragma: no cover
    from spineps.geometry.io import HeaderInfo

__all__ = [
    "MEMORY_LIMIT_ENV",
    "DISK_LIMIT_ENV",
    "IMAGE_BYTES_PER_VOXEL",
    "MODEL_BYTES_PER_VOXEL",
    "OUTPUT_BYTES_PER_VOXEL",
    "MODEL_SPACING_MM",
    "ScanEstimate",
    "estimate_scan",
    "available_memory_bytes",
    "free_disk_bytes",
    "check_scan_resources",
]

log = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "SPINEPS_MEMORY_LIMIT_MB"
DISK_LIMIT_ENV = "SPINEPS_DISK_LIMIT_MB"

#: bytes per input-grid voxel held at the peak (float32 image + copies + masks)
IMAGE_BYTES_PER_VOXEL = 40
#: bytes per model-grid voxel at the nnU-Net peak (logits of ~15 classes, weights, counts)
MODEL_BYTES_PER_VOXEL = 100
#: worst case on disk per input voxel: uint8 + uint16 masks, uncompressed, plus temporaries
OUTPUT_BYTES_PER_VOXEL = 3
#: fixed disk room for sidecars, centroids and figures
OUTPUT_FIXED_BYTES = 4 * 1024 * 1024
#: spacing of the official SPINEPS T2w semantic models (P, I, R; mm)
MODEL_SPACING_MM: tuple[float, float, float] = (0.75, 0.75, 1.65)

_MB = 1024 * 1024


@dataclass(frozen=True)
class ScanEstimate:
    """What one scan needs (bytes), from its header."""

    n_voxels: int
    n_model_voxels: int
    memory_bytes: int
    disk_bytes: int

    def describe(self) -> str:
        return (f"{self.n_voxels} voxels ({self.n_model_voxels} at model resolution): about "
                f"{_mb(self.memory_bytes)} of memory and {_mb(self.disk_bytes)} of disk")


def _mb(n: float) -> str:
    return f"{n / _MB:,.1f} MB" if n < 10 * _MB else f"{n / _MB:,.0f} MB"


def estimate_scan(shape: Sequence[int], spacing: Sequence[float],
                  model_spacing: Sequence[float] = MODEL_SPACING_MM) -> ScanEstimate:
    """Memory and disk one scan of ``shape`` (3 spatial axes) and ``spacing`` (mm) needs.

    The model grid is isotropic-agnostic: its voxel count is the input volume (mm^3) over
    the model voxel volume, never less than the input voxel count."""
    n = 1
    for s in shape[:3]:
        n *= max(int(s), 1)
    vol_in = 1.0
    for sp in spacing[:3]:
        vol_in *= abs(float(sp))
    vol_model = 1.0
    for sp in model_spacing[:3]:
        vol_model *= float(sp)
    n_model = max(n, int(n * vol_in / vol_model)) if vol_model > 0 else n
    memory = n * IMAGE_BYTES_PER_VOXEL + n_model * MODEL_BYTES_PER_VOXEL
    disk = n * OUTPUT_BYTES_PER_VOXEL + OUTPUT_FIXED_BYTES
    return ScanEstimate(n, n_model, int(memory), int(disk))


def _env_mb(name: str, environ: Mapping[str, str]) -> Optional[int]:
    raw = str(environ.get(name, "")).strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a number of megabytes", name, raw)
        return None
    if value < 0:
        log.warning("ignoring %s=%r: negative", name, raw)
        return None
    return int(value * _MB)


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> Optional[int]:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2, else v1), None if unlimited."""
    v2_limit = _read_int(root / "memory.max")
    if v2_limit is not None:
        current = _read_int(root / "memory.current") or 0
        reclaimable = _stat_value(root / "memory.stat", "inactive_file")
        return max(0, v2_limit - current + reclaimable)
    v1_limit = _read_int(root / "memory" / "memory.limit_in_bytes")
    if v1_limit is not None and v1_limit < (1 << 60):  # v1 says "unlimited" with a huge number
        usage = _read_int(root / "memory" / "memory.usage_in_bytes") or 0
        reclaimable = _stat_value(root / "memory" / "memory.stat", "total_inactive_file")
        return max(0, v1_limit - usage + reclaimable)
    return None


def available_memory_bytes(environ: Optional[Mapping[str, str]] = None) -> tuple[Optional[int], str]:
    """(bytes, where the number comes from) - the smallest of MemAvailable, the cgroup room
    and ``SPINEPS_MEMORY_LIMIT_MB``; (None, "unknown") when none can be read."""
    environ = os.environ if environ is None else environ
    candidates: list[tuple[int, str]] = []
    mem = _meminfo_available()
    if mem is not None:
        candidates.append((mem, "MemAvailable in /proc/meminfo"))
    cg = _cgroup_room()
    if cg is not None:
        candidates.append((cg, "cgroup memory limit"))
    env = _env_mb(MEMORY_LIMIT_ENV, environ)
    if env is not None:
        candidates.append((env, MEMORY_LIMIT_ENV))
    if not candidates:
        return None, "unknown"
    return min(candidates, key=lambda c: c[0])


def free_disk_bytes(folder: Path, environ: Optional[Mapping[str, str]] = None) -> tuple[Optional[int], str]:
    """(bytes, source): free space of the file system holding ``folder`` (its nearest existing
    parent), capped by ``SPINEPS_DISK_LIMIT_MB``."""
    environ = os.environ if environ is None else environ
    candidates: list[tuple[int, str]] = []
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        candidates.append((int(shutil.disk_usage(probe).free), f"free space on {probe}"))
    except OSError:
        pass
    env = _env_mb(DISK_LIMIT_ENV, environ)
    if env is not None:
        candidates.append((env, DISK_LIMIT_ENV))
    if not candidates:
        return None, "unknown"
    return min(candidates, key=lambda c: c[0])


def check_scan_resources(header: "HeaderInfo", output_dir: Path, *,
                         model_spacing: Sequence[float] = MODEL_SPACING_MM,
                         environ: Optional[Mapping[str, str]] = None,
                         memory_budget_mb: Optional[int] = None) -> ScanEstimate:
    """Raise before any voxel is read when the scan cannot fit:

    - ``InputError`` when the header's voxel count exceeds
      :data:`spineps.geometry.io.DEFAULT_MAX_VOXELS` (a broken or absurd header);
    - ``ResourceError`` (exit 75) naming the scan, the estimate and what is available, when
      memory or disk is short.

    ``memory_budget_mb`` (``--mem-mb``) replaces the detected memory (:func:`available_memory_bytes`).

    Returns the estimate (logged at debug level) when it fits."""
    from spineps.geometry.io import DEFAULT_MAX_VOXELS

    if header.n_voxels > DEFAULT_MAX_VOXELS:
        raise InputError(f"image too large: shape {tuple(header.shape)} has {header.n_voxels} voxels "
                         f"(limit {DEFAULT_MAX_VOXELS}); refused before reading any voxel", header.path)
    est = estimate_scan(header.spatial_shape, header.spacing, model_spacing)
    mem, mem_src = (int(memory_budget_mb) * _MB, "--mem-mb") if memory_budget_mb else available_memory_bytes(environ)
    if mem is not None and est.memory_bytes > mem:
        raise ResourceError(f"not enough memory for this scan: it needs about {_mb(est.memory_bytes)} "
                            f"({est.n_voxels} voxels, {est.n_model_voxels} at model resolution), "
                            f"{_mb(mem)} available ({mem_src})", header.path)
    disk, disk_src = free_disk_bytes(output_dir, environ)
    if disk is not None and est.disk_bytes > disk:
        raise ResourceError(f"not enough disk space for this scan's outputs: they need up to "
                            f"{_mb(est.disk_bytes)}, {_mb(disk)} free ({disk_src})", header.path)
    log.debug("%s: %s; %s memory available, %s disk free", header.path, est.describe(),
              _mb(mem) if mem is not None else "unknown", _mb(disk) if disk is not None else "unknown")
    return est
