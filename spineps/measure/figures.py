"""The per-scan QC figure: a mid-sagittal and a coronal overlay of the masks on the image,
side by side in one PNG (``FIGURE``: ``<stem>_desc-spine_dseg.png``).

Both panels are resampled in world space (RAS mm, superior up), so any orientation,
anisotropy or oblique affine shows the same way: the sagittal panel has anterior on the left,
the coronal panel the patient's right on the left (radiological convention). The planes are
*curved* through the vertebra centroids (the sagittal plane follows their left-right
position, the coronal plane their antero-posterior position, interpolated along the height), so
scoliotic and lordotic spines stay in view; a sliver of a vertebra cut by the field of view
(``_SLIVER_FRACTION``) is labelled but does not steer them. Sagittal: semantic classes; coronal: vertebra /
disc instances (canal and cord in their semantic colours). Level names are written beside
the bodies. Colours come from ``spineps.labels``.

With the scan's spinal alignment (``alignment=``, the ``Alignment`` that the measurements
already hold; nothing is measured again) the sagittal panel shows the endplates of every
measured curve (kyphosis T4-T12, lordoses C2-C7, L1-L5, L1-S1: the lines from the
posterior to the anterior corner) with the angle and its level range beside them, the
coronal panel the end-vertebra endplates of the largest Cobb angle with its value, and a
block under the panels lists every one of these measures, its endplates, or ``n/a
(<reason>)`` where the field of view or the masks do not allow it.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no display, no global state);
typical time 0.3-0.8 s per scan. Without an image (``image=None``) the masks are drawn on a
dark background, which is what the group report's benchmark uses.
"""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from spineps.geometry.volume import Volume

__all__ = ["write_figure", "render_panels", "alignment_overlay", "OverlayLine", "OverlayText", "ALIGNMENT_COLORS",
           "FIGURE_DPI", "PIXEL_MM"]

log = logging.getLogger(__name__)

FIGURE_DPI = 100
#: sampling step of the panels (mm); coarser for large fields of view (at most _MAX_PIXELS rows)
PIXEL_MM = 0.6
_MAX_PIXELS = 900
_ALPHA = 0.45


def _hex_rgb(color: str) -> tuple[float, float, float]:
    c = color.lstrip("#")
    return int(c[0:2], 16) / 255.0, int(c[2:4], 16) / 255.0, int(c[4:6], 16) / 255.0


def _lut(values: Mapping[int, str], size: int) -> np.ndarray:
    lut = np.zeros((size, 4), np.float32)
    for v, col in values.items():
        if 0 < v < size:
            lut[v, :3] = _hex_rgb(col)
            lut[v, 3] = _ALPHA
    return lut


def _semantic_lut() -> np.ndarray:
    from spineps.labels import SEMANTIC

    return _lut({lab.value: lab.color for lab in SEMANTIC}, 256)


def _instance_lut() -> np.ndarray:
    from spineps.labels import instance_labels

    return _lut({lab.value: lab.color for lab in instance_labels()}, 300)


#: a vertebra with fewer voxels than this fraction of its larger neighbour's (a sliver at the
#: edge of the field of view, often only its posterior elements) does not steer the panels' planes
_SLIVER_FRACTION = 0.3


def _centroids(instance: Optional[Volume], semantic: Volume) -> tuple[dict[int, np.ndarray], set[int]]:
    """World centroids of the vertebra instances, and the slivers among them (see
    ``_SLIVER_FRACTION``; the sacrum is no neighbour to compare with)."""
    from spineps.labels import SACRUM, VERTEBRA_VALUES
    from spineps.postprocess.vertebrae import label_centroids

    if instance is None:
        return {}, set()
    inst = np.asarray(instance.data)
    ids = [int(v) for v in np.unique(inst) if int(v) in VERTEBRA_VALUES]
    if not ids:
        return {}, set()
    com, count = label_centroids(inst, ids)  # one bincount pass over the labelled voxels
    A, t = instance.affine[:3, :3], instance.affine[:3, 3]
    cents = {v: A @ np.asarray(c) + t for v, c in zip(ids, com)}
    n = dict(zip(ids, count))
    spine = sorted((v for v in ids if v != SACRUM), key=lambda v: -cents[v][2])
    slivers = set()
    for k, v in enumerate(spine):
        near = [n[w] for w in spine[max(k - 1, 0):k + 2] if w != v]
        if near and n[v] < _SLIVER_FRACTION * max(near):
            slivers.add(v)
    return cents, slivers


# ------------------------------------------------------------------------------ alignment overlay
#: line colour of each alignment measure (sagittal curves by level range, the coronal Cobb angle)
ALIGNMENT_COLORS: dict[str, str] = {"C2-C7": "#00e5ff", "T4-T12": "#ffd600", "L1-L5": "#76ff03",
                                    "L1-S1": "#ff9100", "cobb": "#ff4081"}
_NA_COLOR = "#9e9e9e"
#: how far (mm) from the endplate's centre an endplate line is looked for on the panel's labels
#: when the corners are not known (and, on the coronal panel, always: the planes carry no width)
_SEARCH_HALF_MM = 40.0
#: endplate lines are drawn this fraction of their length beyond each end
_LINE_EXTEND = 0.2


@dataclass(frozen=True)
class OverlayLine:
    """One endplate drawn on a panel: ``start`` / ``end`` in world mm (RAS); ``endplate``
    e.g. ``"L1 superior"``; ``measure`` the Alignment key, e.g. ``"L1-S1 spine lordosis_deg"``.
    ``clip``: the ends are to be found on the panel's labels (the plane's width is unknown)."""

    panel: str
    measure: str
    endplate: str
    vertebra: int
    centre: tuple[float, float, float]
    start: tuple[float, float, float]
    end: tuple[float, float, float]
    color: str
    clip: bool = False


@dataclass(frozen=True)
class OverlayText:
    """A text of the overlay: on a panel next to ``anchor`` (world mm), or in the block under
    the panels (``panel == "notes"``, ``anchor`` None)."""

    panel: str
    text: str
    color: str
    anchor: Optional[tuple[float, float, float]] = None
    measure: str = ""


def _curve_name(measure: str) -> str:
    return measure.replace("_deg", "")


def _pretty_range(level: str) -> str:
    return level.replace("-", "\u2013")


def _fmt_deg(x: float) -> str:
    return f"{x:.1f}\u00b0"


def _tuple(p: np.ndarray) -> tuple[float, float, float]:
    return float(p[0]), float(p[1]), float(p[2])


def _sagittal_line(plane: Any, measure: str, endplate: str, vertebra: int, color: str) -> OverlayLine:
    """The endplate from its posterior to its anterior corner (mid-sagittal, on the plane);
    without both corners, along its antero-posterior direction, to be clipped to the labels."""
    c = np.asarray(plane.centre, float)
    if plane.posterior_corner is not None and plane.anterior_corner is not None:
        return OverlayLine("sagittal", measure, endplate, vertebra, _tuple(c),
                           _tuple(np.asarray(plane.posterior_corner)), _tuple(np.asarray(plane.anterior_corner)), color)
    d = np.asarray(plane.anterior, float)
    return OverlayLine("sagittal", measure, endplate, vertebra, _tuple(c), _tuple(c - _SEARCH_HALF_MM * d),
                       _tuple(c + _SEARCH_HALF_MM * d), color, clip=True)


def _coronal_line(plane: Any, measure: str, endplate: str, vertebra: int, color: str) -> OverlayLine:
    """The endplate along its left-right direction (in the plane, across its antero-posterior
    one), to be clipped to the vertebra on the coronal panel."""
    c = np.asarray(plane.centre, float)
    lat = np.cross(np.asarray(plane.anterior, float), np.asarray(plane.normal, float))
    n = float(np.linalg.norm(lat))
    lat = lat / n if n > 1e-9 else np.array([1.0, 0.0, 0.0])
    if lat[0] < 0:  # patient's right -> left: the start lies on the right
        lat = -lat
    return OverlayLine("coronal", measure, endplate, vertebra, _tuple(c), _tuple(c + _SEARCH_HALF_MM * lat),
                       _tuple(c - _SEARCH_HALF_MM * lat), color, clip=True)


def _value(alignment: Any, level: str, measure: str) -> float:
    try:
        return float(alignment.get(level, "spine", measure))
    except KeyError:
        return float("nan")


def _plane_of(alignment: Any, name: str, side: str) -> Any:
    from spineps.labels import vertebra_value

    bp = alignment.planes.get(vertebra_value(name))
    return None if bp is None else bp.plane(side)


def _curve_overlays(alignment: Any) -> tuple[list[OverlayLine], list[OverlayText]]:
    """The sagittal endplate lines, tags and notes of every curve of ``CURVES``."""
    from spineps.labels import vertebra_value
    from spineps.measure.alignment import CURVES

    lines: list[OverlayLine] = []
    texts: list[OverlayText] = []
    for rng, measure, (un, us), (ln, ls), _sign in CURVES:
        key = f"{rng} spine {measure}"
        label = f"{_curve_name(measure)} {_pretty_range(rng)}"
        x = _value(alignment, rng, measure)
        upper, lower = _plane_of(alignment, un, us), _plane_of(alignment, ln, ls)
        if not math.isfinite(x) or upper is None or lower is None:
            why = alignment.not_measured.get(key, "not measured")
            texts.append(OverlayText("notes", f"{label} n/a ({why})", _NA_COLOR))
            continue
        color = ALIGNMENT_COLORS[rng]
        up = _sagittal_line(upper, key, f"{un} {us}", vertebra_value(un), color)
        lo = _sagittal_line(lower, key, f"{ln} {ls}", vertebra_value(ln), color)
        lines += [up, lo]
        texts.append(OverlayText("sagittal", f"{label} {_fmt_deg(x)}", color, lo.start, key))
        texts.append(OverlayText("notes", f"{label} {_fmt_deg(x)} ({alignment.used.get(key, '')})", color))
    return lines, texts


def _cobb_overlays(alignment: Any) -> tuple[list[OverlayLine], list[OverlayText]]:
    """The coronal end-vertebra endplate lines, tag and note of the largest Cobb angle."""
    from spineps.labels import vertebra_value

    cobb = _value(alignment, "all", "cobb_deg")
    ends = alignment.cobb
    if not (math.isfinite(cobb) and ends.get("upper_end_vertebra") and ends.get("lower_end_vertebra")):
        why = alignment.not_measured.get("all spine cobb_deg", "not measured")
        return [], [OverlayText("notes", f"Cobb n/a ({why})", _NA_COLOR)]
    lines: list[OverlayLine] = []
    texts: list[OverlayText] = []
    u, b = ends["upper_end_vertebra"], ends["lower_end_vertebra"]
    pu, pb = _plane_of(alignment, u, "superior"), _plane_of(alignment, b, "inferior")
    label = f"Cobb {u}\u2013{b} {_fmt_deg(cobb)}"
    color = ALIGNMENT_COLORS["cobb"]
    if pu is not None and pb is not None:
        key = "all spine cobb_deg"
        lu = _coronal_line(pu, key, f"{u} superior", vertebra_value(u), color)
        lb = _coronal_line(pb, key, f"{b} inferior", vertebra_value(b), color)
        lines += [lu, lb]
        mid = tuple((np.asarray(lu.centre) + np.asarray(lb.centre)) / 2)
        texts.append(OverlayText("coronal", label, color, (float(mid[0]), float(mid[1]), float(mid[2])), key))
    used = alignment.used.get("all spine cobb_deg", "")
    texts.append(OverlayText("notes", f"{label} (apex {ends.get('apex', '?')}, convex "
                                      f"{ends.get('convexity', '?')}; {used})", color))
    return lines, texts


def _session_note(session_values: Sequence[Any]) -> list[OverlayText]:
    parts = []
    for lv in session_values:
        if lv.structure != "spine":
            continue
        name = "Cobb" if lv.measure == "cobb_deg" else f"{_curve_name(lv.measure)} {_pretty_range(lv.level)}"
        parts.append(f"{name} {_fmt_deg(lv.value) if math.isfinite(lv.value) else 'n/a'}")
    if not parts:
        return []
    return [OverlayText("notes", "session (stations together, as in the morphometry TSV): " + "; ".join(parts),
                        "#dddddd")]


def alignment_overlay(alignment: Any, session_values: Optional[Sequence[Any]] = None
                      ) -> tuple[list[OverlayLine], list[OverlayText]]:
    """The lines and texts that show ``alignment`` (``spineps.measure.alignment.Alignment``)
    on the figure: on the sagittal panel the endplates of every measured curve
    (``CURVES``: kyphosis T4-T12, lordoses C2-C7, L1-L5, L1-S1) with its value and level range
    beside its lower endplate, on the coronal panel the end-vertebra endplates of the largest
    Cobb angle with its value; and one note per measure for the block under the panels, its
    value and endplates or ``n/a (<reason>)``. ``session_values``: the session's level-range
    rows (``LevelValue``, structure ``spine``) of a station whose whole-spine measures are
    those of its session's stations together (one more note). Nothing here reads a volume."""
    lines, texts = _curve_overlays(alignment)
    cobb_lines, cobb_texts = _cobb_overlays(alignment)
    return lines + cobb_lines, texts + cobb_texts + (_session_note(session_values) if session_values else [])


def _sample(vol: Volume, pts: np.ndarray, order: int, cval: float) -> np.ndarray:
    from scipy import ndimage

    inv = np.linalg.inv(vol.affine)
    vox = pts @ inv[:3, :3].T + inv[:3, 3]
    data = np.asarray(vol.data)
    if order == 0:
        idx = np.rint(vox).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(data.shape)), axis=1)
        out = np.full(len(pts), cval, dtype=data.dtype if data.dtype.kind in "iu" else np.float32)
        out[ok] = data[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        return out
    return ndimage.map_coordinates(data.astype(np.float32, copy=False), vox.T, order=1, mode="constant", cval=cval)


def _steering_line(centres: Sequence[np.ndarray], fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World S, R and A of the line the panels follow: the vertebra centroids sorted by S (or
    the labelled voxels' mean)."""
    if not centres:
        return np.array([fallback[2]]), np.array([fallback[0]]), np.array([fallback[1]])
    c = np.asarray(centres, float)
    c = c[np.argsort(c[:, 2])]
    return c[:, 2], c[:, 0], c[:, 1]


def render_panels(semantic: Volume, instance: Optional[Volume], image: Optional[Volume] = None, *,
                  alignment: Any = None, session_values: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """The sampled panels: ``{"sagittal": {"image", "labels", "extent", "text", "lines", "tags"},
    "coronal": ..., "notes": [(text, colour), ...]}`` (arrays rows = superior -> inferior).
    ``alignment``: the scan's ``Alignment`` (as measured, not recomputed here): its overlay
    (:func:`alignment_overlay`) projected onto the panels, ``lines`` with their ends in panel
    coordinates (``hz``: horizontal and vertical mm as the panel's extent) and pixels (``rc``:
    row, column of ``labels``), ``tags`` the texts beside them, ``notes`` the block under the
    panels. Exposed for tests."""
    from spineps.labels import VERTEBRA_ORDER, vertebra_name

    sem = np.asarray(semantic.data)
    fg = np.argwhere(sem > 0)
    if not len(fg):
        src = image if image is not None else semantic
        fg = np.array([[0, 0, 0], [s - 1 for s in src.shape]])
    A, t = semantic.affine[:3, :3], semantic.affine[:3, 3]
    # world bounding box of the labelled voxels (corners of the index box suffice)
    lo_i, hi_i = fg.min(axis=0), fg.max(axis=0)
    corners = np.array([[a, b, c] for a in (lo_i[0], hi_i[0]) for b in (lo_i[1], hi_i[1]) for c in (lo_i[2], hi_i[2])])
    w = corners @ A.T + t
    lo_w, hi_w = w.min(axis=0) - 12.0, w.max(axis=0) + 12.0
    cents, slivers = _centroids(instance, semantic)
    cz, cx, cy = _steering_line([c for v, c in cents.items() if v not in slivers], fg.mean(axis=0) @ A.T + t)
    span = float(max(hi_w[2] - lo_w[2], hi_w[1] - lo_w[1], hi_w[0] - lo_w[0]))
    step = max(PIXEL_MM, span / _MAX_PIXELS, min(semantic.spacing) * 0.5)
    zz = np.arange(hi_w[2], lo_w[2], -step)  # superior first
    panels: dict[str, Any] = {}
    for name, horiz, (h_lo, h_hi) in (("sagittal", 1, (hi_w[1], lo_w[1])), ("coronal", 0, (hi_w[0], lo_w[0]))):
        hh = np.arange(h_lo, h_hi, -step if h_hi < h_lo else step)
        H, Z = np.meshgrid(hh, zz)
        pts = np.zeros(H.shape + (3,))
        pts[..., 2] = Z
        pts[..., horiz] = H
        other = 0 if horiz == 1 else 1
        pts[..., other] = np.interp(Z, cz, cx if other == 0 else cy)
        flat = pts.reshape(-1, 3)
        img = _sample(image, flat, 1, 0.0).reshape(H.shape) if image is not None else None
        if name == "sagittal" or instance is None:
            lab = _sample(semantic, flat, 0, 0).reshape(H.shape)
            kind = "semantic"
        else:
            lab_i = _sample(instance, flat, 0, 0).reshape(H.shape).astype(np.int32)
            lab_s = _sample(semantic, flat, 0, 0).reshape(H.shape).astype(np.int32)
            lab = np.where(lab_i > 0, lab_i, np.where(np.isin(lab_s, (60, 61)), 1000 + lab_s, 0))
            kind = "instance"
        text = []
        pos = {v: i for i, v in enumerate(VERTEBRA_ORDER)}
        for v, c in sorted(cents.items(), key=lambda kv: pos.get(kv[0], 99)):
            text.append((vertebra_name(v), float(c[horiz]), float(c[2])))
        panels[name] = {"image": img, "labels": lab, "kind": kind, "extent": (hh[0], hh[-1], zz[-1], zz[0]),
                        "text": text, "step": step, "lines": [], "tags": [],
                        "grid": (float(hh[0]), float(hh[1] - hh[0]) if len(hh) > 1 else step, float(zz[0]), step,
                                 horiz)}
    panels["notes"] = []
    if alignment is not None:
        lines, texts = alignment_overlay(alignment, session_values)
        _project_overlay(panels, lines, texts)
    return panels


def _panel_point(panel: Mapping[str, Any], p: Union[Sequence[float], np.ndarray]) -> tuple[float, float, float, float]:
    """A world point (mm) on a panel: its horizontal and vertical coordinates (mm, as the
    centroid labels) and its (fractional) row and column."""
    h0, dh, z0, step, horiz = panel["grid"]
    h, z = float(p[horiz]), float(p[2])
    return h, z, (z0 - z) / step, (h - h0) / dh


_BONE_OR_DISC = (49, 52, 53, 62, 100, 26)  # body, endplates, disc, sacrum (semantic values)


def _clip_line(panel: Mapping[str, Any], line: OverlayLine) -> tuple[np.ndarray, np.ndarray]:
    """The ends (world mm) of ``line`` cut to the run of the endplate's vertebra (instance
    panel: the vertebra, its discs and endplates; semantic panel: body, endplate, disc or sacrum
    classes) through its centre, read on the panel's labels (a few hundred look-ups). Where the
    centre lies on none of them, a 15 mm half-length."""
    c, a, b = (np.asarray(x, float) for x in (line.centre, line.start, line.end))
    if not line.clip:
        return a, b
    lab = np.asarray(panel["labels"])
    n = max(int(np.linalg.norm(b - a) / (0.5 * panel["step"])), 2)
    t = np.linspace(0.0, 1.0, n)
    pts = a + t[:, None] * (b - a)
    rc = np.array([_panel_point(panel, p)[2:] for p in pts])
    idx = np.rint(rc).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(lab.shape)), axis=1)
    vals = np.zeros(n, np.int64)
    vals[inside] = lab[idx[inside, 0], idx[inside, 1]]
    if panel["kind"] == "instance":
        ok = (vals == line.vertebra) | ((vals >= 100) & (vals < 300))
    else:
        ok = np.isin(vals, _BONE_OR_DISC)
    k = int(np.argmin(np.linalg.norm(pts - c, axis=1)))
    near = np.flatnonzero(ok & (np.abs(np.arange(n) - k) <= max(2, int(3.0 / (0.5 * panel["step"])))))
    if not len(near):
        d = (b - a) / max(float(np.linalg.norm(b - a)), 1e-9)
        return c - 15.0 * d, c + 15.0 * d
    k = int(near[np.argmin(np.abs(near - k))])
    lo = hi = k
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < n - 1 and ok[hi + 1]:
        hi += 1
    return pts[lo], pts[hi]


def _project_overlay(panels: dict[str, Any], lines: Sequence[OverlayLine], texts: Sequence[OverlayText]) -> None:
    for line in lines:
        panel = panels[line.panel]
        a, b = _clip_line(panel, line)
        pa, pb = _panel_point(panel, a), _panel_point(panel, b)
        panel["lines"].append({"measure": line.measure, "endplate": line.endplate, "color": line.color,
                               "world": (a, b), "hz": (pa[:2], pb[:2]), "rc": (pa[2:], pb[2:])})
    for tx in texts:
        if tx.panel == "notes" or tx.anchor is None:
            panels["notes"].append((tx.text, tx.color))
            continue
        panel = panels[tx.panel]
        h, z = _panel_point(panel, tx.anchor)[:2]
        mine = [ln for ln in panel["lines"] if ln["measure"] == tx.measure]
        if tx.panel == "sagittal":
            mine = mine[-1:]  # the lower endplate
        ends = [e[0] for ln in mine for e in ln["hz"]]
        if ends:  # sagittal: its posterior end (the panel's right); coronal: the patient-right ends (left)
            right = panel["grid"][1] > 0
            if tx.panel == "sagittal":
                h = max(ends) if right else min(ends)
            else:
                h = min(ends) if right else max(ends)
        panel["tags"].append((tx.text, tx.color, h, z))


def _overlay_rgb(panel: dict[str, Any], sem_lut: np.ndarray, inst_lut: np.ndarray) -> np.ndarray:
    lab = np.asarray(panel["labels"]).astype(np.int64)
    img = panel["image"]
    if img is not None:
        lo, hi = np.percentile(img, [1.0, 99.5]) if img.size else (0.0, 1.0)
        g = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    else:
        g = np.where(lab > 0, 0.35, 0.08)
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
    if panel["kind"] == "semantic":
        rgba = sem_lut[np.clip(lab, 0, 255)]
    else:
        rgba = np.zeros(lab.shape + (4,), np.float32)
        m = (lab > 0) & (lab < 300)
        rgba[m] = inst_lut[lab[m]]
        t = lab >= 1000
        rgba[t] = sem_lut[np.clip(lab[t] - 1000, 0, 255)]
    a = rgba[..., 3:4] if img is not None else np.where(rgba[..., 3:4] > 0, 0.85, 0.0)
    return rgb * (1 - a) + rgba[..., :3] * a


def _draw_alignment(ax: Any, panel: Mapping[str, Any], k: int, mm_per_px: float) -> None:
    """The endplate lines of a panel (a second line on the same endplate dashed over the first,
    so both colours show) and their tags, pushed apart vertically so that none overlap."""
    from matplotlib import patheffects

    outline = [patheffects.Stroke(linewidth=3.6, foreground="black"), patheffects.Normal()]
    seen: set[str] = set()
    for ln in panel["lines"]:
        a, b = (np.asarray(e, float) for e in ln["hz"])
        a, b = a - _LINE_EXTEND * (b - a), b + _LINE_EXTEND * (b - a)  # drawn a little beyond the corners
        dashed = ln["endplate"] in seen  # the same endplate for a second measure: dashed over the first
        seen.add(ln["endplate"])
        ax.plot([a[0], b[0]], [a[1], b[1]], color=ln["color"], linewidth=2.0, solid_capstyle="butt",
                linestyle=(0, (3, 3)) if dashed else "-", path_effects=None if dashed else outline)
    x0, x1 = panel["extent"][:2]
    s = 1.0 if x1 > x0 else -1.0
    gap = 12.0 * mm_per_px
    last = math.inf
    box = {"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.6, "linewidth": 0}
    for i, (text, color, h, z) in enumerate(sorted(panel["tags"], key=lambda tg: -tg[3])):
        if k == 0:  # posterior of the lower endplate (the level names are anterior), apart from each other
            z = min(z, last - gap)
            last = z
            ax.text(h + s * 4.0, z, text, color=color, fontsize=7.5, fontweight="bold", ha="left", va="center",
                    clip_on=True, bbox=box)
        else:  # the coronal panel is narrow: in its top-left corner
            ax.text(0.02, 0.99 - 0.03 * i, text, transform=ax.transAxes, color=color, fontsize=7.5,
                    fontweight="bold", ha="left", va="top", bbox=box)


def _draw_panel(ax: Any, panel: Mapping[str, Any], label: str, k: int, rgb: np.ndarray, mm_per_px: float) -> None:
    """One panel (``k`` 0: sagittal, 1: coronal): the overlay, its label, the level names and
    the alignment lines."""
    x0, x1, z0, z1 = panel["extent"]
    ax.imshow(rgb, extent=(x0, x1, z0, z1), interpolation="nearest", aspect="equal")
    ax.set_xlim(x0, x1)
    ax.set_ylim(z0, z1)
    ax.set_axis_off()
    ax.text(0.02, 0.01, label, transform=ax.transAxes, color="#bbbbbb", fontsize=8, va="bottom")
    for name, hpos, zpos in panel["text"]:
        if k == 0:  # anterior of the body (anterior is on the left: larger y)
            xpos, ha = hpos + 30.0, "right"
        else:  # the patient's left of the body (right side of the panel)
            xpos, ha = hpos - 24.0 if x0 > x1 else hpos + 24.0, "left"
        ax.text(xpos, zpos, name, color="white", fontsize=9, fontweight="bold", ha=ha, va="center",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.55, "linewidth": 0})
    _draw_alignment(ax, panel, k, mm_per_px)


def write_figure(semantic: Volume, instance: Optional[Volume], path: Union[str, Path], *,
                 image: Optional[Volume] = None, title: str = "", alignment: Any = None,
                 session_values: Optional[Sequence[Any]] = None) -> Path:
    """Render the two panels into ``path`` (PNG, written atomically). ``alignment``: the
    scan's measured ``Alignment`` (``Measurements.alignment``): its endplate lines and angles
    on the panels and its measures (values or ``n/a (reason)``) in a block under them;
    ``session_values``: the session's level-range rows for a station of a session."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from spineps.errors import OutputError
    from spineps.fsutil import atomic_path

    panels = render_panels(semantic, instance, image, alignment=alignment, session_values=session_values)
    sem_lut, inst_lut = _semantic_lut(), _instance_lut()
    sag, cor = panels["sagittal"], panels["coronal"]
    h_mm = sag["extent"][3] - sag["extent"][2]
    w_sag = abs(sag["extent"][1] - sag["extent"][0])
    w_cor = abs(cor["extent"][1] - cor["extent"][0])
    height_in = 7.0
    width_in = min(14.0, max(4.0, height_in * (w_sag + w_cor) / max(h_mm, 1.0) + 0.6))
    wrap = max(40, int(width_in * 15))
    notes = [(chunk, color) for text, color in panels["notes"]
             for chunk in textwrap.wrap(text, wrap, subsequent_indent="    ")]
    notes_in = 0.14 * len(notes) + 0.08 if notes else 0.0
    total_in = height_in + notes_in
    fig = Figure(figsize=(width_in, total_in), dpi=FIGURE_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    top = 1.0 - (0.05 if title else 0.01) * height_in / total_in
    bottom = (notes_in + 0.01 * height_in) / total_in
    gs = fig.add_gridspec(1, 2, width_ratios=[max(w_sag, 1.0), max(w_cor, 1.0)], wspace=0.02,
                          left=0.01, right=0.99, top=top, bottom=bottom)
    mm_per_px = max(h_mm, 1.0) / max((top - bottom) * total_in * FIGURE_DPI, 1.0)
    for k, (panel, label) in enumerate(((sag, "sagittal (A left)"), (cor, "coronal (R left)"))):
        _draw_panel(fig.add_subplot(gs[0, k]), panel, label, k, _overlay_rgb(panel, sem_lut, inst_lut), mm_per_px)
    for i, (text, color) in enumerate(notes):
        fig.text(0.01, (notes_in - 0.06 - 0.14 * i) / total_in, text, color=color, fontsize=7.5, va="top",
                 ha="left")
    if title:
        fig.suptitle(title, color="white", fontsize=10, y=1.0 - 0.015 * height_in / total_in)
    p = Path(path)
    try:
        with atomic_path(p) as tmp:
            fig.savefig(str(tmp), format="png", dpi=FIGURE_DPI, facecolor="black")
    except OSError as exc:
        raise OutputError(f"cannot write figure: {exc.strerror or exc}", p) from exc
    return p
