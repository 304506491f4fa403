"""Training targets from partially labelled real scans.

The real scans of ``shared/data/real`` annotate one structure each: the vertebral bodies
(VB2, VB3, VB3extra) or the lumbar discs (IVD). A target that marks everything else as
nnU-Net's *ignore* label teaches the network where bodies are but never where they end:
trained that way, bodies came out ~1.8x too large (they swallowed the disc spaces and
spread laterally). The anatomy tells more than the annotation says:

- between two annotated neighbouring bodies, inside the footprint both share, lies their
  disc (and the reverse: between two annotated discs lies a vertebral body);
- directly below the annotated L5/S1 disc lies the top of the sacrum (S1);
- the thin layer of a body next to its disc is where the network's endplate class lives, so
  it is left unknown rather than called body;
- lateral to a body or disc, in the front part of the column, and well in front of it, is
  soft tissue (psoas, vessels, viscera): background.

Every rule keeps a safety margin (``Margins``) and leaves whatever it cannot decide as the
ignore label. All arrays are (P, I, R) volumes of the model orientation (``I`` grows
downwards, ``P`` grows backwards); margins are in millimetres and converted with the voxel
spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["Margins", "stack_order", "gap_between", "surface_zone", "labels_from_bodies", "labels_from_discs",
           "below_lowest_plane", "sacrum_below_l5"]


@dataclass(frozen=True)
class Margins:
    """Safety margins (mm) of the label rules."""

    #: the region this far in front of the most anterior annotated voxel of a row is background
    anterior_mm: float = 8.0
    #: lateral to a structure by more than this (front part of the column only) is background
    lateral_mm: float = 4.0
    #: the front fraction of a structure's depth where the lateral rule applies
    lateral_front_fraction: float = 0.6
    #: a shared footprint is shrunk by this before the gap between two structures is labelled
    footprint_erosion_mm: float = 2.0
    #: the ends of a gap (next to each structure) stay unknown over this length
    gap_end_mm: float = 1.0
    #: the layer of a body next to its top or bottom that stays unknown (endplate or body)
    endplate_mm: float = 2.0
    #: gaps longer than this (mm) are a missing level, not a disc / body
    max_disc_gap_mm: float = 20.0
    max_body_gap_mm: float = 45.0
    #: the S1 region below the L5/S1 disc labelled sacrum: from/to this far below the disc
    sacrum_from_mm: float = 2.0
    sacrum_to_mm: float = 12.0


def stack_order(inst: np.ndarray) -> list[int]:
    """Instance ids of ``inst`` (> 0) from the top (smallest I) to the bottom."""
    ids = [int(v) for v in np.unique(inst) if v > 0]
    if not ids:
        return []
    centres = ndimage.center_of_mass(np.ones(inst.shape, np.uint8), inst, ids)
    return [i for _, i in sorted(zip((c[1] for c in centres), ids))]


def _column_ends(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (P, R) column: the first and last I index of ``mask`` and whether it has any."""
    has = np.asarray(mask.any(axis=1))
    n = mask.shape[1]
    idx = np.arange(n)[None, :, None]
    first = np.where(mask, idx, n).min(axis=1)
    last = np.where(mask, idx, -1).max(axis=1)
    return first, last, has


def gap_between(upper: np.ndarray, lower: np.ndarray, spacing: Sequence[float], erosion_mm: float, end_mm: float,
                max_gap_mm: float) -> np.ndarray:
    """Voxels between the bottom of ``upper`` and the top of ``lower``, column by column along I,
    inside the (P, R) footprint both share shrunk by ``erosion_mm``; the ``end_mm`` next to
    each structure left out; columns whose gap exceeds ``max_gap_mm`` left out."""
    sp, si, sr = (float(s) for s in spacing)
    _, last_u, has_u = _column_ends(upper)
    first_l, _, has_l = _column_ends(lower)
    foot = has_u & has_l
    er = (max(0, int(round(erosion_mm / sp))), max(0, int(round(erosion_mm / sr))))
    if any(er):
        foot = ndimage.binary_erosion(foot, structure=np.ones((2 * er[0] + 1, 2 * er[1] + 1), bool))
    gap = (first_l - last_u - 1).astype(float) * si
    foot &= (gap > 0) & (gap <= max_gap_mm)
    end = int(np.ceil(end_mm / si)) if end_mm > 0 else 0
    lo = last_u + 1 + end
    hi = first_l - 1 - end  # inclusive
    i = np.arange(upper.shape[1])[None, :, None]
    return foot[:, None, :] & (i >= lo[:, None, :]) & (i <= hi[:, None, :])


def surface_zone(mask: np.ndarray, spacing_i: float, depth_mm: float) -> np.ndarray:
    """Voxels of ``mask`` within ``depth_mm`` of its top or bottom in their (P, R) column."""
    first, last, _ = _column_ends(mask)
    d = max(1, int(np.ceil(depth_mm / float(spacing_i))))
    i = np.arange(mask.shape[1])[None, :, None]
    return mask & ((i < first[:, None, :] + d) | (i > last[:, None, :] - d))


def _anterior_background(column: np.ndarray, spacing_p: float, margin_mm: float) -> np.ndarray:
    """The region more than ``margin_mm`` anterior to the most anterior voxel of ``column`` in
    each I row (interpolated between rows, only inside the I range of ``column``)."""
    P, n_i, _ = column.shape
    rows_any = column.any(axis=2)  # (P, I)
    rows = np.flatnonzero(rows_any.any(axis=0))
    out = np.zeros(column.shape, bool)
    if not rows.size:
        return out
    first_p = np.where(rows_any, np.arange(P)[:, None], P).min(axis=0).astype(float)
    span = np.arange(rows[0], rows[-1] + 1)
    thresh = np.full(n_i, -1.0)
    thresh[span] = np.interp(span, rows, first_p[rows]) - margin_mm / float(spacing_p)
    out[:] = (np.arange(P)[:, None] < thresh[None, :])[:, :, None]
    return out


def _lateral_background(struct: np.ndarray, spacing: Sequence[float], margin_mm: float,
                        front_fraction: float) -> np.ndarray:
    """Voxels more than ``margin_mm`` to the left or right of ``struct`` in its (P, I) rows,
    in the front ``front_fraction`` of its depth at that level; rows where ``struct`` touches
    the image's left or right border are left out (its lateral end is not in view)."""
    sp, _, sr = (float(s) for s in spacing)
    P, _, R = struct.shape
    has = struct.any(axis=2)  # (P, I)
    r = np.arange(R)[None, None, :]
    rmin = np.where(struct, r, R).min(axis=2)
    rmax = np.where(struct, r, -1).max(axis=2)
    # front part of the structure at each I level
    p = np.arange(P)[:, None]
    p_first = np.where(has, p, P).min(axis=0)
    p_last = np.where(has, p, -1).max(axis=0)
    front = has & (p <= p_first[None, :] + front_fraction * (p_last - p_first)[None, :])
    front &= (rmin > 0) & (rmax < R - 1)
    m = margin_mm / sr
    out = front[:, :, None] & ((r < rmin[:, :, None] - m) | (r > rmax[:, :, None] + m))
    del sp
    return out


def labels_from_bodies(inst: np.ndarray, spacing: Sequence[float], *, body: int, disc: int, ignore: int,
                       margins: Margins = Margins()) -> np.ndarray:
    """Training target (network indices) of a scan whose vertebral bodies are annotated as
    instances (``inst`` > 0, one id per body): bodies (their endplate layers unknown), the
    discs between neighbouring bodies, background in front of and beside the column; the
    rest ``ignore``."""
    sp, si, _ = (float(s) for s in spacing)
    out = np.full(inst.shape, ignore, np.uint8)
    bodies = inst > 0
    discs = np.zeros(inst.shape, bool)
    order = stack_order(inst)
    for up, lo in zip(order[:-1], order[1:]):
        discs |= gap_between(inst == up, inst == lo, spacing, margins.footprint_erosion_mm, margins.gap_end_mm,
                             margins.max_disc_gap_mm)
    column = bodies | discs
    out[_anterior_background(column, sp, margins.anterior_mm)] = 0
    for v in order:
        out[_lateral_background(inst == v, spacing, margins.lateral_mm, margins.lateral_front_fraction)] = 0
    out[discs] = disc
    core = bodies.copy()
    for v in order:
        core &= ~surface_zone(inst == v, si, margins.endplate_mm)
    out[bodies] = ignore
    out[core] = body
    return out


def labels_from_discs(inst: np.ndarray, spacing: Sequence[float], *, body: int, disc: int, sacrum: int,
                      ignore: int, lowest_is_l5_s1: bool, margins: Margins = Margins()) -> np.ndarray:
    """Training target of a scan whose discs are annotated as instances: discs, the bodies
    between neighbouring discs (their endplate layers unknown), the top of S1 under the
    L5/S1 disc when ``lowest_is_l5_s1``, background in front of and beside the column; the
    rest ``ignore``."""
    sp, si, _ = (float(s) for s in spacing)
    out = np.full(inst.shape, ignore, np.uint8)
    discs = inst > 0
    bodies = np.zeros(inst.shape, bool)
    order = stack_order(inst)
    for up, lo in zip(order[:-1], order[1:]):
        bodies |= gap_between(inst == up, inst == lo, spacing, margins.footprint_erosion_mm,
                              margins.endplate_mm, margins.max_body_gap_mm)
    sac = np.zeros(inst.shape, bool)
    if lowest_is_l5_s1 and order:
        low = inst == order[-1]
        _, last, has = _column_ends(low)
        er = max(0, int(round(margins.footprint_erosion_mm / sp)))
        foot = ndimage.binary_erosion(has, structure=np.ones((2 * er + 1, 2 * er + 1), bool)) if er else has
        i = np.arange(inst.shape[1])[None, :, None]
        a = int(np.ceil(margins.sacrum_from_mm / si))
        b = int(np.floor(margins.sacrum_to_mm / si))
        sac = foot[:, None, :] & (i >= last[:, None, :] + a) & (i <= last[:, None, :] + b)
    column = discs | bodies | sac
    out[_anterior_background(column, sp, margins.anterior_mm)] = 0
    for v in order:
        out[_lateral_background(inst == v, spacing, margins.lateral_mm, margins.lateral_front_fraction)] = 0
    out[bodies] = body
    out[sac] = sacrum
    out[discs] = disc
    return out


def below_lowest_plane(inst: np.ndarray, spacing: Sequence[float], margin_mm: float) -> np.ndarray:
    """Voxels more than ``margin_mm`` below the inferior surface of the lowest instance of
    ``inst``: a plane ``I = a P + b R + c`` (mm) fitted to the lowest voxel of each of its
    (P, R) columns, so a tilted endplate (lordosis, sacral slope) tilts the boundary."""
    order = stack_order(inst)
    out = np.zeros(inst.shape, bool)
    if not order:
        return out
    sp, si, sr = (float(s) for s in spacing)
    _, last, has = _column_ends(inst == order[-1])
    pp, rr = np.nonzero(has)
    a = np.c_[pp * sp, rr * sr, np.ones(pp.size)]
    if pp.size >= 3 and np.linalg.matrix_rank(a) == 3:
        coef = np.linalg.lstsq(a, last[pp, rr] * si, rcond=None)[0]
    else:
        coef = np.array([0.0, 0.0, float(last[pp, rr].max()) * si])
    P, n_i, R = inst.shape
    plane = (coef[0] * np.arange(P)[:, None] * sp + coef[1] * np.arange(R)[None, :] * sr + coef[2])  # (P, R) mm
    out[:] = (np.arange(n_i)[None, :, None] * si) > (plane[:, None, :] + margin_mm)
    return out


def sacrum_below_l5(inst: np.ndarray, predicted_bone: np.ndarray, spacing: Sequence[float], *,
                    margin_mm: float = 4.0, min_ml: float = 0.5, reach_mm: float = 25.0) -> np.ndarray:
    """Where a body-annotated scan whose lowest annotated body is L5 has its sacrum: the
    pieces of ``predicted_bone`` (a model's body / endplate / sacrum voxels) that lie more
    than ``margin_mm`` below L5's inferior surface (``below_lowest_plane``), at least
    ``min_ml`` large, reaching within ``reach_mm`` of L5 (across its disc). Below L5 the
    next bone is S1, whatever a model called it: a model that calls S1 a vertebra names
    every level one off."""
    order = stack_order(inst)
    out = np.zeros(inst.shape, bool)
    if not order:
        return out
    cand = predicted_bone & below_lowest_plane(inst, spacing, margin_mm) & (inst == 0)
    lab, n = ndimage.label(cand)
    if not n:
        return out
    vox_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    dist = ndimage.distance_transform_edt(inst != order[-1], sampling=[float(s) for s in spacing])
    near = ndimage.minimum(dist, lab, range(1, n + 1))
    keep = [k + 1 for k in range(n) if sizes[k + 1] * vox_ml >= min_ml and float(near[k]) <= reach_mm]
    return np.isin(lab, keep) if keep else out
