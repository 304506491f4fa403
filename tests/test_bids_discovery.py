"""Scan discovery on small real BIDS datasets written by ``tests/bids_factory.py``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineps.bids.discovery import (
    Scan,
    discover_scans,
    load_bids_filters,
    merged_sidecar,
    parse_bids_name,
    slice_orientation,
)
from spineps.errors import InputError, NoInputError, NoMatchError, UsageError
from tests.bids_factory import (
    BidsFactory,
    affine_from_axcodes,
    axial_affine,
    coronal_affine,
    sagittal_affine,
    standard_dataset,
)


def _rel(scans, root):
    return [Path(s.path).relative_to(root).as_posix() for s in scans]


def _skips(discovery, root):
    return {Path(p).relative_to(root).as_posix(): why for p, why in discovery.skipped}


@pytest.fixture
def std(tmp_path):
    return standard_dataset(tmp_path / "bids")


# --------------------------------------------------------------------------- the mixed dataset
def test_standard_dataset_exact_scans_and_skips(std):
    found = discover_scans(std.root)
    assert _rel(found.scans, std.root) == std.expected
    skips = _skips(found, std.root)
    assert set(skips) == set(std.skipped)
    for rel, word in std.skipped.items():
        assert word in skips[rel], (rel, skips[rel])
    # the acq-sag file with an axial affine says both
    why = skips["sub-01/anat/sub-01_acq-sag_run-2_T2w.nii.gz"]
    assert "acq-sag" in why and "affine is axial" in why
    assert "ImageOrientationPatientDICOM" in skips["sub-02/ses-2/anat/sub-02_ses-2_rec-iso_T2w.nii.gz"]
    # T1w is never a candidate with the default query
    assert not any("T1w" in p for p in skips)


def test_scan_fields(std):
    scans = {s.stem: s for s in discover_scans(std.root).scans}
    s = scans["sub-02_ses-1_acq-sag_run-2_chunk-1"]
    assert s.path.is_absolute() and s.path.is_file()
    assert s.bids_dir == std.root.absolute()
    assert list(s.entities.items()) == [("sub", "02"), ("ses", "1"), ("acq", "sag"), ("run", "2"), ("chunk", "1")]
    assert (s.subject, s.session, s.suffix, s.extension) == ("02", "1", "T2w", ".nii.gz")
    assert s.relpath == "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-2_chunk-1_T2w.nii.gz"
    assert s.key == s.stem
    one = scans["sub-01_acq-sag"]
    assert one.session is None
    # inheritance: the top-level acq-sag_T2w.json gives RepetitionTime, the file's own sidecar wins EchoTime
    assert one.sidecar == {"RepetitionTime": 3.5, "EchoTime": 0.09, "ImageOrientationText": "Sag"}
    assert s.sidecar == {"RepetitionTime": 3.5, "EchoTime": 0.1}
    assert scans["sub-02_ses-2"].sidecar == {}
    # every stem (and so every output name) is distinct
    assert len(scans) == len(std.expected)


def test_labels_with_and_without_prefix(std):
    a = discover_scans(std.root, participant_labels=["sub-02"])
    b = discover_scans(std.root, participant_labels=["02"])
    assert _rel(a.scans, std.root) == _rel(b.scans, std.root) == std.expected[1:]
    c = discover_scans(std.root, participant_labels="02", session_labels=["ses-1"])
    d = discover_scans(std.root, participant_labels=["sub-02"], session_labels=["1"])
    assert _rel(c.scans, std.root) == _rel(d.scans, std.root) == std.expected[1:5]


def test_unknown_labels_are_named(std):
    with pytest.raises(NoMatchError) as err:
        discover_scans(std.root, participant_labels=["02", "sub-07"])
    assert "sub-07" in str(err.value) and "sub-02" in str(err.value)  # names it and lists what exists
    assert err.value.exit_code == 18
    with pytest.raises(NoMatchError, match="ses-9"):
        discover_scans(std.root, session_labels=["ses-9"])
    # sub-01 has no sessions at all
    with pytest.raises(NoMatchError, match="ses-1"):
        discover_scans(std.root, participant_labels=["01"], session_labels=["1"])
    with pytest.raises(UsageError, match="sub-0_1"):
        discover_scans(std.root, participant_labels=["sub-0_1"])


def test_missing_dataset(tmp_path):
    with pytest.raises(NoInputError) as err:
        discover_scans(tmp_path / "nope")
    assert err.value.exit_code == 66 and "nope" in str(err.value)


# --------------------------------------------------------------------------- filters
def _filter_file(tmp_path, obj, name="filters.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_filter_null_and_any(std, tmp_path):
    no_acq = load_bids_filters(_filter_file(tmp_path, {"t2w": {"acquisition": None}}))
    assert no_acq == {"t2w": {"acquisition": None}}
    found = discover_scans(std.root, bids_filters=no_acq)
    assert _rel(found.scans, std.root) == ["sub-02/ses-2/anat/sub-02_ses-2_T2w.nii.gz"]
    assert set(_skips(found, std.root)) == {"sub-02/ses-2/anat/sub-02_ses-2_rec-iso_T2w.nii.gz"}

    any_run = load_bids_filters(_filter_file(tmp_path, {"t2w": {"acquisition": "*", "run": "*"}}))
    found = discover_scans(std.root, bids_filters=any_run)
    assert _rel(found.scans, std.root) == std.expected[1:5]
    assert set(_skips(found, std.root)) == {"sub-01/anat/sub-01_acq-sag_run-2_T2w.nii.gz"}

    t1 = load_bids_filters(_filter_file(tmp_path, {"t2w": {"suffix": "T1w"}}))
    assert _rel(discover_scans(std.root, bids_filters=t1).scans, std.root) == [
        "sub-01/anat/sub-01_acq-sag_T1w.nii.gz"]

    runs = {"t2w": {"acquisition": "sag", "run": ["1"]}}
    assert _rel(discover_scans(std.root, bids_filters=runs).scans, std.root) == std.expected[1:3]


def test_filter_selecting_nothing(std, tmp_path):
    with pytest.raises(NoMatchError, match="cor"):
        discover_scans(std.root, bids_filters={"t2w": {"acquisition": "cor"}})
    with pytest.raises(NoMatchError):
        discover_scans(std.root, participant_labels=["01"], bids_filters={"t2w": {"run": "1"}})


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not valid JSON"]),
    ('{"bold": {"suffix": "bold"}}', ["unknown query", "bold"]),
    ('["t2w"]', ["JSON object"]),
    ('{"t2w": ["acq"]}', ["'t2w'"]),
    ('{"t2w": {"acquisition": {"a": 1}}}', ["acquisition"]),
])
def test_malformed_filter_file(tmp_path, content, words):
    path = _filter_file(tmp_path, content, name="my-filters.json")
    with pytest.raises(UsageError) as err:
        load_bids_filters(path)
    assert "my-filters.json" in str(err.value)
    for w in words:
        assert w in str(err.value)
    assert err.value.exit_code == 64


def test_missing_filter_file(tmp_path):
    with pytest.raises(UsageError, match="absent.json"):
        load_bids_filters(tmp_path / "absent.json")


# --------------------------------------------------------------------------- never write into bids_dir
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


def _chmod_tree(root: Path, writable: bool) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            mode = p.stat().st_mode
            p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    mode = root.stat().st_mode
    root.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_read_only_dataset_untouched(tmp_path):
    std = standard_dataset(tmp_path / "src")
    ro = tmp_path / "ro"
    shutil.copytree(std.root, ro)
    work = tmp_path / "work" / "pybids"
    before = _snapshot(ro)
    _chmod_tree(ro, writable=False)
    try:
        in_memory = discover_scans(ro)
        on_disk = discover_scans(ro, database_dir=work, participant_labels=["02"])
        after = _snapshot(ro)
    finally:
        _chmod_tree(ro, writable=True)
    assert after == before  # no new, removed or modified file anywhere in the dataset
    assert _rel(in_memory.scans, ro) == std.expected
    assert _rel(on_disk.scans, ro) == std.expected[1:]
    assert work.is_dir() and list(work.iterdir()) == []  # the scratch index is removed afterwards


def test_database_dir_inside_dataset_refused(std):
    with pytest.raises(UsageError, match="inside the BIDS dataset"):
        discover_scans(std.root, database_dir=std.root / "code" / "db")


def test_no_dataset_description(tmp_path, caplog):
    f = BidsFactory(tmp_path / "bare", description=False)
    f.add("01", acq="sag")
    before = _snapshot(f.root)
    with caplog.at_level(logging.WARNING, logger="spineps.bids.discovery"):
        found = discover_scans(f.root)
    assert _rel(found.scans, f.root) == ["sub-01/anat/sub-01_acq-sag_T2w.nii.gz"]
    assert "dataset_description.json" in caplog.text
    assert _snapshot(f.root) == before


# --------------------------------------------------------------------------- selection rules
def test_acq_sag_preferred_within_a_session(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("01")  # sagittal by its affine, but the session has an acq-sag scan
    f.add("02")  # no acq-sag in this subject: kept
    found = discover_scans(f.root)
    assert _rel(found.scans, f.root) == ["sub-01/anat/sub-01_acq-sag_T2w.nii.gz", "sub-02/anat/sub-02_T2w.nii.gz"]
    assert "acq-sag is preferred" in _skips(found, f.root)["sub-01/anat/sub-01_T2w.nii.gz"]
    # an explicit filter is the user's choice: both kept
    both = discover_scans(f.root, bids_filters={"t2w": {}})
    assert len(both.scans) == 3


def test_acq_sag_variants_and_isotropic(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sagLumbar", chunk=1)
    f.add("01", acq="sagLumbar", chunk=2)
    f.add("02", plane="iso-axial")  # isotropic, no sidecar, narrowest field of view along S-I
    f.add("03", plane="iso-axial", sidecar={"ImageOrientationText": "Sag"})
    f.add("04", acq="sag", plane="iso-axial")  # isotropic: the affine is not "clearly" axial
    found = discover_scans(f.root)
    assert _rel(found.scans, f.root) == [
        "sub-01/anat/sub-01_acq-sagLumbar_chunk-1_T2w.nii.gz",
        "sub-01/anat/sub-01_acq-sagLumbar_chunk-2_T2w.nii.gz",
        "sub-03/anat/sub-03_T2w.nii.gz",
        "sub-04/anat/sub-04_acq-sag_T2w.nii.gz",
    ]
    assert "axial" in _skips(found, f.root)["sub-02/anat/sub-02_T2w.nii.gz"]


def test_unusable_files_are_skipped_not_raised(tmp_path, caplog):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("01", acq="sag", run=2, data=np.zeros((24, 40, 8, 3), np.int16), affine=sagittal_affine())
    f.add("01", acq="sag", run=3, data=np.ones((24, 40, 8, 1), np.int16), affine=sagittal_affine())
    f.add_raw_file("sub-01/anat/sub-01_acq-sag_run-4_T2w.nii.gz", b"\x00garbage")
    f.add("01", acq="sag", run=5, plane="coronal")
    with caplog.at_level(logging.INFO, logger="spineps.bids.discovery"):
        found = discover_scans(f.root)
    assert _rel(found.scans, f.root) == ["sub-01/anat/sub-01_acq-sag_T2w.nii.gz",
                                         "sub-01/anat/sub-01_acq-sag_run-3_T2w.nii.gz"]
    skips = _skips(found, f.root)
    assert "not a 3D image" in skips["sub-01/anat/sub-01_acq-sag_run-2_T2w.nii.gz"]
    assert "cannot read" in skips["sub-01/anat/sub-01_acq-sag_run-4_T2w.nii.gz"]
    assert "coronal" in skips["sub-01/anat/sub-01_acq-sag_run-5_T2w.nii.gz"]
    assert caplog.text.count("skipping") == 3


def test_everything_skipped_is_no_match(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="ax", plane="axial")
    with pytest.raises(NoMatchError, match="not sagittal"):
        discover_scans(f.root)


def test_duplicate_outputs_never_both_kept(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("01", acq="sag", extension=".nii")
    found = discover_scans(f.root)
    assert _rel(found.scans, f.root) == ["sub-01/anat/sub-01_acq-sag_T2w.nii"]
    assert "same entities" in _skips(found, f.root)["sub-01/anat/sub-01_acq-sag_T2w.nii.gz"]


def test_natural_sort(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    for sub in ("10", "2"):
        for run in (10, 2, 1):
            f.add(sub, acq="sag", run=run)
    stems = [s.stem for s in discover_scans(f.root).scans]
    assert stems == [f"sub-{s}_acq-sag_run-{r}" for s in ("2", "10") for r in (1, 2, 10)]


# --------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("affine, plane, source", [
    (sagittal_affine(), "sagittal", "slice spacing"),
    (sagittal_affine(axcodes="ASL"), "sagittal", "slice spacing"),
    (axial_affine(), "axial", "slice spacing"),
    (coronal_affine(), "coronal", "slice spacing"),
    (affine_from_axcodes("RPI", (4.0, 0.8, 0.8)), "sagittal", "slice spacing"),  # thick axis first
])
def test_orientation_of_stacks(affine, plane, source):
    o = slice_orientation(affine, (24, 40, 8))
    assert (o.plane, o.source, o.clear) == (plane, source, True)


def test_orientation_oblique_stack():
    rot = np.eye(4)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]  # 20 degrees about S-I: still mostly L-R
    assert slice_orientation(rot @ sagittal_affine(), (24, 40, 8)).plane == "sagittal"


def test_orientation_from_sidecar_and_fov():
    iso = affine_from_axcodes("RAS", (1, 1, 1))
    shape = (40, 40, 40)
    # row along A-P, column along S-I (DICOM LPS): slice normal along L-R -> sagittal
    o = slice_orientation(iso, shape, {"ImageOrientationPatientDICOM": [0, 1, 0, 0, 0, -1]})
    assert (o.plane, o.source, o.clear) == ("sagittal", "ImageOrientationPatientDICOM", False)
    assert slice_orientation(iso, shape, {"ImageOrientationText": "Tra>Cor(-1.2)"}).plane == "axial"
    assert slice_orientation(iso, shape, {"ImageOrientationText": "Sag"}).plane == "sagittal"
    assert slice_orientation(iso, (12, 40, 40)).source == "field of view"
    assert slice_orientation(iso, (12, 40, 40)).plane == "sagittal"
    o = slice_orientation(iso, shape)
    assert (o.source, o.plane) == ("slice axis", "axial")
    assert slice_orientation(iso, shape, slice_axis=0).plane == "sagittal"


def test_real_scans_are_sagittal(real_data):
    paths = sorted(real_data.glob("*/sub-*_T2w.nii.gz"))
    if not paths:
        pytest.skip(f"no T2w scans under {real_data}")
    for p in paths[:6] + [real_data / "SCT" / "sub-sctlumbar_T2w.nii.gz"]:
        if not p.is_file():
            continue
        img = nib.load(str(p))
        o = slice_orientation(img.affine, img.shape, None, img.header.get_dim_info()[2])
        assert o.plane == "sagittal", (p, o)


# --------------------------------------------------------------------------- names
def test_parse_bids_name():
    ents, suffix, ext = parse_bids_name("sub-01_ses-1_acq-sag_run-2_chunk-3_T2w.nii.gz")
    assert list(ents) == ["sub", "ses", "acq", "run", "chunk"] and suffix == "T2w" and ext == ".nii.gz"
    assert parse_bids_name("sub-01_T2w.nii")[2] == ".nii"
    for bad in ("T2w.nii.gz", "sub-01_acq_sag_T2w.nii.gz", "acq-sag_T2w.nii.gz", "sub-01_sub-02_T2w.nii"):
        with pytest.raises(ValueError):
            parse_bids_name(bad)


def test_scan_from_path(tmp_path):
    s = Scan.from_path(tmp_path / "sub-01" / "anat" / "sub-01_acq-sag_rec-x_T2w.nii.gz", tmp_path)
    assert s.stem == "sub-01_acq-sag_rec-x" and s.relpath == "sub-01/anat/sub-01_acq-sag_rec-x_T2w.nii.gz"
    assert hash(s) == hash(Scan.from_path(s.path, tmp_path))


def test_malformed_sidecar_skips_only_its_scan(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("02", acq="sag")
    bad = f.root / "sub-02" / "anat" / "sub-02_acq-sag_T2w.json"
    bad.write_text("{broken")
    found = discover_scans(f.root)
    assert _rel(found.scans, f.root) == ["sub-01/anat/sub-01_acq-sag_T2w.nii.gz"]
    why = _skips(found, f.root)["sub-02/anat/sub-02_acq-sag_T2w.nii.gz"]
    assert "malformed JSON" in why and bad.name in why


def test_sidecar_inheritance(tmp_path):
    f = BidsFactory(tmp_path / "bids")
    path = f.add("01", "1", acq="sag", run=2, sidecar={"C": "file"})
    f.write_json("T2w.json", {"A": "root", "B": "root", "C": "root", "D": "root"})
    f.write_json("sub-01/sub-01_T2w.json", {"B": "sub", "C": "sub"})
    f.write_json("sub-01/ses-1/sub-01_ses-1_acq-sag_T2w.json", {"C": "ses", "D": "ses"})
    f.write_json("sub-01/ses-1/anat/sub-01_ses-1_acq-sag_run-1_T2w.json", {"A": "other run"})  # not applicable
    f.write_json("sub-01/ses-1/anat/sub-01_ses-1_acq-sag_run-2_T1w.json", {"A": "other suffix"})  # not applicable
    f.write_json("acq-ax_T2w.json", {"A": "other acq"})  # not applicable
    assert merged_sidecar(path, f.root) == {"A": "root", "B": "sub", "C": "file", "D": "ses"}
    (f.root / "sub-01" / "sub-01_T2w.json").write_text("[1]")
    with pytest.raises(InputError, match="sub-01_T2w.json"):
        merged_sidecar(path, f.root)


def test_minimal_dataset_helper(tmp_path):
    from tests.bids_factory import minimal_dataset

    f = minimal_dataset(tmp_path / "bids", subjects=("01", "02"), sessions=("a", "b"))
    assert [s.stem for s in discover_scans(f.root).scans] == [
        "sub-01_ses-a_acq-sag", "sub-01_ses-b_acq-sag", "sub-02_ses-a_acq-sag", "sub-02_ses-b_acq-sag"]
    assert (f.root / "participants.tsv").read_text() == "participant_id\nsub-01\nsub-02\n"


# --------------------------------------------------------------------------- pybids #1270
@pytest.mark.parametrize("parent", ["perf", "anat", "func", "motion", "sub-project", "ses-2"])
def test_dataset_below_a_folder_named_like_a_datatype_or_entity(tmp_path, parent):
    """pybids 0.22.0 parses entities from the absolute path: under ``/projects/perf/bids/``
    every file got ``datatype=perf`` and no T2w scan was found (pybids issue #1270)."""
    std = standard_dataset(tmp_path / "projects" / parent / "bids")
    found = discover_scans(std.root)
    assert _rel(found.scans, std.root) == std.expected
    assert discover_scans(std.root, participant_labels=["02"], session_labels=["1"]).scans
    runs = {"t2w": {"acquisition": "sag", "run": [1]}}  # numbers match zero-padded or not
    assert _rel(discover_scans(std.root, bids_filters=runs).scans, std.root) == std.expected[1:3]


def test_filter_on_an_unknown_entity_is_a_usage_error(std):
    with pytest.raises(UsageError, match="'acq' is no BIDS entity"):
        discover_scans(std.root, bids_filters={"t2w": {"acq": "sag"}})
