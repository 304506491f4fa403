"""Label-smooth resampling (``resample_labels``, ``back_to_grid(smooth_labels=True)``) against a
plain per-label reference, and what it buys over nearest neighbour."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import spineps.geometry.resampling as resampling
from spineps.geometry import Volume
from spineps.geometry.io import HeaderInfo
from spineps.geometry.resampling import back_to_grid, resample_labels, resample_to_grid, spacing_grid


def rotation(axis, deg) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def blob_labels(shape=(24, 30, 10), labels=(1, 2, 3, 5), seed=0, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    src = np.zeros(shape, dtype)
    for i, lab in enumerate(labels):
        src[ndimage.gaussian_filter(rng.random(shape), 2.5) > 0.5 + 0.004 * i] = lab
    return src


def per_label_reference(vol: Volume, shape, affine, fill=0) -> np.ndarray:
    """The definition, written the slow way: every label's indicator linearly resampled over the
    whole target grid; the largest wins unless it does not beat the nearest label's score."""
    src = np.asarray(vol.data)
    labels = np.unique(src)
    near = np.asarray(resample_to_grid(vol, shape, affine, order=0, fill=fill).data)
    scores = np.stack([resample_to_grid(Volume((src == lab).astype(np.float32), vol.affine), shape, affine,
                                        order=1, fill=0).data for lab in labels])
    known = np.isin(near, labels)  # outside the field of view ``near`` holds ``fill``
    pos = np.where(known, np.searchsorted(labels, near), 0)
    own = np.where(known, np.take_along_axis(scores, pos[None], 0)[0], 0.0)
    best = labels[scores.argmax(0)].astype(src.dtype)
    out = np.where(scores.max(0) > own + 1e-4, best, near)
    outside = resampling._outside_mask(vol.shape, shape, np.linalg.solve(vol.affine, affine))
    if outside is not None:
        out[outside] = fill
    return out


def oblique_target(vol: Volume, spacing=(0.5, 0.7, 1.1), deg=11.0, shift=(0.0, 0.0, 0.0)):
    shape, aff = spacing_grid(vol, spacing)
    rot = np.eye(4)
    rot[:3, :3] = rotation((1, -2, 3), deg)
    centre = vol.affine[:3, :3] @ ((np.asarray(vol.shape) - 1) / 2) + vol.affine[:3, 3]
    t = np.eye(4)
    t[:3, 3] = centre + np.asarray(shift)
    t_inv = np.eye(4)
    t_inv[:3, 3] = -centre
    return shape, t @ rot @ t_inv @ aff


@pytest.mark.parametrize("chunk", [1 << 18, 997])
def test_equals_per_label_reference_on_an_oblique_anisotropic_grid(monkeypatch, chunk):
    monkeypatch.setattr(resampling, "_LABEL_CHUNK", chunk)  # several chunks, too
    aff = np.diag([1.5, 1.2, 3.3, 1.0])
    aff[:3, :3] = rotation((2, 1, 0), 25.0) @ aff[:3, :3]
    aff[:3, 3] = [5.0, -3.0, 2.0]
    vol = Volume(blob_labels(), aff)
    # rotated, finer in every axis, shifted so that part of the target lies outside the source
    shape, taff = oblique_target(vol, shift=(4.0, -6.0, 3.0))
    out = resample_labels(vol, shape, taff)
    ref = per_label_reference(vol, shape, taff)
    near = resample_to_grid(vol, shape, taff, order=0).data
    assert out.data.dtype == np.uint8 and out.shape == tuple(shape)
    assert np.array_equal(out.affine, taff)
    assert np.array_equal(out.data, ref)
    assert (out.data != near).sum() > 1000  # the smoothing did something


def test_identity_grid_single_label_and_no_boundary_are_nearest_neighbour():
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    src = blob_labels(shape=(10, 12, 6))
    vol = Volume(src, aff)
    same = resample_labels(vol, vol.shape, aff)
    assert np.array_equal(same.data, src)
    same.data[...] = 0
    assert src.any()  # a copy, not a view of the input
    shape, taff = spacing_grid(vol, (0.5, 0.5, 0.5))
    for single in (np.full(src.shape, 4, np.uint8), np.zeros(src.shape, np.uint8)):
        one = Volume(single, aff)
        assert np.array_equal(resample_labels(one, shape, taff).data,
                              resample_to_grid(one, shape, taff, order=0).data)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.uint16])
def test_integer_dtypes_are_kept(dtype):
    vol = Volume(blob_labels(shape=(12, 14, 6), labels=(1, 2, 300) if np.dtype(dtype).itemsize > 1 else (1, 2, 30),
                             dtype=dtype), np.diag([2.0, 2.0, 3.0, 1.0]))
    shape, taff = spacing_grid(vol, (1.0, 1.0, 1.0))
    out = resample_labels(vol, shape, taff)
    assert out.data.dtype == dtype
    assert set(np.unique(out.data)) <= set(np.unique(vol.data))
    assert np.array_equal(out.data, per_label_reference(vol, shape, taff))


def test_bool_mask_and_float_input():
    mask = blob_labels(shape=(12, 14, 6), labels=(1,)).astype(bool)
    vol = Volume(mask, np.diag([2.0, 2.0, 3.0, 1.0]))
    shape, taff = spacing_grid(vol, (1.0, 1.0, 1.0))
    out = resample_labels(vol, shape, taff)
    assert out.data.dtype == bool
    assert np.array_equal(out.data, per_label_reference(vol, shape, taff))
    with pytest.raises(ValueError, match="integer label volume"):
        resample_labels(Volume(mask.astype(np.float32), vol.affine), shape, taff)


def test_fill_outside_the_field_of_view():
    vol = Volume(blob_labels(shape=(12, 14, 6)), np.diag([2.0, 2.0, 3.0, 1.0]))
    taff = np.diag([1.0, 1.0, 1.0, 1.0])
    taff[:3, 3] = [-10.0, 0.0, 0.0]  # the first 10 target columns lie before the source
    out = resample_labels(vol, (30, 20, 12), taff, fill=9)
    assert np.all(out.data[:9] == 9)
    assert not np.any(out.data[10:] == 9)
    assert np.array_equal(out.data, per_label_reference(vol, (30, 20, 12), taff, fill=9))


def test_a_coarse_sphere_comes_back_closer_to_the_true_sphere_than_nearest_neighbour():
    """A ball and a shell around it drawn on a 3 mm grid, upsampled to 0.75 mm: the smooth
    outline matches the analytic shapes better than nearest neighbour's staircase."""
    def shapes(shape, spacing, centre):
        idx = np.indices(shape).astype(float)
        r = np.sqrt(sum(((idx[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)))
        lab = np.zeros(shape, np.uint8)
        lab[r < 16.0] = 2
        lab[r < 10.0] = 1
        return lab

    coarse_sp, fine_sp = (3.0, 3.0, 3.0), (0.75, 0.75, 0.75)
    coarse = Volume(shapes((14, 14, 14), coarse_sp, (6.4, 6.7, 6.2)), np.diag(coarse_sp + (1.0,)))
    shape, taff = spacing_grid(coarse, fine_sp)
    # the fine grid's voxel centres in coarse voxel units -> the same analytic shapes
    centre_fine = np.linalg.solve(taff, coarse.affine @ np.array([6.4, 6.7, 6.2, 1.0]))[:3]
    truth = shapes(shape, fine_sp, centre_fine)
    smooth = resample_labels(coarse, shape, taff).data
    near = resample_to_grid(coarse, shape, taff, order=0).data

    def dice(a, b, lab):
        return 2 * np.sum((a == lab) & (b == lab)) / (np.sum(a == lab) + np.sum(b == lab))

    for lab in (1, 2):
        assert dice(smooth, truth, lab) > dice(near, truth, lab) + 0.01, lab
    assert np.sum(smooth != truth) < 0.75 * np.sum(near != truth)


def test_back_to_grid_smooth_labels_on_a_header_reference():
    aff = np.diag([0.8, 0.8, 1.6, 1.0])
    info = HeaderInfo(path=None, shape=(30, 30, 15, 1), affine=aff, zooms=(0.8, 0.8, 1.6, 1.0),
                      dtype=np.dtype(np.int16), ndim=4)
    fine = Volume(blob_labels(shape=(30, 30, 15)), aff)
    shape, caff = spacing_grid(fine, (2.0, 2.0, 3.2))
    coarse = resample_to_grid(fine, shape, caff, order=0)
    back = back_to_grid(coarse, info, smooth_labels=True)
    assert back.shape == (30, 30, 15) and np.array_equal(back.affine, aff)
    assert np.array_equal(back.data, resample_labels(coarse, (30, 30, 15), aff).data)
    assert np.array_equal(back_to_grid(coarse, info).data, resample_to_grid(coarse, (30, 30, 15), aff, order=0).data)
    # closer to the fine original than nearest neighbour
    assert np.sum(back.data != fine.data) < np.sum(back_to_grid(coarse, info).data != fine.data)
