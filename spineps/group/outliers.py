"""Robust cohort outliers: per (level, structure, measure), the median and the median
absolute deviation (MAD) over the scans that have the measurement; a value is an outlier
when its robust z-score

    z = (value - median) / (1.4826 * MAD)

has ``|z| > OUTLIER_Z`` (3.5, the threshold of Iglewicz & Hoaglin's modified z-score; the
factor 1.4826 makes the MAD a consistent estimate of the standard deviation for normal data).
Measurements held by fewer than ``MIN_SCANS`` (5) scans are not judged. The scale has a floor
of ``REL_FLOOR`` (3 %, about the measurement tolerance of ``spineps.measure``) of ``|median|``,
so a deviation smaller than about 10 % of the median is never an outlier, even in a cohort of
near-identical values (e.g. repeated scans or synthetic data) whose MAD is tiny.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["OUTLIER_Z", "MIN_SCANS", "MAD_SCALE", "REL_FLOOR", "CohortStat", "Outlier", "robust_outliers"]

OUTLIER_Z = 3.5
MIN_SCANS = 5
MAD_SCALE = 1.4826
REL_FLOOR = 0.03


@dataclass(frozen=True)
class CohortStat:
    n: int
    median: float
    mad: float
    scale: float  # the z-score denominator (scaled MAD with its floor)
    q1: float
    q3: float
    lo: float  # lower whisker: smallest value >= q1 - 1.5 IQR
    hi: float  # upper whisker


@dataclass(frozen=True)
class Outlier:
    scan: str
    key: Hashable
    value: float
    median: float
    z: float


def _stat(vals: np.ndarray) -> CohortStat:
    med = float(np.median(vals))
    mad = float(np.median(np.abs(vals - med)))
    scale = max(MAD_SCALE * mad, REL_FLOOR * abs(med), 1e-12)
    q1, q3 = (float(x) for x in np.percentile(vals, [25, 75]))
    iqr = q3 - q1
    inside = vals[(vals >= q1 - 1.5 * iqr) & (vals <= q3 + 1.5 * iqr)]
    lo = float(inside.min()) if inside.size else q1
    hi = float(inside.max()) if inside.size else q3
    return CohortStat(int(vals.size), med, mad, scale, q1, q3, lo, hi)


def robust_outliers(table: Mapping[Any, Sequence[tuple[str, float]]], *, threshold: float = OUTLIER_Z,
                    min_scans: int = MIN_SCANS) -> tuple[dict[Hashable, CohortStat], list[Outlier]]:
    """``table``: key (e.g. ``("L1", "body", "height_middle_mm")``) -> ``[(scan, value), ...]``.
    Non-finite values are ignored. Returns the statistics of every key and the outliers,
    sorted by ``|z|`` (largest first)."""
    stats: dict[Hashable, CohortStat] = {}
    found: list[Outlier] = []
    for key, pairs in table.items():
        names = [s for s, v in pairs if v is not None and math.isfinite(v)]
        vals = np.asarray([v for s, v in pairs if v is not None and math.isfinite(v)], float)
        if not vals.size:
            continue
        st = _stat(vals)
        stats[key] = st
        if vals.size < min_scans:
            continue
        z = (vals - st.median) / st.scale
        for i in np.flatnonzero(np.abs(z) > threshold):
            found.append(Outlier(names[i], key, float(vals[i]), st.median, float(z[i])))
    found.sort(key=lambda o: -abs(o.z))
    return stats, found


def per_scan(outliers: Iterable[Outlier]) -> dict[str, list[Outlier]]:
    out: dict[str, list[Outlier]] = {}
    for o in outliers:
        out.setdefault(o.scan, []).append(o)
    return out
