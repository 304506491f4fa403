"""Pre-processing and clean-up of the semantic phase (small arrays, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from spineps.labels import BODY, CANAL, CORD, DISC
from spineps.semantic.cleanup import clean_semantic, fill_holes, keep_spine, remove_small_components
from spineps.semantic.preprocess import INTENSITY_CAP, n4_correct, nonzero_bbox, normalize_range


# ---------------------------------------------------------------------------------------- intensity
def test_normalize_range_shifts_minimum_to_zero_without_scaling_below_cap():
    a = np.array([[[-200.0, 0.0], [100.0, 1000.0]]], dtype=np.float32)
    out = normalize_range(a)
    assert out.dtype == np.float32
    assert out.min() == 0.0
    np.testing.assert_allclose(out, a + 200.0)  # max 1200 <= 1500: shift only


def test_normalize_range_caps_to_1500_linearly():
    a = np.linspace(100, 4100, 27, dtype=np.float32).reshape(3, 3, 3)
    out = normalize_range(a)
    assert out.min() == 0.0
    assert out.max() == pytest.approx(INTENSITY_CAP, rel=1e-6)
    np.testing.assert_allclose(out, (a - 100) * (1500 / 4000), rtol=1e-5)


def test_normalize_range_low_range_and_nonfinite():
    a = np.array([[[0.01, 0.02], [np.nan, 0.03]]], dtype=np.float32)
    out = normalize_range(a)
    assert np.isfinite(out).all()
    assert out.max() == pytest.approx(0.02, abs=1e-6)  # tiny ranges are not stretched


# ---------------------------------------------------------------------------------------- N4
def _biased_phantom(rng: np.random.Generator) -> tuple[np.ndarray, tuple[slice, ...]]:
    shape = (40, 48, 24)
    img = np.zeros(shape, np.float32)
    box = (slice(6, 34), slice(5, 43), slice(4, 20))
    zz = np.linspace(0.6, 1.4, box[1].stop - box[1].start, dtype=np.float32)
    field = np.broadcast_to(zz[None, :, None], tuple(s.stop - s.start for s in box))
    tissue = 400 + 20 * rng.standard_normal(field.shape).astype(np.float32)
    img[box] = tissue * field
    return img, box


def test_n4_restricted_to_bbox_leaves_outside_untouched_and_flattens_inside():
    rng = np.random.default_rng(0)
    img, box = _biased_phantom(rng)
    # something outside the non-zero box must never change: put a negative (=zero after
    # normalisation) frame there that is not part of the foreground
    assert nonzero_bbox(img > 0) == box
    out = n4_correct(img, (1.0, 1.0, 2.0))
    outside = np.ones(img.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(out[outside], img[outside])
    inside_before, inside_after = img[box], out[box]
    # the bias along axis 1 is reduced: the profile of row means gets flatter
    prof_b = inside_before.mean(axis=(0, 2))
    prof_a = inside_after.mean(axis=(0, 2))
    assert (prof_a.std() / prof_a.mean()) < 0.6 * (prof_b.std() / prof_b.mean())


def test_n4_with_explicit_mask_keeps_voxels_outside_mask_box():
    rng = np.random.default_rng(1)
    img, box = _biased_phantom(rng)
    img[0:3] = 50.0  # a bright frame outside the mask's box
    mask = np.zeros(img.shape, bool)
    mask[box] = True
    out = n4_correct(img, (1.0, 1.0, 2.0), mask=mask)
    np.testing.assert_array_equal(out[0:3], img[0:3])


def test_n4_all_zero_image_is_returned_unchanged():
    z = np.zeros((8, 8, 8), np.float32)
    np.testing.assert_array_equal(n4_correct(z, (1, 1, 1)), z)


# ---------------------------------------------------------------------------------------- clean-up
def test_small_components_by_mm3_respect_anisotropic_spacing():
    m = np.zeros((30, 30, 30), np.uint8)
    m[2:12, 2:12, 2:12] = BODY  # 1000 voxels
    m[20:22, 20:25, 20] = DISC  # 10 voxels
    # 10 voxels of 1 x 1 x 3 mm = 30 mm^3
    kept = remove_small_components(m, (1.0, 1.0, 3.0), min_mm3=25.0)
    assert (kept == DISC).sum() == 10
    removed = remove_small_components(m, (1.0, 1.0, 3.0), min_mm3=35.0)
    assert (removed == DISC).sum() == 0
    assert (removed == BODY).sum() == 1000
    # the same 10 voxels at 1 mm isotropic are only 10 mm^3
    assert (remove_small_components(m, (1.0, 1.0, 1.0), min_mm3=25.0) == DISC).sum() == 0


def test_small_components_are_per_label():
    m = np.zeros((20, 20, 20), np.uint8)
    m[5:10, 5:10, 5:10] = BODY
    m[10:11, 5:7, 5:7] = DISC  # touches the body but is its own (small) label component
    out = remove_small_components(m, (1, 1, 1), min_mm3=8)
    assert (out == DISC).sum() == 0 and (out == BODY).sum() == 125


def test_keep_spine_drops_far_components_and_keeps_near_ones():
    m = np.zeros((60, 60, 20), np.uint8)
    m[10:40, 20:30, 5:15] = BODY  # the spine
    m[42:46, 22:26, 8:12] = DISC  # 2 voxels beyond the body: kept
    m[55:59, 52:58, 2:6] = CANAL  # far away (> 15 mm outside the box): dropped
    out = keep_spine(m, (1.0, 1.0, 1.0), margin_mm=5.0)
    assert (out == DISC).sum() == 64
    assert (out == CANAL).sum() == 0
    assert (out == BODY).sum() == (m == BODY).sum()


def test_fill_holes_fills_background_only_and_keeps_cord_in_canal():
    m = np.zeros((30, 30, 12), np.uint8)
    m[5:15, 5:15, 2:10] = BODY
    m[9:11, 9:11, 5:7] = 0  # enclosed hole in the body
    m[18:28, 5:25, 2:10] = CANAL
    m[21:25, 8:22, 4:8] = CORD  # cord inside the canal
    m[19, 6, 5] = 0  # hole in the canal wall region (enclosed)
    out = fill_holes(m, (BODY, DISC, CANAL, CORD), sagittal_axis=2)
    assert (out[9:11, 9:11, 5:7] == BODY).all()
    assert out[19, 6, 5] == CANAL
    assert (out == CORD).sum() == (m == CORD).sum()


def test_fill_holes_sagittal_slicewise_fills_holes_open_along_lr():
    m = np.zeros((20, 20, 6), np.uint8)
    m[5:15, 5:15, :] = DISC
    m[8:11, 8:11, :] = 0  # a tunnel through all sagittal slices: not a 3D hole
    three_d = fill_holes(m, (DISC,), sagittal_axis=None)
    assert (three_d[8:11, 8:11, :] == 0).all()
    sag = fill_holes(m, (DISC,), sagittal_axis=2)
    assert (sag[8:11, 8:11, :] == DISC).all()


def test_clean_semantic_chain():
    m = np.zeros((40, 40, 10), np.uint8)
    m[5:30, 10:20, 2:8] = BODY
    m[12:14, 12:14, 4:6] = 0
    m[36, 36, 1] = DISC  # a speck
    out = clean_semantic(m, (1.5, 1.5, 3.0))
    assert out[36, 36, 1] == 0
    assert (out[12:14, 12:14, 4:6] == BODY).all()
    assert out.dtype == m.dtype and out.shape == m.shape
