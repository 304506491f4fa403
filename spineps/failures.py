"""Failure records: one small JSON file per failed scan in the output dataset, so that the
group level can list what is missing and why (``logs/failures/failed_<bids name>.json``; ``logs/``
is in ``.bidsignore``: these are run records, not derivatives).

A record holds the scan (its path in the input dataset and its BIDS name), the error class,
a one-line reason, the log file of the run that failed (relative to the output folder), the
run id and the time (UTC, ISO 8601). A later run that completes the scan removes it
(:func:`clear_failure`); :func:`read_failures` is what the group level reads.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spineps.errors import one_line

if TYPE_CHECKING:  # pragma: no cover
    from spineps.settings import Settings

__all__ = ["FAILURES_DIR", "RECORD_PREFIX", "FIELDS", "bids_name_of", "record_failure", "clear_failure",
           "read_failures"]

log = logging.getLogger(__name__)

#: the records' folder, relative to the output folder
FAILURES_DIR = "logs/failures"
#: a record's name: the prefix, then the scan's BIDS name (so no record looks like a scan output)
RECORD_PREFIX = "failed_"
#: the fields of a record, in the order of the group level's table
FIELDS = ("bids_name", "scan", "error", "reason", "log_file", "run_id", "time")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def bids_name_of(path: str) -> str:
    """``sub-01/anat/sub-01_acq-sag_T2w.nii.gz`` -> ``sub-01_acq-sag`` (the name the scan's
    outputs start with): the file name without extensions and without its suffix."""
    name = Path(path).name.split(".")[0]
    parts = name.split("_")
    if len(parts) > 1 and "-" not in parts[-1]:
        parts = parts[:-1]
    return "_".join(parts)


def _record_path(output_dir: Path, bids_name: str) -> Path:
    return Path(output_dir) / FAILURES_DIR / f"{RECORD_PREFIX}{_SAFE.sub('_', bids_name)}.json"


def record_failure(settings: "Settings", scan: str, error: str, reason: str, bids_name: str = "") -> Path:
    """Write (atomically) the record of a failed scan (``scan``: its path relative to the
    input dataset); returns its path. An ``OSError`` is logged, not raised: the failure is
    in the log in any case."""
    from spineps.fsutil import write_json_atomic

    name = bids_name or bids_name_of(scan)
    path = _record_path(settings.output_dir, name)
    try:
        log_file = settings.log_file.relative_to(settings.output_dir).as_posix()
    except ValueError:
        log_file = str(settings.log_file)
    record = {"bids_name": name, "scan": scan, "error": error or "Error", "reason": one_line(reason),
              "log_file": log_file, "run_id": settings.run_id,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        write_json_atomic(path, record)
    except OSError as exc:
        log.warning("%s: failure record not written: %s", path, one_line(str(exc)))
    return path


def clear_failure(settings: "Settings", bids_name: str) -> bool:
    """Remove the scan's record (a run completed it); True when there was one."""
    path = _record_path(settings.output_dir, bids_name)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("%s: old failure record not removed: %s", path, one_line(str(exc)))
        return False
    log.info("%s: the failure record of an earlier run was removed (the scan is complete now)", bids_name)
    return True


def read_failures(output_dir: Path) -> list[dict[str, Any]]:
    """Every record under ``output_dir/logs/failures`` (by BIDS name); unreadable ones are
    logged and skipped."""
    folder = Path(output_dir) / FAILURES_DIR
    out = []
    for path in sorted(folder.glob(f"{RECORD_PREFIX}*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: failure record not readable: %s", path, one_line(str(exc)))
            continue
        if isinstance(rec, dict) and rec.get("bids_name"):
            out.append({k: str(rec.get(k, "")) for k in FIELDS})
    return sorted(out, key=lambda r: r["bids_name"])
