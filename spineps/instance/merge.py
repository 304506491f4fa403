"""Consensus merging of the per-cutout predictions (SPINEPS instance phase, paper section 2).

Every cutout predicts up to three vertebrae: above its centre (class 1), the centre one (2)
and the one below (3). An inner vertebra is therefore predicted three times (as "below" by
the cutout above, "centre" by its own, "above" by the cutout below), an outer one twice.

Here every per-class prediction becomes a *candidate* (a boolean mask cropped to its
bounding box plus the box offset). Candidates of different cutouts that describe the same
vertebra agree (high Dice); candidates of one cutout are always different vertebrae. The
candidates are grouped by agglomerating the most agreeing pairs first (Dice >=
``agree_dice``), never putting two candidates of one cutout into one group. Matching by
overlap rather than by the cutout's index makes a missing body centre harmless (the
vertebra without centre is still found by the cutouts above and below it) and a body that
was split in two harmless as well (both cutouts' centre predictions agree).

Groups are written from the most to the least consistent one (more members first, then
higher mean Dice) into the voxels still free: a vertebra is taken from the voxels where
the majority of its group's predictions agree (any member for groups of one or two). A
group that finds most of its voxels already taken duplicates a vertebra that was written
and is dropped; so no vertebra is skipped and no two are merged. Finally the instances are
numbered top to bottom (ascending index along ``axis``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from spineps.instance.cutouts import CutoutBox

__all__ = ["Candidate", "MergeResult", "candidates_from_predictions", "merge_cutout_predictions", "dice_between",
           "fill_unassigned"]

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    cutout: int
    cls: int  # 1 above, 2 centre, 3 below
    start: np.ndarray  # global index of mask[0, 0, 0]
    mask: np.ndarray  # bool, cropped to its bounding box

    @property
    def size(self) -> int:
        return int(self.mask.sum())

    @property
    def stop(self) -> np.ndarray:
        return self.start + np.asarray(self.mask.shape)


@dataclass
class MergeResult:
    instance: np.ndarray  # uint16, 0 background, 1..N top to bottom
    groups: list[dict] = field(default_factory=list)  # per final instance: members, mean dice, voxels
    warnings: list[str] = field(default_factory=list)


def candidates_from_predictions(predictions: Sequence[np.ndarray], boxes: Sequence[CutoutBox],
                                min_voxels: int = 1) -> list[Candidate]:
    """One candidate per (cutout, class 1..3) that predicts at least ``min_voxels`` voxels
    inside the volume (the zero padding outside it is ignored)."""
    out: list[Candidate] = []
    for k, (pred, box) in enumerate(zip(predictions, boxes)):
        inside = np.asarray(pred)[box.dst]
        src_start = np.array([s.start for s in box.src])
        for cls in (1, 2, 3):
            m = inside == cls
            if not m.any():
                continue
            nz = [np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
            sl = tuple(slice(int(z[0]), int(z[-1]) + 1) for z in nz)
            crop = m[sl]
            if int(crop.sum()) < min_voxels:
                continue
            out.append(Candidate(k, cls, src_start + np.array([s.start for s in sl]), np.ascontiguousarray(crop)))
    return out


def _intersection(a: Candidate, b: Candidate) -> int:
    lo = np.maximum(a.start, b.start)
    hi = np.minimum(a.stop, b.stop)
    if np.any(hi <= lo):
        return 0
    sa = tuple(slice(int(lo_ - s), int(h - s)) for lo_, h, s in zip(lo, hi, a.start))
    sb = tuple(slice(int(lo_ - s), int(h - s)) for lo_, h, s in zip(lo, hi, b.start))
    return int(np.count_nonzero(a.mask[sa] & b.mask[sb]))


def dice_between(a: Candidate, b: Candidate) -> float:
    inter = _intersection(a, b)
    return 2.0 * inter / max(a.size + b.size, 1)


def _agreeing_pairs(cands: list[Candidate], agree_dice: float) -> tuple[list[tuple[float, int, int]],
                                                                         dict[tuple[int, int], float]]:
    """Pairwise agreement between candidates of different cutouts whose boxes overlap: the pairs
    at or above ``agree_dice`` (best first) and every non-zero Dice."""
    pairs: list[tuple[float, int, int]] = []
    dice = {}
    n = len(cands)
    for i in range(n):
        for j in range(i + 1, n):
            if cands[i].cutout == cands[j].cutout:
                continue
            d = dice_between(cands[i], cands[j])
            if d > 0:
                dice[(i, j)] = d
            if d >= agree_dice:
                pairs.append((d, i, j))
    pairs.sort(key=lambda t: -t[0])
    return pairs, dice


def _agglomerate(cands: list[Candidate], pairs: list[tuple[float, int, int]]) -> list[list[int]]:
    """Union-find over the agreeing pairs with the "one candidate per cutout" constraint."""
    n = len(cands)
    parent = list(range(n))
    cutouts_of = [{c.cutout} for c in cands]

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _d, i, j in pairs:
        ri, rj = find(i), find(j)
        if ri == rj or cutouts_of[ri] & cutouts_of[rj]:
            continue
        parent[rj] = ri
        cutouts_of[ri] |= cutouts_of[rj]
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _scored(cands: list[Candidate], groups: list[list[int]], dice: dict[tuple[int, int], float]
            ) -> list[tuple[int, float, bool, int, list[int]]]:
    """``(members, mean Dice, has a centre prediction, voxels, members)`` per group, best first."""
    sizes = np.array([c.size for c in cands])

    def mean_dice(members: list[int]) -> float:
        if len(members) < 2:
            return 0.0
        vals = [dice.get((min(a, b), max(a, b)), 0.0) for ai, a in enumerate(members) for b in members[ai + 1:]]
        return float(np.mean(vals))

    scored = []
    for members in groups:
        has_centre = any(cands[m].cls == 2 for m in members)
        scored.append((len(members), mean_dice(members), has_centre, int(sizes[members].sum()), members))
    scored.sort(key=lambda t: (-t[0], -t[1], -int(t[2]), -t[3]))
    return scored


def _consensus(cands: list[Candidate], members: list[int], valid: Optional[np.ndarray]
               ) -> tuple[tuple[slice, ...], np.ndarray]:
    """The group's box and its voxels predicted by at least two members (one for pairs and singles)."""
    lo = np.min([cands[m].start for m in members], axis=0)
    hi = np.max([cands[m].stop for m in members], axis=0)
    votes = np.zeros(tuple(int(x) for x in hi - lo), dtype=np.uint8)
    for m in members:
        c = cands[m]
        sl = tuple(slice(int(a), int(b)) for a, b in zip(c.start - lo, c.stop - lo))
        votes[sl] += c.mask
    consensus = votes >= (2 if len(members) >= 3 else 1)
    region_sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    if valid is not None:
        consensus &= valid[region_sl]
    return region_sl, consensus


def _number_top_to_bottom(out: np.ndarray, next_id: int, axis: int, written: list[dict]) -> np.ndarray:
    """Instances renumbered 1..N by their mean index along ``axis`` (``written`` follows)."""
    shape = out.shape
    ids = np.arange(1, next_id)
    idx: np.ndarray = np.indices(shape, sparse=True)[axis].reshape(-1)
    counts = np.bincount(out.ravel(), minlength=next_id)[1:]
    # mean index along the axis per instance, slice by slice (no full-volume copy per label)
    pos = np.zeros(next_id, dtype=np.float64)
    for sl_i in range(shape[axis]):
        plane = np.take(out, sl_i, axis=axis)
        bc = np.bincount(plane.ravel(), minlength=next_id)
        pos += bc * idx[sl_i]
    centre_pos = pos[1:] / np.maximum(counts, 1)
    order = ids[np.argsort(centre_pos, kind="stable")]
    lut = np.zeros(next_id, dtype=np.uint16)
    lut[order] = np.arange(1, next_id, dtype=np.uint16)
    for g in written:
        g["id"] = int(lut[g["id"]])
    written.sort(key=lambda g: g["id"])
    return lut[out]


def merge_cutout_predictions(predictions: Sequence[np.ndarray], boxes: Sequence[CutoutBox],
                             shape: Sequence[int], *, axis: int = 1, agree_dice: float = 0.5,
                             min_voxels: int = 1, duplicate_fraction: float = 0.5,
                             min_single_fraction: float = 0.2, min_group_fraction: float = 0.15,
                             valid: Optional[np.ndarray] = None) -> MergeResult:
    """Merge per-cutout class maps (``predictions[k]`` has the cutout's size, values 0..3)
    into one anonymous instance array of ``shape`` (values 1..N, top to bottom).

    ``valid`` (bool array of ``shape``, optional) restricts the written voxels (e.g. to
    the vertebra-part voxels of the semantic mask). Final instances with fewer than
    ``min_voxels`` voxels are dropped, and so are predictions seen by one cutout only that
    are smaller than ``min_single_fraction`` times the median confirmed vertebra, and any
    group that ends up with fewer than ``min_group_fraction`` times that median."""
    shape = tuple(int(s) for s in shape)
    cands = candidates_from_predictions(predictions, boxes, min_voxels=1)
    pairs, dice = _agreeing_pairs(cands, agree_dice)
    scored = _scored(cands, _agglomerate(cands, pairs), dice)
    # a prediction that no other cutout confirms and that is much smaller than a confirmed
    # vertebra is a fragment (e.g. a sliver called "below" on the centre vertebra's edge)
    confirmed = [t[3] / t[0] for t in scored if t[0] >= 2]
    median_confirmed = float(np.median(confirmed)) if confirmed else 0.0
    min_single = min_single_fraction * median_confirmed
    out = np.zeros(shape, dtype=np.uint16)
    warnings: list[str] = []
    written: list[dict] = []
    next_id = 1
    for n_mem, md, has_centre, total_size, members in scored:
        if n_mem == 1 and total_size < min_single:
            log.debug("dropping an unconfirmed %d-voxel prediction (cutout %d, class %d)", total_size,
                      cands[members[0]].cutout, cands[members[0]].cls)
            continue
        region_sl, consensus = _consensus(cands, members, valid)
        region = out[region_sl]
        total = int(consensus.sum())
        if total == 0:
            continue
        free = consensus & (region == 0)
        n_free = int(free.sum())
        if n_free < duplicate_fraction * total:
            log.debug("dropping a group of %d prediction(s): %d of %d voxels already taken", n_mem,
                      total - n_free, total)
            continue
        if n_free < min_voxels:
            continue
        if n_free < min_group_fraction * median_confirmed:
            # far smaller than any vertebra: a fragment (e.g. C2's dens when the centre finder
            # took it for a body of its own); its voxels are left to the nearest-instance fill
            log.debug("dropping a %d-voxel group of %d prediction(s)", n_free, n_mem)
            continue
        region[free] = next_id
        written.append({"id": next_id, "members": [(cands[m].cutout, cands[m].cls) for m in members],
                        "n_predictions": n_mem, "mean_dice": round(md, 4), "voxels": n_free})
        if n_mem == 1 and not has_centre:
            warnings.append(f"a vertebra seen by one cutout only (cutout {cands[members[0]].cutout}, class "
                            f"{cands[members[0]].cls}, {n_free} voxels)")
        next_id += 1
    if next_id > 1:
        out = _number_top_to_bottom(out, next_id, axis, written)
    return MergeResult(instance=out, groups=written, warnings=warnings)


def fill_unassigned(instance: np.ndarray, valid: np.ndarray, max_dist: float = 2.0,
                    sampling: Optional[Sequence[float]] = None) -> np.ndarray:
    """Give every ``valid`` voxel that no instance claimed the label of the nearest instance
    voxel, if that is at most ``max_dist`` away (voxels, or mm with ``sampling`` = the
    voxel spacing). One nearest-feature transform over the bounding box of the unclaimed
    voxels grown by ``max_dist`` (an instance voxel within reach of one of them lies inside
    it); distances are computed for the unclaimed voxels only."""
    from scipy import ndimage

    todo = valid & (instance == 0)
    if not todo.any() or not instance.any():
        return instance
    nz = [np.flatnonzero(todo.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    sp = np.ones(3) if sampling is None else np.asarray(sampling, dtype=float)
    m = [int(np.ceil(max_dist / s)) + 1 for s in sp]
    sl = tuple(slice(max(int(z[0]) - mi, 0), int(z[-1]) + 1 + mi) for z, mi in zip(nz, m))
    sub = instance[sl]
    if not sub.any():
        return instance
    idx = ndimage.distance_transform_edt(sub == 0, sampling=tuple(sp), return_distances=False, return_indices=True)
    pts = np.nonzero(todo[sl])
    near = tuple(i[pts] for i in idx)
    d2 = sum(((a - b) * s) ** 2 for a, b, s in zip(near, pts, sp))
    ok = d2 <= max_dist ** 2 + 1e-9
    out = instance.copy()
    region = out[sl]
    region[tuple(p[ok] for p in pts)] = sub[tuple(n[ok] for n in near)]
    return out
