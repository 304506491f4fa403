"""nnU-Net v2 raw export (spineps.training.export_nnunet) checked with nnU-Net's own dataset checks."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest

from spineps.errors import InputError, OutputError, UsageError
from spineps.geometry.io import load_volume, save_volume
from spineps.geometry.orientation import to_orientation
from spineps.geometry.volume import Volume
from spineps.training.export_nnunet import (DEFAULT_LABEL_VALUES, ExportPair, export_nnunet, make_splits,
                                            pairs_from_bids)

_INTENSITY = np.zeros(256, np.float32)
_INTENSITY[[41, 42, 43, 44, 45, 46, 47, 48, 49, 26]] = 300.0
_INTENSITY[[60]] = 700.0
_INTENSITY[[61]] = 1000.0
_INTENSITY[[62, 100]] = 600.0


def _image(sem: Volume, seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    data = _INTENSITY[np.asarray(sem.data)] + 80.0 + rng.normal(0, 20, sem.shape).astype(np.float32)
    return sem.with_data(np.clip(data, 0, None).astype(np.float32))


@pytest.fixture(scope="module")
def phantoms():
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    out = []
    for k, fov in enumerate(("cervical", "cervical", "cervical", "cervical")):
        ph = make_phantom(PhantomSpec(seed=10 + k, fov=fov, spacing=(2.0, 2.0, 4.0), orientation=("A", "S", "L")))
        out.append((ph.semantic, _image(ph.semantic, k)))
    return out


def _nnunet_verify(folder, tmp_path, monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, str(tmp_path / key))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)


def test_export_full_labels_passes_nnunet_checks(phantoms, tmp_path, monkeypatch):
    pairs = [ExportPair(f"sub-{k:02d}_ses-1", img, sem) for k, (sem, img) in enumerate(phantoms[:3])]
    pairs.append(ExportPair("sub-00_ses-2", phantoms[3][1], phantoms[3][0]))  # second session of sub-00
    folder = export_nnunet(pairs, tmp_path / "raw", 740, "Test", n_folds=3, seed=1)
    assert folder.name == "Dataset740_Test"
    _nnunet_verify(folder, tmp_path, monkeypatch)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["labels"]["background"] == 0 and "ignore" not in ds["labels"]
    assert sorted(ds["labels"].values()) == list(range(15))
    assert ds["numTraining"] == 4 and ds["channel_names"] == {"0": "T2"}
    # labels back to community values: exact (reorientation is a permutation, no resampling)
    back = np.zeros(256, np.uint8)
    for i, v in ds["spineps"]["index_to_value"].items():
        back[int(i)] = v
    for pair, (sem, _img) in zip(pairs, [*phantoms[:3], phantoms[3]]):
        lab = load_volume(folder / "labelsTr" / f"{pair.name}.nii.gz", kind="label")
        im = load_volume(folder / "imagesTr" / f"{pair.name}_0000.nii.gz")
        ref, _ = to_orientation(sem, ("P", "I", "R"))
        assert lab.axcodes == ("P", "I", "R") and im.same_grid(lab)
        assert np.array_equal(back[lab.data], ref.data)
        assert im.data.dtype == np.float32 and im.data.min() >= 0
    # reproducible, subject-grouped folds
    splits = json.loads((folder / "splits_final.json").read_text())
    assert len(splits) == 3
    for s in splits:
        assert set(s["train"]) | set(s["val"]) == {p.name for p in pairs}
        assert not set(s["train"]) & set(s["val"])
        assert ("sub-00_ses-1" in s["val"]) == ("sub-00_ses-2" in s["val"])
    assert splits == make_splits([p.name for p in pairs], [p.group for p in pairs], 3, 1)
    # the inference_config template is a valid model config with the same label mapping
    from spineps.models.folder import read_model_config

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(folder / "spineps_inference_config.json", model / "inference_config.json")
    cfg = read_model_config(model)
    assert cfg.labels == {0: 0, **{i: v for i, v in enumerate(DEFAULT_LABEL_VALUES, start=1)}}
    assert cfg.orientation == ("P", "I", "R") and cfg.folds == (0, 1, 2)
    with pytest.raises(OutputError):
        export_nnunet(pairs, tmp_path / "raw", 740, "Test")
    # overwrite with fewer cases: the stale case files go, nnU-Net's count stays right
    export_nnunet(pairs[1:], tmp_path / "raw", 740, "Test", overwrite=True)
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{p.name}.nii.gz" for p in pairs[1:])
    assert len(list((folder / "imagesTr").iterdir())) == 3


def test_export_partial_resampled_cropped(phantoms, tmp_path, monkeypatch):
    (sem0, img0), (sem1, img1), (sem2, img2) = phantoms[:3]
    only_bodies = sem1.with_data(np.where(sem1.data == 49, 49, 0).astype(np.uint8))
    marked = np.asarray(sem2.data).copy()
    marked[marked == 62] = 52  # post-processed split endplates count as endplate
    marked[: marked.shape[0] // 3] = 255  # an unannotated slab
    pairs = [ExportPair("full", img0, sem0, group="a"),
             ExportPair("bodies", img1, only_bodies, annotated=(49,), group="b"),
             ExportPair("slab", img2, sem2.with_data(marked), group="c")]
    folder = export_nnunet(pairs, tmp_path / "raw", 741, "Partial", spacing=(3.0, 3.0, 5.0), crop="label",
                           crop_margin_mm=6.0, ignore_unannotated=True, n4=True,
                           preprocessed_dir=tmp_path / "pre")
    _nnunet_verify(folder, tmp_path, monkeypatch)
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["labels"]["ignore"] == 15 == max(ds["labels"].values())
    assert (tmp_path / "pre" / "Dataset741_Partial" / "splits_final.json").is_file()
    bodies = load_volume(folder / "labelsTr" / "bodies.nii.gz", kind="label")
    assert set(np.unique(bodies.data)) == {9, 15}  # body index, ignore everywhere else
    assert bodies.spacing == pytest.approx((3.0, 3.0, 5.0))
    # cropped to the bodies' bounding box + margin: 2 voxels at 3 mm on P/I, 2 at 5 mm on R
    full_lab = load_volume(folder / "labelsTr" / "full.nii.gz", kind="label")
    for ax in range(3):
        prof = np.flatnonzero(np.any(bodies.data == 9, axis=tuple(a for a in range(3) if a != ax)))
        assert prof[0] <= 2 and bodies.shape[ax] - 1 - prof[-1] <= 2
    assert 12 in np.unique(full_lab.data)  # endplate index
    slab = load_volume(folder / "labelsTr" / "slab.nii.gz", kind="label")
    assert 15 in np.unique(slab.data) and 12 in np.unique(slab.data)
    rep = json.loads((folder / "export_report.json").read_text())
    assert rep["cases"]["bodies"]["annotated"] == [49]


def test_export_errors(phantoms, tmp_path):
    sem, img = phantoms[0]
    weird = sem.with_data(np.where(sem.data == 49, 77, sem.data).astype(np.uint8))
    pairs = [ExportPair(f"sub-{k}", img, weird) for k in range(3)]
    with pytest.raises(InputError, match="77"):
        export_nnunet(pairs, tmp_path / "raw", 742, "Bad")
    with pytest.raises(UsageError, match="subjects"):
        export_nnunet(pairs[:2], tmp_path / "raw2", 742, "Bad")
    with pytest.raises(UsageError):
        export_nnunet([ExportPair("a", img, sem, annotated=(49,)), ExportPair("b", img, sem),
                       ExportPair("c", img, sem)], tmp_path / "raw3", 743, "Bad")
    with pytest.raises(UsageError):
        ExportPair("bad name", img, sem)
    with pytest.raises(UsageError):
        export_nnunet(pairs, tmp_path / "raw4", 1000, "Bad")


def test_export_from_bids_via_cli(phantoms, tmp_path, monkeypatch):
    from spineps.training.cli import add_export_arguments, run_export

    bids = tmp_path / "bids"
    deriv = bids / "derivatives" / "fused"
    (bids).mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    for k, (sem, img) in enumerate(phantoms[:3]):
        sub = f"{k + 1:02d}"
        save_volume(img, bids / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_T2w.nii.gz")
        save_volume(sem, deriv / f"sub-{sub}" / "anat" / f"sub-{sub}_acq-sag_desc-spine_dseg.nii.gz")
    # a scan without a mask is skipped
    save_volume(phantoms[3][1], bids / "sub-04" / "anat" / "sub-04_acq-sag_T2w.nii.gz")
    pairs = pairs_from_bids(bids, deriv)
    assert [p.name for p in pairs] == ["sub-01_acq-sag", "sub-02_acq-sag", "sub-03_acq-sag"]
    parser = argparse.ArgumentParser()
    add_export_arguments(parser, "nnunet")
    args = parser.parse_args(["--bids-dir", str(bids), "--derivatives-dir", str(deriv), "-o", str(tmp_path / "raw"),
                              "--dataset-id", "750", "--name", "Bids", "--orientation", "PIR",
                              "--crop-margin-mm", "10"])
    assert run_export(args) == 0
    folder = tmp_path / "raw" / "Dataset750_Bids"
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{p.name}.nii.gz" for p in pairs]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3
    rep = json.loads((folder / "export_report.json").read_text())
    assert rep["cases"]["sub-01_acq-sag"]["group"] == "sub-01" and "crop_bbox" in rep["cases"]["sub-01_acq-sag"]


@pytest.mark.real_data
@pytest.mark.slow
def test_export_real_partial_labels(real_data, tmp_path, monkeypatch):
    """Real scans whose labels are partial (VB2: bodies only, IVD: lumbar discs only): every
    unannotated voxel becomes nnU-Net's ignore label; nnU-Net's checks accept the dataset."""
    vb2 = sorted((real_data / "VB2").glob("sub-*_T2w.nii.gz"))[:2]
    ivd = sorted((real_data / "IVD").glob("sub-*_T2w.nii.gz"))[:1]
    if len(vb2) < 2 or not ivd:
        pytest.skip(f"VB2/IVD scans missing under {real_data}")
    pairs = [ExportPair(p.name.replace("_T2w.nii.gz", ""), p, p.with_name(p.name.replace("_T2w", "_desc-spine_dseg")),
                        annotated=ann) for p, ann in [(vb2[0], (49,)), (vb2[1], (49,)), (ivd[0], (100,))]]
    folder = export_nnunet(pairs, tmp_path / "raw", 760, "Real", spacing=(2.0, 2.0, 4.0), crop="label",
                           crop_margin_mm=10.0, ignore_unannotated=True)
    _nnunet_verify(folder, tmp_path, monkeypatch)
    for pair, idx in zip(pairs, (9, 9, 13)):
        lab = load_volume(folder / "labelsTr" / f"{pair.name}.nii.gz", kind="label")
        assert set(np.unique(lab.data)) == {idx, 15}
        assert lab.axcodes == ("P", "I", "R") and lab.spacing == pytest.approx((2.0, 2.0, 4.0))
