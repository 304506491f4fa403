"""Dice / ASSD: hand-computed cases, empty masks, anisotropic spacing, and agreement with
independent implementations (SimpleITK's LabelOverlapMeasuresImageFilter for Dice; a
brute-force KD-tree over world-coordinate surface points for ASSD)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spineps.evaluate.metrics import (BOTH_EMPTY, PRED_EMPTY, REF_EMPTY, assd, assd_pooled, dice, hd95, joint_bbox,
                                      surface, surface_distances)


def cube(shape, lo, size) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


# --------------------------------------------------------------------------- by hand
def test_shifted_cubes_dice_and_assd_by_hand():
    # 4^3 cube shifted by one voxel along axis 0: overlap 3x4x4 = 48 -> Dice 96/128
    ref = cube((10, 10, 10), (2, 2, 2), 4)
    pred = cube((10, 10, 10), (3, 2, 2), 4)
    assert dice(ref, pred).value == pytest.approx(0.75, abs=1e-12)
    # 56 surface voxels each; from ref: the x=2 face (16 voxels) is 1 away, the 2x2 centre of
    # the x=5 face is 1 away (from the predicted y/z faces), the other 36 lie on the predicted
    # surface -> sum 20 per direction, ASSD = (20/56 + 20/56) / 2 = 40 / 112
    assert int(surface(ref).sum()) == 56
    assert assd(ref, pred, (1, 1, 1)).value == pytest.approx(40 / 112, abs=1e-12)
    # 2 mm along the shift: the x=2 face is now 2 mm away, the face centre still 1 mm (y/z)
    assert assd(ref, pred, (2, 1, 1)).value == pytest.approx((16 * 2 + 4) * 2 / 112, abs=1e-12)


def test_nested_cubes_assd_by_hand_mean_of_directions():
    # a 2^3 cube in the centre of a 4^3 cube: the two surfaces have 8 and 56 voxels
    ref = cube((8, 8, 8), (2, 2, 2), 4)
    pred = cube((8, 8, 8), (3, 3, 3), 2)
    # every inner voxel is 1 from the outer surface; an outer surface voxel with k coordinates
    # on the outer faces is sqrt(k) from the inner cube (24 with k=1, 24 with k=2, 8 with k=3)
    ref_to_pred = (24 + 24 * math.sqrt(2) + 8 * math.sqrt(3)) / 56
    assert assd(ref, pred, (1, 1, 1)).value == pytest.approx((ref_to_pred + 1.0) / 2, abs=1e-12)
    assert assd_pooled(ref, pred, (1, 1, 1)).value == pytest.approx(
        (24 + 24 * math.sqrt(2) + 8 * math.sqrt(3) + 8) / 64, abs=1e-12)
    assert dice(ref, pred).value == pytest.approx(16 / 72)


def test_identical_masks():
    ref = cube((8, 9, 10), (1, 2, 3), 4)
    assert dice(ref, ref).value == 1.0
    assert assd(ref, ref, (0.7, 1.3, 3.3)).value == 0.0
    assert hd95(ref, ref, (0.7, 1.3, 3.3)).value == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_anisotropic_spacing_assd_in_mm(axis):
    # one-voxel-thick sheets, shifted by 3 voxels along their normal: every surface voxel is
    # exactly 3 x spacing away from the other sheet, whatever the in-plane spacing
    spacing = [0.5, 0.8, 1.1]
    spacing[axis] = 3.3
    shape = [12, 12, 12]
    ref = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    sl = [slice(3, 9)] * 3
    sl[axis] = 4
    ref[tuple(sl)] = True
    sl[axis] = 7
    pred[tuple(sl)] = True
    assert dice(ref, pred).value == 0.0
    assert assd(ref, pred, spacing).value == pytest.approx(9.9, abs=1e-9)
    assert hd95(ref, pred, spacing).value == pytest.approx(9.9, abs=1e-9)


def test_mask_on_the_array_border_and_cropping_is_exact():
    rng = np.random.default_rng(1)
    ref = rng.random((14, 15, 16)) > 0.6
    pred = rng.random((14, 15, 16)) > 0.6
    sp = (0.9, 1.7, 2.5)
    small = assd(ref, pred, sp).value
    # embedded in a larger array (far from its border) the border voxels stay surface only
    # if surface() treats outside-the-array as background: pad with background to check
    big_r = np.pad(ref, 5)
    big_p = np.pad(pred, 5)
    assert assd(big_r, big_p, sp).value == pytest.approx(small, abs=1e-12)


def test_empty_masks_documented_values():
    z = np.zeros((5, 5, 5), dtype=bool)
    m = cube((5, 5, 5), (1, 1, 1), 2)
    assert (dice(z, z).value, dice(z, z).note) == (1.0, BOTH_EMPTY)
    assert (assd(z, z, (1, 1, 1)).value, assd(z, z, (1, 1, 1)).note) == (0.0, BOTH_EMPTY)
    assert not dice(z, z).in_summary and not assd(z, z, (1, 1, 1)).in_summary
    assert (dice(z, m).value, dice(z, m).note) == (0.0, REF_EMPTY)
    assert (dice(m, z).value, dice(m, z).note) == (0.0, PRED_EMPTY)
    assert dice(m, z).in_summary  # a missed structure counts as Dice 0
    a = assd(m, z, (1, 1, 1))
    assert math.isnan(a.value) and a.note == PRED_EMPTY and not a.in_summary
    assert assd(z, m, (1, 1, 1)).note == REF_EMPTY
    assert surface_distances(z, m, (1, 1, 1)) is None
    assert joint_bbox(z, z) is None


def test_bad_inputs():
    m = cube((5, 5, 5), (1, 1, 1), 2)
    with pytest.raises(ValueError):
        dice(m, m[:4])
    with pytest.raises(ValueError):
        assd(m, m, (1, 0, 1))
    with pytest.raises(ValueError):
        assd(m, m, (1, 1))


# --------------------------------------------------------------------------- independent
def _blobs(rng, shape, n):
    from scipy import ndimage

    m = np.zeros(shape, dtype=bool)
    for _ in range(n):
        c = [rng.integers(3, s - 3) for s in shape]
        r = rng.integers(2, 5)
        m[tuple(slice(max(0, a - r), a + r) for a in c)] = True
    return ndimage.binary_dilation(m, iterations=1) & (rng.random(shape) > 0.05)


def test_dice_agrees_with_simpleitk_label_overlap():
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(7)
    for _ in range(5):
        ref = _blobs(rng, (20, 24, 18), 4)
        pred = _blobs(rng, (20, 24, 18), 4) | (ref & (rng.random(ref.shape) > 0.3))
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(sitk.GetImageFromArray(ref.astype(np.uint8)), sitk.GetImageFromArray(pred.astype(np.uint8)))
        assert dice(ref, pred).value == pytest.approx(f.GetDiceCoefficient(1), abs=1e-6)


def _surface_points_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Surface voxels found independently (explicit face-neighbour test on a padded copy)
    and mapped to world millimetres through the affine."""
    p = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for ax in range(3):
        for step in (-1, 1):
            inner &= np.roll(p, step, axis=ax)[1:-1, 1:-1, 1:-1]
    idx = np.argwhere(mask & ~inner).astype(float)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _assd_kdtree(ref, pred, affine) -> float:
    from scipy.spatial import cKDTree

    a = _surface_points_world(ref, affine)
    b = _surface_points_world(pred, affine)
    da, _ = cKDTree(b).query(a)
    db, _ = cKDTree(a).query(b)
    return float((da.mean() + db.mean()) / 2)


def test_assd_agrees_with_bruteforce_kdtree_in_world_coordinates():
    rng = np.random.default_rng(3)
    # a permuted, flipped, anisotropic affine (P-I-R style) with an offset
    lin = np.array([[0.0, 0.0, 1.65], [-0.75, 0.0, 0.0], [0.0, -0.9, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = (-12.0, 30.5, 7.25)
    spacing = np.sqrt((lin ** 2).sum(axis=0))
    for _ in range(4):
        ref = _blobs(rng, (22, 20, 16), 3)
        pred = _blobs(rng, (22, 20, 16), 3) | ref & (rng.random(ref.shape) > 0.5)
        ours = assd(ref, pred, spacing).value
        assert ours == pytest.approx(_assd_kdtree(ref, pred, affine), abs=1e-6)


def test_agrees_with_panoptica_when_installed():
    """panoptica (the SPINEPS authors' evaluation library) is not a dependency: it pins
    numpy < 2.3. Run with it on PYTHONPATH to cross-check (see docs/evaluation.md)."""
    pytest.importorskip("panoptica")
    from panoptica import InputType, Metric, NaiveThresholdMatching, Panoptica_Evaluator

    from spineps.evaluate.matching import match_instances, panoptic_scores

    rng = np.random.default_rng(5)
    spacing = (0.75, 1.3, 3.3)
    for _ in range(3):
        ref = np.zeros((24, 20, 16), dtype=np.int32)
        for v in range(1, 5):
            ref[6 * (v - 1):6 * (v - 1) + 5, 3:15, 2:14] = v
        pred = np.roll(ref, int(rng.integers(-1, 2)), axis=0)
        pred[rng.random(pred.shape) > 0.85] = 0
        pred[pred == 2] = np.where(rng.random() > 0.5, 2, 3)
        ev = Panoptica_Evaluator(expected_input=InputType.UNMATCHED_INSTANCE,
                                 instance_matcher=NaiveThresholdMatching(), decision_metric=Metric.IOU,
                                 decision_threshold=0.5, instance_metrics=[Metric.DSC, Metric.IOU, Metric.ASSD],
                                 global_metrics=[Metric.DSC, Metric.ASSD])
        res = ev.evaluate(pred.astype(np.int32), ref.astype(np.int32), verbose=False, voxelspacing=spacing)
        res = res["ungrouped"] if isinstance(res, dict) else res
        m = match_instances(ref, pred)
        s = panoptic_scores(m)
        assert s["rq"].value == pytest.approx(res.rq, abs=1e-6)
        assert s["sq"].value == pytest.approx(res.sq, abs=1e-6)
        assert s["pq"].value == pytest.approx(res.pq, abs=1e-6)
        assert s["instance_dice"].value == pytest.approx(res.sq_dsc, abs=1e-6)
        assert dice(ref > 0, pred > 0).value == pytest.approx(res.global_bin_dsc, abs=1e-6)
        # per-instance ASSD in mm (panoptica passes the spacing to instance metrics) ...
        inst_assd = np.mean([assd(ref == p.ref, pred == p.pred, spacing).value for p in m.pairs])
        assert inst_assd == pytest.approx(res.sq_assd, abs=1e-6)
        # ... but panoptica 2.1.7 computes its global binary metrics without the spacing (voxels)
        assert assd(ref > 0, pred > 0, (1, 1, 1)).value == pytest.approx(res.global_bin_assd, abs=1e-6)
