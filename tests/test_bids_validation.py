"""BIDS validation: the real ``bids-validator-deno`` on factory datasets and on a derivative
tree written with ``spineps.bids.derivatives``; the ``bidsschematools`` name check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spineps.bids import derivatives as D
from spineps.bids import validation as V
from spineps.bids.discovery import discover_scans
from tests.bids_factory import BidsFactory, standard_dataset, write_nifti

VALIDATOR = V.find_validator()
needs_validator = pytest.mark.skipif(
    VALIDATOR is None, reason="bids-validator-deno is not installed (pip install bids-validator-deno)")


def _derivative_tree(tmp_path: Path) -> tuple[Path, Path]:
    std = standard_dataset(tmp_path / "bids")
    out = tmp_path / "out"
    D.write_dataset_description(out, bids_dir=std.root, version="0.1.0",
                                container={"Type": "docker", "Tag": "spineps:0.1.0"})
    D.write_lookup_tables(out)
    D.write_readme(out, version="0.1.0")
    D.write_bidsignore(out)
    models = {"semantic": {"name": "T2w_segmentor", "version": "2.0", "checksum": "sha256:00"}}
    import nibabel as nib

    for scan in discover_scans(std.root).scans[:3]:
        img = nib.load(str(scan.path))
        sem = np.zeros(img.shape, np.uint8)
        sem[4:12, 10:30, 2:6] = 49
        sem[12:14, 10:30, 2:6] = 100
        inst = np.where(sem == 49, 20, np.where(sem == 100, 120, 0)).astype(np.uint16)
        for mask, sidecar, data in ((D.SEMANTIC_MASK, D.SEMANTIC_SIDECAR, sem),
                                    (D.INSTANCE_MASK, D.INSTANCE_SIDECAR, inst)):
            write_nifti(mask.path(out, scan), data, img.affine)
            D.write_sidecar(sidecar.path(out, scan), D.make_sidecar(
                description=f"{mask.desc} segmentation", sources=[scan], software_version="0.1.0",
                models=models, parameters={}, timings={"total": 0.1}))
        D.write_sidecar(D.CENTROIDS.path(out, scan), {"20": [1.0, 2.0, 3.0]})
        D.FIGURE.path(out, scan).write_bytes(b"\x89PNG")
    (out / "logs").mkdir()
    (out / "logs" / "run.log").write_text("log\n")
    return std.root, out


@needs_validator
def test_valid_raw_dataset(tmp_path):
    std = standard_dataset(tmp_path / "bids")
    report = V.validate_dataset(std.root)
    assert report.available and report.ok, report.summary()
    assert report.errors == [] and report.returncode == 0
    assert "--format" in report.command and report.seconds < 60
    assert "0 error(s)" in report.summary()


@needs_validator
def test_badly_named_raw_file(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    bad = f.add("01", acq="sag", suffix="T2")  # not a BIDS suffix
    report = V.validate_dataset(f.root)
    assert report.available and not report.ok
    assert report.returncode == 16
    assert any(bad.name in e for e in report.errors), report.errors
    assert bad.name in report.summary()


@needs_validator
def test_derivative_tree_has_no_errors(tmp_path):
    _, out = _derivative_tree(tmp_path)
    report = V.validate_dataset(out, derivative=True)
    assert report.available and report.ok, report.summary()
    # the per-file sidecars silence the SpatialReference recommendation for the masks
    assert not [w for w in report.warnings if "SpatialReference" in w and w.endswith(".nii.gz")], report.warnings
    assert not [w for w in report.warnings if "README" in w], report.warnings  # the README describes the outputs


@needs_validator
def test_derivative_tree_with_bad_names(tmp_path):
    _, out = _derivative_tree(tmp_path)
    anat = out / "sub-01" / "anat"
    shutil.copy(anat / "sub-01_acq-sag_desc-spine_dseg.nii.gz", anat / "sub-01_acq-sag_desc-spine_segmentation.nii.gz")
    report = V.validate_dataset(out, derivative=True)
    assert report.available and not report.ok
    assert any("sub-01_acq-sag_desc-spine_segmentation.nii.gz" in e for e in report.errors), report.errors


@needs_validator
def test_raw_dataset_is_not_a_derivative(tmp_path):
    std = standard_dataset(tmp_path / "bids")
    report = V.validate_dataset(std.root, derivative=True)
    assert report.available and not report.ok
    assert any("NOT_A_DERIVATIVE_DATASET" in e for e in report.errors)


def test_validator_unavailable(tmp_path, monkeypatch):
    std = standard_dataset(tmp_path / "bids")
    report = V.validate_dataset(std.root, validator=[str(tmp_path / "no-such-validator")])
    assert not report.available and not report.ok and "could not be started" in report.reason
    monkeypatch.setattr(V, "find_validator", lambda: None)
    report = V.validate_dataset(std.root)
    assert not report.available and "not found" in report.reason
    assert "could not run" in report.summary()
    fake = tmp_path / "fake-validator"
    fake.write_text("#!/bin/sh\necho 'boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    report = V.validate_dataset(std.root, validator=[str(fake)])
    assert not report.available and "exited 3" in report.reason and "boom" in report.reason


# --------------------------------------------------------------------------- schema fallback
def test_check_names_with_schema_raw(tmp_path):
    std = standard_dataset(tmp_path / "bids")
    files = [p for p in std.root.rglob("*") if p.is_file()]
    assert V.check_names_with_schema(files, root=std.root) == []
    bad = ["sub-01/anat/sub-01_acq-sag_T2.nii.gz", "sub-01/anat/sub-01_foo_T2w.nii.gz",
           "anat/sub-01_T2w.nii.gz", "sub-01/anat/sub-01_acq-sag_desc-spine_dseg.nii.gz"]
    assert V.check_names_with_schema(bad + ["sub-01/anat/sub-01_acq-sag_run-1_chunk-2_T2w.nii.gz"]) == sorted(bad)
    with pytest.raises(ValueError, match="root"):
        V.check_names_with_schema([std.root / "README"])


def test_check_names_with_schema_derivative(tmp_path):
    _, out = _derivative_tree(tmp_path)
    ignore = (out / ".bidsignore").read_text().splitlines()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert V.check_names_with_schema(files, root=out, derivative=True, bidsignore=ignore) == []
    unignored = V.check_names_with_schema(files, root=out, derivative=True)
    assert "logs/run.log" not in unignored  # BIDS itself allows a top-level logs/ folder
    assert any(p.endswith("_desc-spine_dseg.png") for p in unignored)
    assert any(p.endswith("_desc-vertebrae_centroids.json") for p in unignored)
    assert V.check_names_with_schema(["sub-01/anat/sub-01_desc-spine_segmentation.nii.gz"], derivative=True) == [
        "sub-01/anat/sub-01_desc-spine_segmentation.nii.gz"]


def test_find_validator_shape():
    if VALIDATOR is not None:
        assert isinstance(VALIDATOR, list) and Path(VALIDATOR[0]).name == V.VALIDATOR_NAME


def test_report_json_parsing():
    text = 'Some banner\n' + json.dumps({"issues": {"issues": [
        {"code": "NOT_INCLUDED", "severity": "error", "location": "/x.nii"},
        {"code": "JSON_KEY_RECOMMENDED", "subCode": "Authors", "severity": "warning", "location": "/d.json"}]}})
    data = V._parse_json(text)
    assert [V._issue_line(i) for i in data["issues"]["issues"]] == [
        "NOT_INCLUDED: /x.nii", "JSON_KEY_RECOMMENDED Authors: /d.json"]
