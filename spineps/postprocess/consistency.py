"""Semantic <-> instance agreement after the instance phase (post-processing, step 1).

Input: the semantic mask (community values) and an *anonymous* vertebra instance mask on
the same grid, vertebrae numbered 1..N top to bottom (world superior first).

``make_consistent`` applies the published post-processing rules, in this order:

1. **Fill holes per instance** (3D, ``scipy.ndimage.binary_fill_holes`` on each instance's
   bounding box); only voxels that no other instance holds are filled.
2. **Zero instance voxels that are not vertebra parts** (41..49) in the semantic mask:
   background, canal, cord, discs, endplates (discs and endplates are assigned later by
   :func:`spineps.postprocess.discs.assign_discs_and_endplates`). Sacrum voxels (26) become
   instance 26 whatever the instance mask said.
3. **Orphan components**: every 26-connected component of vertebra-part voxels that no
   instance covers goes to the vertebra instance with the most face-adjacent (6-neighbour)
   contact voxels (ties: the upper vertebra). Components that touch no vertebra:

   - touching only the sacrum: they become sacrum (semantic 26, instance 26) -- sacral
     posterior elements are often predicted as arcus/processes;
   - touching nothing, with at least ``min_new_instance_mm3`` of vertebral body (49): a
     vertebra the instance phase missed (typically at the edge of the field of view); it
     becomes a new instance and all ids are renumbered top to bottom;
   - otherwise (small isolated fragments): **removed from the semantic mask** (set to 0),
     so that semantic and instance masks stay consistent voxel for voxel.

Input value 26 is read as sacrum, values >= 100 are ignored (discs and endplates are
re-derived). Output ids are consecutive 1..M in the input order (an instance that lost all its voxels
is dropped and the ids below it move up); sacrum = 26. No spine holds more than 25 vertebrae
above the sacrum (C2..L5 with T13 and L6): instances beyond the 25th from the top are sacral
segments taken for bodies by the semantic phase and become sacrum (26) in both masks, with a
warning (``ConsistencyStats.surplus_to_sacrum``).

``consistency_problems`` checks the final agreement of a semantic and a (named or
anonymous) instance mask and is used by the tests and as a pipeline self-check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from spineps.errors import InputError
from spineps.geometry.volume import Volume
from spineps.labels import BODY, CANAL, CORD, DISC, ENDPLATE_INF, ENDPLATE_SUP, ENDPLATES, INSTANCE_PARTS, SACRUM
from spineps.postprocess.vertebrae import check_same_grid, vertebra_ids, world_superior_order

__all__ = [
    "ConsistencyStats",
    "make_consistent",
    "consistency_problems",
    "MAX_VERTEBRAE",
]

log = logging.getLogger(__name__)

#: largest anonymous vertebra id that cannot collide with the sacrum value 26
MAX_VERTEBRAE = SACRUM - 1

_FACE_SHIFTS = ((0, 1), (1, 1), (2, 1))


@dataclass
class ConsistencyStats:
    """What ``make_consistent`` changed (voxel counts), for logs and tests."""

    filled: int = 0
    zeroed: int = 0
    orphans_assigned: int = 0
    orphans_to_sacrum: int = 0
    orphans_removed: int = 0
    new_instances: int = 0
    surplus_to_sacrum: int = 0
    dropped_instances: list[int] = field(default_factory=list)


def _face_contacts(comp: np.ndarray, inst: np.ndarray, n_comp: int, n_inst: int) -> np.ndarray:
    """``counts[c, v]`` = number of (component c voxel, instance v voxel) face-adjacent pairs."""
    counts = np.zeros((n_comp + 1) * (n_inst + 1), dtype=np.int64)
    for axis, _ in _FACE_SHIFTS:
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        for a_sl, b_sl in ((tuple(lo), tuple(hi)), (tuple(hi), tuple(lo))):
            a = comp[a_sl]
            b = inst[b_sl]
            m = (a > 0) & (b > 0)
            if not m.any():
                continue
            key = a[m].astype(np.int64) * (n_inst + 1) + b[m].astype(np.int64)
            counts += np.bincount(key, minlength=counts.size)
    return counts.reshape(n_comp + 1, n_inst + 1)


def _fill_holes(inst: np.ndarray, ids: list[int], st: ConsistencyStats) -> None:
    """Rule 1: fill holes per instance, on its bounding box, without taking other instances' voxels."""
    from scipy import ndimage

    if not ids:
        return
    boxes = ndimage.find_objects(inst)
    for v in ids:
        box = boxes[v - 1]
        if box is None:
            continue
        sub = inst[box]
        filled = ndimage.binary_fill_holes(sub == v) & (sub == 0)
        n = int(filled.sum())
        if n:
            sub[filled] = v
            st.filled += n


def _orphan_targets(comp: np.ndarray, n_comp: int, inst: np.ndarray, sem: np.ndarray, ids: list[int],
                    min_vox: float, st: ConsistencyStats) -> np.ndarray:
    """Per orphan component (index = component label) the value it takes: the vertebra with the
    most face contacts, the sacrum, a new instance (``1000 + id``, renumbered later) or 0."""
    n_lab = int(inst.max())
    contacts = _face_contacts(comp, inst, n_comp, n_lab)
    vert_contacts = contacts.copy()
    vert_contacts[:, 0] = 0
    if n_lab >= SACRUM:
        vert_contacts[:, SACRUM] = 0
    best = vert_contacts.argmax(axis=1)
    has_vert = vert_contacts.max(axis=1) > 0
    has_sacrum = contacts[:, SACRUM] > 0 if n_lab >= SACRUM else np.zeros(n_comp + 1, bool)
    target = np.zeros(n_comp + 1, dtype=np.int64)
    target[has_vert] = best[has_vert]
    target[~has_vert & has_sacrum] = SACRUM
    target[0] = 0
    loose = ~has_vert & ~has_sacrum
    loose[0] = False
    # isolated components: a missed vertebra when it holds enough body, else removed
    if loose.any():
        body_count = np.bincount(comp[sem == BODY], minlength=n_comp + 1)
        next_id = (max(ids) if ids else 0) + 1
        for c in np.flatnonzero(loose & (body_count >= min_vox)):
            target[c] = 1000 + next_id  # marked, renumbered below
            next_id += 1
            st.new_instances += 1
    return target


def _assign_orphans(sem: np.ndarray, inst: np.ndarray, part: np.ndarray, ids: list[int], min_vox: float,
                    st: ConsistencyStats) -> None:
    """Rule 3: the orphan components of vertebra-part voxels (see the module text)."""
    import cc3d

    orphan = part & (inst == 0)
    if not orphan.any():
        return
    comp, n_comp = cc3d.connected_components(orphan, connectivity=26, return_N=True)
    comp = comp.astype(np.int64)
    assigned = _orphan_targets(comp, n_comp, inst, sem, ids, min_vox, st)[comp]
    st.orphans_assigned = int(((assigned > 0) & (assigned < 1000) & (assigned != SACRUM)).sum())
    st.orphans_to_sacrum = int((orphan & (assigned == SACRUM)).sum())
    removed = orphan & (assigned == 0)
    st.orphans_removed = int(removed.sum())
    sem[orphan & (assigned == SACRUM)] = SACRUM
    sem[removed] = 0
    inst[orphan] = assigned[orphan]
    if st.orphans_removed:
        log.info("removed %d isolated vertebra-part voxels that no instance touches", st.orphans_removed)
    if st.new_instances:
        log.warning("%d vertebra-sized component(s) touching no instance became new instance(s)", st.new_instances)


def _top_to_bottom(sem: np.ndarray, inst: np.ndarray, ids: list[int], vertebrae: Volume,
                   st: ConsistencyStats) -> np.ndarray:
    """Consecutive ids 1..M, top to bottom (input order kept; new instances placed by height),
    at most ``MAX_VERTEBRAE`` (the surplus lowest become sacrum in both masks)."""
    present = vertebra_ids(np.where(inst >= 1000, 0, inst)) + sorted(int(v) for v in np.unique(inst) if v >= 1000)
    st.dropped_instances = [v for v in ids if v not in present]
    order = world_superior_order(vertebrae.with_data(inst), present, sem) if st.new_instances else present
    if len(order) > MAX_VERTEBRAE:
        # No spine holds more than 25 vertebrae above the sacrum (C2..L5 with T13 and L6). The
        # surplus lowest instances are sacral segments that the semantic phase took for vertebral
        # bodies (a semantic model that misses the sacrum does this): they become sacrum, in both masks.
        if not st.new_instances:
            order = world_superior_order(vertebrae.with_data(inst), order, sem)
        surplus = order[MAX_VERTEBRAE:]
        order = order[:MAX_VERTEBRAE]
        moved = np.isin(inst, surplus)
        inst[moved] = SACRUM
        sem[moved] = SACRUM
        st.surplus_to_sacrum = len(surplus)
        log.warning("%d vertebra instance(s) below the %dth from the top (more than a spine holds above the "
                    "sacrum) were taken as sacral segments", len(surplus), MAX_VERTEBRAE)
    lut = np.zeros(max(int(inst.max()) + 1, SACRUM + 1), dtype=np.int32)
    for new, old in enumerate(order, start=1):
        lut[old] = new
    lut[SACRUM] = SACRUM
    if st.dropped_instances:
        log.info("instances %s lost all their voxels and were dropped", st.dropped_instances)
    return lut[inst].astype(np.int16)


def make_consistent(semantic: Volume, vertebrae: Volume, *, min_new_instance_mm3: float = 1000.0,
                    stats: ConsistencyStats | None = None) -> tuple[Volume, Volume]:
    """Post-process an anonymous vertebra instance mask against its semantic mask.

    Returns ``(semantic2, vertebrae2)``: the semantic mask (orphan fragments removed or
    relabelled to sacrum) and the instance mask (vertebrae 1..M top to bottom, sacrum 26,
    nothing else: discs and endplates are left for ``assign_discs_and_endplates``).
    Every vertebra-part voxel (41..49) of ``semantic2`` carries a vertebra id in
    ``vertebrae2`` and every non-zero voxel of ``vertebrae2`` is a vertebra part or sacrum.
    Pass a :class:`ConsistencyStats` as ``stats`` to read what changed.
    """
    check_same_grid(semantic, vertebrae)
    st = stats if stats is not None else ConsistencyStats()
    sem = np.asarray(semantic.data).astype(np.int32, copy=True)
    raw = np.asarray(vertebrae.data)
    if raw.size and raw.min() < 0:
        raise InputError("instance mask holds negative values")
    inst = np.where((raw > 0) & (raw < 100) & (raw != SACRUM), raw, 0).astype(np.int32)
    ids = vertebra_ids(inst)
    _fill_holes(inst, ids, st)
    # 2. zero every instance voxel that is not a vertebra part; sacrum -> 26
    part = np.isin(sem, INSTANCE_PARTS)
    off = (inst > 0) & ~part
    st.zeroed = int(off.sum())
    inst[off] = 0
    inst[sem == SACRUM] = SACRUM
    _assign_orphans(sem, inst, part, ids, min_new_instance_mm3 / max(vertebrae.voxel_volume, 1e-9), st)
    out = _top_to_bottom(sem, inst, ids, vertebrae, st)
    # only 0 and 26 are new semantic values: the input dtype holds them
    return semantic.with_data(sem.astype(np.asarray(semantic.data).dtype)), vertebrae.with_data(out)


#: semantic values that must carry an instance value, with the kind of instance they take
_SPINE_STRUCTURES = (*INSTANCE_PARTS, ENDPLATE_SUP, ENDPLATE_INF, DISC, SACRUM)


def _instance_kind(inst: np.ndarray) -> np.ndarray:
    """0 none, 1 vertebra, 2 disc, 3 endplate, 4 sacrum (vectorised)."""
    kind = np.zeros(inst.shape, np.int8)
    kind[(inst > 0) & (inst < 100)] = 1
    kind[inst == SACRUM] = 4
    kind[(inst >= 100) & (inst < 200)] = 2
    kind[(inst >= 200) & (inst < 300)] = 3
    return kind


def consistency_problems(semantic: Volume, instance: Volume) -> list[str]:
    """Where semantic and instance masks disagree; an empty list means consistent.

    Rules: every non-zero instance voxel is a spine structure of the matching kind in the
    semantic mask (vertebra ids on 41..49, discs 100+X on 100, endplates 200+X on 52/53/62,
    26 on 26) and every spine-structure voxel of the semantic mask (41..49, 52, 53, 100, 26)
    carries an instance value. Exceptions: canal (61) and cord (60) take no instance value,
    and an endplate voxel still valued 62 (no vertebra claimed it) may have none.
    """
    check_same_grid(semantic, instance)
    sem = np.asarray(semantic.data)
    inst = np.asarray(instance.data)
    kind = _instance_kind(inst)
    problems: list[str] = []

    def _report(mask: np.ndarray, what: str) -> None:
        n = int(mask.sum())
        if n:
            problems.append(f"{n} voxel(s): {what}")

    _report((inst >= 300) | (inst < 0), "instance value outside 0..299")
    _report((kind > 0) & ((sem == 0) | (sem == CANAL) | (sem == CORD)), "instance on background/canal/cord")
    _report((kind == 0) & np.isin(sem, _SPINE_STRUCTURES), "spine structure without instance value")
    _report((kind == 1) & ~np.isin(sem, INSTANCE_PARTS), "vertebra id on a non-vertebra-part voxel")
    _report((kind == 2) & (sem != DISC), "disc value on a non-disc voxel")
    _report((kind == 3) & ~np.isin(sem, ENDPLATES), "endplate value on a non-endplate voxel")
    _report((kind == 4) & (sem != SACRUM), "sacrum value on a non-sacrum voxel")
    _report((sem == SACRUM) & (kind != 4), "sacrum voxel without instance 26")
    return problems
