"""Security and data loss in shared folders (issue 17, item 8): planted lock-file links,
stale temporaries of live writers in other pid namespaces, symlinked output folders,
and unrestricted unpickling of model checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spineps import loading
from spineps.bids.derivatives import expected_outputs
from spineps.bids.discovery import Scan
from spineps.cli.main import main
from spineps.fsutil import TEMP_PREFIX, _host, exclusive_lock, remove_stale_locks, remove_stale_temps
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# --------------------------------------------------------------------------- lock files
def test_planted_symlink_lock_file_never_truncates_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "scan.lock").symlink_to(victim)
    with pytest.raises(OSError):
        with exclusive_lock(locks / "scan.lock"):
            pass
    assert victim.read_text() == "precious\n"
    assert remove_stale_locks(locks) == [] and (locks / "scan.lock").is_symlink()


def test_planted_hard_link_lock_file_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    os.link(victim, locks / "scan.lock")
    with pytest.raises(OSError, match="2 links"):
        with exclusive_lock(locks / "scan.lock"):
            pass
    assert victim.read_text() == "precious\n"


def test_planted_lock_link_fails_that_scan_through_the_cli(tmp_path: Path, test_models: None,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    second = ds.add("02", acq="sag", seed=2)
    out = tmp_path / "out"
    (out / "logs" / "locks").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "logs" / "locks" / "sub-01_acq-sag.lock").symlink_to(victim)
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 1
    assert victim.read_text() == "precious\n"
    err = capsys.readouterr().err
    assert "sub-01" in err and "OutputError" in err
    assert all(p.is_file() for p in expected_outputs(out, Scan.from_path(second, ds.root)))


# --------------------------------------------------------------------------- symlinked output folders
def test_symlinked_subject_folder_never_writes_into_bids_dir(tmp_path: Path, test_models: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    second = ds.add("02", acq="sag", seed=2)
    before = sorted(p.relative_to(ds.root).as_posix() for p in ds.root.rglob("*"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub-01").symlink_to(ds.root / "sub-01")  # planted (or a mistake): out/sub-01 -> bids/sub-01
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 1
    assert sorted(p.relative_to(ds.root).as_posix() for p in ds.root.rglob("*")) == before
    err = capsys.readouterr().err
    assert "symlink" in err and "sub-01" in err
    assert all(p.is_file() for p in expected_outputs(out, Scan.from_path(second, ds.root)))


def test_symlinked_logs_folder_is_exit_73(tmp_path: Path, test_models: None) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "logs").symlink_to(elsewhere)
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 73
    assert not list(elsewhere.iterdir())


# --------------------------------------------------------------------------- stale temporaries
def test_live_writer_of_another_pid_namespace_keeps_its_temporary(tmp_path: Path) -> None:
    """Containers that share a host name each have their own pids: a temporary named with this
    host and a pid that does not run *here* may belong to a live writer there. Its writer's
    ``flock`` on the file says it is alive; only once it is gone is the file removed."""
    dead_pid = 4_000_000 + os.getpid() % 100_000  # beyond pid_max: runs in no namespace here
    name = f"{TEMP_PREFIX}{_host()}-{dead_pid}-0123456789ab-sub-01_desc-spine_dseg.nii.gz"
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'half written'); open(sys.argv[2], 'w').close(); time.sleep(60)\n")
    marker = tmp_path / "locked"
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / name), str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.05)
        assert socket.gethostname()  # the name holds this host: the old rule removed it (pid not alive here)
        assert remove_stale_temps(tmp_path) == []
        assert (tmp_path / name).exists()
    finally:
        writer.kill()
        writer.wait()
    assert remove_stale_temps(tmp_path) == [tmp_path / name]
