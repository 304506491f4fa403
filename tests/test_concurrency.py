"""Many participant processes into one output folder (as a SLURM array does): 8 processes of
``tests/_run_with_test_models.py`` started together, 7 on different subjects and a second one
on the same subject as another. Dataset description, lookup tables, ``.bidsignore`` and logs
must come out whole and race-free, no temporary name is ever shared, and the two processes
on one subject never compute its scan at the same time: the per-scan lock
(``logs/locks/<scan>.lock``, ``fcntl.flock``) makes the second one wait, then skip the scan
the first one completed. The result passes the BIDS validator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spineps.bids.derivatives import expected_outputs
from spineps.bids.discovery import Scan
from spineps.fsutil import TEMP_PREFIX, exclusive_lock, remove_stale_locks
from tests.bids_factory import BidsFactory

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "_run_with_test_models.py"
SUBJECTS = ("01", "02", "03", "04", "05", "06", "07")
SAME = "07"  # the subject two processes get


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _spawn(bids: Path, out: Path, sub: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUNNER), str(bids), str(out), "participant",
                             "--skip-bids-validation", "--participant-label", sub, "--nprocs", "1"],
                            env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _log_of(out: Path, pid: int) -> str:
    found = list((out / "logs").glob(f"participant_*_pid{pid}.log"))
    assert len(found) == 1, (pid, found)
    return found[0].read_text(encoding="utf-8")


@pytest.mark.slow
def test_eight_processes_into_one_output_folder(tmp_path: Path) -> None:
    ds = BidsFactory(tmp_path / "bids")
    for i, sub in enumerate(SUBJECTS):
        ds.add(sub, acq="sag", seed=i)
    out = tmp_path / "out"
    # the first process on SAME holds its scan for a while; the second starts once the
    # first has announced the scan, so it must meet the lock
    first = _spawn(ds.root, out, SAME, SPINEPS_TEST_DELAY="6")
    procs = {f"{sub}": _spawn(ds.root, out, sub, SPINEPS_TEST_DELAY="0.3") for sub in SUBJECTS if sub != SAME}
    t0 = time.monotonic()
    while not (out / "logs").is_dir() or not any(
            f"[1/1] sub-{SAME}" in p.read_text() for p in (out / "logs").glob(f"*_pid{first.pid}.log")):
        assert first.poll() is None and time.monotonic() - t0 < 120, "the first run on the shared subject stopped"
        time.sleep(0.05)
    second = _spawn(ds.root, out, SAME)
    results = {}
    for name, proc in [*procs.items(), (f"{SAME}-first", first), (f"{SAME}-second", second)]:
        rc = proc.wait(timeout=300)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        results[name] = (rc, err)
    assert len(results) == 8
    for name, (rc, err) in results.items():
        assert rc == 0, (name, err)

    # every scan complete, written once; the shared one computed by the first process only
    for sub in SUBJECTS:
        scan = Scan.from_path(ds.root / f"sub-{sub}/anat/sub-{sub}_acq-sag_T2w.nii.gz", ds.root)
        assert all(p.is_file() for p in expected_outputs(out, scan)), sub
    log_first, log_second = _log_of(out, first.pid), _log_of(out, second.pid)
    assert "1 processed, 0 skipped" in log_first
    assert "another run is computing this scan; waiting for it" in log_second
    assert "outputs completed by another run meanwhile, skipped" in log_second
    assert "0 processed, 1 skipped" in log_second

    # dataset-level files whole and identical to what one process writes; one log per process
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    for name in ("desc-spine_dseg.tsv", "desc-vertebrae_dseg.tsv"):
        rows = (out / name).read_text().splitlines()
        assert rows[0].startswith("index\tname") and len({len(r.split("\t")) for r in rows}) == 1
    logs = sorted(p.name for p in (out / "logs").glob("*.log"))
    assert len(logs) == 8 and len({re.sub(r"_pid\d+", "", n) for n in logs}) <= 8
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert not list((out / "logs").rglob("*.lock"))

    from spineps.bids.validation import validate_dataset

    report = validate_dataset(out, derivative=True)
    if not report.available:
        pytest.skip(f"BIDS validator not available: {report.reason}")
    assert report.ok, report.summary()


def test_exclusive_lock_waits_and_survives_removal(tmp_path: Path) -> None:
    """A second holder waits for the first (in a child process), and a stale lock file
    (holder gone) is removed by ``remove_stale_locks`` while a held one is kept."""
    lock = tmp_path / "locks" / "scan.lock"
    marker = tmp_path / "order.txt"
    code = ("import sys, time; from pathlib import Path; from spineps.fsutil import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n"
            "    Path(sys.argv[2]).open('a').write('child-in\\n'); time.sleep(1.0)\n"
            "    Path(sys.argv[2]).open('a').write('child-out\\n')\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(lock), str(marker)], env=_env())
    t0 = time.monotonic()
    while not marker.is_file() and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    waited: list[bool] = []
    with exclusive_lock(lock, on_wait=lambda: waited.append(True)) as locked:
        marker.open("a").write("parent-in\n")
        assert locked
        assert not remove_stale_locks(lock.parent)  # held: kept
    assert child.wait(timeout=60) == 0
    assert waited == [True]
    assert marker.read_text().splitlines() == ["child-in", "child-out", "parent-in"]
    assert not lock.exists()  # removed on release
    lock.write_text("999999 stale\n")  # a killed holder's file: nobody holds it
    assert remove_stale_locks(lock.parent) == [lock] and not lock.exists()
