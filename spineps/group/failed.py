"""The scans the group outputs lack, and why: ``group_T2w_failed.tsv`` / ``.json`` (listed in
``.bidsignore`` through ``group_*``) and the report's "Failed and incomplete scans" section.

Three kinds, one row per scan (the first kind that applies):

- ``failed``: the participant level recorded a failure (``spineps.failures``: error class,
  reason, log file, time);
- ``incomplete``: a semantic mask without its sidecar (a run was interrupted before the
  scan completed);
- ``unreadable``: complete participant outputs that the group level could not read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

__all__ = ["FAILED_TSV", "FAILED_JSON", "COLUMNS", "problem_rows", "write_failed_table"]

log = logging.getLogger(__name__)

FAILED_TSV = "group_T2w_failed.tsv"
FAILED_JSON = "group_T2w_failed.json"
_SEMANTIC_SUFFIX = "_desc-spine_dseg.nii.gz"
_SUB_RE = re.compile(r"^sub-[A-Za-z0-9]+$")

#: the table's columns and their descriptions (its JSON sidecar)
COLUMNS: dict[str, dict[str, Any]] = {
    "bids_name": {"Description": "Source scan name without suffix and extension (its BIDS entities)"},
    "status": {"Description": "Why the scan is not in the group outputs",
               "Levels": {"failed": "the participant level failed on it (see reason and log_file)",
                          "incomplete": "a semantic mask without its sidecar: a run was interrupted",
                          "unreadable": "its participant outputs could not be read by the group level"}},
    "error": {"Description": "Error class (e.g. InputError for a broken file, ResourceError for memory or disk)"},
    "reason": {"Description": "One-line reason"},
    "scan": {"Description": "The source file, relative to the input dataset (n/a where unknown)"},
    "log_file": {"Description": "Log of the run that failed, relative to this folder"},
    "time": {"Description": "When the failure was recorded (UTC, ISO 8601)"},
}


def _incomplete(output_dir: Path) -> list[str]:
    """BIDS names of the semantic masks that have no sidecar."""
    out = []
    for sub in sorted(p for p in Path(output_dir).iterdir() if p.is_dir() and _SUB_RE.match(p.name)):
        for sem in sorted(sub.rglob(f"*{_SEMANTIC_SUFFIX}")):
            if not sem.name.startswith(".") and not sem.with_name(sem.name[:-len(".nii.gz")] + ".json").is_file():
                out.append(sem.name[: -len(_SEMANTIC_SUFFIX)])
    return out


def _wanted(name: str, labels: Optional[set[str]]) -> bool:
    return labels is None or name.split("_")[0] in labels


def problem_rows(output_dir: Path, unreadable: Mapping[str, str],
                 participant_labels: Optional[Iterable[str]] = None) -> list[dict[str, str]]:
    """One row per failed, incomplete or unreadable scan (of the wanted participants), by name."""
    from spineps.failures import read_failures

    labels = {lab if lab.startswith("sub-") else f"sub-{lab}" for lab in participant_labels} \
        if participant_labels else None
    rows: dict[str, dict[str, str]] = {}
    for rec in read_failures(output_dir):
        if _wanted(rec["bids_name"], labels):
            rows[rec["bids_name"]] = {**{k: rec.get(k) or "n/a" for k in COLUMNS}, "status": "failed"}
    for name in _incomplete(output_dir):
        if _wanted(name, labels) and name not in rows:
            rows[name] = {k: "n/a" for k in COLUMNS} | {
                "bids_name": name, "status": "incomplete", "error": "Incomplete",
                "reason": "semantic mask without sidecar: the run was interrupted before the scan completed; "
                          "a participant rerun recomputes it"}
    for name, why in unreadable.items():
        if name not in rows:
            rows[name] = {k: "n/a" for k in COLUMNS} | {"bids_name": name, "status": "unreadable",
                                                        "error": why.split(":")[0] if ":" in why else "Error",
                                                        "reason": " ".join(why.split())}
    return [rows[k] for k in sorted(rows)]


def write_failed_table(output_dir: Path, rows: list[dict[str, str]]) -> tuple[Path, Path]:
    """``group_T2w_failed.tsv`` (header only when nothing failed) and its JSON sidecar."""
    from spineps.fsutil import write_json_atomic, write_text_atomic

    tsv, meta = Path(output_dir) / FAILED_TSV, Path(output_dir) / FAILED_JSON
    lines = ["\t".join(COLUMNS)] + ["\t".join(r[c].replace("\t", " ").replace("\n", " ") for c in COLUMNS)
                                    for r in rows]
    write_text_atomic(tsv, "\n".join(lines) + "\n")
    write_json_atomic(meta, COLUMNS)
    if rows:
        log.warning("%d scan(s) failed or incomplete, not in the group outputs (see %s): %s", len(rows), tsv.name,
                    ", ".join(r["bids_name"] for r in rows))
    return tsv, meta
