"""Render a phantom's tissue map as a sagittal T2-weighted turbo-spin-echo image.

Realistic mode (``randomize=False``): relative T2w TSE signal per tissue (CSF = 1), taken
from the look of the real scans in ``shared/data/real`` (VB2, IVD, SCT lumbar) and the usual
T2w TSE contrast: CSF and the disc nucleus bright, subcutaneous fat bright, marrow
intermediate, cord intermediate, annulus, muscle and ligaments dark, cortex / endplates and
flowing blood (flow void) very dark, air ~0. On top of that:

- partial volume: when a voxel is larger than ~1.2 mm along an axis (thick sagittal slices),
  the tissue map is re-rasterised on a grid super-sampled along that axis (sub-voxel centres
  inside each voxel) and the signal averaged per voxel;
- tissue texture (marrow heterogeneity, viscera), a slight in-plane blur;
- a smooth multiplicative bias field plus a posterior surface-coil fall-off; with
  ``stations > 1`` each station (overlapping along S-I) has its own gain and bias, blended
  linearly in the overlaps, as in stitched whole-spine exams;
- Rician noise (magnitude of complex Gaussian noise).

Domain-randomised mode (``randomize=True``): a random intensity per tissue class, random
blur, random down-/up-sampling along one axis, random bias strength, random noise level and
a random gamma: for training models that must transfer to real scans of other contrasts and
scanners.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional, Sequence

import numpy as np

from spineps.geometry.volume import Volume
from spineps.synth.anatomy import Phantom, Tissue, _build

__all__ = ["T2W_SIGNAL", "SUBJECT_CONTRAST", "render_t2w", "stitch_stations", "supersample_factors"]

log = logging.getLogger(__name__)

#: relative T2w TSE signal per tissue (CSF = 1.0) and texture amplitude (relative sd)
T2W_SIGNAL: dict[Tissue, tuple[float, float]] = {
    Tissue.BACKGROUND: (0.0, 0.0),
    Tissue.FAT: (0.80, 0.05),
    Tissue.MUSCLE: (0.17, 0.08),
    Tissue.MARROW: (0.42, 0.12),
    Tissue.CORTEX: (0.05, 0.1),
    Tissue.ANNULUS: (0.20, 0.08),
    Tissue.NUCLEUS: (0.82, 0.06),
    Tissue.CSF: (1.00, 0.02),
    Tissue.CORD: (0.40, 0.04),
    Tissue.LIGAMENT: (0.07, 0.1),
    Tissue.SOFT: (0.38, 0.25),
    Tissue.VESSEL: (0.06, 0.2),
    Tissue.LUNG: (0.03, 0.3),
    Tissue.SKIN: (0.35, 0.1),
}
_N_TISSUE = max(int(t) for t in Tissue) + 1

#: realistic mode: per-subject signal ranges (CSF = 1) of the tissues whose contrast varies
#: most between real subjects and sequences. The real scans' median z-scored body minus disc
#: intensity runs from -1.2 (VB3: water-fat, discs bright) to +0.3 (VB2: T2 TSE, many
#: degenerated discs); fixed textbook values gave +0.67..+0.96 on every phantom.
SUBJECT_CONTRAST: dict[Tissue, tuple[float, float]] = {
    Tissue.MARROW: (0.25, 0.55),
    Tissue.NUCLEUS: (0.35, 1.0),
    Tissue.ANNULUS: (0.12, 0.30),
}

#: realistic mode, where asked for (``render_t2w(cord_contrast=...)``, as the training
#: phantoms do): a per-subject cord signal (CSF = 1) drawn from this range instead of 0.40;
#: the real SCT cervical T2w has its cord's median at 0.28 of the canal's 90th percentile
CORD_CONTRAST = (0.28, 0.60)


def supersample_factors(spacing: Sequence[float], target: float = 1.2, limit: int = 4) -> tuple[int, int, int]:
    """Sub-samples per voxel along each axis so that sub-voxels are at most ``target`` mm
    (1 for axes of at most ``target`` mm)."""
    return tuple(1 if s <= target else min(limit, int(math.ceil(s / target))) for s in spacing)  # type: ignore


def _fine_tissue(ph: Phantom, factors: tuple[int, int, int]) -> np.ndarray:
    """Tissue map re-rasterised on a grid with ``factors`` sub-voxels per voxel; returned
    with shape (n0, f0, n1, f1, n2, f2) for block averaging."""
    aff = ph.tissue.affine
    f = np.asarray(factors, float)
    sub = aff.copy()
    sub[:3, :3] = aff[:3, :3] / f[None, :]
    # sub-voxel j of voxel i sits at i + (j + 0.5) / f - 0.5
    sub[:3, 3] = aff[:3, :3] @ ((1.0 / f - 1.0) / 2.0) + aff[:3, 3]
    shape = tuple(int(n * k) for n, k in zip(ph.tissue.shape, factors))
    cv = _build(ph.spec, affine=sub, shape=shape, want_labels=False)[0]
    n0, n1, n2 = ph.tissue.shape
    return cv.tis.reshape(n0, factors[0], n1, factors[1], n2, factors[2])


def _upsample_linear(coarse: np.ndarray, shape: Sequence[int], step: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of ``coarse`` (sampled every ``step`` voxels) onto
    ``shape``, one axis at a time (each pass gathers two neighbours; no full-grid coordinates)."""
    out = coarse
    for axis, (n, st) in enumerate(zip(shape, step)):
        f = np.arange(n, dtype=np.float32) / float(st)
        i = np.minimum(f.astype(np.int64), out.shape[axis] - 2)
        w = (f - i).astype(np.float32)
        wshape = [1] * out.ndim
        wshape[axis] = n
        w = w.reshape(wshape)
        out = np.take(out, i, axis=axis) * (1 - w) + np.take(out, i + 1, axis=axis) * w
    return out


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, scale_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-sd smooth random field with correlation length ~``scale_vox`` voxels
    (white noise on a coarse grid, smoothed, linearly interpolated)."""
    from scipy import ndimage

    step = [max(2, int(round(s / 2))) for s in scale_vox]
    cshape = tuple(int(math.ceil(n / st)) + 2 for n, st in zip(shape, step))
    coarse = ndimage.gaussian_filter(rng.standard_normal(cshape).astype(np.float32), sigma=1.0, mode="wrap")
    coarse = (coarse - coarse.mean()) / max(float(coarse.std()), 1e-6)
    return _upsample_linear(coarse, shape, step)


def _world_coords(affine: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    return [sum(float(affine[r, c]) * idx[c] for c in range(3)) + float(affine[r, 3]) for r in range(3)]


def _coarse(fn, affine: np.ndarray, shape: tuple[int, int, int], step: int = 8) -> np.ndarray:
    """Evaluate a smooth field ``fn(affine, shape)`` on a grid ``step`` times coarser and
    interpolate it linearly onto ``shape``."""
    st = [min(step, max(1, n // 2)) for n in shape]
    cshape = tuple(int(math.ceil(n / s)) + 2 for n, s in zip(shape, st))
    caff = affine.copy()
    caff[:3, :3] = affine[:3, :3] * np.asarray(st, float)[None, :]
    small = np.ascontiguousarray(fn(caff, cshape), dtype=np.float32)
    return _upsample_linear(small, shape, st)


def _bias_field(affine: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator, strength: float,
                coil: float) -> np.ndarray:
    return _coarse(lambda a, s: _bias_field_direct(a, s, rng, strength, coil), affine, shape)


def _bias_field_direct(affine: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator, strength: float,
                       coil: float) -> np.ndarray:
    """Smooth multiplicative field: random low-order cosine terms over the world box, times a
    posterior surface-coil fall-off (signal decays with distance from the back)."""
    x, y, z = _world_coords(affine, shape)
    ext = [(float(np.min(a)), float(np.max(a))) for a in (x, y, z)]
    nx, ny, nz = ((a - lo) / max(hi - lo, 1.0) for a, (lo, hi) in zip((x, y, z), ext))
    log_field = np.zeros(np.broadcast_shapes(nx.shape, ny.shape, nz.shape), np.float32)
    for _ in range(4):
        kx, ky, kz = rng.uniform(0, 1.5, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        log_field = log_field + float(rng.normal(0, strength)) * (
            np.cos(np.pi * kx * nx + ph[0]) * np.cos(np.pi * ky * ny + ph[1]) * np.cos(np.pi * kz * nz + ph[2]))
    field = np.exp(log_field)
    if coil > 0:
        # distance from the most posterior point of the box (world y minimum), mm
        dist = y - ext[1][0]
        field = field * ((1 - coil) + coil * np.exp(-dist / 110.0)) / ((1 - coil) + coil * 0.5)
    return np.broadcast_to(field, shape).astype(np.float32)


def _station_gain(affine: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator, n: int) -> np.ndarray:
    return _coarse(lambda a, s: _station_gain_direct(a, s, rng, n), affine, shape)


def _station_gain_direct(affine: np.ndarray, shape: tuple[int, int, int], rng: np.random.Generator,
                         n: int) -> np.ndarray:
    """Per-station gain (and bias tilt) along world S-I, blended linearly over 30 % overlaps."""
    _, _, z = _world_coords(affine, shape)
    zlo, zhi = float(np.min(z)), float(np.max(z))
    zn = (np.broadcast_to(z, shape) - zlo) / max(zhi - zlo, 1.0)
    centres = (np.arange(n) + 0.5) / n
    width = 1.0 / n
    weights = []
    gains = []
    for c in centres:
        w = np.clip(1.0 - np.abs(zn - c) / (width * 0.65), 0.0, 1.0) + 1e-6
        weights.append(w)
        tilt = float(rng.normal(0, 0.15))
        gains.append(float(rng.uniform(0.75, 1.25)) * (1 + tilt * (zn - c) / width))
    wsum = sum(weights)
    return (sum(w * g for w, g in zip(weights, gains)) / wsum).astype(np.float32)


def render_t2w(ph: Phantom, seed: int = 0, randomize: bool = False, *, supersample: bool = True,
               stations: Optional[int] = None, noise: Optional[float] = None, bias: Optional[float] = None,
               scale: float = 1000.0, cord_contrast: Optional[tuple[float, float]] = None) -> Volume:
    """T2w TSE image of ``ph`` on its grid (float32, >= 0, CSF about ``scale``).

    ``noise``: Rician noise sd relative to CSF (default 0.03; random in randomised mode);
    ``bias``: sd of the log bias field terms (default 0.12); ``stations``: stitched stations
    (default ``ph.spec.stations``); ``cord_contrast``: realistic mode's cord signal drawn per
    subject from this range (e.g. ``CORD_CONTRAST``; default: the fixed ``T2W_SIGNAL``)."""
    from scipy import ndimage

    t0 = time.perf_counter()
    rng = np.random.default_rng([int(seed), 7919])
    shape = ph.tissue.shape
    aff = ph.tissue.affine
    # per-tissue signal and texture amplitude
    sig = np.zeros(_N_TISSUE, np.float32)
    tex = np.zeros(_N_TISSUE, np.float32)
    for t, (s, a) in T2W_SIGNAL.items():
        sig[int(t)], tex[int(t)] = s, a
    if randomize:
        sig = rng.uniform(0.0, 1.0, _N_TISSUE).astype(np.float32)
        sig[int(Tissue.BACKGROUND)] = float(rng.uniform(0.0, 0.15))
        tex = rng.uniform(0.0, 0.25, _N_TISSUE).astype(np.float32)
    else:
        sig = sig * rng.uniform(0.9, 1.1, _N_TISSUE).astype(np.float32)  # subject/scanner variation
        # marrow and discs vary most between subjects and sequences (fatty or red marrow,
        # hydrated or degenerated discs): drawn from the ranges that reproduce the spread of
        # the real scans' body-disc contrast (``SUBJECT_CONTRAST``)
        for t, (lo, hi) in SUBJECT_CONTRAST.items():
            sig[int(t)] = float(rng.uniform(lo, hi))
        if cord_contrast is not None:
            # the cord's signal relative to CSF varies with the sequence and partial volume
            # (a generator of its own, so the other tissues keep the draws they had)
            lo_c, hi_c = cord_contrast
            sig[int(Tissue.CORD)] = float(np.random.default_rng([int(seed), 7919, 60]).uniform(lo_c, hi_c))
        sig[int(Tissue.CSF)] = 1.0
        sig[int(Tissue.BACKGROUND)] = 0.0
    factors = supersample_factors(ph.tissue.spacing) if supersample else (1, 1, 1)
    if factors != (1, 1, 1):
        fine = _fine_tissue(ph, factors)
        img = sig[fine].mean(axis=(1, 3, 5), dtype=np.float32)
        amp = tex[fine].mean(axis=(1, 3, 5), dtype=np.float32)
    else:
        tis = ph.tissue.data
        img = sig[tis]
        amp = tex[tis]
    t1 = time.perf_counter()
    spacing = np.asarray(ph.tissue.spacing)
    # texture: fine (~2 mm) and coarse (~8 mm) smooth noise
    fine_n = _smooth_noise(shape, rng, np.maximum(2.0 / spacing, 1.0))
    coarse_n = _smooth_noise(shape, rng, np.maximum(8.0 / spacing, 1.0))
    img = img * np.clip(1.0 + amp * (0.6 * fine_n + 0.8 * coarse_n), 0.05, None)
    # blur: slight in-plane PSF (sigma in voxels; no blur along thick axes, already averaged)
    if randomize:
        sigma = [float(rng.uniform(0, 1.2)) / max(s, 0.5) for s in spacing]
    else:
        sigma = [0.35 / max(s, 0.5) if f == 1 else 0.0 for s, f in zip(spacing, factors)]
    if any(s > 0.05 for s in sigma):
        img = ndimage.gaussian_filter(img, sigma=sigma)
    if randomize and rng.random() < 0.5:  # random resolution loss along one axis
        ax = int(rng.integers(0, 3))
        k = float(rng.uniform(1.5, 4.0))
        small = ndimage.zoom(img, [1 / k if i == ax else 1 for i in range(3)], order=1)
        img = ndimage.zoom(small, [shape[i] / small.shape[i] for i in range(3)], order=1)
        img = img[: shape[0], : shape[1], : shape[2]]
        if img.shape != shape:
            img = np.pad(img, [(0, shape[i] - img.shape[i]) for i in range(3)], mode="edge")
    # bias field, coil profile, stations
    b_sd = bias if bias is not None else (float(rng.uniform(0.0, 0.35)) if randomize else 0.12)
    coil = float(rng.uniform(0.0, 0.8)) if randomize else 0.45
    img = img * _bias_field(aff, shape, rng, b_sd, coil)
    n_st = stations if stations is not None else max(1, int(ph.spec.stations))
    if n_st > 1:
        img = img * _station_gain(aff, shape, rng, n_st)
    if randomize:
        gamma = float(np.exp(rng.normal(0, 0.35)))
        img = np.clip(img, 0, None)
        img = img / max(float(img.max()), 1e-6)
        img = img ** gamma
    # Rician noise
    sd = noise if noise is not None else (float(rng.uniform(0.0, 0.08)) if randomize else 0.03)
    if sd > 0:
        ref = float(np.percentile(img, 99.5)) if randomize else 1.0
        n1 = rng.standard_normal(shape, dtype=np.float32) * sd * ref
        n2 = rng.standard_normal(shape, dtype=np.float32) * sd * ref
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    img = (np.clip(img, 0, None) * scale).astype(np.float32)
    log.info("rendered T2w %s (randomize=%s, supersample=%s): %.2f s (tissue %.2f s)", shape, randomize, factors,
             time.perf_counter() - t0, t1 - t0)
    return Volume(img, aff.copy())


def stitch_stations(stations: Sequence[Volume], target: Optional[Volume] = None, order: int = 1) -> Volume:
    """Merge overlapping station images (any grids, world-aligned by their affines) onto one
    grid: ``target``'s grid if given, else a grid with the first station's axes and spacing
    covering all stations. Overlaps are blended with weights that fall linearly to zero at
    each station's border (no seams); voxels no station covers are 0. ``order``: spline
    order of the resampling (0 for label maps, then the highest-weight station wins)."""
    from scipy import ndimage

    if not stations:
        raise ValueError("stitch_stations needs at least one station")
    if target is not None:
        aff, shape = target.affine, target.shape
    else:
        a0 = stations[0].affine
        inv0 = np.linalg.inv(a0)
        pts = []
        for st in stations:
            n = np.array(st.shape) - 1
            for c in np.array([[i, j, k] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])], float):
                pts.append(inv0[:3, :3] @ (st.affine[:3, :3] @ c + st.affine[:3, 3]) + inv0[:3, 3])
        pts = np.array(pts)
        lo = np.floor(pts.min(0) + 1e-6)
        hi = np.ceil(pts.max(0) - 1e-6)
        aff = a0.copy()
        aff[:3, 3] = a0[:3, :3] @ lo + a0[:3, 3]
        shape = tuple(int(v) + 1 for v in (hi - lo))
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), 0).reshape(3, -1)
    world = aff[:3, :3] @ idx + aff[:3, 3:4]
    acc = np.zeros(int(np.prod(shape)), np.float64)
    wsum = np.zeros_like(acc)
    best_w = np.zeros_like(acc)
    best_v = np.zeros_like(acc)
    for st in stations:
        inv = np.linalg.inv(st.affine)
        vox = inv[:3, :3] @ world + inv[:3, 3:4]
        n = np.array(st.shape, float)[:, None]
        # weight: distance to the station border (voxels), normalised, clipped to [0, 1]
        edge = np.minimum(vox + 0.5, n - 0.5 - vox)
        w = np.clip(edge.min(0) / np.maximum(0.15 * n.min(), 1.0), 0, 1)
        inside = w > 0
        if not inside.any():
            continue
        vals = np.zeros_like(acc)
        vals[inside] = ndimage.map_coordinates(np.asarray(st.data, np.float32), vox[:, inside], order=order,
                                               mode="nearest")
        if order == 0:
            better = w > best_w
            best_w[better] = w[better]
            best_v[better] = vals[better]
        acc += w * vals
        wsum += w
    if order == 0:
        out = best_v
    else:
        out = np.where(wsum > 0, acc / np.maximum(wsum, 1e-12), 0.0)
    dtype = stations[0].data.dtype if order == 0 else np.float32
    return Volume(out.reshape(shape).astype(dtype), np.asarray(aff, float).copy())
