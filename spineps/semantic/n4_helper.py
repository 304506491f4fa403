"""N4 in a helper process of its own.

Why: ITK (SimpleITK) holds ~90 MiB of resident memory from its import on, for the rest of
the process; a participant process that runs N4 itself carries it through every later
phase, the network's inference included (its peak). Here each N4 runs in a short-lived
``python -m spineps.semantic.n4_helper REQUEST.json`` that imports only numpy, nibabel and
SimpleITK and exits when done, so the participant process never loads ITK.

Two ways in:

- :func:`n4_isolated` (``data, spacing, settings, threads`` -> corrected array): the same
  answer as ``preprocess.n4_correct`` (the helper runs that function), the array handed over
  through a temporary ``.npy`` file.
- :func:`start_prefetch` (a scan's NIfTI path): the helper reads the scan itself
  (``geometry.io.load_volume``, then ``preprocess.normalize_range``: what the semantic phase
  hands to N4) and starts at once, so a participant run can correct its first scan while the
  models load. The result is only used for an image whose normalised voxels and spacing are
  exactly the ones the helper corrected (:meth:`N4Job.result_for`, a digest of both);
  anything else is corrected afresh.

A helper that fails raises ``InputError`` with the end of its error output (the scan fails,
the run goes on); one that cannot be started at all (``OSError``) leaves N4 to the calling
process, with a warning. An interrupt kills the helper; its temporary folder is removed
either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spineps.errors import InputError
from spineps.fsutil import atomic_path, write_json_atomic

__all__ = ["N4Job", "n4_isolated", "start_prefetch", "digest", "main"]

log = logging.getLogger(__name__)

_MODULE = "spineps.semantic.n4_helper"
_ERR_TAIL = 2000
#: the helpers' temporary folders: ``<tmp>/spineps-n4-<pid of the process that made it>-<random>``
_PREFIX = "spineps-n4-"


def _remove_orphans() -> list[Path]:
    """Remove the helper folders of processes that are gone (a participant process killed
    outright, e.g. by SIGKILL at a job's time limit, cannot remove its own). Best effort."""
    from spineps.fsutil import pid_alive

    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        pid = folder.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _die_with_parent() -> None:
    """In the helper: be killed when the process that started it dies (Linux), so a killed
    participant leaves no N4 running on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def digest(data: np.ndarray, spacing: Sequence[float]) -> str:
    """What identifies N4's input: the float32 voxels (shape included) and the spacing."""
    arr = np.ascontiguousarray(data, dtype=np.float32)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, tuple(round(float(s), 9) for s in spacing))).encode())
    h.update(arr.tobytes() if arr.size < 1 else arr.data.cast("B"))
    return h.hexdigest()


def _env() -> dict[str, str]:
    """The helper's environment: this process's, with the folder this ``spineps`` is
    imported from first on ``PYTHONPATH`` (a source tree that is not installed works too)."""
    import spineps

    root = str(Path(spineps.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class N4Job:
    """One helper process and its temporary folder (``key.json``, the digest of its input, then
    ``output.npy`` and ``done.json`` appear there, each written under a temporary name first)."""

    def __init__(self, request: dict[str, Any], folder: Path, what: str, settings: Any):
        self.folder = folder
        self.what = what
        self.settings = settings
        self.started = time.perf_counter()
        #: the helper's ``done.json`` once it finished: digest, N4 seconds, ITK threads, its peak RSS
        self.info: dict[str, Any] = {}
        self._err = open(folder / "stderr.txt", "w+b")
        (folder / "request.json").write_text(json.dumps(request))
        try:
            self.proc: Optional[subprocess.Popen] = subprocess.Popen(
                [sys.executable, "-m", _MODULE, str(folder / "request.json")], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._err, env=_env(), close_fds=True)
        except OSError:
            self._err.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @classmethod
    def _new(cls, request: dict[str, Any], what: str, settings: Any, before_start: Any = None) -> "N4Job":
        _remove_orphans()
        folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        try:
            if before_start is not None:
                before_start(folder)
            request = dict(request, output=str(folder / "output.npy"), done=str(folder / "done.json"))
            return cls(request, folder, what, settings)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def wait(self) -> tuple[str, np.ndarray]:
        """The digest of what the helper corrected and the corrected array (float32);
        ``InputError`` when the helper failed. The helper is killed if the wait is
        interrupted; the folder is removed in any case."""
        try:
            assert self.proc is not None
            code = self.proc.wait()
            self._err.seek(0)
            err = self._err.read().decode(errors="replace").strip()
            done = self.folder / "done.json"
            if code != 0 or not done.is_file():
                failed = self.folder / "error.json"
                why = json.loads(failed.read_text())["error"] if failed.is_file() else err[-_ERR_TAIL:] or "no output"
                if err:
                    log.debug("N4 helper (%s) said: %s", self.what, err[-_ERR_TAIL:])
                raise InputError(f"N4 bias-field correction failed in its helper process (exit code {code}): {why}",
                                 Path(self.what) if self.what.endswith((".nii", ".nii.gz")) else None)
            info = json.loads(done.read_text())
            self.info = info
            data = np.load(self.folder / "output.npy")
            log.debug("N4 helper (%s): %.2f s, N4 itself %.2f s with %s ITK thread(s), its peak RSS %.0f MiB",
                      self.what, time.perf_counter() - self.started, info.get("n4_s", float("nan")),
                      info.get("itk_threads", "?"), info.get("peak_rss_mib", float("nan")))
            return str(info["digest"]), data
        finally:
            self.cancel()

    def key(self) -> Optional[str]:
        """The digest of what the helper is correcting (:func:`digest`), written by the helper
        before N4 starts: waited for (polled) until it is there or the helper has ended; None
        when the helper ended without one (failed)."""
        path = self.folder / "key.json"
        while not path.is_file() and self.running:
            time.sleep(0.01)
        return str(json.loads(path.read_text())["digest"]) if path.is_file() else None

    def result_for(self, data: np.ndarray, spacing: Sequence[float], settings: Any) -> Optional[np.ndarray]:
        """The helper's corrected array when it corrects exactly ``data`` at ``spacing`` with
        ``settings`` (waited for); None otherwise (the helper is stopped at once: e.g. a
        prefetched scan that is not the one being segmented, or that changed on disk)."""
        if settings != self.settings or self.key() != digest(data, spacing):
            self.cancel()
            return None
        return self.wait()[1]

    def cancel(self) -> None:
        """Stop the helper if it still runs; remove its folder."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if not self._err.closed:
            self._err.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _request(settings: Any, threads: Optional[int]) -> dict[str, Any]:
    return {"settings": asdict(settings), "threads": None if threads is None else int(threads)}


def start_prefetch(path: Path, settings: Any, threads: Optional[int]) -> Optional[N4Job]:
    """A helper that reads the scan at ``path`` and corrects it (see the module docstring);
    None when no helper can be started (logged)."""
    try:
        job = N4Job._new(dict(_request(settings, threads), nifti=str(path)), str(path), settings)
    except OSError as exc:
        log.warning("cannot start the N4 helper process (%s): N4 runs in this process", exc)
        return None
    log.debug("N4 of %s started in a helper process (pid %s)", path, job.proc.pid if job.proc else "?")
    return job


def n4_isolated(data: np.ndarray, spacing: Sequence[float], settings: Any, threads: Optional[int] = None,
                prefetched: Optional[list[N4Job]] = None) -> np.ndarray:
    """``preprocess.n4_correct(data, spacing, settings)`` run in a helper process (the result
    of a prefetched job when one of ``prefetched`` corrected exactly this input; every job
    of the list is consumed). In this process when no helper can be started."""
    from spineps.semantic.preprocess import n4_correct

    arr = np.ascontiguousarray(data, dtype=np.float32)
    while prefetched:
        out = prefetched.pop(0).result_for(arr, spacing, settings)
        if out is not None:
            log.debug("N4: the helper's prefetched result is used")
            return out
        log.debug("N4: the prefetched result was for other voxels; correcting afresh")

    def save_input(folder: Path) -> None:
        np.save(folder / "input.npy", arr)

    try:
        job = N4Job._new(dict(_request(settings, threads), spacing=[float(s) for s in spacing]),
                         "image", settings, before_start=save_input)
    except OSError as exc:
        log.warning("cannot start the N4 helper process (%s): N4 runs in this process", exc)
        return n4_correct(arr, spacing, settings)
    _digest, out = job.wait()
    return out


# ----------------------------------------------------------------------------- the helper
def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv: Optional[list[str]] = None) -> int:
    """The helper: ``python -m spineps.semantic.n4_helper REQUEST.json``. A failure leaves
    its reason (one line) in ``error.json`` beside the request and exits 1."""
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0]).parent
    if argv is None:
        _die_with_parent()
    try:
        return _correct(Path(args[0]))
    except Exception as exc:  # the reason for the parent's error message; the traceback on stderr
        import traceback

        traceback.print_exc()
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        write_json_atomic(folder / "error.json", {"error": reason})
        return 1


def _correct(request: Path) -> int:
    from spineps.semantic.preprocess import N4Settings, n4_correct, normalize_range, set_itk_threads

    req = json.loads(request.read_text())
    folder = Path(req["output"]).parent
    fields = dict(req["settings"])
    fields["iterations"] = tuple(fields.get("iterations", ()))
    settings = N4Settings(**fields)
    if req.get("threads"):
        set_itk_threads(int(req["threads"]))
    if req.get("nifti"):
        from spineps.geometry.io import load_volume

        image = load_volume(req["nifti"], kind="image")
        data, spacing = normalize_range(image.data), tuple(image.spacing)
        del image
    else:
        data, spacing = np.load(folder / "input.npy"), tuple(req["spacing"])
    key = digest(data, spacing)
    write_json_atomic(folder / "key.json", {"digest": key})
    t0 = time.perf_counter()
    out = n4_correct(data, spacing, settings)
    n4_s = time.perf_counter() - t0
    with atomic_path(Path(req["output"])) as tmp:  # same extension: np.save keeps the name
        np.save(tmp, out)
    import SimpleITK as sitk  # (imported by n4_correct)

    write_json_atomic(Path(req["done"]), {"digest": key, "n4_s": round(n4_s, 4),
                                           "itk_threads": int(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()),
                                           "peak_rss_mib": round(_peak_rss_mib(), 1)})
    return 0


if __name__ == "__main__":  # pragma: no cover - run as the helper process
    sys.exit(main())
