"""BIDS validation with the schema-based validator (``bids-validator-deno``).

``validate_dataset(bids_dir)`` runs ``bids-validator-deno DIR --format json`` and sorts the
issues into errors and warnings. The validator ships its schema inside the package, so it
needs no network (measured: about 1 s on a small dataset with no network, exit 0 when
valid, 16 on errors); ``DENO_NO_UPDATE_CHECK`` is set so deno never phones home, and
``NO_COLOR`` keeps the output plain.

Derivatives: the output folder is a dataset of its own (its ``dataset_description.json``
says ``DatasetType: derivative``), so it is validated by running the validator on that
folder itself; ``derivative=True`` also checks that its ``dataset_description.json`` says
``DatasetType: derivative`` (an error ``NOT_A_DERIVATIVE_DATASET`` otherwise). The
validator's own ``--datasetTypes derivative`` option is not used: version 2.x (3.0.2 of
the PyPI package) crashes with ``UnknownIssueCodeError: UNSUPPORTED_DATASET_TYPE`` when the
type does not match. (Run on the raw dataset, the validator ignores ``derivatives/``
unless ``--recursive`` is given.)

``start_validation`` starts the validator in the background and returns at once (its
``result()`` waits for the report): a participant run loads its models meanwhile.

When the validator is missing or cannot run, ``ValidationReport.available`` is False with
the reason; :func:`check_names_with_schema` then checks file names against the BIDS
schema bundled with ``bidsschematools`` (names only: no metadata or header checks).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Union

__all__ = [
    "VALIDATOR_NAME",
    "ValidationReport",
    "find_validator",
    "validate_dataset",
    "start_validation",
    "PendingValidation",
    "check_names_with_schema",
]

log = logging.getLogger(__name__)

VALIDATOR_NAME = "bids-validator-deno"


@dataclass
class ValidationReport:
    """The outcome of one validator run.

    ``available``: the validator ran and its output could be read (otherwise ``reason``
    says why, and ``ok`` is False). ``ok``: available and no errors. ``errors`` and
    ``warnings``: one line per issue, ``CODE[ subCode]: location``."""

    path: Path
    available: bool
    ok: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    returncode: Optional[int] = None
    reason: str = ""
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, max_lines: int = 20) -> str:
        if not self.available:
            return f"BIDS validation of {self.path} could not run: {self.reason}"
        head = (f"BIDS validation of {self.path}: {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s)")
        lines = self.errors[:max_lines]
        more = len(self.errors) - len(lines)
        return "\n  ".join([head, *lines] + ([f"... and {more} more"] if more > 0 else []))


def find_validator() -> Optional[list[str]]:
    """The command that runs the validator: the ``bids-validator-deno`` script beside the
    running Python (the venv's ``bin/``), else the one on ``PATH``; None when neither."""
    beside = Path(sys.executable).parent / VALIDATOR_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which(VALIDATOR_NAME)
    return [found] if found else None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DENO_NO_UPDATE_CHECK", "1")
    env["NO_COLOR"] = "1"
    return env


def _issue_line(issue: dict) -> str:
    code = str(issue.get("code", "UNKNOWN"))
    sub = issue.get("subCode")
    loc = issue.get("location") or ""
    return f"{code}{f' {sub}' if sub else ''}: {loc}".rstrip(": ").rstrip()


def _parse_json(text: str) -> Optional[dict]:
    text = text.strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        if start < 0:
            return None
        try:
            data = json.loads(text[start:])
        except json.JSONDecodeError:
            return None
    return data if isinstance(data, dict) else None


def validate_dataset(path: Union[str, Path], *, derivative: bool = False, timeout: float = 900.0,
                     validator: Optional[list[str]] = None) -> ValidationReport:
    """Validate the dataset at ``path`` (see the module docstring). Never raises for a
    validator problem: the report says it (``available=False``)."""
    return start_validation(path, derivative=derivative, timeout=timeout, validator=validator).result()


class PendingValidation:
    """A validator run started in the background (:func:`start_validation`); ``result()``
    waits for it (at most ``timeout`` seconds from the start) and reads its report. The
    validator is a process of its own, so it runs while this one goes on (e.g. loading the
    models). ``cancel()`` stops it (also when this process is interrupted in ``result()``)."""

    def __init__(self, path: Path, cmd: list[str], derivative: bool, timeout: float):
        self.path, self.cmd, self.derivative, self.timeout = path, cmd, derivative, timeout
        self._t0 = time.monotonic()
        self._report: Optional[ValidationReport] = None
        self._proc: Optional[subprocess.Popen] = None
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                          stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._report = ValidationReport(path, available=False, ok=False, command=cmd, seconds=0.0,
                                            reason=f"{VALIDATOR_NAME} could not be started: {exc}")

    @classmethod
    def done(cls, report: ValidationReport) -> "PendingValidation":
        pending = cls.__new__(cls)
        pending.path, pending.cmd, pending._report, pending._proc = report.path, report.command, report, None
        return pending

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()

    def result(self) -> ValidationReport:
        if self._report is not None:
            return self._report
        assert self._proc is not None
        left = max(0.0, self.timeout - (time.monotonic() - self._t0))
        try:
            stdout, stderr = self._proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self.cancel()
            self._report = ValidationReport(self.path, available=False, ok=False, command=self.cmd,
                                            seconds=time.monotonic() - self._t0,
                                            reason=f"{VALIDATOR_NAME} did not finish within {self.timeout:.0f} s")
            return self._report
        except BaseException:  # KeyboardInterrupt / SIGTERM while waiting: no validator left behind
            self.cancel()
            raise
        self._report = _read_report(self.path, self.cmd, self._proc.returncode, stdout, stderr,
                                    time.monotonic() - self._t0, self.derivative)
        return self._report


def start_validation(path: Union[str, Path], *, derivative: bool = False, timeout: float = 900.0,
                     validator: Optional[list[str]] = None) -> PendingValidation:
    """Start the validator on ``path`` in the background; ``.result()`` gives the
    :class:`ValidationReport` of :func:`validate_dataset`."""
    path = Path(path).absolute()
    cmd0 = validator if validator is not None else find_validator()
    if not cmd0:
        return PendingValidation.done(ValidationReport(
            path, available=False, ok=False, reason=f"{VALIDATOR_NAME} not found beside {sys.executable} or on PATH "
                                                    "(pip install bids-validator-deno)"))
    if not path.is_dir():
        return PendingValidation.done(ValidationReport(path, available=False, ok=False,
                                                       reason="the dataset folder does not exist"))
    return PendingValidation(path, [*cmd0, str(path), "--format", "json"], derivative, timeout)


def _read_report(path: Path, cmd: list[str], returncode: Optional[int], stdout: str, stderr: str, seconds: float,
                 derivative: bool) -> ValidationReport:
    """The report of one finished validator run (its JSON on stdout)."""
    data = _parse_json(stdout)
    issues_obj = (data or {}).get("issues")
    issues = issues_obj.get("issues") if isinstance(issues_obj, dict) else issues_obj
    if data is None or not isinstance(issues, list):
        tail = (stderr or stdout or "").strip().splitlines()[-5:]
        return ValidationReport(path, available=False, ok=False, returncode=returncode, command=cmd,
                                seconds=seconds,
                                reason=f"{VALIDATOR_NAME} exited {returncode} without a JSON report"
                                       + (f": {' | '.join(tail)}" if tail else ""))
    errors = [_issue_line(i) for i in issues if isinstance(i, dict) and i.get("severity") == "error"]
    warnings = [_issue_line(i) for i in issues if isinstance(i, dict) and i.get("severity") == "warning"]
    if derivative:
        try:
            dtype = json.loads((path / "dataset_description.json").read_text(encoding="utf-8")).get("DatasetType")
        except (OSError, ValueError, AttributeError):
            dtype = None
        if dtype != "derivative":
            errors.append(f"NOT_A_DERIVATIVE_DATASET: /dataset_description.json (DatasetType {dtype!r})")
    ok = not errors
    if ok and returncode not in (0, None):
        # defensive: a non-zero exit without listed errors still counts as a failure
        errors.append(f"VALIDATOR_EXIT_{returncode}: {path}")
        ok = False
    report = ValidationReport(path, available=True, ok=ok, errors=errors, warnings=warnings,
                              returncode=returncode, command=cmd, seconds=seconds)
    log.info("BIDS validation of %s: %d error(s), %d warning(s), %.1f s from its start", path, len(errors),
             len(warnings), seconds)
    return report


# --------------------------------------------------------------------------- fallback
@lru_cache(maxsize=2)
def _schema_regexes(derivative: bool) -> tuple[re.Pattern, ...]:
    from bidsschematools import rules
    from bidsschematools.schema import load_schema

    schema = load_schema()
    groups = [schema.rules.files.common, schema.rules.files.raw]
    if derivative:
        groups.append(schema.rules.files.deriv)
    out: list[re.Pattern] = []
    for group in groups:
        for entry in rules.regexify_filename_rules(group, schema, level=2):
            out.append(re.compile(entry["regex"]))
    return tuple(out)


def _ignored(relpath: str, patterns: Iterable[str]) -> bool:
    from fnmatch import fnmatch

    parts = relpath.split("/")
    if any(p.startswith(".") for p in parts):
        return True
    for pat in patterns:
        pat = pat.strip()
        if not pat or pat.startswith("#"):
            continue
        if pat.endswith("/"):
            if pat.rstrip("/") in parts[:-1] or fnmatch(relpath + "/", pat.lstrip("/") + "*"):
                return True
        elif fnmatch(relpath, pat.lstrip("/")) or fnmatch(parts[-1], pat):
            return True
    return False


def check_names_with_schema(paths: Iterable[Union[str, Path]], *, root: Optional[Union[str, Path]] = None,
                            derivative: bool = False, bidsignore: Iterable[str] = ()) -> list[str]:
    """File names that match no BIDS file rule (raw rules, plus derivative rules when
    ``derivative``). ``paths`` are relative to the dataset root (POSIX), or absolute with
    ``root`` given. Hidden files and ``bidsignore`` patterns are skipped. Returns the bad
    relative paths, sorted; [] when every name is valid."""
    regexes = _schema_regexes(bool(derivative))
    patterns = list(bidsignore)
    bad: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_absolute():
            if root is None:
                raise ValueError(f"{p} is absolute: give root to make it relative")
            p = p.relative_to(Path(root).absolute())
        rel = p.as_posix()
        if _ignored(rel, patterns):
            continue
        if not any(rx.match(rel) for rx in regexes):
            bad.append(rel)
    return sorted(bad)
