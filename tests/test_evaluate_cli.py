"""``spineps evaluate`` end to end, in process: tiny derivative folders written here,
``add_arguments`` + ``run(args)``, the tables read back."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from spineps.errors import InputError, NoInputError, NoMatchError, UsageError
from spineps.evaluate import cli
from spineps.evaluate.run import OUTPUT_FILES, parse_mask_name
from spineps.geometry.io import load_volume, save_volume
from spineps.geometry.volume import Volume

SHAPE = (44, 16, 12)
#: P-I-R-like grid, anisotropic
AFFINE = np.array([[0.0, 0.0, 1.65, 0.0], [-0.75, 0.0, 0.0, 0.0], [0.0, -0.75, 0.0, 0.0], [0, 0, 0, 1.0]])
LEVELS = (20, 21, 22)  # L1 L2 L3


def phantom(levels=LEVELS, body_only=False, shift=0):
    """Semantic + instance masks: per level a body (49) and an arcus (41) block, a disc below
    (100 / 100 + level), a canal (61) column with a cord (60) inside."""
    sem = np.zeros(SHAPE, dtype=np.uint8)
    inst = np.zeros(SHAPE, dtype=np.uint8)
    for k, lev in enumerate(levels):
        top = 3 + 13 * k + shift
        sem[top:top + 9, 1:7, 2:10] = 49
        inst[top:top + 9, 1:7, 2:10] = lev
        if not body_only:
            sem[top:top + 9, 10:15, 4:8] = 41
            inst[top:top + 9, 10:15, 4:8] = lev
            sem[top + 10:top + 12, 1:7, 2:10] = 100
            inst[top + 10:top + 12, 1:7, 2:10] = 100 + lev
    if not body_only:
        sem[:, 7:10, 3:9] = 61
        sem[:, 8:9, 5:7] = 60
    return sem, inst


def write_case(root: Path, sub: str, sem, inst, affine=AFFINE) -> None:
    folder = root / f"sub-{sub}" / "anat"
    save_volume(Volume(sem, affine), folder / f"sub-{sub}_acq-sag_desc-spine_dseg.nii.gz")
    if inst is not None:
        save_volume(Volume(inst, affine), folder / f"sub-{sub}_acq-sag_desc-vertebrae_dseg.nii.gz")


def parse(argv):
    p = argparse.ArgumentParser(prog="spineps evaluate")
    cli.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def value(rows, **where) -> str:
    hits = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(hits) == 1, (where, hits)
    return hits[0]["value"]


@pytest.fixture
def folders(tmp_path):
    ref, good, bad = tmp_path / "ref", tmp_path / "good", tmp_path / "bad"
    for i in range(1, 7):
        sub = f"{i:02d}"
        sem, inst = phantom()
        write_case(ref, sub, sem, inst)
        # "good": arcus eroded a little on some scans
        g_sem, g_inst = sem.copy(), inst.copy()
        if i % 2:
            g_sem[:, 14, :][g_sem[:, 14, :] == 41] = 0
            g_inst[:, 14, :][g_sem[:, 14, :] == 0] = 0
        write_case(good, sub, g_sem, g_inst)
        # "bad": shifted by i % 3 + 1 voxels and a false positive blob
        b_sem, b_inst = phantom(shift=i % 3 + 1)
        b_sem[0:2, 0:2, 0:2] = 100
        write_case(bad, sub, b_sem, b_inst)
    sem, inst = phantom()
    write_case(good, "99", sem, inst)  # no reference: reported as unmatched
    return ref, good, bad


def test_folders_compare_end_to_end(folders, tmp_path):
    ref, good, bad = folders
    out = tmp_path / "eval"
    args = parse([ref, good, "--compare", bad, "-o", out, "--annotated-classes", "all"])
    assert cli.run(args) == 0
    per_scan = read_tsv(out / OUTPUT_FILES["per_scan"])
    assert {r["method"] for r in per_scan} == {"good", "bad"}
    assert len({r["scan"] for r in per_scan}) == 6
    assert value(per_scan, method="good", scan="sub-02_acq-sag", structure="vertebral_body", metric="dice") == "1"
    assert value(per_scan, method="good", scan="sub-02_acq-sag", structure="vertebra", metric="assd") == "0"
    # classes absent from reference and prediction: written as both_empty, never averaged
    row = [r for r in per_scan if r["scan"] == "sub-02_acq-sag" and r["structure"] == "sacrum"
           and r["metric"] == "dice" and r["method"] == "good"][0]
    assert (row["value"], row["note"]) == ("1", "both_empty")
    assert value(per_scan, method="good", scan="sub-01_acq-sag", structure="vertebra_instances", metric="pq") != "1"
    assert value(per_scan, method="good", scan="sub-02_acq-sag", structure="disc_instances", metric="pq") == "1"
    assert value(per_scan, method="good", scan="sub-02_acq-sag", structure="vertebra_instances",
                 metric="level_accuracy") == "1"

    summary = read_tsv(out / OUTPUT_FILES["summary"])
    s = [r for r in summary if r["method"] == "good" and r["structure"] == "sacrum" and r["metric"] == "dice"][0]
    assert s["n"] == "0" and s["n_both_empty"] == "6" and s["mean"] == "n/a"
    s = [r for r in summary if r["method"] == "bad" and r["structure"] == "vertebral_body" and r["metric"] == "dice"][0]
    assert s["n"] == "6" and 0 < float(s["mean"]) < 1 and float(s["sd"]) > 0

    cmp = read_tsv(out / OUTPUT_FILES["comparison"])
    c = [r for r in cmp if r["structure"] == "vertebral_body" and r["metric"] == "dice"][0]
    assert c["method_a"] == "good" and c["method_b"] == "bad" and c["better"] == "good"
    assert float(c["p_value"]) == pytest.approx(2 / 2 ** 6) and c["significant"] == "true"
    c = [r for r in cmp if r["structure"] == "vertebral_body" and r["metric"] == "assd"][0]
    assert c["better"] == "good" and float(c["median_diff_b_minus_a"]) > 0

    unmatched = read_tsv(out / OUTPUT_FILES["unmatched"])
    assert [Path(r["path"]).name for r in unmatched] == ["sub-99_acq-sag_desc-spine_dseg.nii.gz",
                                                         "sub-99_acq-sag_desc-vertebrae_dseg.nii.gz"]
    assert all("without a reference" in r["reason"] for r in unmatched)
    inst = read_tsv(out / OUTPUT_FILES["instances"])
    assert {r["status"] for r in inst} >= {"TP"}
    meta = json.loads((out / OUTPUT_FILES["settings"]).read_text())
    assert meta["methods"] == ["good", "bad"] and meta["n_scans"] == {"good": 6, "bad": 6}
    # atomic writes: no temporary file left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_auto_annotation_on_partial_reference(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for sub in ("01", "02"):
        write_case(ref, sub, *phantom(body_only=True))  # only bodies labelled, like real/VB2
        write_case(pred, sub, *phantom())
    out = tmp_path / "auto"
    assert cli.run(parse([ref, pred, "-o", out])) == 0
    per_scan = read_tsv(out / OUTPUT_FILES["per_scan"])
    assert {r["structure"] for r in per_scan} == {"vertebral_body", "vertebra_instances"}
    assert value(per_scan, scan="sub-01_acq-sag", structure="vertebral_body", metric="dice") == "1"
    # predicted arcus voxels are not annotated in the reference: dropped before matching
    assert value(per_scan, scan="sub-01_acq-sag", structure="vertebra_instances", metric="instance_dice") == "1"
    assert json.loads((out / OUTPUT_FILES["settings"]).read_text())["annotated_classes"] == [49]
    # forcing every class: discs, canal, cord are false positives now
    out2 = tmp_path / "all"
    assert cli.run(parse([ref, pred, "-o", out2, "--annotated-classes", "all"])) == 0
    per_scan = read_tsv(out2 / OUTPUT_FILES["per_scan"])
    row = [r for r in per_scan if r["scan"] == "sub-01_acq-sag" and r["structure"] == "intervertebral_disc"
           and r["metric"] == "dice"][0]
    assert (row["value"], row["note"]) == ("0", "ref_empty")
    assert float(value(per_scan, scan="sub-01_acq-sag", structure="vertebra_instances", metric="instance_dice")) < 1
    # an explicit list works like auto here
    out3 = tmp_path / "given"
    assert cli.run(parse([ref, pred, "-o", out3, "--annotated-classes", "vertebral_body"])) == 0
    assert read_tsv(out3 / OUTPUT_FILES["per_scan"]) == read_tsv(out / OUTPUT_FILES["per_scan"])


def test_pairs_with_level_shift_and_third_file(tmp_path):
    ref_sem, ref_inst = phantom()
    pred_inst = np.where((ref_inst > 0) & (ref_inst < 100), ref_inst + 1, ref_inst).astype(np.uint8)
    pred_inst = np.where(ref_inst > 100, ref_inst + 1, pred_inst).astype(np.uint8)
    files = {}
    for name, data in (("ref", ref_inst), ("pred", pred_inst), ("same", ref_inst)):
        files[name] = tmp_path / f"{name}_desc-vertebrae_dseg.nii.gz"
        save_volume(Volume(data, AFFINE), files[name])
    out = tmp_path / "out"
    args = parse(["--pair", files["ref"], files["pred"], files["same"], "-o", out, "--masks", "vertebrae"])
    assert cli.run(args) == 0
    per_scan = read_tsv(out / OUTPUT_FILES["per_scan"])
    rows = [r for r in per_scan if r["method"] == "prediction" and r["structure"] == "vertebra_instances"]
    acc = [r for r in rows if r["metric"] == "level_accuracy"][0]
    assert acc["value"] == "0" and "shifted by +1 level" in acc["note"]
    assert [r for r in rows if r["metric"] == "level_offset_median"][0]["value"] == "1"
    assert [r for r in rows if r["metric"] == "pq"][0]["value"] == "1"  # geometry is perfect
    assert (out / OUTPUT_FILES["comparison"]).is_file()


def test_errors(folders, tmp_path):
    ref, good, _ = folders
    out = tmp_path / "o"
    with pytest.raises(NoInputError):
        cli.run(parse([tmp_path / "missing", good, "-o", out]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoMatchError):
        cli.run(parse([ref, empty, "-o", out]))
    with pytest.raises(UsageError):
        cli.run(parse([ref, good, "-o", out, "--annotated-classes", "kidney"]))
    with pytest.raises(UsageError):
        cli.run(parse(["-o", out]))
    f = ref / "sub-01" / "anat" / "sub-01_acq-sag_desc-spine_dseg.nii.gz"
    with pytest.raises(UsageError):
        cli.run(parse([ref, good, "--pair", f, f, "-o", out]))
    # a prediction on another grid
    other = tmp_path / "other"
    sem, inst = phantom()
    write_case(other, "01", sem[:, :, :-1], None)
    with pytest.raises(InputError) as exc:
        cli.run(parse([ref, other, "-o", out]))
    assert "sub-01_acq-sag_desc-spine_dseg.nii.gz" in str(exc.value)
    with pytest.raises(SystemExit):
        parse([ref, good, "-o", out, "--alpha", "2"])


def test_parser_is_pure_and_names():
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["a", "b", "-o", "c"])
    assert args.annotated_classes == "auto" and args.masks == ["spine", "vertebrae"] and args.iou_threshold == 0.5
    q = argparse.ArgumentParser()
    q.add_argument("-v", action="count")
    cli.add_arguments(q)  # an existing -v is left alone
    assert parse_mask_name("sub-01_ses-1_acq-sag_run-2_desc-spine_dseg.nii.gz") == ("sub-01_ses-1_acq-sag_run-2",
                                                                                  "spine")
    assert parse_mask_name("sub-01_desc-vert_dseg.nii.gz") == ("sub-01", "vertebrae")
    assert parse_mask_name("sub-01_acq-sag_mod-T2w_seg-vert_msk.nii.gz") == ("sub-01_acq-sag", "vertebrae")
    assert parse_mask_name("sub-01_acq-sag_T2w.nii.gz") is None


def test_real_vb2_partial_reference(real_data, tmp_path):
    """A real VB2 reference (bodies only) against itself with every level renamed one lower:
    auto-detection keeps only class 49, geometry is perfect, the shift is diagnosed."""
    folder = real_data / "VB2"
    sem_path = folder / "sub-vb202_desc-spine_dseg.nii.gz"
    vert_path = folder / "sub-vb202_desc-vert_dseg.nii.gz"
    if not (sem_path.is_file() and vert_path.is_file()):
        pytest.skip(f"{sem_path} not available")
    vert = load_volume(vert_path, kind="label")
    shifted = np.where(vert.data > 0, vert.data + 1, 0).astype(vert.data.dtype)
    pred = tmp_path / "pred_desc-vert_dseg.nii.gz"
    save_volume(vert.with_data(shifted), pred)
    out = tmp_path / "out"
    args = parse(["--pair", sem_path, sem_path, "--pair", vert_path, pred, "-o", out, "--masks", "spine", "vertebrae"])
    assert cli.run(args) == 0
    per_scan = read_tsv(out / OUTPUT_FILES["per_scan"])
    assert {r["scan"] for r in per_scan} == {"sub-vb202"}
    assert {r["structure"] for r in per_scan} == {"vertebral_body", "vertebra_instances"}
    assert value(per_scan, structure="vertebral_body", metric="dice") == "1"
    assert value(per_scan, structure="vertebra_instances", metric="pq") == "1"
    acc = [r for r in per_scan if r["metric"] == "level_accuracy"][0]
    assert acc["value"] == "0" and "shifted by +1 level" in acc["note"] and "T11" in acc["note"]


def test_endplates_as_body(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    sem, inst = phantom(body_only=True)
    write_case(ref, "01", sem, inst)
    p_sem, p_inst = sem.copy(), inst.copy()
    top = 3  # the first body's top row becomes endplate 62 / instance 200 + level
    p_sem[top, 1:7, 2:10] = 62
    p_inst[top, 1:7, 2:10] = 200 + LEVELS[0]
    write_case(pred, "01", p_sem, p_inst)
    out = tmp_path / "plain"
    assert cli.run(parse([ref, pred, "-o", out])) == 0
    rows = read_tsv(out / OUTPUT_FILES["per_scan"])
    assert float(value(rows, structure="vertebral_body", metric="dice")) < 1
    out = tmp_path / "merged"
    assert cli.run(parse([ref, pred, "-o", out, "--endplates-as-body"])) == 0
    rows = read_tsv(out / OUTPUT_FILES["per_scan"])
    assert value(rows, structure="vertebral_body", metric="dice") == "1"
    assert value(rows, structure="vertebra_instances", metric="instance_dice") == "1"


def test_main_dispatches_evaluate_subcommand(folders, tmp_path):
    """``spineps evaluate`` through the real entry point: exit code and outputs."""
    from spineps.cli.main import main

    ref, good, _ = folders
    out = tmp_path / "eval_main"
    assert main(["evaluate", str(ref), str(good), "-o", str(out)]) == 0
    assert (out / OUTPUT_FILES["per_scan"]).is_file() and (out / OUTPUT_FILES["summary"]).is_file()
    # a missing reference folder is a clear input error, not a traceback
    assert main(["evaluate", str(tmp_path / "nope"), str(good), "-o", str(out)]) == 66
