"""Summaries of per-scan metric rows and the paired comparison of two methods.

Rows are long-format :class:`MetricRow` (method, scan, structure, metric, value, note).

Summary per (method, structure, metric): ``n`` (values used), ``mean``, ``sd`` (sample SD,
ddof = 1; undefined for n < 2), ``median``, ``min``, ``max``, ``n_undefined`` (NaN values,
e.g. ASSD with an empty mask) and ``n_both_empty`` (structure absent from reference and
prediction: written per scan, never averaged). No statistic is NaN unless ``n`` says why.

Paired comparison (SPINEPS paper section 2.6): for each (structure, metric) the scans where
both methods have a defined value (a scan where both are ``both_empty`` is dropped: nothing
to compare) give differences d = B - A; ``scipy.stats.wilcoxon`` (two-sided, zero
differences dropped, the "wilcox" rule) gives the p-value. Effect direction: the median
difference (and the mean as a tie-break), turned into "which method is better" by the
metric's direction (higher is better for Dice/RQ/SQ/PQ/accuracy, lower for ASSD/HD95/FP/FN).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from spineps.evaluate.metrics import BOTH_EMPTY

__all__ = [
    "MetricRow",
    "SummaryRow",
    "ComparisonRow",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "higher_is_better",
    "summarize",
    "compare_methods",
]

HIGHER_IS_BETTER = frozenset({"dice", "rq", "sq", "pq", "instance_dice", "instance_dice_per_ref",
                              "level_accuracy", "tp"})
LOWER_IS_BETTER = frozenset({"assd", "hd95", "instance_assd", "fp", "fn"})


def higher_is_better(metric: str) -> Optional[bool]:
    """True / False for metrics with a direction, None for descriptive ones (offsets)."""
    if metric in HIGHER_IS_BETTER:
        return True
    if metric in LOWER_IS_BETTER:
        return False
    return None


@dataclass(frozen=True)
class MetricRow:
    method: str
    scan: str
    structure: str
    metric: str
    value: float
    note: str = ""

    @property
    def in_summary(self) -> bool:
        return math.isfinite(self.value) and self.note != BOTH_EMPTY


@dataclass(frozen=True)
class SummaryRow:
    method: str
    structure: str
    metric: str
    n: int
    mean: float
    sd: float
    median: float
    min: float
    max: float
    n_undefined: int
    n_both_empty: int


@dataclass(frozen=True)
class ComparisonRow:
    structure: str
    metric: str
    method_a: str
    method_b: str
    n_pairs: int
    median_a: float
    median_b: float
    median_diff: float  # median of (B - A)
    mean_diff: float
    better: str  # method_a, method_b, "tie" or "n/a" (no direction)
    statistic: float
    p_value: float
    significant: bool
    note: str = ""


def _ordered_keys(rows: Iterable[MetricRow], with_method: bool) -> list[tuple]:
    seen: dict[tuple, None] = {}
    for r in rows:
        key = (r.method, r.structure, r.metric) if with_method else (r.structure, r.metric)
        seen.setdefault(key, None)
    return list(seen)


def summarize(rows: Sequence[MetricRow]) -> list[SummaryRow]:
    """One :class:`SummaryRow` per (method, structure, metric), in first-seen order."""
    groups: dict[tuple, list[MetricRow]] = {}
    for r in rows:
        groups.setdefault((r.method, r.structure, r.metric), []).append(r)
    out: list[SummaryRow] = []
    for key in _ordered_keys(rows, True):
        grp = groups[key]
        vals = np.array([r.value for r in grp if r.in_summary], dtype=np.float64)
        n_undef = sum(1 for r in grp if not math.isfinite(r.value))
        n_empty = sum(1 for r in grp if r.note == BOTH_EMPTY)
        n = int(vals.size)
        nan = math.nan
        out.append(SummaryRow(
            method=key[0], structure=key[1], metric=key[2], n=n,
            mean=float(vals.mean()) if n else nan,
            sd=float(vals.std(ddof=1)) if n >= 2 else nan,
            median=float(np.median(vals)) if n else nan,
            min=float(vals.min()) if n else nan,
            max=float(vals.max()) if n else nan,
            n_undefined=n_undef, n_both_empty=n_empty,
        ))
    return out


def _wilcoxon(diffs: np.ndarray) -> tuple[float, float, str]:
    """(statistic, p, note) of a two-sided Wilcoxon signed-rank test on paired differences."""
    from scipy.stats import wilcoxon

    nonzero = diffs[diffs != 0]
    if nonzero.size == 0:
        return math.nan, 1.0, "all differences zero"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = wilcoxon(diffs, zero_method="wilcox", alternative="two-sided")
        except ValueError as exc:  # pragma: no cover - guarded above
            return math.nan, math.nan, f"test failed: {exc}"
    note = f"only {nonzero.size} non-zero difference(s): low power" if nonzero.size < 6 else ""
    return float(res.statistic), float(res.pvalue), note


def compare_methods(rows: Sequence[MetricRow], method_a: str, method_b: str, *,
                    alpha: float = 0.05) -> list[ComparisonRow]:
    """Paired Wilcoxon signed-rank comparison of ``method_b`` against ``method_a`` per
    (structure, metric), pairing rows by scan."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    by_key: dict[tuple, dict[str, dict[str, MetricRow]]] = {}
    for r in rows:
        if r.method not in (method_a, method_b):
            continue
        by_key.setdefault((r.structure, r.metric), {}).setdefault(r.method, {})[r.scan] = r
    out: list[ComparisonRow] = []
    keys = [k for k in _ordered_keys(rows, False) if k in by_key]
    for key in keys:
        a_rows = by_key[key].get(method_a, {})
        b_rows = by_key[key].get(method_b, {})
        a_vals, b_vals = [], []
        for scan in sorted(set(a_rows) & set(b_rows)):
            ra, rb = a_rows[scan], b_rows[scan]
            if not (math.isfinite(ra.value) and math.isfinite(rb.value)):
                continue
            if ra.note == BOTH_EMPTY and rb.note == BOTH_EMPTY:
                continue
            a_vals.append(ra.value)
            b_vals.append(rb.value)
        n = len(a_vals)
        if n == 0:
            continue
        a = np.asarray(a_vals)
        b = np.asarray(b_vals)
        d = b - a
        med, mean = float(np.median(d)), float(d.mean())
        stat, p, note = _wilcoxon(d)
        direction = higher_is_better(key[1])
        effect = med if med != 0 else mean
        if direction is None:
            better = "n/a"
        elif effect == 0:
            better = "tie"
        else:
            better = method_b if (effect > 0) == direction else method_a
        out.append(ComparisonRow(
            structure=key[0], metric=key[1], method_a=method_a, method_b=method_b, n_pairs=n,
            median_a=float(np.median(a)), median_b=float(np.median(b)), median_diff=med, mean_diff=mean,
            better=better, statistic=stat, p_value=p,
            significant=bool(math.isfinite(p) and p < alpha), note=note,
        ))
    return out
