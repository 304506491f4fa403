"""Exact-geometry phantoms for the measurement tests: a straight column of wedge-shaped
vertebral bodies (with endplate layers), cylindrical discs, an elliptic spinal canal with a
round cord and a posterior arch per vertebra, laid along an oblique spine axis and
rasterised (voxel centres) on an anisotropic, oblique grid. Every true size is known in
closed form (``ColumnPhantom.truth``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import ARCUS, BODY, CANAL, CORD, DISC, ENDPLATE

__all__ = ["ColumnPhantom", "make_column", "rotation"]


def rotation(axis, deg: float) -> np.ndarray:
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = math.radians(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


@dataclass
class ColumnPhantom:
    semantic: Volume
    instance: Volume
    truth: dict = field(default_factory=dict)


def make_column(*, levels=(20, 21, 22, 23), spacing=(0.7, 0.7, 2.5), spine_tilt_deg=18.0,
                grid_oblique_deg=12.0, body_h_post=26.0, body_h_ant=22.0, body_depth=32.0, body_width=42.0,
                disc_h=9.0, disc_radius=(19.0, 14.0), canal_axes=(10.0, 7.0), cord_radius=4.0,
                endplate_mm=1.5, cord_levels=None) -> ColumnPhantom:
    """Bodies are wedges: height ``body_h_post`` at the posterior wall falling linearly to
    ``body_h_ant`` at the anterior wall (the anterior, middle, posterior strips at 85 %, 50 %,
    15 % of the depth have heights that follow exactly). ``spacing`` is along the array axes
    (A-P, S-I, R-L roughly, like a sagittal scan); the grid is rotated by ``grid_oblique_deg``
    and the spine axis tilted by ``spine_tilt_deg`` (about R, then a third of it about A)."""
    # local frame of the spine: x right, y anterior, z superior
    R_sp = rotation((0, 1, 0), spine_tilt_deg / 3) @ rotation((1, 0, 0), spine_tilt_deg)
    ez = R_sp[:, 2]
    step = 0.5 * (body_h_post + body_h_ant) + disc_h  # centre to centre along the axis
    n = len(levels)
    zs = [(n - 1 - i) * step for i in range(n)]  # top first
    canal_y = -(body_depth / 2 + 4.0 + canal_axes[1])

    # grid: sagittal-like axes (P, I, R) rotated, anisotropic spacing
    base = np.column_stack([[0, -1, 0], [0, 0, -1], [1, 0, 0]]).astype(float)  # P, I, R
    Rg = rotation((1, 0, 0), grid_oblique_deg) @ rotation((0, 0, 1), grid_oblique_deg / 2) @ base
    A = Rg * np.asarray(spacing, float)
    # the world box to cover (local coordinates -> world)
    lo_l = np.array([-body_width / 2 - 8, canal_y - canal_axes[1] - 14, zs[-1] - step])
    hi_l = np.array([body_width / 2 + 8, body_depth / 2 + 8, zs[0] + step])
    corners = np.array([[a, b, c] for a in (lo_l[0], hi_l[0]) for b in (lo_l[1], hi_l[1]) for c in (lo_l[2], hi_l[2])])
    world_c = corners @ R_sp.T
    inv = np.linalg.inv(A)
    vox_c = world_c @ inv.T
    vmin = np.floor(vox_c.min(axis=0))
    vmax = np.ceil(vox_c.max(axis=0))
    shape = tuple(int(x) for x in (vmax - vmin + 1))
    t = A @ vmin
    aff = np.eye(4)
    aff[:3, :3] = A
    aff[:3, 3] = t
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    idx = np.stack([ii, jj, kk], axis=-1).reshape(-1, 3).astype(float)
    loc = (idx @ A.T + t) @ R_sp
    x, y, z = loc[:, 0], loc[:, 1], loc[:, 2]
    sem = np.zeros(len(loc), np.uint8)
    ins = np.zeros(len(loc), np.uint16)
    truth: dict = {"body": {}, "disc": {}, "canal": {}, "cord": {}, "centres": {}}
    frac = (y + body_depth / 2) / body_depth  # 0 posterior wall .. 1 anterior wall
    cord_levels = set(levels if cord_levels is None else cord_levels)
    for i, v in enumerate(levels):
        zc = zs[i]
        h = body_h_post + (body_h_ant - body_h_post) * frac
        inside = (np.abs(x) <= body_width / 2) & (np.abs(y) <= body_depth / 2) & (np.abs(z - zc) <= h / 2)
        ep = inside & (np.abs(z - zc) > h / 2 - endplate_mm)
        sem[inside] = BODY
        ins[inside] = v
        sem[ep] = ENDPLATE
        truth["centres"][v] = zc
        truth["body"][v] = {f"height_{k}_mm": body_h_post + (body_h_ant - body_h_post) * f
                            for k, f in (("posterior", 0.15), ("middle", 0.5), ("anterior", 0.85))}
        truth["body"][v]["depth_mm"] = body_depth
        truth["body"][v]["volume_mm3"] = body_width * body_depth * 0.5 * (body_h_post + body_h_ant)
        # posterior arch behind the canal
        arch = (np.abs(x) <= 12) & (y < canal_y - canal_axes[1] - 1) & (y >= canal_y - canal_axes[1] - 9) & \
               (np.abs(z - zc) <= 8)
        sem[arch] = ARCUS
        ins[arch] = v
    # endplates: instance 200 + the vertebra above the disc they touch
    for i, v in enumerate(levels):
        zc = zs[i]
        lower = (sem == ENDPLATE) & (ins == v) & (z < zc)
        upper = (sem == ENDPLATE) & (ins == v) & (z > zc)
        if i + 1 < n:
            ins[lower] = 200 + v
        if i > 0:
            ins[upper] = 200 + levels[i - 1]
    for i, v in enumerate(levels[:-1]):
        zmid = zs[i] - step / 2
        r = np.sqrt((x / disc_radius[0]) ** 2 + (y / disc_radius[1]) ** 2)
        disc = (r <= 1.0) & (np.abs(z - zmid) <= disc_h / 2) & (sem == 0)
        sem[disc] = DISC
        ins[disc] = 100 + v
        truth["disc"][v] = {"height_middle_mm": disc_h,
                            "volume_mm3": math.pi * disc_radius[0] * disc_radius[1] * disc_h}
    # canal with the cord
    canal = ((x / canal_axes[0]) ** 2 + ((y - canal_y) / canal_axes[1]) ** 2 <= 1.0) & \
            (z <= zs[0] + step * 0.9) & (z >= zs[-1] - step * 0.9)
    sem[canal] = CANAL
    cord = (x ** 2 + (y - canal_y) ** 2 <= cord_radius ** 2) & canal
    cord_z_lo = min(zs[levels.index(v)] for v in cord_levels) - step / 2 if cord_levels else 1e9
    sem[cord & (z >= cord_z_lo)] = CORD
    truth["canal"] = {"csa_mm2": math.pi * canal_axes[0] * canal_axes[1], "ap_diameter_mm": 2 * canal_axes[1]}
    truth["cord"] = {"csa_mm2": math.pi * cord_radius ** 2, "ap_diameter_mm": 2 * cord_radius}
    truth["axis"] = ez.tolist()
    truth["cord_levels"] = sorted(cord_levels)
    semv = Volume(sem.reshape(shape), aff)
    insv = Volume(ins.reshape(shape), aff.copy())
    return ColumnPhantom(semv, insv, truth)
