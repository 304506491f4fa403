"""The group level tables (minimal; ``run_group`` now delegates to ``spineps.group.report``): one row per segmented scan, read ONLY from what participant
runs left in ``output_dir`` (the raw dataset may be gone).

``output_dir/group_T2w.tsv``: ``bids_name`` first (the source name without suffix, e.g.
``sub-01_ses-1_acq-sag_run-2``), then the level-naming rule, the levels found, and voxel
volumes in mm^3 per semantic class (``desc-spine`` mask) and per vertebra / disc /
endplate level (``desc-vertebrae`` mask). ``n/a`` where a value does not apply.
``group_T2w.json`` describes every column. Both written atomically.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from spineps.errors import InputError, NoInputError, NoMatchError

if TYPE_CHECKING:  # pragma: no cover
    from spineps.settings import Settings

__all__ = ["ScanRow", "find_participant_outputs", "collect_rows", "group_columns", "write_group_table",
           "run_group", "GROUP_TSV", "GROUP_JSON"]

log = logging.getLogger(__name__)

GROUP_TSV = "group_T2w.tsv"
GROUP_JSON = "group_T2w.json"
#: added to the derivatives' .bidsignore (the group tables are not BIDS files)
BIDSIGNORE_EXTRA: tuple[str, ...] = ("group_*",)
SEMANTIC_SUFFIX = "_desc-spine_dseg.nii.gz"
INSTANCE_SUFFIX = "_desc-vertebrae_dseg.nii.gz"
_SUB_RE = re.compile(r"^sub-[A-Za-z0-9]+$")


@dataclass
class ScanRow:
    bids_name: str
    semantic_path: Path
    instance_path: Optional[Path]
    naming_rule: Optional[str] = None
    levels: list[str] = field(default_factory=list)
    semantic_volumes: dict[int, float] = field(default_factory=dict)  # label value -> mm^3
    instance_volumes: dict[int, float] = field(default_factory=dict)


def find_participant_outputs(output_dir: Path) -> list[tuple[str, Path, Optional[Path]]]:
    """``(bids_name, semantic mask, instance mask or None)`` for each scan with a complete
    semantic output (mask + sidecar), sorted by name."""
    output_dir = Path(output_dir)
    found: list[tuple[str, Path, Optional[Path]]] = []
    for sub in sorted(p for p in output_dir.iterdir() if p.is_dir() and _SUB_RE.match(p.name)):
        for sem in sorted(sub.rglob(f"*{SEMANTIC_SUFFIX}")):
            if sem.name.startswith("."):  # a temporary file of a running or killed process
                continue
            name = sem.name[: -len(SEMANTIC_SUFFIX)]
            if not _sidecar(sem).is_file():
                log.warning("%s has no sidecar (its run was interrupted?): left out", sem)
                continue
            inst = sem.with_name(name + INSTANCE_SUFFIX)
            found.append((name, sem, inst if inst.is_file() and _sidecar(inst).is_file() else None))
    return found


def _sidecar(nii: Path) -> Path:
    return nii.with_name(nii.name[: -len(".nii.gz")] + ".json")


def _volumes(path: Path) -> dict[int, float]:
    import numpy as np

    from spineps.geometry.io import load_volume

    vol = load_volume(path, kind="label")
    data = np.asarray(vol.data)
    if data.size and data.min() < 0:
        raise InputError("label mask holds negative values", path)
    counts = np.bincount(data.ravel().astype(np.int64))
    return {int(v): float(c) * vol.voxel_volume for v, c in enumerate(counts) if v != 0 and c > 0}


def _naming(inst: Optional[Path], sem: Path) -> tuple[Optional[str], list[str]]:
    for nii in (inst, sem):
        if nii is None:
            continue
        try:
            meta = json.loads(_sidecar(nii).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        naming = meta.get("LevelNaming")
        if naming is None and isinstance(meta.get("Extra"), dict):
            naming = meta["Extra"].get("LevelNaming")
        if isinstance(naming, dict):
            levels = naming.get("levels") or []
            return (str(naming["rule"]) if naming.get("rule") is not None else None,
                    [str(x) for x in levels] if isinstance(levels, list) else [])
    return None, []


def collect_rows(output_dir: Path) -> list[ScanRow]:
    from spineps.labels import VERTEBRA_ORDER, VERTEBRA_VALUES, vertebra_name

    rows: list[ScanRow] = []
    for name, sem, inst in find_participant_outputs(output_dir):
        row = ScanRow(name, sem, inst)
        row.semantic_volumes = _volumes(sem)
        if inst is not None:
            row.instance_volumes = _volumes(inst)
            rule, levels = _naming(inst, sem)
            row.naming_rule = rule
            found = [v for v in VERTEBRA_ORDER if v in row.instance_volumes and v in VERTEBRA_VALUES]
            row.levels = levels or [vertebra_name(v) for v in found]
        rows.append(row)
    return rows


def group_columns(rows: list[ScanRow]) -> dict[str, dict[str, Any]]:
    """Column name -> description (the JSON sidecar of the table), in table order. Level
    columns appear for the levels that occur in at least one row."""
    from spineps.labels import SEMANTIC, VERTEBRA_ORDER, instance_labels

    cols: dict[str, dict[str, Any]] = {
        "bids_name": {"Description": "Source scan name without suffix and extension (its BIDS entities)"},
        "naming_rule": {"Description": "Rule the level names were derived from (e.g. counted up from the sacrum); "
                                       "n/a without instance segmentation"},
        "levels": {"Description": "Vertebra levels found, top to bottom, comma-separated"},
        "n_vertebrae": {"Description": "Number of vertebrae in the instance mask"},
    }
    for lab in SEMANTIC:
        cols[f"vol_{lab.abbreviation}"] = {
            "Description": f"Volume of the '{lab.name}' class (value {lab.value}) in the desc-spine mask",
            "Units": "mm^3"}
    present: set[int] = set()
    for r in rows:
        present.update(r.instance_volumes)
    by_value = {lab.value: lab for lab in instance_labels()}
    order = [v for v in VERTEBRA_ORDER] + [100 + v for v in VERTEBRA_ORDER] + [200 + v for v in VERTEBRA_ORDER]
    for v in order:
        if v in present and v in by_value:
            lab = by_value[v]
            cols[_instance_column(v)] = {
                "Description": f"Volume of {lab.name} (value {v}) in the desc-vertebrae mask", "Units": "mm^3"}
    return cols


def _instance_column(value: int) -> str:
    from spineps.labels import vertebra_name

    if value < 100:
        return f"vol_{vertebra_name(value)}"
    if value < 200:
        return f"vol_disc_{vertebra_name(value - 100)}"
    return f"vol_endplate_{vertebra_name(value - 200)}"


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}".rstrip("0").rstrip(".")


def write_group_table(output_dir: Path, rows: list[ScanRow]) -> tuple[Path, Path]:
    """Write ``group_T2w.tsv`` and ``group_T2w.json`` atomically."""
    from spineps.fsutil import write_json_atomic, write_text_atomic
    from spineps.labels import SEMANTIC, VERTEBRA_VALUES

    cols = group_columns(rows)
    names = list(cols)
    lines = ["\t".join(names)]
    for r in rows:
        rec: dict[str, str] = {
            "bids_name": r.bids_name,
            "naming_rule": r.naming_rule or "n/a",
            "levels": ",".join(r.levels) if r.instance_path is not None and r.levels else "n/a",
            "n_vertebrae": (str(sum(1 for v in r.instance_volumes if v in VERTEBRA_VALUES))
                            if r.instance_path is not None else "n/a"),
        }
        for lab in SEMANTIC:
            rec[f"vol_{lab.abbreviation}"] = _fmt(r.semantic_volumes.get(lab.value, 0.0))
        for col in names[4 + len(SEMANTIC):]:
            rec[col] = "n/a" if r.instance_path is None else "0"
        for v, mm3 in r.instance_volumes.items():
            try:
                col = _instance_column(v)
            except KeyError:  # a value outside the instance label registry
                log.warning("%s: unknown instance value %d left out of the table", r.instance_path, v)
                continue
            if col in cols:
                rec[col] = _fmt(mm3)
        lines.append("\t".join(rec.get(c, "n/a") for c in names))
    tsv = Path(output_dir) / GROUP_TSV
    js = Path(output_dir) / GROUP_JSON
    write_text_atomic(tsv, "\n".join(lines) + "\n")
    write_json_atomic(js, cols)
    return tsv, js


def run_group(settings: "Settings"):  # -> spineps.group.report.GroupSummary
    """The group level of the BIDS-App: tables, outlier flags and the HTML report of
    ``spineps.group.report.build_group`` (whose ``group_T2w.tsv`` holds the columns of
    :func:`write_group_table` first, then QC and per-level measurements)."""
    from spineps.group.report import build_group

    out = settings.output_dir
    if not out.is_dir():
        raise NoInputError("the output folder does not exist: run the participant level first", out)
    summary = build_group(out, participant_labels=list(settings.participant_labels) or None)
    log.info("group table: %d scan(s) -> %s; %d flagged; report %s", summary.n_scans, summary.files["table"],
             summary.n_flagged, summary.files["report"].name)
    if summary.failed:
        log.warning("%d scan(s) left out (unreadable outputs): %s", len(summary.failed), ", ".join(summary.failed))
    return summary
