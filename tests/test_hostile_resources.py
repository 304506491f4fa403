"""Resource limits: the per-scan memory/disk estimate (``spineps.resources``), the limits it
honours (``SPINEPS_MEMORY_LIMIT_MB``, ``SPINEPS_DISK_LIMIT_MB``, cgroup files,
``/proc/meminfo``), and a too-large scan failing alone through the CLI with a
``ResourceError`` that names it and the numbers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from spineps import resources
from spineps.bids.derivatives import expected_outputs
from spineps.bids.discovery import Scan
from spineps.cli.main import main
from spineps.errors import InputError, ResourceError
from spineps.geometry.io import read_header
from spineps import loading
from spineps.resources import (DISK_LIMIT_ENV, MEMORY_LIMIT_ENV, available_memory_bytes, check_scan_resources,
                               estimate_scan, free_disk_bytes)
from tests.bids_factory import BidsFactory, phantom_data, write_nifti
from tests.segmenters import make_test_segmenters

MB = 1024 * 1024


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def test_estimate_scales_with_voxels_and_model_resolution() -> None:
    a = estimate_scan((100, 100, 10), (1.0, 1.0, 4.0))
    b = estimate_scan((200, 100, 10), (1.0, 1.0, 4.0))
    assert a.n_voxels == 100_000 and b.n_voxels == 200_000
    # 1 x 1 x 4 mm voxels hold 4 / (0.75 * 0.75 * 1.65) model voxels each
    assert a.n_model_voxels == int(100_000 * 4.0 / (0.75 * 0.75 * 1.65))
    assert b.memory_bytes == pytest.approx(2 * a.memory_bytes, rel=1e-6)
    assert a.memory_bytes == (100_000 * resources.IMAGE_BYTES_PER_VOXEL
                              + a.n_model_voxels * resources.MODEL_BYTES_PER_VOXEL)
    fine = estimate_scan((100, 100, 10), (0.3, 0.3, 0.5))  # finer than the model grid: never fewer voxels
    assert fine.n_model_voxels == fine.n_voxels
    assert a.disk_bytes > 100_000 * 3


@pytest.fixture
def no_own_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SPINEPS_MEMORY_LIMIT_MB`` limits the whole process (its resident memory is subtracted);
    the tests with tiny budgets leave the test process's own memory out."""
    monkeypatch.setattr(resources, "_process_rss", lambda: 0)


def test_memory_limit_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                          no_own_rss: None) -> None:
    real, _ = available_memory_bytes({})
    assert real is None or real > 0
    got, src = available_memory_bytes({MEMORY_LIMIT_ENV: "12"})
    assert (got, src) == (12 * MB, f"{MEMORY_LIMIT_ENV}=12 MB")
    with caplog.at_level(logging.WARNING, logger="spineps.resources"):
        assert not available_memory_bytes({MEMORY_LIMIT_ENV: "lots"})[1].startswith(MEMORY_LIMIT_ENV)
    assert "not a number" in caplog.text

    monkeypatch.setattr(resources, "_meminfo_available", lambda: 900 * MB)
    monkeypatch.setattr(resources, "cgroup_memory_room", lambda: (300 * MB, "cgroup v2 /x: limit 1,000 MB"))
    assert available_memory_bytes({}) == (300 * MB, "cgroup memory limit: cgroup v2 /x: limit 1,000 MB")
    assert available_memory_bytes({MEMORY_LIMIT_ENV: "100"}) == (100 * MB, f"{MEMORY_LIMIT_ENV}=100 MB")


def test_memory_limit_env_is_a_limit_on_the_whole_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM job's --mem arrives as SPINEPS_MEMORY_LIMIT_MB: what this process already holds
    (Python, torch, the models) is not available to the scan."""
    monkeypatch.setattr(resources, "_process_rss", lambda: 300 * MB)
    monkeypatch.setattr(resources, "cgroup_memory_room", lambda: None)
    got, src = available_memory_bytes({MEMORY_LIMIT_ENV: "1000"})
    assert got == 700 * MB and src == f"{MEMORY_LIMIT_ENV}=1,000 MB minus 300 MB this process uses"
    monkeypatch.undo()
    assert resources._process_rss() > 10 * MB  # this test process, from /proc/self/status


def test_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 2048 kB\n")
    assert resources._meminfo_available(meminfo) == 2 * MB


def test_disk_limit_env(tmp_path: Path) -> None:
    free, src = free_disk_bytes(tmp_path / "not" / "yet" / "there", {})
    assert free is not None and free > 0 and str(tmp_path) in src or "free space" in src
    assert free_disk_bytes(tmp_path, {DISK_LIMIT_ENV: "0.5"}) == (MB // 2, DISK_LIMIT_ENV)


def test_check_scan_resources_messages(tmp_path: Path, no_own_rss: None) -> None:
    path = write_nifti(tmp_path / "scan.nii.gz", phantom_data((32, 48, 10)), np.diag([1.0, 1.0, 4.0, 1.0]))
    header = read_header(path)
    est = check_scan_resources(header, tmp_path, environ={})
    assert est.n_voxels == 32 * 48 * 10
    with pytest.raises(ResourceError) as info:
        check_scan_resources(header, tmp_path, environ={MEMORY_LIMIT_ENV: "1"})
    msg = str(info.value)
    assert info.value.exit_code == 75 and info.value.path == path and "\n" not in msg
    assert "not enough memory" in msg and "15360 voxels" in msg
    assert MEMORY_LIMIT_ENV in msg and "1.0 MB available" in msg
    with pytest.raises(ResourceError, match=f"not enough disk space.*{DISK_LIMIT_ENV}"):
        check_scan_resources(header, tmp_path, environ={DISK_LIMIT_ENV: "0.1"})


def test_absurd_header_is_an_input_error_not_a_resource_error(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "scan.nii", phantom_data((8, 8, 8)), np.eye(4))
    raw = bytearray(path.read_bytes())
    raw[40:48] = np.asarray([3, 20000, 20000, 20000], "<i2").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="too large.*before reading any voxel"):
        check_scan_resources(read_header(path), tmp_path, environ={})


def test_too_large_scan_fails_alone_through_the_cli(tmp_path: Path, test_models: None, no_own_rss: None,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    ds = BidsFactory(tmp_path / "bids")
    small = ds.add("01", acq="sag")  # 24 x 40 x 8: about 4 MB by the estimate
    big = ds.add("02", acq="sag", shape=(96, 128, 24), seed=2)  # about 120 MB by the estimate
    header = read_header(big)
    need = estimate_scan(header.spatial_shape, header.spacing).memory_bytes
    assert estimate_scan(read_header(small).spatial_shape, read_header(small).spacing).memory_bytes < 20 * MB < need
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "20")
    out = tmp_path / "out"
    # 75 (temporary failure): every failed scan only lacked memory, a rerun with more finishes it
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 75
    err = capsys.readouterr().err
    rel = big.relative_to(ds.root).as_posix()
    line = [ln for ln in err.splitlines() if rel in ln and "failed" in ln and "ResourceError" in ln]
    assert line, err
    assert "not enough memory" in line[0] and "20 MB available" in line[0] and MEMORY_LIMIT_ENV in line[0]
    assert all(p.is_file() for p in expected_outputs(out, Scan.from_path(small, ds.root)))
    assert not any(p.is_file() for p in expected_outputs(out, Scan.from_path(big, ds.root)))

    # with room again (a rerun elsewhere), the skipped scan is done and the finished one kept
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100000")
    monkeypatch.setenv(DISK_LIMIT_ENV, "100000")
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    assert all(p.is_file() for p in expected_outputs(out, Scan.from_path(big, ds.root)))


def test_no_disk_space_fails_each_scan_with_the_numbers(tmp_path: Path, test_models: None,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    ds.add("02", acq="sag", seed=2)
    monkeypatch.setenv(DISK_LIMIT_ENV, "0.5")
    out = tmp_path / "out"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 75
    err = capsys.readouterr().err
    assert "2 scan(s) failed" in err
    assert len([ln for ln in err.splitlines() if "ResourceError: not enough disk space" in ln
                and "0.5 MB free" in ln and "ERROR" in ln]) == 2
    assert not [p for p in out.rglob("sub-*") if p.is_file()]


@pytest.mark.parametrize("where", ["sidecar", "mask", "unwrapped"])
def test_disk_full_while_writing_is_a_temporary_failure(tmp_path: Path, test_models: None,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], where: str) -> None:
    """A disk (or quota) that fills up while a scan's outputs are written is a lack of disk
    like the one the check foresees: the run exits 75 (temporary, a rerun with room finishes
    it), not 1."""
    import errno

    from spineps.bids import derivatives

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "sidecar":
        write = derivatives.write_json_atomic
        monkeypatch.setattr(derivatives, "write_json_atomic", lambda path, obj: full() if str(path).endswith(
            "_dseg.json") else write(path, obj))
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    if where == "mask":
        monkeypatch.setattr("nibabel.save", full)
    elif where == "unwrapped":  # an OSError no write site wrapped (e.g. from a library)
        monkeypatch.setattr("spineps.participant._write_measurements_and_figure", full)
    rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation"])
    err = capsys.readouterr().err
    assert rc == 75, err
    assert "No space left on device" in err and "sub-01" in err
