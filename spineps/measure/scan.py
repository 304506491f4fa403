"""One scan's measurements: ``measure_scan`` (masks -> :class:`Measurements`) and the
per-scan outputs ``<stem>_desc-spine_morphometry.tsv`` (long format: ``level structure
measure value``) with its ``.json`` (columns, measures, method, QC, level naming).

Rows (``value`` ``n/a`` where a measurement is not possible, e.g. cut by the field of view):

- ``all  <semantic class>  volume_mm3`` for every class of the ``desc-spine`` mask;
- ``L1  vertebra  volume_mm3`` (whole instance), ``L1  body  volume_mm3`` (body + its endplates),
  ``L1  body  height_{anterior,middle,posterior}_mm``, ``L1  body  depth_mm``;
- ``L1/L2  disc  volume_mm3``, ``L1/L2  disc  height_{anterior,middle,posterior}_mm``,
  ``L1/L2  endplate  volume_mm3``;
- ``L1`` and ``L1/L2``: ``canal  csa_mm2``, ``canal  ap_diameter_mm``, and the same for
  ``cord`` where the cord is visible;
- spinal alignment (``spineps.measure.alignment``): ``T4-T12  spine  kyphosis_deg``,
  ``L1-S1  spine  lordosis_deg`` (also ``L1-L5``, ``C2-C7``), ``all  spine  cobb_deg``,
  ``L1  body  wedge_angle_deg``, ``L1/L2  disc  wedge_angle_deg``, ``L1/L2  disc  height_index``,
  ``L1/L2  segment  slip_mm`` and ``slip_percent``; the JSON's ``Alignment`` section has each
  measure's definition and reference, the endplates used, the reason for every ``n/a``, the
  Cobb angle's end vertebrae, apex and convexity, and the fitted endplate planes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from spineps.geometry.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from spineps.postprocess.vertebrae import VertebraCentroids

__all__ = ["Measurements", "measure_scan", "write_measurements", "read_measurements", "morphometry_paths",
           "MEASURE_DESCRIPTIONS", "MORPHOMETRY_SUFFIX", "semantic_structure_name"]

log = logging.getLogger(__name__)

MORPHOMETRY_SUFFIX = "_desc-spine_morphometry.tsv"

MEASURE_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "volume_mm3": {"Description": "Volume: voxel count times voxel volume", "Units": "mm^3"},
    "height_anterior_mm": {"Description": "Height along the local spine axis, mean over a mid-sagittal strip at 85% "
                                          "of the AP depth (anterior wall)", "Units": "mm"},
    "height_middle_mm": {"Description": "Height along the local spine axis, mean over a mid-sagittal strip at 50% "
                                        "of the AP depth", "Units": "mm"},
    "height_posterior_mm": {"Description": "Height along the local spine axis, mean over a mid-sagittal strip at 15% "
                                           "of the AP depth (posterior wall)", "Units": "mm"},
    "depth_mm": {"Description": "Antero-posterior depth of the body, mid-sagittal, over its middle half height",
                 "Units": "mm"},
    "csa_mm2": {"Description": "Cross-sectional area perpendicular to the local spine axis (canal: canal + cord "
                               "classes, i.e. the dural tube; cord: cord class)", "Units": "mm^2"},
    "ap_diameter_mm": {"Description": "Sagittal (antero-posterior) diameter through the centre of the cross-section",
                       "Units": "mm"},
}


def semantic_structure_name(value: int) -> str:
    from spineps.labels import SEMANTIC_BY_VALUE

    return SEMANTIC_BY_VALUE[value].name.replace(" ", "_")


@dataclass
class Measurements:
    """Everything measured on one scan (long format ``values``: level, structure, measure, value)."""

    values: list  # list[LevelValue]
    qc: Any  # QCReport
    naming: dict[str, Any] = field(default_factory=dict)
    voxel_volume_mm3: float = 0.0
    spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)
    body_centroids: dict[int, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    alignment: Any = None  # spineps.measure.alignment.Alignment, None without instances
    #: a station of a session: the session's alignment (``Alignment``) and how the stations were
    #: put together (``Stations``, ``OffsetsMM``); its level-range rows replace the station's own
    session: Optional[dict[str, Any]] = None

    def use_session_alignment(self, alignment: Any, stations: list[str], offsets: Mapping[str, Any]) -> None:
        """The whole-spine measures (structure ``spine``) of the session's stations together
        instead of this station's own (per-level measures stay the station's)."""
        self.values = [v for v in self.values if v.structure != "spine"]
        self.values.extend(v for v in alignment.values if v.structure == "spine")
        self.session = {"Description": "The level-range measures (structure 'spine': kyphosis, lordosis, Cobb) "
                                       "are of the session's stations together, in the frame of the top one",
                        "Stations": list(stations), "OffsetsMM": dict(offsets), "Alignment": alignment.as_dict()}

    def get(self, level: str, structure: str, measure: str) -> float:
        for v in self.values:
            if v.level == level and v.structure == structure and v.measure == measure:
                return v.value
        raise KeyError((level, structure, measure))

    def rows(self) -> list[tuple[str, str, str, float]]:
        return [(v.level, v.structure, v.measure, v.value) for v in self.values]


def _naming_summary(naming: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("rule", "rule_used", "levels", "variant", "confidence", "warnings", "implausible")
    out = {k: naming[k] for k in keep if k in naming}
    if "rule" not in out and "rule_used" in out:
        out["rule"] = out.pop("rule_used")
    return json.loads(json.dumps(out, default=str))


def measure_scan(semantic: Volume, instance: Optional[Volume], naming: Optional[Mapping[str, Any]] = None, *,
                 centroids: Optional["VertebraCentroids"] = None) -> Measurements:
    """Volumes, morphometry and QC of one scan (see the module docstring). ``instance`` may
    be None (semantic-only runs): then only the class volumes and the QC are given.
    ``centroids``: the named vertebrae's body centroids on this grid (computed when not given)."""
    from spineps.labels import SEMANTIC, VERTEBRA_ORDER, VERTEBRA_VALUES, vertebra_name
    from spineps.measure.morphometry import LevelValue, Morphometry, disc_level_name, measure_morphometry
    from spineps.measure.qc import assess
    from spineps.measure.volumes import label_volumes

    t0 = time.perf_counter()
    naming = dict(naming or {})
    values: list = []
    sem_vol = label_volumes(semantic)
    for lab in SEMANTIC:
        values.append(LevelValue("all", semantic_structure_name(lab.value), "volume_mm3", sem_vol.get(lab.value, 0.0)))
    morph = Morphometry()
    alignment = None
    structure_volumes: dict[tuple[str, str], float] = {}
    if instance is not None:
        ins_vol = label_volumes(instance)
        morph = measure_morphometry(semantic, instance, centroids=centroids)
        by_level: dict[str, list] = {}
        for lv in morph.values:
            by_level.setdefault(lv.level, []).append(lv)
        for v in VERTEBRA_ORDER:
            if v in ins_vol:
                name = vertebra_name(v)
                values.append(LevelValue(name, "vertebra", "volume_mm3", ins_vol[v]))
                structure_volumes[(name, "vertebra")] = ins_vol[v]
                values.extend(by_level.pop(name, []))
        for lv in values:
            if lv.structure == "body" and lv.measure == "volume_mm3":
                structure_volumes[(lv.level, "body")] = lv.value
        for v in VERTEBRA_ORDER:
            d, e = 100 + v, 200 + v
            if d not in ins_vol and e not in ins_vol:
                continue
            name = disc_level_name(v)
            if d in ins_vol:
                values.append(LevelValue(name, "disc", "volume_mm3", ins_vol[d]))
                structure_volumes[(name, "disc")] = ins_vol[d]
            if e in ins_vol:
                values.append(LevelValue(name, "endplate", "volume_mm3", ins_vol[e]))
            values.extend(by_level.pop(name, []))
        for rest in by_level.values():
            values.extend(rest)
        unknown = [v for v in ins_vol
                   if v not in VERTEBRA_VALUES and not (100 < v < 300 and (v % 100) in VERTEBRA_VALUES)]
        for v in unknown:
            log.warning("instance value %d is not in the label registry: not measured", v)
        alignment = _alignment(instance, morph)
        values.extend(alignment.values if alignment is not None else [])
    qc = assess(semantic, instance, naming, structure_volumes, morph.truncated, morph.spatial_order)
    return Measurements(values=values, qc=qc, naming=_naming_summary(naming), voxel_volume_mm3=semantic.voxel_volume,
                        spacing=semantic.spacing, body_centroids=morph.body_centroids,
                        seconds=time.perf_counter() - t0, alignment=alignment)


def _alignment(instance: Volume, morph: Any) -> Any:
    """The alignment measures (``spineps.measure.alignment``); a failure is logged and they are
    left out (the other measurements stand)."""
    from spineps.measure.alignment import measure_alignment

    try:
        return measure_alignment(instance, morph)
    except Exception as exc:  # derived measures never fail the scan's measurements
        log.warning("alignment not measured: %s: %s", type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        return None


def morphometry_paths(mask_or_stem: Union[str, Path]) -> tuple[Path, Path]:
    """``(tsv, json)`` beside a ``..._desc-spine_dseg.nii.gz`` (or for a path stem without the
    ``_desc-...`` part)."""
    p = Path(mask_or_stem)
    name = p.name
    for suffix in ("_desc-spine_dseg.nii.gz", "_desc-vertebrae_dseg.nii.gz", MORPHOMETRY_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    tsv = p.with_name(name + MORPHOMETRY_SUFFIX)
    return tsv, tsv.with_suffix(".json")


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1e12 else f"{x:.6g}"


def write_measurements(m: Measurements, tsv_path: Union[str, Path]) -> tuple[Path, Path]:
    """Write the long-format TSV and its JSON sidecar atomically."""
    from spineps.errors import OutputError
    from spineps.fsutil import write_json_atomic, write_text_atomic
    from spineps.measure import morphometry as morph
    from spineps.measure import qc as qcmod
    from spineps.measure.alignment import DEFINITIONS

    tsv = Path(tsv_path)
    js = tsv.with_suffix(".json")
    lines = ["level\tstructure\tmeasure\tvalue"]
    lines += [f"{lv.level}\t{lv.structure}\t{lv.measure}\t{_fmt(lv.value)}" for lv in m.values]
    used = sorted({lv.measure for lv in m.values})
    meta: dict[str, Any] = {
        "level": {"Description": "Vertebra (e.g. L1), disc level (e.g. L1/L2: the disc below L1 and the structures at "
                                 "its height), a level range (e.g. L1-S1, for the alignment of the spine between "
                                 "them) or 'all' (whole-mask class volumes, the largest Cobb angle)"},
        "structure": {"Description": "vertebra, body, disc, endplate, canal, cord, spine (alignment over a level "
                                     "range, e.g. L1-S1), segment (a motion segment: the vertebra on the one below), "
                                     "or a semantic class name"},
        "measure": {"Description": "What was measured (see Measures)",
                    "Levels": {k: {**MEASURE_DESCRIPTIONS, **DEFINITIONS}[k]["Description"] for k in used
                               if k in MEASURE_DESCRIPTIONS or k in DEFINITIONS}},
        "value": {"Description": "The value, in the units of the measure (Measures); n/a where not measurable "
                                 "(e.g. cut by the field of view)"},
        "Measures": {k: MEASURE_DESCRIPTIONS.get(k) or DEFINITIONS.get(k, {}) for k in used},
        "Method": {
            "SpineAxis": "line through the neighbouring vertebral-body centroids (world mm, RAS)",
            "MidSagittalBandHalfWidthMM": morph.BAND_HALF_MM,
            "SlabHalfThicknessMM": morph.SLAB_HALF_MM,
            "StripPositions": morph.STRIPS,
            "BodyIncludesEndplates": True,
            "Tolerances": "heights/diameters: max(0.5 mm, 3%) plus half the largest voxel step; areas: 5% "
                          "(tests/test_measure_morphometry.py)",
        },
        "QC": m.qc.as_dict(),
        "QCReferenceRangesML": {f"{s}_{r}": list(v) for (s, r), v in qcmod.REFERENCE_RANGES_ML.items()},
        "LevelNaming": m.naming,
        "VoxelVolumeMM3": round(m.voxel_volume_mm3, 6),
        "SpacingMM": [round(float(s), 6) for s in m.spacing],
        "BodyCentroidsWorldMM": {str(k): v for k, v in m.body_centroids.items()},
    }
    if m.alignment is not None:
        meta["Alignment"] = m.alignment.as_dict()
    if m.session is not None:
        meta["SessionAlignment"] = m.session
    try:
        write_text_atomic(tsv, "\n".join(lines) + "\n")
        write_json_atomic(js, meta)
    except OSError as exc:
        raise OutputError(f"cannot write measurements: {exc.strerror or exc}", tsv) from exc
    return tsv, js


def read_measurements(tsv_path: Union[str, Path]) -> tuple[list[tuple[str, str, str, float]], dict[str, Any]]:
    """The rows of a morphometry TSV (``nan`` for ``n/a``) and its JSON sidecar ({} when absent)."""
    from spineps.errors import InputError

    tsv = Path(tsv_path)
    try:
        text = tsv.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", tsv) from exc
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    header = next(reader, None)
    if header != ["level", "structure", "measure", "value"]:
        raise InputError(f"not a morphometry table (header {header})", tsv)
    rows = []
    for rec in reader:
        if not rec:
            continue
        if len(rec) != 4:
            raise InputError(f"malformed row {rec}", tsv)
        try:
            val = float("nan") if rec[3] == "n/a" else float(rec[3])
        except ValueError as exc:
            raise InputError(f"non-numeric value {rec[3]!r}", tsv) from exc
        rows.append((rec[0], rec[1], rec[2], val))
    meta: dict[str, Any] = {}
    js = tsv.with_suffix(".json")
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable sidecar (%s)", js, exc)
    return rows, meta
