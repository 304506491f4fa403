"""Whole-spine stations named as one spine: the stations of one BIDS session (``chunk-`` or
``run-`` of the same acquisition) put in one frame and the level naming run on the whole
spine, so that every station carries the same name for the same vertebra.

Inputs (:class:`Station`): each station's post-processed, still anonymous masks (vertebrae
1..N top to bottom, discs 100+k, endplates 200+k, sacrum 26; ``pipeline.postprocess_anonymous``)
and the world S-I range of its whole field of view.

1. **Order and contact.** The stations are ordered by the middle of their S-I ranges (RAS z,
   superior first). Two neighbours *overlap* when their ranges share more than
   ``ABUT_MM``, *abut* when the gap or overlap is at most ``ABUT_MM`` plus one voxel
   step, and have a *gap* otherwise; two that share more than ``REPEAT_FRACTION`` of the
   shorter one are the same region twice (a repeat, not stations).
2. **Alignment** (overlap): the header affines put both in one world frame; a patient who
   moved between stations leaves a residual translation ``t`` (applied to the lower
   station). The candidates for ``t`` are 0 and the differences of the centroids of
   vertebrae that neither station's border cuts (within ``MAX_SHIFT_MM``); each is scored by
   the fraction of the upper station's labelled voxels in the overlap that carry the same
   semantic label in the shifted lower one, minus ``SHIFT_PRIOR_PER_MM`` per mm of ``|t|``
   (the spine is nearly periodic: the header decides between one vertebra and the next); the
   best is refined by the mean difference of the matched whole vertebrae.
3. **Matching** (overlap): the lower station's instance mask sampled at the upper one's
   vertebra voxels in the overlap; two vertebrae are the same when each is the other's most
   frequent partner and they share at least ``MATCH_FRACTION`` of the smaller one's voxels
   there. Abutting stations: the vertebrae cut by the common border are matched by their
   footprints on it (cells of ``ABUT_CELL_MM``, the same share and mutual rule); when no
   vertebra touches it (the border runs through a disc) the lower station's top vertebra
   follows the upper one's lowest.
   The matched pairs give the index offset between the two stations (the majority; others
   are dropped with a warning).
4. **Naming.** The stations joined this way (a *chain*) are resampled (nearest neighbour)
   onto one RAS-aligned grid (the finest step along each world axis), each voxel from the
   station in which it lies deepest, the vertebrae numbered along the chain, and
   :func:`~spineps.labeling.levels.name_levels` runs once on that whole spine (every cue:
   C2 at the top, the sacrum at the bottom, ribs and sizes throughout). Each station's
   vertebra ``k`` gets the name of its chain index. A station that meets no other (a gap) is
   named alone, with a warning.

:class:`SessionNaming` records the order, the contacts, the offsets (mm, each station
relative to the top station of its chain), the matched vertebrae and which station
anchored the names (the one holding the decisive cue); ``as_dict`` is the sidecars'
``Stations`` section.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import BODY, SACRUM, vertebra_name
from spineps.labeling.levels import LevelNaming, name_levels

__all__ = ["Station", "StationLink", "SessionNaming", "name_session", "station_s_range", "ABUT_MM",
           "REPEAT_FRACTION", "MAX_SHIFT_MM"]

log = logging.getLogger(__name__)

#: stations whose S-I ranges meet within this (plus one voxel step) abut
ABUT_MM = 3.0
#: two stations sharing more than this fraction of the shorter range are a repeat
REPEAT_FRACTION = 0.8
#: the largest patient movement between stations looked for (mm)
MAX_SHIFT_MM = 30.0
#: score lost per mm of translation away from the headers (see the module text)
SHIFT_PRIOR_PER_MM = 0.004
#: matched vertebrae share at least this fraction of the smaller one's voxels in the overlap
MATCH_FRACTION = 0.3
#: the cells (mm) of the footprints on the common border of abutting stations
ABUT_CELL_MM = 2.0
#: whole vertebrae closer than this (mm) after the translation refine it
_REFINE_MM = 8.0
#: the most voxels of the overlap sampled to score a translation
_MAX_SAMPLES = 200_000


@dataclass
class Station:
    """One station: its name (e.g. the BIDS stem), its anonymous post-processed masks (any
    crop of the station's grid) and the world S-I range (RAS z, mm: bottom, top) of its whole
    field of view (:func:`station_s_range` of the uncropped grid)."""

    name: str
    semantic: Volume
    instance: Volume
    s_range: tuple[float, float]

    @property
    def n_vertebrae(self) -> int:
        v = np.asarray(self.instance.data)
        ids = np.unique(v[(v > 0) & (v < 100) & (v != SACRUM)])
        return int(ids.max()) if ids.size else 0

    @property
    def s_step(self) -> float:
        """The voxel step along S (mm)."""
        cols = np.abs(np.asarray(self.instance.affine)[2, :3])
        return float(cols.max())


def station_s_range(vol: Volume) -> tuple[float, float]:
    """World S (RAS z) range of a grid's field of view (voxel borders), bottom first."""
    shape = np.asarray(vol.shape, float)
    corners = np.array([[a, b, c] for a in (-0.5, shape[0] - 0.5) for b in (-0.5, shape[1] - 0.5)
                        for c in (-0.5, shape[2] - 0.5)])
    z = corners @ np.asarray(vol.affine)[2, :3] + float(vol.affine[2, 3])
    return float(z.min()), float(z.max())


@dataclass
class StationLink:
    """How two neighbouring stations (upper above lower) meet."""

    upper: str
    lower: str
    relation: str  # "overlap", "abut", "gap", "repeat"
    overlap_mm: float  # negative: a gap
    offset_mm: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # translation of the lower station
    matched: list[tuple[int, int]] = field(default_factory=list)  # (upper id, lower id), anonymous
    index_offset: Optional[int] = None  # upper id = lower id + index_offset; None: not joined
    agreement: float = float("nan")  # fraction of the overlap's labelled voxels that agree after the shift
    how: str = ""

    @property
    def joined(self) -> bool:
        return self.index_offset is not None


@dataclass
class SessionNaming:
    """The naming of a session's stations (see the module text)."""

    order: list[str]
    links: list[StationLink]
    namings: dict[str, LevelNaming]
    offsets: dict[str, list[float]]  # station -> translation (mm) into its chain's frame
    chains: list[list[str]]
    bases: dict[str, int]  # station -> index of its vertebra 1 along its chain, minus one
    anchored_by: dict[str, str]  # station -> the station whose cue anchored its chain's names
    warnings: list[str] = field(default_factory=list)

    def chain_of(self, name: str) -> list[str]:
        return next(c for c in self.chains if name in c)

    def as_dict(self, name: str) -> dict[str, Any]:
        """The ``Stations`` section of station ``name``'s sidecars."""
        chain = self.chain_of(name)
        names = {s: self.namings[s] for s in self.order}

        def level(s: str, k: int) -> str:
            v = names[s].mapping.get(k)
            return vertebra_name(v) if v else f"#{k}"

        links = [{"upper": lk.upper, "lower": lk.lower, "relation": lk.relation, "overlap_mm": round(lk.overlap_mm, 2),
                  "joined": lk.joined, "how": lk.how, "offset_mm": [round(float(x), 2) for x in lk.offset_mm],
                  "agreement": None if not math.isfinite(lk.agreement) else round(lk.agreement, 3),
                  "matched_vertebrae": [level(lk.upper, a) for a, _b in lk.matched]} for lk in self.links]
        return {"Stations": list(self.order), "NamedTogether": chain, "NamedAlone": len(chain) == 1,
                "AnchoredBy": self.anchored_by.get(name), "OffsetsMM": {s: self.offsets[s] for s in chain},
                "Links": links, "Warnings": list(self.warnings)}


# ------------------------------------------------------------------------------ pieces
def _world(vol: Volume, idx: np.ndarray) -> np.ndarray:
    return idx @ np.asarray(vol.affine)[:3, :3].T + np.asarray(vol.affine)[:3, 3]


def _voxels_of(vol: Volume, world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest voxel indices of world points on ``vol``'s grid and which lie inside it."""
    inv = np.linalg.inv(np.asarray(vol.affine))
    idx = np.rint(world @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(vol.shape)), axis=1)
    return idx, inside


def _centroids(st: Station) -> dict[int, tuple[np.ndarray, bool]]:
    """Vertebra id -> (body centroid in world mm, whole: not cut by the station's S borders)."""
    inst = np.asarray(st.instance.data)
    sem = np.asarray(st.semantic.data)
    vert = np.where((inst > 0) & (inst < 100) & (inst != SACRUM), inst, 0)
    out: dict[int, tuple[np.ndarray, bool]] = {}
    lo, hi = st.s_range
    margin = 1.5 * st.s_step
    for v in np.unique(vert[vert > 0]):
        idx = np.argwhere(vert == v)
        w = _world(st.instance, idx)
        body = sem[tuple(idx.T)] == BODY
        c = w[body].mean(0) if body.sum() >= 4 else w.mean(0)
        out[int(v)] = (c, bool(w[:, 2].min() > lo + margin and w[:, 2].max() < hi - margin))
    return out


# ------------------------------------------------------------------------------ alignment
def _overlap_points(up: Station, lo: Station, zone: tuple[float, float]) -> np.ndarray:
    """World positions of the upper station's labelled voxels in the S zone, subsampled."""
    sem = np.asarray(up.semantic.data)
    idx = np.argwhere(sem > 0)
    w = _world(up.semantic, idx)
    keep = (w[:, 2] >= zone[0]) & (w[:, 2] <= zone[1])
    w = w[keep]
    if len(w) > _MAX_SAMPLES:
        w = w[np.random.default_rng(0).choice(len(w), _MAX_SAMPLES, replace=False)]
    return w


class _Agreement:
    """The fraction of the upper station's labelled voxels ``pts`` (world) whose semantic label
    the lower station, translated by ``t``, has at the same place (among those inside its
    grid): the lower grid's continuous indices of ``pts`` are computed once, a translation
    shifts them all by one vector."""

    def __init__(self, up: Station, lo: Station, pts: np.ndarray):
        a_idx, _ = _voxels_of(up.semantic, pts)
        self.a = np.asarray(up.semantic.data)[tuple(a_idx.T)] if len(pts) else np.zeros(0)
        inv = np.linalg.inv(np.asarray(lo.semantic.affine))
        self.inv3 = inv[:3, :3]
        self.cont = pts @ inv[:3, :3].T + inv[:3, 3]
        self.data = np.asarray(lo.semantic.data)
        self.shape = np.asarray(self.data.shape)

    def __call__(self, t: np.ndarray) -> float:
        if not len(self.a):
            return float("nan")
        idx = np.rint(self.cont - self.inv3 @ t).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < self.shape), axis=1)
        if inside.sum() < 50:
            return float("nan")
        b = self.data[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        return float((self.a[inside] == b).mean())


def _refined(cu: dict[int, tuple[np.ndarray, bool]], cl: dict[int, tuple[np.ndarray, bool]], t: np.ndarray
             ) -> np.ndarray:
    """``t`` refined by the mean difference of whole vertebrae that lie within ``_REFINE_MM``."""
    diffs = []
    for ca, wa in cu.values():
        if not wa:
            continue
        near = [(float(np.linalg.norm(ca - (cb + t))), ca - cb) for cb, wb in cl.values() if wb]
        if near:
            d, diff = min(near, key=lambda x: x[0])
            if d <= _REFINE_MM:
                diffs.append(diff)
    return np.mean(diffs, axis=0) if diffs else t


def _search(agreement: _Agreement, grid: Sequence[np.ndarray], centre: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The best translation of ``centre + (dx, dy, dz)`` over the grid of offsets ``grid``
    (x, y, z values): (translation, score, agreement)."""
    best, best_score, best_agree = centre, -math.inf, float("nan")
    for dz in grid[2]:
        for dy in grid[1]:
            for dx in grid[0]:
                t = centre + np.array([dx, dy, dz])
                agree = agreement(t)
                score = (agree if math.isfinite(agree) else 0.0) - SHIFT_PRIOR_PER_MM * float(np.linalg.norm(t))
                if score > best_score:
                    best, best_score, best_agree = t, score, agree
    return best, best_score, best_agree


def _translation(up: Station, lo: Station, zone: tuple[float, float]) -> tuple[np.ndarray, float]:
    """The translation of the lower station onto the upper one and its agreement (see the
    module text, step 2): a coarse search (2 mm along S, 3 mm along A, within
    ``MAX_SHIFT_MM``), a fine one around its best (0.5 mm; 1.5 mm R-L), then the refinement
    by the whole vertebrae."""
    pts = _overlap_points(up, lo, zone)
    rng = np.random.default_rng(1)
    coarse, mid = (pts[rng.choice(len(pts), min(len(pts), k), replace=False)] if len(pts) else pts
                   for k in (5_000, 20_000))
    quick, full = _Agreement(up, lo, coarse), _Agreement(up, lo, pts)
    r = MAX_SHIFT_MM
    t, _, _ = _search(quick, (np.zeros(1), np.arange(-r / 3, r / 3 + 1e-6, 3.0), np.arange(-r, r + 1e-6, 2.0)),
                      np.zeros(3))
    fine = np.arange(-1.5, 1.6, 0.5)
    best, _, _ = _search(_Agreement(up, lo, mid), (np.arange(-3.0, 3.1, 1.5), fine, fine), t)
    best_agree = full(best)
    best_score = best_agree - SHIFT_PRIOR_PER_MM * float(np.linalg.norm(best)) if math.isfinite(best_agree) else 0.0
    ref = _refined(_centroids(up), _centroids(lo), best)
    agree = full(ref)
    if math.isfinite(agree) and agree - SHIFT_PRIOR_PER_MM * float(np.linalg.norm(ref)) >= best_score - 1e-9:
        return ref, agree
    return best, best_agree


def _matched_in_overlap(up: Station, lo: Station, zone: tuple[float, float], t: np.ndarray
                        ) -> list[tuple[int, int]]:
    """Vertebra pairs (upper id, lower id) sharing the overlap's voxels (step 3)."""
    inst = np.asarray(up.instance.data)
    idx = np.argwhere((inst > 0) & (inst < 100) & (inst != SACRUM))
    w = _world(up.instance, idx)
    keep = (w[:, 2] >= zone[0]) & (w[:, 2] <= zone[1])
    idx, w = idx[keep], w[keep]
    b_idx, inside = _voxels_of(lo.instance, w - t)
    a = inst[tuple(idx[inside].T)].astype(np.int64)
    b = np.asarray(lo.instance.data)[tuple(b_idx[inside].T)].astype(np.int64)
    b = np.where((b > 0) & (b < 100) & (b != SACRUM), b, 0)
    na = np.bincount(a, minlength=100)
    nb = np.bincount(b, minlength=100)
    pairs = np.bincount(a * 100 + b, minlength=100 * 100).reshape(100, 100)
    pairs[:, 0] = 0
    out = []
    for va in np.nonzero(na)[0]:
        vb = int(np.argmax(pairs[va]))
        if vb and int(np.argmax(pairs[:, vb])) == va and pairs[va, vb] >= MATCH_FRACTION * min(na[va], nb[vb]):
            out.append((int(va), vb))
    return out


def _border_footprints(st: Station, at_top: bool) -> dict[int, set[tuple[int, int]]]:
    """Vertebra id -> the cells (``ABUT_CELL_MM`` squares in world R-A) its voxels within 1.5
    voxel steps of the station's top (``at_top``) or bottom border cover."""
    inst = np.asarray(st.instance.data)
    idx = np.argwhere((inst > 0) & (inst < 100) & (inst != SACRUM))
    w = _world(st.instance, idx)
    lo, hi = st.s_range
    near = (w[:, 2] >= hi - 1.5 * st.s_step) if at_top else (w[:, 2] <= lo + 1.5 * st.s_step)
    vals = inst[tuple(idx[near].T)]
    cells = np.floor(w[near][:, :2] / ABUT_CELL_MM).astype(np.int64)
    return {int(v): {(int(a), int(b)) for a, b in cells[vals == v]} for v in np.unique(vals)}


def _matched_at_border(up: Station, lo: Station) -> list[tuple[int, int]]:
    """Vertebrae crossing the common border of abutting stations (step 3): the pairs whose
    footprints on the border overlap most, each the other's best, sharing at least
    ``MATCH_FRACTION`` of the smaller footprint."""
    a_fp, b_fp = _border_footprints(up, False), _border_footprints(lo, True)
    share = {(a, b): len(fa & fb) / max(min(len(fa), len(fb)), 1) for a, fa in a_fp.items() for b, fb in b_fp.items()}
    out = []
    for a in a_fp:
        cand = [(x, b) for (aa, b), x in share.items() if aa == a]
        if not cand:
            continue
        x, b = max(cand)
        best_a = max((y, aa) for (aa, bb), y in share.items() if bb == b)[1]
        if x >= MATCH_FRACTION and best_a == a:
            out.append((a, b))
    return out


def _contact(up: Station, lo: Station) -> tuple[str, float]:
    overlap = min(up.s_range[1], lo.s_range[1]) - max(up.s_range[0], lo.s_range[0])
    shorter = min(up.s_range[1] - up.s_range[0], lo.s_range[1] - lo.s_range[0])
    tol = ABUT_MM + max(up.s_step, lo.s_step)
    if overlap > REPEAT_FRACTION * shorter:
        return "repeat", overlap
    if overlap > tol:
        return "overlap", overlap
    return ("abut" if overlap >= -tol else "gap"), overlap


def _index_offset(link: StationLink, up: Station, lo: Station, warnings: list[str]) -> Optional[int]:
    """The majority index offset of the matched pairs (others dropped with a warning); with
    none matched, abutting or overlapping stations whose border runs through a disc follow
    on (the lower station's top vertebra is the one below the upper one's lowest)."""
    if link.matched:
        offsets = [a - b for a, b in link.matched]
        d = max(set(offsets), key=offsets.count)
        dropped = [p for p in link.matched if p[0] - p[1] != d]
        if dropped:
            warnings.append(f"{up.name} / {lo.name}: {len(dropped)} matched vertebra pair(s) out of order, ignored")
        link.matched = [p for p in link.matched if p[0] - p[1] == d]
        return d
    if not _border_footprints(up, False) and not _border_footprints(lo, True) and up.n_vertebrae and lo.n_vertebrae:
        link.how += "; no vertebra crosses the border: the lower station continues the upper one"
        return up.n_vertebrae
    return None


def link_stations(up: Station, lo: Station, warnings: list[str]) -> StationLink:
    """Contact, translation, matched vertebrae and index offset of two neighbours."""
    relation, overlap = _contact(up, lo)
    link = StationLink(up.name, lo.name, relation, overlap)
    if relation in ("gap", "repeat"):
        what = "a gap" if relation == "gap" else "the same region (a repeat, not stations)"
        warnings.append(f"{up.name} and {lo.name} do not meet ({what}, {overlap:.1f} mm): named alone")
        return link
    if relation == "overlap":
        zone = (max(up.s_range[0], lo.s_range[0]), min(up.s_range[1], lo.s_range[1]))
        t, agree = _translation(up, lo, zone)
        link.offset_mm, link.agreement = [float(x) for x in t], agree
        link.matched = _matched_in_overlap(up, lo, zone, t)
        link.how = "affines refined by the semantic agreement in the overlap; vertebrae matched by shared voxels"
    else:
        link.matched = _matched_at_border(up, lo)
        link.how = "affines; vertebrae matched by their footprints on the common border"
    link.index_offset = _index_offset(link, up, lo, warnings)
    if link.index_offset is None:
        warnings.append(f"{up.name} and {lo.name} meet but no vertebra could be matched: named alone")
    return link


# ------------------------------------------------------------------------------ naming
def _common_grid(stations: Sequence[Station], offsets: Sequence[np.ndarray]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A RAS-aligned grid over all stations (translated by ``offsets``), with the finest step
    along each world axis."""
    steps = np.full(3, np.inf)
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for st, off in zip(stations, offsets):
        aff = np.asarray(st.semantic.affine)
        for i in range(3):
            col = aff[:3, i]
            w = int(np.argmax(np.abs(col)))
            steps[w] = min(steps[w], float(np.linalg.norm(col)))
        shape = np.asarray(st.semantic.shape)
        corners = np.array([[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
        w = _world(st.semantic, corners) + off
        lo, hi = np.minimum(lo, w.min(0)), np.maximum(hi, w.max(0))
    steps = np.maximum(steps, 0.5)
    n = np.ceil((hi - lo) / steps).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = np.diag(steps)
    affine[:3, 3] = lo
    return affine, (int(n[0]), int(n[1]), int(n[2]))


def _lut(base: int) -> np.ndarray:
    """Anonymous station values -> chain values (vertebra ``k`` -> ``base + k``, discs and
    endplates likewise, the sacrum unchanged)."""
    lut = np.zeros(300, dtype=np.int32)
    for k in range(0, 100):
        if 0 < k < 100 and k != SACRUM and base + k < 100:
            lut[k] = base + k
        if base + k < 100:
            lut[100 + k] = 100 + base + k
            lut[200 + k] = 200 + base + k
    lut[SACRUM] = SACRUM
    return lut


def stitch(stations: Sequence[Station], offsets: Sequence[np.ndarray], bases: Sequence[int]
           ) -> tuple[Volume, Volume]:
    """The chain's semantic and (chain-numbered) instance masks on one grid: each voxel from
    the station in which it lies deepest (farthest from the station's S borders)."""
    affine, shape = _common_grid(stations, offsets)
    best = np.full(shape, -np.inf, np.float32)
    sem = np.zeros(shape, np.uint8)
    inst = np.zeros(shape, np.int16)
    inv = np.linalg.inv(affine)
    for st, off, base in zip(stations, offsets, bases):
        n = np.asarray(st.semantic.shape)
        corners = np.array([[a, b, c] for a in (0, n[0] - 1) for b in (0, n[1] - 1) for c in (0, n[2] - 1)])
        g = (_world(st.semantic, corners) + off) @ inv[:3, :3].T + inv[:3, 3]
        lo_i = np.maximum(np.floor(g.min(0)).astype(int) - 1, 0)
        hi_i = np.minimum(np.ceil(g.max(0)).astype(int) + 2, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))
        idx = np.indices(hi_i - lo_i).reshape(3, -1).T + lo_i
        local = idx @ affine[:3, :3].T + affine[:3, 3] - off
        vox, inside = _voxels_of(st.semantic, local)
        depth = np.minimum(local[:, 2] - st.s_range[0], st.s_range[1] - local[:, 2]).astype(np.float32)
        sub_best = best[box].reshape(-1)
        take = inside & (depth > sub_best)
        v = tuple(vox[take].T)
        s_sem, s_inst = sem[box].reshape(-1), inst[box].reshape(-1)
        s_sem[take] = np.asarray(st.semantic.data)[v]
        s_inst[take] = _lut(base)[np.asarray(st.instance.data)[v].astype(np.int64)]
        sub_best[take] = depth[take]
        sem[box], inst[box], best[box] = (x.reshape(hi_i - lo_i) for x in (s_sem, s_inst, sub_best))
    return Volume(sem, affine), Volume(inst, affine.copy())


def _anchor_station(chain: Sequence[Station], bases: Sequence[int], naming: LevelNaming) -> str:
    """The station holding the cue that decided the names: the sacrum (the bottom station), C2
    or a user anchor / count from the top (the top station); the soft cues use all."""
    rule = naming.rule_used.split("+")[0]
    if rule == "sacrum":
        return chain[-1].name
    if rule == "c2":
        k = int(naming.evidence.get("c2", {}).get("index", 0)) + 1
        for st, base in zip(chain, bases):
            if base < k <= base + st.n_vertebrae:
                return st.name
        return chain[0].name
    if rule in ("anchor", "count-from-top"):
        return chain[0].name
    if rule == "count-from-bottom":
        return chain[-1].name
    return "all (" + ", ".join(st.name for st in chain) + ")"


def _station_naming(whole: LevelNaming, base: int, n: int, extra_warnings: list[str]) -> LevelNaming:
    """Station vertebra ``k`` -> the whole spine's name of chain index ``base + k``."""
    mapping = {k: whole.mapping.get(base + k, 0) for k in range(1, n + 1)}
    above = whole.mapping.get(base) if base >= 1 else whole.above_top
    return LevelNaming(mapping, whole.rule_used, dict(whole.evidence, named_on="whole spine of the session"),
                       whole.confidence, list(whole.warnings) + extra_warnings, whole.variant, above,
                       list(whole.implausible))


def _name_chain(chain: list[Station], offsets: list[np.ndarray], bases: list[int], naming_kw: dict[str, Any],
                warnings: list[str]) -> tuple[dict[str, LevelNaming], str]:
    if len(chain) == 1:
        st = chain[0]
        return {st.name: name_levels(st.semantic, st.instance, **naming_kw)}, st.name
    sem, inst = stitch(chain, offsets, bases)
    whole = name_levels(sem, inst, **naming_kw)
    return ({st.name: _station_naming(whole, b, st.n_vertebrae, warnings) for st, b in zip(chain, bases)},
            _anchor_station(chain, bases, whole))


def _chains(order: list[Station], links: list[StationLink]
            ) -> list[tuple[list[Station], list[np.ndarray], list[int]]]:
    """The joined runs of stations with their offsets (into the run's top station's frame)
    and bases (chain index of each station's vertebra 1, minus one)."""
    chains = [([order[0]], [np.zeros(3)], [0])]
    for st, link in zip(order[1:], links):
        sts, offs, bases = chains[-1]
        if link.joined and bases[-1] + (link.index_offset or 0) + st.n_vertebrae < SACRUM:
            sts.append(st)
            offs.append(offs[-1] + np.asarray(link.offset_mm))
            bases.append(bases[-1] + int(link.index_offset or 0))
        else:
            chains.append(([st], [np.zeros(3)], [0]))
    return chains


def name_session(stations: Sequence[Station], *, rule: str = "auto", anchor: Optional[str] = None,
                 has_c1: bool = False) -> SessionNaming:
    """Name the vertebrae of a session's stations as one spine (see the module text)."""
    order = sorted(stations, key=lambda s: -(s.s_range[0] + s.s_range[1]))
    warnings: list[str] = []
    links = [link_stations(up, lo, warnings) for up, lo in zip(order, order[1:])]
    namings: dict[str, LevelNaming] = {}
    offsets: dict[str, list[float]] = {}
    bases_of: dict[str, int] = {}
    anchored: dict[str, str] = {}
    chains = _chains(order, links)
    for i, (chain, offs, bases) in enumerate(chains):
        # the user's "top vertebra" is the top of the session: the first chain's
        kw = {"rule": rule, "anchor": anchor if i == 0 else None, "has_c1": has_c1}
        named, anchor_name = _name_chain(chain, offs, bases, kw, warnings)
        namings.update(named)
        for st, off, base in zip(chain, offs, bases):
            offsets[st.name] = [round(float(x), 3) for x in off]
            bases_of[st.name] = base
            anchored[st.name] = anchor_name
    for w in warnings:
        log.warning("stations: %s", w)
    return SessionNaming([s.name for s in order], links, namings, offsets, [[s.name for s in c[0]] for c in chains],
                         bases_of, anchored, warnings)
