"""Axis reorientation (exact permutations and flips) and sagittal detection.

``to_orientation`` / ``from_orientation`` are a pair: the first permutes and flips the array
axes so they point along the requested codes (the nearest axes for an oblique affine, as
``nibabel.orientations.io_orientation`` picks them) and adjusts the affine so every voxel
keeps its world position; the second undoes it exactly, back onto the original grid
(same shape, same affine, bit-identical data). No interpolation is involved.

Sagittal rule (``through_plane_axis`` / ``is_sagittal``): the through-plane axis is the
array axis with the largest voxel spacing when that spacing is at least
:data:`ANISOTROPY_RATIO` (1.25) times every other one (a 2D-stack acquisition, e.g.
0.6 x 0.6 x 3.3 mm); otherwise (isotropic or near-isotropic data, where the slice direction
cannot be told from the grid) it is the array axis that maps closest to world L-R. A scan is
sagittal when its through-plane axis maps to L-R. Consequently every isotropic scan counts as
sagittal here; BIDS discovery should prefer ``acq-sag`` or the sidecar's slice orientation
when it has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from spineps.geometry.volume import Volume

__all__ = [
    "Reorientation",
    "to_orientation",
    "from_orientation",
    "through_plane_axis",
    "is_sagittal",
    "ANISOTROPY_RATIO",
]

#: a largest spacing at least this many times every other one marks a 2D stack
ANISOTROPY_RATIO = 1.25

_VALID = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


@dataclass(frozen=True, eq=False)
class Reorientation:
    """Everything needed to undo ``to_orientation`` exactly."""

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    ornt: np.ndarray  # nibabel orientation transform, original array -> reoriented array
    codes: tuple[str, str, str]  # the target axis codes
    oriented_shape: tuple[int, int, int]
    oriented_affine: np.ndarray

    @property
    def inverse_ornt(self) -> np.ndarray:
        """The nibabel orientation transform from the reoriented array back to the original."""
        inv = np.empty_like(self.ornt)
        for src_axis, (dst_axis, flip) in enumerate(self.ornt):
            inv[int(dst_axis)] = (src_axis, flip)
        return inv

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))


def _check_codes(codes: Sequence[str]) -> tuple[str, str, str]:
    c = tuple(str(x).upper() for x in codes)
    if len(c) != 3 or any(x not in _VALID for x in c) or len({_VALID[x] for x in c}) != 3:
        raise ValueError(f"axis codes must name each of L/R, A/P, S/I once, got {tuple(codes)!r}")
    return c


def _apply(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Permute/flip ``data`` by a nibabel orientation transform; C-contiguous result."""
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(data, ornt))


def to_orientation(vol: Volume, codes: Sequence[str]) -> tuple[Volume, Reorientation]:
    """Permute and flip ``vol``'s axes so they point to ``codes`` (e.g. ``("P", "I", "R")``).

    Exact (no interpolation); the returned affine keeps every voxel at its world position.
    The data is returned C-contiguous (one copy; positive strides, ready for torch).
    For an oblique affine the nearest world axes are used (``nibabel.io_orientation``); the
    result's ``axcodes`` equal ``codes`` unless two axes are exactly tied (45 degrees), where
    "nearest" is ambiguous - the round trip is exact in every case.
    """
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    target = _check_codes(codes)
    start = io_orientation(vol.affine)
    if np.isnan(start).any():
        raise ValueError(f"affine has no orientation (degenerate axes):\n{vol.affine}")
    ornt = ornt_transform(start, axcodes2ornt(target)).astype(np.int64)
    data = _apply(vol.data, ornt)
    affine = vol.affine @ inv_ornt_aff(ornt, vol.shape)
    out = Volume(data, affine)
    reo = Reorientation(original_shape=vol.shape, original_affine=vol.affine.copy(), ornt=ornt,
                        codes=target, oriented_shape=out.shape, oriented_affine=out.affine.copy())
    return out, reo


def from_orientation(vol: Volume, reo: Reorientation, *, atol: float = 1e-4) -> Volume:
    """Exact inverse of ``to_orientation``: back onto the original grid (shape and affine).

    ``vol`` must lie on the reoriented grid (shape and affine, within ``atol``) - resample it
    back there first if it was processed at another spacing.
    """
    if vol.shape != tuple(reo.oriented_shape):
        raise ValueError(f"volume shape {vol.shape} is not the reoriented shape {reo.oriented_shape}")
    if not np.allclose(vol.affine, reo.oriented_affine, atol=atol):
        raise ValueError("volume affine is not the reoriented affine; resample it back first")
    data = _apply(vol.data, reo.inverse_ornt)
    return Volume(data, np.array(reo.original_affine, dtype=np.float64, copy=True))


def _geometry(obj) -> tuple[np.ndarray, tuple[int, ...]]:
    if isinstance(obj, Volume):
        return obj.affine, obj.shape
    aff = getattr(obj, "affine", None)
    shape = getattr(obj, "spatial_shape", None) or getattr(obj, "shape", None)
    if aff is None or shape is None:
        raise TypeError(f"need a Volume or HeaderInfo, got {type(obj).__name__}")
    return np.asarray(aff, dtype=np.float64), tuple(int(s) for s in shape)[:3]


def _through_plane(affine: np.ndarray, zooms: Optional[Sequence[float]]) -> int:
    from nibabel.orientations import io_orientation

    aff = np.asarray(affine, dtype=np.float64)
    sp = np.asarray(zooms if zooms is not None else np.sqrt((aff[:3, :3] ** 2).sum(axis=0)), dtype=np.float64)[:3]
    order = np.argsort(sp)[::-1]
    if sp[order[0]] >= ANISOTROPY_RATIO * sp[order[1]]:
        return int(order[0])
    ornt = io_orientation(aff)
    lr = np.flatnonzero(ornt[:, 0] == 0)
    if lr.size != 1:
        raise ValueError(f"affine has no axis mapping to L-R:\n{aff}")
    return int(lr[0])


def through_plane_axis(header_or_volume: Union[Volume, object]) -> int:
    """The array axis (0, 1, 2) across the slices; see the module docstring for the rule."""
    aff, _shape = _geometry(header_or_volume)
    return _through_plane(aff, None)


def is_sagittal(affine: np.ndarray, shape: Sequence[int], zooms: Optional[Sequence[float]] = None) -> bool:
    """True when the through-plane axis maps to world L-R (see the module docstring).

    ``zooms`` (voxel sizes) default to the affine's column norms; ``shape`` is validated
    only (it must have at least 3 axes).
    """
    from nibabel.orientations import io_orientation

    if len(tuple(shape)) < 3:
        raise ValueError(f"need a 3D shape, got {tuple(shape)}")
    axis = _through_plane(affine, zooms)
    return bool(io_orientation(np.asarray(affine, dtype=np.float64))[axis, 0] == 0)
