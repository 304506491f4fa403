"""Atomic file writing: every output is written under a temporary name in its final folder
and renamed into place, so an interrupted run never leaves a half-written file under a name
that a rerun would trust. Temporary names are unique per process and call, so parallel
participant runs into one output folder never share one.

Also the small path and JSON helpers every layer uses: ``is_within`` (is a path inside a
folder) and ``jsonable`` (numpy scalars and arrays, paths, tuples and sets made JSON values).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "remove_stale_temps", "exclusive_lock",
           "remove_stale_locks", "TEMP_PREFIX", "is_within", "jsonable"]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".spineps-tmp-"
_TEMP_RE = re.compile(r"^\.spineps-tmp-(.+?)-(\d+)-[0-9a-f]{12}-")


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or lies below it (compared as given: resolve both first
    where links matter)."""
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def jsonable(obj: Any, ndigits: Optional[int] = None) -> Any:
    """``obj`` with numpy scalars and arrays, paths, tuples and sets made JSON values (dict keys
    made strings). With ``ndigits``, floats are rounded to that many digits and NaN becomes
    None (``null``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v, ndigits) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return jsonable(obj.tolist(), ndigits)
        if isinstance(obj, np.generic):
            obj = obj.item()
    if ndigits is not None and isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, ndigits)
    return obj


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same extension, hidden name); on success it
    is renamed onto ``final``, on any error it is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TEMP_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{final.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:  # pragma: no cover - best effort
                log.warning("could not remove temporary file %s", tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove temporary files under ``root`` left by processes that no longer run
    (e.g. a killed job) on this host. Files of live processes, and of other hosts, are left
    alone. Returns what was removed."""
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for path in root.rglob(f"{TEMP_PREFIX}*"):
        m = _TEMP_RE.match(path.name)
        # only this host's files: on a shared file system another node's pid means nothing here
        if m and m.group(1) == _host() and not _pid_alive(int(m.group(2))):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    if removed:
        log.info("removed %d temporary file(s) left by interrupted runs", len(removed))
    return removed


@contextmanager
def exclusive_lock(path: Path, on_wait: Optional[Callable[[], None]] = None) -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the ``with``
    block; ``on_wait`` is called once when another process holds it (then this one waits).
    The kernel drops the lock when its holder dies, even by SIGKILL, so a killed run never
    blocks the next one. The file is removed on release; a waiter that got the lock on a
    removed file retries on the new one. Yields False (and does not lock) on a file system
    without ``flock`` support (a warning is logged), True otherwise."""
    import errno
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None and not waited:
                    on_wait()
                waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                log.warning("%s: file locking is not supported here (%s); going on without the lock", path, exc)
                yield False
                return
            raise
        except BaseException:  # KeyboardInterrupt / SIGTERM while waiting
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{_host()} {os.getpid()}\n".encode())
        yield True
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def remove_stale_locks(folder: Path) -> list[Path]:
    """Remove the ``*.lock`` files of :func:`exclusive_lock` in ``folder`` that no process
    holds (left by a run killed between its last write and the release). Safe against
    concurrent users: a file is removed only while this process holds its lock, and
    :func:`exclusive_lock` re-checks the file after locking. Returns what was removed."""
    import fcntl

    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in sorted(folder.glob("*.lock")):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live run (or no flock here)
                continue
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.unlink(path)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d lock file(s) left by interrupted runs", len(removed))
    return removed
