"""What a phantom's spinal alignment truly is: the alignment measures implied by the
generator's own endplate planes (``Phantom.meta["endplates_world"]``, see
``spineps.synth.anatomy``), for the tests and benchmarks that check the measurements made
on masks (``spineps.measure.alignment``).

Conventions (world RAS mm; ``n`` an endplate's unit normal pointing superiorly):

- sagittal tilt ``atan2(n_A, n_S)`` and coronal tilt ``atan2(n_R, n_S)``, degrees;
- a curve from an upper to a lower endplate: upper tilt minus lower tilt is positive for a
  kyphosis, so a lordosis is the lower tilt minus the upper one;
- Cobb angle: the largest ``|coronal tilt(superior endplate of U) - coronal tilt(inferior
  endplate of B)|`` over thoracic and lumbar vertebrae ``U`` above ``B``, with ``U`` and ``B``
  the end vertebrae;
- wedge angle of a body: sagittal tilt of its superior endplate minus that of its inferior one;
- slip of a motion segment (vertebra ``V`` on the one below, ``W``): the posterior-inferior
  corner of ``V`` minus the posterior-superior corner of ``W``, along ``W``'s superior
  endplate (posterior to anterior corner), mm and percent of that endplate's length.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["sagittal_tilt_deg", "coronal_tilt_deg", "alignment_truth"]

_ORDER = ([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)] + [f"L{i}" for i in range(1, 7)]
          + ["S1"])


def sagittal_tilt_deg(normal: Sequence[float]) -> float:
    n = np.asarray(normal, float)
    return math.degrees(math.atan2(n[1], n[2]))


def coronal_tilt_deg(normal: Sequence[float]) -> float:
    n = np.asarray(normal, float)
    return math.degrees(math.atan2(n[0], n[2]))


def _slip(upper: Mapping[str, Any], lower: Mapping[str, Any]) -> tuple[float, float]:
    post = np.asarray(lower["posterior"], float)
    along = np.asarray(lower["anterior"], float) - post
    length = float(np.linalg.norm(along))
    mm = float((np.asarray(upper["posterior"], float) - post) @ (along / length))
    return mm, 100.0 * mm / length


def alignment_truth(meta: Mapping[str, Any], levels: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The true alignment of a phantom (``meta`` of ``make_phantom``), restricted to the
    vertebrae ``levels`` (names, default all; ``S1`` is the top of the sacrum): ``kyphosis_T4_T12``,
    ``lordosis_L1_S1``, ``lordosis_L1_L5``, ``lordosis_C2_C7`` (degrees, None when a level is
    missing), ``cobb`` (degrees, ``cobb_ends``), ``wedge`` (level -> degrees) and ``slip``
    (``"L4/L5"`` -> ``(mm, percent)``)."""
    ep = meta["endplates_world"]
    names = [n for n in _ORDER if n in ep and (levels is None or n in levels)]
    sag = {(n, side): sagittal_tilt_deg(ep[n][side]["normal"]) for n in names for side in ep[n]}
    cor = {(n, side): coronal_tilt_deg(ep[n][side]["normal"]) for n in names for side in ep[n]}

    def curve(upper: tuple[str, str], lower: tuple[str, str]) -> Optional[float]:
        return sag[lower] - sag[upper] if upper in sag and lower in sag else None

    out: dict[str, Any] = {
        "kyphosis_T4_T12": (sag[("T4", "superior")] - sag[("T12", "inferior")]
                            if ("T4", "superior") in sag and ("T12", "inferior") in sag else None),
        "lordosis_L1_S1": curve(("L1", "superior"), ("S1", "superior")),
        "lordosis_L1_L5": curve(("L1", "superior"), ("L5", "inferior")),
        "lordosis_C2_C7": curve(("C2", "inferior"), ("C7", "inferior")),
        "wedge": {n: sag[(n, "superior")] - sag[(n, "inferior")] for n in names if (n, "inferior") in sag},
        "slip": {},
    }
    bodies = [n for n in names if (n, "inferior") in cor and n[0] in "TL"]
    best: tuple[float, Optional[str], Optional[str]] = (0.0, None, None)
    for i, u in enumerate(bodies):
        for b in bodies[i + 1:]:
            a = abs(cor[(u, "superior")] - cor[(b, "inferior")])
            if a > best[0]:
                best = (a, u, b)
    out["cobb"], out["cobb_ends"] = best[0], (best[1], best[2])
    for u, w in zip(names, names[1:]):
        if (u, "inferior") in sag and (w, "superior") in sag:
            out["slip"][f"{u}/{w}"] = _slip(ep[u]["inferior"], ep[w]["superior"])
    return out
