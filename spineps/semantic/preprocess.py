"""Image pre-processing before the semantic model, as the reference does it.

1. ``normalize_range``: shift intensities so the minimum is 0 and, when the maximum then
   exceeds ``cap`` (1500), scale linearly down so the maximum is ``cap``.
2. ``n4_correct``: N4 bias-field correction (SimpleITK) restricted to the bounding box of
   the non-zero voxels, estimated on a shrunk copy for speed and applied at full
   resolution; voxels outside the box are returned untouched.

Both work on plain arrays (any axis order) and on ``Volume`` through ``preprocess_image``.
Neither changes the grid, so neither needs an inverse.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - numpy only at run time: the N4 helper process imports this module
    from spineps.geometry.volume import Volume

__all__ = ["normalize_range", "n4_correct", "preprocess_image", "N4Settings", "nonzero_bbox", "INTENSITY_CAP"]

log = logging.getLogger(__name__)

INTENSITY_CAP = 1500.0


def normalize_range(data: np.ndarray, cap: float = INTENSITY_CAP) -> np.ndarray:
    """Shift so the minimum is 0; if the maximum then exceeds ``cap``, scale to [0, cap].
    Returns float32. NaN/inf are set to the minimum first (they carry no signal)."""
    arr = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        fill = float(arr[finite].min()) if finite.any() else 0.0
        arr = np.where(finite, arr, fill).astype(np.float32)
    if arr.size == 0:
        return arr
    lo = float(arr.min())
    out = arr - lo
    hi = float(out.max())
    if hi > cap:
        out *= np.float32(cap / hi)
    return out.astype(np.float32, copy=False)


def nonzero_bbox(mask: np.ndarray) -> Optional[tuple[slice, ...]]:
    """Tight bounding box (slices) of the True voxels, ``None`` when there are none."""
    if not mask.any():
        return None
    sl = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


@dataclass(frozen=True)
class N4Settings:
    """N4 parameters. ``shrink`` is the minimum shrink factor of the copy the field is
    estimated on; it grows so that the copy holds at most ``max_fit_voxels`` voxels (the fit
    dominates the cost); ``iterations`` per fitting level."""

    shrink: int = 4
    max_fit_voxels: int = 40_000
    iterations: tuple[int, ...] = (50, 50, 30)
    convergence: float = 1e-3
    spline_distance_mm: float = 100.0


#: ITK's thread count for N4 (``set_itk_threads``), applied when N4 runs: SimpleITK is only
#: imported then (it holds ~90 MiB; a run without N4 never loads it)
_ITK_THREADS: dict[str, Optional[int]] = {"n": None}


def set_itk_threads(n: int) -> None:
    """The number of threads N4 (ITK) uses from its next run on."""
    _ITK_THREADS["n"] = int(n)


def itk_threads() -> Optional[int]:
    """The thread count of :func:`set_itk_threads` (None: ITK's default)."""
    return _ITK_THREADS["n"]


def n4_correct(data: np.ndarray, spacing: Sequence[float], settings: N4Settings = N4Settings(),
               mask: Optional[np.ndarray] = None) -> np.ndarray:
    """N4 bias-field correction inside the bounding box of the non-zero voxels (or of
    ``mask``). The field is fitted on a shrunk copy and the full-resolution log field is
    divided out of the full-resolution box. Voxels outside the box are returned unchanged.
    Returns float32 of the same shape."""
    import SimpleITK as sitk

    if _ITK_THREADS["n"] is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_ITK_THREADS["n"])
    arr = np.asarray(data, dtype=np.float32)
    fg = (arr > 0) if mask is None else np.asarray(mask, bool)
    box = nonzero_bbox(fg)
    out = arr.copy()
    if box is None or min(s.stop - s.start for s in box) < 2:
        return out
    sub = arr[box]
    sub_mask = fg[box]
    # SimpleITK wants (x, y, z) = reversed numpy axes; spacing reversed accordingly
    img = sitk.GetImageFromArray(np.ascontiguousarray(sub))
    img.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing))))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(sub_mask.astype(np.uint8)))
    msk.CopyInformation(img)
    factor = max(settings.shrink, int(np.ceil((sub.size / max(settings.max_fit_voxels, 1)) ** (1 / 3))))
    shrink = [int(max(1, min(factor, n // 4 if n >= 8 else 1))) for n in img.GetSize()]
    small = sitk.Shrink(img, shrink)
    small_mask = sitk.Shrink(msk, shrink)
    if int(sitk.GetArrayViewFromImage(small_mask).sum()) < 8:
        return out
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations(list(settings.iterations))
    corrector.SetConvergenceThreshold(settings.convergence)
    extent = [sz * sp for sz, sp in zip(img.GetSize(), img.GetSpacing())]
    corrector.SetNumberOfControlPoints([max(4, int(round(e / settings.spline_distance_mm)) + 3) for e in extent])
    corrector.Execute(small, small_mask)
    del small, small_mask, msk
    log_field = corrector.GetLogBiasFieldAsImage(img)  # evaluated on the full-resolution box grid
    del img
    # in place where possible: one full-size field besides input and output (not five)
    field = np.exp(sitk.GetArrayViewFromImage(log_field), dtype=np.float32)
    del log_field
    np.maximum(field, 1e-6, out=field)
    np.divide(sub, field, out=out[box], where=sub_mask)  # out already holds sub outside the mask
    return out


def preprocess_image(image: Volume, n4: bool = True, settings: N4Settings = N4Settings(),
                     timings: Optional[dict] = None,
                     correct: Optional[Callable[[np.ndarray, Sequence[float], N4Settings], np.ndarray]] = None
                     ) -> Volume:
    """``normalize_range`` then (optionally) ``n4_correct`` then ``normalize_range`` again
    (N4 rescales intensities); same grid as ``image``. ``timings`` (if given) receives
    the seconds spent in N4 under ``"n4"``. ``correct``: what runs N4 (``n4_correct``
    by default; ``n4_helper.n4_isolated`` runs it in a helper process)."""
    data = normalize_range(image.data)
    if n4:
        t0 = time.perf_counter()
        data = normalize_range((correct or n4_correct)(data, image.spacing, settings))
        if timings is not None:
            timings["n4"] = time.perf_counter() - t0
        log.debug("N4 took %.2f s on %s", time.perf_counter() - t0, image.shape)
    return image.with_data(data)
