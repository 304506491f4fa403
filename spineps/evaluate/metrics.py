"""Voxel-overlap and surface-distance metrics between a reference and a predicted mask.

Every function takes boolean (or label) arrays on ONE grid plus the voxel spacing in mm and
returns a :class:`Score`: the value and a note that says how an empty mask was handled.

Empty masks (documented in ``docs/evaluation.md``, tested in ``tests/test_evaluate_metrics.py``):

=====================  ============  ==============  ==========================================
reference / prediction  Dice          ASSD (mm)       note / in summaries
=====================  ============  ==============  ==========================================
both empty              1.0           0.0             ``both_empty``: written, left out of means
reference empty         0.0           undefined (NaN) ``ref_empty``: Dice counted, ASSD counted as
                                                      undefined (``n_undefined``)
prediction empty        0.0           undefined (NaN) ``pred_empty``: same
=====================  ============  ==============  ==========================================

Surfaces are the mask voxels with at least one face neighbour (6-connectivity) outside the
mask; voxels on the image border count as surface (outside the image is background).
Distances are Euclidean in millimetres between voxel centres, with the spacing of each
array axis (anisotropic voxels handled exactly: the affine of a valid volume is orthogonal,
so index distances scaled per axis are world distances). They come from one exact
Euclidean distance transform (``scipy.ndimage.distance_transform_edt`` with ``sampling``)
per direction, computed on the bounding box of both masks only.

ASSD = (mean distance from the reference surface voxels to the predicted surface + mean
distance from the predicted surface voxels to the reference surface) / 2: the definition of
medpy and of panoptica, the evaluation library the SPINEPS authors used (paper section 2.6).
It differs from the "pooled" variant (all distances of both directions in one mean) when
the two surfaces have different voxel counts; :func:`assd_pooled` gives that one.
HD95 is the 95th percentile of the pooled distances of both directions (as in panoptica).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "Score",
    "BOTH_EMPTY",
    "REF_EMPTY",
    "PRED_EMPTY",
    "NO_MATCH",
    "joint_bbox",
    "dice",
    "surface",
    "surface_distances",
    "assd",
    "assd_pooled",
    "hd95",
]

BOTH_EMPTY = "both_empty"
REF_EMPTY = "ref_empty"
PRED_EMPTY = "pred_empty"
NO_MATCH = "no_match"

_FACES = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class Score:
    """A metric value with how it came about. ``value`` is NaN only when the metric is
    undefined (e.g. ASSD with one empty mask); ``note`` then says why."""

    value: float
    note: str = ""

    @property
    def defined(self) -> bool:
        return math.isfinite(self.value)

    @property
    def in_summary(self) -> bool:
        """Whether summaries (means, SD, median) use this value."""
        return self.defined and self.note != BOTH_EMPTY


def joint_bbox(*masks: np.ndarray, pad: int = 0) -> Optional[tuple[slice, ...]]:
    """The smallest box holding every non-zero voxel of all ``masks`` (same shape), grown by
    ``pad`` voxels and clipped to the array; ``None`` when all are empty."""
    shape = masks[0].shape
    lo = np.full(len(shape), np.iinfo(np.int64).max)
    hi = np.full(len(shape), -1)
    for m in masks:
        if m.shape != shape:
            raise ValueError(f"masks have different shapes: {m.shape} vs {shape}")
        for ax in range(m.ndim):
            other = tuple(a for a in range(m.ndim) if a != ax)
            nz = np.flatnonzero(np.any(m, axis=other))
            if nz.size:
                lo[ax] = min(lo[ax], nz[0])
                hi[ax] = max(hi[ax], nz[-1])
    if np.any(hi < 0):
        return None
    return tuple(slice(max(0, int(a) - pad), min(n, int(b) + 1 + pad)) for a, b, n in zip(lo, hi, shape))


def dice(ref: np.ndarray, pred: np.ndarray) -> Score:
    """Dice = 2|R∩P| / (|R|+|P|) of two boolean masks (see the module table for empties)."""
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"masks have different shapes: {ref.shape} vs {pred.shape}")
    n_ref = int(np.count_nonzero(ref))
    n_pred = int(np.count_nonzero(pred))
    if n_ref == 0 and n_pred == 0:
        return Score(1.0, BOTH_EMPTY)
    if n_ref == 0:
        return Score(0.0, REF_EMPTY)
    if n_pred == 0:
        return Score(0.0, PRED_EMPTY)
    inter = int(np.count_nonzero(ref & pred))
    return Score(2.0 * inter / (n_ref + n_pred))


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: in the mask, with a face neighbour outside it (the
    outside of the array counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    inner = ndimage.binary_erosion(mask, structure=_FACES, border_value=0)
    return mask & ~inner


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must hold {ndim} positive numbers, got {spacing!r}")
    return sp


def surface_distances(ref: np.ndarray, pred: np.ndarray,
                      spacing: Sequence[float]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(distances in mm from every reference surface voxel to the predicted surface, and from
    every predicted surface voxel to the reference surface); ``None`` when a mask is empty.

    Works on the joint bounding box (padded by one voxel, so the surface of a mask that
    touches the box is found as it would be in the full array; the nearest surface voxel of
    the other mask always lies inside the box, so the cropped transform is exact)."""
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"masks have different shapes: {ref.shape} vs {pred.shape}")
    sp = _spacing(spacing, ref.ndim)
    if not ref.any() or not pred.any():
        return None
    box = joint_bbox(ref, pred, pad=1)
    assert box is not None
    # where the box is clipped by the array border, erosion treats the outside as background,
    # exactly as it does on the full array
    r, p = ref[box], pred[box]
    s_ref = surface(r)
    s_pred = surface(p)
    d_to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp)
    d_to_ref = ndimage.distance_transform_edt(~s_ref, sampling=sp)
    return np.asarray(d_to_pred[s_ref], dtype=np.float64), np.asarray(d_to_ref[s_pred], dtype=np.float64)


def assd(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> Score:
    """Average symmetric surface distance in mm (see the module table for empties)."""
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not has_ref and not has_pred:
        _spacing(spacing, ref.ndim)
        return Score(0.0, BOTH_EMPTY)
    if not has_ref:
        return Score(math.nan, REF_EMPTY)
    if not has_pred:
        return Score(math.nan, PRED_EMPTY)
    dists = surface_distances(ref, pred, spacing)
    assert dists is not None
    a, b = dists
    return Score(float((a.mean() + b.mean()) / 2.0))


def assd_pooled(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> Score:
    """The pooled variant: all surface distances of both directions in one mean."""
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if not ref.any() or not pred.any():
        return assd(ref, pred, spacing)
    dists = surface_distances(ref, pred, spacing)
    assert dists is not None
    a, b = dists
    return Score(float((a.sum() + b.sum()) / (a.size + b.size)))


def hd95(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> Score:
    """95th percentile of the pooled symmetric surface distances in mm (empties as ASSD)."""
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not has_ref and not has_pred:
        return Score(0.0, BOTH_EMPTY)
    if not has_ref:
        return Score(math.nan, REF_EMPTY)
    if not has_pred:
        return Score(math.nan, PRED_EMPTY)
    dists = surface_distances(ref, pred, spacing)
    assert dists is not None
    return Score(float(np.percentile(np.concatenate(dists), 95)))
