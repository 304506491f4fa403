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

import numpy as np

from spineps.errors import InputError
from spineps.geometry.volume import Volume
from spineps.labels import BODY, DISC, ENDPLATE, ENDPLATE_INF, ENDPLATE_SUP, SACRUM
from spineps.postprocess.consistency import ENDPLATE_VALUES, _check_grids, vertebra_ids

__all__ = ["VertebraFrame", "vertebra_frames", "label_centroids", "assign_discs_and_endplates", "body_mask_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VertebraFrame:
    """Local anatomical frame of one vertebra, in world (RAS) millimetres."""

    id: int
    centroid: np.ndarray  # body centroid (whole vertebra when it has no body voxel)
    superior: np.ndarray  # unit vector along the spine, towards the head
    anterior: np.ndarray  # unit vector, perpendicular to ``superior``
    n_body: int  # body voxels (49 and, when given, its endplates)

    @property
    def right(self) -> np.ndarray:
        return np.cross(self.anterior, self.superior)


def _world(affine: np.ndarray, vox: np.ndarray) -> np.ndarray:
    return vox @ affine[:3, :3].T + affine[:3, 3]


def body_mask_of(sem: np.ndarray, inst: np.ndarray, v: int) -> np.ndarray:
    """Body voxels of anonymous vertebra ``v``: its 49 voxels plus its own endplates
    (52 valued ``200 + v - 1``, 53 valued ``200 + v``) when the masks carry them."""
    return ((inst == v) & (sem == BODY)) | ((sem == ENDPLATE_SUP) & (inst == 200 + v - 1)) | (
        (sem == ENDPLATE_INF) & (inst == 200 + v))


def label_centroids(labels: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-index centroids and voxel counts of ``ids`` in ``labels`` (NaN where absent);
    one pass over the non-zero voxels (much faster than ``ndimage.center_of_mass``)."""
    nz = np.nonzero(labels)
    lab = labels[nz].astype(np.int64)
    size = max(int(lab.max(initial=0)), max(ids, default=0)) + 1
    count = np.bincount(lab, minlength=size).astype(float)
    sums = np.stack([np.bincount(lab, weights=c, minlength=size) for c in nz], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cent = sums / count[:, None]
    idx = np.asarray(ids, dtype=np.int64)
    return cent[idx], count[idx]


def vertebra_frames(semantic: Volume, instance: Volume, ids: list[int] | None = None) -> dict[int, VertebraFrame]:
    """Frames of the anonymous vertebrae ``ids`` (default: all 1..N), ordered top to bottom."""
    sem = np.asarray(semantic.data)
    inst = np.asarray(instance.data)
    if ids is None:
        ids = vertebra_ids(inst)
    if not ids:
        return {}
    vert = np.where((inst > 0) & (inst < 100) & (inst != SACRUM), inst, 0)
    com_all, _ = label_centroids(vert, ids)
    com_body, n_body = label_centroids(np.where(sem == BODY, vert, 0), ids)
    cents, alls = [], []
    for cb, ca, nb in zip(com_body, com_all, n_body):
        cents.append(cb if nb > 0 else ca)
        alls.append(ca)
    c_world = _world(semantic.affine, np.asarray(cents))
    a_world = _world(semantic.affine, np.asarray(alls))
    up_world = np.array([0.0, 0.0, 1.0])
    frames: dict[int, VertebraFrame] = {}
    n = len(ids)
    for i, v in enumerate(ids):
        if n == 1:
            u = up_world
        else:
            hi = c_world[max(i - 1, 0)]
            lo = c_world[min(i + 1, n - 1)]
            u = hi - lo
            norm = np.linalg.norm(u)
            u = u / norm if norm > 1e-6 else up_world
        # anterior: from the whole-vertebra centroid to the body centroid (the body is
        # anterior to the arch), else world anterior; made perpendicular to u
        a = c_world[i] - a_world[i] if n_body[i] > 0 else np.zeros(3)
        a = a - (a @ u) * u
        if np.linalg.norm(a) < 1.0:  # no posterior elements to tell: world anterior
            a = np.array([0.0, 1.0, 0.0]) - u[1] * u
        a = a / max(np.linalg.norm(a), 1e-9)
        frames[v] = VertebraFrame(v, c_world[i], u, a, int(n_body[i]))
    return frames


def _body_height(sem: np.ndarray, inst: np.ndarray, affine: np.ndarray, frame: VertebraFrame) -> float:
    from scipy import ndimage

    mask = (inst == frame.id) & (sem == BODY)
    if not mask.any():
        mask = inst == frame.id
    sl = ndimage.find_objects(mask.astype(np.uint8))[0]
    idx = np.argwhere(mask[sl]) + np.array([s.start for s in sl])
    proj = (_world(affine, idx.astype(float)) - frame.centroid) @ frame.superior
    return float(np.percentile(proj, 99) - np.percentile(proj, 1))


def assign_discs_and_endplates(semantic: Volume, vertebrae: Volume, *, max_distance_mm: float = 30.0,
                               majority: float = 0.7) -> tuple[Volume, Volume]:
    """Give discs ``100 + X`` and endplates ``200 + X`` (X = the vertebra above the disc) and
    split the semantic endplates into superior (52) / inferior (53). See the module text.

    Returns ``(semantic3, instance3)``; instance values: anonymous vertebrae 1..N, sacrum 26,
    discs 100..100+N, endplates 200..200+N (int16).
    """
    import cc3d
    from scipy import ndimage

    _check_grids(semantic, vertebrae)
    sem = np.asarray(semantic.data).astype(np.int32, copy=True)
    inst = np.asarray(vertebrae.data).astype(np.int32, copy=True)
    if inst.max(initial=0) >= 100:
        raise InputError("assign_discs_and_endplates expects vertebrae (1..N) and sacrum only; "
                         f"found instance value {int(inst.max())}")
    ids = vertebra_ids(inst)
    has_sacrum = bool((inst == SACRUM).any())
    target = np.isin(sem, (DISC, *ENDPLATE_VALUES))
    inst[target] = 0
    out_dtype = np.asarray(semantic.data).dtype
    if not target.any():
        return semantic.with_data(sem.astype(out_dtype)), vertebrae.with_data(inst.astype(np.int16))
    if not ids and not has_sacrum:
        log.warning("no vertebra: %d disc/endplate voxels stay unassigned", int(target.sum()))
        sem[sem == DISC] = 0
        sem[np.isin(sem, ENDPLATE_VALUES)] = ENDPLATE
        return semantic.with_data(sem.astype(out_dtype)), vertebrae.with_data(inst.astype(np.int16))

    frames = vertebra_frames(semantic, vertebrae, ids)
    # lookup tables indexed by instance value (0..26)
    size = SACRUM + 1
    cent = np.zeros((size, 3))
    up = np.zeros((size, 3))
    for v, f in frames.items():
        cent[v] = f.centroid
        up[v] = f.superior

    # nearest labelled voxel, on the bounding box of discs/endplates grown by the search radius
    spacing = np.asarray(semantic.spacing)
    margin = np.ceil(max_distance_mm / spacing).astype(int)
    tidx = np.argwhere(target)
    lo = np.maximum(tidx.min(0) - margin, 0)
    hi = np.minimum(tidx.max(0) + margin + 1, np.asarray(sem.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub_inst = inst[box]
    feature = sub_inst > 0
    sub_t = target[box]
    vox = np.argwhere(sub_t)
    if not feature.any():
        near = np.zeros(len(vox), np.int32)
        d = np.full(len(vox), np.inf)
    else:  # nearest-feature indices only; distances and labels for the target voxels alone
        ind = ndimage.distance_transform_edt(~feature, sampling=spacing, return_distances=False, return_indices=True)
        nvox = ind[:, sub_t].T
        del ind
        near = sub_inst[tuple(nvox.T)]
        d = np.sqrt((((nvox - vox) * spacing) ** 2).sum(axis=1))
    p = _world(semantic.affine, (vox + lo).astype(float))
    svals = sem[box][sub_t]
    is_disc = svals == DISC
    claimed = d <= max_distance_mm

    side = np.einsum("ij,ij->i", p - cent[near], up[near])  # > 0: above the body centre of `near`
    x = np.where(side > 0, near - 1, near)  # the vertebra above the disc next to this voxel
    sup = side > 0
    # sacrum-nearest voxels: L5/S1 junction or sacral remnants
    on_sac = claimed & (near == SACRUM)
    to_sacrum = np.zeros(len(near), bool)
    if on_sac.any():
        if ids:
            low = ids[-1]
            h = _body_height(sem, inst, semantic.affine, frames[low])
            depth = (cent[low] - p[on_sac]) @ up[low]  # mm below the lowest body centre
            junction = depth <= 1.4 * max(h, 5.0)
        else:
            junction = np.zeros(int(on_sac.sum()), bool)
        x[on_sac] = ids[-1] if ids else 0
        sup[on_sac] = True
        to_sacrum[np.flatnonzero(on_sac)[~junction]] = True
    claimed &= ~to_sacrum

    # discs: component majority
    new_inst = np.zeros(len(near), np.int32)
    disc_claimed = is_disc & claimed
    if disc_claimed.any():
        comp = cc3d.connected_components(np.where(sub_t & (sem[box] == DISC), 1, 0).astype(np.uint8),
                                         connectivity=26)
        c = comp[sub_t].astype(np.int64)
        cc = c[disc_claimed]
        xx = x[disc_claimed].astype(np.int64)
        n_x = SACRUM + 1
        table = np.bincount(cc * n_x + xx, minlength=(int(c.max()) + 1) * n_x).reshape(-1, n_x)
        best = table.argmax(1)
        share = table.max(1) / np.maximum(table.sum(1), 1)
        use_major = share[cc] >= majority
        xx = np.where(use_major, best[cc], xx)
        new_inst[disc_claimed] = 100 + xx
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

    sem_box = sem[box]
    inst_box = inst[box]
    sem_box[sub_t] = new_sem
    inst_box[sub_t] = new_inst
    return semantic.with_data(sem.astype(out_dtype)), vertebrae.with_data(inst.astype(np.int16))
