"""Spinal alignment from the instance masks: endplate planes, sagittal curves (Cobb method),
the largest coronal Cobb angle, vertebral and disc wedge angles, disc height index and
sagittal slip (listhesis) per motion segment.

Endplate planes
---------------
Each vertebral body (its semantic body voxels with its own endplates, ``Morphometry.body_labels``)
is seen in its local frame (``Morphometry.frames``: origin at the body centroid, ``z`` along
the local spine axis, ``y`` anterior). Over the central part of the body (``|x|`` within
``CENTRAL_FRACTION`` of its half-width, ``|y|`` of its half-depth, from the mid-height slab)
the body is cut into columns along ``z`` (``x``/``y`` bins of at least one voxel step); the
top-most voxel of each column is a point of the superior endplate surface, the bottom-most one
of the inferior (half a voxel step added outwards), and a plane is fitted to each set by least
squares, robustly (points more than ``max(1 mm, 2.5 robust sd)`` off the plane are left out). The superior endplate
of S1 is fitted the same way to the top of the sacrum (instance 26) under the lowest lumbar
body. An endplate whose body touches the image border on its side, or that has fewer than
``MIN_COLUMNS`` columns, is not measured (its measures are ``n/a`` with the reason).

Corners: in the endplate's own frame (origin on the plane, ``z`` its normal, ``y`` the body's
anterior direction in the plane), the posterior and anterior walls of the body in a slab
0.5-3 mm inside it and a mid-sagittal band are where the fraction of voxel centres inside the
body, in 0.5 mm slices outwards from the centre, first falls below one half (sub-voxel, and
blind to structures beyond a gap); the corners are those walls on the plane.

Measures (world RAS: tilts are those of the normals in the sagittal ``y``-``z`` and coronal
``x``-``z`` planes; every angle is between endplates, so rigid motion of the patient does
not change it): see :data:`DEFINITIONS` (also in the morphometry JSON sidecar, with the
references). Accuracy on exact phantoms: angles within 3 degrees, slips within 1 mm
(``tests/test_alignment.py``, reference masks of ``spineps.synth`` phantoms with curves,
scoliosis, wedged bodies and slips).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import SACRUM, VERTEBRA_ORDER, vertebra_name, vertebra_value
from spineps.measure.morphometry import BAND_HALF_MM, Frame, Grid, LevelValue, Morphometry, disc_level_name

__all__ = ["Plane", "BodyPlanes", "Alignment", "endplate_planes", "alignment_from_planes", "measure_alignment",
           "session_alignment", "DEFINITIONS", "REFERENCES", "CURVES", "MIN_COLUMNS", "CENTRAL_FRACTION",
           "COBB_SE_MAX_DEG", "COBB_LEVELS"]

#: columns an endplate needs to be fitted
MIN_COLUMNS = 6
#: the central part of the body (fraction of its half-width / half-depth) whose columns are used
CENTRAL_FRACTION = 0.85
#: endplates whose coronal tilt has a larger standard error (thin bodies on thick sagittal
#: slices) do not take part in the Cobb angle
COBB_SE_MAX_DEG = 2.0
#: the vertebrae of the coronal Cobb angle: thoracic and lumbar (T1-L5 with T13 and L6; the
#: coronal tilt of the small cervical endplates is not reliable on thick sagittal slices)
COBB_LEVELS = frozenset({*range(8, 20), 28, *range(20, 26)})
#: how deep into the body (mm) the walls are read for the corners
_CORNER_SLAB_MM = (0.5, 3.0)
#: how far below the lowest lumbar body (mm) the top of the sacrum is looked for
_SACRUM_SEARCH_MM = 40.0

REFERENCES: dict[str, str] = {
    "cobb": "Cobb JR. Outline for the study of scoliosis. Instr Course Lect 1948;5:261-275",
    "srs": "O'Brien MF et al. (eds). Spinal Deformity Study Group Radiographic Measurement Manual. Medtronic "
           "Sofamor Danek, 2004 (thoracic kyphosis T4-T12, lumbar lordosis L1-S1, Cobb method)",
    "wedge": "Kuklo TR et al. Measurement of thoracic and lumbar fracture kyphosis: evaluation of intraobserver, "
             "interobserver, and technique variability. Spine 2001;26:61-65 (vertebral body wedge angle)",
    "dhi": "Chen X et al. Radiographic evaluation of lumbar intervertebral disc height index: an intra and "
           "inter-rater agreement and reliability study. J Clin Neurosci 2022;103:153-162",
    "meyerding": "Meyerding HW. Spondylolisthesis. Surg Gynecol Obstet 1932;54:371-377 (slip as a percentage of "
                 "the superior endplate of the vertebra below)",
}

#: (level range, measure, upper endplate, lower endplate, sign): sign +1 measures a kyphosis
#: (upper tilt minus lower tilt), -1 a lordosis
CURVES: tuple[tuple[str, str, tuple[str, str], tuple[str, str], int], ...] = (
    ("C2-C7", "lordosis_deg", ("C2", "inferior"), ("C7", "inferior"), -1),
    ("T4-T12", "kyphosis_deg", ("T4", "superior"), ("T12", "inferior"), 1),
    ("L1-L5", "lordosis_deg", ("L1", "superior"), ("L5", "inferior"), -1),
    ("L1-S1", "lordosis_deg", ("L1", "superior"), ("S1", "superior"), -1),
)

DEFINITIONS: dict[str, dict[str, str]] = {
    "lordosis_deg": {
        "Description": "Sagittal Cobb angle of a lordotic region between two endplates (level range in the level "
                       "column): C2-C7 inferior endplate of C2 to inferior endplate of C7; L1-L5 superior endplate of "
                       "L1 to inferior endplate of L5; L1-S1 superior endplate of L1 to superior endplate of S1. "
                       "Positive = lordosis (posteriorly concave)", "Units": "degrees", "Reference": REFERENCES["srs"]},
    "kyphosis_deg": {
        "Description": "Sagittal Cobb angle T4-T12: superior endplate of T4 to inferior endplate of T12. Positive = "
                       "kyphosis (anteriorly concave)", "Units": "degrees", "Reference": REFERENCES["srs"]},
    "cobb_deg": {
        "Description": "Largest coronal Cobb angle: the largest angle in the coronal plane between the superior "
                       "endplate of an upper and the inferior endplate of a lower thoracic or lumbar vertebra (T1-L5); "
                       "the end vertebrae, apex and convexity are in the JSON sidecar (Alignment.Cobb)",
        "Units": "degrees",
        "Reference": REFERENCES["cobb"]},
    "wedge_angle_deg": {
        "Description": "Body: angle between its superior and inferior endplates in the sagittal plane; disc: angle "
                       "between the inferior endplate above and the superior endplate below it. Positive = "
                       "kyphotic (anterior side shorter)", "Units": "degrees", "Reference": REFERENCES["wedge"]},
    "height_index": {
        "Description": "Disc height index: mean of the disc's anterior, middle and posterior heights over the mean "
                       "middle height of the two adjacent bodies (L5/S1: of L5 alone; C2/C3: of C3 alone, "
                       "C2's middle height runs through the dens)", "Units": "ratio",
        "Reference": REFERENCES["dhi"]},
    "slip_mm": {
        "Description": "Sagittal slip of the motion segment (the vertebra on the one below it): the posterior-"
                       "inferior corner of the upper body minus the posterior-superior corner of the lower body, "
                       "along the lower body's superior endplate (posterior to anterior). Positive = "
                       "anterolisthesis, negative = retrolisthesis", "Units": "mm",
        "Reference": REFERENCES["meyerding"]},
    "slip_percent": {
        "Description": "The slip as a percentage of the antero-posterior length of the lower body's superior endplate "
                       "(Meyerding grade I below 25 %, II 25-50 %, III 50-75 %, IV 75-100 %)", "Units": "%",
        "Reference": REFERENCES["meyerding"]},
}


# ------------------------------------------------------------------------------ planes
@dataclass
class Plane:
    """One endplate (world mm): a point on it, its unit normal (pointing superiorly), its
    antero-posterior direction, and its mid-sagittal corners where measured."""

    centre: np.ndarray
    normal: np.ndarray
    anterior: np.ndarray
    posterior_corner: Optional[np.ndarray] = None
    anterior_corner: Optional[np.ndarray] = None
    columns: int = 0
    coronal_se_deg: float = 0.0  # standard error of the fitted coronal slope

    def shifted(self, t: np.ndarray) -> "Plane":
        """The same plane translated by ``t`` (mm)."""
        move = (lambda p: None if p is None else p + t)  # noqa: E731
        return Plane(self.centre + t, self.normal, self.anterior, move(self.posterior_corner),
                     move(self.anterior_corner), self.columns, self.coronal_se_deg)

    def sagittal_deg(self) -> float:
        return math.degrees(math.atan2(self.normal[1], self.normal[2]))

    def coronal_deg(self) -> float:
        return math.degrees(math.atan2(self.normal[0], self.normal[2]))

    def as_dict(self) -> dict[str, Any]:
        r = (lambda p: None if p is None else [round(float(x), 3) for x in p])  # noqa: E731
        return {"centre": r(self.centre), "normal": [round(float(x), 5) for x in self.normal],
                "posterior_corner": r(self.posterior_corner), "anterior_corner": r(self.anterior_corner),
                "sagittal_tilt_deg": round(self.sagittal_deg(), 2), "coronal_tilt_deg": round(self.coronal_deg(), 2),
                "coronal_tilt_se_deg": round(self.coronal_se_deg, 2), "columns": self.columns}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Plane":
        arr = (lambda k: None if d.get(k) is None else np.asarray(d[k], float))  # noqa: E731
        normal = np.asarray(d["normal"], float)
        post, ant = arr("posterior_corner"), arr("anterior_corner")
        ap = ant - post if post is not None and ant is not None else np.array([0.0, 1.0, 0.0])
        return Plane(np.asarray(d["centre"], float), normal, ap / max(float(np.linalg.norm(ap)), 1e-9), post, ant,
                     int(d.get("columns", 0)), float(d.get("coronal_tilt_se_deg", 0.0)))


@dataclass
class BodyPlanes:
    """The endplates of one vertebra (level value; S1 = the top of the sacrum) and, where one
    could not be measured, why."""

    value: int
    superior: Optional[Plane] = None
    inferior: Optional[Plane] = None
    why: dict[str, str] = field(default_factory=dict)  # "superior"/"inferior" -> reason

    def plane(self, side: str) -> Optional[Plane]:
        return self.superior if side == "superior" else self.inferior

    def shifted(self, t: np.ndarray) -> "BodyPlanes":
        return BodyPlanes(self.value, None if self.superior is None else self.superior.shifted(t),
                          None if self.inferior is None else self.inferior.shifted(t), dict(self.why))


def _fit_plane(pts: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``z = a + b x + c y`` through (N, 3) points, robustly: first through the points within
    3 mm of their median height (the local frame's z follows the spine, so an endplate is
    roughly level in it), then four times through the points within ``max(1 mm, 2.5 robust
    sd)`` of the last plane: ((a, b, c), kept mask)."""
    keep = np.abs(pts[:, 2] - np.median(pts[:, 2])) <= 3.0
    coef = None
    for _ in range(5):
        if keep.sum() < MIN_COLUMNS:
            return None
        A = np.column_stack([np.ones(keep.sum()), pts[keep, 0], pts[keep, 1]])
        coef = np.linalg.lstsq(A, pts[keep, 2], rcond=None)[0]
        res = pts[:, 2] - (coef[0] + coef[1] * pts[:, 0] + coef[2] * pts[:, 1])
        mad = float(np.median(np.abs(res[keep] - np.median(res[keep]))))
        keep = np.abs(res) <= max(1.0, 2.5 * 1.4826 * mad)
    assert coef is not None
    return coef, keep


def _slope_se_deg(pts: np.ndarray, coef: Sequence[float]) -> float:
    """Standard error (degrees) of the fitted slope along local x (the coronal tilt)."""
    res = pts[:, 2] - (coef[0] + coef[1] * pts[:, 0] + coef[2] * pts[:, 1])
    sxx = float(((pts[:, 0] - pts[:, 0].mean()) ** 2).sum())
    sd = float(np.sqrt((res ** 2).sum() / max(len(pts) - 3, 1)))
    return math.degrees(math.atan(sd / math.sqrt(sxx))) if sxx > 0 else 90.0


def _central_box(loc: np.ndarray, steps: np.ndarray, low: bool = False) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Centre and half-size (local x, y) of a body from its mid-height slab (``low``: from its
    lowest third, for C2 whose dens rises from the top), or None."""
    z = loc[:, 2]
    if low:
        mid = z <= np.percentile(z, 33)
    else:
        mid = np.abs(z) <= max(0.25 * (np.percentile(z, 98) - np.percentile(z, 2)), steps[2])
    if mid.sum() < 4:
        return None
    lo, hi = np.percentile(loc[mid, :2], 2, axis=0), np.percentile(loc[mid, :2], 98, axis=0)
    return (hi + lo) / 2, (hi - lo) / 2 + steps[:2] / 2


def _surface_points(loc: np.ndarray, steps: np.ndarray, box: tuple[np.ndarray, np.ndarray], *,
                    full_columns: bool = True) -> dict[str, np.ndarray]:
    """Top-most (``superior``) and bottom-most (``inferior``) voxel of each column (local x, y
    bins of one voxel step) inside the central part of ``box`` (``_central_box``) of points
    given in local coordinates; ``steps``: voxel steps along local x, y, z. The points move
    half a step outwards (voxel centre -> surface). Columns much shorter than the median one (a
    structure next to the body took voxels of it, e.g. a rib head) are left out
    (``full_columns``)."""
    centre, half = box
    q = loc[np.all(np.abs(loc[:, :2] - centre) <= CENTRAL_FRACTION * half, axis=1)]
    if not len(q):
        return {"superior": np.zeros((0, 3)), "inferior": np.zeros((0, 3))}
    key = np.floor((q[:, :2] - centre) / np.maximum(steps[:2], 0.3) + 0.5).astype(np.int64)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = np.asarray(inv).ravel()
    order = np.lexsort((q[:, 2], inv))
    first = np.r_[True, inv[order][1:] != inv[order][:-1]]
    last = np.r_[inv[order][1:] != inv[order][:-1], True]
    top, bot = q[order][last].copy(), q[order][first].copy()
    height = top[:, 2] - bot[:, 2]
    full = height >= 0.8 * float(np.median(height)) if full_columns else np.ones(len(height), bool)
    top[:, 2] += 0.5 * steps[2]
    bot[:, 2] -= 0.5 * steps[2]
    return {"superior": top[full], "inferior": bot[full]}


def _steps(grid: Grid, frame: Frame) -> np.ndarray:
    return np.array([grid.step_along(frame.R[:, k]) for k in range(3)])


def _wall(grid: Grid, arr: np.ndarray, value: int, frame: Frame, lo: Sequence[float], hi: Sequence[float],
          sign: float) -> float:
    """Distance (mm) from the frame's origin to the first wall of ``arr == value`` along local
    ``sign * y`` inside the local box ``[lo, hi]`` (x and z ranges; y from 0 outwards): the
    voxel centres are binned in 0.5 mm slices along y, and the wall is where the fraction of
    them inside the structure first falls below one half (interpolated), so structures beyond
    a gap (the sacral laminae behind the canal) do not count."""
    idx, loc, _ = grid.lattice_in_box(frame, lo, hi)
    if not len(idx):
        return float("nan")
    d = sign * loc[:, 1]
    b = (d / 0.5).astype(int)
    keep = (d >= 0) & (b < 400)
    hit = (arr[idx[keep, 0], idx[keep, 1], idx[keep, 2]] == value).astype(float)
    n_all = np.bincount(b[keep], minlength=1).astype(float)
    n_in = np.bincount(b[keep], weights=hit, minlength=len(n_all))
    ok = n_all > 0
    if ok.sum() < 2:
        return float("nan")
    centres = (np.arange(len(n_all)) + 0.5) * 0.5
    frac = np.interp(centres, centres[ok], n_in[ok] / n_all[ok])
    below = np.nonzero(frac < 0.5)[0]
    if not len(below) or below[0] == 0:
        return float("nan")
    k = int(below[0])
    f0, f1 = frac[k - 1], frac[k]
    return float(centres[k - 1] + 0.5 * (f0 - 0.5) / max(f0 - f1, 1e-9))


def _corners(plane: Plane, grid: Grid, arr: np.ndarray, value: int, side: str, reach: float) -> None:
    """The mid-sagittal posterior and anterior corners of ``plane`` (see the module text)."""
    frame = Frame.make(plane.centre, plane.normal, plane.anterior)
    z0, z1 = _CORNER_SLAB_MM
    zlo, zhi = (-z1, -z0) if side == "superior" else (z0, z1)
    bx = max(BAND_HALF_MM, 0.75 * grid.step_along(frame.R[:, 0]))
    post = _wall(grid, arr, value, frame, (-bx, -reach, zlo), (bx, 0.0, zhi), -1.0)
    ant = _wall(grid, arr, value, frame, (-bx, 0.0, zlo), (bx, reach, zhi), 1.0)
    if math.isfinite(post) and post > 1.0:
        plane.posterior_corner = frame.to_world(np.array([[0.0, -post, 0.0]]))[0]
    if math.isfinite(ant) and ant > 1.0:
        plane.anterior_corner = frame.to_world(np.array([[0.0, ant, 0.0]]))[0]


def _endplate(grid: Grid, frame: Frame, pts: np.ndarray, side: str, box: tuple[np.ndarray, np.ndarray],
              arr: np.ndarray, value: int) -> tuple[Optional[Plane], str]:
    """One endplate plane fitted to surface points ``pts`` (local, ``_surface_points``) in
    ``frame``, with its corners read on ``arr == value``; or None and the reason."""
    fit = _fit_plane(pts) if len(pts) >= MIN_COLUMNS else None
    if fit is None:
        return None, f"{side} endplate: {len(pts)} columns of the body's central part (at least {MIN_COLUMNS})"
    (a, b, c), keep = fit
    n_loc = np.array([-b, -c, 1.0]) / math.sqrt(b * b + c * c + 1.0)
    mx, my = float(pts[keep, 0].mean()), float(pts[keep, 1].mean())
    centre = frame.to_world(np.array([[mx, my, a + b * mx + c * my]]))[0]
    normal = frame.R @ n_loc
    ant = frame.R[:, 1] - (frame.R[:, 1] @ normal) * normal
    plane = Plane(centre, normal, ant / np.linalg.norm(ant), columns=int(keep.sum()),
                  coronal_se_deg=_slope_se_deg(pts[keep], (a, b, c)))
    _corners(plane, grid, arr, value, side, 1.6 * float(box[1][1]) + 3.0)
    return plane, ""


def _body_planes(grid: Grid, labels: np.ndarray, slc: tuple, v: int, frame: Frame) -> BodyPlanes:
    """Superior and inferior endplates of the body of vertebra ``v`` (``labels[slc] == v``)."""
    idx = np.argwhere(labels[slc] == v) + np.asarray([s.start for s in slc])
    out = BodyPlanes(v)
    loc = frame.to_local(grid.world(idx))
    box = _central_box(loc, _steps(grid, frame), low=v == 2) if len(idx) >= 20 else None
    if box is None:
        out.why = {"superior": "too few body voxels", "inferior": "too few body voxels"}
        return out
    if np.any((idx <= 1) | (idx >= np.asarray(grid.shape) - 2)):
        out.why = {side: "body cut by the field of view" for side in ("superior", "inferior")}
        return out
    z = loc[:, 2]
    if np.percentile(z, 98) - np.percentile(z, 2) < 0.3 * 2 * float(box[1][1]):
        out.why = {side: "body too flat to be whole (a sliver at the edge of the view?)"
                   for side in ("superior", "inferior")}
        return out
    surfaces = _surface_points(loc, _steps(grid, frame), box, full_columns=v != 2)
    for side in ("superior", "inferior"):
        if v == 2 and side == "superior":
            out.why[side] = "C2 has no superior endplate (dens)"
            continue
        plane, why = _endplate(grid, frame, surfaces[side], side, box, labels, v)
        setattr(out, side, plane)
        if plane is None:
            out.why[side] = why
    return out


def _sacrum_planes(grid: Grid, inst: np.ndarray, frame: Frame, labels: np.ndarray, lowest: int) -> BodyPlanes:
    """The superior endplate of S1: the top of the sacrum under the central part of the lowest
    lumbar body (seen in that body's frame)."""
    out = BodyPlanes(SACRUM, why={"inferior": "the sacrum has no inferior endplate"})
    idx = np.argwhere(inst == SACRUM)
    body = np.argwhere(labels == lowest)
    if not len(idx) or len(body) < 20:
        out.why["superior"] = "no sacrum in the mask"
        return out
    loc = frame.to_local(grid.world(idx))
    box = _central_box(frame.to_local(grid.world(body)), _steps(grid, frame))
    near = loc[:, 2] >= -_SACRUM_SEARCH_MM - float(np.abs(frame.to_local(grid.world(body))[:, 2]).max())
    if box is None or near.sum() < 20:
        out.why["superior"] = f"the sacrum is not within {_SACRUM_SEARCH_MM:g} mm below {vertebra_name(lowest)}"
        return out
    centre, half = box
    central = near & np.all(np.abs(loc[:, :2] - centre) <= CENTRAL_FRACTION * half, axis=1)
    on_border = np.any((idx == 0) | (idx == np.asarray(grid.shape) - 1), axis=1)
    if central.any() and (on_border & central & (loc[:, 2] >= loc[central, 2].max() - 5.0)).any():
        out.why["superior"] = "the top of the sacrum is cut by the field of view"
        return out
    pts = _surface_points(loc[near], _steps(grid, frame), box)["superior"]
    out.superior, why = _endplate(grid, frame, pts, "superior", box, inst, SACRUM)
    if out.superior is None:
        out.why["superior"] = why
    return out


def endplate_planes(morph: Morphometry, instance: Volume) -> dict[int, BodyPlanes]:
    """The endplates of every measured body of ``morph`` (and S1 under the lowest one when the
    sacrum is in ``instance``), by vertebra value."""
    from scipy import ndimage

    out: dict[int, BodyPlanes] = {}
    labels, grid = morph.body_labels, morph.grid
    if labels is None or grid is None or not labels.any():
        return out
    objs = ndimage.find_objects(labels)
    for name, frame in morph.frames.items():
        if "/" in name:
            continue
        v = vertebra_value(name)
        if v <= len(objs) and objs[v - 1] is not None:
            out[v] = _body_planes(grid, labels, objs[v - 1], v, frame)
    inst = np.asarray(instance.data)
    order = [v for v in morph.spatial_order if v in out]
    if order and (inst == SACRUM).any():
        out[SACRUM] = _sacrum_planes(grid, inst, morph.frames[vertebra_name(order[-1])], labels, order[-1])
    return out


# ------------------------------------------------------------------------------ measures
_VARIANT_NEIGHBOURS = {(19, 28), (24, 25)}


def _adjacent(a: int, b: int) -> bool:
    from spineps.labels import next_vertebra

    return next_vertebra(a) == b or (a, b) in _VARIANT_NEIGHBOURS


@dataclass
class Alignment:
    """The alignment measures of one scan (or of a session's stations together)."""

    values: list[LevelValue] = field(default_factory=list)
    not_measured: dict[str, str] = field(default_factory=dict)  # "L1-S1 spine lordosis_deg" -> reason
    cobb: dict[str, Any] = field(default_factory=dict)  # end vertebrae, apex, convexity
    used: dict[str, str] = field(default_factory=dict)  # "L1-S1 spine lordosis_deg" -> the endplates used
    planes: dict[int, BodyPlanes] = field(default_factory=dict)

    def add(self, level: str, structure: str, measure: str, value: float, why: str = "") -> None:
        self.values.append(LevelValue(level, structure, measure, float(value)))
        if not math.isfinite(float(value)):
            self.not_measured[f"{level} {structure} {measure}"] = why or "not measurable"

    def get(self, level: str, structure: str, measure: str) -> float:
        for v in self.values:
            if (v.level, v.structure, v.measure) == (level, structure, measure):
                return v.value
        raise KeyError((level, structure, measure))

    def as_dict(self) -> dict[str, Any]:
        """The JSON sidecar's ``Alignment`` section."""
        return {
            "Definitions": {k: dict(v) for k, v in DEFINITIONS.items()},
            "EndplatesUsed": dict(self.used),
            "NotMeasured": dict(self.not_measured),
            "Cobb": dict(self.cobb),
            "Endplates": {vertebra_name(v): {side: p.as_dict() for side in ("superior", "inferior")
                                             if (p := bp.plane(side)) is not None}
                          for v, bp in sorted(self.planes.items(), key=lambda kv: VERTEBRA_ORDER.index(kv[0]))},
        }


def _plane_of(planes: Mapping[int, BodyPlanes], present: set[int], name: str, side: str
              ) -> tuple[Optional[Plane], str]:
    v = vertebra_value(name)
    bp = planes.get(v)
    if bp is not None and bp.plane(side) is not None:
        return bp.plane(side), ""
    if v not in present:
        return None, f"{name} not in the field of view" if v != SACRUM else "no sacrum in the mask"
    return None, f"{name}: {bp.why.get(side, 'not measurable') if bp is not None else 'no body to measure'}"


def _curves(al: Alignment, planes: Mapping[int, BodyPlanes], present: set[int]) -> None:
    for rng, measure, (un, us), (ln, ls), sign in CURVES:
        upper, why_u = _plane_of(planes, present, un, us)
        lower, why_l = _plane_of(planes, present, ln, ls)
        key = f"{rng} spine {measure}"
        al.used[key] = f"{us} endplate of {un} to {ls} endplate of {ln}"
        if upper is None or lower is None:
            al.add(rng, "spine", measure, float("nan"), "; ".join(w for w in (why_u, why_l) if w))
            continue
        al.add(rng, "spine", measure, round(sign * (upper.sagittal_deg() - lower.sagittal_deg()), 3))


def _cobb(al: Alignment, planes: Mapping[int, BodyPlanes], order: list[int]) -> None:
    """The largest coronal Cobb angle, its end vertebrae, apex and convexity."""
    sup = [(v, p) for v in order if (p := planes[v].superior) is not None and p.coronal_se_deg <= COBB_SE_MAX_DEG]
    inf = {v: p for v in order if (p := planes[v].inferior) is not None and p.coronal_se_deg <= COBB_SE_MAX_DEG}
    best: tuple[float, int, int] = (-1.0, 0, 0)
    for u, pu in sup:
        for b in order[order.index(u) + 1:]:
            if b in inf:
                a = abs(pu.coronal_deg() - inf[b].coronal_deg())
                if a > best[0]:
                    best = (a, u, b)
    if len(inf) < 3 or best[0] < 0:
        al.add("all", "spine", "cobb_deg", float("nan"), f"{len(inf)} vertebrae with measurable endplates (at least 3)")
        return
    angle, u, b = best
    al.add("all", "spine", "cobb_deg", round(angle, 3))
    ends = order[order.index(u):order.index(b) + 1]
    cu, cb = planes[u].superior.centre, planes[b].inferior.centre  # type: ignore[union-attr]
    dev = {}
    for v in ends:
        p = planes[v].inferior or planes[v].superior
        if p is not None:
            t = np.clip((p.centre[2] - cu[2]) / ((cb[2] - cu[2]) or 1e-9), 0, 1)
            dev[v] = float(p.centre[0] - (cu[0] + t * (cb[0] - cu[0])))
    apex = max(dev, key=lambda v: abs(dev[v])) if dev else u
    al.cobb = {"upper_end_vertebra": vertebra_name(u), "lower_end_vertebra": vertebra_name(b),
               "apex": vertebra_name(apex), "convexity": "right" if dev.get(apex, 0.0) > 0 else "left",
               "apex_deviation_mm": round(dev.get(apex, 0.0), 2)}
    al.used["all spine cobb_deg"] = (f"superior endplate of {vertebra_name(u)} to inferior endplate of "
                                     f"{vertebra_name(b)}")


def _dhi(heights: Mapping[tuple[str, str, str], float], v: int, w: int) -> tuple[float, str]:
    disc = disc_level_name(v)
    dh = [heights.get((disc, "disc", f"height_{k}_mm"), float("nan")) for k in ("anterior", "middle", "posterior")]
    which = (w,) if v == 2 else (v,) if w == SACRUM else (v, w)  # C2's middle height runs through the dens
    bodies = [heights.get((vertebra_name(x), "body", "height_middle_mm"), float("nan")) for x in which]
    if not all(math.isfinite(x) for x in dh):
        return float("nan"), f"{disc} disc heights not measured"
    if not all(math.isfinite(x) for x in bodies):
        return float("nan"), "adjacent body heights not measured"
    return round(float(np.mean(dh) / np.mean(bodies)), 4), ""


def _segments(al: Alignment, planes: Mapping[int, BodyPlanes], order: list[int],
              heights: Mapping[tuple[str, str, str], float]) -> None:
    """Wedge angles of the bodies, and per motion segment the disc angle, height index and slip."""
    for v in order:
        if v == SACRUM:
            continue
        bp = planes[v]
        ok = bp.superior is not None and bp.inferior is not None
        al.add(vertebra_name(v), "body", "wedge_angle_deg",
               round(bp.superior.sagittal_deg() - bp.inferior.sagittal_deg(), 3) if ok else float("nan"),  # type: ignore
               "; ".join(bp.why.values()))
    for v, w in zip(order, order[1:]):
        if not _adjacent(v, w):
            continue
        seg = disc_level_name(v)
        up, lo = planes[v].inferior, planes[w].superior
        why = "; ".join(x for x in (planes[v].why.get("inferior", ""), planes[w].why.get("superior", "")) if x)
        al.add(seg, "disc", "wedge_angle_deg", round(up.sagittal_deg() - lo.sagittal_deg(), 3)
               if up is not None and lo is not None else float("nan"), why)
        al.add(seg, "disc", "height_index", *_dhi(heights, v, w))
        slip, pct, why_s = _slip(up, lo, why)
        al.add(seg, "segment", "slip_mm", slip, why_s)
        al.add(seg, "segment", "slip_percent", pct, why_s)


def _slip(up: Optional[Plane], lo: Optional[Plane], why: str) -> tuple[float, float, str]:
    if up is None or lo is None:
        return float("nan"), float("nan"), why
    if up.posterior_corner is None or lo.posterior_corner is None or lo.anterior_corner is None:
        return float("nan"), float("nan"), "a posterior or anterior corner not found"
    along = lo.anterior_corner - lo.posterior_corner
    length = float(np.linalg.norm(along))
    mm = float((up.posterior_corner - lo.posterior_corner) @ (along / length))
    return round(mm, 3), round(100.0 * mm / length, 3), ""


def alignment_from_planes(planes: Mapping[int, BodyPlanes], heights: Mapping[tuple[str, str, str], float],
                          present: Sequence[int]) -> Alignment:
    """Every measure of :data:`DEFINITIONS` from endplate planes (by vertebra value, S1 = 26),
    the morphometry's heights (``(level, structure, measure) -> value``) and the vertebra
    values in view (``present``: to tell "not in the field of view" from "not measurable")."""
    al = Alignment(planes=dict(planes))
    order = [v for v in VERTEBRA_ORDER if v in planes]
    _curves(al, planes, set(present) | set(planes))
    _cobb(al, planes, [v for v in order if v in COBB_LEVELS])
    _segments(al, planes, order, heights)
    return al


def measure_alignment(instance: Volume, morph: Morphometry) -> Alignment:
    """The alignment of one scan from its named instance mask and its morphometry (frames,
    body labels and heights of :func:`~spineps.measure.morphometry.measure_morphometry`)."""
    planes = endplate_planes(morph, instance)
    heights = {(v.level, v.structure, v.measure): v.value for v in morph.values}
    present = [int(v) for v in np.unique(np.asarray(instance.data)) if 0 < v < 100]
    return alignment_from_planes(planes, heights, present)


def session_alignment(stations: Sequence[tuple[Alignment, Sequence[float], tuple[float, float],
                                                Mapping[tuple[str, str, str], float]]]) -> Alignment:
    """The alignment of a session's stations together: each station's endplates (its
    ``Alignment.planes``) translated by its offset into the session's frame (``offset``, mm,
    ``spineps.labeling.stations``), every endplate taken from the station in which it lies
    deepest (farthest from the station's S borders, ``s_range``), and the measures of
    :func:`alignment_from_planes` on them (heights: the first station that measured them).
    ``stations``: ``(alignment, offset, s_range, heights)`` per station."""
    best: dict[tuple[int, str], tuple[float, Plane]] = {}
    why: dict[int, dict[str, str]] = {}
    heights: dict[tuple[str, str, str], float] = {}
    present: set[int] = set()
    for al, offset, (bottom, top), hts in stations:
        t = np.asarray(offset, float)
        for v, bp in al.planes.items():
            present.add(v)
            why.setdefault(v, {}).update({k: w for k, w in bp.why.items() if k not in why.get(v, {})})
            for side in ("superior", "inferior"):
                p = bp.plane(side)
                if p is None:
                    continue
                depth = min(float(p.centre[2]) - bottom, top - float(p.centre[2]))
                if (v, side) not in best or depth > best[(v, side)][0]:
                    best[(v, side)] = (depth, p.shifted(t))
        for k, x in hts.items():
            if math.isfinite(x) and k not in heights:
                heights[k] = x
    planes: dict[int, BodyPlanes] = {}
    for v in present:
        bp = BodyPlanes(v, best.get((v, "superior"), (0.0, None))[1], best.get((v, "inferior"), (0.0, None))[1])
        bp.why = {k: w for k, w in why.get(v, {}).items() if bp.plane(k) is None}
        planes[v] = bp
    return alignment_from_planes(planes, heights, sorted(present))
