"""Resampling through world coordinates.

``to_spacing`` / ``back_to_grid`` are a pair: the first moves a volume onto a grid with the
given voxel size, the second maps a result back onto the exact original grid.

Grid convention of ``to_spacing``: the direction cosines are kept; the new shape along each
axis is ``ceil(n * s / s_new)`` (``n`` voxels of size ``s``; a relative slack of 1e-6 absorbs
float noise), so the new field of view (``n_new * s_new``, edge to edge) covers the old one
and exceeds it by less than one new voxel; the new grid is *centred* on the old one: the
centre of the field of view (voxel coordinate ``(n - 1) / 2``) maps to the same world point.
Hence every new voxel centre lies inside the old field of view and every old voxel centre
inside the new one, so neither ``to_spacing`` nor ``back_to_grid`` ever fills at the borders.
Resampling to the same spacing is the identity (a copy, no interpolation).

Sampling (``resample_to_grid``): every target voxel centre is mapped into the source voxel
grid through ``inv(source.affine) @ target.affine`` and interpolated with one
``scipy.ndimage.affine_transform`` call: ``order=0`` nearest neighbour (labels, dtype kept),
``order=1`` linear, ``order=3`` cubic B-spline (images; float32 out; cubic may overshoot the
input range, clip if needed). A target voxel whose centre falls inside the source's field of
view (within half a voxel beyond the outermost source centres) takes the nearest edge
extension there; farther out it gets ``fill``.

Labels (``resample_labels``): nearest neighbour turns a coarse label grid into blocks on a
finer one. ``resample_labels`` instead gives each target voxel the label whose one-hot
indicator, linearly interpolated, is largest there (ties keep the nearest label), so the
outlines follow the coarse grid's boundaries smoothly. Only target voxels whose nearest source
voxel lies on a label boundary (its 3x3x3 neighbourhood holds another label) can differ from
nearest neighbour, and only those are interpolated; everywhere else the result is nearest
neighbour exactly.

Memory: float32 throughout for images; besides the output, at most one float32 copy of the
input (the cubic spline coefficients, or the float32 conversion) and one float32 coordinate
array plus a boolean mask when part of the target lies outside the source.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from spineps.geometry.cropping import bbox_of
from spineps.geometry.volume import Volume, int3

__all__ = ["to_spacing", "resample_to_grid", "resample_labels", "back_to_grid", "spacing_grid"]

_LABEL_CHUNK = 1 << 18  # boundary voxels interpolated at once (bounds the score array's size)


def spacing_grid(vol: Volume, spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """The (shape, affine) that ``to_spacing(vol, spacing)`` resamples onto (see the module docstring)."""
    new_sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if new_sp.size == 1:
        new_sp = np.repeat(new_sp, 3)
    if new_sp.size != 3 or not np.all(np.isfinite(new_sp)) or not np.all(new_sp > 0):
        raise ValueError(f"spacing must be three finite positive numbers, got {tuple(spacing)}")
    old_sp = np.asarray(vol.spacing, dtype=np.float64)
    n = np.asarray(vol.shape, dtype=np.float64)
    if np.allclose(old_sp, new_sp, rtol=1e-6, atol=0):
        return vol.shape, vol.affine.copy()
    new_n = np.maximum(1, np.ceil(n * old_sp / new_sp * (1 - 1e-6))).astype(np.int64)
    ratio = new_sp / old_sp  # new voxel size in old voxel units
    # old voxel coordinate of the new voxel 0, so that both grids share their centre
    start = (n - 1) / 2.0 - (new_n - 1) / 2.0 * ratio
    new_to_old = np.eye(4)
    new_to_old[:3, :3] = np.diag(ratio)
    new_to_old[:3, 3] = start
    affine = vol.affine @ new_to_old
    return int3(new_n), affine


def to_spacing(vol: Volume, spacing: Sequence[float], *, order: int) -> Volume:
    """Resample ``vol`` to voxel size ``spacing`` (mm per array axis), same direction cosines,
    same centre and (rounded) extent. ``order=0`` for labels, 1 or 3 for images."""
    shape, affine = spacing_grid(vol, spacing)
    return resample_to_grid(vol, shape, affine, order=order)


def _check_order(order: int) -> int:
    if order not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"interpolation order must be 0..5, got {order!r}")
    return int(order)


def resample_to_grid(vol: Volume, shape: Sequence[int], affine: np.ndarray, *, order: int,
                     fill: float = 0) -> Volume:
    """Resample ``vol`` onto the grid ``(shape, affine)`` through world coordinates.

    ``order=0`` keeps the dtype (labels); higher orders return float32. Target voxels
    outside the source's field of view get ``fill``. One ``affine_transform`` call for the
    whole volume.
    """
    from scipy import ndimage

    order = _check_order(order)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"target shape must be three positive sizes, got {shape}")
    tgt_aff = np.asarray(affine, dtype=np.float64)
    if tgt_aff.shape != (4, 4) or not np.all(np.isfinite(tgt_aff)):
        raise ValueError("target affine must be a finite 4x4 matrix")

    src = vol.data
    out_dtype = src.dtype if order == 0 else np.dtype(np.float32)
    if shape == vol.shape and np.allclose(tgt_aff, vol.affine, rtol=0, atol=1e-6):
        return Volume(np.array(src, dtype=out_dtype, copy=True), tgt_aff.copy())

    # target voxel -> source voxel
    m = np.linalg.solve(vol.affine, tgt_aff)
    mat, off = m[:3, :3], m[:3, 3]
    if order > 0 and src.dtype != np.float32:
        src = src.astype(np.float32)
    if order > 1:
        src = ndimage.spline_filter(src, order=order, output=np.float32, mode="nearest")
    out = np.empty(shape, dtype=out_dtype)
    ndimage.affine_transform(src, mat, offset=off, output_shape=shape, output=out, order=order,
                             mode="nearest", prefilter=False)
    del src

    outside = _outside_mask(vol.shape, shape, m)
    if outside is not None:
        out[outside] = fill
    return Volume(out, tgt_aff.copy())


def _outside_mask(src_shape: Sequence[int], shape: Sequence[int], m: np.ndarray) -> Union[np.ndarray, None]:
    """Boolean mask of target voxels whose centre lies outside the source's field of view
    (beyond half a voxel past the outermost source centres), or None when all are inside."""
    lo = -0.5 - 1e-6
    hi = np.asarray(src_shape, dtype=np.float64) - 0.5 + 1e-6
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
    pc = (m @ corners)[:3]
    if np.all(pc >= lo) and np.all(pc <= hi[:, None]):
        return None
    ii = np.arange(shape[0], dtype=np.float32)[:, None, None]
    jj = np.arange(shape[1], dtype=np.float32)[None, :, None]
    kk = np.arange(shape[2], dtype=np.float32)[None, None, :]
    outside = np.zeros(tuple(shape), dtype=bool)
    for ax in range(3):
        a, b, c, d = (np.float32(x) for x in m[ax])
        coord = a * ii + b * jj
        coord = coord + c * kk  # full-size float32
        coord += d
        outside |= coord < lo
        outside |= coord > hi[ax]
        del coord
    return outside


def resample_labels(vol: Volume, shape: Sequence[int], affine: np.ndarray, *, fill: int = 0) -> Volume:
    """Resample the label volume ``vol`` onto ``(shape, affine)`` with smooth outlines: each
    target voxel takes the label whose linearly interpolated one-hot indicator is largest
    (ties keep the nearest-neighbour label). Integer dtype kept; outside the source's field of
    view ``fill`` (see the module docstring)."""
    from scipy import ndimage

    src = np.asarray(vol.data)
    if src.dtype.kind not in "iub":
        raise ValueError(f"resample_labels needs an integer label volume, got dtype {src.dtype}")
    near = resample_to_grid(vol, shape, affine, order=0, fill=fill)
    labels = np.unique(src)
    if labels.size < 2 or near.shape == vol.shape and np.allclose(near.affine, vol.affine, rtol=0, atol=1e-6):
        return near
    boundary = ndimage.maximum_filter(src, size=3, mode="nearest") != ndimage.minimum_filter(
        src, size=3, mode="nearest")
    near_boundary = resample_to_grid(Volume(boundary.view(np.uint8), vol.affine), near.shape, near.affine,
                                     order=0, fill=0)
    idx = np.flatnonzero(np.asarray(near_boundary.data))
    del near_boundary
    if idx.size == 0:
        return near
    out = np.asarray(near.data)
    flat = out.reshape(-1)
    m = np.linalg.solve(vol.affine, near.affine)
    indicators = [_label_indicator(src, int(lab)) for lab in labels]
    upper = np.asarray(src.shape).reshape(3, 1) - 1
    for start in range(0, idx.size, _LABEL_CHUNK):
        part = idx[start:start + _LABEL_CHUNK]
        ijk = np.stack(np.unravel_index(part, out.shape)).astype(np.float64)
        coords = m[:3, :3] @ ijk + m[:3, 3:4]
        centre = np.clip(np.rint(coords), 0, upper).astype(np.intp)  # nearest source voxel
        nearest = flat[part]
        best_score = np.full(part.size, -1.0, np.float32)
        best_label = nearest.copy()
        near_score = np.zeros(part.size, np.float32)
        for lab, (box, lo, reach) in zip(labels, indicators):
            # the label can score > 0 only where it lies in the nearest voxel's 3x3x3 block
            rel = centre - lo.astype(np.intp)
            inside = np.all((rel >= 0) & (rel < np.asarray(box.shape).reshape(3, 1)), axis=0)
            cand = np.flatnonzero(inside)
            cand = cand[reach[tuple(rel[:, cand])]]
            if cand.size == 0:
                continue
            score = ndimage.map_coordinates(box, coords[:, cand] - lo, output=np.float32, order=1,
                                            mode="nearest", prefilter=False)
            own = nearest[cand] == lab
            near_score[cand[own]] = score[own]
            better = score > best_score[cand]
            best_score[cand[better]] = score[better]
            best_label[cand[better]] = lab
        take = best_score > near_score + 1e-4
        flat[part[take]] = best_label[take]
    return near


def _label_indicator(src: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 0/1 indicator (uint8) of ``label`` cropped to its bounding box plus one voxel (where
    the volume allows), the box's first voxel (3, 1), and the indicator dilated by one voxel
    (3x3x3, bool, same box). Sampled with ``mode="nearest"``, the crop gives the same linear
    interpolation as the whole indicator: the padding is zero, and where the box meets the
    volume's border the edge extension is the volume's own."""
    from scipy import ndimage

    hit = src == label
    box = bbox_of(hit, margin=1)
    assert box is not None  # ``label`` is one of ``src``'s values
    crop = hit[box]
    reach = ndimage.binary_dilation(crop, structure=np.ones((3, 3, 3), bool))
    lo = np.array([sl.start for sl in box], dtype=np.float64).reshape(3, 1)
    return crop.view(np.uint8).copy(), lo, reach


def back_to_grid(vol: Volume, reference, *, order: int = 0, smooth_labels: bool = False) -> Volume:
    """Map ``vol`` (e.g. a mask on a model grid) back onto ``reference``'s exact grid.

    ``reference`` is a ``Volume`` or a ``HeaderInfo``; the result has exactly its spatial
    shape and affine. Nearest neighbour by default (labels); ``smooth_labels=True`` maps a
    label volume with :func:`resample_labels` instead (``order`` is then ignored).
    """
    if isinstance(reference, Volume):
        shape, aff = reference.shape, reference.affine
    else:
        aff = np.asarray(reference.affine, dtype=np.float64)
        shape = getattr(reference, "spatial_shape", None) or tuple(reference.shape)[:3]
    target = tuple(int(s) for s in shape)
    if smooth_labels:
        return resample_labels(vol, target, aff, fill=0)
    return resample_to_grid(vol, target, aff, order=order, fill=0)
