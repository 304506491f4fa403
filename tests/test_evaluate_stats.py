"""Summaries (no NaN surprises) and the paired Wilcoxon comparison on a constructed set."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from spineps.evaluate.metrics import BOTH_EMPTY, PRED_EMPTY
from spineps.evaluate.stats import MetricRow, compare_methods, higher_is_better, summarize


def rows(method, structure, metric, values, notes=None):
    notes = notes or [""] * len(values)
    return [MetricRow(method, f"sub-{i:02d}", structure, metric, v, n) for i, (v, n) in enumerate(zip(values, notes))]


def test_summary_excludes_both_empty_and_counts_undefined():
    data = rows("A", "ivd", "dice", [0.8, 0.9, 1.0, 0.0], ["", "", BOTH_EMPTY, PRED_EMPTY])
    data += rows("A", "ivd", "assd", [1.0, 3.0, 0.0, math.nan], ["", "", BOTH_EMPTY, PRED_EMPTY])
    s = {(x.structure, x.metric): x for x in summarize(data)}
    d = s[("ivd", "dice")]
    assert d.n == 3 and d.n_both_empty == 1 and d.n_undefined == 0
    assert d.mean == pytest.approx(1.7 / 3)
    assert d.sd == pytest.approx(float(np.std([0.8, 0.9, 0.0], ddof=1)))
    assert d.median == pytest.approx(0.8)
    a = s[("ivd", "assd")]
    assert a.n == 2 and a.n_undefined == 1 and a.mean == 2.0 and a.median == 2.0
    assert a.sd == pytest.approx(math.sqrt(2))
    one = summarize(rows("A", "x", "dice", [0.5]))[0]
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.sd)


def test_wilcoxon_comparison_on_constructed_set():
    a_dice = [0.80, 0.82, 0.79, 0.85, 0.90, 0.70, 0.88, 0.81]
    b_dice = [v + d for v, d in zip(a_dice, [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08])]
    a_assd = [1.0, 1.2, 0.9, 1.5, 1.1, 2.0, 1.3, 0.8]
    b_assd = [v + 0.1 * (k + 1) for k, v in enumerate(a_assd)]
    data = rows("A", "vertebra", "dice", a_dice) + rows("B", "vertebra", "dice", b_dice)
    data += rows("A", "vertebra", "assd", a_assd) + rows("B", "vertebra", "assd", b_assd)
    same = [0.5] * 8
    data += rows("A", "sacrum", "dice", same) + rows("B", "sacrum", "dice", same)
    cmp = {(c.structure, c.metric): c for c in compare_methods(data, "A", "B")}
    d = cmp[("vertebra", "dice")]
    # all 8 differences positive: exact two-sided p = 2 / 2^8
    assert d.n_pairs == 8
    assert d.p_value == pytest.approx(2 / 2 ** 8)
    assert d.p_value == pytest.approx(wilcoxon(np.array(b_dice) - np.array(a_dice)).pvalue)
    assert d.significant and d.better == "B"
    assert d.median_diff == pytest.approx(0.045)
    s = cmp[("vertebra", "assd")]
    assert s.better == "A" and s.significant  # B's distances are larger: A is better
    t = cmp[("sacrum", "dice")]
    assert t.p_value == 1.0 and t.better == "tie" and not t.significant


def test_comparison_pairs_by_scan_and_skips_undefined():
    a = rows("A", "cord", "assd", [1.0, 2.0, math.nan, 4.0])
    b = rows("B", "cord", "assd", [1.5, math.nan, 3.0, 4.5])
    b.append(MetricRow("B", "sub-99", "cord", "assd", 9.0))  # no partner in A
    c = compare_methods(a + b, "A", "B")[0]
    assert c.n_pairs == 2 and c.median_diff == pytest.approx(0.5)
    assert c.better == "A"
    assert "low power" in c.note


def test_both_empty_in_both_is_dropped_but_one_sided_is_kept():
    a = [MetricRow("A", "s1", "sacrum", "dice", 1.0, BOTH_EMPTY),
         MetricRow("A", "s2", "sacrum", "dice", 1.0, BOTH_EMPTY)]
    b = [MetricRow("B", "s1", "sacrum", "dice", 1.0, BOTH_EMPTY),
         MetricRow("B", "s2", "sacrum", "dice", 0.0, "ref_empty")]
    c = compare_methods(a + b, "A", "B")[0]
    assert c.n_pairs == 1 and c.better == "A"


def test_directions():
    assert higher_is_better("dice") and higher_is_better("pq")
    assert higher_is_better("assd") is False and higher_is_better("fp") is False
    assert higher_is_better("level_offset_median") is None
