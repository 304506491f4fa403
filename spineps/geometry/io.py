"""NIfTI reading and writing with validation.

Rules (each violation raises :class:`spineps.errors.InputError` naming the file and the
reason, in one line):

- The file must exist and be a NIfTI-1 or NIfTI-2 image (``.nii`` or ``.nii.gz``; the
  compression is chosen by nibabel from the name).
- Dimensionality: 3 spatial axes. Trailing singleton axes (a 4D image with one volume, as
  some converters write) are squeezed; a real 4D series, a 2D image, or a *degenerate* image
  (any spatial axis with fewer than :data:`MIN_AXIS_VOXELS` = 2 voxels, i.e. a single slice)
  is refused.
- Spacing: the header's ``pixdim[1:4]`` and the norms of the affine's columns must be finite
  and positive.
- Affine: the one nibabel picks (the sform when its code is > 0, else the qform when its code
  is > 0, else the fall-back scaling matrix, with a warning). It must be finite, non-singular,
  and its direction cosines orthogonal: ``max |Rᵀ R - I| <= ORTHOGONALITY_TOL`` (1e-3, about
  0.06 degrees) where ``R`` is the affine's 3x3 part with unit columns. Sheared affines
  (gantry tilt written as a shear, bad resampling tools) are refused.
- qform vs sform: when both codes are set and the two place any corner of the volume more
  than :data:`QFORM_SFORM_TOL_MM` (0.1 mm) apart, a warning is logged and the sform is used.
- Voxels: no NaN or infinity. Labels must hold integral values.
- Size: the shape's product must not exceed ``max_voxels``; this is checked from the header
  before any voxel is read. Running out of memory while reading raises ``ResourceError``.

Returned data: images as float32 (header scaling applied); labels as an integer array in
native byte order - the stored integer type when the file holds unscaled integers, else the
smallest integer type holding the (integral) values.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np

from spineps.errors import InputError, OutputError, one_line, write_error
from spineps.fsutil import atomic_path
from spineps.geometry.volume import Volume, float3, int3, str3

__all__ = [
    "HeaderInfo",
    "read_header",
    "load_volume",
    "save_volume",
    "smallest_int_dtype",
    "MIN_AXIS_VOXELS",
    "ORTHOGONALITY_TOL",
    "QFORM_SFORM_TOL_MM",
    "DEFAULT_MAX_VOXELS",
]

log = logging.getLogger(__name__)

#: every spatial axis needs at least this many voxels (a single slice is a 2D image)
MIN_AXIS_VOXELS = 2
#: tolerance on ``|Rᵀ R - I|`` for the unit direction cosines (about 0.06 degrees of shear)
ORTHOGONALITY_TOL = 1e-3
#: largest distance (mm) between qform and sform positions of the volume's corners before a warning
QFORM_SFORM_TOL_MM = 0.1
DEFAULT_MAX_VOXELS = 1_000_000_000


PathLike = Union[str, os.PathLike]


@dataclass(frozen=True, eq=False)
class HeaderInfo:
    """What the header of a NIfTI file says, without its voxels.

    ``shape``, ``zooms`` and ``ndim`` are as stored (a 4D file with one volume has a
    trailing 1); ``spatial_shape`` and ``spacing`` are the three spatial ones.
    ``affine`` is the one nibabel picks (sform if its code > 0, else qform).
    ``dtype`` is the on-disk data type (before any scaling).
    """

    path: Path
    shape: tuple
    affine: np.ndarray
    zooms: tuple
    dtype: np.dtype
    ndim: int
    qform_code: int = 1
    sform_code: int = 2
    scaled: bool = False  # the header carries a slope/intercept other than 1/0

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return int3((tuple(self.shape) + (1, 1, 1))[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along the three spatial axes, from the affine (as ``Volume.spacing``)."""
        norms = np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))
        return float3(norms)

    @property
    def n_voxels(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def axcodes(self) -> tuple[str, str, str]:
        import nibabel as nib

        return str3(nib.aff2axcodes(self.affine))


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` of a read failure, on one line."""
    name = type(exc).__name__
    if name == "error":  # zlib.error and friends
        name = f"{type(exc).__module__}.{name}"
    return one_line(f"{name}: {exc}" if str(exc) else name)


def _load_image(path: Path):
    """nibabel image object (header parsed, data not read)."""
    import nibabel as nib

    if not path.exists():
        raise InputError("file does not exist", path)
    if not path.is_file():
        raise InputError("not a regular file", path)
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise InputError("not a NIfTI file name (expected .nii or .nii.gz)", path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # ImageFileError, HeaderDataError, gzip/zlib/EOF/OSError, ...
        raise InputError(f"cannot read NIfTI header (corrupt, truncated or not NIfTI): {_describe(exc)}",
                         path) from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise InputError(f"not a NIfTI-1/2 image (nibabel read it as {type(img).__name__})", path)
    return img


def _check_affine(aff: np.ndarray, path: Path) -> None:
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise InputError("affine contains NaN or infinite values", path)
    lin = aff[:3, :3]
    norms = np.sqrt((lin ** 2).sum(axis=0))
    if not np.all(norms > 1e-6):
        raise InputError(f"affine has a zero-length axis (spacing {tuple(float(n) for n in norms)})", path)
    det = float(np.linalg.det(lin))
    if not np.isfinite(det) or abs(det) < 1e-9 * float(np.prod(norms)):
        raise InputError("affine is singular (its axes are linearly dependent)", path)
    unit = lin / norms
    dev = float(np.abs(unit.T @ unit - np.eye(3)).max())
    if dev > ORTHOGONALITY_TOL:
        raise InputError(f"affine is sheared: direction cosines not orthogonal (max |R^T R - I| = {dev:.2g} "
                         f"> {ORTHOGONALITY_TOL:g})", path)


def _corners(shape3: tuple[int, int, int]) -> np.ndarray:
    idx = np.array([[i, j, k, 1.0] for i in (0, shape3[0] - 1) for j in (0, shape3[1] - 1)
                    for k in (0, shape3[2] - 1)])
    return idx.T


def _raw_pixdim(path: Path, header_cls) -> Optional[tuple[float, float, float]]:
    """pixdim[1:4] as stored: nibabel's loader silently replaces zero spacing by 1 and negative
    spacing by its absolute value, which would hide a broken header."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path), "rb") as fh:
            raw = header_cls.from_fileobj(fh, check=False)
        return float3(raw["pixdim"][1:4])
    except Exception:  # pragma: no cover - the header was readable a moment ago
        return None


def _header_from_image(img, path: Path, validate: bool) -> HeaderInfo:
    hdr = img.header
    try:
        shape = tuple(int(s) for s in hdr.get_data_shape())
        zooms = tuple(float(z) for z in hdr.get_zooms())
        dtype = np.dtype(hdr.get_data_dtype())
        aff = np.asarray(img.affine, dtype=np.float64)
        qcode = int(hdr["qform_code"])
        scode = int(hdr["sform_code"])
        # nibabel moves the scaling into the data proxy on load (the header then says nan)
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
    except Exception as exc:  # nibabel raises assorted errors on broken headers
        raise InputError(f"broken NIfTI header: {_describe(exc)}", path) from exc
    scaled = not (slope == 1.0 and inter == 0.0)
    info = HeaderInfo(path=path, shape=shape, affine=aff, zooms=zooms, dtype=dtype, ndim=len(shape),
                      qform_code=qcode, sform_code=scode, scaled=scaled)
    if not validate:
        return info

    if len(shape) < 3:
        raise InputError(f"{len(shape)}D image (shape {shape}); a 3D volume is needed", path)
    if any(s > 1 for s in shape[3:]):
        raise InputError(f"{len(shape)}D image with {int(np.prod(shape[3:]))} volumes (shape {shape}); "
                         "a single 3D volume is needed", path)
    if any(s < MIN_AXIS_VOXELS for s in shape[:3]):
        raise InputError(f"degenerate image: shape {shape[:3]} has a spatial axis with fewer than "
                         f"{MIN_AXIS_VOXELS} voxels", path)
    if dtype.kind not in "biuf":
        raise InputError(f"unsupported voxel data type {dtype}", path)
    stored = _raw_pixdim(path, type(hdr))
    pix = tuple(zooms[:3]) if stored is None else stored
    if not all(np.isfinite(z) and z > 0 for z in pix):
        raise InputError(f"invalid voxel spacing in header (pixdim {pix}): must be finite and positive", path)
    if scaled and not (np.isfinite(slope) and np.isfinite(inter)):
        raise InputError(f"invalid intensity scaling (slope {slope}, intercept {inter})", path)
    _check_affine(aff, path)

    if qcode > 0 and scode > 0:
        decoded = True
        try:
            q = np.asarray(hdr.get_qform(), dtype=np.float64)
        except Exception as exc:  # an invalid quaternion (nibabel: "w2 should be positive"); the sform is used
            log.warning("%s: the qform cannot be decoded (%s); using the sform (code %d)", path, _describe(exc), scode)
            q, decoded = np.full((4, 4), np.nan), False
        s = np.asarray(hdr.get_sform(), dtype=np.float64)
        c = _corners(info.spatial_shape)
        dist = float(np.sqrt((((q @ c) - (s @ c))[:3] ** 2).sum(axis=0)).max()) if np.all(np.isfinite(q)) else np.inf
        if decoded and dist > QFORM_SFORM_TOL_MM:
            log.warning("%s: qform and sform disagree (corners up to %.3g mm apart); using the sform "
                        "(code %d)", path, dist, scode)
    elif qcode <= 0 and scode <= 0:
        log.warning("%s: neither qform nor sform is set; orientation is unknown, using nibabel's "
                    "fall-back affine (voxel sizes only)", path)
    return info


def read_header(path: PathLike, *, validate: bool = True) -> HeaderInfo:
    """Read and (by default) validate a NIfTI header; never reads voxel data.

    With ``validate=True`` every header rule of this module is checked (dimensionality,
    degenerate axes, spacing, affine, data type) and :class:`InputError` raised on failure.
    The ``max_voxels`` limit is not applied here (that is ``load_volume``'s job): callers use
    ``info.n_voxels`` for memory estimates.
    """
    p = Path(path)
    img = _load_image(p)
    return _header_from_image(img, p, validate)


def _check_finite(data: np.ndarray, p: Path) -> None:
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_bad = int(data.size - np.count_nonzero(finite))
            raise InputError(f"{n_bad} voxel(s) are NaN or infinite", p)


def _as_labels(data: np.ndarray, p: Path) -> np.ndarray:
    """Label data in an integer dtype: booleans as uint8, integral floats in the smallest
    integer dtype that holds them; ``InputError`` for anything else."""
    if data.dtype.kind == "b":
        return data.astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise InputError("label image holds non-integral values", p)
        try:
            return data.astype(smallest_int_dtype(data))
        except ValueError:  # e.g. a scaling slope of 1e19: integral, but no label value
            raise InputError(f"label values {float(data.min()):g}..{float(data.max()):g} fit no integer type "
                             "(check the header's scl_slope / scl_inter)", p) from None
    if data.dtype.kind not in "iu":  # pragma: no cover - excluded by the header check
        raise InputError(f"unsupported label data type {data.dtype}", p)
    return data


def load_volume(path: PathLike, *, kind: Literal["image", "label"] = "image",
                max_voxels: int = DEFAULT_MAX_VOXELS) -> Volume:
    """Load a validated 3D NIfTI volume.

    ``kind="image"``: float32 data (the header's scaling applied).
    ``kind="label"``: an integer array: the stored integer dtype when the file holds
    unscaled integers, else (float storage or scaling) the values must be integral and are
    stored in the smallest integer dtype that holds them.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    p = Path(path)
    img = _load_image(p)
    info = _header_from_image(img, p, validate=True)
    if info.n_voxels > max_voxels:
        raise InputError(f"image too large: shape {info.shape} has {info.n_voxels} voxels "
                         f"(limit {max_voxels})", p)
    try:
        if kind == "image":
            data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))
        else:
            data = np.asanyarray(img.dataobj)
    except MemoryError as exc:
        from spineps.errors import ResourceError

        raise ResourceError(f"not enough memory to read {info.n_voxels} voxels", p) from exc
    except Exception as exc:  # gzip/zlib/EOF/OSError/ValueError from nibabel's readers
        raise InputError(f"cannot read voxel data (truncated or corrupt file?): {_describe(exc)}", p) from exc
    finally:
        img.uncache()
    data = np.asarray(data)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    if data.shape != info.spatial_shape:  # pragma: no cover - nibabel guarantees this
        raise InputError(f"data shape {data.shape} does not match header shape {info.shape}", p)

    _check_finite(data, p)
    if kind == "label":
        data = _as_labels(data, p)
    if not data.dtype.isnative:  # big-endian files: hand out native byte order (torch, cc3d need it)
        data = data.astype(data.dtype.newbyteorder("="))
    data = np.ascontiguousarray(data) if not (data.flags.c_contiguous or data.flags.f_contiguous) else data
    if not data.flags.writeable:
        data = data.copy()
    return Volume(data, info.affine.copy())


def smallest_int_dtype(data: np.ndarray) -> np.dtype:
    """The smallest unsigned (when no value is negative) or signed integer dtype holding ``data``."""
    if data.size == 0:
        return np.dtype(np.uint8)
    lo, hi = data.min(), data.max()
    if data.dtype.kind == "f":
        lo, hi = float(lo), float(hi)
    else:
        lo, hi = int(lo), int(hi)
    cands = (np.uint8, np.uint16, np.uint32, np.uint64) if lo >= 0 else (np.int8, np.int16, np.int32, np.int64)
    for dt in cands:
        ii = np.iinfo(dt)
        if ii.min <= lo and hi <= ii.max:
            return np.dtype(dt)
    raise ValueError(f"values {lo}..{hi} fit no integer type")


def _target_dtype(data: np.ndarray, dtype, path: Path) -> np.dtype:
    if dtype is None:
        if data.dtype.kind in "biu":
            return smallest_int_dtype(data)
        if data.dtype.kind == "f":
            return np.dtype(np.float32)
        raise OutputError(f"cannot store data of type {data.dtype} in NIfTI", path)
    dt = np.dtype(dtype)
    if dt.kind in "iu" and data.size:
        if data.dtype.kind == "f":
            if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
                raise OutputError(f"non-integral values cannot be stored as {dt}", path)
        ii = np.iinfo(dt)
        lo, hi = data.min(), data.max()
        if lo < ii.min or hi > ii.max:
            raise OutputError(f"values {lo}..{hi} do not fit {dt}", path)
    elif dt.kind not in "f":
        raise OutputError(f"unsupported output dtype {dt}", path)
    return dt


def save_volume(volume: Volume, path: PathLike, *, dtype=None, like: Optional[HeaderInfo] = None) -> Path:
    """Write ``volume`` atomically as ``.nii.gz`` or ``.nii`` (chosen by the name).

    Integer/bool data is stored in the smallest fitting integer dtype, float data as float32,
    unless ``dtype`` is given (values are checked to fit). qform and sform are both set to
    the affine, with the codes of ``like`` when given (a zero code there becomes 1 for the
    qform / 2 for the sform so the affine is never lost), else qform code 1 (scanner) and
    sform code 2 (aligned). Units mm; no intensity scaling (slope 1, intercept 0).
    NIfTI-2 is written when an axis exceeds the NIfTI-1 limit of 32767 voxels.
    """
    import nibabel as nib

    p = Path(path)
    name = p.name.lower()
    if not (name.endswith(".nii.gz") or name.endswith(".nii")):
        raise OutputError("output name must end in .nii or .nii.gz", p)
    data = np.asarray(volume.data)
    dt = _target_dtype(data, dtype, p)
    arr = data if data.dtype == dt else data.astype(dt)
    qcode, scode = 1, 2
    if like is not None:
        qcode = int(like.qform_code) if like.qform_code > 0 else 1
        scode = int(like.sform_code) if like.sform_code > 0 else 2
    cls = nib.Nifti2Image if max(arr.shape) > 32767 else nib.Nifti1Image
    aff = np.asarray(volume.affine, dtype=np.float64)
    img = cls(arr, aff)
    hdr = img.header
    hdr.set_data_dtype(dt)
    img.set_qform(aff, code=qcode)
    img.set_sform(aff, code=scode)
    hdr.set_xyzt_units("mm", "sec")
    hdr["scl_slope"] = 1.0
    hdr["scl_inter"] = 0.0
    try:
        with atomic_path(p) as tmp:
            nib.save(img, str(tmp))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(f"cannot write NIfTI: {_describe(exc)}", p, exc) from exc
    return p
