"""Per-scan QC indicators computed from the masks alone.

- ``levels``: vertebrae found, top to bottom; ``gaps``: breaks in that sequence (a level
  missing between two found ones; T13 after T12 and L6 after L5 are accepted variants);
  ``missing_discs``: two consecutive vertebrae without the disc between them.
- Instance/semantic consistency: voxels labelled in one mask but background in the other
  (canal and cord carry no instance and are not counted), and voxels whose classes disagree
  (a disc instance on a non-disc class or a vertebra instance on the disc class).
  Vertebrae touching the image border are not expected to show the disc next to them.
  ``inconsistent_fraction`` = all of these over the labelled instance voxels.
- Order: the vertebrae sorted by position (superior to inferior) must be in anatomical order.
- Sizes: every vertebra, body and disc volume against :data:`REFERENCE_RANGES_ML` of its region;
  structures cut by the field of view (touching the image border) are not judged.
- Level naming (from the instance phase's ``naming`` dict): the rule, the confidence, the
  variant and its warnings.

``flags`` holds short codes (:data:`FLAG_CODES`) for the group table and the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from spineps.geometry.volume import Volume
from spineps.labels import (CANAL, CORD, DISC, VERTEBRA_ORDER, VERTEBRA_VALUES, next_vertebra, region_of,
                            vertebra_name)

__all__ = ["QCReport", "assess", "REFERENCE_RANGES_ML", "FLAG_CODES", "INCONSISTENT_FRACTION_MAX",
           "NAMING_CONFIDENCE_MIN"]

#: plausible adult volumes (ml) per structure and region: ``(low, high)``. Widened from the
#: anatomical ranges documented in ``spineps.synth.anatomy.VOLUME_RANGES_ML`` (Panjabi 1991/1992,
#: Zhou 2000) by about a third on each side, so only gross errors are flagged.
REFERENCE_RANGES_ML: dict[tuple[str, str], tuple[float, float]] = {
    ("vertebra", "cervical"): (3.0, 30.0),
    ("vertebra", "thoracic"): (7.0, 75.0),
    ("vertebra", "lumbar"): (25.0, 110.0),
    ("vertebra", "sacral"): (30.0, 260.0),
    ("body", "cervical"): (1.2, 9.5),
    ("body", "thoracic"): (2.5, 40.0),
    ("body", "lumbar"): (14.0, 65.0),
    ("disc", "cervical"): (0.3, 4.0),
    ("disc", "thoracic"): (0.8, 14.0),
    ("disc", "lumbar"): (4.0, 30.0),
}
#: a scan is flagged "inconsistent" above this fraction of disagreeing voxels
INCONSISTENT_FRACTION_MAX = 0.01
#: a naming confidence below this is flagged "naming_uncertain"
NAMING_CONFIDENCE_MIN = 0.5
FLAG_CODES: dict[str, str] = {
    "no_instances": "no vertebra in the instance mask",
    "gap": "a level is missing between two found levels",
    "order": "the vertebra labels are not in anatomical order from top to bottom in space",
    "missing_disc": "two consecutive vertebrae without a disc between them",
    "inconsistent": f"more than {INCONSISTENT_FRACTION_MAX:.0%} of the instance voxels disagree with the semantic mask",
    "size": "a structure outside its reference volume range",
    "naming_uncertain": f"level naming confidence below {NAMING_CONFIDENCE_MIN} or naming warnings",
    "implausible_anatomy": "the structures found do not look like a spine (body sizes, shapes, spacing or bends; "
                           "spineps.labeling.levels.implausible_anatomy): no level name can be trusted",
    "outlier": "a measurement far from the cohort (group level, robust z-score)",
}
_VARIANT_NEXT = {19: {20, 28}, 24: {25, 26}, 28: {20}}


@dataclass
class QCReport:
    levels: list[str] = field(default_factory=list)
    n_vertebrae: int = 0
    gaps: list[str] = field(default_factory=list)
    order_errors: list[str] = field(default_factory=list)  # e.g. "L5 above L1"
    missing_discs: list[str] = field(default_factory=list)
    instance_only_mm3: float = 0.0  # instance label on semantic background
    semantic_only_mm3: float = 0.0  # vertebra/disc class without an instance
    class_mismatch_mm3: float = 0.0
    inconsistent_fraction: float = 0.0
    size_flags: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    naming_rule: Optional[str] = None
    naming_confidence: Optional[float] = None
    implausible: list[str] = field(default_factory=list)  # why the structures do not look like a spine
    naming_variant: Optional[str] = None
    naming_warnings: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ordered(values) -> list[int]:
    pos = {v: i for i, v in enumerate(VERTEBRA_ORDER)}
    return sorted((v for v in values if v in pos), key=lambda v: pos[v])


def _gaps(found: list[int]) -> list[str]:
    out = []
    for a, b in zip(found, found[1:]):
        ok = {next_vertebra(a)} | _VARIANT_NEXT.get(a, set())
        if b in ok:
            continue
        missing: list[str] = []
        cur = next_vertebra(a)
        while cur is not None and cur != b and len(missing) < 30:
            missing.append(vertebra_name(cur))
            cur = next_vertebra(cur)
        out.append(f"{vertebra_name(a)}-{vertebra_name(b)}: {','.join(missing) or '?'} missing")
    return out


def _naming_fields(naming: Mapping[str, Any]) -> tuple[Optional[str], Optional[float], Optional[str], list[str]]:
    rule = naming.get("rule", naming.get("rule_used"))
    conf = naming.get("confidence")
    try:
        conf = None if conf is None else float(conf)
    except (TypeError, ValueError):
        conf = None
    variant = naming.get("variant")
    warns = naming.get("warnings") or []
    return (None if rule is None else str(rule), conf, None if variant is None else str(variant),
            [str(w) for w in warns] if isinstance(warns, (list, tuple)) else [str(warns)])


def _sequence(qc: QCReport, found: list[int], present: set[int], spatial_order: Optional[list[int]],
              border_levels: set[str]) -> None:
    """Gaps, levels out of anatomical order and missing discs of the level sequence."""
    qc.gaps = _gaps(found)
    if spatial_order:
        anat = [v for v in found if v in set(spatial_order)]
        for a, b in zip(spatial_order, spatial_order[1:]):
            if anat.index(a) > anat.index(b):
                qc.order_errors.append(f"{vertebra_name(a)} above {vertebra_name(b)}")
    for a, b in zip(found, found[1:]):
        # a vertebra cut by the field of view may have its disc outside it
        if vertebra_name(a) in border_levels or vertebra_name(b) in border_levels:
            continue
        if (100 + a) not in present:
            qc.missing_discs.append(f"{vertebra_name(a)}/{vertebra_name(b)}")


def _agreement(qc: QCReport, sem: np.ndarray, inst: np.ndarray, vv: float) -> None:
    """Where the semantic and instance masks disagree (mm^3) and the inconsistent fraction."""
    labelled = inst > 0
    sem_bg = sem == 0
    tube = (sem == CORD) | (sem == CANAL)
    qc.instance_only_mm3 = float(np.count_nonzero(labelled & sem_bg)) * vv
    qc.semantic_only_mm3 = float(np.count_nonzero(~labelled & ~sem_bg & ~tube)) * vv
    is_disc_inst = (inst > 100) & (inst < 200)
    is_vert_inst = labelled & (inst < 100)
    mismatch = (is_disc_inst & ~sem_bg & (sem != DISC)) | (is_vert_inst & (sem == DISC))
    qc.class_mismatch_mm3 = float(np.count_nonzero(mismatch)) * vv
    n_lab = float(np.count_nonzero(labelled)) * vv
    qc.inconsistent_fraction = ((qc.instance_only_mm3 + qc.semantic_only_mm3 + qc.class_mismatch_mm3) / n_lab
                                if n_lab else 0.0)


def _size_flags(structure_volumes: Mapping[tuple[str, str], float], truncated: list[str],
                border_levels: set[str]) -> list[str]:
    """Structures outside the reference volume range of their region (not those cut by the border)."""
    out = []
    cut = {t.split(" ")[0] for t in truncated}
    for (level, structure), mm3 in structure_volumes.items():
        if level in cut or level in border_levels:
            continue
        try:
            region = region_of(_value(level.split("/")[0]))
        except KeyError:
            continue
        rng = REFERENCE_RANGES_ML.get((structure, region))
        if rng is None:
            continue
        ml = mm3 / 1000.0
        if ml < rng[0] or ml > rng[1]:
            side = "small" if ml < rng[0] else "large"
            out.append(f"{level} {structure} {ml:.1f} ml ({side}; {region} range {rng[0]:g}-{rng[1]:g} ml)")
    return out


def _flags(qc: QCReport, found: list[int]) -> list[str]:
    checks = (("no_instances", not found), ("gap", bool(qc.gaps)), ("order", bool(qc.order_errors)),
              ("missing_disc", bool(qc.missing_discs)),
              ("inconsistent", qc.inconsistent_fraction > INCONSISTENT_FRACTION_MAX),
              ("size", bool(qc.size_flags)),
              ("naming_uncertain", (qc.naming_confidence is not None and qc.naming_confidence < NAMING_CONFIDENCE_MIN)
               or bool(qc.naming_warnings)), ("implausible_anatomy", bool(qc.implausible)))
    return [name for name, hit in checks if hit]


def assess(semantic: Volume, instance: Optional[Volume], naming: Mapping[str, Any],
           structure_volumes: Mapping[tuple[str, str], float], truncated: list[str],
           spatial_order: Optional[list[int]] = None) -> QCReport:
    """QC of one scan. ``structure_volumes``: ``(level, structure) -> mm^3`` for the
    structures ``vertebra``, ``body`` and ``disc`` (disc levels named ``'L1/L2'``);
    ``truncated``: ``'<level> <structure>'`` entries cut by the field of view; ``spatial_order``:
    vertebra values sorted superior to inferior by position (``Morphometry.spatial_order``)."""
    qc = QCReport()
    qc.naming_rule, qc.naming_confidence, qc.naming_variant, qc.naming_warnings = _naming_fields(naming or {})
    qc.implausible = [str(x) for x in (naming or {}).get("implausible") or []]
    qc.truncated = list(truncated)
    if instance is None:
        qc.flags = ["no_instances"]
        return qc
    inst = np.asarray(instance.data)
    present = set(int(v) for v in np.unique(inst))
    found = _ordered(v for v in present if v in VERTEBRA_VALUES)
    qc.levels = [vertebra_name(v) for v in found]
    qc.n_vertebrae = len(found)
    border_levels = _border_levels(inst, found)
    _sequence(qc, found, present, spatial_order, border_levels)
    _agreement(qc, np.asarray(semantic.data), inst, instance.voxel_volume)
    qc.size_flags = _size_flags(structure_volumes, truncated, border_levels)
    qc.flags = _flags(qc, found)
    return qc


def _value(name: str) -> int:
    from spineps.labels import vertebra_value

    return vertebra_value(name)


def _border_levels(inst: np.ndarray, found: list[int]) -> set[str]:
    """Names of the vertebrae (and the discs below them) touching the image border."""
    faces = [inst[0], inst[-1], inst[:, 0], inst[:, -1], inst[:, :, 0], inst[:, :, -1]]
    on: set[int] = set()
    for f in faces:
        on.update(int(v) for v in np.unique(f))
    out = set()
    for v in found:
        if v in on:
            out.add(vertebra_name(v))
    for v in on:
        if 100 < v < 200 and (v - 100) in VERTEBRA_VALUES:
            from spineps.measure.morphometry import disc_level_name

            out.add(disc_level_name(v - 100))
    return out
