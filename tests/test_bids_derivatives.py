"""Derivative names, folders, dataset_description, lookup tables, .bidsignore, sidecars."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest

from spineps import labels
from spineps.bids import derivatives as D
from spineps.bids.discovery import Scan, discover_scans
from spineps.fsutil import TEMP_PREFIX
from tests.bids_factory import standard_dataset


def _scan(tmp_path, name, ses=None):
    folder = tmp_path / "bids" / name.split("_")[0] / (f"ses-{ses}" if ses else "") / "anat"
    return Scan.from_path(folder / name, tmp_path / "bids")


def test_names_keep_every_entity_in_order(tmp_path):
    s = _scan(tmp_path, "sub-01_ses-1_acq-sag_run-2_chunk-3_T2w.nii.gz", ses="1")
    assert D.derivative_name(s, "spine") == "sub-01_ses-1_acq-sag_run-2_chunk-3_desc-spine_dseg.nii.gz"
    assert D.derivative_name(s, "vertebrae", "dseg", ".json") == \
        "sub-01_ses-1_acq-sag_run-2_chunk-3_desc-vertebrae_dseg.json"
    assert D.derivative_dir(tmp_path / "out", s) == tmp_path / "out" / "sub-01" / "ses-1" / "anat"
    assert D.derivative_path(tmp_path / "out", s, "spine") == \
        tmp_path / "out/sub-01/ses-1/anat/sub-01_ses-1_acq-sag_run-2_chunk-3_desc-spine_dseg.nii.gz"
    r = _scan(tmp_path, "sub-01_acq-sag_rec-norm_run-1_T2w.nii")
    assert D.SEMANTIC_MASK.name(r) == "sub-01_acq-sag_rec-norm_run-1_desc-spine_dseg.nii.gz"
    assert D.CENTROIDS.name(r) == "sub-01_acq-sag_rec-norm_run-1_desc-vertebrae_centroids.json"
    assert D.derivative_dir(tmp_path, r) == tmp_path / "sub-01" / "anat"
    # a source desc is replaced, never doubled; desc stays last
    d = _scan(tmp_path, "sub-01_acq-sag_desc-denoised_T2w.nii.gz")
    assert D.derivative_name(d, "spine") == "sub-01_acq-sag_desc-spine_dseg.nii.gz"
    for bad in ("sp-ine", "", "a_b"):
        with pytest.raises(ValueError):
            D.derivative_name(r, bad)


def test_runs_and_chunks_never_collide(tmp_path):
    std = standard_dataset(tmp_path / "bids")
    scans = discover_scans(std.root).scans
    out = tmp_path / "out"
    paths = [p for s in scans for p in D.expected_outputs(out, s)]
    assert len(paths) == len(set(paths)) == 5 * len(scans)
    names = {D.SEMANTIC_MASK.name(s) for s in scans}
    assert "sub-02_ses-1_acq-sag_run-2_chunk-1_desc-spine_dseg.nii.gz" in names
    assert "sub-02_ses-1_acq-sag_run-1_chunk-2_desc-spine_dseg.nii.gz" in names


def test_expected_outputs(tmp_path):
    s = _scan(tmp_path, "sub-01_acq-sag_T2w.nii.gz")
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    assert D.expected_outputs(out, s, with_instances=False) == [
        anat / "sub-01_acq-sag_desc-spine_dseg.nii.gz", anat / "sub-01_acq-sag_desc-spine_dseg.json"]
    assert D.expected_outputs(out, s)[2:] == [
        anat / "sub-01_acq-sag_desc-vertebrae_dseg.nii.gz", anat / "sub-01_acq-sag_desc-vertebrae_dseg.json",
        anat / "sub-01_acq-sag_desc-vertebrae_centroids.json"]


# --------------------------------------------------------------------------- lookup tables
def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_lookup_tables(tmp_path):
    paths = D.write_lookup_tables(tmp_path)
    assert [p.name for p in paths] == ["desc-spine_dseg.tsv", "desc-vertebrae_dseg.tsv"]
    spine = _read_tsv(tmp_path / "desc-spine_dseg.tsv")
    assert list(spine[0]) == ["index", "name", "abbreviation", "color", "mapping"]
    assert spine[0] == {"index": "0", "name": "background", "abbreviation": "BG", "color": "#000000", "mapping": "0"}
    by_index = {int(r["index"]): r for r in spine}
    assert set(by_index) == {0} | {lab.value for lab in labels.SEMANTIC}
    assert by_index[labels.BODY]["name"] == "vertebral body" and by_index[labels.BODY]["mapping"] == "4"
    assert by_index[labels.CANAL]["mapping"] == "3" and by_index[labels.DISC]["mapping"] == "5"
    assert by_index[labels.CORD]["mapping"] == "n/a"
    vert = _read_tsv(tmp_path / "desc-vertebrae_dseg.tsv")
    vidx = {int(r["index"]): r for r in vert}
    assert len(vidx) == len(vert)  # unique indices
    assert vidx[20]["name"] == "L1" and vidx[120]["name"] == "L1/L2 disc" and vidx[224]["name"] == "L5/S1 endplate"
    assert vidx[26]["name"] == "S1" and 126 not in vidx and vidx[0]["name"] == "background"
    for row in spine + vert:
        assert re.fullmatch(r"#[0-9a-f]{6}", row["color"]), row
        assert row["name"] and "\t" not in row["name"]
    # idempotent: a second call leaves the files as they are
    mtime = (tmp_path / "desc-spine_dseg.tsv").stat().st_mtime_ns
    D.write_lookup_tables(tmp_path)
    assert (tmp_path / "desc-spine_dseg.tsv").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- dataset_description
def test_dataset_description_content(tmp_path):
    bids = tmp_path / "bids"
    path = D.write_dataset_description(tmp_path / "out", bids_dir=bids, version="1.2.3",
                                       container={"Type": "docker", "Tag": "spineps:1.2.3"})
    desc = json.loads(path.read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] == D.BIDS_VERSION and desc["Name"]
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "spineps" and gen["Version"] == "1.2.3"
    assert gen["Container"] == {"Type": "docker", "Tag": "spineps:1.2.3"}
    assert desc["DatasetLinks"] == {"raw": bids.absolute().as_uri()}
    assert desc["SourceDatasets"] == [{"URL": bids.absolute().as_uri()}]
    # another version rewrites it; the same one leaves it alone
    D.write_dataset_description(tmp_path / "out", bids_dir=bids, version="2.0")
    assert json.loads(path.read_text())["GeneratedBy"][0] == {"Name": "spineps", "Version": "2.0"}
    D.write_dataset_description(tmp_path / "out", bids_dir="https://example.org/ds", version="2.0")
    assert json.loads(path.read_text())["DatasetLinks"] == {"raw": "https://example.org/ds"}


def _write_description_many(out: str, bids: str, n: int) -> None:
    for _ in range(n):
        D.write_dataset_description(Path(out), bids_dir=Path(bids), version="0.1.0")
        # a different content in between forces real rewrites, not just "already there"
        D.write_dataset_description(Path(out), bids_dir=Path(bids), version="0.1.0-other")


def test_dataset_description_concurrent_writers(tmp_path):
    out, bids = tmp_path / "out", tmp_path / "bids"
    ctx = mp.get_context("spawn" if not hasattr(mp, "get_all_start_methods")
                         or "fork" not in mp.get_all_start_methods() else "fork")
    procs = [ctx.Process(target=_write_description_many, args=(str(out), str(bids), 15)) for _ in range(8)]
    for p in procs:
        p.start()
    # read while they write: never a torn file
    seen = 0
    while any(p.is_alive() for p in procs):
        path = out / "dataset_description.json"
        if path.exists():
            json.loads(path.read_text())
            seen += 1
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Version"] in ("0.1.0", "0.1.0-other")
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert seen > 0


# --------------------------------------------------------------------------- .bidsignore
def test_bidsignore_merges(tmp_path):
    (tmp_path / ".bidsignore").write_text("custom/\nlogs/\n")
    D.write_bidsignore(tmp_path)
    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert lines[:2] == ["custom/", "logs/"]
    assert len(lines) == len(set(lines))
    for needed in ("logs/", "*.png", "*_centroids.json", "*.html", "figures/"):
        assert needed in lines
    text = (tmp_path / ".bidsignore").read_text()
    D.write_bidsignore(tmp_path)
    D.write_bidsignore(tmp_path, extra=["custom/"])
    assert (tmp_path / ".bidsignore").read_text() == text
    D.write_bidsignore(tmp_path, extra=["extra.txt"])
    assert (tmp_path / ".bidsignore").read_text() == text + "extra.txt\n"


def test_bidsignore_fresh(tmp_path):
    D.write_bidsignore(tmp_path / "new")
    assert (tmp_path / "new" / ".bidsignore").read_text().splitlines() == list(D.BIDSIGNORE_LINES)


# --------------------------------------------------------------------------- sidecars
def test_make_sidecar(tmp_path):
    s = _scan(tmp_path, "sub-01_ses-1_acq-sag_run-2_T2w.nii.gz", ses="1")
    data = D.make_sidecar(
        description="semantic spine segmentation",
        sources=[s, "sub-01/ses-1/anat/other_T2w.nii.gz", "bids::sub-01/ses-1/anat/x_desc-spine_dseg.nii.gz"],
        software_version="0.1.0",
        models={"semantic": {"name": "T2w_segmentor", "version": "2.0", "checksum": "sha256:ab", "kind": "nnunet"}},
        parameters={"step_size": 0.5},
        timings={"semantic": 1.25},
        extra={"Notes": "x"},
    )
    assert data["Description"] == "semantic spine segmentation"
    assert data["Sources"] == ["bids:raw:sub-01/ses-1/anat/sub-01_ses-1_acq-sag_run-2_T2w.nii.gz",
                               "bids:raw:sub-01/ses-1/anat/other_T2w.nii.gz",
                               "bids::sub-01/ses-1/anat/x_desc-spine_dseg.nii.gz"]
    assert data["SpatialReference"] == data["Sources"][0]
    assert data["Manual"] is False
    assert data["SoftwareName"] == "spineps" and data["SoftwareVersion"] == "0.1.0"
    assert data["Models"] == {"semantic": {"Name": "T2w_segmentor", "Version": "2.0", "Checksum": "sha256:ab",
                                           "kind": "nnunet"}}
    assert data["Parameters"] == {"step_size": 0.5} and data["Timings"] == {"semantic": 1.25}
    assert data["Notes"] == "x"
    path = D.write_sidecar(D.SEMANTIC_SIDECAR.path(tmp_path / "out", s), data)
    assert json.loads(path.read_text()) == data
    assert path.name == "sub-01_ses-1_acq-sag_run-2_desc-spine_dseg.json"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_make_sidecar_rejects_incomplete_models(tmp_path):
    s = _scan(tmp_path, "sub-01_acq-sag_T2w.nii.gz")
    with pytest.raises(ValueError, match="Checksum"):
        D.make_sidecar(description="x", sources=[s], software_version="0", models={"semantic": {"name": "a",
                       "version": "1"}}, parameters={}, timings={})
    with pytest.raises(ValueError, match="relative"):
        D.bids_uri("/abs/sub-01_T2w.nii.gz")
