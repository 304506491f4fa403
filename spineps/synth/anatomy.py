"""Synthetic whole-spine label maps ("phantoms") with plausible anatomy.

The spine is built along a smooth centre-line (the line through the vertebral-body centres),
parameterised by arc length ``s`` (mm, increasing downwards, ``s = 0`` at the top of the C2
body). Its sagittal shape is given by the angle ``phi(s)`` of the downward tangent against
the vertical (positive = heading anteriorly), interpolated (PCHIP) through key values at
C2, C7, T1, T12, L1, L5 and the sacrum, which produce cervical lordosis, thoracic kyphosis,
lumbar lordosis and the sacral kyphosis; scoliosis adds a lateral sine-shaped curve with
axial rotation of the vertebrae. Every vertebra is a rigid body with a local frame
(``x`` = patient right, ``y`` = anterior, ``z`` = superior, origin at the body centre) taken
from the curve at its centre; its parts are rasterised with vectorised numpy inside the
voxel bounding box of the part, in the vertebra's local coordinates (no per-voxel Python
loops). Discs fill the space between the inferior plane of one body and the superior plane
of the next (so bodies and discs tile without gaps, wedged by the curvature). The spinal
canal, the cord and the sacrum are swept along the curve: each voxel is projected onto the
curve (a few Newton steps) to get its arc length and its cross-section coordinates.

World coordinates are RAS+ millimetres (the NIfTI convention): the patient's left is -x.
The output grid (spacing, axis codes, optional obliquity) is built around the field of view
and can be any of the 48 orientations.

Label values: the community values of ``spineps.labels`` (semantic: 41..49, 62 endplate
before the superior/inferior split, 60 cord, 61 canal, 100 disc, 26 sacrum; instance:
vertebrae 1..28, discs 100+X, endplates 200+X of the disc they touch; canal and cord are 0
in the instance mask). C1 is always present in the tissue map (it is anatomy) but carries
labels only with ``has_c1=True`` (the published method never segments C1).

Sizes (mean adult values; every subject is jittered around them, see ``_subject_params``)
-------------------------------------------------------------------------------------
Sources: Panjabi et al., "Cervical human vertebrae. Quantitative three-dimensional anatomy
of the middle and lower regions", Spine 1991;16:861-869; Panjabi et al., "Thoracic human
vertebrae", Spine 1991;16:888-901; Panjabi et al., "Human lumbar vertebrae", Spine
1992;17:299-306; Zhou et al., "Geometrical dimensions of the lower lumbar vertebrae",
Eur Spine J 2000;9:242-248; Gilad & Nissan, "A study of vertebra and disc geometric
relations of the human cervical and lumbar spine", Spine 1986;11:154-157; cord size and
conus level: Fountas et al. 2004 / Saifuddin et al. 1998 (conus tip at L1-L2 in most
adults, range T12-L3). Values from the papers were rounded; they are mid-body or mid-endplate
values:

- body width (mm): C3 16, C7 22, T1 26, T6 29, T12 40, L1 42, L3 46, L5 50.
- body depth (mm): C3 15.5, C7 16.5, T1 17, T6 25, T12 31, L1 33, L3 34, L5 35.
- body height (mm): C3 13.5, C7 14.5, T1 16, T6 18.5, T10 22; T11..L5 from the real data.
- disc height (mm): cervical 5-5.5, T1-T6 4-4.5, T7-T10 5-5.5, T11/12 6.5, lumbar from the
  real data.
- canal (width x depth, mm): cervical 24 x 15, thoracic 17 x 16, L1 22 x 18, L5 26 x 18.
- cord (width x depth, mm): cervical 12.5 x 8, thoracic 8.5 x 6.5, lumbar enlargement
  9.5 x 7.5, conus tapering over ~20 mm and ending between L1 and L2 (random).
- pedicle width (mm): C 5.5, T1 7.5, T5 4.5, T12 8, L1 8.5, L3 10, L5 15.
- spinous process length from the lamina (mm) and caudal slope (deg): C3-C5 12-15 / 20,
  C7 28 / 20, T1 32 / 30, T5-T8 38 / 55-60, T12 30 / 20, L1-L4 28-30 / 5-10, L5 22 / 5.
- transverse process span tip-to-tip (mm): C3 48, C7 62, T1 72, T6 64, T12 50, L1 70,
  L3 88, L5 84.

Calibration on the real labelled scans (``shared/data/real``), measured with
``spineps.synth.calibrate`` (``tests/test_synth.py::test_sizes_match_real_scans`` re-measures
them and checks the phantom against them when the data is present);
the numbers are in the ``REAL_*`` constants below. Lumbar values used: body height
L1 26.5, L2 27.5, L3 27.5, L4 26.8, L5 26 mm; depth 33.5-34 mm; disc height L1/2 9,
L2/3 10, L3/4 10, L4/5 10, L5/S1 9 mm (subject jitter: global size sd 6 %, height
sd 4 %, disc sd 10 %, per level sd 3 %; one lower lumbar disc degenerated (45-70 % height)
in ~35 % of subjects).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Optional, Sequence

import numpy as np

from spineps import labels as L
from spineps.geometry.volume import Volume

__all__ = [
    "PhantomSpec",
    "Phantom",
    "Tissue",
    "make_phantom",
    "phantom_layout",
    "build_grid",
    "FOV_PRESETS",
    "REAL_BODY_HEIGHT",
    "REAL_BODY_DEPTH",
    "REAL_DISC_HEIGHT",
    "VOLUME_RANGES_ML",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# calibration numbers measured on the real labelled scans (see module docstring)
# --------------------------------------------------------------------------------------
#: Measured with ``spineps.synth.calibrate`` (median over cases; mid-sagittal central height,
#: mid-height depth). VB2: 17 T2w scans, bodies T11..L5; VB3: 15 scans, L1..L5; IVD: 5 scans.
REAL_BODY_HEIGHT: dict[str, dict[str, float]] = {
    "VB2": {"T11": 28.6, "T12": 28.9, "L1": 29.2, "L2": 29.1, "L3": 28.2, "L4": 26.6, "L5": 25.1},
    "VB3": {"L1": 26.1, "L2": 28.0, "L3": 27.1, "L4": 26.6, "L5": 26.1},
}
REAL_BODY_DEPTH: dict[str, dict[str, float]] = {
    "VB2": {"T11": 34.9, "T12": 34.0, "L1": 35.0, "L2": 34.1, "L3": 32.7, "L4": 32.5, "L5": 32.5},
    "VB3": {"L1": 30.9, "L2": 34.2, "L3": 34.0, "L4": 34.8, "L5": 34.9},
}
REAL_BODY_VOLUME_ML: dict[str, dict[str, float]] = {
    "VB2": {"T11": 33.9, "T12": 37.8, "L1": 36.4, "L2": 35.0, "L3": 34.8, "L4": 31.6, "L5": 25.4},
    "VB3": {"L1": 32.8, "L2": 37.0, "L3": 40.1, "L4": 39.8, "L5": 33.4},
}
#: discs named by the vertebra above; IVD (5 scans)
REAL_DISC_HEIGHT: dict[str, float] = {"L1": 9.1, "L2": 10.0, "L3": 9.7, "L4": 8.3, "L5": 8.2}
REAL_DISC_VOLUME_ML: dict[str, float] = {"L1": 6.0, "L2": 9.5, "L3": 8.6, "L4": 7.7, "L5": 6.7}
# The values used (``_ANCHORS``) for T11..L5 are between the literature and these medians:
# VB2's labels run ~1-2 mm larger than the literature (1 mm resampling of thick slices and
# generous label borders), so heights/depths were taken ~1-2 mm below VB2 and close to VB3;
# disc heights are the mean of the literature (Gilad & Nissan) and IVD.

#: documented plausible ranges of structure volumes (ml) for an adult, used by the tests
VOLUME_RANGES_ML: dict[str, tuple[float, float]] = {
    "body_C": (2.0, 7.0),
    "body_T": (4.0, 30.0),
    "body_L": (22.0, 50.0),
    "disc_L": (4.0, 20.0),
    "disc_C": (0.5, 3.0),
    "vertebra_L": (35.0, 85.0),
    "vertebra_T": (10.0, 55.0),
    "sacrum": (80.0, 260.0),  # estimate from its dimensions (~105 mm wide, ~100 mm long, 20-50 mm thick)
}


class Tissue(IntEnum):
    """Tissue classes of ``Phantom.tissue`` (what the renderer gives an intensity)."""

    BACKGROUND = 0
    FAT = 1
    MUSCLE = 2
    MARROW = 3
    CORTEX = 4
    ANNULUS = 5
    NUCLEUS = 6
    CSF = 7
    CORD = 8
    LIGAMENT = 9
    SOFT = 10
    VESSEL = 11
    LUNG = 12
    SKIN = 13


#: largest grid make_phantom / render_t2w build (voxels; uint8 arrays, ~4 bytes per voxel in all)
MAX_VOXELS = 400_000_000

#: field-of-view presets: (top vertebra, bottom vertebra)
FOV_PRESETS: dict[str, tuple[str, str]] = {
    "whole": ("C1", "sacrum"),
    "cervical": ("C1", "T2"),
    "cervicothoracic": ("C1", "T8"),
    "thoracic": ("C7", "L1"),
    "thoracolumbar": ("T8", "sacrum"),
    "lumbar": ("T11", "sacrum"),
}

_STD_NAMES = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
_STD_INDEX = {n: i for i, n in enumerate(_STD_NAMES)}

# anchor tables: name -> value; linear interpolation over the standard level index
_ANCHORS: dict[str, dict[str, float]] = {
    "W": {"C1": 17, "C2": 17, "C3": 16, "C5": 18, "C7": 22, "T1": 26, "T6": 29, "T9": 33, "T12": 40, "L1": 42, "L3": 46, "L5": 50},
    "D": {"C1": 15, "C2": 15.5, "C3": 15.5, "C7": 16.5, "T1": 17, "T6": 25, "T9": 28, "T11": 31, "T12": 32, "L1": 33.5,
          "L2": 34, "L3": 34, "L4": 34, "L5": 34},
    "H": {"C1": 10, "C2": 20, "C3": 13.5, "C7": 14.5, "T1": 16, "T6": 18.5, "T10": 22, "T11": 24, "T12": 25.5,
          "L1": 26.5, "L2": 27.5, "L3": 27.5, "L4": 26.8, "L5": 26},
    # disc below this vertebra
    "DH": {"C2": 4.5, "C3": 5.2, "C6": 5.5, "C7": 5.0, "T1": 4.0, "T6": 4.5, "T7": 5.0, "T10": 5.5, "T11": 6.5,
           "T12": 7.5, "L1": 9.0, "L2": 10.0, "L3": 10.0, "L4": 10.0, "L5": 9.0},
    "CW": {"C1": 14, "C2": 12.5, "C3": 12.5, "C7": 12, "T1": 9.5, "T4": 8.5, "T10": 8.5, "T12": 10, "L1": 11,
           "L3": 11.5, "L5": 13},
    "CD": {"C1": 8.5, "C2": 8, "C3": 7.5, "C7": 7.5, "T1": 8, "T10": 8, "L1": 9, "L5": 9},
    "PW": {"C1": 5.5, "C7": 6, "T1": 7.5, "T5": 4.5, "T9": 5.5, "T12": 8, "L1": 8.5, "L3": 10, "L5": 15},
    "LT": {"C1": 3.5, "C7": 4.0, "T1": 5.0, "T12": 5.5, "L1": 6.0, "L5": 6.5},
    "SPL": {"C1": 8, "C2": 20, "C3": 12, "C5": 15, "C6": 19, "C7": 28, "T1": 32, "T5": 38, "T8": 38, "T11": 33,
            "T12": 30, "L1": 28, "L4": 28, "L5": 22},
    "SPA": {"C1": 10, "C2": 15, "C3": 20, "C7": 20, "T1": 30, "T4": 50, "T7": 60, "T9": 50, "T11": 35, "T12": 20,
            "L1": 10, "L5": 5},
    "SPH": {"C1": 3, "C7": 4, "T1": 4.5, "T10": 5.5, "T12": 7, "L1": 9, "L5": 8},
    "SPW": {"C1": 2.5, "C7": 3, "T12": 3, "L1": 3.5, "L5": 4},
    "TPS": {"C1": 76, "C2": 44, "C3": 48, "C7": 62, "T1": 72, "T6": 64, "T11": 54, "T12": 50, "L1": 70, "L3": 88,
            "L5": 84},
    "TPA": {"C1": -10, "C2": -25, "C7": -15, "T1": 25, "T6": 35, "T12": 20, "L1": 5, "L5": 10},
    "CORDW": {"C1": 6.5, "C6": 6.3, "T1": 5.0, "T6": 4.2, "T10": 4.4, "T12": 4.8, "L1": 4.5},
    "CORDD": {"C1": 4.2, "C6": 4.0, "T1": 3.5, "T6": 3.2, "T10": 3.4, "T12": 3.8, "L1": 3.5},
}


def _anchor(table: str, pos: float) -> float:
    pts = sorted((_STD_INDEX[k], float(v)) for k, v in _ANCHORS[table].items())
    xs, ys = zip(*pts)
    return float(np.interp(pos, xs, ys))


def _level_pos(name: str) -> float:
    """Position on the standard index for anchor interpolation (T13 between T12 and L1)."""
    if name == "T13":
        return _STD_INDEX["T12"] + 0.5
    if name == "L6":
        return _STD_INDEX["L5"]
    return float(_STD_INDEX[name])


# --------------------------------------------------------------------------------------
# spec and result
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomSpec:
    """What phantom to make. Everything random is derived from ``seed``.

    ``crop``: extra cut of the field of view, a mapping from an anatomical direction letter
    (``"S"``, ``"I"``, ``"A"``, ``"P"``, ``"R"``, ``"L"``) to the millimetres removed on that
    side, e.g. ``{"S": 12.0}`` cuts the top vertebra by the border.
    ``scoliosis``: approximate Cobb angle (degrees) of a lateral curve; 0 = none.
    ``lr_half_width`` / ``ap_half_width``: a field of view cut to that many millimetres each
    side of the spine's midline (left-right) / of the bodies' posterior wall (anterior-
    posterior), as small-FOV scans of the cord are.
    ``stations``: number of overlapping stations the renderer stitches (1 = one FOV).
    ``slips``: ``(level, mm)`` pairs: the vertebra ``level`` (and the whole spine above it)
    displaced by ``mm`` along the local anterior direction relative to the vertebra below,
    across the disc below ``level`` (positive: anterolisthesis, negative: retrolisthesis),
    e.g. ``(("L4", 6.0),)``; the vertebrae stay rigid, the disc is sheared.
    ``wedges``: ``(level, degrees)`` pairs: that vertebral body is wedged, its superior and
    inferior endplates each tilted by half the angle about the local right axis (positive:
    anterior height shorter, as in a compression fracture), e.g. ``(("T12", 12.0),)``.
    Specs without slips and wedges give exactly the phantoms they gave before these existed.
    The true endplate planes and corners are in ``Phantom.meta["endplates_world"]`` and the
    alignment measures they imply in ``spineps.synth.truth.alignment_truth``.
    """

    seed: int = 0
    fov: str = "whole"
    top: Optional[str] = None
    bottom: Optional[str] = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    orientation: tuple[str, str, str] = ("P", "I", "R")
    oblique_deg: float = 0.0
    scoliosis: float = 0.0
    has_c1: bool = False
    t13: bool = False
    l6: bool = False
    crop: Optional[Any] = None
    lordosis_scale: float = 1.0
    stations: int = 1
    lr_half_width: Optional[float] = None  # mm each side of the spine; default from anatomy
    ap_half_width: Optional[float] = None  # mm each side of the bodies' posterior wall; default from anatomy
    slips: tuple[tuple[str, float], ...] = ()
    wedges: tuple[tuple[str, float], ...] = ()


@dataclass
class Phantom:
    spec: PhantomSpec
    semantic: Volume
    instance: Volume
    levels: list[int]
    tissue: Volume
    meta: dict[str, Any] = field(default_factory=dict)
    #: 1 where an endplate voxel is the superior endplate of its vertebra, 2 inferior, else 0
    endplate_side: Optional[Volume] = None

    def semantic_split(self) -> Volume:
        """The semantic mask as the post-processed output of the method: endplates split into
        52 (superior endplate of a vertebra) and 53 (inferior)."""
        data = self.semantic.data.copy()
        if self.endplate_side is not None:
            side = self.endplate_side.data
            ep = data == L.ENDPLATE
            data[ep & (side == 1)] = L.ENDPLATE_SUP
            data[ep & (side == 2)] = L.ENDPLATE_INF
        return self.semantic.with_data(data)


# --------------------------------------------------------------------------------------
# grid construction (voxel <-> world)
# --------------------------------------------------------------------------------------
_CODE_DIR = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def _rot(axis: Sequence[float], deg: float) -> np.ndarray:
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


def build_grid(lo: np.ndarray, hi: np.ndarray, spacing: Sequence[float], orientation: Sequence[str],
               oblique_deg: float = 0.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Affine and shape of the smallest grid with the given spacing, axis codes and
    obliquity (rotation about R by ``oblique_deg`` and about A by half of it) that covers the
    world box ``[lo, hi]`` (RAS mm)."""
    codes = [c.upper() for c in orientation]
    if len(codes) != 3 or sorted({"R": "X", "L": "X", "A": "Y", "P": "Y", "S": "Z", "I": "Z"}[c] for c in codes) != ["X", "Y", "Z"]:
        raise ValueError(f"orientation must name each axis once, got {orientation}")
    d = np.array([_CODE_DIR[c] for c in codes], float).T * np.asarray(spacing, float)[None, :]
    if oblique_deg:
        d = _rot((0, 1, 0), oblique_deg / 2) @ _rot((1, 0, 0), oblique_deg) @ d
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)
    q = np.linalg.solve(d, corners.T).T  # voxel coords if origin were 0
    qmin, qmax = q.min(0), q.max(0)
    shape = tuple(int(math.ceil(v)) + 1 for v in (qmax - qmin))
    aff = np.eye(4)
    aff[:3, :3] = d
    aff[:3, 3] = d @ qmin
    return aff, shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# subject parameters
# --------------------------------------------------------------------------------------
@dataclass
class _Level:
    name: str
    value: int  # instance value
    labelled: bool
    W: float
    D: float
    H: float
    DH: float  # disc below (0 for none)
    CW: float
    CD: float
    PW: float
    LT: float
    SPL: float
    SPA: float
    SPH: float
    SPW: float
    TPS: float
    TPA: float
    s: float = 0.0  # arc length of the body centre
    wedge: float = 0.0  # wedge angle of the body (deg; anterior height shorter when positive)
    slip: float = 0.0  # displacement (mm, anterior +) relative to the vertebra below, across the disc below
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    R: np.ndarray = field(default_factory=lambda: np.eye(3))  # columns: e_x, e_y, e_z (world)

    @property
    def region(self) -> str:
        return {"C": "C", "T": "T", "L": "L"}[self.name[0]]


def _level_sequence(spec: PhantomSpec) -> list[str]:
    names = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"] + [f"T{i}" for i in range(1, 13)]
    if spec.t13:
        names.append("T13")
    names += [f"L{i}" for i in range(1, 6)]
    if spec.l6:
        names.append("L6")
    return names


def _subject_params(spec: PhantomSpec, rng: np.random.Generator) -> tuple[list[_Level], dict[str, float]]:
    scale = float(np.clip(rng.normal(1.0, 0.06), 0.86, 1.14))
    hscale = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    discscale = float(np.clip(rng.normal(1.0, 0.1), 0.75, 1.25))
    canalscale = float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.15))
    degenerate = rng.random() < 0.35  # one lower lumbar disc with reduced height
    deg_level = str(rng.choice(["L4", "L5"]))
    levels: list[_Level] = []
    for name in _level_sequence(spec):
        p = _level_pos(name)
        g = {k: _anchor(k, p) for k in _ANCHORS if k not in ("CORDW", "CORDD")}
        jit = lambda: float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08))  # noqa: E731
        lev = _Level(
            name=name,
            value=L.vertebra_value(name),
            labelled=(name != "C1" or spec.has_c1),
            W=g["W"] * scale * jit(), D=g["D"] * scale * jit(), H=g["H"] * hscale * scale * jit(),
            DH=(g["DH"] * discscale * jit() if name != "C1" else 0.0),
            CW=g["CW"] * canalscale, CD=g["CD"] * canalscale, PW=g["PW"] * scale, LT=g["LT"] * scale,
            SPL=g["SPL"] * scale * jit(), SPA=g["SPA"] + rng.normal(0, 3), SPH=g["SPH"] * scale, SPW=g["SPW"] * scale,
            TPS=g["TPS"] * scale * jit(), TPA=g["TPA"],
        )
        if degenerate and name == deg_level:
            lev.DH *= float(rng.uniform(0.45, 0.7))
        levels.append(lev)
    conus = float(rng.uniform(0.0, 1.0))  # 0 = mid L1, 1 = mid L2
    glob = dict(scale=scale, hscale=hscale, discscale=discscale, canalscale=canalscale, conus=conus,
                degenerate=float(degenerate), fat=float(rng.uniform(6, 28)))
    return levels, glob


def _apply_deformities(levels: list[_Level], spec: PhantomSpec) -> None:
    """``spec.slips`` and ``spec.wedges`` onto the levels (no random numbers are drawn)."""
    by = {lv.name: lv for lv in levels}
    for what, pairs in (("slip", spec.slips), ("wedge", spec.wedges)):
        for name, amount in pairs or ():
            lv = by.get(str(name).upper())
            if lv is None or lv.name == "C1" or (what == "wedge" and lv.name == "C2"):
                raise ValueError(f"{what} at {name!r}: not a vertebra this phantom can {what} ({sorted(by)})")
            setattr(lv, what, float(amount))


# --------------------------------------------------------------------------------------
# centre-line
# --------------------------------------------------------------------------------------
@dataclass
class _Curve:
    s: np.ndarray  # (n,) arc length samples (mm), ascending (downwards)
    pos: np.ndarray  # (n, 3) world positions
    ex: np.ndarray  # (n, 3) right
    ey: np.ndarray  # (n, 3) anterior
    ez: np.ndarray  # (n, 3) superior (= -tangent)
    step: float

    def at(self, s: np.ndarray, arr: np.ndarray) -> np.ndarray:
        """Linear interpolation of a per-sample table ``arr`` (n, k) at arc lengths ``s``."""
        f = np.clip((np.asarray(s, np.float64) - self.s[0]) / self.step, 0, len(self.s) - 1.000001)
        i = np.floor(f).astype(np.int64)
        w = (f - i)[..., None].astype(arr.dtype)
        return arr[i] * (1 - w) + arr[i + 1] * w

    def near(self, s: np.ndarray, arr: np.ndarray) -> np.ndarray:
        """Nearest-sample lookup (samples every 0.5 mm: enough for cross-section coordinates)."""
        i = np.rint((np.asarray(s) - self.s[0]) * (1.0 / self.step)).astype(np.int32)
        np.clip(i, 0, len(self.s) - 1, out=i)
        return arr[i]

    def frame(self, s: float) -> tuple[np.ndarray, np.ndarray]:
        c = self.at(np.array(s), self.pos)
        ex, ey, ez = (self.at(np.array(s), a) for a in (self.ex, self.ey, self.ez))
        ez = ez / np.linalg.norm(ez)
        ex = ex - ez * (ex @ ez)
        ex /= np.linalg.norm(ex)
        ey = np.cross(ez, ex)
        return c, np.stack([ex, ey, ez], axis=1)

    def project(self, p: np.ndarray, s0: float, n_iter: int = 4) -> np.ndarray:
        """Arc length of the foot point of each world point ``p`` (..., 3) on the curve."""
        s = np.full(p.shape[:-1], s0, np.float64)
        pt = np.concatenate([self.pos, -self.ez], axis=1).astype(p.dtype)
        for _ in range(n_iter):
            g = self.near(s, pt)
            s = s + ((p - g[..., :3]) * g[..., 3:]).sum(-1)
            s = np.clip(s, self.s[0], self.s[-1])
        return s


def _build_curve(levels: list[_Level], spec: PhantomSpec, rng: np.random.Generator) -> tuple[_Curve, dict[str, Any]]:
    # arc-length layout: s = 0 at the top of the C2 body, increasing downwards
    s = 0.0
    by = {lv.name: lv for lv in levels}
    c2 = by["C2"]
    c1 = by["C1"]
    c1.s = -0.5 * c1.H - 2.0  # C1 ring at the level of the dens (s < 0)
    for lv in levels[1:]:
        lv.s = s + lv.H / 2
        s += lv.H + lv.DH
    s_sacrum = s  # top of S1
    sac_len = 105.0 * float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.15))
    # sagittal angles (deg) at key points; region changes scaled by lordosis_scale and jitter
    ls = spec.lordosis_scale
    jc, jt, jl, js = (float(np.clip(rng.normal(1.0, 0.18), 0.6, 1.4)) for _ in range(4))
    c7 = by["C7"].s
    t1 = by["T1"].s
    last_t = by["T13"].s if "T13" in by else by["T12"].s
    l1 = by["L1"].s
    last_l = by["L6"].s if "L6" in by else by["L5"].s
    phi_t1 = -20.0 * ls * jt
    phi_t12 = 15.0 * ls * jt
    phi_c2 = phi_t1 + 2 + 28.0 * ls * jc
    phi_c7 = phi_t1 + 2
    phi_l1 = phi_t12 - 2
    phi_s1 = -36.0 * ls * jl  # sacral slope
    phi_l5 = phi_s1 + 13.0 * ls
    keys_s = [-90.0, c2.s, c7, t1, last_t, l1, last_l, s_sacrum, s_sacrum + 0.5 * sac_len, s_sacrum + sac_len + 40]
    keys_phi = [phi_c2, phi_c2, phi_c7, phi_t1, phi_t12, phi_l1, phi_l5, phi_s1, phi_s1 + 30 * js, phi_s1 + 70 * js]
    from scipy.interpolate import PchipInterpolator

    step = 0.5
    ss = np.arange(-90.0, s_sacrum + sac_len + 40.0 + step, step)
    phi = np.radians(PchipInterpolator(keys_s, keys_phi)(ss))
    y = np.concatenate([[0.0], np.cumsum(np.sin(phi[1:]) * step)])
    z = -np.concatenate([[0.0], np.cumsum(np.cos(phi[1:]) * step)])
    # scoliosis: lateral sine bump over a region, axial rotation proportional to the offset
    x = np.zeros_like(ss)
    rot = np.zeros_like(ss)
    scol: dict[str, Any] = {"cobb_deg": float(spec.scoliosis)}
    if spec.scoliosis:
        region = str(rng.choice(["thoracic", "thoracolumbar", "lumbar"]))
        a_s, b_s = {"thoracic": (by["T2"].s, by["T12"].s), "thoracolumbar": (by["T6"].s, l1 + 40),
                    "lumbar": (by["T11"].s, s_sacrum)}[region]
        sign = float(rng.choice([-1.0, 1.0]))
        length = b_s - a_s
        amp = math.radians(abs(spec.scoliosis)) * length / (2 * math.pi) * math.copysign(1, spec.scoliosis) * sign
        inside = (ss > a_s) & (ss < b_s)
        x[inside] = amp * np.sin(math.pi * (ss[inside] - a_s) / length) ** 2 * 2
        rot = np.radians(abs(spec.scoliosis) / 3.0) * x / (2 * abs(amp) + 1e-9) * np.sign(amp or 1)
        scol.update(region=region, side="right" if amp > 0 else "left", amplitude_mm=float(2 * amp))
    pos = np.stack([x, y, z], axis=1)
    pos -= pos[np.searchsorted(ss, 0.0)]  # top of C2 at the world origin
    for lv in levels:
        if lv.slip:
            _shear_across_disc(ss, pos, lv, step)
    tan = np.gradient(pos, step, axis=0)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    ez = -tan
    ex0 = np.array([1.0, 0.0, 0.0])[None, :] - ez * ez[:, :1]
    ex0 /= np.linalg.norm(ex0, axis=1, keepdims=True)
    ey0 = np.cross(ez, ex0)
    c, sn = np.cos(rot)[:, None], np.sin(rot)[:, None]
    ex = c * ex0 + sn * ey0
    ey = np.cross(ez, ex)
    curve = _Curve(ss, pos, ex, ey, ez, step)
    for lv in levels:
        lv.centre, lv.R = curve.frame(lv.s)
    info = dict(phi_deg={"C2": phi_c2, "C7": phi_c7, "T1": phi_t1, "T12": phi_t12, "L1": phi_l1, "L5": phi_l5,
                         "S1": phi_s1},
                cervical_lordosis_deg=phi_c2 - phi_c7, thoracic_kyphosis_deg=phi_t12 - phi_t1,
                lumbar_lordosis_deg=phi_l1 - phi_s1, s_sacrum=s_sacrum, sacrum_length=sac_len, scoliosis=scol)
    return curve, info


def _shear_across_disc(ss: np.ndarray, pos: np.ndarray, lv: _Level, step: float) -> None:
    """A slip of ``lv`` on the vertebra below: the curve above the disc under ``lv`` moves by
    ``lv.slip`` along the local anterior direction (the spine below stays where it was), with
    a smooth transition over the middle 70 % of the disc (the vertebral frames, taken at the
    body centres, do not change)."""
    a, b = lv.s + lv.H / 2, lv.s + lv.H / 2 + lv.DH
    mid = int(np.searchsorted(ss, (a + b) / 2))
    t = pos[min(mid + 1, len(ss) - 1)] - pos[max(mid - 1, 0)]
    ez = -t / np.linalg.norm(t)
    ex = np.array([1.0, 0.0, 0.0]) - ez * ez[0]
    ex /= np.linalg.norm(ex)
    anterior = np.cross(ez, ex)
    u = np.clip((ss - (a + 0.15 * (b - a))) / (0.7 * (b - a)), 0.0, 1.0)
    ramp = u * u * (3 - 2 * u)
    pos += lv.slip * (1.0 - ramp)[:, None] * anterior[None, :]


# --------------------------------------------------------------------------------------
# rasterisation helpers
# --------------------------------------------------------------------------------------
class _Canvas:
    """The output arrays plus the grid; paints masks inside voxel boxes."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int], want_labels: bool = True):
        self.affine = affine
        self.inv = np.linalg.inv(affine)
        self.shape = shape
        self.want_labels = want_labels
        self.sem = np.zeros(shape, np.uint8) if want_labels else None
        self.ins = np.zeros(shape, np.uint16) if want_labels else None
        self.tis = np.zeros(shape, np.uint8)
        self.eps = np.zeros(shape, np.uint8) if want_labels else None

    def box(self, centre: np.ndarray, R: np.ndarray, lo: Sequence[float], hi: Sequence[float]):
        """Voxel slices covering the local box [lo, hi] of the frame (centre, R)."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)
        world = centre[None, :] + corners @ R.T
        return self.box_world(world)

    def box_world(self, world: np.ndarray):
        vox = world @ self.inv[:3, :3].T + self.inv[:3, 3]
        a = np.maximum(np.floor(vox.min(0)).astype(int), 0)
        b = np.minimum(np.ceil(vox.max(0)).astype(int) + 1, self.shape)
        if np.any(b <= a):
            return None
        return tuple(slice(int(i), int(j)) for i, j in zip(a, b))

    def world(self, sl) -> np.ndarray:
        idx = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in sl], indexing="ij"), -1)
        return idx @ self.affine[:3, :3].T.astype(np.float32) + self.affine[:3, 3].astype(np.float32)

    def local(self, sl, centre: np.ndarray, R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w = self.world(sl) - centre.astype(np.float32)
        loc = w @ R.astype(np.float32)
        return loc[..., 0], loc[..., 1], loc[..., 2]

    def local_box(self, centre: np.ndarray, R: np.ndarray, lo: Sequence[float], hi: Sequence[float]):
        """(slices, x, y, z) of the voxels in the local box [lo, hi] of frame (centre, R), or None."""
        sl = self.box(centre, R, lo, hi)
        if sl is None:
            return None
        x, y, z = self.local(sl, centre, R)
        return sl, x, y, z

    def paint(self, sl, mask: np.ndarray, sem: int, ins: int, tissue: int, where: Optional[np.ndarray] = None) -> None:
        if where is not None:
            mask = mask & where
        if not mask.any():
            return
        if self.want_labels and sem >= 0:
            self.sem[sl][mask] = sem
            self.ins[sl][mask] = ins
        if tissue >= 0:
            self.tis[sl][mask] = tissue

    def extent_along(self, d: np.ndarray) -> float:
        """Largest step (mm) of the voxel lattice along the unit direction ``d``."""
        return float(np.max(np.abs(self.affine[:3, :3].T @ d)))


def _se(x: np.ndarray, y: np.ndarray, a: Any, b: Any, p: float = 2.0) -> np.ndarray:
    if isinstance(a, (float, int, np.floating)):
        a = float(a)
    if isinstance(b, (float, int, np.floating)):
        b = float(b)
    if p == 2.0:
        return ((x / a) ** 2 + (y / b) ** 2) <= 1.0
    return (np.abs(x / a) ** p + np.abs(y / b) ** p) <= 1.0


def _beam(x, y, z, p0, d, n, length, r_n, r_m, taper=0.6, cap=True):
    """Tapered elliptical beam from ``p0`` along unit ``d`` (local coords); ``n`` the unit
    perpendicular for radius ``r_n``, the third axis m = d x n for ``r_m``."""
    d = np.asarray(d, float)
    n = np.asarray(n, float)
    m = [float(v) for v in np.cross(d, n)]
    d = [float(v) for v in d]
    n = [float(v) for v in n]
    qx, qy, qz = x - float(p0[0]), y - float(p0[1]), z - float(p0[2])
    t = qx * d[0] + qy * d[1] + qz * d[2]
    a = qx * n[0] + qy * n[1] + qz * n[2]
    b = qx * m[0] + qy * m[1] + qz * m[2]
    f = np.clip(t / max(length, 1e-6), 0, 1)
    k = 1 - (1 - taper) * f
    rn, rm = r_n * k, r_m * k
    if cap:  # rounded tip over the last radius
        over = np.clip((t - (length - rm)) / np.maximum(rm, 1e-3), 0, 1)
        s = np.sqrt(np.clip(1 - over ** 2, 0, 1))
        rn, rm = rn * s + 1e-6, rm * s + 1e-6
    return (t >= 0) & (t <= length) & ((a / rn) ** 2 + (b / rm) ** 2 <= 1)


def _pillar(x, y, z, cx, cy, z0, z1, rx, ry):
    """Vertical elliptic pillar with rounded ends between z0 < z1."""
    zm, hz = (z0 + z1) / 2, max((z1 - z0) / 2, 1e-3)
    cap = min(rx, ry, hz)
    over = np.clip((np.abs(z - zm) - (hz - cap)) / cap, 0, None)
    s = np.sqrt(np.clip(1 - over ** 2, 0, 1))
    return (np.abs(z - zm) <= hz) & (((x - cx) / (rx * s + 1e-6)) ** 2 + ((y - cy) / (ry * s + 1e-6)) ** 2 <= 1)


# --------------------------------------------------------------------------------------
# structures
# --------------------------------------------------------------------------------------
def _canal_centre_y(lv: _Level) -> float:
    return -(lv.D / 2 + lv.CD)


def _facet_geometry(lv: _Level) -> tuple[float, float]:
    """(x, y) of the articular column of a level (local frame, right side)."""
    return lv.CW + lv.PW * 0.5 + 1.0, _canal_centre_y(lv) - lv.CD * 0.15


def _joint(upper: _Level, lower: _Level) -> tuple[float, float]:
    a, b = _facet_geometry(upper), _facet_geometry(lower)
    return (a[0] + b[0]) / 2, (a[1] + b[1]) / 2


def _facet_offsets(region: str) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """(dx, dy, rx, ry) of the superior and inferior articular process around the joint."""
    if region == "L":  # sagittal facets: SAP lateral-anterior, IAP medial-posterior
        return (3.4, 1.0, 3.0, 6.5), (-3.4, -1.0, 3.0, 6.0)
    if region == "T":  # coronal facets: SAP anterior, IAP posterior
        return (0.0, 2.8, 5.0, 2.5), (0.0, -2.8, 5.0, 2.5)
    return (0.0, 2.6, 5.5, 3.2), (0.0, -2.6, 5.5, 3.2)  # cervical lateral masses


def _paint_posterior(cv: _Canvas, lv: _Level, above: Optional[_Level], below: Optional[_Level],
                     below_is_sacrum: bool) -> None:
    """Arcus (pedicles + laminae), spinous, transverse and articular processes of one vertebra.
    Each part is rasterised inside its own local bounding box."""
    H, D, DH = lv.H, lv.D, lv.DH
    b = D / 2
    yc = _canal_centre_y(lv)
    sp_len = lv.SPL
    alpha = math.radians(lv.SPA)
    dh_above = above.DH if above is not None else 6.0
    tp_half = lv.TPS / 2
    c, R = lv.centre, lv.R
    lab = lv.labelled
    s = (lambda val: val) if lab else (lambda val: -1)  # noqa: E731
    ins = lv.value if lab else 0
    rx_out, ry_out = lv.CW + lv.PW, lv.CD + lv.LT
    lam_lo = -0.5 * H - 0.45 * DH - (0.25 * H if lv.region == "T" else 0.0)
    # ligamentum flavum closing the canal between the laminae (tissue only, under the bone)
    box = cv.local_box(c, R, (-rx_out, yc - ry_out, -H / 2 - DH - 1), (rx_out, yc, H / 2))
    if box is not None:
        sl, x, y, z = box
        ring = _se(x, y - yc, rx_out, ry_out) & ~_se(x, y - yc, lv.CW, lv.CD)
        cv.paint(sl, ring & (z > -H / 2 - DH - 0.5) & (z < H / 2), -1, 0, Tissue.LIGAMENT)
    if lv.region == "T" and lv.name != "T12":
        _paint_rib(cv, lv)
    # transverse/costal processes
    tpa = math.radians(lv.TPA)  # posterior sweep of the process (positive = backwards)
    if lv.region == "C":
        root = (lv.CW + lv.PW * 0.3, -b + 2.0, 0.0)
        r_n, r_m = 3.0, 3.5
    else:
        root = (lv.CW + lv.PW * 0.5, yc - lv.CD * 0.1, 0.12 * H)
        r_n, r_m = (4.0, 5.0) if lv.region == "T" else (3.5, 4.5)
    length = max(tp_half - root[0], 4.0)
    for side, sem_v in ((1.0, L.COSTAL_R), (-1.0, L.COSTAL_L)):
        d = np.array([side * math.cos(tpa), -math.sin(tpa), 0.12 if lv.region == "T" else 0.0])
        d /= np.linalg.norm(d)
        n = np.array([0.0, 0.0, 1.0]) - d * d[2]
        n /= np.linalg.norm(n)
        p0 = np.array([side * root[0], root[1], root[2]])
        p1 = p0 + d * length
        rr = max(r_n, r_m) + 1
        box = cv.local_box(c, R, np.minimum(p0, p1) - rr, np.maximum(p0, p1) + rr)
        if box is None:
            continue
        sl, x, y, z = box
        m = _beam(x, y, z, p0, d, n, length, r_n, r_m, taper=0.75 if lv.region != "T" else 0.9)
        if lv.region == "C":  # foramen transversarium
            cx = side * (root[0] + length * 0.35)
            m &= ((x - cx) ** 2 + (y - root[1]) ** 2) > 2.2 ** 2
        cv.paint(sl, m, s(sem_v), ins, Tissue.MARROW)
    # spinous process from the posterior arch, sloping caudally by alpha
    p0 = np.array([0.0, yc - lv.CD - lv.LT * 0.5, -0.05 * H])
    d = np.array([0.0, -math.cos(alpha), -math.sin(alpha)])
    n = np.array([1.0, 0.0, 0.0])
    sp_total = sp_len + lv.LT * 0.5
    p1 = p0 + d * sp_total
    rr = max(lv.SPW, lv.SPH) + 1
    box = cv.local_box(c, R, np.minimum(p0, p1) - rr, np.maximum(p0, p1) + rr)
    if box is not None:
        sl, x, y, z = box
        sp = _beam(x, y, z, p0, d, n, sp_total, lv.SPW, lv.SPH, taper=0.7, cap=True)
        if lv.name in ("C2", "C3", "C4", "C5", "C6"):  # bifid tip
            t_along = (y - float(p0[1])) * float(d[1]) + (z - float(p0[2])) * float(d[2])
            sp &= ~((np.abs(x) < 1.0) & (t_along > 0.75 * sp_len))
        cv.paint(sl, sp, s(L.SPINOUS), ins, Tissue.MARROW)
    # arcus: pedicles (anterior half of the ring, upper body), laminae (posterior half, sloping down)
    box = cv.local_box(c, R, (-rx_out, yc - ry_out, lam_lo), (rx_out, -b + 3.0, 0.45 * H))
    if box is not None:
        sl, x, y, z = box
        ring = _se(x, y - yc, rx_out, ry_out) & ~_se(x, y - yc, lv.CW, lv.CD)
        post = y <= yc
        ped_z = (z > -0.22 * H) & (z < 0.45 * H) & (y < -b + 3.0)
        lam_z = (z > lam_lo) & (z < 0.33 * H)
        arc = ring & ((~post & ped_z) | (post & lam_z))
        cv.paint(sl, arc, s(L.ARCUS), ins, Tissue.MARROW)
    # pedicles: solid bars from the posterolateral body wall back to the articular column
    ped_rz = min(0.3 * H, 8.0)
    for side in (1.0, -1.0):
        p0 = np.array([side * (lv.CW + lv.PW * 0.45), -b + 4.0, 0.12 * H])
        p1 = np.array([side * (lv.CW + lv.PW * 0.5), yc - lv.CD * 0.2, 0.12 * H])
        d = (p1 - p0) / np.linalg.norm(p1 - p0)
        n = np.array([1.0, 0.0, 0.0]) - d * d[0]
        n /= np.linalg.norm(n)
        rr = max(lv.PW / 2, ped_rz) + 1
        box = cv.local_box(c, R, np.minimum(p0, p1) - rr, np.maximum(p0, p1) + rr)
        if box is None:
            continue
        sl, x, y, z = box
        m = _beam(x, y, z, p0, d, n, float(np.linalg.norm(p1 - p0)), lv.PW / 2, ped_rz, taper=1.0, cap=False)
        m &= ~_se(x, y - yc, lv.CW, lv.CD)
        cv.paint(sl, m, s(L.ARCUS), ins, Tissue.MARROW)
    # articular processes: superior up to the joint with the vertebra above, inferior down
    reg = lv.region
    (sdx, sdy, srx, sry), _ = _facet_offsets(reg)
    if above is not None and above.name != "C1":
        jx, jy = _joint(above, lv)
    else:
        jx, jy = _facet_geometry(lv)
    sap_top = H / 2 + dh_above + 0.28 * (above.H if above is not None else H)
    if lv.name == "C2":  # C2 superior facets: broad, flat, lateral to the dens
        jx, jy = lv.CW * 0.9 + 2, -b * 0.2
        sdx, sdy, srx, sry = 0.0, 0.0, 6.0, 7.0
        sap_top = H / 2 + 3.0
    pillars = [(side, sem_v, jx + sdx, jy + sdy, 0.12 * H, sap_top, srx, sry)
               for side, sem_v in ((1.0, L.SUP_ART_R), (-1.0, L.SUP_ART_L))]
    if below is not None:
        jx, jy = _joint(lv, below)
        (idx_, idy, irx, iry) = _facet_offsets(reg if not below_is_sacrum else "L")[1]
        iap_bot = -(H / 2 + DH + 0.28 * below.H)
        pillars += [(side, sem_v, jx + idx_, jy + idy, iap_bot, -0.12 * H, irx, iry)
                    for side, sem_v in ((1.0, L.INF_ART_R), (-1.0, L.INF_ART_L))]
    for side, sem_v, px, py, z0, z1, rx, ry in pillars:
        box = cv.local_box(c, R, (side * px - rx - 1, py - ry - 1, z0 - 1), (side * px + rx + 1, py + ry + 1, z1 + 1))
        if box is None:
            continue
        sl, x, y, z = box
        cv.paint(sl, _pillar(x, y, z, side * px, py, z0, z1, rx, ry), s(sem_v), ins, Tissue.MARROW)


def _paint_rib(cv: _Canvas, lv: _Level) -> None:
    """Proximal rib (tissue only, unlabelled as in the method): head at the side of the body
    near its upper endplate, neck behind the transverse process tip, shaft running laterally,
    backwards and down, then curving forwards."""
    H, b = lv.H, lv.D / 2
    tpa = math.radians(lv.TPA)
    root_x, root_y = lv.CW + lv.PW * 0.5, _canal_centre_y(lv) - lv.CD * 0.1
    tip_x = lv.TPS / 2
    tip_y = root_y - math.tan(tpa) * (tip_x - root_x)
    for side in (1.0, -1.0):
        pts = np.array([
            [side * (lv.W / 2 - 1.0), -b * 0.45, 0.42 * H],
            [side * (tip_x - 4.0), tip_y + 6.5, 0.2 * H],
            [side * (tip_x + 22.0), tip_y + 2.0, 0.2 * H - 8.0],
            [side * (tip_x + 48.0), tip_y + 12.0, 0.2 * H - 18.0],
            [side * (tip_x + 70.0), tip_y + 35.0, 0.2 * H - 26.0],
        ])
        for p0, p1 in zip(pts[:-1], pts[1:]):
            seg = p1 - p0
            length = float(np.linalg.norm(seg))
            d = seg / length
            n = np.array([0.0, 0.0, 1.0]) - d * d[2]
            n /= np.linalg.norm(n)
            box = cv.local_box(lv.centre, lv.R, np.minimum(p0, p1) - 6, np.maximum(p0, p1) + 6)
            if box is None:
                continue
            sl, x, y, z = box
            m = _beam(x, y, z, p0 - d * 3.0, d, n, length + 6.0, 5.0, 3.5, taper=1.0, cap=False)
            cv.paint(sl, m, -1, 0, Tissue.MARROW, where=cv.tis[sl] != Tissue.MARROW)


def _body_section(x, y, z, lv: _Level, grow: float = 0.0) -> np.ndarray:
    a = lv.W / 2 + grow
    b = lv.D / 2 + grow
    waist = 1.0 - 0.06 * np.clip(1 - (2 * z / lv.H) ** 2, 0, 1)
    return _se(x / waist, y, a, b, 2.4)


def _paint_body(cv: _Canvas, lv: _Level, ep_above: Optional[int], ep_below: Optional[int]) -> None:
    H = lv.H
    top_extra = 17.0 if lv.name == "C2" else 0.0
    sl = cv.box(lv.centre, lv.R, (-lv.W / 2 - 3, -lv.D / 2 - 3, -H / 2 - 0.5), (lv.W / 2 + 3, lv.D / 2 + 3, H / 2 + top_extra + 0.5))
    if sl is None:
        return
    x, y, z = cv.local(sl, lv.centre, lv.R)
    ins = lv.value if lv.labelled else 0
    sem = L.BODY if lv.labelled else -1
    if lv.wedge:  # endplate planes z = +-H/2 -+ y tan(w/2): the anterior wall shorter
        tw = math.tan(math.radians(lv.wedge) / 2)
        top, bot = H / 2 - y * tw, -H / 2 + y * tw
        within = (z <= top) & (z >= bot)
    else:
        top, bot = H / 2, -H / 2
        within = np.abs(z) <= H / 2
    inside = _body_section(x, y, z, lv) & within
    # anterior longitudinal ligament (tissue)
    cv.paint(sl, _body_section(x, y, z, lv, 1.6) & (y > 0.25 * lv.D / 2) & within & ~inside, -1, 0,
             Tissue.LIGAMENT, where=cv.tis[sl] <= Tissue.SOFT)
    cv.paint(sl, inside, sem, ins, Tissue.MARROW)
    if lv.name == "C2":  # dens
        dens = _pillar(x, y, z, 0.0, lv.D * 0.08, H / 2 - 2, H / 2 + 16.0, 5.0, 5.5)
        cv.paint(sl, dens, sem, ins, Tissue.MARROW)
    te = max(1.5, cv.extent_along(lv.R[:, 2]) * 1.01)
    for ep_val, m, side in ((ep_above, inside & (z >= top - te), 1), (ep_below, inside & (z <= bot + te), 2)):
        if ep_val is None:
            continue
        cv.paint(sl, m, L.ENDPLATE if lv.labelled else -1, ep_val, Tissue.CORTEX)
        if cv.eps is not None and lv.labelled:
            cv.eps[sl][m] = side


def _paint_c1(cv: _Canvas, lv: _Level, c2: _Level) -> None:
    """C1 (atlas): anterior arch, lateral masses (articular processes), posterior arch, TPs."""
    sl = cv.box(lv.centre, lv.R, (-lv.TPS / 2 - 4, -40, -12), (lv.TPS / 2 + 4, c2.D / 2 + 12, 12))
    if sl is None:
        return
    x, y, z = cv.local(sl, lv.centre, lv.R)
    s = (lambda val: val) if lv.labelled else (lambda val: -1)  # noqa: E731
    ins = lv.value if lv.labelled else 0
    cy = -4.0
    ring_out = _se(x, y - cy, 24.0, 22.0)
    ring_in = _se(x, y - cy, 19.0, 17.0)
    zr = np.abs(z) < 4.5
    arch = ring_out & ~ring_in & zr
    cv.paint(sl, arch, s(L.ARCUS), ins, Tissue.MARROW)
    for side, sap, iap, tp in ((1, L.SUP_ART_R, L.INF_ART_R, L.COSTAL_R), (-1, L.SUP_ART_L, L.INF_ART_L, L.COSTAL_L)):
        mass = _se(x - side * 17.0, y - (cy + 6.0), 6.5, 9.0) & (np.abs(z) < 8.0)
        cv.paint(sl, mass & (z >= 0), s(sap), ins, Tissue.MARROW)
        cv.paint(sl, mass & (z < 0), s(iap), ins, Tissue.MARROW)
        d = np.array([side, -0.15, 0.0])
        d /= np.linalg.norm(d)
        tpm = _beam(x, y, z, np.array([side * 21.0, cy + 2.0, 0.0]), d, np.array([0.0, 0.0, 1.0]), lv.TPS / 2 - 20,
                    3.5, 4.0, taper=0.8)
        cv.paint(sl, tpm, s(tp), ins, Tissue.MARROW)


def _paint_disc(cv: _Canvas, up: _Level, lo: _Level) -> None:
    """Disc between two bodies: between the inferior plane of ``up`` and the superior plane of ``lo``."""
    c = (up.centre + lo.centre) / 2
    R = up.R.copy()
    mean_ez = up.R[:, 2] + lo.R[:, 2]
    mean_ez /= np.linalg.norm(mean_ez)
    a = max(up.W, lo.W) / 2 + 3
    b = max(up.D, lo.D) / 2 + 3 + abs(up.slip)
    span = np.linalg.norm(up.centre - lo.centre) / 2 + 2
    sl = cv.box(c, R, (-a - 2, -b - 2, -span), (a + 2, b + 2, span))
    if sl is None:
        return
    w = cv.world(sl)
    d1 = (w - up.centre.astype(np.float32)) @ up.R[:, 2].astype(np.float32) + up.H / 2  # < 0 below upper body
    d2 = (w - lo.centre.astype(np.float32)) @ lo.R[:, 2].astype(np.float32) - lo.H / 2  # > 0 above lower body
    if up.wedge:  # the wedged endplate planes (see _paint_body)
        d1 = d1 - ((w - up.centre.astype(np.float32)) @ up.R[:, 1].astype(np.float32)) * math.tan(math.radians(up.wedge) / 2)
    if lo.wedge:
        d2 = d2 + ((w - lo.centre.astype(np.float32)) @ lo.R[:, 1].astype(np.float32)) * math.tan(math.radians(lo.wedge) / 2)
    between = (d1 < 0) & (d2 > 0)
    # cross-section in the mean frame, interpolated between the two bodies
    ex = up.R[:, 0] + lo.R[:, 0]
    ex -= mean_ez * (ex @ mean_ez)
    ex /= np.linalg.norm(ex)
    ey = np.cross(mean_ez, ex)
    f = np.clip(-d1 / np.maximum(-d1 + d2, 1e-3), 0, 1)  # 0 at the upper body, 1 at the lower
    if up.slip:  # a sheared disc: its cross-section follows the line between the two endplate centres
        top_c = (up.centre - up.R[:, 2] * up.H / 2).astype(np.float32)
        bot_c = (lo.centre + lo.R[:, 2] * lo.H / 2).astype(np.float32)
        q = w - (top_c[None, :] * (1 - f[..., None]) + bot_c[None, :] * f[..., None])
    else:
        q = w - c.astype(np.float32)
    x = q @ ex.astype(np.float32)
    y = q @ ey.astype(np.float32)
    bulge = 0.8 * np.sqrt(np.clip(f * (1 - f) * 4, 0, 1))
    aa = up.W / 2 * (1 - f) + lo.W / 2 * f + bulge
    bb = up.D / 2 * (1 - f) + lo.D / 2 * f + bulge
    disc = between & ((np.abs(x / aa) ** 2.4 + np.abs(y / bb) ** 2.4) <= 1)
    # nucleus: most of the disc's inner part (the annulus a rim of a few mm, as in sagittal T2w)
    nucleus = disc & ((x / (aa * 0.72)) ** 2 + ((y + bb * 0.08) / (bb * 0.66)) ** 2 <= 1) & (f > 0.12) & (f < 0.88)
    lig = between & ((np.abs(x / (aa + 1.6)) ** 2.4 + np.abs(y / (bb + 1.6)) ** 2.4) <= 1) & ~disc & (y > 0.25 * bb)
    cv.paint(sl, lig, -1, 0, Tissue.LIGAMENT, where=cv.tis[sl] <= Tissue.SOFT)
    if up.labelled:
        cv.paint(sl, disc, L.DISC, L.disc_value(up.value), Tissue.ANNULUS)
    else:
        cv.paint(sl, disc, -1, 0, Tissue.ANNULUS)
    cv.paint(sl, nucleus, -1, 0, Tissue.NUCLEUS)


def _section_tables(levels: list[_Level], curve: _Curve, s_sacrum: float, sac_len: float, glob: dict[str, float]):
    """Per-curve-sample cross-section parameters of canal, cord and sacrum."""
    ss = curve.s
    ls = np.array([lv.s for lv in levels[1:]])  # from C2 down
    tab: dict[str, np.ndarray] = {}
    for key in ("CW", "CD", "D", "W"):
        vals = np.array([getattr(lv, key) for lv in levels[1:]])
        tab[key] = np.interp(ss, ls, vals)
    # cord (from the anchor tables, by level position)
    pos = np.array([_level_pos(lv.name) for lv in levels[1:]])
    posi = np.interp(ss, ls, pos)
    cw = np.interp(posi, *zip(*sorted((_STD_INDEX[k], v) for k, v in _ANCHORS["CORDW"].items())))
    cd = np.interp(posi, *zip(*sorted((_STD_INDEX[k], v) for k, v in _ANCHORS["CORDD"].items())))
    by = {lv.name: lv for lv in levels}
    conus_end = by["L1"].s + glob["conus"] * (by["L2"].s - by["L1"].s)
    taper = np.clip((conus_end - ss) / 22.0, 0, 1) ** 0.7
    tab["cordw"] = cw * np.maximum(taper, 0) * glob["canalscale"] ** 0.3
    tab["cordd"] = cd * np.maximum(taper, 0) * glob["canalscale"] ** 0.3
    tab["cordw"][ss > conus_end] = 0
    tab["cordd"][ss > conus_end] = 0
    # canal ends ~40 mm below the top of S1 (thecal sac at S2), tapering
    dsac = ss - s_sacrum
    ctaper = np.clip((40.0 - dsac) / 18.0, 0, 1)
    tab["CW"] = tab["CW"] * np.where(dsac > 0, 0.55 + 0.45 * ctaper, 1) * (ctaper > 0)
    tab["CD"] = tab["CD"] * np.where(dsac > 0, 0.5 + 0.5 * ctaper, 1) * (ctaper > 0)
    # sacrum: depth of the body part and total half width, tapering down to the tip
    fr = np.clip(dsac / sac_len, 0, 1)
    s1 = levels[-1]
    tab["sac_b"] = (s1.D / 2 * 1.05) * (1 - 0.7 * fr)
    tab["sac_a"] = np.where(fr < 0.22, 50.0 * glob["scale"], 50.0 * glob["scale"] * (1 - (fr - 0.22) / 0.78 * 0.8))
    tab["sac_post"] = tab["sac_b"] + 2 * np.maximum(tab["CD"], 3.5 * (1 - fr) + 1.5) + 6.0 * (1 - 0.5 * fr)
    return tab, conus_end


def _paint_swept(cv: _Canvas, curve: _Curve, tab: dict[str, np.ndarray], s_from: float, s_to: float,
                 s_sacrum: float, sac_len: float, sacrum_labelled: bool) -> None:
    """Canal, cord and sacrum, in pieces of the curve; each voxel owned by the piece its foot point lies in."""
    bounds = list(np.arange(s_from, s_sacrum, 20.0)) + list(np.arange(s_sacrum, s_to, 26.0)) + [s_to]
    big = np.concatenate([curve.pos, curve.ex, curve.ey] + [tab[k][:, None] for k in
                          ("CW", "CD", "D", "cordw", "cordd", "sac_a", "sac_b", "sac_post")], axis=1).astype(np.float32)
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        piece = s1 - s0
        sm = (s0 + s1) / 2
        in_sac = s1 > s_sacrum
        cm, Rm = curve.frame(sm)
        probe = curve.at(np.array([s0, sm, s1]), np.stack([tab["D"], tab["CW"], tab["CD"], tab["sac_a"], tab["sac_post"]], 1))
        dmax, cwmax, cdmax = float(probe[:, 0].max()), float(probe[:, 1].max()), float(probe[:, 2].max())
        zr = piece / 2 + 5.0
        if in_sac:
            ax_ = float(probe[:, 3].max()) + 4
            lo, hi = (-ax_, -float(probe[:, 4].max()) - 10, -zr - 6), (ax_, dmax / 2 + 6, zr + 6)
        else:
            lo, hi = (-cwmax - 3, -dmax / 2 - 2 * cdmax - 4, -zr), (cwmax + 3, -dmax / 2 + 4, zr)
        sl = cv.box(cm, Rm, lo, hi)
        if sl is None:
            continue
        w = cv.world(sl)
        s = curve.project(w, sm, n_iter=4)
        # pieces overlap by 1 mm: painting is idempotent, and it hides projection round-off seams
        own = (s >= s0 - 1.0) & (s <= s1 + 1.0) & (s >= s_from) & (s <= s_to)
        if not own.any():
            continue
        keys = ("CW", "CD", "D", "cordw", "cordd", "sac_a", "sac_b", "sac_post")
        allt = curve.near(s, big)
        q = (w - allt[..., 0:3]).astype(np.float32)
        u = (q * allt[..., 3:6]).sum(-1)
        v = (q * allt[..., 6:9]).sum(-1)
        g = {k: allt[..., 9 + i] for i, k in enumerate(keys)}
        if in_sac:
            dsac = s - s_sacrum
            sac = own & (dsac >= 0) & (dsac <= sac_len)
            vpost = -g["sac_post"]
            vant = g["sac_b"]
            vmid = (vpost + vant) / 2
            hv = (vant - vpost) / 2
            body = _se(u, v, np.maximum(g["sac_b"] * 1.35, 1), np.maximum(g["sac_b"], 1), 2.2)
            wing = (np.abs(u / np.maximum(g["sac_a"], 1)) ** 3 + np.abs((v - vmid - 0.1 * hv) / np.maximum(hv * 0.62, 1)) ** 3) <= 1
            crest = (np.abs(u) < 3 + 2 * (1 - np.clip(dsac / sac_len, 0, 1))) & (v < vmid) & (v > vpost - 5)
            sac &= body | wing | crest
            # rounded tip
            sac &= ~((dsac > sac_len - 8) & ((u / np.maximum(g["sac_a"], 1)) ** 2 > np.clip((sac_len - dsac) / 8, 0, 1)))
            cv.paint(sl, sac, L.SACRUM if sacrum_labelled else -1, 26 if sacrum_labelled else 0, Tissue.MARROW)
        cyy = -(g["D"] / 2 + g["CD"])
        canal = own & (g["CW"] > 0.5) & (((u / np.maximum(g["CW"], 1e-3)) ** 2 + ((v - cyy) / np.maximum(g["CD"], 1e-3)) ** 2) <= 1)
        cord = canal & (g["cordw"] > 0.3) & (((u / np.maximum(g["cordw"], 1e-3)) ** 2
                                              + ((v - cyy - 0.1 * g["CD"]) / np.maximum(g["cordd"], 1e-3)) ** 2) <= 1)
        cv.paint(sl, canal, L.CANAL, 0, Tissue.CSF)
        cv.paint(sl, cord, L.CORD, 0, Tissue.CORD)
        # cauda equina below the conus: nerve roots lying dorsally in the CSF (tissue only)
        below_conus = canal & (g["cordw"] <= 0.3) & (s > 0)
        if below_conus.any():
            un = u / np.maximum(g["CW"], 1e-3)
            vn = (v - cyy) / np.maximum(g["CD"], 1e-3)
            roots = np.zeros_like(below_conus)
            for k, ang in enumerate(np.linspace(-2.6, -0.55, 7)):
                for ring in (0.45, 0.72):
                    ru, rv = ring * math.cos(ang), ring * math.sin(ang) * 0.9
                    roots |= ((un - ru) ** 2 + (vn - rv) ** 2) < 0.012 + 0.004 * (k % 2)
            cv.paint(sl, below_conus & roots, -1, 0, Tissue.CORD)


# --------------------------------------------------------------------------------------
# soft tissue (tissue map only)
# --------------------------------------------------------------------------------------
def _paint_soft(cv: _Canvas, curve: _Curve, levels: list[_Level], tab: dict[str, np.ndarray], glob: dict[str, float],
                s_sacrum: float) -> None:
    """Skin, subcutaneous fat, paraspinal muscles, psoas, vessels, lungs and viscera around the spine.
    Parameterised by world height (the curve is monotonic in z), chunked over the first array axis."""
    zc = curve.pos[:, 2]
    order = np.argsort(zc)
    ss = curve.s
    # per-sample posterior extent of the bony spine (tips of the spinous processes)
    ls = np.array([lv.s for lv in levels[1:]])
    sp_depth = np.array([lv.D / 2 + 2 * lv.CD + lv.LT + lv.SPL * math.cos(math.radians(lv.SPA)) for lv in levels[1:]])
    post = np.interp(ss, ls, sp_depth)
    region_t = np.interp(ss, ls, [1.0 if lv.region == "T" else 0.0 for lv in levels[1:]])
    region_l = np.interp(ss, ls, [1.0 if lv.region == "L" else 0.0 for lv in levels[1:]])
    region_c = np.interp(ss, ls, [1.0 if lv.region == "C" else 0.0 for lv in levels[1:]])
    dsac = ss - s_sacrum
    region_l = np.where(dsac > 0, 1.0, region_l)
    fat = glob["fat"]
    by = {lv.name: lv for lv in levels}
    s_apex = by["T1"].s - 10.0
    s_base = by["T13"].s if "T13" in by else by["T12"].s
    lung_f = np.clip(np.minimum((ss - s_apex) / 45.0, (s_base - ss) / 60.0), 0, 1) ** 0.5
    back = post + 14 + 10 * region_l + fat * (0.6 + 0.4 * region_l)
    front = np.where(region_c > 0.5, 75.0, 170.0)
    half_lat = np.where(region_c > 0.5, 60.0, 170.0)
    # soft tissue is smooth: evaluate it on a grid coarser by up to 2 per axis, then repeat
    sp = np.sqrt((cv.affine[:3, :3] ** 2).sum(0))
    f = np.where(sp < 1.6, 2, 1).astype(int)
    aff_c = cv.affine.copy()
    aff_c[:3, :3] = cv.affine[:3, :3] * f[None, :]
    aff_c[:3, 3] = cv.affine[:3, :3] @ ((f - 1) / 2.0) + cv.affine[:3, 3]
    shape_c = tuple(int(math.ceil(n / k)) for n, k in zip(cv.shape, f))
    coarse = _Canvas(aff_c, shape_c, want_labels=False)
    n0 = coarse.shape[0]
    chunk = max(1, int(2_000_000 // max(1, coarse.shape[1] * coarse.shape[2])))
    for i0 in range(0, n0, chunk):
        sl = (slice(i0, min(i0 + chunk, n0)), slice(0, coarse.shape[1]), slice(0, coarse.shape[2]))
        w = coarse.world(sl)
        s = np.interp(w[..., 2], zc[order], ss[order])
        cx = np.interp(s, ss, curve.pos[:, 0])
        cy = np.interp(s, ss, curve.pos[:, 1])
        u = w[..., 0] - cx
        v = w[..., 1] - cy
        g = {k: np.interp(s, ss, arr) for k, arr in
             (("back", back), ("front", front), ("lat", half_lat), ("D", tab["D"]), ("W", tab["W"]), ("rt", region_t),
              ("rl", region_l), ("rc", region_c), ("post", post))}
        # body outline: ellipse-ish, back flatter
        vv = np.where(v < 0, v / g["back"], v / g["front"])
        inside = (np.abs(u / g["lat"]) ** 2.5 + np.abs(vv) ** 2.5) <= 1
        skin = inside & ~((np.abs(u / (g["lat"] - 2)) ** 2.5 + np.abs(np.where(v < 0, v / (g["back"] - 2), v / (g["front"] - 2))) ** 2.5) <= 1)
        subfat = inside & (v < 0) & (v < -(g["back"] - 2 - fat * (0.5 + 0.5 * g["rl"])))
        tis = np.full(u.shape, Tissue.SOFT, np.uint8)
        tis[~inside] = Tissue.BACKGROUND
        # paraspinal muscles: behind the vertebral bodies, beside the spinous processes
        wm = 28 + 22 * g["rl"] + 10 * g["rt"]
        top_v = -g["D"] / 2 - 4
        depth = np.maximum(g["back"] - fat * (0.5 + 0.5 * g["rl"]) + top_v, 10.0)
        musc = inside & (v < top_v) & ~subfat & ((((np.abs(u) - wm / 2 - 2) / (wm / 2 + 6)) ** 2
                                                  + ((v - top_v + depth / 2) / (depth / 2 + 8)) ** 2) <= 1)
        musc |= inside & (v < top_v) & ~subfat & (np.abs(u) < 8)
        tis[musc] = Tissue.MUSCLE
        tis[subfat] = Tissue.FAT
        tis[skin] = Tissue.SKIN
        # psoas (lumbar), lateral to the bodies
        pr = 6 + 16 * np.clip((s - s_sacrum + 120) / 120, 0, 1)
        psoas = (g["rl"] > 0.5) & (s < s_sacrum + 10) & ((((np.abs(u) - g["W"] / 2 - pr * 0.7) / pr) ** 2 + ((v - 2) / (pr * 0.9)) ** 2) <= 1)
        tis[psoas & inside] = Tissue.MUSCLE
        # lungs (thoracic), anterolateral
        lf = np.interp(s, ss, lung_f)
        lung = (lf > 0.05) & ((((np.abs(u) - 60) / (45 * lf + 1e-3)) ** 2 + ((v - 35) / (75 * lf + 1e-3)) ** 2) <= 1)
        tis[lung & inside] = Tissue.LUNG
        # aorta (left-anterior of the bodies) down to L4, IVC right (lumbar)
        aorta = ((u + 12) ** 2 + (v - g["D"] / 2 - 13) ** 2 <= 11 ** 2) & (s < s_sacrum - 45) & (g["rc"] < 0.5)
        ivc = ((u - 18) ** 2 + (v - g["D"] / 2 - 14) ** 2 <= 9 ** 2) & (g["rl"] > 0.5) & (s < s_sacrum - 40)
        tis[(aorta | ivc) & inside] = Tissue.VESSEL
        # airway (cervical)
        air = (g["rc"] > 0.5) & ((u / 8) ** 2 + ((v - g["D"] / 2 - 18) / 7) ** 2 <= 1)
        tis[air] = Tissue.BACKGROUND
        coarse.tis[sl] = tis
    full = coarse.tis
    for axis, k in enumerate(f):
        if k > 1:
            full = np.repeat(full, k, axis=axis)
    cv.tis[...] = full[: cv.shape[0], : cv.shape[1], : cv.shape[2]]


def _drop_fragments(cv: _Canvas, max_mm3: float = 30.0) -> int:
    """Remove tiny disconnected pieces of vertebra instances (a few voxels left where a
    neighbour's process was painted over), so each vertebra is one connected component
    unless the field of view cuts it. Returns the number of voxels cleared."""
    import cc3d

    vert = (cv.ins > 0) & (cv.ins < 100)
    if not vert.any():
        return 0
    idx = [np.nonzero(vert.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1))]
    sl = tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)
    sub = np.where(vert[sl], cv.ins[sl], 0).astype(np.uint16)
    comp = cc3d.connected_components(sub, connectivity=26)
    sizes = np.bincount(comp.ravel())
    owner = np.zeros(len(sizes), np.int64)
    owner[comp.ravel()] = sub.ravel()
    best: dict[int, int] = {}
    for c in range(1, len(sizes)):
        v = int(owner[c])
        if v and (v not in best or sizes[c] > sizes[best[v]]):
            best[v] = c
    vox = float(abs(np.linalg.det(cv.affine[:3, :3])))
    small = np.zeros(len(sizes), bool)
    for c in range(1, len(sizes)):
        if sizes[c] * vox < max_mm3 and best.get(int(owner[c])) != c:
            small[c] = True
    drop = small[comp]
    if drop.any():
        cv.sem[sl][drop] = 0
        cv.ins[sl][drop] = 0
    return int(drop.sum())


def _add_cortex(cv: _Canvas) -> None:
    """Cortical shell: marrow voxels on the border of bone (within the bone bounding box)."""
    from scipy import ndimage

    bone = (cv.tis == Tissue.MARROW) | (cv.tis == Tissue.CORTEX)
    if not bone.any():
        return
    idx = np.nonzero(bone.any(axis=(1, 2)))[0], np.nonzero(bone.any(axis=(0, 2)))[0], np.nonzero(bone.any(axis=(0, 1)))[0]
    sl = tuple(slice(max(int(i[0]) - 1, 0), int(i[-1]) + 2) for i in idx)
    b = bone[sl]
    er = ndimage.binary_erosion(b, structure=ndimage.generate_binary_structure(3, 1), border_value=1)
    shell = b & ~er
    t = cv.tis[sl]
    t[shell & (t == Tissue.MARROW)] = Tissue.CORTEX


# --------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------
def _fov_range(spec: PhantomSpec) -> tuple[str, str]:
    if spec.fov not in FOV_PRESETS:
        raise ValueError(f"unknown fov {spec.fov!r}; choose one of {sorted(FOV_PRESETS)}")
    top, bottom = FOV_PRESETS[spec.fov]
    top = spec.top or top
    bottom = spec.bottom or bottom
    return top.upper() if top.lower() != "sacrum" else "SACRUM", bottom.upper() if bottom.lower() != "sacrum" else "SACRUM"


def _crop_box(lo: np.ndarray, hi: np.ndarray, crop: Any) -> tuple[np.ndarray, np.ndarray]:
    if not crop:
        return lo, hi
    lo, hi = lo.copy(), hi.copy()
    items = crop.items() if isinstance(crop, dict) else crop
    for key, mm in items:
        k = str(key).upper()
        if k not in _CODE_DIR:
            raise ValueError(f"crop keys are direction letters R/L/A/P/S/I, got {key!r}")
        d = np.array(_CODE_DIR[k])
        ax = int(np.nonzero(d)[0][0])
        if d[ax] > 0:
            hi[ax] -= float(mm)
        else:
            lo[ax] += float(mm)
    if np.any(hi <= lo):
        raise ValueError(f"crop {crop} leaves an empty field of view")
    return lo, hi


def _fov_world_box(spec: PhantomSpec, levels: list[_Level], curve: _Curve, s_sac: float, sac_len: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """World box (RAS mm, ``lo``, ``hi``) of the spec's field of view."""
    names = [lv.name for lv in levels] + ["SACRUM"]
    top, bottom = _fov_range(spec)
    if top == "C1" and not spec.has_c1:
        top_i = 0
    else:
        if top not in names or bottom not in names:
            raise ValueError(f"FOV {top}..{bottom} names a vertebra this phantom does not have ({names})")
        top_i = names.index(top)
    bot_i = names.index(bottom)
    if bot_i < top_i:
        raise ValueError(f"FOV top {top} is below bottom {bottom}")
    # world box of the field of view
    pts = []
    for lv in levels[top_i:bot_i + 1] if bot_i < len(levels) else levels[top_i:]:
        hx = max(lv.TPS / 2, lv.W / 2) + 8
        ylo = -(lv.D / 2 + 2 * lv.CD + lv.LT + lv.SPL + 30)
        yhi = lv.D / 2 + 40
        zex = lv.H / 2 + (18 if lv.name in ("C1", "C2") else 4)
        for cx in (-hx, hx):
            for cy in (ylo, yhi):
                for cz in (-zex, zex):
                    pts.append(lv.centre + lv.R @ np.array([cx, cy, cz]))
    if bot_i == len(levels):  # sacrum
        for d in np.linspace(0, sac_len + 12, 8):
            c, R = curve.frame(s_sac + d)
            for cx in (-58, 58):
                for cy in (-80, 45):
                    pts.append(c + R @ np.array([cx, cy, 0.0]))
    pts = np.array(pts)
    lo, hi = pts.min(0), pts.max(0)
    if spec.lr_half_width is not None:
        mid = (lo[0] + hi[0]) / 2
        lo[0], hi[0] = mid - spec.lr_half_width, mid + spec.lr_half_width
    if spec.ap_half_width is not None:  # a tight crop around the canal, as small-FOV scans have
        walls = [(lv.centre + lv.R @ np.array([0.0, -lv.D / 2, 0.0]))[1] for lv in levels[top_i:bot_i + 1]]
        mid = float(np.mean(walls)) if walls else (lo[1] + hi[1]) / 2
        lo[1], hi[1] = max(lo[1], mid - spec.ap_half_width), min(hi[1], mid + spec.ap_half_width)
    if top_i == 0:
        hi[2] += 20.0  # skull base above C1
    lo, hi = _crop_box(lo, hi, spec.crop)
    return lo, hi


def _layout(spec: PhantomSpec):
    """Everything about the phantom but its voxels: levels, subject parameters, centre-line,
    section tables and the field of view's world box (the random numbers in their order)."""
    if len(spec.spacing) != 3 or not all(float(s) > 0 and math.isfinite(float(s)) for s in spec.spacing):
        raise ValueError(f"spacing must be three positive numbers, got {spec.spacing}")
    rng = np.random.default_rng(spec.seed)
    levels, glob = _subject_params(spec, rng)
    _apply_deformities(levels, spec)
    curve, info = _build_curve(levels, spec, rng)
    s_sac, sac_len = info["s_sacrum"], info["sacrum_length"]
    tab, conus_end = _section_tables(levels, curve, s_sac, sac_len, glob)
    box = _fov_world_box(spec, levels, curve, s_sac, sac_len)
    return levels, glob, curve, info, tab, conus_end, box


def phantom_layout(spec: PhantomSpec) -> dict[str, Any]:
    """The geometry of ``spec``'s phantom without rasterising it (milliseconds): world body
    centres and frames, level sizes, the field of view's world box and the true endplates,
    as in ``Phantom.meta`` (for cutting stations or planning a field of view)."""
    levels, glob, curve, info, _tab, _conus, (lo, hi) = _layout(spec)
    return {"body_centres_world": {lv.name: lv.centre.tolist() for lv in levels},
            "body_frames_world": {lv.name: lv.R.tolist() for lv in levels},
            "level_dims_mm": {lv.name: dict(W=lv.W, D=lv.D, H=lv.H, disc_below=lv.DH) for lv in levels},
            "sacrum_top_world": curve.at(np.array(info["s_sacrum"]), curve.pos).tolist(),
            "sacrum_length_mm": info["sacrum_length"],
            "fov_world_box": [lo.tolist(), hi.tolist()],
            "endplates_world": _endplates_world(levels, curve, info["s_sacrum"]), "curve": info, "subject": glob}


def _build(spec: PhantomSpec, affine: Optional[np.ndarray] = None, shape: Optional[tuple[int, int, int]] = None,
           want_labels: bool = True):
    t0 = time.perf_counter()
    levels, glob, curve, info, tab, conus_end, (lo, hi) = _layout(spec)
    s_sac, sac_len = info["s_sacrum"], info["sacrum_length"]
    if affine is None:
        affine, shape = build_grid(lo, hi, spec.spacing, spec.orientation, spec.oblique_deg)
    assert shape is not None
    if int(np.prod(shape)) > MAX_VOXELS:
        raise ValueError(f"phantom grid {shape} exceeds {MAX_VOXELS} voxels; use a coarser spacing or a smaller FOV")
    cv = _Canvas(affine, shape, want_labels)
    t1 = time.perf_counter()
    _paint_soft(cv, curve, levels, tab, glob, s_sac)
    t2 = time.perf_counter()
    # posterior elements first (top to bottom), then canal/cord/sacrum, then bodies, endplates, discs
    for i, lv in enumerate(levels):
        above = levels[i - 1] if i > 0 else None
        below = levels[i + 1] if i + 1 < len(levels) else None
        if lv.name == "C1":
            _paint_c1(cv, lv, levels[1])
            continue
        if below is None:  # last lumbar: the sacrum below, give it an L5-like pseudo-level
            below = replace(lv, name="S1", value=26, s=s_sac + lv.H / 2, wedge=0.0, slip=0.0)
            below_is_sacrum = True
        else:
            below_is_sacrum = False
        _paint_posterior(cv, lv, above if (above is not None and above.name != "C1") else None, below, below_is_sacrum)
    # S1 superior articular processes (part of the sacrum)
    last = levels[-1]
    c_s1, R_s1 = curve.frame(s_sac + 14.0)
    s1 = replace(last, name="S1", value=26, s=s_sac + 14.0, centre=c_s1, R=R_s1, H=28.0, wedge=0.0, slip=0.0)
    jx, jy = _joint(last, s1)
    (sdx, sdy, srx, sry), _ = _facet_offsets("L")
    sl = cv.box(c_s1, R_s1, (-jx - 15, jy - 15, 0), (jx + 15, jy + 15, 14.0 + last.DH + 0.3 * last.H + 4))
    if sl is not None:
        x, y, z = cv.local(sl, c_s1, R_s1)
        for side in (1, -1):
            m = _pillar(x, y, z, side * (jx + sdx), jy + sdy, 0.0, 14.0 + last.DH + 0.28 * last.H, srx, sry)
            cv.paint(sl, m, L.SACRUM, 26, Tissue.MARROW)
    t3 = time.perf_counter()
    _paint_swept(cv, curve, tab, -60.0, s_sac + sac_len + 1, s_sac, sac_len, True)
    t4 = time.perf_counter()
    for i, lv in enumerate(levels):
        if lv.name == "C1":
            continue
        above = levels[i - 1] if i > 0 and levels[i - 1].name != "C1" else None
        below = levels[i + 1] if i + 1 < len(levels) else None
        ep_above = L.endplate_value(above.value) if above is not None else None
        ep_below = L.endplate_value(lv.value)  # every body from C2 down has a disc below (the last: L5/S1)
        _paint_body(cv, lv, ep_above, ep_below)
        if below is not None:
            _paint_disc(cv, lv, below)
    # last disc (L5/S1): lower plane = top plane of the sacrum (frame at the top of S1)
    c_top, R_top = curve.frame(s_sac)
    pseudo = replace(last, name="S1", value=26, s=s_sac + 10.0, centre=c_top - R_top[:, 2] * 10.0, R=R_top, H=20.0,
                     W=last.W * 1.02, D=last.D * 1.02, wedge=0.0, slip=0.0)
    _paint_disc(cv, last, pseudo)
    if want_labels:
        _drop_fragments(cv)
    _add_cortex(cv)
    t5 = time.perf_counter()
    timings = dict(setup=t1 - t0, soft=t2 - t1, posterior=t3 - t2, swept=t4 - t3, bodies=t5 - t4, total=t5 - t0)
    return cv, levels, curve, info, glob, conus_end, timings, (lo, hi)


def _endplates_world(levels: list[_Level], curve: _Curve, s_sacrum: float) -> dict[str, dict[str, Any]]:
    """The true endplate planes of every vertebral body (C2 down) and of S1 (the top of the
    sacrum), world mm: per level and side (``superior``/``inferior``) the unit ``normal``
    (pointing superiorly), the ``centre`` of the endplate and its mid-sagittal ``posterior``
    and ``anterior`` corners (S1's posterior corner is where the spinal canal meets it)."""
    out: dict[str, dict[str, Any]] = {}
    for lv in levels:
        if lv.name == "C1":
            continue
        tw = math.tan(math.radians(lv.wedge) / 2)
        sides = {}
        for side, sign in (("superior", 1.0), ("inferior", -1.0)):
            n = lv.R @ np.array([0.0, sign * tw, 1.0])
            corner = {k: lv.centre + lv.R @ np.array([0.0, y, sign * (lv.H / 2 - y * tw)])
                      for k, y in (("posterior", -lv.D / 2), ("anterior", lv.D / 2))}
            sides[side] = {"normal": (n / np.linalg.norm(n)).tolist(),
                           "centre": (lv.centre + lv.R[:, 2] * sign * lv.H / 2).tolist(),
                           **{k: v.tolist() for k, v in corner.items()}}
        out[lv.name] = sides
    c, R = curve.frame(s_sacrum)
    last = levels[-1]
    out["S1"] = {"superior": {"normal": R[:, 2].tolist(), "centre": c.tolist(),
                              "posterior": (c - R[:, 1] * last.D / 2).tolist(),
                              "anterior": (c + R[:, 1] * last.D / 2 * 1.05).tolist()}}
    return out


def make_phantom(spec: PhantomSpec, grid: Optional[tuple[np.ndarray, tuple[int, int, int]]] = None) -> Phantom:
    """Rasterise the phantom described by ``spec`` onto its own grid (see ``PhantomSpec``), or
    onto ``grid`` (``(affine, shape)``, e.g. one station of a whole-spine protocol: the same
    anatomy on any grid; ``meta["fov_world_box"]`` stays the spec's own field of view)."""
    cv, levels, curve, info, glob, conus_end, timings, box = _build(spec, *(grid or (None, None)))
    aff = cv.affine
    sem = Volume(cv.sem, aff)
    ins = Volume(cv.ins, aff.copy())
    tis = Volume(cv.tis, aff.copy())
    vox = float(abs(np.linalg.det(aff[:3, :3])))
    sem_counts = np.bincount(cv.sem.ravel(), minlength=256)
    ins_counts = np.bincount(cv.ins.ravel(), minlength=300)
    order = [lv.value for lv in levels if lv.labelled] + [26]
    lev_present = [v for v in order if ins_counts[v] > 0]
    conus_level = None
    for lv in levels:
        if lv.s - lv.H / 2 - (levels[levels.index(lv) - 1].DH if levels.index(lv) > 0 else 0) / 2 <= conus_end:
            conus_level = lv.name
    meta: dict[str, Any] = {
        "seed": spec.seed,
        "voxel_volume_mm3": vox,
        "semantic_volume_mm3": {int(v): float(c * vox) for v, c in enumerate(sem_counts) if c and v},
        "instance_volume_mm3": {int(v): float(c * vox) for v, c in enumerate(ins_counts) if c and v},
        "curve": {k: v for k, v in info.items()},
        "subject": glob,
        "conus_end_level": conus_level,
        "conus_end_world": curve.at(np.array(conus_end), curve.pos).tolist(),
        "body_centres_world": {lv.name: lv.centre.tolist() for lv in levels},
        "body_frames_world": {lv.name: lv.R.tolist() for lv in levels},  # columns: right, anterior, superior
        "canal_centre_offset_mm": {lv.name: _canal_centre_y(lv) for lv in levels},  # along the anterior axis
        "level_dims_mm": {lv.name: dict(W=lv.W, D=lv.D, H=lv.H, disc_below=lv.DH) for lv in levels},
        "sacrum_top_world": curve.at(np.array(info["s_sacrum"]), curve.pos).tolist(),
        "endplates_world": _endplates_world(levels, curve, info["s_sacrum"]),
        "deformities": {"slips_mm": {lv.name: lv.slip for lv in levels if lv.slip},
                        "wedges_deg": {lv.name: lv.wedge for lv in levels if lv.wedge}},
        "fov_world_box": [box[0].tolist(), box[1].tolist()],
        "timings_s": timings,
    }
    log.info("phantom seed=%d fov=%s shape=%s spacing=%s: %.2f s (%s)", spec.seed, spec.fov, cv.shape,
             tuple(spec.spacing), timings["total"], {k: round(v, 2) for k, v in timings.items()})
    side = Volume(np.where(cv.sem == L.ENDPLATE, cv.eps, 0).astype(np.uint8), aff.copy())
    return Phantom(spec=spec, semantic=sem, instance=ins, levels=lev_present, tissue=tis, meta=meta, endplate_side=side)
