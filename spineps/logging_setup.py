"""Logging for one CLI run: messages to stderr, and the whole run (debug level) into a
log file of its own under ``output_dir/logs/`` (named with a timestamp and the process
id, so parallel participant runs never share one). Library modules only use
``logging.getLogger(__name__)``; only the CLI calls :func:`setup_logging`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["setup_logging", "teardown_logging", "file_handlers", "quiet_stdout", "LOGGER_NAME"]

LOGGER_NAME = "spineps"
_FORMAT_STDERR = "%(asctime)s %(levelname)-7s %(message)s"
_FORMAT_FILE = "%(asctime)s %(process)d %(levelname)-7s %(name)s: %(message)s"
_DATEFMT = "%H:%M:%S"

# handlers this module added, so a second in-process run (tests) starts clean
_HANDLERS: list[logging.Handler] = []


def setup_logging(verbosity: int = 0, log_file: Optional[Path] = None) -> Optional[Path]:
    """Configure the ``spineps`` logger. ``verbosity`` 0: info on stderr; >=1: debug.
    The log file (when given) always gets debug messages. Returns the log file path."""
    teardown_logging()
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(logging.DEBUG)
    root.propagate = False  # do not double-print through the root logger

    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    err.setFormatter(logging.Formatter(_FORMAT_STDERR, _DATEFMT))
    root.addHandler(err)
    _HANDLERS.append(err)

    if log_file is not None:
        log_file = Path(log_file)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="x", encoding="utf-8")  # "x": never append to another run's log
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(_FORMAT_FILE))
        root.addHandler(fh)
        _HANDLERS.append(fh)

    # third-party chatter stays out of stderr unless asked for
    for name in ("nibabel", "bids", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    return log_file


def file_handlers() -> list[logging.FileHandler]:
    """The log-file handlers of the current run (to write something to the file only)."""
    return [h for h in _HANDLERS if isinstance(h, logging.FileHandler)]


def teardown_logging() -> None:
    """Remove (and close) the handlers :func:`setup_logging` added."""
    root = logging.getLogger(LOGGER_NAME)
    while _HANDLERS:
        h = _HANDLERS.pop()
        root.removeHandler(h)
        try:
            h.close()
        except Exception:  # pragma: no cover - best effort
            pass


@contextlib.contextmanager
def quiet_stdout(log: logging.Logger, who: str = "nnU-Net") -> Iterator[None]:
    """Keep a library's prints (nnU-Net's, e.g. about unset ``nnUNet_*`` paths at import) off
    our stdout; what it printed goes to ``log`` at debug level."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        text = buf.getvalue().strip()
        if text:
            log.debug("%s said: %s", who, text[:2000])
