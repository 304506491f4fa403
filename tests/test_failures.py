"""Failure records (``spineps.failures``) and the group level's list of failed and
incomplete scans (``spineps.group.failed``): a truncated NIfTI fails at the participant
level, leaves a record in the output dataset, shows in the group table, TSV and report; a
rerun that succeeds clears it. The output stays BIDS-valid."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from spineps import loading
from spineps.bids.validation import find_validator, validate_dataset
from spineps.cli.main import main
from spineps.failures import FAILURES_DIR, bids_name_of, read_failures
from spineps.group.failed import FAILED_TSV
from spineps.group.report import REPORT_HTML
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [dict(zip(lines[0].split("\t"), ln.split("\t"))) for ln in lines[1:]]


def _blob(out: Path) -> dict:
    html = (out / REPORT_HTML).read_text(encoding="utf-8")
    return json.loads(re.search(r'id="report-data">(.*?)</script>', html, re.S).group(1).replace("<\\/", "</"))


def test_bids_name_of() -> None:
    assert bids_name_of("sub-01/ses-a/anat/sub-01_ses-a_acq-sag_run-2_T2w.nii.gz") == "sub-01_ses-a_acq-sag_run-2"
    assert bids_name_of("sub-01_acq-sag.nii") == "sub-01_acq-sag"


def test_truncated_scan_is_recorded_listed_and_cleared(tmp_path: Path, test_models: None) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    bad = ds.add("02", acq="sag", seed=2)
    ds.add("03", acq="sag", seed=3)
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # the header reads, the voxels stop halfway
    out = tmp_path / "out"
    argv = [str(ds.root), str(out), "participant", "--skip-bids-validation"]
    assert main(argv) == 1
    [rec] = read_failures(out)
    assert rec["bids_name"] == "sub-02_acq-sag" and rec["scan"] == "sub-02/anat/sub-02_acq-sag_T2w.nii.gz"
    assert rec["error"] == "InputError" and "truncated" in rec["reason"] and "\n" not in rec["reason"]
    assert (out / rec["log_file"]).is_file() and "sub-02" in (out / rec["log_file"]).read_text()
    assert datetime.fromisoformat(rec["time"]).tzinfo is not None
    assert (out / FAILURES_DIR / "failed_sub-02_acq-sag.json").is_file()

    assert main([str(ds.root), str(out), "group"]) == 0
    [row] = _tsv(out / FAILED_TSV)
    assert row["bids_name"] == "sub-02_acq-sag" and row["status"] == "failed" and row["error"] == "InputError"
    assert "truncated" in row["reason"] and row["log_file"] == rec["log_file"]
    assert json.loads((out / "group_T2w_failed.json").read_text())["status"]["Levels"]["failed"]
    blob = _blob(out)
    assert [f["bids_name"] for f in blob["failed"]] == ["sub-02_acq-sag"] and len(blob["scans"]) == 2
    if find_validator() is not None:
        report = validate_dataset(out, derivative=True)
        assert report.ok, report.summary()

    # an interrupted scan (mask without sidecar) is listed as incomplete
    sidecar = next(out.rglob("sub-03_acq-sag_desc-spine_dseg.json"))
    sidecar.unlink()
    assert main([str(ds.root), str(out), "group"]) == 0
    rows = {r["bids_name"]: r for r in _tsv(out / FAILED_TSV)}
    assert rows["sub-03_acq-sag"]["status"] == "incomplete" and rows["sub-02_acq-sag"]["status"] == "failed"

    # the fixed file and the interrupted scan are recomputed by a rerun: no record, nothing listed
    bad.write_bytes(good)
    assert main(argv) == 0
    assert read_failures(out) == [] and not list((out / FAILURES_DIR).glob("*.json"))
    assert main([str(ds.root), str(out), "group"]) == 0
    assert _tsv(out / FAILED_TSV) == [] and _blob(out)["failed"] == [] and len(_blob(out)["scans"]) == 3


def test_unreadable_input_from_discovery_is_recorded(tmp_path: Path, test_models: None) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    broken = ds.add("02", acq="sag", seed=2)
    broken.write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 1
    [rec] = read_failures(out)
    assert rec["bids_name"] == "sub-02_acq-sag" and rec["error"] == "InputError" and rec["reason"]
