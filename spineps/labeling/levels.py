"""Level naming: anonymous vertebra instances (1..N, top to bottom) -> vertebra values.

The reference behaviour names the top-most vertebra C2, which is wrong whenever the field
of view starts lower. Here several cues are measured on the post-processed masks and
combined; each is also usable alone (``rule=``).

Candidates. A naming is a contiguous window of one of four level sequences ("variants"):
``standard`` C1..C7 T1..T12 L1..L5, ``T13`` (13 thoracic), ``L6`` (6 lumbar), ``T13+L6``;
prior probabilities 0.90 / 0.04 / 0.06 / 0.002 (six lumbar-type vertebrae are reported
more often than thirteen rib-bearing ones). C1 is only a candidate when ``has_c1`` (the
released models never segment it). Every candidate gets a score (log-likelihood-like);
the best wins and ``confidence`` is its softmax probability among all candidates.

Cues (``LevelNaming.evidence`` holds each one's measurements and its own best naming):

- ``sacrum`` (hard, penalty 50): the sacrum (26) is in view and lies within
  ``sacrum_gap_mm`` of the lowest vertebra (its lowest piece of at least 0.5 ml within
  that gap below it; stray sacrum voxels above do not count) -> the lowest vertebra is the
  last lumbar one (L5; L6 in the ``L6`` variant), count upwards. Transitional criterion:
  whether the L6 (or T13) variant wins is decided by the soft ``ribs`` cue (does the
  vertebra six above the sacrum have thoracic-type or lumbar-type costal processes?)
  against the variant prior, and, when C2 is also in view, by the count: 24 vertebrae
  between C2 and the sacrum need T13 or L6, and the ``ribs`` cue picks which.
- ``c2`` (hard, penalty 40): one of the two top vertebrae has the shape of C2 -- its body
  (dens included) is tall for its depth (full extent along the spine / depth >=
  ``dens_ratio``), at least ``dens_vs_next`` times as tall as the next body when that is
  measurable, with a small cervical depth (< 24 mm), and it is not cut by the volume
  border -> that vertebra is C2, count downwards (the one above, if any, is C1).
- ``ribs`` (soft): the semantic mask has no ribs, so this is a geometric proxy. The
  costal/transverse processes (43/44) of each vertebra give a direction in its axial
  plane (root -> tip: mean position of the most lateral quarter of the process voxels
  minus that of the most medial quarter); its posterior tilt (degrees, + =
  posterolateral) is about -15 for cervical processes (anterolateral, costal element in
  front), +25 for thoracic transverse processes (they meet the rib tubercles) and +5 for
  lumbar costal processes (lateral). Class-conditional Gaussians (cervical -15 +- 7, C7
  -12 +- 8, T1..T10 25 +- 7, T11 19 +- 8, last thoracic (T12 or T13) 12 +- 9, lumbar
  6 +- 5; 10 % uniform outliers, 50 % for processes shorter than 5 mm root to tip)
  give each candidate a log-likelihood. The last thoracic vertebrae's processes are
  short and their tilt is ambiguous (on the phantoms too), so a thoracolumbar transition
  decides L5 vs L6 only when the tilts are clear. Vertebrae cut by the border are not
  used. It is only as good as the costal-process
  segmentation, the weakest class of the semantic model.
- ``size`` (soft): each measurable vertebral body (49 + its endplates) gives its
  mid-body height (extent along the local spine axis of the central column, |depth|,
  |width| < 15 %), its depth and its width (extents of the mid-body slab); their
  logarithms are matched against an adult morphometric reference sequence
  (``REFERENCE_BODY_MM``) with one unknown overall scale (prior sd 12 %) and 10 %
  noise per feature (width half weight: thick sagittal slices); a body cut by the
  volume border only contributes the dimensions that are not cut. Alone it estimates
  where a window that shows neither end lies; its accuracy is modest (numbers in the
  tests and the report).
- ``conus`` (soft): where the spinal cord (60) ends. The lowest point of its largest piece
  is placed between the body centroids of consecutive vertebrae (``position`` k + f); when
  the canal goes on below it the conus is in view and its level follows an adult
  distribution (mean lower L1 / L1-L2 disc, sd 0.6 vertebrae, 5 % outliers; Saifuddin 1998),
  otherwise the cord runs out of view and the conus lies below the window. It places small
  fields of view (a lumbar crop with lumbar-size bodies and the conus inside it is T12-L2,
  not L3-L5) and rules out lumbar names for a window whose canal holds cord to its bottom.
  Only as good as the cord segmentation.
- ``count-from-top`` (top = C2, C1 with ``has_c1``: the reference behaviour) and
  ``count-from-bottom`` (bottom = L5): forced options; count-from-top is also the last
  resort when nothing is measurable.
- ``anchor="T12"``: user override "the top vertebra is T12" (hard, penalty 1000).

Precedence in ``rule="auto"``: anchor > sacrum > c2 > soft cues (ribs + conus + size) >
count-from-top. The penalties implement it: the soft cues choose among the namings the
hard ones allow (e.g. L5 vs L6 under the sacrum) but never overrule them; with a hard
cue the size cue's weight drops to 0.05 (a tie-breaker). Without a hard cue only the
``standard`` variant is considered (the soft cues cannot tell a T13/L6 spine from a
window shift). ``rule_used`` lists the hard cues the final naming satisfies, primary
first, followed by the soft cues that changed the result (``"sacrum"``,
``"sacrum+ribs"``, ``"sacrum+c2"``, ``"ribs+size"``, ``"size"``, ``"count-from-top"``,
``"anchor"``...). A warning is recorded whenever an available cue's own best naming
differs from the final one, and when a hard cue had to be overruled.

Confidence: the best candidate's softmax probability, calibrated (Platt scaling per kind
of naming, ``CONFIDENCE_CALIBRATION``, fitted by ``benchmarks/naming_calibration.py`` on
phantoms and checked there on held-out phantoms and the real VB3 scans) so that a naming of
confidence c is right about c of the time; the raw probability stays in the evidence
(``confidence_raw``). A naming no cue supports (counted from the top or bottom) gets
``NO_CUE_CONFIDENCE``; a user anchor keeps its probability.

Implausible anatomy (``implausible_anatomy``): structures that do not look like a spine
(what a semantic model makes of pure noise) are recognised by their body sizes (no window
of the reference fits them at an overall scale within ``PLAUSIBLE_SCALE`` and a log
residual below ``PLAUSIBLE_SIZE_RMS``), their shapes (height / depth, depth / width), the
spacing of consecutive whole bodies against their heights, their total volume
(``PLAUSIBLE_BODY_TOTAL_MM3``), the bends of the line through them and its direction
(within ``PLAUSIBLE_TILT_DEG`` of head-feet). Any reason caps the confidence at
``IMPLAUSIBLE_CONFIDENCE``, is recorded (``LevelNaming.implausible``, a warning) and raises
the ``implausible_anatomy`` QC flag (``naming_uncertain`` too); a user anchor
(``--top-vertebra``) skips the check.

Known limits: T13 can only be told from T12 when the count from C2 (or the ribs cue
over the whole thoracic spine) shows it; in a lumbar or thoracolumbar field of view a
T13 spine is named as a standard one (T13 -> "T12", T12 -> "T11", ...). L6 in a lumbar
field of view depends on the costal-process tilts (see the report's numbers).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from spineps.errors import InputError, UsageError
from spineps.fsutil import jsonable
from spineps.geometry.volume import Volume
from spineps.labels import CANAL, CORD, COSTAL_L, COSTAL_R, LEVEL_RULES, SACRUM, vertebra_name, vertebra_value
from spineps.postprocess.vertebrae import (VertebraCentroids, VertebraFrame, body_mask_of, vertebra_frames,
                                           vertebra_ids)

__all__ = [
    "RULES",
    "VARIANTS",
    "REFERENCE_BODY_MM",
    "LevelNaming",
    "VertebraMeasure",
    "measure_vertebrae",
    "name_levels",
    "apply_naming",
    "implausible_anatomy",
    "IMPLAUSIBLE_CONFIDENCE",
    "CONFIDENCE_CALIBRATION",
    "calibrated_confidence",
    "confidence_kind",
]

log = logging.getLogger(__name__)

RULES = LEVEL_RULES  # defined in the data-only label registry (the CLI imports it without numpy)

_C = list(range(1, 8))
_T = list(range(8, 20))
_L = list(range(20, 25))
VARIANTS: dict[str, tuple[int, ...]] = {
    "standard": tuple(_C + _T + _L),
    "T13": tuple(_C + _T + [28] + _L),
    "L6": tuple(_C + _T + _L + [25]),
    "T13+L6": tuple(_C + _T + [28] + _L + [25]),
}
_VARIANT_LOG_PRIOR = {"standard": math.log(0.90), "L6": math.log(0.06), "T13": math.log(0.04),
                      "T13+L6": math.log(0.002)}
_LAST_THORACIC = {"standard": 19, "T13": 28, "L6": 19, "T13+L6": 28}
_LAST_LUMBAR = {"standard": 24, "T13": 24, "L6": 25, "T13+L6": 25}

#: adult vertebral body size reference (height along the spine incl. endplates, depth AP,
#: width LR; mm). Rounded means from published morphometry (cervical: Panjabi 1991 /
#: Gilad & Nissan 1986; thoracic: Panjabi 1991; lumbar: Panjabi 1992; C2 height includes
#: the dens: the central column measured here runs through it). Values for T13 / L6 copy
#: their neighbours.
REFERENCE_BODY_MM: dict[int, tuple[float, float, float]] = {
    2: (38.0, 15.5, 17.0),
    3: (14.0, 15.5, 16.5), 4: (13.5, 15.5, 17.5), 5: (13.5, 15.7, 18.5), 6: (13.8, 16.2, 20.5),
    7: (15.0, 16.5, 23.5),
    8: (16.5, 17.0, 27.0), 9: (17.5, 18.5, 27.5), 10: (18.0, 20.0, 28.0), 11: (18.5, 22.0, 28.5),
    12: (19.0, 24.0, 29.5), 13: (19.5, 25.5, 30.5), 14: (20.0, 27.0, 31.5), 15: (20.5, 28.0, 33.0),
    16: (21.0, 29.0, 34.0), 17: (22.0, 30.0, 36.0), 18: (23.0, 31.0, 38.0), 19: (24.0, 32.0, 40.0),
    28: (24.5, 32.5, 41.0),
    20: (25.0, 33.0, 42.0), 21: (26.5, 34.0, 44.0), 22: (27.0, 35.0, 46.0), 23: (27.0, 35.0, 48.0),
    24: (26.5, 34.0, 50.0), 25: (26.0, 34.0, 50.0),
}
_HEIGHT = "col"  # size-cue height: "col" (central column) or "vol" (volume / mid area)
_SIZE_SIGMA = 0.10  # per-feature log noise
_SIZE_SCALE_SIGMA = 0.12  # inter-subject log scale (adult body dimensions vary by about 10 %)
_SIZE_WEIGHTS = np.array([1.0, 1.0, 0.5])  # height, depth, width

_PENALTY = {"anchor": 1000.0, "sacrum": 50.0, "c2": 40.0, "bottom": 1000.0, "top": 1000.0}
_HARD = ("anchor", "sacrum", "c2", "top", "bottom")
_PRECEDENCE = ("anchor", "sacrum", "c2")  # hard cues, in order


@dataclass
class VertebraMeasure:
    """Per-vertebra measurements used by the cues (mm, degrees)."""

    id: int
    height: float = float("nan")  # volumetric: body volume / mid-body cross-section area
    extent_si: float = float("nan")  # full extent along the spine (C2: dens included)
    height_col: float = float("nan")  # extent of the central column (mid-body height)
    depth: float = float("nan")
    width: float = float("nan")
    cut: tuple[bool, bool, bool] = (False, False, False)  # height/depth/width cut by the border
    top_cut: bool = False  # the body touches the volume border above (its top may be missing)
    process_tilt: float = float("nan")  # mean posterior tilt of its costal processes
    process_len: float = float("nan")  # mean root -> tip distance of its costal processes (mm)
    n_body: int = 0
    centroid: Optional[np.ndarray] = None  # body centroid, world mm
    body_mm3: float = 0.0  # body volume (49 + its endplates)


@dataclass
class LevelNaming:
    """The result of :func:`name_levels`."""

    mapping: dict[int, int]  # anonymous id -> vertebra value (1..28)
    rule_used: str
    evidence: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.0
    warnings: list[str] = field(default_factory=list)
    variant: str = "standard"
    above_top: Optional[int] = None  # the level just above the top vertebra (for disc 100 / endplate 200)
    implausible: list[str] = field(default_factory=list)  # why the structures do not look like a spine

    def levels(self) -> list[str]:
        """Names top to bottom, e.g. ``['T12', 'L1', ...]``."""
        return [vertebra_name(self.mapping[k]) for k in sorted(self.mapping) if self.mapping[k]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the sidecar."""
        return {
            "rule": self.rule_used,
            "levels": self.levels(),
            "variant": self.variant,
            "confidence": round(float(self.confidence), 4),
            "warnings": list(self.warnings),
            "implausible": list(self.implausible),
            "evidence": jsonable(self.evidence, ndigits=3),
        }


# ------------------------------------------------------------------------------ measuring
def _measure_body(m: VertebraMeasure, body: np.ndarray, lo: np.ndarray, f: VertebraFrame, axes: np.ndarray,
                  semantic: Volume) -> None:
    """Extent along the spine, volumetric and mid-column heights, depth and width of a body
    (``body``: its voxels in the box starting at ``lo``), into ``m``."""
    aff = semantic.affine
    idx = np.argwhere(body)
    pts = (idx + lo) @ aff[:3, :3].T + aff[:3, 3] - f.centroid
    proj = pts @ axes.T
    step = np.abs(axes @ aff[:3, :3]).max(1)  # one voxel step along each direction
    # full extent along the spine (dens included: the C2 cue)
    m.extent_si = float(np.percentile(proj[:, 0], 99) - np.percentile(proj[:, 0], 1) + step[0])
    # mid-body slab perpendicular to the spine: its area gives the volumetric height
    # (volume / mid cross-section; robust to tilt and wedging), its extents depth/width
    half = max(0.2 * m.extent_si, 1.5 * step[0])
    slab = np.abs(proj[:, 0]) <= half
    if slab.sum() < 4:
        return
    thick = float(proj[slab, 0].max() - proj[slab, 0].min() + step[0])
    area = slab.sum() * semantic.voxel_volume / thick
    m.height = float(m.n_body * semantic.voxel_volume / area)
    sp = proj[slab]
    ext = np.percentile(sp, 99, axis=0) - np.percentile(sp, 1, axis=0) + step
    m.depth, m.width = float(ext[1]), float(ext[2])
    # mid-sagittal column height: voxels near the body's central axis
    col = (np.abs(proj[:, 1]) <= max(0.15 * m.depth, step[1])) & (
        np.abs(proj[:, 2]) <= max(0.15 * m.width, step[2]))
    if col.sum() >= 4:
        m.height_col = float(np.percentile(proj[col, 0], 99) - np.percentile(proj[col, 0], 1) + step[0])


def _border_cuts(m: VertebraMeasure, body: np.ndarray, lo: np.ndarray, shape: np.ndarray, dir_vox: np.ndarray
                 ) -> None:
    """Which feature directions of ``m`` the volume border cuts, and whether the top is cut."""
    gidx = np.argwhere(body) + lo
    main_axis = np.abs(dir_vox).argmax(1)  # the array axis each feature direction mostly follows
    touch_lo = gidx.min(0) == 0
    touch_hi = gidx.max(0) == shape - 1
    touched = touch_lo | touch_hi
    m.cut = (bool(touched[main_axis[0]]), bool(touched[main_axis[1]]), bool(touched[main_axis[2]]))
    # is the border that is touched on the superior side?
    a0 = main_axis[0]
    m.top_cut = bool(touch_hi[a0] if dir_vox[0][a0] > 0 else touch_lo[a0])


def _process_tilts(m: VertebraMeasure, s_sem: np.ndarray, s_inst: np.ndarray, lo: np.ndarray, f: VertebraFrame,
                   aff: np.ndarray) -> None:
    """Mean posterior tilt and root -> tip length of the costal processes of ``m``."""
    tilts, lengths = [], []
    for lab in (COSTAL_L, COSTAL_R):
        proc = (s_sem == lab) & (s_inst == m.id)
        if proc.sum() < 4:
            continue
        pts = (np.argwhere(proc) + lo) @ aff[:3, :3].T + aff[:3, 3] - f.centroid
        r = pts @ f.right
        a = pts @ f.anterior
        if abs(r.mean()) < 1e-6:
            continue
        lat = np.abs(r)
        q1, q3 = np.percentile(lat, [25, 75])
        root, tip = lat <= q1, lat >= q3
        if not root.any() or not tip.any() or q3 - q1 < 1e-6:
            continue
        d_lat = lat[tip].mean() - lat[root].mean()  # root -> tip, lateral component
        d_ant = a[tip].mean() - a[root].mean()
        tilts.append(math.degrees(math.atan2(-d_ant, d_lat)))
        lengths.append(math.hypot(d_lat, d_ant))
    if tilts:
        m.process_tilt = float(np.mean(tilts))
        m.process_len = float(np.mean(lengths))


def measure_vertebrae(semantic: Volume, instance: Volume,
                      centroids: Optional[VertebraCentroids] = None) -> list[VertebraMeasure]:
    """Body size and costal-process tilt of every anonymous vertebra, top to bottom
    (``centroids``: theirs on these masks, computed here when not given)."""
    from scipy import ndimage

    sem = np.asarray(semantic.data)
    inst = np.asarray(instance.data)
    ids = vertebra_ids(inst)
    if not ids:
        return []
    frames = vertebra_frames(semantic, instance, ids, centroids)
    boxes = ndimage.find_objects(np.where((inst > 0) & (inst < 100) & (inst != SACRUM), inst, 0))
    shape = np.asarray(inst.shape)
    pad = np.ceil(6.0 / np.asarray(semantic.spacing)).astype(int)  # endplates next to the body
    out: list[VertebraMeasure] = []
    for v in ids:
        f = frames[v]
        m = VertebraMeasure(v, centroid=np.asarray(f.centroid, float))
        box = boxes[v - 1]
        lo = np.maximum([s.start for s in box] - pad, 0)
        hi = np.minimum([s.stop for s in box] + pad, shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        s_sem, s_inst = sem[sl], inst[sl]
        body = body_mask_of(s_sem, s_inst, v)
        m.n_body = int(body.sum())
        m.body_mm3 = m.n_body * semantic.voxel_volume
        axes = np.stack([f.superior, f.anterior, f.right])  # feature directions (world)
        if m.n_body >= 4:
            _measure_body(m, body, lo, f, axes, semantic)
            _border_cuts(m, body, lo, shape, axes @ semantic.affine[:3, :3] / np.asarray(semantic.spacing) ** 2)
        _process_tilts(m, s_sem, s_inst, lo, f, semantic.affine)
        out.append(m)
    return out


# ------------------------------------------------------------------------------ cues
@dataclass
class _Candidate:
    variant: str
    offset: int
    names: tuple[int, ...]
    score: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)


def _candidates(n: int, has_c1: bool) -> list[_Candidate]:
    out = []
    for var, seq in VARIANTS.items():
        start = 0 if has_c1 else 1
        for o in range(start, len(seq) - n + 1):
            out.append(_Candidate(var, o, tuple(seq[o:o + n])))
    return out


#: smallest sacrum piece (mm^3) that counts for the sacrum cue
_MIN_SACRUM_MM3 = 500.0


def _sacrum_cue(semantic: Volume, instance: Volume, ids: list[int], gap_mm: float) -> dict[str, Any]:
    from scipy import ndimage

    inst = np.asarray(instance.data)
    sac = inst == SACRUM
    ev: dict[str, Any] = {"present": bool(sac.any())}
    if not sac.any() or not ids:
        ev["applies"] = False
        return ev
    low = ids[-1]
    low_mask = inst == low
    # bounding box of both (plus the gap) for the distance transform
    both = np.argwhere(sac | low_mask)
    spacing = np.asarray(semantic.spacing)
    margin = np.ceil(gap_mm / spacing).astype(int) + 1
    lo = np.maximum(both.min(0) - margin, 0)
    hi = np.minimum(both.max(0) + margin + 1, inst.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    dist = ndimage.distance_transform_edt(~low_mask[sl], sampling=spacing)
    gap = float(dist[sac[sl]].min())
    # the lowest sacrum piece of at least _MIN_SACRUM_MM3 within the gap must lie below the
    # lowest vertebra (stray sacrum voxels above it, a semantic model's confusion of
    # posterior elements with the sacrum, must not move the comparison)
    pieces, n = ndimage.label(sac[sl])
    idx = np.arange(1, n + 1)
    gaps = np.asarray(ndimage.minimum(dist, pieces, idx)).reshape(-1)
    vol = np.bincount(pieces.ravel(), minlength=n + 1)[1:] * float(np.prod(spacing))
    coms = np.asarray(ndimage.center_of_mass(sac[sl], pieces, idx)).reshape(-1, 3)
    world_z = coms @ semantic.affine[2, :3]
    ok = (gaps <= gap_mm) & (vol >= _MIN_SACRUM_MM3)
    if not ok.any():
        ev.update({"gap_mm": float(gaps.min()), "below_lowest": False, "applies": False})
        return ev
    com_s = coms[np.flatnonzero(ok)[np.argmin(world_z[ok])]]
    com_l = np.argwhere(low_mask[sl]).mean(0)
    dz = float((semantic.affine[:3, :3] @ (com_l - com_s))[2])
    ev.update({"gap_mm": gap, "below_lowest": dz > 0, "applies": bool(gap <= gap_mm and dz > 0)})
    return ev


def _c2_cue(measures: list[VertebraMeasure], dens_ratio: float, dens_vs_next: float) -> dict[str, Any]:
    ev: dict[str, Any] = {"applies": False, "checked": []}
    for i in range(min(2, len(measures))):
        m = measures[i]
        if math.isnan(m.extent_si) or math.isnan(m.depth) or m.cut[0] or m.cut[1] or m.top_cut:
            ev["checked"].append({"index": i, "measurable": False})
            continue
        ratio = m.extent_si / max(m.depth, 1e-6)
        nxt = measures[i + 1] if i + 1 < len(measures) else None
        vs_next = (m.extent_si / nxt.extent_si) if (nxt is not None and not math.isnan(nxt.extent_si)
                                                    and not nxt.cut[0]) else float("nan")
        ok = ratio >= dens_ratio and m.depth < 24.0 and (math.isnan(vs_next) or vs_next >= dens_vs_next)
        ev["checked"].append({"index": i, "extent_mm": m.extent_si, "depth_mm": m.depth,
                              "extent_depth_ratio": ratio, "extent_vs_next": vs_next, "dens": ok})
        if ok:
            ev.update({"applies": True, "index": i})
            break
    return ev


#: class-conditional costal-process tilt (mean, sd in degrees) by level; see the module text
_TILT_CERVICAL = (-15.0, 7.0)
_TILT_C7 = (-12.0, 8.0)
_TILT_THORACIC = (25.0, 7.0)
_TILT_LOWER_THORACIC = (19.0, 8.0)
_TILT_LAST_THORACIC = (12.0, 9.0)
_TILT_LUMBAR = (6.0, 5.0)
_TILT_OUTLIER = 0.1  # mixture weight of a uniform over [-90, 90] degrees
_SHORT_PROCESS_MM = 5.0  # root -> tip distance below which a process's direction is doubtful
_TILT_OUTLIER_SHORT = 0.5


def _tilt_class(v: int, variant: str) -> tuple[float, float]:
    last_t = _LAST_THORACIC[variant]
    if v == last_t:
        return _TILT_LAST_THORACIC
    if v <= 6:
        return _TILT_CERVICAL
    if v == 7:
        return _TILT_C7
    if v in (18, 19, 28):  # T11, T12 (T12 only when T13 follows)
        return _TILT_LOWER_THORACIC
    if 8 <= v <= 17:
        return _TILT_THORACIC
    return _TILT_LUMBAR


#: where the spinal cord ends (conus medullaris tip), in vertebra units from the centroid of
#: L1's body (0) towards L2's (1): mean at the lower third of L1 / the L1-L2 disc, range T12
#: to L3 (Saifuddin et al. 1998, 504 adults; the phantoms: uniform between mid L1 and mid L2)
_CONUS_MEAN = 0.4
_CONUS_SD = 0.6
_CONUS_OUTLIER = 0.05  # mixture weight of a uniform over _CONUS_SPAN vertebrae
_CONUS_SPAN = 12.0
#: smallest cord (mm^3) and the canal length below its tip (mm) for "the cord ends in view"
_CONUS_MIN_CORD_MM3 = 300.0
_CONUS_CANAL_BELOW_MM = 10.0


def _conus_cue(semantic: Volume, measures: list[VertebraMeasure]) -> dict[str, Any]:
    """Where the spinal cord (60) ends relative to the vertebrae: the lowest point (along the
    line from the top to the bottom body centroid) of its largest piece, as a position in
    vertebra units (``k + f``: between the body centroids of vertebrae ``k`` and ``k + 1``,
    top = 0, extrapolated past the ends). ``ends``: the canal (61) goes on at least
    ``_CONUS_CANAL_BELOW_MM`` below the tip (the conus is in view); otherwise the cord runs
    out of view and the conus lies below ``position``."""
    from scipy import ndimage

    ev: dict[str, Any] = {"applies": False}
    cents = [m.centroid for m in measures if m.centroid is not None and m.n_body >= 8]
    if len(cents) < 2 or len(cents) != len(measures):
        return ev
    sem = np.asarray(semantic.data)
    cord = sem == CORD
    if not cord.any():
        ev["cord_mm3"] = 0.0
        return ev
    pieces, n = ndimage.label(cord)
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
    big = int(np.argmax(sizes)) + 1
    ev["cord_mm3"] = float(sizes[big - 1] * semantic.voxel_volume)
    if ev["cord_mm3"] < _CONUS_MIN_CORD_MM3:
        return ev
    c = np.asarray(cents, float)
    down = c[-1] - c[0]
    down /= max(float(np.linalg.norm(down)), 1e-6)
    aff = semantic.affine

    def world(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask).astype(float) @ aff[:3, :3].T + aff[:3, 3]

    cord_w = world(pieces == big)
    t_cord = cord_w @ down
    tip = cord_w[int(np.argmax(t_cord))]
    ends = bool((world((sem == CANAL) | cord) @ down).max() - t_cord.max() >= _CONUS_CANAL_BELOW_MM)
    # position between consecutive body centroids: the segment nearest the tip
    best = (math.inf, 0.0)
    for k in range(len(c) - 1):
        seg = c[k + 1] - c[k]
        f = float((tip - c[k]) @ seg / max(float(seg @ seg), 1e-6))
        lo_ok, hi_ok = (k == 0 or f >= 0), (k == len(c) - 2 or f <= 1)
        fc = min(max(f, 0.0), 1.0)
        dist = float(np.linalg.norm(tip - (c[k] + fc * seg)))
        if lo_ok and hi_ok and dist < best[0]:
            best = (dist, k + f)
    ev.update({"applies": True, "ends_in_view": ends, "position": round(best[1], 3),
               "tip_world_mm": [round(float(x), 1) for x in tip]})
    return ev


def _conus_ll(c: "_Candidate", cue: dict[str, Any]) -> float:
    """Log-likelihood of the cord's end under candidate ``c`` (see ``_conus_cue``)."""
    seq = VARIANTS[c.variant]
    x = float(cue["position"]) - (seq.index(20) - c.offset)  # 0 = this candidate's L1
    z = (x - _CONUS_MEAN) / _CONUS_SD
    if cue["ends_in_view"]:
        dens = math.exp(-0.5 * z * z) / (_CONUS_SD * math.sqrt(2 * math.pi))
        return math.log((1 - _CONUS_OUTLIER) * dens + _CONUS_OUTLIER / _CONUS_SPAN)
    beyond = 0.5 * math.erfc(z / math.sqrt(2.0))  # P(the conus lies below x)
    return math.log((1 - _CONUS_OUTLIER) * beyond + _CONUS_OUTLIER)


def _ribs_cue(measures: list[VertebraMeasure]) -> dict[str, Any]:
    """Per-vertebra costal-process tilts; usable when at least three are measured on
    vertebrae that the border does not cut. Processes shorter than ``_SHORT_PROCESS_MM``
    root to tip (typically T11/T12) give a less reliable direction: their outlier weight
    is ``_TILT_OUTLIER_SHORT`` instead of ``_TILT_OUTLIER``."""
    tilts = np.array([m.process_tilt if not any(m.cut) else np.nan for m in measures], float)
    lens = np.array([m.process_len for m in measures], float)
    n_ok = int((~np.isnan(tilts)).sum())
    outlier = np.where(lens >= _SHORT_PROCESS_MM, _TILT_OUTLIER, _TILT_OUTLIER_SHORT)
    return {"tilts_deg": [None if math.isnan(t) else round(t, 1) for t in tilts],
            "lengths_mm": [None if math.isnan(x) else round(x, 1) for x in lens], "measured": n_ok,
            "applies": n_ok >= 3, "_tilts": tilts, "_outlier": outlier}


def _ribs_ll(names: tuple[int, ...], variant: str, tilts: np.ndarray, outlier: np.ndarray) -> float:
    ll = 0.0
    for v, t, w in zip(names, tilts, outlier):
        if math.isnan(t) or v == 0:
            continue
        mu, sd = _tilt_class(v, variant)
        dens = math.exp(-0.5 * ((t - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        ll += math.log((1 - w) * dens + w / 180.0)
    return ll


def _size_features(measures: list[VertebraMeasure]) -> tuple[np.ndarray, np.ndarray]:
    feats = np.full((len(measures), 3), np.nan)
    for i, m in enumerate(measures):
        if m.n_body < 8:
            continue
        vals = (m.height_col if _HEIGHT == "col" else m.height, m.depth, m.width)
        for j in range(3):
            if not m.cut[j] and not math.isnan(vals[j]) and vals[j] > 0:
                feats[i, j] = math.log(vals[j])
    ok = ~np.isnan(feats)
    return feats, ok


_REF_LOG = {k: np.log(np.asarray(v)) for k, v in REFERENCE_BODY_MM.items()}


def _size_ll(names: tuple[int, ...], feats: np.ndarray, ok: np.ndarray) -> tuple[float, float]:
    """Log-likelihood of the size features under a naming (overall scale profiled out)."""
    ref = np.array([_REF_LOG.get(v, np.full(3, np.nan)) for v in names])
    use = ok & ~np.isnan(ref)
    if not use.any():
        return 0.0, 0.0
    w = np.where(use, _SIZE_WEIGHTS[None, :], 0.0) / _SIZE_SIGMA ** 2
    e = np.where(use, feats - np.nan_to_num(ref), 0.0)
    s = float((w * e).sum() / (w.sum() + 1.0 / _SIZE_SCALE_SIGMA ** 2))
    ll = -0.5 * float((w * (e - s) ** 2).sum() + s ** 2 / _SIZE_SCALE_SIGMA ** 2)
    # vertebrae with no reference body (C1) but a measurable body are implausible
    ll -= 5.0 * float((ok.any(1) & np.array([v not in _REF_LOG for v in names])).sum())
    return ll, s


# ------------------------------------------------------------------------------ plausibility
#: the overall body-size scale (best fitting window of the reference) of a plausible spine
PLAUSIBLE_SCALE = (0.5, 2.0)
#: root-mean-square log residual of the body sizes about that fit (0.1: 10 % per feature)
PLAUSIBLE_SIZE_RMS = 0.35
#: mid-body height / depth and depth / width of a plausible body (C2 is exempt: its dens)
PLAUSIBLE_HEIGHT_DEPTH = (0.3, 1.8)
PLAUSIBLE_DEPTH_WIDTH = (0.4, 1.5)
#: distance of consecutive body centroids over their mean mid-body height
PLAUSIBLE_PITCH = (0.7, 3.2)
#: largest angle (degrees) between consecutive centroid steps
PLAUSIBLE_BEND_DEG = 60.0
#: largest angle (degrees) between the line from the top to the bottom body and the world S axis
#: (a spine in a sagittal scan runs head to feet)
PLAUSIBLE_TILT_DEG = 60.0
#: the vertebral bodies found together must hold at least this volume (mm^3; a child's cervical
#: body is about 1000 mm^3)
PLAUSIBLE_BODY_TOTAL_MM3 = 500.0
#: the most confidence a naming of implausible structures gets
IMPLAUSIBLE_CONFIDENCE = 0.1

# ------------------------------------------------------------------------------ calibration
#: Platt scaling of the candidates' softmax probability ``p`` per kind of naming:
#: ``c = sigmoid(a * logit(p) + b)``. Fitted by ``benchmarks/naming_calibration.py`` on its
#: fit split of phantoms (its JSON holds the same numbers; a test ties the two); "hard": a
#: hard cue (sacrum, C2) fixed the window, "soft": only the ribs, conus and size cues did.
CONFIDENCE_CALIBRATION: dict[str, tuple[float, float]] = {
    "hard": (2.245, -2.3053),
    "soft": (0.465, -0.1418),
}
#: the confidence of a naming that no cue supports (counted from the top or bottom by
#: rule, or because nothing was measurable): the count is right only when the field of view
#: happens to start (end) where the rule assumes
NO_CUE_CONFIDENCE = 0.05
_P_CLIP = 1e-6


def confidence_kind(rule_used: str) -> str:
    """"anchor" (the user said), "hard", "soft" or "none" (see ``CONFIDENCE_CALIBRATION``)."""
    used = set(rule_used.split("+"))
    if "anchor" in used:
        return "anchor"
    if used & {"sacrum", "c2"}:
        return "hard"
    if used & {"ribs", "size", "conus"}:
        return "soft"
    return "none"


def calibrated_confidence(p: float, kind: str, params: Optional[dict[str, tuple[float, float]]] = None) -> float:
    """The calibrated confidence of a naming of ``kind`` (``confidence_kind``) whose best
    candidate has softmax probability ``p``, with ``params`` (default
    ``CONFIDENCE_CALIBRATION``); an anchor keeps ``p``."""
    params = CONFIDENCE_CALIBRATION if params is None else params
    if kind == "anchor":
        return float(p)
    if kind not in params:
        return NO_CUE_CONFIDENCE
    a, b = params[kind]
    q = min(max(float(p), _P_CLIP), 1.0 - _P_CLIP)
    z = a * math.log(q / (1.0 - q)) + b
    return 1.0 / (1.0 + math.exp(-z))


def _shape_reasons(measures: list[VertebraMeasure]) -> list[str]:
    bad, n = [], 0
    for i, m in enumerate(measures):
        if any(m.cut) or m.n_body < 8 or not all(math.isfinite(x) and x > 0 for x in (m.height_col, m.depth, m.width)):
            continue
        n += 1
        hd, dw = m.height_col / m.depth, m.depth / m.width
        hd_max = PLAUSIBLE_HEIGHT_DEPTH[1] if i > 1 else 3.0  # C2 with its dens is one of the top two
        if not (PLAUSIBLE_DEPTH_WIDTH[0] <= dw <= PLAUSIBLE_DEPTH_WIDTH[1]) or not (
                PLAUSIBLE_HEIGHT_DEPTH[0] <= hd <= hd_max):
            bad.append(f"#{i + 1} {m.height_col:.0f}x{m.depth:.0f}x{m.width:.0f} mm")
    if n and len(bad) * 2 > n:
        return [f"{len(bad)} of {n} bodies not shaped like vertebral bodies (height x depth x width: "
                f"{', '.join(bad[:4])})"]
    return []


def _spacing_reasons(measures: list[VertebraMeasure]) -> list[str]:
    """Consecutive whole bodies (not cut, measurable): the distance of their centroids against
    their heights, and the bends of the line through them."""
    whole = [(i, m) for i, m in enumerate(measures)
             if m.centroid is not None and m.n_body >= 8 and not any(m.cut) and math.isfinite(m.height_col)
             and m.height_col > 0]
    far, bends = [], []
    for (i, a), (j, b) in zip(whole, whole[1:]):
        if j != i + 1:
            continue
        r = float(np.linalg.norm(b.centroid - a.centroid)) / (0.5 * (a.height_col + b.height_col))  # type: ignore
        if not (PLAUSIBLE_PITCH[0] <= r <= PLAUSIBLE_PITCH[1]):
            far.append(f"#{i + 1}-#{j + 1} {r:.1f}")
    for (i, a), (j, b), (k, c) in zip(whole, whole[1:], whole[2:]):
        if k != i + 2:
            continue
        u, w = b.centroid - a.centroid, c.centroid - b.centroid  # type: ignore[operator]
        cos = float(u @ w / max(np.linalg.norm(u) * np.linalg.norm(w), 1e-9))
        if math.degrees(math.acos(max(-1.0, min(1.0, cos)))) > PLAUSIBLE_BEND_DEG:
            bends.append(f"#{j + 1}")
    out = []
    # three or more: every vertebra's centroid (top to bottom by the instance phase); two: bodies only
    ends = [m.centroid for m in measures if m.centroid is not None and (len(measures) >= 3 or m.n_body >= 8)]
    if len(ends) >= 2:
        d = ends[-1] - ends[0]
        tilt = math.degrees(math.acos(min(1.0, abs(float(d[2])) / max(float(np.linalg.norm(d)), 1e-9))))
        if tilt > PLAUSIBLE_TILT_DEG:
            out.append(f"the line of the bodies runs {tilt:.0f} degrees from head-feet")
    if far:
        out.append(f"{len(far)} pair(s) of consecutive bodies {PLAUSIBLE_PITCH[0]:g}-{PLAUSIBLE_PITCH[1]:g} body "
                   f"heights apart expected, found {', '.join(far[:4])}")
    if bends:
        out.append(f"the line of the bodies bends by more than {PLAUSIBLE_BEND_DEG:g} degrees at {', '.join(bends[:4])}"
                   + (f" and {len(bends) - 4} more" if len(bends) > 4 else ""))
    return out


def implausible_anatomy(measures: list[VertebraMeasure], cands: list[_Candidate], feats: np.ndarray,
                        ok: np.ndarray) -> list[str]:
    """Why the structures found do not look like a spine (empty when they do): body sizes no
    window of the reference fits (scale, residual), body shapes, spacing and bends of the
    line of the bodies (limits ``PLAUSIBLE_*``)."""
    reasons = _shape_reasons(measures) + _spacing_reasons(measures)
    total = sum(m.body_mm3 for m in measures)
    if measures and total < PLAUSIBLE_BODY_TOTAL_MM3:
        reasons.append(f"the bodies hold {total:.0f} mm^3 together (less than one vertebral body)")
    if ok.any():
        fits = []
        for c in cands:
            ll, s = _size_ll(c.names, feats, ok)
            fits.append((ll, s, c))
        ll, s, c = max(fits, key=lambda t: t[0])
        ref = np.array([_REF_LOG.get(v, np.full(3, np.nan)) for v in c.names])
        use = ok & ~np.isnan(ref)
        rms = float(np.sqrt(np.mean((feats[use] - ref[use] - s) ** 2))) if use.any() else 0.0
        scale = math.exp(s)
        if not (PLAUSIBLE_SCALE[0] <= scale <= PLAUSIBLE_SCALE[1]):
            reasons.append(f"body sizes {scale:.2f} times those of the best fitting levels ({_top_name(c)})")
        if rms > PLAUSIBLE_SIZE_RMS:
            reasons.append(f"body sizes fit no run of levels (log residual {rms:.2f})")
    return reasons


# ------------------------------------------------------------------------------ naming
def _score(c: _Candidate, active: dict[str, Any], feats: np.ndarray, ok: np.ndarray, use_size: bool,
           size_weight: float = 1.0) -> None:
    parts: dict[str, float] = {"prior": _VARIANT_LOG_PRIOR[c.variant]}
    if "anchor" in active:
        parts["anchor"] = 0.0 if c.names[0] == active["anchor"] else -_PENALTY["anchor"]
    if "top" in active:
        parts["top"] = 0.0 if c.names[0] == active["top"] else -_PENALTY["top"]
    if "bottom" in active:
        parts["bottom"] = 0.0 if c.names[-1] == active["bottom"] else -_PENALTY["bottom"]
    if "sacrum" in active:
        parts["sacrum"] = 0.0 if c.names[-1] == _LAST_LUMBAR[c.variant] else -_PENALTY["sacrum"]
    if "c2" in active:
        k = active["c2"]
        parts["c2"] = 0.0 if c.names[k] == 2 else -_PENALTY["c2"]
    if "ribs" in active:
        parts["ribs"] = _ribs_ll(c.names, c.variant, active["ribs"]["_tilts"], active["ribs"]["_outlier"])
    if "conus" in active:
        parts["conus"] = _conus_ll(c, active["conus"])
    if use_size:
        ll, s = _size_ll(c.names, feats, ok)
        parts["size"] = size_weight * ll
    if not any(k in active for k in _HARD) and c.variant != "standard":
        # without an end in view the soft cues cannot tell a T13/L6 spine: standard only
        parts["variant"] = -_PENALTY["anchor"]
    c.parts = parts
    c.score = float(sum(parts.values()))


def _best(cands: list[_Candidate]) -> tuple[_Candidate, float]:
    scores = np.array([c.score for c in cands])
    p = np.exp(scores - scores.max())
    p /= p.sum()
    i = int(np.argmax(scores))
    return cands[i], float(p[i])


def _top_name(c: _Candidate) -> str:
    return f"{vertebra_name(c.names[0])}..{vertebra_name(c.names[-1])} ({c.variant})"


class _Scorer:
    """The candidates of one naming and the size features they are scored on."""

    def __init__(self, cands: list[_Candidate], feats: np.ndarray, ok: np.ndarray):
        self.cands, self.feats, self.ok = cands, feats, ok

    def run(self, active: dict[str, Any], use_size: bool, size_weight: float = 1.0) -> tuple[_Candidate, float]:
        """Score every candidate with the cues ``active`` (and the size cue); the best and its
        confidence."""
        for c in self.cands:
            _score(c, active, self.feats, self.ok, use_size, size_weight)
        return _best(self.cands)


def _anchor_value(anchor: Optional[str]) -> Optional[int]:
    if anchor is None:
        return None
    try:
        value = vertebra_value(anchor)
    except KeyError:
        raise UsageError(f"unknown anchor level {anchor!r} (expected e.g. 'C2', 'T12', 'L1')") from None
    if value == SACRUM:
        raise UsageError("the anchor names the top vertebra; the sacrum cannot be it")
    return value


def _standalone(scorer: _Scorer, available: dict[str, Any], have_size: bool) -> dict[str, _Candidate]:
    """The naming each available cue gives alone (for the evidence and disagreement warnings)."""
    standalone: dict[str, _Candidate] = {}
    for key in ("sacrum", "c2", "ribs", "conus"):
        if key in available:
            act: dict[str, Any] = {key: available[key]}
            if key in ("sacrum", "c2") and "ribs" in available:
                act["ribs"] = available["ribs"]  # ribs decide the variant only
            standalone[key] = scorer.run(act, False)[0]
    if have_size:
        standalone["size"] = scorer.run({}, True)[0]
    return standalone


@dataclass
class _Plan:
    """The cues a rule uses: ``active`` hard/soft cues, the size cue and its weight."""

    rule_used: str
    active: dict[str, Any] = field(default_factory=dict)
    use_size: bool = False
    size_weight: float = 1.0


def _forced(rule: str, available: dict[str, Any], have_size: bool, top: int, warnings: list[str]) -> _Plan:
    """The plan of a forced rule (not ``auto``), falling back with a warning where its cue is
    not available."""
    ribs = {"ribs": available["ribs"]} if "ribs" in available else {}
    if rule == "sacrum":
        if "sacrum" in available:
            return _Plan(rule, {"sacrum": True, **ribs})
        warnings.append("rule 'sacrum' forced but no sacrum next to the lowest vertebra: counted from the bottom")
        return _Plan("count-from-bottom", {"bottom": 24})
    if rule == "c2":
        if "c2" in available:
            return _Plan(rule, {"c2": available["c2"], **ribs})
        warnings.append("rule 'c2' forced but the top vertebrae do not look like C2: counted from the top")
        return _Plan("count-from-top", {"top": top})
    if rule == "ribs":
        if "ribs" in available:
            return _Plan(rule, {"ribs": available["ribs"]})
        warnings.append("rule 'ribs' forced but fewer than three costal-process tilts measured: size used")
        if not have_size:
            return _Plan("count-from-top", {"top": top})
        return _Plan("size", use_size=True)
    if rule == "size":
        if have_size:
            return _Plan(rule, use_size=True)
        warnings.append("rule 'size' forced but no measurable vertebral body: counted from the top")
        return _Plan("count-from-top", {"top": top})
    if rule == "count-from-top":
        return _Plan(rule, {"top": top})
    return _Plan(rule, {"bottom": 24})  # count-from-bottom


def _plan(rule: str, anchor_value: Optional[int], available: dict[str, Any], have_size: bool, top: int,
          warnings: list[str]) -> _Plan:
    if anchor_value is not None:
        plan = _Plan("anchor", {"anchor": anchor_value, **available})
    elif rule == "auto":
        # size only breaks ties once a hard cue fixed the window
        hard = any(k in available for k in _PRECEDENCE)
        plan = _Plan(rule, dict(available), have_size, 0.05 if hard else 1.0)
    else:
        plan = _forced(rule, available, have_size, top, warnings)
    if not plan.active and not plan.use_size:
        warnings.append("no cue available: the top vertebra was named C2 (reference behaviour)")
        return _Plan("count-from-top", {"top": top}, False, plan.size_weight)
    return plan


def _auto_rule_used(scorer: _Scorer, plan: _Plan, best: _Candidate, warnings: list[str]
                    ) -> tuple[_Candidate, float, str]:
    """``auto``: the hard cues the best naming satisfies, then the soft cues that changed it
    (each left out once); the final run's scores restored."""
    active, use_size, size_weight = plan.active, plan.use_size, plan.size_weight
    satisfied = [k for k in _PRECEDENCE if k in active and best.parts.get(k, 0.0) == 0.0]
    soft = [k for k in ("ribs", "conus", "size") if (k in active if k != "size" else use_size)]
    decisive = []
    for k in soft:
        act = {a: b for a, b in active.items() if a != k}
        alt, _ = scorer.run(act, use_size and k != "size", size_weight)
        if alt.names != best.names:
            decisive.append(k)
    best, conf = scorer.run(active, use_size, size_weight)  # restore the scores of the final run
    rule_used = "+".join(satisfied + decisive) if satisfied else "+".join(decisive or soft)
    for k in [k for k in _PRECEDENCE if k in active and best.parts.get(k, 0.0) < 0.0]:
        warnings.append(f"cue '{k}' could not be satisfied together with higher-precedence cues")
    return best, conf, rule_used


def _available(sac: dict[str, Any], c2: dict[str, Any], ribs: dict[str, Any], conus: dict[str, Any]
               ) -> dict[str, Any]:
    available: dict[str, Any] = {}
    if conus.get("applies"):
        available["conus"] = conus
    if sac.get("applies"):
        available["sacrum"] = True
    if c2.get("applies"):
        available["c2"] = c2["index"]
    if ribs.get("applies"):
        available["ribs"] = ribs
    return available


def _cues(semantic: Volume, instance: Volume, ids: list[int], measures: list[VertebraMeasure],
          sacrum_gap_mm: float, dens_ratio: float, dens_vs_next: float, evidence: dict[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sacrum, C2 and ribs cues (into ``evidence``): ``(available cues, c2 cue)``."""
    sac = _sacrum_cue(semantic, instance, ids, sacrum_gap_mm)
    c2 = _c2_cue(measures, dens_ratio, dens_vs_next)
    ribs = _ribs_cue(measures)
    conus = _conus_cue(semantic, measures)
    evidence.update({"sacrum": sac, "c2": c2, "ribs": {k: v for k, v in ribs.items() if not k.startswith('_')},
                     "conus": conus})
    return _available(sac, c2, ribs, conus), c2


def name_levels(semantic: Volume, instance: Volume, *, rule: str = "auto", anchor: Optional[str] = None,
                has_c1: bool = False, sacrum_gap_mm: float = 20.0, dens_ratio: float = 1.6,
                dens_vs_next: float = 1.5, centroids: Optional[VertebraCentroids] = None) -> LevelNaming:
    """Name the anonymous vertebrae 1..N of ``instance`` (post-processed masks, see module text).

    ``rule``: one of :data:`RULES`. ``anchor``: "the top vertebra is X" (e.g. ``"T12"``),
    overrides everything. ``has_c1``: the instance model segments C1 (model config).
    ``centroids``: the vertebrae's (``postprocess.vertebrae.vertebra_centroids``), computed
    here when not given. Raises :class:`~spineps.errors.UsageError` for an unknown rule or
    anchor and :class:`~spineps.errors.InputError` when the ids are not 1..N.
    """
    if rule not in RULES:
        raise UsageError(f"unknown level-naming rule {rule!r}; choose one of {', '.join(RULES)}")
    ids = vertebra_ids(np.asarray(instance.data))
    warnings: list[str] = []
    if not ids:
        return LevelNaming({}, "none", {"n_vertebrae": 0}, 0.0, ["no vertebra to name"])
    n = len(ids)
    if ids != list(range(1, n + 1)):
        raise InputError(f"anonymous vertebra ids must be 1..{n} (run make_consistent first), got {ids}")

    measures = measure_vertebrae(semantic, instance, centroids)
    feats, ok = _size_features(measures)
    evidence: dict[str, Any] = {"n_vertebrae": n, "rule_requested": rule}
    evidence["bodies_mm"] = [{"height": m.height, "extent": m.extent_si, "depth": m.depth, "width": m.width,
                              "cut": list(m.cut)} for m in measures]
    anchor_value = _anchor_value(anchor)
    available, c2 = _cues(semantic, instance, ids, measures, sacrum_gap_mm, dens_ratio, dens_vs_next, evidence)
    # a dens on the second vertebra shows C1 above it even when the model config says no C1;
    # a user anchor "C1" is believed too
    cands = _candidates(n, has_c1 or c2.get("index") == 1 or anchor_value == 1)
    if not cands:
        cands = [_Candidate("T13+L6", 0, tuple(VARIANTS["T13+L6"][:n]) + (0,) * max(0, n - 26))]
        warnings.append(f"{n} vertebrae are more than any level sequence holds; the lowest stay unnamed")
    scorer = _Scorer(cands, feats, ok)
    standalone = _standalone(scorer, available, bool(ok.any()))
    evidence["standalone"] = {k: {"levels": [vertebra_name(v) for v in c.names if v], "variant": c.variant}
                              for k, c in standalone.items()}
    plan = _plan(rule, anchor_value, available, bool(ok.any()), 1 if has_c1 else 2, warnings)
    best, conf = scorer.run(plan.active, plan.use_size, plan.size_weight)
    rule_used = plan.rule_used
    if rule == "auto" and anchor_value is None:
        best, conf, rule_used = _auto_rule_used(scorer, plan, best, warnings)
    for key, c in standalone.items():
        if c.names != best.names:
            warnings.append(f"rule '{key}' alone suggests {_top_name(c)}; used {_top_name(best)}")
    evidence["confidence_raw"] = conf
    conf = calibrated_confidence(conf, confidence_kind(rule_used))
    implausible = implausible_anatomy(measures, cands, feats, ok) if anchor_value is None else []
    if implausible:
        conf = min(conf, IMPLAUSIBLE_CONFIDENCE)
        warnings.append("implausible anatomy: " + "; ".join(implausible))
    out = _naming(ids, best, conf, rule_used, cands, standalone, feats, ok, evidence, warnings)
    out.implausible = implausible
    return out


def _naming(ids: list[int], best: _Candidate, conf: float, rule_used: str, cands: list[_Candidate],
            standalone: dict[str, _Candidate], feats: np.ndarray, ok: np.ndarray, evidence: dict[str, Any],
            warnings: list[str]) -> LevelNaming:
    """The ``LevelNaming`` of the best candidate, with the top candidates in the evidence."""
    mapping = {v: int(name) for v, name in zip(ids, best.names)}
    seq = VARIANTS[best.variant]
    above_top = seq[best.offset - 1] if best.offset >= 1 and best.names[0] in seq else None
    evidence["candidates"] = [
        {"levels": _top_name(c), "score": round(c.score, 2), "parts": {k: round(v, 2) for k, v in c.parts.items()}}
        for c in sorted(cands, key=lambda c: -c.score)[:3]]
    if "size" in standalone:
        _, s = _size_ll(best.names, feats, ok)
        evidence["size_scale"] = math.exp(s)
    for w in warnings:
        log.warning("level naming: %s", w)
    return LevelNaming(mapping, rule_used, evidence, conf, warnings, best.variant, above_top)


def apply_naming(instance: Volume, naming: LevelNaming) -> Volume:
    """Anonymous instance values -> level values: vertebra ``k`` -> ``naming.mapping[k]``,
    disc ``100 + k`` -> ``100 + level(k)``, endplate ``200 + k`` -> ``200 + level(k)``
    (``k = 0``, above the top vertebra, uses ``naming.above_top``); sacrum stays 26. Values
    that cannot be named (no level above C1) become 0, with a log warning."""
    inst = np.asarray(instance.data)
    lut = np.zeros(300, dtype=np.int32)
    level = dict(naming.mapping)
    if naming.above_top is not None:
        level[0] = naming.above_top
    for k, v in level.items():
        if k != 0 and v:
            lut[k] = v
        if v:
            lut[100 + k] = 100 + v
            lut[200 + k] = 200 + v
    lut[SACRUM] = SACRUM
    if inst.size and (inst.min() < 0 or inst.max() >= 300):
        raise InputError("instance values must lie in 0..299")
    out = lut[inst]
    lost = int(((inst > 0) & (out == 0)).sum())
    if lost:
        log.warning("%d instance voxels have no level name (e.g. a disc above C1) and were set to 0", lost)
    return instance.with_data(out.astype(np.int16))
