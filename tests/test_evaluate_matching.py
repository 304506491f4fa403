"""Instance matching, RQ/SQ/PQ by hand (split, merged, empty), level naming, and agreement
with an independent brute-force matcher."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spineps.evaluate.matching import (level_naming, level_position, match_instances, overlap_table,
                                       panoptic_scores, select_values)
from spineps.evaluate.metrics import BOTH_EMPTY, NO_MATCH


def strip(shape=(10, 10, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=np.int32)


def test_split_instance_by_hand():
    # reference: one 100-voxel instance; prediction splits it 60 / 40
    ref = strip()
    ref[0:10, 0:1, 0:10] = 20
    pred = strip()
    pred[0:10, 0:1, 0:6] = 20
    pred[0:10, 0:1, 6:10] = 21
    m = match_instances(ref, pred)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    s = panoptic_scores(m)
    assert s["rq"].value == pytest.approx(2 / 3)
    assert s["sq"].value == pytest.approx(0.6)
    assert s["pq"].value == pytest.approx(0.4)
    assert s["instance_dice"].value == pytest.approx(2 * 60 / 160)
    assert m.unmatched_pred == (21,)


def test_merged_instances_by_hand():
    # reference: 60 + 40 voxels; prediction merges both into one 100-voxel instance
    ref = strip()
    ref[0:10, 0:1, 0:6] = 20
    ref[0:10, 0:1, 6:10] = 21
    pred = strip()
    pred[0:10, 0:1, 0:10] = 20
    m = match_instances(ref, pred)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    s = panoptic_scores(m)
    assert s["rq"].value == pytest.approx(2 / 3)
    assert s["sq"].value == pytest.approx(0.6)
    assert s["pq"].value == pytest.approx(0.4)
    assert s["instance_dice"].value == pytest.approx(0.75)
    assert s["instance_dice_per_ref"].value == pytest.approx(0.75 / 2)
    assert m.unmatched_ref == (21,)


def test_iou_exactly_half_is_a_match_and_one_to_one():
    ref = strip()
    ref[0:10, 0:1, 0:10] = 5
    pred = strip()
    pred[0:10, 0:1, 0:5] = 1
    pred[0:10, 0:1, 5:10] = 2
    m = match_instances(ref, pred)
    assert m.tp == 1 and m.fp == 1 and m.pairs[0].iou == pytest.approx(0.5)


def test_perfect_and_mixed_counts():
    ref = strip()
    pred = strip()
    for k, v in enumerate((18, 19, 20)):
        ref[:, :, 5 * k:5 * k + 4] = v
        pred[:, :, 5 * k:5 * k + 4] = v
    pred[:, :, 19] = 22  # a false positive
    m = match_instances(ref, pred)
    assert (m.tp, m.fp, m.fn) == (3, 1, 0)
    s = panoptic_scores(m)
    assert s["sq"].value == 1.0
    assert s["rq"].value == pytest.approx(3 / 3.5)
    assert level_naming(m).accuracy.value == 1.0


def test_empty_cases():
    z = strip()
    s = panoptic_scores(match_instances(z, z))
    assert s["pq"].value == 1.0 and s["pq"].note == BOTH_EMPTY
    ref = strip()
    ref[2:5, 2:5, 2:5] = 7
    s = panoptic_scores(match_instances(ref, z))
    assert s["rq"].value == 0.0 and s["pq"].value == 0.0
    assert math.isnan(s["sq"].value) and s["sq"].note == NO_MATCH
    assert s["fn"].value == 1 and s["fp"].value == 0
    s = panoptic_scores(match_instances(z, ref))
    assert s["fp"].value == 1 and s["rq"].value == 0.0
    assert level_naming(match_instances(ref, z)).accuracy.note == NO_MATCH


def test_level_naming_constant_shift_and_t12_l1():
    ref = strip()
    pred = strip()
    for k, v in enumerate((18, 19, 20, 21)):  # T11 T12 L1 L2
        ref[:, :, 5 * k:5 * k + 4] = v
        pred[:, :, 5 * k:5 * k + 4] = {18: 19, 19: 20, 20: 21, 21: 22}[v]
    naming = level_naming(match_instances(ref, pred))
    assert naming.accuracy.value == 0.0
    assert naming.constant_offset == 1  # T12 named L1 is one level, not two
    assert "shifted by +1 level" in naming.diagnosis and "too low" in naming.diagnosis
    # a single wrong name: no constant shift
    pred2 = ref.copy()
    pred2[ref == 21] = 24
    naming = level_naming(match_instances(ref, pred2))
    assert naming.accuracy.value == pytest.approx(0.75)
    assert naming.constant_offset is None and "L2->L5" in naming.diagnosis


def test_level_position():
    assert level_position(19) + 1 == level_position(20)  # T12 -> L1
    assert level_position(28) == level_position(20)  # T13 takes L1's place
    assert level_position(24) + 1 == level_position(26)  # L5 -> sacrum
    assert level_position(120) == level_position(20)
    assert level_position(0) is None and level_position(230) is None


def test_select_values_and_overlap_table():
    a = np.array([[[0, 1, 2, 101, 201]]])
    assert select_values(a, range(1, 29)).tolist() == [[[0, 1, 2, 0, 0]]]
    ov = overlap_table(np.array([[[1, 1, 2, 0]]]), np.array([[[3, 0, 3, 3]]]))
    assert ov.ref_ids.tolist() == [1, 2] and ov.pred_ids.tolist() == [3]
    assert ov.intersection.tolist() == [[1], [1]]
    assert ov.iou()[0, 0] == pytest.approx(1 / 4)


def _bruteforce(ref: np.ndarray, pred: np.ndarray) -> tuple[int, int, int, float]:
    """Independent: voxel sets per label, strict IoU > 0.5 (unique by construction)."""
    rsets = {int(v): set(map(tuple, np.argwhere(ref == v))) for v in np.unique(ref) if v}
    psets = {int(v): set(map(tuple, np.argwhere(pred == v))) for v in np.unique(pred) if v}
    ious = []
    used_p = set()
    for rs in rsets.values():
        for p, ps in psets.items():
            iou = len(rs & ps) / len(rs | ps)
            assert iou != 0.5
            if iou > 0.5:
                ious.append(iou)
                used_p.add(p)
    tp = len(ious)
    return tp, len(psets) - len(used_p), len(rsets) - tp, (float(np.mean(ious)) if ious else math.nan)


def test_matching_agrees_with_bruteforce():
    rng = np.random.default_rng(11)
    for trial in range(16):
        ref = np.zeros((8, 10, 30), dtype=np.int32)
        pred = np.zeros_like(ref)
        z = 0
        for v in range(1, 6):
            h = int(rng.integers(3, 6))
            ref[:, :, z:z + h] = v
            z += h
        # prediction: the reference shifted/relabelled, with random splits and merges
        shift = int(rng.integers(-1, 2))
        pred = np.roll(ref, shift, axis=2)
        perm = rng.permutation(40) + 1
        pred = np.where(pred > 0, perm[pred], 0)
        if trial % 3 == 0:
            pred[:, :5, :] = np.where(pred[:, :5, :] > 0, 40 + pred[:, :5, :] % 3, 0)
        if trial % 4 == 1:
            pred[pred == perm[2]] = perm[3]
        pred[rng.random(pred.shape) > 0.9] = 0
        m = match_instances(ref, pred)
        s = panoptic_scores(m)
        tp, fp, fn, sq = _bruteforce(ref, pred)
        assert (m.tp, m.fp, m.fn) == (tp, fp, fn)
        if tp:
            assert s["sq"].value == pytest.approx(sq, abs=1e-6)
            assert s["rq"].value == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn), abs=1e-6)
