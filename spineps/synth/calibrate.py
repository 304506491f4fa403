"""Measure vertebral bodies and discs in labelled masks (real or synthetic), to calibrate
and check the phantom's sizes against real anatomy.

For each labelled structure: volume (ml); in its mid-sagittal slab, the height through a
central column (+-3 mm) along the minor principal axis of the sagittal section, and the
depth along the major axis through mid-height (+-2 mm); the left-right width through the
centre. Measurements are made in world mm, so
they do not depend on the array orientation or spacing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from spineps.geometry.volume import Volume

__all__ = ["StructureSize", "measure_structures", "measure_real_folder", "summarise"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StructureSize:
    value: int
    volume_ml: float
    height_mm: float
    depth_mm: float
    width_mm: float


def _measure_one(pts: np.ndarray, vox_ml: float) -> tuple[float, float, float, float]:
    """Volume, and height/depth in the mid-sagittal slab (|x - centre| <= 2 mm, world RAS):
    the height axis is the minor principal axis of the slab's (A, S) section, so thick,
    interpolated left-right sampling does not bias it."""
    c = pts.mean(0)
    q = pts - c
    mid = np.abs(q[:, 0]) <= 2.0
    if mid.sum() < 10:
        return len(pts) * vox_ml, float("nan"), float("nan"), float("nan")
    qs = q[mid][:, 1:]
    cs = qs.mean(0)
    qs = qs - cs
    evals, evecs = np.linalg.eigh(qs.T @ qs / len(qs))
    h_ax, a_ax = evecs[:, 0], evecs[:, 1]
    ph, pa = qs @ h_ax, qs @ a_ax
    col = np.abs(pa) <= 3.0
    height = float(ph[col].max() - ph[col].min()) + 1.0 if col.sum() > 3 else float("nan")
    slab = np.abs(ph) <= 2.0
    depth = float(pa[slab].max() - pa[slab].min()) + 1.0 if slab.sum() > 3 else float("nan")
    # width: left-right extent through the centre (poorly sampled in thick-slice data)
    row = (np.abs(q[:, 1]) <= 3.0) & (np.abs(q[:, 2]) <= 3.0)
    width = float(q[row, 0].max() - q[row, 0].min()) + 1.0 if row.sum() > 3 else float("nan")
    return len(pts) * vox_ml, height, depth, width


def measure_structures(mask: Volume, values: Optional[Iterable[int]] = None) -> dict[int, StructureSize]:
    """Sizes of every labelled value (or the given ones) of an instance-style mask."""
    data = np.asarray(mask.data)
    vals = sorted(int(v) for v in np.unique(data) if v) if values is None else [int(v) for v in values]
    vox_ml = mask.voxel_volume / 1000.0
    out: dict[int, StructureSize] = {}
    for v in vals:
        idx = np.argwhere(data == v)
        if len(idx) < 20:
            continue
        pts = idx @ mask.affine[:3, :3].T + mask.affine[:3, 3]
        vol, h, d, w = _measure_one(pts, vox_ml)
        out[v] = StructureSize(v, vol, h, d, w)
    return out


def measure_real_folder(folder: Path, pattern: str = "*_desc-vert_dseg.nii.gz") -> dict[int, list[StructureSize]]:
    """Measure every ``desc-vert`` mask in a folder; value -> list of sizes over the cases."""
    import nibabel as nib

    res: dict[int, list[StructureSize]] = {}
    for path in sorted(Path(folder).glob(pattern)):
        img: Any = nib.load(str(path))  # an image class of nibabel's choosing
        vol = Volume(np.asarray(img.dataobj).astype(np.int32), img.affine)
        for v, size in measure_structures(vol).items():
            res.setdefault(v, []).append(size)
    return res


def summarise(sizes: dict[int, list[StructureSize]]) -> dict[int, dict[str, float]]:
    """Median (and 10th/90th percentile) of each measure per value."""
    out: dict[int, dict[str, float]] = {}
    for v, lst in sorted(sizes.items()):
        row: dict[str, float] = {"n": float(len(lst))}
        for key in ("volume_ml", "height_mm", "depth_mm", "width_mm"):
            arr = np.array([getattr(s, key) for s in lst], float)
            arr = arr[np.isfinite(arr)]
            if len(arr):
                row[key] = float(np.median(arr))
                row[key + "_p10"] = float(np.percentile(arr, 10))
                row[key + "_p90"] = float(np.percentile(arr, 90))
        out[v] = row
    return out
