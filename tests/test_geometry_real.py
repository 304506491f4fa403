"""The geometry layer on real scans (skipped when ../shared/data/real is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from spineps.geometry.io import load_volume, read_header, save_volume
from spineps.geometry.orientation import from_orientation, is_sagittal, through_plane_axis, to_orientation
from spineps.geometry.resampling import back_to_grid, to_spacing

pytestmark = pytest.mark.real_data

MODEL_SPACING = (0.75, 0.75, 1.65)  # the released T2w model grid (P-I-R)


def test_real_scan_round_trips(real_data, tmp_path):
    img_path = real_data / "VB2" / "sub-vb202_T2w.nii.gz"
    lab_path = real_data / "VB2" / "sub-vb202_desc-vert_dseg.nii.gz"
    if not img_path.exists() or not lab_path.exists():
        pytest.skip(f"{img_path.name} or its labels are missing from {real_data}")
    info = read_header(img_path)
    img = load_volume(img_path)
    lab = load_volume(lab_path, kind="label")
    assert img.data.dtype == np.float32 and lab.data.dtype.kind in "iu"
    assert img.same_grid(lab) and img.shape == info.spatial_shape
    assert is_sagittal(info.affine, info.shape)  # 1 mm iso, slice axis along L-R
    assert info.axcodes[through_plane_axis(info)] in ("L", "R")

    pir, reo = to_orientation(lab, ("P", "I", "R"))
    back = from_orientation(pir, reo)
    assert np.array_equal(back.data, lab.data) and np.array_equal(back.affine, lab.affine)

    model = to_spacing(pir, MODEL_SPACING, order=0)
    again = from_orientation(back_to_grid(model, pir), reo)
    assert again.same_grid(lab)
    for v in np.unique(lab.data[lab.data > 0]):
        a, b = lab.data == v, again.data == v
        dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert dice > 0.95, (int(v), dice)

    out = save_volume(lab, tmp_path / "copy_dseg.nii.gz", like=info)
    reread = load_volume(out, kind="label")
    assert np.array_equal(reread.data, lab.data) and np.allclose(reread.affine, lab.affine, atol=1e-4)


def test_real_headers_sagittal_detection(real_data):
    found = sorted(real_data.glob("*/*_T2w.nii.gz"))
    if not found:
        pytest.skip(f"no T2w scans under {real_data}")
    for path in found:
        info = read_header(path)
        # every scan in the folder is a sagittal acquisition (README)
        assert is_sagittal(info.affine, info.shape, info.zooms[:3]), (path.name, info.axcodes, info.zooms)
