"""Bounding boxes, cropping and fixed-size cutouts, each beside its inverse.

- ``crop_to_bbox`` / ``uncrop``: cut a volume to a box (the affine shifted so every voxel
  keeps its world position) and put it back onto the original grid exactly.
- ``crop_or_pad`` / ``paste_cutout``: a fixed-size cutout around a centre voxel, zero (or
  ``fill``) where it leaves the array, and the paste-back of such a cutout. The cutout of
  size ``n`` along an axis starts at ``round(center) - n // 2`` (round half up), so the
  centre voxel sits at index ``n // 2`` of the cutout. ``cutout_slices`` gives the matching
  (array, cutout) slice pairs for custom merging.
- ``pad_to`` / ``unpad``: pad an array (centred) to at least a given shape and undo it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from spineps.geometry.volume import Volume, int3

__all__ = [
    "bbox_of",
    "Crop",
    "crop_to_bbox",
    "uncrop",
    "cutout_slices",
    "crop_or_pad",
    "paste_cutout",
    "pad_to",
    "unpad",
]

BBox = tuple[slice, slice, slice]


def _margins(margin: Union[int, Sequence[int]], ndim: int) -> tuple[int, ...]:
    m = (int(margin),) * ndim if isinstance(margin, (int, float, np.number)) else tuple(int(x) for x in margin)
    if len(m) != ndim or min(m) < 0:
        raise ValueError(f"margin must be a non-negative int or {ndim} of them, got {margin!r}")
    return m


def bbox_of(mask: np.ndarray, margin: Union[int, Sequence[int]] = 0) -> Optional[tuple[slice, ...]]:
    """Slices of the smallest box holding every non-zero voxel of ``mask``, grown by
    ``margin`` voxels per side and clipped to the array; None when ``mask`` is all zero."""
    mask = np.asarray(mask)
    m = _margins(margin, mask.ndim)
    out = []
    for ax in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(np.any(mask, axis=others) if others else mask)
        if hit.size == 0:
            return None
        lo = max(0, int(hit[0]) - m[ax])
        hi = min(mask.shape[ax], int(hit[-1]) + 1 + m[ax])
        out.append(slice(lo, hi))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class Crop:
    """Where a crop came from: enough to put it back exactly."""

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    bbox: BBox  # normalised slices (start, stop) into the original array

    @property
    def offset(self) -> tuple[int, int, int]:
        return int3(s.start for s in self.bbox)

    @property
    def shape(self) -> tuple[int, int, int]:
        return int3(s.stop - s.start for s in self.bbox)


def _normalise_bbox(bbox: Sequence[slice], shape: Sequence[int], margin: tuple[int, ...]) -> BBox:
    if len(bbox) != len(shape):
        raise ValueError(f"bbox needs {len(shape)} slices, got {len(bbox)}")
    out = []
    for sl, n, m in zip(bbox, shape, margin):
        start, stop, step = sl.indices(int(n))
        if step != 1:
            raise ValueError(f"bbox slices must have step 1, got {sl}")
        start, stop = max(0, start - m), min(int(n), stop + m)
        if stop <= start:
            raise ValueError(f"empty bbox slice {sl} for axis of {n} voxels")
        out.append(slice(start, stop))
    return out[0], out[1], out[2]


def crop_to_bbox(vol: Volume, bbox_or_mask: Union[Sequence[slice], np.ndarray], *,
                 margin: Union[int, Sequence[int]] = 0) -> tuple[Volume, Crop]:
    """Cut ``vol`` to a box (slices, or the bbox of a mask on the same grid) grown by
    ``margin``. The affine is shifted so world positions are unchanged. Raises ValueError on
    an all-zero mask."""
    m = _margins(margin, 3)
    if isinstance(bbox_or_mask, np.ndarray):
        if bbox_or_mask.shape != vol.shape:
            raise ValueError(f"mask shape {bbox_or_mask.shape} does not match volume {vol.shape}")
        box = bbox_of(bbox_or_mask, m)
        if box is None:
            raise ValueError("cannot crop to the bounding box of an empty mask")
        m = (0, 0, 0)
    else:
        box = tuple(bbox_or_mask)
    box = _normalise_bbox(box, vol.shape, m)
    start = np.array([s.start for s in box], dtype=np.float64)
    affine = vol.affine.copy()
    affine[:3, 3] = vol.affine[:3, 3] + vol.affine[:3, :3] @ start
    data = np.array(vol.data[box], copy=True)
    return Volume(data, affine), Crop(vol.shape, vol.affine.copy(), box)


def uncrop(vol: Volume, crop: Crop, fill: float = 0) -> Volume:
    """Exact inverse of ``crop_to_bbox``: ``vol`` placed back into the original grid,
    ``fill`` elsewhere (dtype kept)."""
    if vol.shape != crop.shape:
        raise ValueError(f"volume shape {vol.shape} is not the crop's shape {crop.shape}")
    out = np.full(crop.original_shape, fill, dtype=vol.data.dtype)
    out[crop.bbox] = vol.data
    return Volume(out, np.array(crop.original_affine, dtype=np.float64, copy=True))


def _round_half_up(x: float) -> int:
    return int(np.floor(float(x) + 0.5))


def cutout_slices(shape: Sequence[int], center: Sequence[float], size: Sequence[int]
                  ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """For a cutout of ``size`` around ``center`` in an array of ``shape``: the slices of the
    array part inside the cutout and where that part sits in the cutout (both may be empty)."""
    if not (len(shape) == len(center) == len(size)):
        raise ValueError("shape, center and size need the same length")
    arr_sl, cut_sl = [], []
    for n, c, s in zip(shape, center, size):
        s = int(s)
        if s < 1:
            raise ValueError(f"cutout size must be positive, got {tuple(size)}")
        start = _round_half_up(c) - s // 2
        lo, hi = max(0, start), min(int(n), start + s)
        if hi <= lo:  # no overlap on this axis
            arr_sl.append(slice(0, 0))
            cut_sl.append(slice(0, 0))
            continue
        arr_sl.append(slice(lo, hi))
        cut_sl.append(slice(lo - start, hi - start))
    return tuple(arr_sl), tuple(cut_sl)


def crop_or_pad(array: np.ndarray, center: Sequence[float], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """A new array of exactly ``size`` around ``center`` (voxel coordinates): the array's
    values where the cutout overlaps it, ``fill`` (0) elsewhere. Inverse: ``paste_cutout``."""
    arr_sl, cut_sl = cutout_slices(array.shape, center, size)
    out = np.full(tuple(int(s) for s in size), fill, dtype=array.dtype)
    out[cut_sl] = array[arr_sl]
    return out


def paste_cutout(target: np.ndarray, cutout: np.ndarray, center: Sequence[float]) -> np.ndarray:
    """Write the part of ``cutout`` that lies inside ``target`` back in place (the inverse of
    ``crop_or_pad`` with the same centre); modifies and returns ``target``."""
    arr_sl, cut_sl = cutout_slices(target.shape, center, cutout.shape)
    target[arr_sl] = cutout[cut_sl]
    return target


def pad_to(array: np.ndarray, shape: Sequence[int], fill: float = 0) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad ``array`` to at least ``shape`` (axes already larger are kept), the original centred
    (an odd extra voxel goes after). Returns the padded array and the slices that recover
    the original (``unpad``)."""
    if len(shape) != array.ndim:
        raise ValueError(f"shape {tuple(shape)} does not match array ndim {array.ndim}")
    new = tuple(max(int(s), n) for s, n in zip(shape, array.shape))
    before = tuple((t - n) // 2 for t, n in zip(new, array.shape))
    sl = tuple(slice(b, b + n) for b, n in zip(before, array.shape))
    out = np.full(new, fill, dtype=array.dtype)
    out[sl] = array
    return out, sl


def unpad(padded: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Inverse of ``pad_to``: the original array (a copy)."""
    return np.array(padded[tuple(slices)], copy=True)
