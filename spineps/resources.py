"""Memory and disk estimates for one scan, checked before the scan is loaded.

A scan that cannot fit should fail with a clear message naming it and the numbers, not
crash the process in the middle (the kernel's OOM killer gives no message at all). The
estimate is computed from the header only (:class:`spineps.geometry.io.HeaderInfo`) and
from the networks this run loaded (:class:`Footprint`, what each segmenter's
``memory_footprint()`` says: tile or cutout size, channels, classes, folds, precision,
engine). It is what the scan adds to the process as it stands when the check runs (imports
and models already loaded):

``memory = n_in * IMAGE_BYTES_PER_VOXEL + semantic + instance``, with

- ``n_in``: voxels of the input grid; ``IMAGE_BYTES_PER_VOXEL`` (40 B) covers the float32
  image, its N4-corrected copy, the oriented copies, the masks on the input grid, the
  post-processing and the compressed writes;
- ``semantic = n_sem * (26 B + 2 B * classes * (2 + [folds > 1])) + tile``: ``n_sem`` voxels
  on the semantic model's grid (the input's field of view at the model's spacing, each axis
  at least one tile: nnU-Net pads), holding the resampled image and nnU-Net's float32 copies
  (16 B), its float16 logits, their resampled copy and, with several folds, their sum
  (2 B x classes each), float16 weight counts (2 B) and the int64 argmax (8 B); ``tile =
  SEMANTIC_TILE_BYTES[precision, engine] * tile voxels * first-stage features``;
- ``instance = batch * cutout voxels * (8 B * (1 + in_channels) + INSTANCE_CUTOUT_BYTES[precision,
  engine, layout] * dim) + n_cut * cutout voxels``: one batch of one-hot cutouts and the U-Net's
  activations, and the uint8 predictions of every cutout (``n_cut``: one per 15 mm of the
  field of view along S-I, at most 26);
- the semantic and the instance network do not run at once: the larger of the two network
  terms counts (the model-grid arrays of the semantic phase are counted in full), plus
  :data:`NETWORK_FIXED_BYTES` of allocator and thread slack.

The per-voxel network constants are the measured peaks of the released-size networks
(``benchmarks/results/semantic_official_layout.json``: nnU-Net's 3d_fullres PlainConvUNet,
tile 64 x 256 x 256, 32 first-stage features, 31.2 M parameters: float32 torch +3725 MiB,
ONNX Runtime +1894 MiB, bfloat16 +2158 MiB above the process before the forward;
``benchmarks/results/instance_speed.json``: the released instance U-Net, dim 16, cutout
248 x 304 x 64, batch 1: contiguous float32 +2178 MiB, channels-last +1854 MiB, ONNX Runtime
+5216 MiB), divided by tile voxels x features and rounded up. ``benchmarks/memory_estimate.py``
compares the estimate with every measured peak (``results/memory_estimate.json``). On CUDA the
networks' activations and nnU-Net's logits live in GPU memory, which is not checked here.
A segmenter that does not describe its network (no ``memory_footprint()``) gets the old,
model-agnostic estimate ``n_in * 40 B + n_model * 100 B`` at the official models' spacing
(:data:`MODEL_SPACING_MM`).

Available memory is the smallest of ``MemAvailable`` (``/proc/meminfo``), the room left under
this process's own cgroup memory limits (:func:`cgroup_memory_room`: the cgroup named in
``/proc/self/cgroup``, v2 and v1, found through ``/proc/self/mountinfo``, and every ancestor up
to the mount's root, so a SLURM job's limit on ``.../job_<id>`` counts for its
``step_batch/task_0``: ``limit - usage + reclaimable page cache`` at each level) and
``SPINEPS_MEMORY_LIMIT_MB`` minus this process's resident memory (the variable is a limit on the
whole process, e.g. a SLURM job's ``--mem``, which ``slurm/spineps_array.sbatch`` passes on).
Free disk is ``shutil.disk_usage`` of the output folder, capped by ``SPINEPS_DISK_LIMIT_MB``
when set (that one is free space). Unknown values (no ``/proc``) are not checked.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

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
    "SEMANTIC_TILE_BYTES",
    "INSTANCE_CUTOUT_BYTES",
    "NETWORK_FIXED_BYTES",
    "SemanticFootprint",
    "InstanceFootprint",
    "Footprint",
    "ScanEstimate",
    "estimate_scan",
    "cgroup_memory_room",
    "available_memory_bytes",
    "free_disk_bytes",
    "check_scan_resources",
]

log = logging.getLogger(__name__)

MEMORY_LIMIT_ENV = "SPINEPS_MEMORY_LIMIT_MB"
DISK_LIMIT_ENV = "SPINEPS_DISK_LIMIT_MB"

#: bytes per input-grid voxel held at the peak (float32 image + copies + masks + post-processing)
IMAGE_BYTES_PER_VOXEL = 40
#: bytes per model-grid voxel of the model-agnostic estimate (no footprint): logits of ~15 classes etc.
MODEL_BYTES_PER_VOXEL = 100
#: worst case on disk per input voxel: uint8 + uint16 masks, uncompressed, plus temporaries
OUTPUT_BYTES_PER_VOXEL = 3
#: fixed disk room for sidecars, centroids and figures
OUTPUT_FIXED_BYTES = 4 * 1024 * 1024
#: spacing of the official SPINEPS T2w semantic models (P, I, R; mm): the model-agnostic estimate
MODEL_SPACING_MM: tuple[float, float, float] = (0.75, 0.75, 1.65)

_MB = 1024 * 1024

#: bytes per (tile voxel x first-stage feature) at the peak of one nnU-Net forward, by (precision,
#: engine); measured on the released-size network (module docstring): 29.1 / 14.8 / 16.9, rounded up
SEMANTIC_TILE_BYTES: dict[tuple[str, str], float] = {("fp32", "torch"): 30.0, ("fp32", "onnxruntime"): 15.0,
                                                     ("bf16", "torch"): 17.0}
#: bytes per (cutout voxel x U-Net width ``dim``) of one cutout's forward, by (precision, engine,
#: channels-last); measured on the released instance U-Net: 29.6 / 25.2 / 70.8, rounded up; bfloat16
#: (channels-last) was not measured: the float32 channels-last value bounds it
INSTANCE_CUTOUT_BYTES: dict[tuple[str, str, bool], float] = {
    ("fp32", "torch", False): 30.0, ("fp32", "torch", True): 26.0, ("fp32", "onnxruntime", False): 71.0,
    ("bf16", "torch", True): 26.0, ("bf16", "torch", False): 30.0}
#: allocator and thread slack of a network's forward passes
NETWORK_FIXED_BYTES = 64 * _MB
#: the S-I extent (mm) per vertebra cutout when counting the cutouts of a scan (vertebrae are taller)
_MM_PER_CUTOUT = 15.0
_MAX_CUTOUTS = 26
_AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def _ints(v: Any) -> tuple[int, int, int]:
    return int(v[0]), int(v[1]), int(v[2])


def _floats(v: Any) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


@dataclass(frozen=True)
class SemanticFootprint:
    """What the semantic network needs beyond the arrays (``NnUNetSemanticSegmenter.memory_footprint()``).
    Tuples are in the model's orientation (``orientation``, e.g. P, I, R)."""

    orientation: tuple[str, str, str]
    spacing_min: tuple[float, float, float]
    spacing_max: tuple[float, float, float]
    tile: tuple[int, int, int]  # nnU-Net's patch
    features: int  # channels of the first (full-resolution) stage
    classes: int  # network outputs
    folds: int = 1
    precision: str = "fp32"  # as resolved: fp32, bf16 (CPU), fp16 (CUDA)
    engine: str = "torch"  # as resolved: torch, onnxruntime
    device: str = "cpu"

    def tile_bytes(self) -> int:
        if not self.device.startswith("cpu"):
            return 0  # in GPU memory
        per = SEMANTIC_TILE_BYTES.get((self.precision, self.engine), SEMANTIC_TILE_BYTES[("fp32", "torch")])
        return int(per * math.prod(self.tile) * self.features)

    def bytes_per_voxel(self) -> int:
        """Bytes per model-grid voxel: images and nnU-Net's copies, logits, counts, argmax."""
        logits = 0 if not self.device.startswith("cpu") else 2 * self.classes * (3 if self.folds > 1 else 2)
        return 26 + logits


@dataclass(frozen=True)
class InstanceFootprint:
    """What the instance U-Net needs (``UNetInstanceSegmenter.memory_footprint()``)."""

    orientation: tuple[str, str, str]
    spacing_min: tuple[float, float, float]
    spacing_max: tuple[float, float, float]
    cutout: tuple[int, int, int]
    in_channels: int
    dim: int
    batch: int = 2
    precision: str = "fp32"
    engine: str = "torch"
    channels_last: bool = False
    device: str = "cpu"

    def batch_bytes(self) -> int:
        if not self.device.startswith("cpu"):
            return 0
        key = (self.precision, self.engine, bool(self.channels_last))
        per = INSTANCE_CUTOUT_BYTES.get(key, INSTANCE_CUTOUT_BYTES[("fp32", "onnxruntime", False)])
        return int(self.batch * math.prod(self.cutout) * (8 * (1 + self.in_channels) + per * self.dim))


@dataclass(frozen=True)
class Footprint:
    """The networks of a run, as far as their memory goes (None: that phase does not run, or
    its segmenter does not say)."""

    semantic: Optional[SemanticFootprint] = None
    instance: Optional[InstanceFootprint] = None

    @classmethod
    def of(cls, semantic: Any = None, instance: Any = None) -> Optional["Footprint"]:
        """From segmenters with ``memory_footprint()`` (a dict of the fields above); None when
        the semantic segmenter of an image run has none (the model-agnostic estimate is used)."""
        sem = _footprint(semantic, SemanticFootprint)
        ins = _footprint(instance, InstanceFootprint)
        if semantic is not None and sem is None:
            return None
        if semantic is None and instance is not None and ins is None:
            return None
        return cls(sem, ins)


def _footprint(segmenter: Any, kind: Any) -> Any:
    describe = getattr(segmenter, "memory_footprint", None)
    if segmenter is None or describe is None:
        return None
    raw = dict(describe())
    names = {f.name for f in fields(kind)}
    raw = {k: v for k, v in raw.items() if k in names}
    for key in ("orientation",):
        raw[key] = tuple(str(c) for c in raw[key])
    for key in ("spacing_min", "spacing_max"):
        raw[key] = _floats(raw[key])
    for key in ("tile", "cutout"):
        if key in raw:
            raw[key] = _ints(raw[key])
    return kind(**raw)


@dataclass(frozen=True)
class ScanEstimate:
    """What one scan needs (bytes), from its header."""

    n_voxels: int
    n_model_voxels: int
    memory_bytes: int
    disk_bytes: int
    network_bytes: int = 0  # the largest network term (tile or cutout batch) included in memory_bytes

    def describe(self) -> str:
        net = f", {_mb(self.network_bytes)} of it for the network's forward" if self.network_bytes else ""
        return (f"{self.n_voxels} voxels ({self.n_model_voxels} at model resolution): about "
                f"{_mb(self.memory_bytes)} of memory{net} and {_mb(self.disk_bytes)} of disk")


def _mb(n: float) -> str:
    return f"{n / _MB:,.1f} MB" if n < 10 * _MB else f"{n / _MB:,.0f} MB"


def _extent_mm(shape: Sequence[int], spacing: Sequence[float], affine: Any) -> tuple[list[float], list[float]]:
    """Field of view (mm) and voxel size along the world axes x (L-R), y (P-A), z (I-S):
    each array axis goes to the world axis it points along most (its largest affine component);
    without an affine, array axes are taken as x, y, z."""
    fov, vox = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    for a in range(3):
        n, sp = max(int(shape[a]), 1), abs(float(spacing[a])) or 1.0
        w = a
        if affine is not None:
            col = [abs(float(affine[r][a])) for r in range(3)]
            w = col.index(max(col))
        fov[w], vox[w] = n * sp, sp
    return fov, vox


def _model_grid(shape: Sequence[int], spacing: Sequence[float], affine: Any, orientation: Sequence[str],
                lo: Sequence[float], hi: Sequence[float], minimum: Sequence[int] = (1, 1, 1)) -> tuple[int, float]:
    """Voxels of the input on a model's grid (its spacing clamped into [lo, hi] per axis, at
    least ``minimum`` per axis), and the S-I extent in mm."""
    fov, vox = _extent_mm(shape, spacing, affine)
    n = 1
    for k, code in enumerate(orientation):
        w = _AXIS_OF_CODE[code]
        target = min(max(vox[w], float(lo[k])), float(hi[k]))
        n *= max(int(math.ceil(fov[w] / target - 1e-6)), int(minimum[k]), 1)
    return n, fov[2]


def estimate_scan(shape: Sequence[int], spacing: Sequence[float],
                  model_spacing: Sequence[float] = MODEL_SPACING_MM, *, affine: Any = None,
                  footprint: Optional[Footprint] = None) -> ScanEstimate:
    """Memory and disk one scan of ``shape`` (3 spatial axes), ``spacing`` (mm) and ``affine``
    (for the axes' directions; optional) needs with the networks of ``footprint`` (see the
    module docstring). Without a footprint: the model-agnostic ``n_in * 40 B + n_model * 100 B``,
    ``n_model`` at ``model_spacing`` (never fewer than ``n_in``)."""
    n = 1
    for s in shape[:3]:
        n *= max(int(s), 1)
    disk = n * OUTPUT_BYTES_PER_VOXEL + OUTPUT_FIXED_BYTES
    if footprint is None:
        vol_in = math.prod(abs(float(sp)) for sp in spacing[:3])
        vol_model = math.prod(float(sp) for sp in model_spacing[:3])
        n_model = max(n, int(n * vol_in / vol_model)) if vol_model > 0 else n
        return ScanEstimate(n, n_model, int(n * IMAGE_BYTES_PER_VOXEL + n_model * MODEL_BYTES_PER_VOXEL), int(disk))
    memory, n_model, net = n * IMAGE_BYTES_PER_VOXEL, n, 0
    sem, ins = footprint.semantic, footprint.instance
    if sem is not None:
        n_model, _ = _model_grid(shape, spacing, affine, sem.orientation, sem.spacing_min, sem.spacing_max, sem.tile)
        memory += n_model * sem.bytes_per_voxel()
        net = sem.tile_bytes()
    if ins is not None:
        n_inst, si_mm = _model_grid(shape, spacing, affine, ins.orientation, ins.spacing_min, ins.spacing_max)
        n_cut = min(_MAX_CUTOUTS, int(si_mm // _MM_PER_CUTOUT) + 2)
        memory += n_inst * 16 + n_cut * math.prod(ins.cutout)
        net = max(net, ins.batch_bytes())
    memory += net + (NETWORK_FIXED_BYTES if net else 0)
    return ScanEstimate(n, n_model, int(memory), int(disk), int(net))


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


def _process_rss(path: Path = Path("/proc/self/status")) -> int:
    """This process's resident memory (``VmRSS``), 0 when unknown."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


#: v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages)
_V1_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class _CgroupMount:
    version: int  # 1 or 2
    mount_point: Path  # where it is mounted here
    root: Path  # the cgroup path the mount shows at its mount point (mountinfo's 4th field)


def _memory_mounts(mountinfo: Path) -> list[_CgroupMount]:
    """cgroup2 mounts, and cgroup (v1) mounts with the memory controller, from ``mountinfo``."""
    out: list[_CgroupMount] = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, sep, right = line.partition(" - ")
        parts, tail = left.split(), right.split()
        if not sep or len(parts) < 5 or len(tail) < 1:
            continue
        fstype, opts = tail[0], (tail[2] if len(tail) > 2 else "")
        root, point = _unescape(parts[3]), _unescape(parts[4])
        if fstype == "cgroup2":
            out.append(_CgroupMount(2, Path(point), Path(root)))
        elif fstype == "cgroup" and "memory" in opts.split(","):
            out.append(_CgroupMount(1, Path(point), Path(root)))
    return out


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def _own_cgroups(proc_cgroup: Path) -> dict[int, str]:
    """The cgroup path of this process per version: v2 (``0::/path``) and v1 memory (``N:memory,...:/path``)."""
    out: dict[int, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ident, controllers, path = parts
        if ident == "0" and controllers == "":
            out.setdefault(2, path)
        elif "memory" in controllers.split(","):
            out[1] = path
    return out


def _levels(mount: _CgroupMount, cgroup: str) -> list[Path]:
    """The folders of this process's cgroup and its ancestors under ``mount`` (innermost first).
    The cgroup path is relative to the hierarchy's root; the mount shows ``mount.root`` at its
    mount point (a container without a cgroup namespace sees ``/docker/<id>`` there)."""
    path = Path(cgroup)
    try:
        rel = path.relative_to(mount.root)
    except ValueError:  # a cgroup namespace, or a path outside what is mounted: the mount point is ours
        rel = Path(".")
    leaf = mount.mount_point / rel
    if not leaf.is_dir():
        leaf = mount.mount_point
    out = [leaf]
    while out[-1] != mount.mount_point and mount.mount_point in out[-1].parents:
        out.append(out[-1].parent)
    return out


def _level_room(version: int, folder: Path) -> Optional[tuple[int, int, int]]:
    """(room, limit, usage) under the memory limit set on ``folder`` itself, None if it sets none."""
    if version == 2:
        limit = _read_int(folder / "memory.max")
        if limit is None:
            return None
        usage = _read_int(folder / "memory.current") or 0
        reclaimable = _stat_value(folder / "memory.stat", "inactive_file")
    else:
        limit = _read_int(folder / "memory.limit_in_bytes")
        hier = _stat_value(folder / "memory.stat", "hierarchical_memory_limit")
        if hier and (limit is None or hier < limit):  # the ancestors' limit, where they are not mounted here
            limit = hier
        if limit is None or limit >= _V1_UNLIMITED:
            return None
        usage = _read_int(folder / "memory.usage_in_bytes") or 0
        reclaimable = _stat_value(folder / "memory.stat", "total_inactive_file") or \
            _stat_value(folder / "memory.stat", "inactive_file")
    return max(0, limit - usage + reclaimable), limit, usage


def cgroup_memory_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                       mountinfo: Path = Path("/proc/self/mountinfo")) -> Optional[tuple[int, str]]:
    """(bytes, where) left under the tightest memory limit of this process's own cgroups (v2 and
    v1, the cgroup itself and every ancestor up to the mount root), None when none is limited.
    ``where`` names the cgroup folder and its numbers, e.g. ``cgroup v1 /sys/fs/cgroup/memory/
    slurm/uid_0/job_42: limit 2,048 MB, 512 MB in use``."""
    own = _own_cgroups(proc_cgroup)
    best: Optional[tuple[int, str]] = None
    for mount in _memory_mounts(mountinfo):
        cgroup = own.get(mount.version)
        if cgroup is None:
            continue
        for folder in _levels(mount, cgroup):
            got = _level_room(mount.version, folder)
            if got is None:
                continue
            room, limit, usage = got
            if best is None or room < best[0]:
                best = (room, f"cgroup v{mount.version} {folder}: limit {_mb(limit)}, {_mb(usage)} in use")
    return best


def available_memory_bytes(environ: Optional[Mapping[str, str]] = None) -> tuple[Optional[int], str]:
    """(bytes, where the number comes from) - the smallest of MemAvailable, the room under this
    process's cgroup limits and ``SPINEPS_MEMORY_LIMIT_MB`` minus this process's resident memory;
    (None, "unknown") when none can be read."""
    environ = os.environ if environ is None else environ
    candidates: list[tuple[int, str]] = []
    mem = _meminfo_available()
    if mem is not None:
        candidates.append((mem, "MemAvailable in /proc/meminfo"))
    cg = cgroup_memory_room()
    if cg is not None:
        candidates.append((cg[0], f"cgroup memory limit: {cg[1]}"))
    env = _env_mb(MEMORY_LIMIT_ENV, environ)
    if env is not None:
        rss = _process_rss()
        used = f" minus {_mb(rss)} this process uses" if rss else ""
        candidates.append((max(0, env - rss), f"{MEMORY_LIMIT_ENV}={_mb(env)}{used}"))
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
                         footprint: Optional[Footprint] = None,
                         memory_budget_mb: Optional[int] = None) -> ScanEstimate:
    """Raise before any voxel is read when the scan cannot fit:

    - ``InputError`` when the header's voxel count exceeds
      :data:`spineps.geometry.io.DEFAULT_MAX_VOXELS` (a broken or absurd header);
    - ``ResourceError`` (exit 75) naming the scan, the estimate and what is available, when
      memory or disk is short.

    ``footprint``: the run's networks (:meth:`Footprint.of`); None: the model-agnostic estimate.
    ``memory_budget_mb`` (``--mem-mb``) replaces the detected memory (:func:`available_memory_bytes`).
    Returns the estimate (logged at debug level) when it fits."""
    from spineps.geometry.io import DEFAULT_MAX_VOXELS

    if header.n_voxels > DEFAULT_MAX_VOXELS:
        raise InputError(f"image too large: shape {tuple(header.shape)} has {header.n_voxels} voxels "
                         f"(limit {DEFAULT_MAX_VOXELS}); refused before reading any voxel", header.path)
    est = estimate_scan(header.spatial_shape, header.spacing, model_spacing, affine=header.affine, footprint=footprint)
    mem, mem_src = (int(memory_budget_mb) * _MB, "--mem-mb") if memory_budget_mb else available_memory_bytes(environ)
    if mem is not None and est.memory_bytes > mem:
        net = f"; {_mb(est.network_bytes)} of it for the network's forward" if est.network_bytes else ""
        raise ResourceError(f"not enough memory for this scan: it needs about {_mb(est.memory_bytes)} "
                            f"({est.n_voxels} voxels, {est.n_model_voxels} at model resolution{net}), "
                            f"{_mb(mem)} available ({mem_src})", header.path)
    disk, disk_src = free_disk_bytes(output_dir, environ)
    if disk is not None and est.disk_bytes > disk:
        raise ResourceError(f"not enough disk space for this scan's outputs: they need up to "
                            f"{_mb(est.disk_bytes)}, {_mb(disk)} free ({disk_src})", header.path)
    log.debug("%s: %s; %s memory available, %s disk free", header.path, est.describe(),
              _mb(mem) if mem is not None else "unknown", _mb(disk) if disk is not None else "unknown")
    return est
