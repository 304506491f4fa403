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

__all__ = ["pid_alive", "atomic_path", "write_text_atomic", "write_json_atomic", "remove_stale_temps", "exclusive_lock",
           "LockHeld", "remove_stale_locks", "check_real_folder", "TEMP_PREFIX", "is_within", "jsonable"]

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


def _flock_nb(fd: int) -> Optional[bool]:
    """Try an exclusive ``flock`` without waiting: True (got it), False (another open file
    holds it), None (this file system has no ``flock``)."""
    import errno
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_ino == os.fstat(fd).st_ino and st.st_dev == os.fstat(fd).st_dev


def _locked_temp(final: Path) -> tuple[Path, int]:
    """A new temporary file beside ``final`` and an open descriptor holding an exclusive
    ``flock`` on it for as long as it is written: that lock, not the host name and pid in
    its name, tells :func:`remove_stale_temps` that a writer is alive (pids mean nothing
    across containers that share a host name, or across nodes). A name whose lock a cleaner
    took first (between the creation and the lock) is given up for a new one."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = final.with_name(f"{TEMP_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{final.name}")
        fd = os.open(tmp, flags, 0o666)
        try:
            got = _flock_nb(fd)
        except BaseException:
            os.close(fd)
            raise
        if got is None or (got and _same_file(tmp, fd)):
            return tmp, fd  # locked (or no flock here: the name's host and pid are the fallback)
        os.close(fd)  # a cleaner holds it and will remove it: take another name


@contextmanager
def atomic_path(final: Path, *, allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same extension, hidden name, created empty
    and locked, see :func:`_locked_temp`); on success it is renamed onto ``final``, on any
    error it is removed and ``final`` is untouched. A writer that leaves the file empty (or
    removes it) is an error unless ``allow_empty``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _locked_temp(final)
    try:
        yield tmp
        if not tmp.exists() or (not allow_empty and tmp.stat().st_size == 0):
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        os.replace(tmp, final)
    finally:
        try:
            if tmp.exists():
                try:
                    tmp.unlink()
                except OSError:  # pragma: no cover - best effort
                    log.warning("could not remove temporary file %s", tmp)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(Path(path), allow_empty=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_temp(path: Path) -> bool:
    """Whether the temporary file ``path`` was left by a writer that is gone, removing it if so.
    Its writer holds an ``flock`` on it while it lives (:func:`_locked_temp`), so a lock this
    process can take means nobody writes it, whatever host or pid its name holds (containers
    that share a host name, pid namespaces, other nodes where the file system passes locks on).
    Where the file system has no ``flock``, only this host's files of dead pids count."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # gone meanwhile, a symlink (never ours), unreadable
        return False
    try:
        got = _flock_nb(fd)
        if got is None:
            m = _TEMP_RE.match(path.name)
            got = bool(m and m.group(1) == _host() and not pid_alive(int(m.group(2))))
        if got and _same_file(path, fd):
            os.unlink(path)  # still holding the lock: a writer that just created it gives the name up
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove temporary files under ``root`` left by writers that no longer run (e.g. a killed
    job), see :func:`_stale_temp`. Returns what was removed."""
    removed: list[Path] = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for path in root.rglob(f"{TEMP_PREFIX}*"):
        if _TEMP_RE.match(path.name) and _stale_temp(path):
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by interrupted runs", len(removed))
    return removed


_LOCK_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _open_lock_file(path: Path, create: bool = True) -> int:
    """Open a lock file without following a symlink (``O_NOFOLLOW``; ``O_NONBLOCK`` so a
    planted FIFO cannot hang the run) and check it is a plain file of its own (one link): in
    a shared ``logs/locks/`` a planted symlink or hard link would otherwise have the holder
    truncate and overwrite whatever file it points to. ``OSError`` (``ELOOP`` for a symlink,
    ``EPERM`` for anything else that is no lock file of ours)."""
    import errno
    import stat

    fd = os.open(path, _LOCK_FLAGS | (os.O_CREAT if create else 0), 0o666)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            what = "not a plain file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} links"
            raise OSError(errno.EPERM, f"refusing the lock file: it is {what} (planted?)", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_real_folder(folder: Path, root: Path) -> None:
    """Raise ``OSError`` (``ELOOP``) when ``folder`` or a folder between ``root`` and it is a
    symlink (or not a folder): outputs must land where their names say, never through a link
    planted in a shared output folder (e.g. ``out/sub-01 -> bids_dir/sub-01``). Folders that
    do not exist yet are fine (they will be created as real folders)."""
    import errno
    import stat

    folder, root = Path(folder), Path(root)
    rel = folder.relative_to(root)
    probe = root
    for part in rel.parts:
        probe = probe / part
        try:
            st = os.lstat(probe)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ELOOP, "is a symlink or not a folder; outputs are never written through links",
                          str(probe))


class LockHeld(Exception):
    """``exclusive_lock(path, wait=False)``: another process holds the lock."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is held by another process")
        self.path = Path(path)


@contextmanager
def exclusive_lock(path: Path, on_wait: Optional[Callable[[], None]] = None, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the ``with``
    block; ``on_wait`` is called once when another process holds it (then this one waits).
    With ``wait=False`` it does not wait: ``LockHeld`` is raised on entering instead.
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
        fd = _open_lock_file(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockHeld(path) from None
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
            fd = _open_lock_file(path, create=False)
        except OSError:  # gone, a symlink, a hard link, not a file: never ours to remove
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
