"""Discs and endplates onto vertebra instances (post-processing, step 2).

Input: ``make_consistent``'s output (anonymous vertebrae 1..N top to bottom, sacrum 26).
Output: the same vertebrae plus discs ``100 + X`` and endplates ``200 + X`` in the
instance mask, and a semantic mask whose endplates are split into superior (52) and
inferior (53) endplates of their vertebra. Both masks then agree voxel for voxel (see
:func:`spineps.postprocess.consistency.consistency_problems`).

How a voxel is placed (vectorised; one Euclidean distance transform on the bounding box of
the discs and endplates):

- Each vertebra gets a local frame: its body centroid ``c`` (voxels 49, else the whole
  vertebra) and a superior axis ``u`` along the spine (central difference of the
  neighbouring vertebrae's centroids, world superior when it stands alone), so curved
  spines (cervical lordosis, thoracic kyphosis) are handled.
- A disc/endplate voxel ``p`` belongs to its nearest vertebra ``V`` (nearest labelled
  voxel, within ``max_distance_mm``); it lies above ``V`` when ``(p - c_V) . u_V > 0``.
- **Discs**: above ``V`` -> ``X = V - 1``, below -> ``X = V``; the disc value is ``100 + X``
  (X = the nearest vertebra above). A disc component takes its majority value when at
  least ``majority`` of its voxels agree, otherwise its voxels keep their own value (two
  discs bridged by a thin contact). **A disc above the top vertebra (top of the field of
  view) gets ``X = 0``, i.e. value 100** ("the vertebra below minus one"); level naming
  turns it into ``100 + (level above the top vertebra)`` (e.g. 101 above C2).
- **Endplates** (62, or an earlier 52/53): above the body centre of ``V`` -> superior
  endplate of ``V`` (semantic 52, instance ``200 + V - 1``); below -> inferior endplate
  (53, ``200 + V``); both endplates around disc ``100 + X`` are ``200 + X``.
- **Sacrum**: disc/endplate voxels nearest to the sacrum belong to the L5/S1 junction
  (disc ``100 + N``, superior sacral endplate 52 with ``200 + N``) when they lie within
  ``1.4 x`` the lowest vertebra's body height below its body centre; deeper ones are
  remnant sacral discs/endplates and become sacrum (semantic 26, instance 26).
- A voxel farther than ``max_distance_mm`` from every vertebra is unclaimed: a disc voxel
  is removed from the semantic mask, an endplate voxel stays 62 with no instance value
  (the only spine structure allowed to have none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from spineps.errors import InputError
from spineps.geometry.volume import Volume
from spineps.labels import BODY, DISC, ENDPLATE, ENDPLATE_INF, ENDPLATE_SUP, ENDPLATES, SACRUM
from spineps.postprocess.vertebrae import (VertebraCentroids, VertebraFrame, check_same_grid, to_world, vertebra_frames,
                                           vertebra_ids)

__all__ = ["assign_discs_and_endplates"]

log = logging.getLogger(__name__)


def _body_height(sem: np.ndarray, inst: np.ndarray, affine: np.ndarray, frame: VertebraFrame) -> float:
    from scipy import ndimage

    mask = (inst == frame.id) & (sem == BODY)
    if not mask.any():
        mask = inst == frame.id
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    idx = np.argwhere(mask[sl]) + np.array([s.start for s in sl])
    proj = (to_world(affine, idx.astype(float)) - frame.centroid) @ frame.superior
    return float(np.percentile(proj, 99) - np.percentile(proj, 1))


@dataclass
class _Targets:
    """The disc and endplate voxels of the search box, with their nearest labelled voxel."""

    box: tuple[slice, ...]  # the bounding box of the targets grown by the search radius
    sub_t: np.ndarray  # target voxels in the box
    near: np.ndarray  # per target voxel: the instance value of its nearest labelled voxel
    dist: np.ndarray  # ... and the distance to it (mm)
    world: np.ndarray  # (N, 3) world position of each target voxel


def _nearest_labels(inst: np.ndarray, target: np.ndarray, semantic: Volume, max_distance_mm: float) -> _Targets:
    """Nearest labelled voxel of every target voxel, on the bounding box of the targets grown by
    the search radius (one distance transform, nearest-feature indices only)."""
    from scipy import ndimage

    spacing = np.asarray(semantic.spacing)
    margin = np.ceil(max_distance_mm / spacing).astype(int)
    tidx = np.argwhere(target)
    lo = np.maximum(tidx.min(0) - margin, 0)
    hi = np.minimum(tidx.max(0) + margin + 1, np.asarray(inst.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub_inst = inst[box]
    feature = sub_inst > 0
    sub_t = target[box]
    vox = np.argwhere(sub_t)
    if not feature.any():
        near = np.zeros(len(vox), np.int32)
        d = np.full(len(vox), np.inf)
    else:  # distances and labels for the target voxels alone
        ind = ndimage.distance_transform_edt(~feature, sampling=spacing, return_distances=False, return_indices=True)
        nvox = ind[:, sub_t].T
        del ind
        near = sub_inst[tuple(nvox.T)]
        d = np.sqrt((((nvox - vox) * spacing) ** 2).sum(axis=1))
    return _Targets(box, sub_t, near, d, to_world(semantic.affine, (vox + lo).astype(float)))


def _sacral_remnants(t: _Targets, claimed: np.ndarray, x: np.ndarray, sup: np.ndarray, ids: list[int],
                     frames: dict[int, VertebraFrame], cent: np.ndarray, up: np.ndarray, sem: np.ndarray,
                     inst: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Sacrum-nearest voxels: the L5/S1 junction (``x``, ``sup`` set) or, deeper than 1.4 x
    the lowest body's height below its centre, sacral remnants (returned mask)."""
    on_sac = claimed & (t.near == SACRUM)
    to_sacrum = np.zeros(len(t.near), bool)
    if not on_sac.any():
        return to_sacrum
    if ids:
        low = ids[-1]
        h = _body_height(sem, inst, affine, frames[low])
        depth = (cent[low] - t.world[on_sac]) @ up[low]  # mm below the lowest body centre
        junction = depth <= 1.4 * max(h, 5.0)
    else:
        junction = np.zeros(int(on_sac.sum()), bool)
    x[on_sac] = ids[-1] if ids else 0
    sup[on_sac] = True
    to_sacrum[np.flatnonzero(on_sac)[~junction]] = True
    return to_sacrum


def _disc_values(sem_box: np.ndarray, sub_t: np.ndarray, disc_claimed: np.ndarray, x: np.ndarray,
                 majority: float) -> np.ndarray:
    """``100 + X`` of the claimed disc voxels: the majority X of their 26-connected disc
    component where at least ``majority`` of it agrees, else their own."""
    import cc3d

    comp = cc3d.connected_components(np.where(sub_t & (sem_box == DISC), 1, 0).astype(np.uint8), connectivity=26)
    c = comp[sub_t].astype(np.int64)
    cc = c[disc_claimed]
    xx = x[disc_claimed].astype(np.int64)
    n_x = SACRUM + 1
    table = np.bincount(cc * n_x + xx, minlength=(int(c.max()) + 1) * n_x).reshape(-1, n_x)
    best = table.argmax(1)
    share = table.max(1) / np.maximum(table.sum(1), 1)
    return 100 + np.where(share[cc] >= majority, best[cc], xx)


def _no_targets_or_vertebrae(sem: np.ndarray, target: np.ndarray, ids: list[int], has_sacrum: bool) -> bool:
    """True when there is nothing to place (``sem`` made final where there is no vertebra)."""
    if not target.any():
        return True
    if ids or has_sacrum:
        return False
    log.warning("no vertebra: %d disc/endplate voxels stay unassigned", int(target.sum()))
    sem[sem == DISC] = 0
    sem[np.isin(sem, ENDPLATES)] = ENDPLATE
    return True


def assign_discs_and_endplates(semantic: Volume, vertebrae: Volume, *, max_distance_mm: float = 30.0,
                               majority: float = 0.7, centroids: Optional[VertebraCentroids] = None
                               ) -> tuple[Volume, Volume]:
    """Give discs ``100 + X`` and endplates ``200 + X`` (X = the vertebra above the disc) and
    split the semantic endplates into superior (52) / inferior (53). See the module text.

    Returns ``(semantic3, instance3)``; instance values: anonymous vertebrae 1..N, sacrum 26,
    discs 100..100+N, endplates 200..200+N (int16). ``centroids``: the vertebrae's
    (``postprocess.vertebrae.vertebra_centroids`` on these masks), computed here when not given.
    """
    check_same_grid(semantic, vertebrae)
    sem = np.asarray(semantic.data).astype(np.int32, copy=True)
    inst = np.asarray(vertebrae.data).astype(np.int32, copy=True)
    if inst.max(initial=0) >= 100:
        raise InputError("assign_discs_and_endplates expects vertebrae (1..N) and sacrum only; "
                         f"found instance value {int(inst.max())}")
    ids = vertebra_ids(inst)
    has_sacrum = bool((inst == SACRUM).any())
    target = np.isin(sem, (DISC, *ENDPLATES))
    inst[target] = 0
    out_dtype = np.asarray(semantic.data).dtype
    if _no_targets_or_vertebrae(sem, target, ids, has_sacrum):
        return semantic.with_data(sem.astype(out_dtype)), vertebrae.with_data(inst.astype(np.int16))
    frames = vertebra_frames(semantic, vertebrae, ids, centroids)
    cent = np.zeros((SACRUM + 1, 3))  # lookup tables indexed by instance value (0..26)
    up = np.zeros((SACRUM + 1, 3))
    for v, f in frames.items():
        cent[v] = f.centroid
        up[v] = f.superior
    t = _nearest_labels(inst, target, semantic, max_distance_mm)
    svals = sem[t.box][t.sub_t]
    is_disc = svals == DISC
    claimed = t.dist <= max_distance_mm
    side = np.einsum("ij,ij->i", t.world - cent[t.near], up[t.near])  # > 0: above the body centre of `near`
    x = np.where(side > 0, t.near - 1, t.near)  # the vertebra above the disc next to this voxel
    sup = side > 0
    to_sacrum = _sacral_remnants(t, claimed, x, sup, ids, frames, cent, up, sem, inst, semantic.affine)
    claimed &= ~to_sacrum
    new_inst = np.zeros(len(t.near), np.int32)
    disc_claimed = is_disc & claimed
    if disc_claimed.any():
        new_inst[disc_claimed] = _disc_values(sem[t.box], t.sub_t, disc_claimed, x, majority)
    ep = ~is_disc & claimed
    new_inst[ep] = 200 + x[ep]
    new_sem = svals.copy()
    new_sem[ep & sup] = ENDPLATE_SUP
    new_sem[ep & ~sup] = ENDPLATE_INF
    new_sem[~is_disc & ~claimed] = ENDPLATE
    new_sem[is_disc & ~claimed] = 0
    new_sem[to_sacrum] = SACRUM
    new_inst[to_sacrum] = SACRUM
    n_unclaimed = int((~claimed & ~to_sacrum).sum())
    if n_unclaimed:
        log.info("%d disc/endplate voxels farther than %.0f mm from any vertebra: unassigned",
                 n_unclaimed, max_distance_mm)
    if to_sacrum.any():
        log.info("%d disc/endplate voxels inside the sacrum relabelled as sacrum", int(to_sacrum.sum()))
    sem[t.box][t.sub_t] = new_sem
    inst[t.box][t.sub_t] = new_inst
    return semantic.with_data(sem.astype(out_dtype)), vertebrae.with_data(inst.astype(np.int16))
