"""Orientation, resampling and cropping: every transform against its inverse."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from spineps.geometry import Volume
from spineps.geometry.cropping import (Crop, bbox_of, crop_or_pad, crop_to_bbox, cutout_slices, pad_to,
                                       paste_cutout, uncrop, unpad)
from spineps.geometry.io import HeaderInfo
from spineps.geometry.orientation import (from_orientation, is_sagittal, through_plane_axis,
                                          to_orientation)
from spineps.geometry.resampling import back_to_grid, resample_to_grid, spacing_grid, to_spacing

SPACING = (0.6, 0.9, 3.3)


def rotation(axis, deg) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


OBLIQUE = rotation((1, 2, 3), 17.0)


def signed_permutations():
    """All 48 axis orientations: array axis i points along world axis perm[i] with sign s[i]."""
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            p = np.zeros((3, 3))
            for i in range(3):
                p[perm[i], i] = signs[i]
            yield perm, signs, p


def make_affine(p: np.ndarray, spacing=SPACING, rot=OBLIQUE, origin=(12.5, -40.0, 7.25)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rot @ p @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def world(aff: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return idx @ aff[:3, :3].T + aff[:3, 3]


def world_centroid(vol: Volume, label) -> np.ndarray:
    idx = np.argwhere(vol.data == label).astype(float)
    return world(vol.affine, idx.mean(axis=0))


ALL_48 = list(signed_permutations())
TARGETS = [("P", "I", "R"), ("R", "A", "S"), ("L", "P", "I"), ("S", "R", "A")]


# ----------------------------------------------------------------------------- orientation

def test_there_are_48_distinct_orientations():
    codes = {tuple(Volume(np.zeros((2, 2, 2)), make_affine(p, rot=np.eye(3))).axcodes) for _, _, p in ALL_48}
    assert len(codes) == 48


@pytest.mark.parametrize("target", TARGETS)
def test_to_from_orientation_all_48(target):
    rng = np.random.default_rng(3)
    shape = (5, 6, 7)
    data = rng.normal(size=shape).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    labels[1:3, 2:5, 4:6] = 9  # an off-centre blob
    for _, _, p in ALL_48:
        aff = make_affine(p)
        vol = Volume(data, aff)
        out, reo = to_orientation(vol, target)
        assert out.axcodes == target
        assert out.data.flags.c_contiguous
        assert sorted(out.spacing) == pytest.approx(sorted(SPACING))
        back = from_orientation(out, reo)
        assert back.data.dtype == data.dtype and back.data.tobytes() == data.tobytes()
        assert np.array_equal(back.affine, aff) and back.shape == shape
        # every voxel keeps its world position: look each reoriented voxel up in the original
        idx = np.argwhere(np.ones(out.shape, bool)).astype(float)
        src = np.rint(world(np.linalg.inv(aff), world(out.affine, idx))).astype(int)
        np.testing.assert_array_equal(data[tuple(src.T)], out.data.reshape(-1))
        # a labelled blob keeps its world position
        lab_out, lab_reo = to_orientation(Volume(labels, aff), target)
        np.testing.assert_allclose(world_centroid(lab_out, 9), world_centroid(Volume(labels, aff), 9), atol=1e-9)
        assert np.array_equal(from_orientation(lab_out, lab_reo).data, labels)


def test_orientation_errors():
    vol = Volume(np.zeros((3, 4, 5)), make_affine(np.eye(3)))
    for bad in [("P", "I"), ("P", "A", "R"), ("X", "I", "R"), ("R", "L", "S")]:
        with pytest.raises(ValueError):
            to_orientation(vol, bad)
    out, reo = to_orientation(vol, ("P", "I", "R"))
    assert not reo.is_identity
    with pytest.raises(ValueError, match="shape"):
        from_orientation(Volume(np.zeros((4, 4, 4)), out.affine), reo)
    with pytest.raises(ValueError, match="affine"):
        from_orientation(Volume(out.data, out.affine * 2), reo)
    same, reo2 = to_orientation(vol, vol.axcodes)
    assert reo2.is_identity and np.array_equal(same.affine, vol.affine)


def test_sagittal_rule():
    # sagittal 2D stack: thick axis (3.3 mm) along L-R
    sag = make_affine(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), spacing=(0.6, 0.6, 3.3), rot=rotation((0, 0, 1), 10))
    assert through_plane_axis(Volume(np.zeros((4, 4, 4)), sag)) == 2
    assert is_sagittal(sag, (4, 4, 4))
    # axial stack: thick axis along S-I
    ax = make_affine(np.eye(3), spacing=(0.6, 0.6, 3.3), rot=np.eye(3))
    assert not is_sagittal(ax, (4, 4, 4))
    # coronal stack: thick axis along A-P
    cor = make_affine(np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]]), spacing=(0.6, 0.6, 3.3), rot=np.eye(3))
    assert not is_sagittal(cor, (4, 4, 4))
    # thick slices on the first array axis along L-R (PIR-like stored RAS)
    sag0 = make_affine(np.eye(3), spacing=(3.3, 0.6, 0.6), rot=np.eye(3))
    assert is_sagittal(sag0, (4, 4, 4))
    # zooms override the affine's spacing
    assert is_sagittal(ax, (4, 4, 4), zooms=(3.0, 1.0, 1.0))
    # isotropic: the L-R axis is the through-plane axis -> sagittal
    iso = make_affine(np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]), spacing=(1.0, 1.0, 1.1), rot=np.eye(3))
    assert through_plane_axis(Volume(np.zeros((3, 3, 3)), iso)) == 1
    assert is_sagittal(iso, (3, 3, 3))
    info = HeaderInfo(path=None, shape=(4, 4, 4, 1), affine=sag, zooms=(0.6, 0.6, 3.3, 1.0),
                      dtype=np.dtype(np.int16), ndim=4)
    assert through_plane_axis(info) == 2


# ----------------------------------------------------------------------------- resampling

def block_labels(shape=(40, 36, 12)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[4:20, 3:30, 2:10] = 1
    lab[20:36, 3:18, 2:10] = 2
    lab[20:36, 18:30, 2:10] = 3
    lab[8:30, 8:26, 5:8] = 4
    return lab


def test_to_spacing_same_spacing_is_identity():
    rng = np.random.default_rng(0)
    aff = make_affine(np.eye(3))
    img = Volume(rng.normal(size=(6, 7, 8)).astype(np.float32), aff)
    for order in (0, 1, 3):
        out = to_spacing(img, img.spacing, order=order)
        assert np.array_equal(out.data, img.data) and np.array_equal(out.affine, aff)
        assert out.data is not img.data
    lab = Volume(block_labels(), aff)
    out = to_spacing(lab, SPACING, order=0)
    assert out.data.dtype == np.uint8 and np.array_equal(out.data, lab.data)


def test_spacing_grid_convention():
    aff = make_affine(np.eye(3), spacing=(1.0, 1.0, 1.0), rot=np.eye(3), origin=(0, 0, 0))
    vol = Volume(np.zeros((10, 5, 7)), aff)
    shape, new = spacing_grid(vol, (2.0, 0.5, 3.0))
    assert shape == (5, 10, 3)  # ceil(10/2), ceil(5/0.5), ceil(7/3)
    # centres coincide
    np.testing.assert_allclose(world(new, (np.array(shape) - 1) / 2), world(aff, (np.array(vol.shape) - 1) / 2))
    np.testing.assert_allclose(Volume(np.zeros(shape), new).spacing, (2.0, 0.5, 3.0))
    with pytest.raises(ValueError):
        spacing_grid(vol, (1.0, 0.0, 1.0))


def distance_to_other_label(lab: np.ndarray, spacing) -> np.ndarray:
    """mm from each voxel to the nearest voxel holding another label."""
    d = np.full(lab.shape, np.inf)
    for v in np.unique(lab):
        inside = lab == v
        d[inside] = ndimage.distance_transform_edt(inside, sampling=spacing)[inside]
    return d


@pytest.mark.parametrize("coarse", [(1.0, 1.5, 2.0), (2.1, 2.1, 5.0), (0.75, 0.75, 1.65), (3.0, 3.0, 3.0),
                                    (0.4, 0.45, 1.1)])
def test_to_spacing_back_to_grid_labels(coarse):
    aff = make_affine(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), spacing=SPACING)
    lab = Volume(block_labels(), aff)
    mid = to_spacing(lab, coarse, order=0)
    assert mid.data.dtype == np.uint8
    np.testing.assert_allclose(mid.spacing, coarse)
    back = back_to_grid(mid, lab)
    assert back.shape == lab.shape and np.array_equal(back.affine, lab.affine)
    assert back.data.dtype == np.uint8
    wrong = back.data != lab.data
    dist = distance_to_other_label(lab.data, SPACING)
    # mismatches only within one coarse voxel of a block border ...
    assert not (wrong & (dist > max(coarse))).any()
    # ... and fewer than half the voxels lying within half a coarse voxel of one
    near = int((dist <= max(coarse) / 2).sum())
    assert wrong.sum() <= 0.5 * near, (int(wrong.sum()), near)
    if all(c <= s for c, s in zip(coarse, SPACING)):
        assert not wrong.any()  # upsampling in every axis then back is lossless


def test_world_centroid_preserved():
    aff = make_affine(np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]]), spacing=SPACING)
    shape = (40, 30, 12)
    idx = np.indices(shape).astype(float)
    c = np.array([18.3, 14.6, 5.2])
    r2 = sum(((idx[i] - c[i]) * SPACING[i]) ** 2 for i in range(3))
    blob = Volume((r2 < 8.0 ** 2).astype(np.uint8) * 5, aff)
    ref = world_centroid(blob, 5)
    for sp in [(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (2.0, 2.0, 2.0)]:
        out = to_spacing(blob, sp, order=0)
        assert np.linalg.norm(world_centroid(out, 5) - ref) < 0.5 * min(sp)
        img = to_spacing(Volume(blob.data.astype(np.float32), aff), sp, order=3)
        assert img.data.dtype == np.float32
        w = np.clip(img.data, 0, None)
        cm = np.array(ndimage.center_of_mass(w))
        assert np.linalg.norm(world(img.affine, cm) - ref) < 0.5 * min(sp)


def test_resample_to_grid_integer_shift_is_exact():
    rng = np.random.default_rng(4)
    aff = make_affine(np.eye(3))
    lab = Volume(rng.integers(0, 50, size=(8, 9, 10)).astype(np.int32), aff)
    # target grid: same axes, shifted by (2, -1, 3) voxels and flipped on axis 1
    t = np.eye(4)
    t[:3, 3] = [2, 8 - 1, 3]
    t[1, 1] = -1
    tgt_aff = aff @ t
    out = resample_to_grid(lab, (4, 6, 5), tgt_aff, order=0, fill=-7)
    i, j, k = np.meshgrid(np.arange(4), np.arange(6), np.arange(5), indexing="ij")
    si, sj, sk = i + 2, 7 - j, k + 3
    inside = (si < 8) & (sj >= 0) & (sj < 9) & (sk < 10)
    expected = np.full((4, 6, 5), -7, np.int32)
    expected[inside] = lab.data[si[inside], sj[inside], sk[inside]]
    assert out.data.dtype == np.int32 and np.array_equal(out.data, expected)
    assert np.array_equal(out.affine, tgt_aff)
    img = Volume(lab.data.astype(np.float32), aff)
    for order in (1, 3):
        res = resample_to_grid(img, (4, 6, 5), tgt_aff, order=order, fill=0)
        assert res.data.dtype == np.float32
        np.testing.assert_allclose(res.data[inside], expected[inside], atol=1e-3)
        assert np.all(res.data[~inside] == 0)


def test_resample_linear_ramp_and_outside_fill():
    aff = make_affine(np.eye(3), spacing=(1.0, 1.0, 1.0), rot=np.eye(3), origin=(0, 0, 0))
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None] * 2.0 + 1, (20, 4, 4)).copy()
    vol = Volume(ramp, aff)
    fine = to_spacing(vol, (0.5, 1.0, 1.0), order=1)
    n = fine.shape[0]
    x = world(fine.affine, np.stack([np.arange(n), np.zeros(n), np.zeros(n)], 1))[:, 0]
    interior = (x >= 0) & (x <= 19)
    np.testing.assert_allclose(fine.data[interior, 0, 0], 2 * x[interior] + 1, atol=1e-4)
    # outside the source's field of view: fill; within half a voxel of the edge: edge value
    far = aff.copy()
    far[:3, 3] = [100, 100, 100]
    assert np.all(resample_to_grid(vol, (3, 3, 3), far, order=3, fill=-1).data == -1)
    edge = aff.copy()
    edge[0, 3] = -0.4  # first target voxel 0.4 voxel before the first source centre
    out = resample_to_grid(vol, (20, 4, 4), edge, order=0, fill=-1)
    assert out.data[0, 0, 0] == 1.0
    edge[0, 3] = -0.6
    out = resample_to_grid(vol, (20, 4, 4), edge, order=0, fill=-1)
    assert out.data[0, 0, 0] == -1.0 and out.data[1, 0, 0] == 1.0


def test_back_to_grid_from_header_info():
    aff = make_affine(np.eye(3))
    info = HeaderInfo(path=None, shape=(10, 11, 6, 1), affine=aff, zooms=SPACING + (1.0,),
                      dtype=np.dtype(np.int16), ndim=4)
    lab = Volume(np.ones((10, 11, 6), np.uint8), aff)
    mid = to_spacing(lab, (1.0, 1.0, 1.0), order=0)
    back = back_to_grid(mid, info)
    assert back.shape == (10, 11, 6) and np.array_equal(back.affine, aff)
    assert np.all(back.data == 1)  # the coarse grid covers the original: nothing filled
    with pytest.raises(ValueError):
        resample_to_grid(lab, (2, 2, 2), aff, order=7)


# ----------------------------------------------------------------------------- cropping

def test_bbox_of():
    m = np.zeros((10, 12, 8), bool)
    assert bbox_of(m) is None
    m[3:5, 0:2, 6] = True
    assert bbox_of(m) == (slice(3, 5), slice(0, 2), slice(6, 7))
    assert bbox_of(m, margin=2) == (slice(1, 7), slice(0, 4), slice(4, 8))
    assert bbox_of(m, margin=(0, 1, 5)) == (slice(3, 5), slice(0, 3), slice(1, 8))
    with pytest.raises(ValueError):
        bbox_of(m, margin=-1)


def test_crop_uncrop_exact():
    rng = np.random.default_rng(5)
    aff = make_affine(np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]]))
    vol = Volume(rng.integers(1, 9, size=(12, 10, 9)).astype(np.int16), aff)
    mask = np.zeros(vol.shape, bool)
    mask[4:7, 2:3, 5:9] = True
    cropped, crop = crop_to_bbox(vol, mask, margin=1)
    assert isinstance(crop, Crop) and crop.bbox == (slice(3, 8), slice(1, 4), slice(4, 9))
    assert cropped.shape == crop.shape == (5, 3, 5) and crop.offset == (3, 1, 4)
    # world positions unchanged
    idx = np.argwhere(np.ones(cropped.shape, bool)).astype(float)
    np.testing.assert_allclose(world(cropped.affine, idx), world(aff, idx + crop.offset), atol=1e-9)
    back = uncrop(cropped, crop)
    assert np.array_equal(back.affine, aff) and back.data.dtype == np.int16
    assert np.array_equal(back.data[crop.bbox], vol.data[crop.bbox])
    outside = np.ones(vol.shape, bool)
    outside[crop.bbox] = False
    assert np.all(back.data[outside] == 0)
    assert np.all(uncrop(cropped, crop, fill=-3).data[outside] == -3)
    # slices directly; negative/open slices normalised
    c2, crop2 = crop_to_bbox(vol, (slice(None), slice(-4, None), slice(2, 5)))
    assert crop2.bbox == (slice(0, 12), slice(6, 10), slice(2, 5))
    assert np.array_equal(uncrop(c2, crop2).data[crop2.bbox], vol.data[crop2.bbox])
    with pytest.raises(ValueError):
        crop_to_bbox(vol, np.zeros(vol.shape, bool))
    with pytest.raises(ValueError):
        uncrop(vol, crop)


def test_cutout_and_paste_back_exact():
    rng = np.random.default_rng(6)
    arr = rng.integers(1, 100, size=(20, 15, 9)).astype(np.int32)
    size = (8, 8, 6)
    for center in [(10, 7, 4), (1.4, 13.6, 0), (19, 0, 8), (2.5, 2.5, 2.5), (-3, 7, 4)]:
        cut = crop_or_pad(arr, center, size)
        assert cut.shape == size and cut.dtype == arr.dtype
        arr_sl, cut_sl = cutout_slices(arr.shape, center, size)
        assert np.array_equal(cut[cut_sl], arr[arr_sl])
        inside = np.zeros(size, bool)
        inside[cut_sl] = True
        assert np.all(cut[~inside] == 0)  # zero padding at the borders
        assert np.all(cut[inside] > 0)
        c = np.floor(np.asarray(center, float) + 0.5).astype(int)
        if all(0 <= c[i] < arr.shape[i] for i in range(3)):
            assert cut[4, 4, 3] == arr[tuple(c)]  # centre voxel at size // 2
        # paste-back: exact inverse on the overlap, nothing else touched
        target = np.zeros_like(arr)
        paste_cutout(target, cut, center)
        assert np.array_equal(target[arr_sl], arr[arr_sl])
        untouched = np.ones(arr.shape, bool)
        untouched[arr_sl] = False
        assert np.all(target[untouched] == 0)
        copy = arr.copy()
        assert paste_cutout(copy, cut, center) is copy and np.array_equal(copy, arr)
    # completely outside: all fill, paste changes nothing
    far = crop_or_pad(arr, (100, 100, 100), size, fill=-1)
    assert np.all(far == -1)
    copy = arr.copy()
    paste_cutout(copy, far, (100, 100, 100))
    assert np.array_equal(copy, arr)


def test_pad_to_and_unpad():
    arr = np.arange(3 * 5 * 7).reshape(3, 5, 7)
    padded, sl = pad_to(arr, (8, 4, 8))
    assert padded.shape == (8, 5, 8)
    assert sl == (slice(2, 5), slice(0, 5), slice(0, 7))
    assert np.array_equal(unpad(padded, sl), arr)
    assert padded.sum() == arr.sum()
