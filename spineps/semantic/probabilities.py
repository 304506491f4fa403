"""``--save-probabilities``: the semantic network's class probabilities of one scan as a BIDS
``_probseg`` map, 4D on the scan's own grid (one volume per network output, background first),
written atomically, and the sidecar fields that say which label each volume holds.

They are held as float16 in memory. NIfTI has no 16-bit float datatype (nibabel refuses
float16), so the file stores 16-bit fixed point: uint16 with ``scl_slope`` = 1/65535 (what
any NIfTI reader applies), the same 2 bytes per value as float16 and a uniform step of
1.5e-5 (float16's step near 1 is 4.9e-4)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spineps.errors import OutputError

__all__ = ["save_probseg", "volume_labels", "PROB_SCALE"]

#: stored value = round(probability * PROB_SCALE) (uint16); scl_slope = 1 / PROB_SCALE
PROB_SCALE = 65535

log = logging.getLogger(__name__)


def volume_labels(labels: Sequence[int]) -> list[dict[str, Any]]:
    """``VolumeLabels`` of the sidecar: index of each 4th-axis volume, its label value and name
    (as in ``desc-spine_dseg.tsv``)."""
    from spineps.labels import SEMANTIC_BY_VALUE

    out = []
    for i, value in enumerate(labels):
        lab = SEMANTIC_BY_VALUE.get(int(value))
        out.append({"index": i, "value": int(value), "name": "background" if int(value) == 0 else
                    (lab.name if lab is not None else f"label {int(value)}")})
    return out


def save_probseg(path: Path, data: np.ndarray, affine: np.ndarray, like: Optional[Any] = None) -> Path:
    """Write ``data`` (x, y, z, classes; values 0-1) as 16-bit fixed-point NIfTI with ``affine``
    (qform and sform codes of ``like``, a ``HeaderInfo``, when given). ``OutputError`` on failure."""
    import nibabel as nib

    from spineps.fsutil import atomic_path

    if np.ndim(data) != 4:
        raise ValueError(f"a probseg map is 4D (x, y, z, classes), got shape {np.shape(data)}")
    shape = tuple(int(n) for n in np.shape(data))
    arr = np.empty(shape, np.uint16)
    for c in range(shape[3]):  # one class at a time: no float32 copy of the whole map
        arr[..., c] = np.rint(np.clip(np.asarray(data[..., c], dtype=np.float32), 0.0, 1.0) * PROB_SCALE)
    aff = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, aff)
    img.header.set_data_dtype(np.uint16)
    qcode = int(getattr(like, "qform_code", 1) or 1)
    scode = int(getattr(like, "sform_code", 2) or 2)
    img.set_qform(aff, code=qcode)
    img.set_sform(aff, code=scode)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0 / PROB_SCALE, 0.0)
    try:
        with atomic_path(Path(path)) as tmp:
            nib.save(img, str(tmp))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write the probability map: {exc.strerror or exc}", path) from exc
    return Path(path)
