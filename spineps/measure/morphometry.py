"""Per-level morphometry in world millimetres: vertebral-body and disc heights, canal and
cord cross-sections, all along the *local spine axis*.

Frames
------
Every vertebra gets a right-handed local frame (``x`` = patient right, ``y`` = anterior,
``z`` = superior) at its body centroid (world mm, RAS). ``z`` is the local spine axis: the
line through the body centroids of its neighbours (central difference; at the ends of the
found sequence the last segment extrapolated by the change of direction of the one before;
world S for a single vertebra). Neighbours are neighbours *in space* (bodies sorted along the
main direction of the centroid cloud), so a mislabelled level does not bend the axes; the QC
reports the disagreement (``order``). ``y`` points from the spinal canal to the body (canal
voxels in a thin slab through the centroid; else from the whole-vertebra centroid, which the
posterior elements pull backwards; else world A), made orthogonal to ``z``. A disc's frame
sits at the disc centroid with ``z`` from the body centroid below to the one above (the
disc's own normal - its smallest principal axis - next to the sacrum or at an end).

Estimators
----------
- Lengths (heights, depths, diameters): a box of the local frame is laid across the structure
  along the measured direction; its voxel centres are binned in 0.5 mm slices along that
  direction and each slice contributes its width times the fraction of its voxel centres that
  belong to the structure (slices without a voxel centre interpolate the fraction). This is
  the mean extent over the box's cross-section, correct for any spacing, anisotropy and
  obliquity (the box's own sampling density is counted, not assumed), without the one-voxel
  bias of "max - min" extents; only the two boundary slices carry sampling noise.
- Body heights (anterior / middle / posterior): boxes in the mid-sagittal band
  ``|x| <= max(BAND_HALF_MM, 0.75 * LR step)``, ``y``-strips centred at 85 %, 50 % and 15 % of
  the mid-sagittal AP depth (anterior -> posterior) and ``max(5 % of depth, 0.75 * AP step)``
  wide on each side. Body = semantic vertebral body (49, endplate classes included) of the
  vertebra plus the endplate voxels (instance 200+X) on its side of the disc mid-plane.
- Body depth: the same along ``y`` in the band, over the middle half of the height.
- Disc heights: the same as body heights on the disc voxels (instance 100+X).
- Cross-sectional areas (CSA): the voxels in a slab perpendicular to the local axis whose
  thickness is a whole number of steps of the grid axis most aligned with it (every grid
  column holds the same number of voxels in it), times the voxel volume, over the slab
  thickness (at least ``2 * SLAB_HALF_MM``). Canal CSA counts canal + cord (60, 61: the dural
  tube including the cord); cord CSA the cord (60) where it is visible.
- AP diameters: the length estimator along ``y`` in the slab and the sagittal band through
  the centre of the cross-section.

Expected error (tests: ``tests/test_measure_morphometry.py``, boxes/cylinders at 0.7 x 0.7 x
2.5 mm with an oblique grid and a tilted spine): heights, depths and diameters within
max(0.5 mm, 3 %) (the mid-sagittal diameter is the mean over the band, slightly below the
maximal diameter of a round section), areas within 5 % (6 % for the cord, a few voxels across).
Anatomical phantom (``spineps.synth.anatomy``, 1 x 1 x 3 mm, oblique): body heights and
depths within 1 mm, disc heights within 1 mm. A measurement whose structure touches the image
border (cut by the field of view) is NaN and its level listed in ``Morphometry.truncated``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import (BODY, CANAL, CORD, ENDPLATE, ENDPLATE_INF, ENDPLATE_SUP, VERTEBRA_ORDER, VERTEBRA_VALUES,
                            instance_name, vertebra_name)
from spineps.postprocess.vertebrae import VertebraCentroids

__all__ = [
    "Frame",
    "LevelValue",
    "Morphometry",
    "measure_morphometry",
    "disc_level_name",
    "Grid",
    "BAND_HALF_MM",
    "SLAB_HALF_MM",
    "STRIPS",
]

log = logging.getLogger(__name__)

#: half-width (mm) of the mid-sagittal band of height / diameter measurements
BAND_HALF_MM = 2.0
#: half-thickness (mm) of the slab of cross-section measurements
SLAB_HALF_MM = 2.5
#: strip name -> position as a fraction of the AP depth, posterior (0) to anterior (1)
STRIPS: dict[str, float] = {"posterior": 0.15, "middle": 0.5, "anterior": 0.85}
_STRIP_HALF_FRACTION = 0.05
#: canal voxels farther than this from the level centre (mm, in the slab plane) are ignored
_CANAL_SEARCH_MM = (60.0, 80.0)
#: canal voxels within this distance (mm) along the axis feed the AP-diameter columns
_AP_Z_RANGE_MM = 30.0
#: bin width (mm) of the profile estimator
_BIN_MM = 0.5
_SACRUM = 26
_TUBE = (CORD, CANAL)
#: semantic classes that make up a vertebral body (the endplate classes included)
_BODY_CLASSES = (BODY, ENDPLATE, ENDPLATE_SUP, ENDPLATE_INF)


@dataclass(frozen=True)
class Frame:
    """An orthonormal local frame: ``R``'s columns are the world directions of local
    x (right), y (anterior), z (superior); ``origin`` in world mm."""

    origin: np.ndarray
    R: np.ndarray

    def to_local(self, world: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) local mm."""
        return (np.asarray(world, float) - self.origin) @ self.R

    def to_world(self, local: np.ndarray) -> np.ndarray:
        """(N, 3) local mm -> (N, 3) world mm (inverse of :meth:`to_local`)."""
        return np.asarray(local, float) @ self.R.T + self.origin

    @staticmethod
    def make(origin: np.ndarray, up: np.ndarray, anterior: np.ndarray) -> "Frame":
        z = np.asarray(up, float)
        z = z / np.linalg.norm(z)
        a = np.asarray(anterior, float)
        y = a - (a @ z) * z
        if np.linalg.norm(y) < 1e-6:  # anterior parallel to the axis: any orthogonal direction
            y = np.cross(z, [1.0, 0.0, 0.0])
            if np.linalg.norm(y) < 1e-6:
                y = np.cross(z, [0.0, 1.0, 0.0])
        y = y / np.linalg.norm(y)
        x = np.cross(y, z)
        return Frame(np.asarray(origin, float), np.column_stack([x, y, z]))


@dataclass(frozen=True)
class LevelValue:
    """One long-format measurement: ``L1 body height_anterior_mm 24.1``."""

    level: str
    structure: str
    measure: str
    value: float


@dataclass
class Morphometry:
    values: list[LevelValue] = field(default_factory=list)
    frames: dict[str, Frame] = field(default_factory=dict)  # level name -> frame
    body_centroids: dict[int, list[float]] = field(default_factory=dict)  # vertebra value -> world mm
    truncated: list[str] = field(default_factory=list)  # "L1 body", "L5/S1 canal", ...
    spatial_order: list[int] = field(default_factory=list)  # vertebra values, superior to inferior in space
    #: vertebra value on each body voxel (endplates included, on their side of the disc), on
    #: ``grid`` -- what the endplate planes of ``spineps.measure.alignment`` are fitted to
    body_labels: Optional[np.ndarray] = field(default=None, repr=False)
    grid: Optional["Grid"] = field(default=None, repr=False)

    def get(self, level: str, structure: str, measure: str) -> float:
        for v in self.values:
            if v.level == level and v.structure == structure and v.measure == measure:
                return v.value
        raise KeyError((level, structure, measure))


def disc_level_name(vertebra: int) -> str:
    """``20 -> 'L1/L2'`` (the disc below vertebra ``vertebra``)."""
    return instance_name(100 + vertebra).rsplit(" ", 1)[0]


class _Grid:
    """A label grid with its affine, for lattice counts inside local boxes."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int]):
        self.affine = np.asarray(affine, float)
        self.A = self.affine[:3, :3]
        self.t = self.affine[:3, 3]
        self.inv = np.linalg.inv(self.affine)
        self.shape = tuple(int(s) for s in shape)

    def world(self, idx: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) world mm."""
        return np.asarray(idx, float) @ self.A.T + self.t

    def voxel(self, world: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) continuous voxel indices (inverse of :meth:`world`)."""
        return np.asarray(world, float) @ self.inv[:3, :3].T + self.inv[:3, 3]

    def step_along(self, u: np.ndarray) -> float:
        """Largest voxel step projected on direction ``u`` (mm)."""
        return float(np.abs(self.A.T @ np.asarray(u, float)).max())

    def column_axis(self, e: np.ndarray) -> tuple[int, float]:
        """The array axis most aligned with direction ``e`` and its voxel step along ``e``."""
        proj = np.abs(self.A.T @ np.asarray(e, float))
        k = int(np.argmax(proj))
        return k, float(proj[k])

    def lattice_in_box(self, frame: Frame, lo, hi) -> tuple[np.ndarray, np.ndarray, bool]:
        """Voxel indices (N, 3) and local coordinates (N, 3) of every voxel centre inside the
        local box ``[lo, hi]``, and whether the box leaves the grid."""
        lo = np.asarray(lo, float)
        hi = np.asarray(hi, float)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        vox = self.voxel(frame.to_world(corners))
        shape = np.asarray(self.shape)
        truncated = bool(np.any(vox.min(axis=0) < -0.5) or np.any(vox.max(axis=0) > shape - 0.5))
        vmin = np.clip(np.floor(vox.min(axis=0)).astype(int), 0, shape - 1)
        vmax = np.clip(np.ceil(vox.max(axis=0)).astype(int), 0, shape - 1)
        axes = [np.arange(vmin[k], vmax[k] + 1) for k in range(3)]
        ii, jj, kk = np.meshgrid(*axes, indexing="ij")
        idx = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
        loc = frame.to_local(self.world(idx))
        inside = np.all((loc >= lo) & (loc <= hi), axis=1)
        return idx[inside], loc[inside], truncated

    def profile_extent(self, arr: np.ndarray, test, frame: Frame, lo, hi, axis: int) -> tuple[float, bool]:
        """Extent (mm) of the voxels passing ``test`` inside the local box along local ``axis``:
        the box is cut into thin bins along ``axis``; each bin contributes its width times the
        fraction of its voxel centres that pass (bins holding no voxel centre take the fraction
        interpolated from their neighbours). The mean extent over the box's cross-section, for
        any spacing and obliquity; only the two boundary bins carry sampling noise."""
        idx, loc, truncated = self.lattice_in_box(frame, lo, hi)
        if not len(idx):
            return float("nan"), truncated
        a0, a1 = float(lo[axis]), float(hi[axis])
        width = max(_BIN_MM, 1e-3)
        nb = max(1, int(math.ceil((a1 - a0) / width)))
        width = (a1 - a0) / nb
        b = np.clip(((loc[:, axis] - a0) / width).astype(int), 0, nb - 1)
        hit = test(arr[idx[:, 0], idx[:, 1], idx[:, 2]])
        n_all = np.bincount(b, minlength=nb).astype(float)
        n_in = np.bincount(b, weights=hit.astype(float), minlength=nb)
        ok = n_all > 0
        if not ok.any():
            return float("nan"), truncated
        centres = a0 + (np.arange(nb) + 0.5) * width
        frac = np.interp(centres, centres[ok], n_in[ok] / n_all[ok])
        return float(frac.sum() * width), truncated

    def slab(self, frame: Frame, half: float) -> tuple[float, float]:
        """``(lo, hi)`` of a slab along local z whose thickness is a whole number of voxel
        steps of the column axis, so every column holds the same number of voxels in it."""
        _, step = self.column_axis(frame.R[:, 2])
        m = max(1, int(math.ceil(2 * half / step)))
        return -0.5 * m * step, 0.5 * m * step

    def touches_border(self, idx: np.ndarray) -> bool:
        return bool(len(idx) and (np.any(idx.min(axis=0) <= 0)
                                  or np.any(idx.max(axis=0) >= np.asarray(self.shape) - 1)))


#: the grid helper, for the measurements built on the morphometry (``spineps.measure.alignment``)
Grid = _Grid


def _ordered(ids) -> list[int]:
    pos = {v: i for i, v in enumerate(VERTEBRA_ORDER)}
    return sorted((int(v) for v in ids if int(v) in pos), key=lambda v: pos[v])


def _points(mask_box: np.ndarray, offset: tuple[int, int, int], grid: _Grid) -> np.ndarray:
    idx = np.argwhere(mask_box) + np.asarray(offset)
    return grid.world(idx)


def _unit(d: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(d))
    return d / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def _axis_of(seq: list[int], centroid: dict[int, np.ndarray], i: int) -> np.ndarray:
    """The local spine axis at body ``seq[i]`` (see the module text)."""
    if len(seq) < 2:
        return np.array([0.0, 0.0, 1.0])
    if 0 < i < len(seq) - 1:
        return _unit(centroid[seq[i - 1]] - centroid[seq[i + 1]])
    # an end of the sequence: the segment to its neighbour, extrapolated by the change of
    # direction between the last two segments (a straight line with fewer than 3 bodies)
    j = 1 if i == 0 else -2
    k = 2 if i == 0 else -3
    seg = _unit(centroid[seq[0]] - centroid[seq[1]]) if i == 0 else _unit(centroid[seq[-2]] - centroid[seq[-1]])
    if len(seq) < 3:
        return seg
    prev = _unit(centroid[seq[j]] - centroid[seq[k]]) if i == 0 else _unit(centroid[seq[k]] - centroid[seq[j]])
    return _unit(2 * seg - prev)


@dataclass
class _Masks:
    """The two masks of one scan with what every level's measurement reads."""

    sem: np.ndarray
    inst: np.ndarray  # int32
    grid: _Grid
    objs: list  # ndimage.find_objects of ``inst`` (index value - 1)
    present: set[int]
    body_lab: np.ndarray  # int16: vertebra value on its body voxels (and, later, its endplates)
    voxel_volume: float
    out: Morphometry

    @staticmethod
    def of(semantic: Volume, instance: Volume) -> "_Masks":
        from scipy import ndimage

        sem = np.asarray(semantic.data)
        inst_i = np.asarray(instance.data).astype(np.int32, copy=False)
        is_vert = (inst_i > 0) & (inst_i < 100)
        body_lab = np.where(is_vert & np.isin(sem, _BODY_CLASSES), inst_i, 0).astype(np.int16)
        objs = ndimage.find_objects(inst_i) if inst_i.max() > 0 else []
        present = {i + 1 for i, s in enumerate(objs) if s is not None}
        return _Masks(sem, inst_i, _Grid(instance.affine, instance.shape), objs, present, body_lab,
                      instance.voxel_volume, Morphometry())


def _body_centroids(m: _Masks, body_ids: list[int], given: Optional[VertebraCentroids]
                    ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """World body centroid (whole vertebra where it has no body voxel) and whole-vertebra
    centroid of each vertebra: from ``given`` (the pipeline's, on this grid) where it has them,
    else on each vertebra's bounding box."""
    centroid: dict[int, np.ndarray] = {}
    whole: dict[int, np.ndarray] = {}
    row = {v: k for k, v in enumerate(given.ids)} if given is not None else {}
    for v in body_ids:
        if given is not None and v in row:
            whole[v] = m.grid.world(given.whole[row[v]][None])[0]
            centroid[v] = m.grid.world(given.body[row[v]][None])[0]
            continue
        slc = m.objs[v - 1]
        off = np.asarray([sl.start for sl in slc])
        mine = m.inst[slc] == v
        body = mine & np.isin(m.sem[slc], _BODY_CLASSES)
        w = m.grid.world(np.argwhere(mine).mean(axis=0)[None] + off)[0]
        whole[v] = w
        centroid[v] = m.grid.world(np.argwhere(body).mean(axis=0)[None] + off)[0] if body.any() else w
    return centroid, whole


def _with_body(m: _Masks) -> set[int]:
    """The vertebrae with vertebral-body voxels (a vertebra cut by the field of view may show
    only posterior elements)."""
    from scipy import ndimage

    objs = ndimage.find_objects(m.body_lab) if m.body_lab.max() > 0 else []
    return {i + 1 for i, sl in enumerate(objs) if sl is not None}


def _axes(m: _Masks, body_ids: list[int], centroid: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The local spine axis of every vertebra: through the centroids of the neighbouring
    vertebrae that have a body (``_axis_of``); a vertebra without a body takes the axis of the
    nearest one with a body (the centroid of a fragment of posterior elements is far from the
    line of the bodies)."""
    bodies = [v for v in body_ids if v in _with_body(m)]
    axes = {v: _axis_of(bodies, centroid, i) for i, v in enumerate(bodies)}
    for v in body_ids:
        if v not in axes:
            near = min(bodies, key=lambda b: float(np.linalg.norm(centroid[b] - centroid[v])), default=None)
            axes[v] = axes[near] if near is not None else np.array([0.0, 0.0, 1.0])
    return axes


def _spatial_order(body_ids: list[int], centroid: dict[int, np.ndarray]) -> list[int]:
    """Neighbours along the spine are neighbours in space: the bodies ordered by their position
    along the main direction of the centroid cloud (superior first), not by label value, so a
    mislabelled level does not bend every local axis."""
    if len(body_ids) < 2:
        return list(body_ids)
    pts = np.array([centroid[v] for v in body_ids])
    d = np.linalg.svd(pts - pts.mean(axis=0), full_matrices=False)[2][0]
    d = d if d[2] >= 0 else -d
    proj = pts @ d
    return [body_ids[i] for i in np.argsort(-proj, kind="stable")]


class _Tube:
    """The canal and cord voxels (world coordinates), read once per scan."""

    def __init__(self, sem: np.ndarray, grid: _Grid):
        self.idx = np.argwhere(np.isin(sem, _TUBE))
        self.world = grid.world(self.idx) if len(self.idx) else np.zeros((0, 3))
        self.is_cord = (sem[self.idx[:, 0], self.idx[:, 1], self.idx[:, 2]] == CORD if len(self.idx)
                        else np.zeros(0, bool))

    def centre(self, origin: np.ndarray, up: np.ndarray) -> Optional[np.ndarray]:
        """Centre of the canal voxels in a 10 mm slab through ``origin`` across ``up``."""
        if not len(self.world):
            return None
        d = self.world - origin
        z = d @ up
        sel = np.abs(z) <= 5.0
        if not sel.any():
            return None
        perp = d[sel] - np.outer(z[sel], up)
        near = np.linalg.norm(perp, axis=1) <= _CANAL_SEARCH_MM[1]
        if near.sum() < 3:
            return None
        return self.world[sel][near].mean(axis=0)

    def measure(self, m: _Masks, frame: Frame, level: str) -> None:
        """Canal and cord CSA and AP diameter at ``level`` (rows appended to ``m.out``)."""
        if not len(self.world):
            return
        grid = m.grid
        ex = frame.R[:, 0]
        z0, z1 = grid.slab(frame, SLAB_HALF_MM)
        loc = frame.to_local(self.world)
        sel = (loc[:, 2] >= z0) & (loc[:, 2] < z1) & (np.abs(loc[:, 0]) <= _CANAL_SEARCH_MM[0]) & \
              (np.abs(loc[:, 1]) <= _CANAL_SEARCH_MM[1])
        bx = max(BAND_HALF_MM, 0.75 * grid.step_along(ex))
        sy = grid.step_along(frame.R[:, 1])
        for structure, which, values in (("canal", np.ones(len(loc), bool), _TUBE),
                                         ("cord", self.is_cord, (CORD,))):
            s = sel & which
            if s.sum() < 3:
                continue
            q = loc[s]
            csa = float(s.sum()) * m.voxel_volume / (z1 - z0)
            xc = float(np.median(q[:, 0]))
            # AP diameter: profile along y through the canal centre, in the sagittal band and the slab
            ylo, yhi = q[:, 1].min() - 2 * sy, q[:, 1].max() + 2 * sy
            ap, _ = grid.profile_extent(m.sem, lambda vals, _v=values: np.isin(vals, _v), frame,
                                        (xc - bx, ylo, z0), (xc + bx, yhi, z1), 1)
            if grid.touches_border(self.idx[s]):
                m.out.truncated.append(f"{level} {structure}")
                csa = ap = float("nan")
            m.out.values.append(LevelValue(level, structure, "csa_mm2", csa))
            m.out.values.append(LevelValue(level, structure, "ap_diameter_mm", ap))


def _assign_endplates(m: _Masks, body_ids: list[int], centroid: dict[int, np.ndarray],
                      next_found: dict[int, Optional[int]]) -> None:
    """Each endplate voxel (200+X) joins its body (``m.body_lab``): the one below for a superior
    endplate (52), the one above for an inferior one (53), the one on its side of the disc
    mid-plane for an unsplit endplate (62)."""
    for v in body_ids:
        e = 200 + v
        if e not in m.present:
            continue
        slc = m.objs[e - 1]
        mask = m.inst[slc] == e
        off = tuple(s.start for s in slc)
        nb = next_found.get(v)
        if nb is None:
            m.body_lab[slc][mask] = v
            continue
        up = centroid[v] - centroid[nb]
        up = up / max(np.linalg.norm(up), 1e-9)
        d_id = 100 + v
        if d_id in m.present:
            ds = m.objs[d_id - 1]
            dm = m.inst[ds] == d_id
            mid = _points(dm, tuple(s.start for s in ds), m.grid).mean(axis=0)
        else:
            mid = 0.5 * (centroid[v] + centroid[nb])
        pts = _points(mask, off, m.grid)
        side = (pts - mid) @ up > 0
        sub = m.body_lab[slc]
        # the superior / inferior split of the semantic mask decides where it is made (52: the
        # body below, 53: the body above); the side of the disc mid-plane decides the rest
        sem = m.sem[slc][mask]
        vals = np.where(sem == ENDPLATE_INF, v, np.where(sem == ENDPLATE_SUP, nb, np.where(side, v, nb)))
        sub[mask] = vals.astype(np.int16)


def _heights(m: _Masks, arr: np.ndarray, value: int, slc, frame: Frame, level: str, structure: str,
             with_depth: bool) -> None:
    """Anterior / middle / posterior heights (and the depth) of ``arr == value`` at ``level``."""
    grid = m.grid
    idx = np.argwhere(arr[slc] == value) + np.asarray([sl.start for sl in slc])
    if not len(idx):
        return
    pts = frame.to_local(grid.world(idx))
    ex, ey = frame.R[:, 0], frame.R[:, 1]
    bx = max(BAND_HALF_MM, 0.75 * grid.step_along(ex))
    sy = grid.step_along(ey)
    band = np.abs(pts[:, 0]) <= bx
    if band.sum() < 2:
        return
    ymin, ymax = float(pts[band, 1].min()), float(pts[band, 1].max())
    depth_span = ymax - ymin + sy
    hw = max(_STRIP_HALF_FRACTION * depth_span, 0.75 * sy)
    zmax = float(np.abs(pts[:, 2]).max()) + 2.0 * grid.step_along(frame.R[:, 2])

    def test(vals: np.ndarray) -> np.ndarray:
        return vals == value

    res: dict[str, float] = {}
    for name, f in STRIPS.items():
        yc = ymin - 0.5 * sy + f * depth_span
        res[name], _ = grid.profile_extent(arr, test, frame, (-bx, yc - hw, -zmax), (bx, yc + hw, zmax), 2)
    if with_depth:
        hz = max(0.25 * res["middle"], grid.step_along(frame.R[:, 2])) if math.isfinite(res["middle"]) else 2.0
        ylo, yhi = ymin - 2 * sy, ymax + 2 * sy
        res["depth"], _ = grid.profile_extent(arr, test, frame, (-bx, ylo, -hz), (bx, yhi, hz), 1)
    if grid.touches_border(idx):
        m.out.truncated.append(f"{level} {structure}")
        res = {k: float("nan") for k in res}
    for name in STRIPS:
        m.out.values.append(LevelValue(level, structure, f"height_{name}_mm", res[name]))
    if with_depth:
        m.out.values.append(LevelValue(level, structure, "depth_mm", res["depth"]))


def _measure_vertebra(m: _Masks, tube: _Tube, objs_body: list, v: int, centroid: np.ndarray, whole: np.ndarray,
                      up: np.ndarray) -> None:
    name = vertebra_name(v)
    cc = tube.centre(centroid, up)
    if cc is not None:
        ant = centroid - cc
    elif np.linalg.norm(centroid - whole) > 1.0:
        ant = centroid - whole
    else:
        ant = np.array([0.0, 1.0, 0.0])
    frame = Frame.make(centroid, up, ant)
    m.out.frames[name] = frame
    if v <= len(objs_body) and objs_body[v - 1] is not None:
        slc = objs_body[v - 1]
        m.out.values.append(LevelValue(name, "body", "volume_mm3",
                                       float(np.count_nonzero(m.body_lab[slc] == v)) * m.voxel_volume))
        _heights(m, m.body_lab, v, slc, frame, name, "body", with_depth=True)
    tube.measure(m, frame, name)


def _disc_axis(v: int, pts: np.ndarray, origin: np.ndarray, centroid: dict[int, np.ndarray],
               axes: dict[int, np.ndarray], body_ids: list[int], nb: Optional[int]) -> np.ndarray:
    """The axis of the disc below vertebra ``v`` (see the module text), a unit vector."""
    if v in centroid and nb is not None:
        up = centroid[v] - centroid[nb]
    elif len(pts) >= 10:  # next to the sacrum or an end: the disc's own normal (it is flat)
        cov = np.cov((pts - origin).T)
        w, vecs = np.linalg.eigh(cov)
        up = vecs[:, 0]
        ref = axes.get(v, np.array([0.0, 0.0, 1.0]))
        up = up if float(up @ ref) >= 0 else -up
    elif v in axes:
        up = axes[v]
    elif body_ids:  # disc above the top body or below a sacrum-only scan: nearest body's axis
        near = min(body_ids, key=lambda b: float(np.linalg.norm(centroid[b] - origin)))
        up = axes[near]
    else:
        up = np.array([0.0, 0.0, 1.0])
    return up / max(np.linalg.norm(up), 1e-9)


def _measure_disc(m: _Masks, tube: _Tube, v: int, centroid: dict[int, np.ndarray], axes: dict[int, np.ndarray],
                  body_ids: list[int], nb: Optional[int]) -> None:
    d = 100 + v
    name = disc_level_name(v)
    slc = m.objs[d - 1]
    pts = _points(m.inst[slc] == d, tuple(s.start for s in slc), m.grid)
    origin = pts.mean(axis=0)
    up = _disc_axis(v, pts, origin, centroid, axes, body_ids, nb)
    cc = tube.centre(origin, up)
    if cc is not None:
        ant = origin - cc
    elif v in m.out.frames:
        ant = m.out.frames[vertebra_name(v)].R[:, 1]
    else:
        ant = np.array([0.0, 1.0, 0.0])
    frame = Frame.make(origin, up, ant)
    m.out.frames[name] = frame
    _heights(m, m.inst, d, slc, frame, name, "disc", with_depth=False)
    tube.measure(m, frame, name)


def measure_morphometry(semantic: Volume, instance: Volume, *, include_endplates: bool = True,
                        centroids: Optional[VertebraCentroids] = None) -> Morphometry:
    """Heights, depths, cross-sections (see the module docstring) of every vertebra, disc and
    canal level found in ``instance`` (vertebrae 1..28, discs 100+X, endplates 200+X) with
    ``semantic`` on the same grid. ``centroids``: the vertebrae's body centroids on this grid
    (``spineps.pipeline`` computes them once per scan); computed here where not given."""
    from scipy import ndimage

    if not semantic.same_grid(instance):
        raise ValueError(f"semantic {semantic} and instance {instance} masks are not on the same grid")
    m = _Masks.of(semantic, instance)
    verts = [v for v in _ordered(m.present) if v in VERTEBRA_VALUES]
    body_ids = [v for v in verts if v != _SACRUM]
    centroid, whole = _body_centroids(m, body_ids, centroids)
    body_ids = _spatial_order(body_ids, centroid)
    m.out.spatial_order = list(body_ids)
    m.out.body_centroids = {v: [round(float(x), 3) for x in c] for v, c in centroid.items()}
    axes = _axes(m, body_ids, centroid)
    tube = _Tube(m.sem, m.grid)
    bodies = [v for v in body_ids if v in _with_body(m)]
    next_found = {v: (bodies[i + 1] if i + 1 < len(bodies) else None) for i, v in enumerate(bodies)}
    if include_endplates:
        _assign_endplates(m, body_ids, centroid, next_found)
    objs_body = ndimage.find_objects(m.body_lab) if m.body_lab.max() > 0 else []
    for v in body_ids:
        _measure_vertebra(m, tube, objs_body, v, centroid[v], whole[v], axes[v])
    for v in verts:
        if 100 + v in m.present:
            _measure_disc(m, tube, v, centroid, axes, body_ids, next_found.get(v))
    m.out.body_labels, m.out.grid = m.body_lab, m.grid
    return m.out
