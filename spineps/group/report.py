"""The group level: cohort tables, robust outlier flags and a self-contained HTML QC report,
built ONLY from what participant runs left in ``output_dir`` (the raw dataset may be gone).

Outputs (all written atomically, all listed in ``.bidsignore`` through ``group_*``):

- ``group_T2w.tsv`` / ``.json``: one row per scan, ``bids_name`` first, then the level-naming
  rule, the levels, the vertebra count, volumes (mm^3) per semantic class and per vertebra /
  disc / endplate level, QC columns (flags, gaps, missing discs, mask disagreement, unusual
  sizes, cut structures, naming confidence, cohort outliers) and key per-level measurements
  (body heights and depth, disc heights, canal and cord cross-sections).
- ``group_T2w_levels.tsv`` / ``.json``: long format, one row per scan, level, structure and
  measure, with the value, its robust z-score against the cohort and an outlier flag
  (``spineps.group.outliers``).
- ``group_T2w_report.html``: opens from disk, no server, no network, nothing external: CSS
  and JS inline (``spineps/group/templates``), the data as one inline JSON blob, plots drawn
  as inline SVG by the page's script. Summary counts, per-level distributions (click a point
  to open its scan), a sortable, filterable, paginated table of scans, the figures of the
  table page and of each scan (relative links to the participant PNGs, ``loading="lazy"``),
  and a pass / fail / artifact + note rating per scan stored in the browser's localStorage
  and exportable as JSON or TSV.

Per scan the measurements come from its ``_desc-spine_morphometry.tsv`` when the participant
level wrote one; otherwise they are computed here from the masks (``measure_scan``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

from spineps.errors import NoInputError

if TYPE_CHECKING:  # pragma: no cover
    from spineps.settings import Settings

__all__ = ["GroupSummary", "ScanRecord", "build_group", "find_scans", "render_html", "GROUP_TSV", "GROUP_JSON",
           "LEVELS_TSV", "LEVELS_JSON", "REPORT_HTML", "PLOT_MEASURES", "KEY_COLUMNS", "run_group"]

log = logging.getLogger(__name__)

GROUP_TSV = "group_T2w.tsv"
GROUP_JSON = "group_T2w.json"
LEVELS_TSV = "group_T2w_levels.tsv"
LEVELS_JSON = "group_T2w_levels.json"
REPORT_HTML = "group_T2w_report.html"
SEMANTIC_SUFFIX = "_desc-spine_dseg.nii.gz"
INSTANCE_SUFFIX = "_desc-vertebrae_dseg.nii.gz"
FIGURE_SUFFIX = "_desc-spine_dseg.png"
_SUB_RE = re.compile(r"^sub-[A-Za-z0-9]+$")

#: (structure, measure, label) offered in the report's distribution plot, in this order
PLOT_MEASURES: tuple[tuple[str, str, str], ...] = (
    ("body", "height_middle_mm", "Vertebral body height, middle (mm)"),
    ("body", "height_anterior_mm", "Vertebral body height, anterior (mm)"),
    ("body", "height_posterior_mm", "Vertebral body height, posterior (mm)"),
    ("body", "depth_mm", "Vertebral body depth (mm)"),
    ("body", "volume_mm3", "Vertebral body volume (mm\u00b3)"),
    ("vertebra", "volume_mm3", "Vertebra volume (mm\u00b3)"),
    ("disc", "height_middle_mm", "Disc height, middle (mm)"),
    ("disc", "height_anterior_mm", "Disc height, anterior (mm)"),
    ("disc", "height_posterior_mm", "Disc height, posterior (mm)"),
    ("disc", "volume_mm3", "Disc volume (mm\u00b3)"),
    ("canal", "csa_mm2", "Spinal canal cross-section (mm\u00b2)"),
    ("canal", "ap_diameter_mm", "Spinal canal AP diameter (mm)"),
    ("cord", "csa_mm2", "Spinal cord cross-section (mm\u00b2)"),
    ("cord", "ap_diameter_mm", "Spinal cord AP diameter (mm)"),
)
#: per-level measurements copied into the wide table (``<level>_<structure>_<measure>``)
KEY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("body", "height_anterior_mm"), ("body", "height_middle_mm"), ("body", "height_posterior_mm"),
    ("body", "depth_mm"), ("disc", "height_middle_mm"), ("canal", "csa_mm2"), ("canal", "ap_diameter_mm"),
    ("cord", "csa_mm2"), ("body", "wedge_angle_deg"), ("disc", "wedge_angle_deg"), ("disc", "height_index"),
    ("segment", "slip_mm"), ("segment", "slip_percent"),
)


@dataclass
class ScanRecord:
    bids_name: str
    subject: str
    session: Optional[str]
    semantic_path: Path
    instance_path: Optional[Path]
    figure: Optional[str] = None  # relative to output_dir
    values: list[tuple[str, str, str, float]] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)
    naming: dict[str, Any] = field(default_factory=dict)
    source: str = "morphometry"  # or "masks" when measured at the group level
    cobb: dict[str, Any] = field(default_factory=dict)  # the Cobb angle's end vertebrae (alignment)
    outliers: list[Any] = field(default_factory=list)
    demonstration: list[str] = field(default_factory=list)  # model roles that were demonstration models
    page: Optional[str] = None  # the scan's page (spineps.group.scan_page), relative to output_dir


@dataclass
class GroupSummary:
    output_dir: Path
    scans: list[ScanRecord]
    failed: dict[str, str]
    files: dict[str, Path]
    n_flagged: int
    n_outliers: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: failed, incomplete and unreadable scans (``spineps.group.failed``), one dict per scan
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def n_scans(self) -> int:
        return len(self.scans)


# ------------------------------------------------------------------------------ finding
def _sidecar(nii: Path) -> Path:
    return nii.with_name(nii.name[: -len(".nii.gz")] + ".json")


def find_scans(output_dir: Path) -> list[tuple[str, Path, Optional[Path]]]:
    """``(bids_name, semantic mask, instance mask or None)`` of every scan whose semantic
    mask and sidecar exist (the sidecar is written last by the participant level), by name."""
    output_dir = Path(output_dir)
    out = []
    for sub in sorted(p for p in output_dir.iterdir() if p.is_dir() and _SUB_RE.match(p.name)):
        for sem in sorted(sub.rglob(f"*{SEMANTIC_SUFFIX}")):
            if sem.name.startswith("."):
                continue
            if not _sidecar(sem).is_file():
                log.warning("%s has no sidecar (its run was interrupted?): left out", sem)
                continue
            name = sem.name[: -len(SEMANTIC_SUFFIX)]
            inst = sem.with_name(name + INSTANCE_SUFFIX)
            out.append((name, sem, inst if inst.is_file() and _sidecar(inst).is_file() else None))
    return out


def _entity(name: str, key: str) -> Optional[str]:
    m = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)", name)
    return m.group(1) if m else None


def _naming_from_sidecars(inst: Optional[Path], sem: Path) -> dict[str, Any]:
    for nii in (inst, sem):
        if nii is None:
            continue
        try:
            meta = json.loads(_sidecar(nii).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        naming = meta.get("LevelNaming")
        if isinstance(naming, dict):
            return naming
    return {}


def _bundled_checksums() -> dict[str, str]:
    """``sha256:<hex>`` of each bundled model folder -> its name (what a participant run's
    sidecars hold as the checksum of a bundled model)."""
    from spineps.models.folder import folder_checksum
    from spineps.models.registry import BUNDLED_INSTANCE, BUNDLED_SEMANTIC, bundled_model_dir

    out: dict[str, str] = {}
    for name in (BUNDLED_SEMANTIC, BUNDLED_INSTANCE):
        folder = bundled_model_dir(name)
        if folder is not None:
            out[f"sha256:{folder_checksum(folder)}"] = name
    return out


def _demonstration_roles(sem: Path, inst: Optional[Path], bundled: dict[str, str]) -> list[str]:
    """The model roles of a scan's sidecars that were demonstration models: ``Demonstration``
    true, or (sidecars of older versions) the checksum of a bundled folder."""
    roles: list[str] = []
    for nii in (sem, inst):
        if nii is None:
            continue
        try:
            models = json.loads(_sidecar(nii).read_text(encoding="utf-8")).get("Models") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for role, entry in models.items() if isinstance(models, dict) else ():
            if isinstance(entry, dict) and (entry.get("Demonstration") is True or entry.get("Checksum") in bundled):
                if role not in roles:
                    roles.append(role)
    return roles


def _load_record(output_dir: Path, name: str, sem: Path, inst: Optional[Path],
                 bundled: Optional[dict[str, str]] = None) -> ScanRecord:
    from spineps.measure.scan import measure_scan, morphometry_paths, read_measurements

    rec = ScanRecord(name, _entity(name, "sub") or "", _entity(name, "ses"), sem, inst)
    rec.demonstration = _demonstration_roles(sem, inst, bundled or {})
    fig = sem.with_name(name + FIGURE_SUFFIX)
    if fig.is_file():
        rec.figure = fig.relative_to(output_dir).as_posix()
    tsv, _ = morphometry_paths(sem)
    if tsv.is_file():
        rows, meta = read_measurements(tsv)
        rec.values = rows
        rec.qc = dict(meta.get("QC") or {})
        rec.naming = dict(meta.get("LevelNaming") or {})
        rec.cobb = dict((meta.get("Alignment") or {}).get("Cobb") or {})
        if inst is None:  # a semantic-only scan: its levels are not known
            rec.qc.setdefault("flags", ["no_instances"])
        return rec
    from spineps.geometry.io import load_volume

    semantic = load_volume(sem, kind="label")
    instance = load_volume(inst, kind="label") if inst is not None else None
    if instance is not None and not instance.same_grid(semantic):
        from spineps.errors import InputError

        raise InputError("instance mask is not on the grid of the semantic mask", inst)
    m = measure_scan(semantic, instance, _naming_from_sidecars(inst, sem))
    rec.values = m.rows()
    rec.qc = m.qc.as_dict()
    rec.naming = m.naming
    rec.cobb = dict(m.alignment.cobb) if m.alignment is not None else {}
    rec.source = "masks"
    return rec


# ------------------------------------------------------------------------------ tables
def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 1e12 else f"{x:.6g}"
    return str(x)


def _level_order() -> dict[str, int]:
    from spineps.labels import VERTEBRA_ORDER, vertebra_name
    from spineps.measure.morphometry import disc_level_name

    order: dict[str, int] = {"all": -1}
    for i, v in enumerate(VERTEBRA_ORDER):
        order[vertebra_name(v)] = 2 * i
        if v != 26:
            order[disc_level_name(v)] = 2 * i + 1
    return order


def _instance_columns(records: Sequence[ScanRecord]) -> list[tuple[str, str, str]]:
    """(column, level, structure) for the instance volumes present in any scan (H3's names)."""
    order = _level_order()
    present: set[tuple[str, str]] = set()
    for r in records:
        for level, structure, measure, _ in r.values:
            if measure == "volume_mm3" and structure in ("vertebra", "disc", "endplate"):
                present.add((level, structure))
    cols = []
    for structure, prefix in (("vertebra", "vol_"), ("disc", "vol_disc_"), ("endplate", "vol_endplate_")):
        for level in sorted((lv for lv, st in present if st == structure), key=lambda lv: order.get(lv, 999)):
            top = level.split("/")[0]
            cols.append((prefix + top, level, structure))
    return cols


def spine_column(level: str, measure: str) -> str:
    """The group table's column of a whole-spine alignment measure: ``lordosis_L1_S1_deg``
    for ``L1-S1 spine lordosis_deg``, ``cobb_max_deg`` for the largest Cobb angle."""
    base, unit = measure.rsplit("_", 1)
    return f"{base}_max_{unit}" if level == "all" else f"{base}_{level.replace('-', '_')}_{unit}"


def _spine_columns(records: Sequence[ScanRecord]) -> list[tuple[str, str, str, str]]:
    """(column, level, "spine", measure) of the alignment measures over level ranges."""
    from spineps.measure.alignment import CURVES

    rank = {(rng, measure): i for i, (rng, measure, *_rest) in enumerate(CURVES)}
    present = {(lv, me) for r in records for lv, st, me, _ in r.values if st == "spine"}
    ordered = sorted(present, key=lambda t: rank.get(t, len(rank)))
    return [(spine_column(lv, me), lv, "spine", me) for lv, me in ordered]


def _key_columns(records: Sequence[ScanRecord]) -> list[tuple[str, str, str, str]]:
    order = _level_order()
    present: set[tuple[str, str, str]] = set()
    wanted = set(KEY_COLUMNS)
    for r in records:
        for level, structure, measure, _ in r.values:
            if (structure, measure) in wanted:
                present.add((level, structure, measure))
    key_rank = {k: i for i, k in enumerate(KEY_COLUMNS)}
    out = []
    for level, structure, measure in sorted(present, key=lambda t: (order.get(t[0], 999), key_rank[(t[1], t[2])])):
        out.append((f"{level.replace('/', '-')}_{structure}_{measure}", level, structure, measure))
    return out


_QC_COLUMNS: dict[str, dict[str, Any]] = {
    "naming_confidence": {"Description": "Confidence of the level naming (0-1), from the instance phase"},
    "qc_flags": {"Description": "QC flags, comma-separated; none when clean"},  # "Levels": the flag codes
    "qc_gaps": {"Description": "Breaks in the found level sequence"},
    "qc_missing_discs": {"Description": "Consecutive vertebrae without a disc between them"},
    "qc_inconsistent_fraction": {"Description": "Voxels on which the instance and semantic masks disagree, as a "
                                                "fraction of the instance voxels"},
    "qc_size_flags": {"Description": "Structures outside the reference volume range of their region"},
    "qc_truncated": {"Description": "Structures cut by the field of view (their heights/areas are n/a)"},
    "n_outliers": {"Description": "Measurements of this scan that are cohort outliers (robust |z| > threshold)"},
    "outliers": {"Description": "The outlying measurements: level structure measure (z-score), semicolon-separated"},
}


_COBB_COLUMNS: dict[str, dict[str, Any]] = {
    "cobb_upper_end_vertebra": {"Description": "Upper end vertebra of the largest coronal Cobb angle"},
    "cobb_lower_end_vertebra": {"Description": "Lower end vertebra of the largest coronal Cobb angle"},
}


def _wide_columns(inst_cols: list[tuple[str, str, str]], key_cols: list[tuple[str, str, str, str]]
                  ) -> dict[str, dict[str, Any]]:
    """Column name -> description (the table's JSON sidecar), in table order."""
    from spineps.labels import SEMANTIC
    from spineps.measure.qc import FLAG_CODES
    from spineps.measure.alignment import DEFINITIONS
    from spineps.measure.scan import MEASURE_DESCRIPTIONS

    cols: dict[str, dict[str, Any]] = {
        "bids_name": {"Description": "Source scan name without suffix and extension (its BIDS entities)"},
        "naming_rule": {"Description": "Rule the level names were derived from; n/a without instance segmentation"},
        "levels": {"Description": "Vertebra levels found, top to bottom, comma-separated"},
        "n_vertebrae": {"Description": "Number of vertebrae in the instance mask"},
    }
    for lab in SEMANTIC:
        cols[f"vol_{lab.abbreviation}"] = {
            "Description": f"Volume of the '{lab.name}' class (value {lab.value}) in the desc-spine mask",
            "Units": "mm^3"}
    for col, level, structure in inst_cols:
        what = {"vertebra": f"vertebra {level}", "disc": f"the {level} disc",
                "endplate": f"the endplates at the {level} disc"}[structure]
        cols[col] = {"Description": f"Volume of {what} in the desc-vertebrae mask", "Units": "mm^3"}
    cols.update({k: dict(v) for k, v in _QC_COLUMNS.items()})
    cols["qc_flags"]["Levels"] = dict(FLAG_CODES)
    for col, level, structure, measure in key_cols:
        d = MEASURE_DESCRIPTIONS.get(measure) or DEFINITIONS.get(measure, {})
        where = f"{structure} at {level}" if structure != "spine" else (
            "spine" if level == "all" else f"spine {level}")
        cols[col] = {"Description": f"{where}: {d.get('Description', measure)}", "Units": d.get("Units", "")}
        if d.get("Reference"):
            cols[col]["Reference"] = d["Reference"]
        if col == "cobb_max_deg":
            cols.update({k: dict(v) for k, v in _COBB_COLUMNS.items()})
    return cols


def _flags_of(r: ScanRecord) -> list[str]:
    """The scan's QC flags, with ``outlier`` where a measurement is a cohort outlier."""
    flags = list((r.qc or {}).get("flags") or [])
    if r.outliers and "outlier" not in flags:
        flags.append("outlier")
    return flags


def _qc_cells(r: ScanRecord, has_inst: bool) -> dict[str, str]:
    """The naming-confidence, QC and outlier cells of one scan's row."""
    qc = r.qc or {}
    flags = _flags_of(r)
    conf = r.naming.get("confidence")
    return {
        "naming_confidence": _fmt(float(conf)) if isinstance(conf, (int, float)) else "n/a",
        "qc_flags": ",".join(flags) if flags else "none",
        "qc_gaps": "; ".join(qc.get("gaps") or []) or ("none" if has_inst else "n/a"),
        "qc_missing_discs": ",".join(qc.get("missing_discs") or []) or ("none" if has_inst else "n/a"),
        "qc_inconsistent_fraction": _fmt(float(qc.get("inconsistent_fraction", 0.0))) if has_inst else "n/a",
        "qc_size_flags": "; ".join(qc.get("size_flags") or []) or ("none" if has_inst else "n/a"),
        "qc_truncated": ",".join(qc.get("truncated") or []) or "none",
        "n_outliers": str(len(r.outliers)),
        "outliers": "; ".join(f"{o.key[0]} {o.key[1]} {o.key[2]} ({o.z:+.1f})" for o in r.outliers) or "none",
    }


def _wide_row(r: ScanRecord, inst_cols: list[tuple[str, str, str]], key_cols: list[tuple[str, str, str, str]]
              ) -> dict[str, str]:
    from spineps.labels import SEMANTIC
    from spineps.measure.scan import semantic_structure_name

    vals = {(lv, st, me): v for lv, st, me, v in r.values}
    has_inst = r.instance_path is not None
    qc = r.qc or {}
    rec: dict[str, str] = {
        "bids_name": r.bids_name,
        "naming_rule": _fmt(r.naming.get("rule")) if has_inst and r.naming.get("rule") is not None else "n/a",
        "levels": ",".join(qc.get("levels") or []) if has_inst and qc.get("levels") else "n/a",
        "n_vertebrae": str(qc.get("n_vertebrae", 0)) if has_inst else "n/a",
    }
    for lab in SEMANTIC:
        rec[f"vol_{lab.abbreviation}"] = _fmt(vals.get(("all", semantic_structure_name(lab.value), "volume_mm3"), 0.0))
    for col, level, structure in inst_cols:
        rec[col] = _fmt(vals.get((level, structure, "volume_mm3"), 0.0)) if has_inst else "n/a"
    rec.update(_qc_cells(r, has_inst))
    for col, level, structure, measure in key_cols:
        rec[col] = _fmt(vals.get((level, structure, measure)))
    for col in _COBB_COLUMNS:
        rec[col] = _fmt(r.cobb.get(col.removeprefix("cobb_")))
    return rec


def _wide_table(records: Sequence[ScanRecord]) -> tuple[list[str], dict[str, dict[str, Any]], list[list[str]]]:
    inst_cols = _instance_columns(records)
    key_cols = _spine_columns(records) + _key_columns(records)
    cols = _wide_columns(inst_cols, key_cols)
    names = list(cols)
    rows = []
    for r in records:
        rec = _wide_row(r, inst_cols, key_cols)
        rows.append([rec.get(c, "n/a").replace("\t", " ") for c in names])
    return names, cols, rows


def _write(path: Path, text: str) -> None:
    from spineps.errors import OutputError
    from spineps.fsutil import write_text_atomic

    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path) from exc


# ------------------------------------------------------------------------------ HTML
def _template(name: str) -> str:
    from importlib import resources

    return (resources.files("spineps.group") / "templates" / name).read_text(encoding="utf-8")


def _r(x: Optional[float], nd: int = 2) -> Optional[float]:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _plot_keys(records: Sequence[ScanRecord]) -> list[tuple[str, str, str]]:
    """The (level, structure, measure) of the plotted measures some scan has a value of."""
    order = _level_order()
    wanted = {(s, m) for s, m, _ in PLOT_MEASURES}
    present: set[tuple[str, str, str]] = set()
    for r in records:
        for level, structure, measure, v in r.values:
            if (structure, measure) in wanted and v is not None and math.isfinite(v):
                present.add((level, structure, measure))
    return sorted(present, key=lambda k: (k[1], k[2], order.get(k[0], 999)))


def _scan_blob(r: ScanRecord, kidx: dict[tuple[str, str, str], int]) -> dict[str, Any]:
    """One scan of the report's data: names, QC, outliers and the plotted values."""
    vec: list[Optional[float]] = [None] * len(kidx)
    for level, structure, measure, v in r.values:
        i = kidx.get((level, structure, measure))
        if i is not None:
            vec[i] = _r(v, 2)
    qc = r.qc or {}
    flags = _flags_of(r)
    conf = r.naming.get("confidence")
    return {
        "n": r.bids_name, "sub": r.subject, "ses": r.session, "fig": r.figure, "pg": r.page,
        "lv": ",".join(qc.get("levels") or []), "nv": qc.get("n_vertebrae") if r.instance_path else None,
        "rule": r.naming.get("rule"), "conf": _r(float(conf), 3) if isinstance(conf, (int, float)) else None,
        "flags": flags,
        "qc": {"gaps": qc.get("gaps") or [], "missing_discs": qc.get("missing_discs") or [],
               "inc": _r(float(qc.get("inconsistent_fraction") or 0.0), 5), "size": qc.get("size_flags") or [],
               "trunc": qc.get("truncated") or [], "warn": qc.get("naming_warnings") or []},
        "o": [[kidx[o.key], _r(o.z, 2)] for o in r.outliers if o.key in kidx],
        "ot": [f"{o.key[0]} {o.key[1]} {o.key[2]}: {_fmt(round(o.value, 2))} (median {_fmt(round(o.median, 2))}, "
               f"z={o.z:+.1f})" for o in r.outliers],
        "v": vec,
    }


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def demonstration_banner(records: Sequence[ScanRecord]) -> str:
    """The report's banner (static HTML, shown without JavaScript) when any scan was segmented
    with a demonstration model; empty otherwise."""
    demo = [r for r in records if r.demonstration]
    if not demo:
        return ""
    roles = sorted({role for r in demo for role in r.demonstration})
    return ('<div class="banner demo" id="demonstration-banner" role="alert"><strong>Demonstration models.</strong> '
            f"{len(demo)} of {len(records)} scan(s) were segmented with the {' and '.join(roles)} demonstration "
            "model(s) bundled with spineps: trained briefly, mostly on phantoms, far below the accuracy of the "
            "published SPINEPS models. Their masks and measurements are for trying the app out, not for real "
            "studies: rerun the participant level with the official SPINEPS weights (<code>--semantic-model</code> "
            "/ <code>--instance-model</code>, or <code>SPINEPS_SEMANTIC_MODEL</code> / "
            "<code>SPINEPS_INSTANCE_MODEL</code>).</div>")


def render_html(records: Sequence[ScanRecord], stats: dict, *, title: str, output_dir_name: str, software: str,
                threshold: float, min_scans: int, extra: Optional[dict[str, Any]] = None) -> str:
    """The report page (a string): templates + one inline JSON blob (``extra`` is added to
    the blob: the methods texts, the failed scans)."""
    from spineps.measure.qc import FLAG_CODES

    keys = _plot_keys(records)
    kidx = {k: i for i, k in enumerate(keys)}
    choices = [[s, m, label] for s, m, label in PLOT_MEASURES if any(k[1] == s and k[2] == m for k in keys)]
    st_rows = []
    for k in keys:
        st = stats.get(k)
        st_rows.append(None if st is None else [st.n, _r(st.median, 3), _r(st.q1, 3), _r(st.q3, 3), _r(st.lo, 3),
                                                _r(st.hi, 3), _r(st.scale, 5)])
    scans = [_scan_blob(r, kidx) for r in records]
    ident = hashlib.sha1("\n".join([title] + [r.bids_name for r in records]).encode()).hexdigest()[:12]
    data = {
        "title": title, "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "software": software, "output_dir_name": output_dir_name, "report_id": ident,
        "threshold": threshold, "min_scans": min_scans, "flag_codes": dict(FLAG_CODES),
        "keys": [list(k) for k in keys], "stats": st_rows, "measure_choices": choices, "scans": scans,
        **(extra or {}),
    }
    blob = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    blob = blob.replace("</", "<\\/").replace("<!--", "<\\!--")
    html = _template("report.html")
    esc_title = _escape(title)
    # replace the data last: the other parts must not be searched inside user-controlled text
    html = html.replace("__SPINEPS_BANNER__", demonstration_banner(records))
    html = html.replace("__SPINEPS_TITLE__", esc_title)
    html = html.replace("__SPINEPS_CSS__", _template("report.css"))
    html = html.replace("__SPINEPS_JS__", _template("report.js"))
    return html.replace("__SPINEPS_DATA__", blob)


def _methods_blob(out: Path) -> list[dict[str, Any]]:
    """The distinct methods texts of the participant runs (``spineps.methods``), as HTML."""
    from spineps.methods import collect_methods, markdown_to_html

    return [{"html": markdown_to_html(m["markdown"]), "bibtex": m["bibtex"], "runs": m["runs"]}
            for m in collect_methods(out)]


# ------------------------------------------------------------------------------ main
def _software() -> str:
    try:
        from spineps import __version__ as v
    except Exception:  # pragma: no cover - version is optional here
        return "spineps"
    return f"spineps {v}" if v else "spineps"


def _scans_of(out: Path, participant_labels: Optional[Iterable[str]]) -> list[tuple[str, Path, Optional[Path]]]:
    """The scans with participant outputs (of the wanted participants); ``NoMatchError`` for none."""
    from spineps.errors import NoMatchError

    found = find_scans(out)
    if participant_labels:
        wanted = {lab if lab.startswith("sub-") else f"sub-{lab}" for lab in participant_labels}
        have = {n.split("_")[0] for n, _, _ in found}
        missing = sorted(wanted - have)
        if missing:
            raise NoMatchError(f"no participant outputs for {', '.join(missing)} in {out}")
        found = [f for f in found if f[0].split("_")[0] in wanted]
    if not found and not _problems_recorded(out, participant_labels):
        raise NoMatchError(f"no participant outputs (sub-*/**/*{SEMANTIC_SUFFIX} with sidecar) in {out}: "
                           "run the participant level first")
    return found  # empty where every scan failed: the report then lists the failures


def _problems_recorded(out: Path, participant_labels: Optional[Iterable[str]]) -> bool:
    """Whether the participant level left failure records or incomplete scans (of the wanted
    participants) in ``out``: it ran, and every scan it tried failed."""
    from spineps.group.failed import problem_rows

    return bool(problem_rows(out, {}, participant_labels))


def _records(out: Path, found: list[tuple[str, Path, Optional[Path]]]) -> tuple[list[ScanRecord], dict[str, str]]:
    """Every scan's record; an unreadable one is logged and listed in the second value."""
    from spineps.errors import SpinepsError

    records: list[ScanRecord] = []
    failed: dict[str, str] = {}
    bundled = _bundled_checksums()
    for name, sem, inst in found:
        try:
            records.append(_load_record(out, name, sem, inst, bundled))
        except (SpinepsError, ValueError) as exc:
            log.error("%s: left out of the group outputs: %s", name, exc)
            failed[name] = str(exc)
    return records, failed  # none where every scan is unreadable: the report then lists them


def _write_levels(path: Path, json_path: Path, records: Sequence[ScanRecord], stats: dict, thr: float,
                  mins: int) -> None:
    """``group_T2w_levels.tsv`` (long format with the robust z-scores) and its JSON sidecar."""
    from spineps.fsutil import write_json_atomic
    from spineps.group import outliers as om

    order = _level_order()
    lines = ["bids_name\tlevel\tstructure\tmeasure\tvalue\trobust_z\toutlier"]
    for r in records:
        for level, structure, measure, v in sorted(r.values, key=lambda t: (order.get(t[0], 999), t[1], t[2])):
            st = stats.get((level, structure, measure))
            z = (v - st.median) / st.scale if st is not None and math.isfinite(v) and st.n >= mins else None
            lines.append("\t".join([r.bids_name, level, structure, measure, _fmt(v),
                                    _fmt(None if z is None else round(z, 3)),
                                    "n/a" if z is None else str(int(abs(z) > thr))]))
    _write(path, "\n".join(lines) + "\n")
    write_json_atomic(json_path, {
        "bids_name": {"Description": "Source scan name without suffix and extension"},
        "level": {"Description": "Vertebra (L1), disc level (L1/L2) or 'all' (whole-mask class volumes)"},
        "structure": {"Description": "vertebra, body, disc, endplate, canal, cord, or a semantic class name"},
        "measure": {"Description": "What was measured; units in the name (_mm, _mm2, _mm3, _deg, _percent; "
                                   "height_index: a ratio)"},
        "value": {"Description": "The measurement; n/a where not measurable (e.g. cut by the field of view)"},
        "robust_z": {"Description": "(value - cohort median) / (1.4826 * MAD) over the scans with this level, "
                                    f"structure and measure (scale floored at {om.REL_FLOOR:.0%} of |median|); n/a "
                                    f"with fewer than {mins} scans"},
        "outlier": {"Description": f"1 when |robust_z| > {thr:g}", "Levels": {"0": "within range", "1": "outlier"}},
    })


def build_group(output_dir: Union[str, Path], *, participant_labels: Optional[Iterable[str]] = None,
                threshold: Optional[float] = None, min_scans: Optional[int] = None,
                title: Optional[str] = None) -> GroupSummary:
    """Build every group output from the participant outputs in ``output_dir``.

    ``NoInputError`` when ``output_dir`` does not exist, ``NoMatchError`` when no scan (of the
    wanted participants) has outputs nor a failure record. A scan with unreadable outputs is
    logged, left out and listed in ``GroupSummary.failed`` (all failed: empty tables, a report)."""
    from spineps.bids.derivatives import write_bidsignore
    from spineps.fsutil import write_json_atomic
    from spineps.group import outliers as om
    from spineps.group.failed import problem_rows, write_failed_table
    from spineps.group.scan_page import write_scan_pages

    t0 = time.perf_counter()
    out = Path(output_dir)
    if not out.is_dir():
        raise NoInputError("the output folder does not exist: run the participant level first", out)
    thr = om.OUTLIER_Z if threshold is None else float(threshold)
    mins = om.MIN_SCANS if min_scans is None else int(min_scans)
    records, failed = _records(out, _scans_of(out, participant_labels))
    t_read = time.perf_counter() - t0
    table: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
    for r in records:
        for level, structure, measure, v in r.values:
            table.setdefault((level, structure, measure), []).append((r.bids_name, v))
    stats, outs = om.robust_outliers(table, threshold=thr, min_scans=mins)
    by_scan = om.per_scan(outs)
    for r in records:
        r.outliers = by_scan.get(r.bids_name, [])
    t_stats = time.perf_counter() - t0 - t_read
    names, cols, rows = _wide_table(records)
    files = {"table": out / GROUP_TSV, "table_json": out / GROUP_JSON, "levels": out / LEVELS_TSV,
             "levels_json": out / LEVELS_JSON, "report": out / REPORT_HTML}
    _write(files["table"], "\n".join(["\t".join(names)] + ["\t".join(r) for r in rows]) + "\n")
    write_json_atomic(files["table_json"], cols)
    _write_levels(files["levels"], files["levels_json"], records, stats, thr, mins)
    problems = problem_rows(out, failed, participant_labels)
    files["failed"], files["failed_json"] = write_failed_table(out, problems)
    pages = write_scan_pages(out, records, software=_software(), level_order=_level_order(),
                             css=_template("report.css") + "\n" + _template("scan.css"))
    for r in records:
        r.page = pages.get(r.bids_name)
    html = render_html(records, stats, title=title or f"SPINEPS group report \u2014 {len(records)} scan(s)",
                       output_dir_name=out.resolve().name, software=_software(), threshold=thr, min_scans=mins,
                       extra={"methods": _methods_blob(out), "failed": problems})
    _write(files["report"], html)
    write_bidsignore(out)
    n_flagged = sum(1 for r in records if (r.qc.get("flags") or r.outliers))
    n_demo = sum(1 for r in records if r.demonstration)
    if n_demo:
        log.warning("%d of %d scan(s) were segmented with demonstration models (bundled with spineps): not for real "
                    "studies; the report says so in a banner", n_demo, len(records))
    seconds = time.perf_counter() - t0
    log.info("group: %d scan(s) (%d measured from masks), %d flagged, %d outlier measurement(s); report %s "
             "(%.0f kB) in %.2f s", len(records), sum(r.source == "masks" for r in records), n_flagged, len(outs),
             files["report"].name, len(html.encode()) / 1024, seconds)
    return GroupSummary(out, records, failed, files, n_flagged, len(outs), seconds,
                        {"read": round(t_read, 3), "stats": round(t_stats, 3),
                         "write": round(seconds - t_read - t_stats, 3)}, problems)


def run_group(settings: "Settings") -> GroupSummary:
    """The group level of the BIDS-App: tables, outlier flags and the HTML report of
    :func:`build_group`, from what participant runs left in ``settings.output_dir``."""
    out = settings.output_dir
    if not out.is_dir():
        raise NoInputError("the output folder does not exist: run the participant level first", out)
    summary = build_group(out, participant_labels=list(settings.participant_labels) or None)
    log.info("group table: %d scan(s) -> %s; %d flagged; report %s", summary.n_scans, summary.files["table"],
             summary.n_flagged, summary.files["report"].name)
    if summary.failed:
        log.warning("%d scan(s) left out (unreadable outputs): %s", len(summary.failed), ", ".join(summary.failed))
    if not summary.n_scans:
        from spineps.errors import NoMatchError

        raise NoMatchError(f"no scan has usable participant outputs: {len(summary.problems)} failed, incomplete "
                           f"or unreadable scan(s), listed with the reason in {summary.files['failed'].name} and "
                           f"the report {summary.files['report'].name}", out)
    return summary
