"""Typed errors. Library code raises these; only ``spineps.cli.main`` turns them into exit
codes and messages, and the participant loop turns a scan's error into a logged skip.

Exit codes follow the draft BIDS-Apps execution spec (and sysexits.h where it is silent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = [
    "SpinepsError",
    "UsageError",
    "BIDSValidationError",
    "UnknownAnalysisLevelError",
    "NoMatchError",
    "InputError",
    "NoInputError",
    "OutputError",
    "ResourceError",
    "ModelError",
    "ScanFailuresError",
    "one_line",
    "write_error",
]


def one_line(text: str) -> str:
    """``text`` with every run of white space (line breaks included) made one space: error
    messages stay one line on stderr and in summaries."""
    return " ".join(str(text).split())


class SpinepsError(Exception):
    """Base class. ``exit_code`` is what ``main()`` returns for it."""

    exit_code: int = 1

    def __init__(self, message: str, path: Optional[Union[str, Path]] = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.reason = message


class UsageError(SpinepsError):
    """Wrong command-line usage (EX_USAGE)."""

    exit_code = 64


class BIDSValidationError(SpinepsError):
    """The input dataset failed BIDS validation."""

    exit_code = 16


class UnknownAnalysisLevelError(SpinepsError):
    exit_code = 17


class NoMatchError(SpinepsError):
    """Participant/session labels or filters selected no files."""

    exit_code = 18


class InputError(SpinepsError):
    """An input file cannot be used (EX_DATAERR): corrupt, wrong dimensionality, ..."""

    exit_code = 65


class NoInputError(SpinepsError):
    """The input dataset or a required input does not exist (EX_NOINPUT)."""

    exit_code = 66


class OutputError(SpinepsError):
    """An output cannot be created (EX_CANTCREAT)."""

    exit_code = 73


class ResourceError(SpinepsError):
    """Not enough memory or disk for a scan (EX_TEMPFAIL: may work elsewhere or later)."""

    exit_code = 75


class ModelError(SpinepsError):
    """A model folder is missing, malformed or incompatible (EX_CONFIG)."""

    exit_code = 78


class ScanFailuresError(SpinepsError):
    """Some scans of a participant run failed; the others finished. Exit 75 (temporary
    failure, as ``ResourceError``) when every failure was a lack of memory or disk, so a
    scheduler can tell "rerun with more" from a real failure; else 1."""

    exit_code = 1

    def __init__(self, failures: dict[str, str], temporary: bool = False):
        self.failures = dict(failures)
        if temporary:
            self.exit_code = ResourceError.exit_code
        lines = "\n".join(f"  {name}: {why}" for name, why in self.failures.items())
        super().__init__(f"{len(self.failures)} scan(s) failed:\n{lines}")


#: errno values of a write that failed for lack of room (disk full, quota): a temporary failure
_NO_ROOM = (28, 122)  # ENOSPC, EDQUOT (Linux)


def write_error(message: str, path: Optional[Union[str, Path]], exc: OSError) -> SpinepsError:
    """The error of a failed write: ``ResourceError`` (75, temporary: rerun with more room) when
    the disk or the quota is full, ``OutputError`` (73) otherwise."""
    import errno

    no_room = {getattr(errno, "ENOSPC", 28), getattr(errno, "EDQUOT", 122)}
    if exc.errno in no_room or exc.errno in _NO_ROOM:
        return ResourceError(f"{message} (no room left: disk or quota full)", path)
    return OutputError(message, path)
