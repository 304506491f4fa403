"""The per-scan QC figure: a mid-sagittal and a coronal overlay of the masks on the image,
side by side in one PNG (``FIGURE``: ``<stem>_desc-spine_dseg.png``).

Both panels are resampled in world space (RAS mm, superior up), so any orientation,
anisotropy or oblique affine shows the same way: the sagittal panel has anterior on the left,
the coronal panel the patient's right on the left (radiological convention). The planes are
*curved* through the vertebral-body centroids (the sagittal plane follows their left-right
position, the coronal plane their antero-posterior position, interpolated along the height), so
scoliotic and lordotic spines stay in view. Sagittal: semantic classes; coronal: vertebra /
disc instances (canal and cord in their semantic colours). Level names are written beside
the bodies. Colours come from ``spineps.labels``.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no display, no global state);
typical time 0.3-0.8 s per scan. Without an image (``image=None``) the masks are drawn on a
dark background, which is what the group report's benchmark uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from spineps.geometry.volume import Volume

__all__ = ["write_figure", "render_panels", "FIGURE_DPI", "PIXEL_MM"]

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


def _centroids(instance: Optional[Volume], semantic: Volume) -> dict[int, np.ndarray]:
    from spineps.labels import VERTEBRA_VALUES
    from spineps.postprocess.vertebrae import label_centroids

    if instance is None:
        return {}
    inst = np.asarray(instance.data)
    ids = [int(v) for v in np.unique(inst) if int(v) in VERTEBRA_VALUES]
    if not ids:
        return {}
    com, _ = label_centroids(inst, ids)  # one bincount pass over the labelled voxels
    A, t = instance.affine[:3, :3], instance.affine[:3, 3]
    return {v: A @ np.asarray(c) + t for v, c in zip(ids, com)}


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


def render_panels(semantic: Volume, instance: Optional[Volume], image: Optional[Volume] = None
                  ) -> dict[str, Any]:
    """The sampled panels: ``{"sagittal": {"image", "labels", "extent", "text"}, "coronal": ...}``
    (arrays rows = superior -> inferior). Exposed for tests."""
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
    cents = _centroids(instance, semantic)
    if cents:
        zs = np.array([c[2] for c in cents.values()])
        order = np.argsort(zs)
        cz = zs[order]
        cx = np.array([c[0] for c in cents.values()])[order]
        cy = np.array([c[1] for c in cents.values()])[order]
    else:
        mid = fg.mean(axis=0) @ A.T + t
        cz, cx, cy = np.array([mid[2]]), np.array([mid[0]]), np.array([mid[1]])
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
                        "text": text, "step": step}
    return panels


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


def write_figure(semantic: Volume, instance: Optional[Volume], path: Union[str, Path], *,
                 image: Optional[Volume] = None, title: str = "") -> Path:
    """Render the two panels into ``path`` (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from spineps.errors import OutputError
    from spineps.fsutil import atomic_path

    panels = render_panels(semantic, instance, image)
    sem_lut, inst_lut = _semantic_lut(), _instance_lut()
    sag, cor = panels["sagittal"], panels["coronal"]
    h_mm = sag["extent"][3] - sag["extent"][2]
    w_sag = abs(sag["extent"][1] - sag["extent"][0])
    w_cor = abs(cor["extent"][1] - cor["extent"][0])
    height_in = 7.0
    width_in = min(14.0, max(4.0, height_in * (w_sag + w_cor) / max(h_mm, 1.0) + 0.6))
    fig = Figure(figsize=(width_in, height_in), dpi=FIGURE_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 2, width_ratios=[max(w_sag, 1.0), max(w_cor, 1.0)], wspace=0.02,
                          left=0.01, right=0.99, top=0.95 if title else 0.99, bottom=0.01)
    for k, (panel, label) in enumerate(((sag, "sagittal (A left)"), (cor, "coronal (R left)"))):
        ax = fig.add_subplot(gs[0, k])
        rgb = _overlay_rgb(panel, sem_lut, inst_lut)
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
    if title:
        fig.suptitle(title, color="white", fontsize=10, y=0.985)
    p = Path(path)
    try:
        with atomic_path(p) as tmp:
            fig.savefig(str(tmp), format="png", dpi=FIGURE_DPI, facecolor="black")
    except OSError as exc:
        raise OutputError(f"cannot write figure: {exc.strerror or exc}", p) from exc
    return p
