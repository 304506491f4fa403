"""Label volumes in mm^3 (voxel counts times the voxel volume of the grid).

The voxel volume is ``|det(A)|`` of the affine's 3x3 part, so anisotropic and oblique grids
are handled exactly: a voxel count is exact for the rasterised mask, and the error against
a continuous object is the partial-volume error of its surface (about half a voxel layer).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from spineps.geometry.volume import Volume

__all__ = ["label_counts", "label_volumes", "semantic_class_volumes", "instance_volumes"]


def label_counts(data: np.ndarray) -> dict[int, int]:
    """Non-zero label value -> voxel count (one ``bincount`` over the array)."""
    arr = np.asarray(data)
    if arr.size == 0:
        return {}
    flat = arr.ravel()
    if flat.dtype.kind not in "iu":
        flat = flat.astype(np.int64)
    lo = int(flat.min())
    if lo < 0:
        raise ValueError(f"label array holds negative values (min {lo})")
    counts = np.bincount(flat)
    nz = np.flatnonzero(counts)
    return {int(v): int(counts[v]) for v in nz if v != 0}


def label_volumes(vol: Volume, counts: Optional[dict[int, int]] = None) -> dict[int, float]:
    """Non-zero label value -> volume in mm^3."""
    counts = label_counts(vol.data) if counts is None else counts
    vv = vol.voxel_volume
    return {v: float(c) * vv for v, c in counts.items()}


def semantic_class_volumes(semantic: Volume) -> dict[int, float]:
    """Volume (mm^3) of every semantic class of :data:`spineps.labels.SEMANTIC` (0 when absent)."""
    from spineps.labels import SEMANTIC

    vols = label_volumes(semantic)
    return {lab.value: vols.get(lab.value, 0.0) for lab in SEMANTIC}


def instance_volumes(instance: Volume) -> dict[int, float]:
    """Volume (mm^3) of every vertebra, disc and endplate instance present."""
    return label_volumes(instance)
