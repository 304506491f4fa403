"""The instance phase on its own: ``spineps instance MASKS_DIR OUTPUT_DIR`` on existing
semantic masks (no image), with the bundled instance model; the same derivatives as a
participant run, then the group level on them; bad masks fail one by one; level-naming
options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineps.bids.masks import discover_semantic_masks, mask_scan
from spineps.cli.main import main
from spineps.cli.parser import build_parser, build_subcommand_parser
from spineps.errors import NoMatchError
from spineps.labels import VERTEBRA_VALUES, vertebra_value
from spineps.models.registry import BUNDLED_INSTANCE, bundled_model_dir

PER_SCAN = ["_desc-spine_dseg.json", "_desc-spine_dseg.nii.gz", "_desc-spine_dseg.png", "_desc-spine_morphometry.json",
            "_desc-spine_morphometry.tsv", "_desc-vertebrae_centroids.json", "_desc-vertebrae_dseg.json",
            "_desc-vertebrae_dseg.nii.gz"]

needs_model = pytest.mark.skipif(bundled_model_dir(BUNDLED_INSTANCE) is None,
                                 reason="no bundled instance model in this installation")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom subjects; their reference semantic masks are the input here."""
    from spineps.synth.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", n_subjects=2, seed=0)


@pytest.fixture(scope="module")
def instance_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    if bundled_model_dir(BUNDLED_INSTANCE) is None:
        pytest.skip("no bundled instance model in this installation")
    masks = demo / "derivatives" / "reference"
    out = tmp_path_factory.mktemp("inst") / "out"
    code = main(["instance", str(masks), str(out), "--nprocs", "1"])
    return masks, out, code


def _data(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# ---------------------------------------------------------------------------------------
# the whole path

@needs_model
def test_instance_only_writes_the_participant_derivatives(instance_run: tuple[Path, Path, int]) -> None:
    masks, out, code = instance_run
    assert code == 0
    for sub in ("01", "02"):
        stem = out / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag"
        for suffix in PER_SCAN:
            assert Path(f"{stem}{suffix}").is_file(), f"{stem}{suffix} missing"
        side = json.loads(Path(f"{stem}_desc-vertebrae_dseg.json").read_text())
        assert side["Sources"][0] == f"bids:semantic:sub-{sub}/anat/sub-{sub}_acq-sag_desc-spine_dseg.nii.gz"
        assert side["Parameters"]["input"] == "semantic-mask" and side["Parameters"]["level_rule"] == "auto"
        assert set(side["Models"]) == {"instance"} and side["Models"]["instance"]["Checksum"].startswith("sha256:")
        assert side["LevelNaming"]["rule"].startswith("sacrum")
        cent = json.loads(Path(f"{stem}_desc-vertebrae_centroids.json").read_text())
        assert cent["Vertebrae"]["L5"]["value"] == vertebra_value("L5")
        # same grid as the input mask; consistent masks voxel for voxel
        src = nib.load(str(masks / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_desc-spine_dseg.nii.gz"))
        sem_img = nib.load(f"{stem}_desc-spine_dseg.nii.gz")
        assert sem_img.shape == src.shape and np.allclose(sem_img.affine, src.affine)
        sem, inst = np.asarray(sem_img.dataobj), _data(Path(f"{stem}_desc-vertebrae_dseg.nii.gz"))
        assert np.array_equal(sem > 0, (inst > 0) | np.isin(sem, (60, 61)))
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"semantic": masks.resolve().as_uri()}
    # the input folder is untouched
    assert sorted(p.name for p in (masks / "sub-01" / "anat").iterdir()) == [
        "sub-01_acq-sag_desc-spine_dseg.nii.gz", "sub-01_acq-sag_desc-vertebrae_dseg.nii.gz"]


@needs_model
def test_instance_only_finds_each_vertebra_with_its_level(instance_run: tuple[Path, Path, int]) -> None:
    """Against the phantoms' reference instances: every vertebra with a body in view found
    once, Dice >= 0.95, named right (the sacrum is in view)."""
    masks, out, _ = instance_run
    for sub in ("01", "02"):
        ref = _data(masks / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_desc-vertebrae_dseg.nii.gz")
        ref_sem = _data(masks / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_desc-spine_dseg.nii.gz")
        pred = _data(out / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_desc-vertebrae_dseg.nii.gz")
        ref_ids = [int(v) for v in np.unique(ref) if int(v) in VERTEBRA_VALUES and int(v) != 26]
        # a sliver cut by the volume border (no body, or < 100 body voxels) is merged into its
        # neighbour by the paper's post-processing; every other vertebra must be there
        whole = [v for v in ref_ids if np.count_nonzero((ref == v) & (ref_sem == 49)) >= 100]
        pred_ids = [int(v) for v in np.unique(pred) if int(v) in VERTEBRA_VALUES and int(v) != 26]
        assert set(whole) <= set(pred_ids) and len(pred_ids) <= len(ref_ids)
        sliver = np.isin(ref, [v for v in ref_ids if v not in whole])  # scored apart from the neighbour
        for v in whole:
            a, b = (ref == v) & ~sliver, (pred == v) & ~sliver
            dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
            assert dice >= 0.95, (sub, v, dice)
        for v in whole:  # discs carry the vertebra above
            if np.any(ref == 100 + v):
                a, b = ref == 100 + v, pred == 100 + v
                assert 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) >= 0.95


@needs_model
def test_group_level_reads_instance_only_outputs(instance_run: tuple[Path, Path, int]) -> None:
    masks, out, _ = instance_run
    assert main([str(masks), str(out), "group"]) == 0
    rows = (out / "group_T2w.tsv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("sub-01")


@needs_model
def test_rerun_skips_complete_masks(instance_run: tuple[Path, Path, int], caplog: pytest.LogCaptureFixture) -> None:
    masks, out, _ = instance_run
    before = (out / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.json").stat().st_mtime_ns
    assert main(["instance", str(masks), str(out), "--participant-label", "01"]) == 0
    assert (out / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.json").stat().st_mtime_ns == before
    assert "outputs complete, skipped" in caplog.text


# ---------------------------------------------------------------------------------------
# bad masks: named, skipped, the others finished, exit 1

def _save(path: Path, data: np.ndarray, like: Path, dtype=np.uint8) -> None:
    img = nib.load(str(like))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(dtype), img.affine), str(path))


@needs_model
def test_bad_masks_fail_one_by_one(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = demo / "derivatives" / "reference"
    masks = tmp_path / "masks"
    good = masks / "sub-01" / "anat" / "sub-01_acq-sag_desc-spine_dseg.nii.gz"
    good.parent.mkdir(parents=True)
    shutil.copyfile(src / "sub-01" / "anat" / good.name, good)
    inst = _data(src / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.nii.gz")
    sem = _data(good)
    _save(masks / "sub-03" / "anat" / "sub-03_desc-spine_dseg.nii.gz", inst, good, np.uint16)  # an instance mask
    _save(masks / "sub-04" / "anat" / "sub-04_desc-spine_dseg.nii.gz", sem * 0.5, good, np.float32)  # not integers
    _save(masks / "sub-05" / "anat" / "sub-05_desc-spine_dseg.nii.gz", np.where(sem == 49, 0, sem), good)  # no body
    bad_name = masks / "sub-06" / "anat" / "scan one_desc-spine_dseg.nii.gz"
    bad_name.parent.mkdir(parents=True)
    shutil.copyfile(good, bad_name)
    out = tmp_path / "out"
    code = main(["instance", str(masks), str(out), "--nprocs", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert (out / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.json").is_file()
    log = next((out / "logs").glob("*.log")).read_text()
    assert "looks like an instance (vertebra) mask" in log
    assert "sub-04_desc-spine_dseg.nii.gz" in log and "integ" in log.lower()
    assert "no vertebral-body voxels (value 49)" in log
    assert "scan one_desc-spine_dseg.nii.gz" in log and "not a BIDS file name" in log
    assert "4 failed" in err or "4 failed" in log
    for sub in ("03", "04", "05"):  # nothing half-written for the failed masks
        assert not list((out / f"sub-{sub}").rglob("*_dseg.json")) if (out / f"sub-{sub}").exists() else True


def test_usage_errors(demo: Path, tmp_path: Path) -> None:
    masks = demo / "derivatives" / "reference"
    assert main(["instance", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 66
    assert main(["instance", str(masks), str(masks / "out")]) == 64  # would read its own outputs as input
    assert main(["instance", str(masks), str(masks)]) == 64
    assert main(["instance", str(masks), str(tmp_path / "o2"), "--pattern", "sub-*/**/*_nothing.nii.gz"]) == 18
    assert main(["instance", str(masks), str(tmp_path / "o3"), "--participant-label", "99"]) == 18
    assert main(["instance", str(masks), str(tmp_path / "o4"), "--pattern", "../*"]) == 64
    assert main(["instance", str(masks), str(tmp_path / "o5"), "--top-vertebra", "X9"]) == 64
    assert not (masks / "out").exists()


# ---------------------------------------------------------------------------------------
# discovery of masks (no model)

def test_mask_names_drop_the_entities_of_the_mask(tmp_path: Path) -> None:
    ours = mask_scan(tmp_path / "sub-01/anat/sub-01_acq-sag_run-2_desc-spine_dseg.nii.gz", tmp_path)
    ref = mask_scan(tmp_path / "sub-01/anat/sub-01_acq-sag_run-2_mod-T2w_seg-spine_msk.nii.gz", tmp_path)
    assert ours.key == ref.key == "sub-01_acq-sag_run-2"
    from spineps.bids.derivatives import INSTANCE_MASK

    assert INSTANCE_MASK.name(ref) == "sub-01_acq-sag_run-2_desc-vertebrae_dseg.nii.gz"
    with pytest.raises(ValueError):
        mask_scan(tmp_path / "sub-01_dseg.mha", tmp_path)


def test_discovery_of_masks(tmp_path: Path) -> None:
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    vol = np.zeros((8, 8, 4), np.uint8)
    for rel in ("sub-01/anat/sub-01_desc-spine_dseg.nii.gz", "sub-01/anat/sub-01_desc-manual_dseg.nii.gz",
                "sub-02/ses-1/anat/sub-02_ses-1_desc-spine_dseg.nii", "sub-03/anat/sub-03_desc-spine_dseg.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / rel))
    (tmp_path / "sub-03/anat/sub-03_desc-spine_dseg.nii.gz").write_bytes(b"not a nifti")
    d = discover_semantic_masks(tmp_path)
    assert [s.key for s in d.scans] == ["sub-01", "sub-02_ses-1"]
    assert [p.name for p, _ in d.unusable] == ["sub-03_desc-spine_dseg.nii.gz"]
    # a wider pattern makes two masks of sub-01 compete for the same output names
    d = discover_semantic_masks(tmp_path, "sub-*/**/*_dseg.nii*")
    assert len(d.scans) == 2 and any("same names" in why for _, why in d.unusable)
    d = discover_semantic_masks(tmp_path, participant_labels=["02"], session_labels=["1"])
    assert [s.key for s in d.scans] == ["sub-02_ses-1"]
    with pytest.raises(NoMatchError):
        discover_semantic_masks(tmp_path, "nothing/*.nii.gz")


# ---------------------------------------------------------------------------------------
# level-naming options

def test_level_options_parse_in_both_parsers() -> None:
    ns = build_parser().parse_args(["bids", "out", "participant", "--level-rule", "count-from-top",
                                    "--top-vertebra", "t12"])
    assert ns.level_rule == "count-from-top" and ns.top_vertebra == "T12"
    ns = build_subcommand_parser().parse_args(["instance", "m", "o", "--level-rule", "sacrum"])
    assert ns.level_rule == "sacrum" and ns.top_vertebra is None
    from spineps.errors import UsageError

    for bad in (["--level-rule", "guess"], ["--top-vertebra", "S1"], ["--top-vertebra", "L9"]):
        with pytest.raises(UsageError):
            build_parser().parse_args(["bids", "out", "participant", *bad])


@needs_model
def test_forced_rules_reach_the_names_and_the_sidecar(demo: Path, tmp_path: Path) -> None:
    masks = demo / "derivatives" / "reference"
    out = tmp_path / "anchor"
    assert main(["instance", str(masks), str(out), "--participant-label", "01", "--top-vertebra", "T5"]) == 0
    stem = out / "sub-01" / "anat" / "sub-01_acq-sag"
    side = json.loads(Path(f"{stem}_desc-vertebrae_dseg.json").read_text())
    assert side["LevelNaming"]["rule"] == "anchor" and side["Parameters"]["top_vertebra"] == "T5"
    pred = _data(Path(f"{stem}_desc-vertebrae_dseg.nii.gz"))
    ids = sorted(int(v) for v in np.unique(pred) if int(v) in VERTEBRA_VALUES and int(v) != 26)
    assert ids[0] == vertebra_value("T5")
    out = tmp_path / "top"
    assert main(["instance", str(masks), str(out), "--participant-label", "01", "--level-rule", "count-from-top"]) == 0
    side = json.loads((out / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.json").read_text())
    assert side["LevelNaming"]["rule"] == "count-from-top" and side["Parameters"]["level_rule"] == "count-from-top"
    pred = _data(out / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.nii.gz")
    assert min(int(v) for v in np.unique(pred) if 0 < int(v) < 26) == vertebra_value("C2")


@needs_model
def test_instance_only_outputs_are_valid_bids_derivatives(instance_run: tuple[Path, Path, int]) -> None:
    from spineps.bids.validation import validate_dataset

    _, out, _ = instance_run
    report = validate_dataset(out, derivative=True)
    if not report.available:
        pytest.skip(f"BIDS validator not available: {report.reason}")
    assert report.ok, list(report.errors)[:5]


# ---------------------------------------------------------------------------------------
# real manual segmentations

@needs_model
@pytest.mark.slow
def test_instance_only_on_real_manual_body_masks(real_data: Path, tmp_path: Path) -> None:
    """VB3 (15 real lumbar scans, bodies L1-L5 annotated by hand, value 49 in desc-spine,
    20..24 in desc-vert): from the manual semantic masks alone every body is found exactly
    once with the right extent, and the level names agree with the manual ones."""
    masks = real_data / "VB3"
    if not any(masks.glob("*_desc-spine_dseg.nii.gz")):
        pytest.skip(f"no VB3 masks in {real_data}")
    out = tmp_path / "out"
    assert main(["instance", str(masks), str(out), "--pattern", "*_desc-spine_dseg.nii.gz", "--nprocs", "2"]) == 0
    n_scans = n_levels = n_named = 0
    for ref_path in sorted(masks.glob("*_desc-vert_dseg.nii.gz")):
        sub = ref_path.name.split("_")[0]
        ref = _data(ref_path)
        pred = _data(out / sub / "anat" / f"{sub}_desc-vertebrae_dseg.nii.gz")
        ref_ids = [int(v) for v in np.unique(ref) if v > 0]
        pred_ids = [int(v) for v in np.unique(pred) if 0 < v < 30]
        assert len(pred_ids) == len(ref_ids), (sub, ref_ids, pred_ids)  # each body once, nothing merged
        for r in ref_ids:
            a = ref == r
            vals, counts = np.unique(pred[a], return_counts=True)
            v = int(vals[np.argmax(np.where(vals > 0, counts, -1))])
            b = pred == v
            assert 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) >= 0.95, (sub, r)
            n_named += int(v == r)
        n_scans += 1
        n_levels += len(ref_ids)
    assert n_scans == 15
    assert n_named / n_levels >= 0.9, f"{n_named}/{n_levels} levels named as in the manual masks"


def test_discovery_accepts_a_mask_stored_as_one_4d_volume(tmp_path: Path) -> None:
    """A 4D file holding one volume passes ``read_header`` (and loads as 3D), as for images."""
    path = tmp_path / "sub-04" / "anat" / "sub-04_desc-spine_dseg.nii.gz"
    path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 1), np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])), str(path))
    d = discover_semantic_masks(tmp_path)
    assert [s.key for s in d.scans] == ["sub-04"] and not d.unusable
