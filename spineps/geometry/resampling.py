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

Memory: float32 throughout for images; besides the output, at most one float32 copy of the
input (the cubic spline coefficients, or the float32 conversion) and one float32 coordinate
array plus a boolean mask when part of the target lies outside the source.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from spineps.geometry.volume import Volume, int3

__all__ = ["to_spacing", "resample_to_grid", "back_to_grid", "spacing_grid"]


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


def back_to_grid(vol: Volume, reference, *, order: int = 0) -> Volume:
    """Map ``vol`` (e.g. a mask on a model grid) back onto ``reference``'s exact grid.

    ``reference`` is a ``Volume`` or a ``HeaderInfo``; the result has exactly its spatial
    shape and affine. Nearest neighbour by default (labels).
    """
    if isinstance(reference, Volume):
        shape, aff = reference.shape, reference.affine
    else:
        aff = np.asarray(reference.affine, dtype=np.float64)
        shape = getattr(reference, "spatial_shape", None) or tuple(reference.shape)[:3]
    return resample_to_grid(vol, tuple(int(s) for s in shape), aff, order=order, fill=0)
