"""Interrupted runs: SIGKILL at 20+ random points (fixed seed) followed by a rerun must give
exactly the outputs of an uninterrupted run, with no temporary or lock file left; SIGTERM
and SIGINT stop cleanly (exit 143 / 130), remove temporary files and log what finished.

The killed runs are separate processes running the entry of
``tests/_run_with_test_models.py`` (test-only segmenters, slowed down by
``SPINEPS_TEST_DELAY`` / ``SPINEPS_TEST_SIDECAR_DELAY`` so the kills land inside scans and
between a scan's masks and its sidecars). For the 20+ random SIGKILLs they are forked from
this already-imported process (a fresh interpreter costs seconds of imports per kill on a
small CI machine, and most kills would land in the imports); the SIGTERM/SIGINT tests and
the calibration run use real ``python tests/_run_with_test_models.py`` subprocesses. The
reruns run in-process through ``main()``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np
import pytest

from spineps.cli.main import main
from spineps.fsutil import TEMP_PREFIX
from spineps import loading
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "_run_with_test_models.py"
SEED = 20261126
N_KILLS = 21
#: keys of the sidecars that differ between any two runs (timings, the run's own id and settings file)
VOLATILE = {"Timings", "RunId", "SettingsFile"}


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _dataset(root: Path) -> BidsFactory:
    ds = BidsFactory(root)
    for i, sub in enumerate(("01", "02", "03")):
        ds.add(sub, acq="sag", seed=i)
    return ds


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _content(path: Path) -> Any:
    """What must be equal between runs: voxels + affine + dtype of masks, JSON without the
    volatile keys, the bytes of anything else. Loading is part of the check."""
    name = path.name
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        return ("nifti", data.dtype.str, data.shape, data.tobytes(), np.round(img.affine, 6).tobytes())
    if name.endswith(".json"):
        return ("json", _strip(json.loads(path.read_text(encoding="utf-8"))))
    return ("bytes", path.read_bytes())


def _outputs(out: Path) -> dict[str, Any]:
    """Every result file (not the logs) by relative path. A killed writer's temporary file is
    listed but not loaded: it may be empty or torn, which is what the temporary name is for."""
    return {p.relative_to(out).as_posix(): ("temporary", None) if p.name.startswith(TEMP_PREFIX) else _content(p)
            for p in sorted(out.rglob("*"))
            if p.is_file() and not p.relative_to(out).as_posix().startswith("logs/")}


def _leftovers(out: Path) -> list[str]:
    temps = [p.relative_to(out).as_posix() for p in out.rglob(f"{TEMP_PREFIX}*")]
    locks = [p.relative_to(out).as_posix() for p in (out / "logs").rglob("*.lock")] if (out / "logs").is_dir() else []
    return temps + locks


class ForkedRun:
    """``python tests/_run_with_test_models.py BIDS OUT participant ...`` as a forked child
    of this (already imported) process, with a ``subprocess.Popen``-like interface."""

    stderr = None

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.returncode: Optional[int] = None
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            rc = 70
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                sys.stdout = sys.stderr = open(os.devnull, "w")
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.environ.update(env)
                from tests import _run_with_test_models as runner

                runner._install()
                rc = int(runner.main(argv))
            except BaseException:  # report through the exit code only
                rc = 71
            finally:
                os._exit(rc)
        self.pid = pid

    def _reap(self, flags: int) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def poll(self) -> Optional[int]:
        return self._reap(os.WNOHANG)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        t0 = time.monotonic()
        while self.poll() is None:
            if time.monotonic() - t0 > timeout:
                os.kill(self.pid, signal.SIGKILL)
                self._reap(0)
                raise AssertionError(f"forked run {self.pid} did not end within {timeout} s")
            time.sleep(0.005)
        return int(self.returncode)


def _fork(ds: BidsFactory, out: Path, *extra: str, **env: str) -> ForkedRun:
    return ForkedRun([str(ds.root), str(out), "participant", "--skip-bids-validation", "--nprocs", "1", *extra], env)


def _spawn(ds: BidsFactory, out: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUNNER), str(ds.root), str(out), "participant",
                             "--skip-bids-validation", "--nprocs", "1", *extra],
                            env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so Python installs its Ctrl-C handler even
    when the test session itself was started in the background (``cmd &`` in a
    non-interactive shell ignores SIGINT, and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _log_text(out: Path) -> str:
    logs = out / "logs"
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(logs.glob("*.log"))) \
        if logs.is_dir() else ""


def _wait_for(proc: Any, out: Path, needle: str, timeout: float = 60.0) -> float:
    """Seconds until ``needle`` appears in a log of ``out`` (the run is past its start-up)."""
    t0 = time.monotonic()
    while needle not in _log_text(out):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {needle!r}: "
                                 f"{proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{needle!r} did not appear within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def _kill(proc: Any, sig: int = signal.SIGKILL) -> Optional[int]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.stderr:
            proc.stderr.close()


DELAYS = {"SPINEPS_TEST_DELAY": "0.05", "SPINEPS_TEST_SIDECAR_DELAY": "0.03"}


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_matches_reference(tmp_path: Path, test_models: None) -> None:
    ds = _dataset(tmp_path / "bids")
    ref_out = tmp_path / "reference"
    assert main([str(ds.root), str(ref_out), "participant", "--skip-bids-validation"]) == 0
    reference = _outputs(ref_out)
    assert sum(k.endswith("_dseg.nii.gz") for k in reference) == 6  # 3 scans x (semantic, instance)

    # how long the slowed-down work takes after start-up, from one uninterrupted run
    probe_out = tmp_path / "probe"
    proc = _fork(ds, probe_out, **DELAYS)
    _wait_for(proc, probe_out, "scan(s) selected")
    t0 = time.monotonic()
    assert proc.wait(timeout=120) == 0
    work_s = time.monotonic() - t0
    assert _outputs(probe_out) == reference

    rng = random.Random(SEED)
    points = sorted(rng.uniform(0.0, work_s * 1.05) for _ in range(N_KILLS))
    rng.shuffle(points)
    states = {"none": 0, "partial": 0, "complete": 0}
    for i, delay in enumerate(points):
        # every 5th kill hits an --overwrite run over the complete outputs of the previous
        # cycle: its old sidecars must be revoked before anything is rewritten
        extra = ("--overwrite",) if i % 5 == 4 else ()
        out = tmp_path / f"run{i - 1 if extra else i:02d}"
        proc = _fork(ds, out, *extra, **DELAYS)
        _wait_for(proc, out, "scan(s) selected")
        time.sleep(delay)
        rc = _kill(proc)
        assert rc in (-signal.SIGKILL, 0), rc
        done = _outputs(out) if out.is_dir() else {}  # loads every file left under a final name
        states["none" if not done else ("complete" if done == reference else "partial")] += 1
        # whatever the kill left: every file under a final name is whole (atomic writes) ...
        for key, value in done.items():
            if Path(key).name.startswith(TEMP_PREFIX):
                continue  # a killed writer's temporary file: removed by the rerun
            assert key in reference, f"kill {i} at {delay:.2f} s left an unexpected file {key}"
            if key.endswith(".nii.gz") or not key.endswith(".json"):
                assert value == reference[key], f"kill {i} at {delay:.2f} s left a torn {key}"
        if i % 4 == 1:  # ... and a second kill of a rerun changes nothing about that
            proc = _fork(ds, out, **DELAYS)
            _wait_for(proc, out, "scan(s) selected")
            time.sleep(rng.uniform(0.0, work_s / 2))
            _kill(proc)
        assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0, f"kill {i}"
        got = _outputs(out)
        assert sorted(got) == sorted(reference), f"kill {i} at {delay:.2f} s"
        for key, value in reference.items():
            assert got[key] == value, f"kill {i} at {delay:.2f} s: {key} differs from the reference"
        assert not _leftovers(out), _leftovers(out)
    assert states["partial"] >= N_KILLS // 3, states  # most kills landed in the middle of the work


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("moment", ["in-model", "before-sidecars"])
def test_sigterm_sigint_stop_cleanly(sig: int, code: int, word: str, moment: str, tmp_path: Path,
                                     test_models: None) -> None:
    ds = _dataset(tmp_path / "bids")
    out = tmp_path / "out"
    env = {"SPINEPS_TEST_DELAY": "2.0"} if moment == "in-model" else {"SPINEPS_TEST_SIDECAR_DELAY": "1.5"}
    proc = _spawn(ds, out, **env)
    if moment == "in-model":
        _wait_for(proc, out, "[2/3] sub-02")
        time.sleep(0.5)  # inside the semantic phase of scan 2
    else:
        second = out / "sub-02" / "anat" / "sub-02_acq-sag_desc-vertebrae_centroids.json"
        _wait_for(proc, out, "[2/3] sub-02")
        t0 = time.monotonic()
        while not second.is_file():  # scan 2's masks are written, its sidecars pending
            assert time.monotonic() - t0 < 60 and proc.poll() is None
            time.sleep(0.01)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    assert rc == code, err
    assert word in err and "see the log for what finished" in err
    log = _log_text(out)
    assert "interrupted while processing sub-02/anat/sub-02_acq-sag_T2w.nii.gz" in log
    assert "finished before: 1 processed, 0 already complete, 0 failed" in log
    assert not _leftovers(out), _leftovers(out)  # temporaries removed, the scan lock released
    names = {p.name for p in out.rglob("sub-02*")}
    assert "sub-02_acq-sag_desc-vertebrae_dseg.json" not in names  # scan 2 does not look complete
    assert not any(p.name.startswith("sub-03") for p in out.rglob("*"))
    # the rerun finishes the rest
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    assert "2 processed, 1 skipped" in sorted((out / "logs").glob("participant_*.log"))[-1].read_text()
