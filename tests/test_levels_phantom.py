"""A small constructed spine label-map builder for the post-processing and level-naming tests
(semantic mask with community values, the true named instance mask, and the anonymous
vertebra instances the instance phase would hand over), plus its own sanity tests.

Geometry (mm, array axes x = left->right, y = posterior->anterior, z = inferior->superior,
affine = diag(spacing), i.e. RAS): vertebral bodies are elliptic cylinders whose size is
drawn from ``REFERENCE_BODY_MM`` times an overall scale and per-dimension noise; C2 gets a
dens on top of a shorter body; endplates are the top/bottom voxel layer of each body (62),
discs (100) fill the gaps; arch (41), spinous process (42), costal processes (43/44,
pointing anterolaterally in the cervical, posterolaterally in the thoracic and laterally in
the lumbar spine), articular processes (45..48), canal (61) with cord (60) down to the L1/L2 disc; the sacrum
(26) is a block below the last disc with an endplate on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labeling.levels import REFERENCE_BODY_MM
from spineps.labels import VERTEBRA_ORDER, vertebra_name

TILT_DEG = {"C": -15.0, "T": 25.0, "L": 5.0}  # costal-process posterior tilt by region


def _tilt(levels: list[int], i: int) -> float:
    """Tilt of the costal processes of ``levels[i]``: the last thoracic vertebra (T12, or
    T13 when present) and T11 have shorter, less swept processes than the thoracic ones."""
    v = levels[i]
    if v == 7:
        return -12.0
    last_t = 28 if 28 in levels else 19
    if v == last_t:
        return 15.0
    if v in (18, 19):
        return 19.0
    return TILT_DEG[_region(v)]
PROCESS_LEN = {"C": 12.0, "T": 20.0, "L": 24.0}
DISC_MM = {"C": 5.0, "T": 5.5, "L": 10.0}


@dataclass
class Phantom:
    semantic: Volume  # semantic mask, endplates as predicted (62)
    truth: Volume  # named instances: vertebrae, discs 100+X, endplates 200+X, sacrum 26
    anonymous: Volume  # vertebra ids 1..N (top to bottom) on 41..49 only
    levels: list[int]  # level value of anonymous id k at position k-1
    split: Volume  # the semantic mask with endplates split into superior (52) / inferior (53)


def _region(v: int) -> str:
    return vertebra_name(v)[0] if v != 28 else "T"


def build_phantom(levels: list[int], *, sacrum: bool = True, scale: float = 1.0, noise: float = 0.0,
                  seed: int = 0, spacing: tuple[float, float, float] = (3.0, 1.5, 1.5), curve_mm: float = 0.0,
                  margin_mm: float = 8.0, processes: bool = True) -> Phantom:
    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing
    sizes = []
    for v in levels:
        ref = np.asarray(REFERENCE_BODY_MM.get(v, (10.0, 10.0, 10.0)))
        sizes.append(ref * scale * (1.0 + noise * rng.standard_normal(3)))
    discs = [DISC_MM[_region(v)] * scale for v in levels]
    total = sum(s[0] for s in sizes) + sum(discs[:-1]) + (discs[-1] + 60.0 * scale if sacrum else 0.0)
    nz = int(math.ceil((total + 2 * margin_mm) / sz))
    width_mm, depth_mm = 130.0 * scale, 150.0 * scale
    nx, ny = int(width_mm / sx), int(depth_mm / sy)
    sem = np.zeros((nx, ny, nz), np.uint8)
    split = np.zeros((nx, ny, nz), np.uint8)
    truth = np.zeros((nx, ny, nz), np.int16)
    xs = (np.arange(nx) * sx)[:, None, None]
    ys = (np.arange(ny) * sy)[None, :, None]
    zs = (np.arange(nz) * sz)[None, None, :]
    xc = nx * sx / 2
    y_body0 = depth_mm * 0.62

    def ycen(z: float) -> float:
        return y_body0 + curve_mm * math.sin(math.pi * z / (nz * sz))

    def zslab(z0: float, z1: float) -> np.ndarray:
        return (zs >= z0) & (zs < z1)

    def paint(mask: np.ndarray, s_val: int, t_val: int, split_val: int = 0) -> None:
        m = mask & (sem == 0)
        sem[m] = s_val
        truth[m] = t_val
        split[m] = split_val or s_val

    z = nz * sz - margin_mm
    canal_pts = []
    # the cord ends (conus tip) at the L1/L2 disc; above the field of view when it starts below L1
    z_conus = nz * sz + 1.0 if levels and min(v for v in levels if v != 28) > 20 else -1.0
    for i, v in enumerate(levels):
        h, d, w = sizes[i]
        reg = _region(v)
        yc = ycen(z - h / 2)
        body_h = h
        if v == 2:  # C2: body plus dens
            dens_h = 0.42 * h
            body_h = h - dens_h
            dens = zslab(z - dens_h, z) & (((xs - xc) / 4.5) ** 2 + ((ys - (yc - d * 0.15)) / 4.5) ** 2 <= 1)
            paint(dens, 49, v)
        zb1, zb0 = z - (h - body_h), z - h
        ell = ((xs - xc) / (w / 2)) ** 2 + ((ys - yc) / (d / 2)) ** 2 <= 1
        paint(ell & zslab(zb0, zb0 + sz), 62, 200 + v, 53)  # inferior endplate
        if v != 2:
            prev = levels[i - 1] if i > 0 else VERTEBRA_ORDER[VERTEBRA_ORDER.index(v) - 1]
            paint(ell & zslab(zb1 - sz, zb1), 62, 200 + prev, 52)
        paint(ell & zslab(zb0, zb1), 49, v)
        # posterior elements, over the middle of the body height
        canal_r = 7.5 * scale
        yk = yc - d / 2 - canal_r - 1.0
        canal_pts.append((z - h / 2, yk))
        za0, za1 = zb0 + 0.15 * body_h, zb1 - 0.15 * body_h
        if processes:
            rr = np.sqrt((xs - xc) ** 2 + (ys - yk) ** 2)
            ring = (rr >= canal_r) & (rr <= canal_r + 4.0 * scale) & (ys <= yk + canal_r * 0.6)
            paint(ring & zslab(za0, za1), 41, v)
            sp_len = 22.0 * scale
            spin = (np.abs(xs - xc) <= 3.0) & (ys < yk - canal_r) & (ys >= yk - canal_r - sp_len)
            paint(spin & zslab(za0 + 0.2 * (za1 - za0), za1 - 0.2 * (za1 - za0)), 42, v)
            t = math.radians(_tilt(levels, i))
            length = PROCESS_LEN[reg] * scale
            for sign, lab in ((-1, 43), (1, 44)):
                x0, y0 = xc + sign * (canal_r + 2.0), yk
                dx, dy = sign * math.cos(t), -math.sin(t)
                px, py = xs - x0, ys - y0
                along = px * dx + py * dy
                across = np.abs(px * (-dy) + py * dx)
                rod = (along >= 0) & (along <= length) & (across <= 3.0 * scale)
                zc = (za0 + za1) / 2
                paint(rod & zslab(zc - 3.0 * scale, zc + 3.0 * scale), lab, v)
                art = (np.abs(xs - (xc + sign * (canal_r + 1.0))) <= 3.0) & (np.abs(ys - (yk - 2.0)) <= 3.0)
                paint(art & zslab(za1, min(za1 + 4.0, zb1)), 45 if sign < 0 else 46, v)
                paint(art & zslab(max(za0 - 4.0, zb0), za0), 47 if sign < 0 else 48, v)
        z = zb0
        if v == 20:
            z_conus = z - DISC_MM["L"] * scale / 2
        last = i == len(levels) - 1
        if not last or sacrum:
            dh = discs[i]
            nxt = sizes[i + 1] if not last else np.array([0.0, 40.0 * scale, 48.0 * scale])
            dd, dw = (d + nxt[1]) / 2, (w + nxt[2]) / 2
            yd = ycen(z - dh / 2)
            dell = ((xs - xc) / (dw / 2)) ** 2 + ((ys - yd) / (dd / 2)) ** 2 <= 1
            paint(dell & zslab(z - dh, z), 100, 100 + v)
            z -= dh
    if sacrum:
        sh = 60.0 * scale
        yc = ycen(z - sh / 2)
        blk = (np.abs(xs - xc) <= 24.0 * scale) & (np.abs(ys - yc) <= 20.0 * scale)
        paint(blk & zslab(z - sz, z), 62, 200 + levels[-1], 52)
        paint(blk & zslab(z - sh, z), 26, 26)
    # canal through the whole column, the cord down to its conus
    if processes and canal_pts:
        zz = np.array([p[0] for p in canal_pts])[::-1]
        yy = np.array([p[1] for p in canal_pts])[::-1]
        ykz = np.interp(np.arange(nz) * sz, zz, yy)[None, None, :]
        rr = np.sqrt((xs - xc) ** 2 + (ys - ykz) ** 2)
        paint(rr < 7.5 * scale, 61, 0)
        cord = (rr < 3.5 * scale) & (sem == 61) & (zs > z_conus)
        sem[cord] = 60
        split[cord] = 60
    anon = np.zeros_like(truth)
    part = (sem >= 41) & (sem <= 49)
    for k, v in enumerate(levels, start=1):
        anon[part & (truth == v)] = k
    aff = np.diag([sx, sy, sz, 1.0])
    vol = Volume(sem, aff)
    return Phantom(vol, vol.with_data(truth), vol.with_data(anon), list(levels), vol.with_data(split))


# ------------------------------------------------------------------------------ sanity
def test_builder_lumbar_has_every_structure():
    ph = build_phantom([19, 20, 21, 22, 23, 24])
    vals = set(np.unique(ph.semantic.data).tolist())
    assert {41, 42, 43, 44, 45, 46, 47, 48, 49, 62, 100, 26, 60, 61} <= vals
    assert sorted(np.unique(ph.anonymous.data).tolist()) == list(range(0, 7))
    # discs of the truth are 100 + the vertebra above
    discs = sorted(v for v in np.unique(ph.truth.data).tolist() if 100 < v < 200)
    assert discs == [119, 120, 121, 122, 123, 124]
