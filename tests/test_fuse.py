"""Annotation fusion (spineps.training.fuse) on synthetic phantoms and small hand-made volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spineps.errors import InputError, UsageError
from spineps.geometry.io import load_volume, save_volume
from spineps.geometry.volume import Volume
from spineps.training.fuse import (LabelSource, cranio_caudal_axis, fill_endplate_gaps, fuse_sources,
                                   parse_mapping, parse_source_spec, sha256_of)


@pytest.fixture(scope="module")
def phantom():
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    # R-A-S arrays: the cranio-caudal axis is the last one, not the P-I-R axis 1
    return make_phantom(PhantomSpec(seed=3, fov="lumbar", spacing=(2.0, 2.0, 2.0), orientation=("R", "A", "S"),
                                    scoliosis=10.0))


def _sources(sem: np.ndarray):
    """Three automated sources derived from a full phantom map with the endplates removed:
    body/disc/canal(+cord)/sacrum coded 1..4, substructures 41..49, a binary cord mask."""
    a = np.zeros_like(sem)
    a[sem == 49] = 1
    a[sem == 100] = 2
    a[(sem == 61) | (sem == 60)] = 3  # a canal tool segments the whole dural sac
    a[sem == 26] = 4
    b = np.where((sem >= 41) & (sem <= 49), sem, 0).astype(np.uint8)
    c = (sem == 60).astype(np.uint8)
    return a, b, c


def _between_along(f: np.ndarray, axis: int, max_gap: int) -> np.ndarray:
    """Independent check: voxels with body within max_gap voxels on one side along ``axis``
    and disc within max_gap on the other."""
    def near(mask, shift):
        out = np.zeros_like(mask)
        for k in range(1, max_gap + 1):
            out |= np.roll(mask, shift * k, axis=axis)
        return out
    body, disc = f == 49, f == 100
    return (near(body, 1) & near(disc, -1)) | (near(body, -1) & near(disc, 1))


def test_fusion_reproduces_phantom(phantom, tmp_path):
    sem = np.asarray(phantom.semantic.data)
    a, b, c = _sources(sem)
    grid = phantom.semantic
    srcs = [LabelSource({1: 49, 2: 100, 3: 61, 4: 26}, grid.with_data(a), name="bdc"),
            LabelSource(parse_mapping("subregions"), grid.with_data(b), name="subreg"),
            LabelSource(parse_mapping("1=cord"), grid.with_data(c), name="cord")]
    res = fuse_sources(srcs)
    f = np.asarray(res.semantic.data)
    ep = sem == 62
    assert res.semantic.same_grid(grid)
    # every non-endplate voxel of the phantom is reproduced exactly (cord inside the canal included)
    assert np.array_equal(f[~ep & (f != 62)], sem[~ep & (f != 62)])
    assert ((f != sem) & ~ep & (f != 62)).sum() == 0
    assert ((f == 60) == (sem == 60)).all() and ((f == 61) == (sem == 61)).all()
    # endplates come back between body and disc: most of them, and nearly nothing else
    recall = ((f == 62) & ep).sum() / ep.sum()
    precision = ((f == 62) & ep).sum() / (f == 62).sum()
    assert recall > 0.9, recall
    assert precision > 0.95, precision
    axis = cranio_caudal_axis(grid.affine)
    assert axis == 2
    assert _between_along(f, axis, res.report["endplates"]["max_gap_voxels"])[f == 62].all()
    # endplates only at body/disc interfaces: none next to the canal or the processes only
    assert res.report["order"] == ["bdc", "subreg", "cord"]
    assert res.report["sources"][2]["added"] == {"60": int((sem == 60).sum())}


def test_priority_later_source_never_overwrites(phantom):
    sem = np.asarray(phantom.semantic.data)
    a, b, c = _sources(sem)
    grid = phantom.semantic
    liar = np.zeros_like(sem)
    liar[sem == 49] = 7  # claims every body voxel is a disc
    liar[sem == 41] = 7
    srcs = [LabelSource({1: 49, 2: 100, 3: 61, 4: 26}, grid.with_data(a), name="bdc"),
            LabelSource({7: 100}, grid.with_data(liar), name="liar"),
            LabelSource(parse_mapping("subregions"), grid.with_data(b), name="subreg")]
    f = np.asarray(fuse_sources(srcs, fill_endplates=False).semantic.data)
    assert (f[sem == 49] == 49).all()  # first source wins
    assert (f[sem == 41] == 100).all()  # the liar came before the substructure source
    rep = fuse_sources(srcs, fill_endplates=False).report
    assert rep["sources"][1]["conflicts_not_overwritten"]["100->49"] == int((sem == 49).sum())
    assert rep["sources"][2]["conflicts_not_overwritten"]["41->100"] == int((sem == 41).sum())
    # reversing the order reverses the winner
    f2 = np.asarray(fuse_sources([srcs[2], srcs[1], srcs[0]], fill_endplates=False).semantic.data)
    assert (f2[sem == 41] == 41).all()


def _line_volume(values, spacing=(1.0, 1.0, 1.0)):
    """A 5 x N x 5 P-I-R volume whose central column along I holds ``values``."""
    n = len(values)
    data = np.zeros((5, n, 5), np.uint8)
    data[1:4, :, 1:4] = np.asarray(values, np.uint8)[None, :, None]
    aff = np.array([[0, 0, spacing[2], 0], [-spacing[0], 0, 0, 0], [0, -spacing[1], 0, 0], [0, 0, 0, 1.0]])
    return Volume(data, aff)


def test_endplate_gap_and_contact_rules():
    v = _line_volume([49, 49, 0, 0, 100, 100, 0, 0, 0, 0, 0, 49, 100, 61, 0, 100])
    assert cranio_caudal_axis(v.affine) == 1
    out, counts = fill_endplate_gaps(v.data, 1, max_gap=3)
    col = out[2, :, 2].tolist()
    # a 2-voxel gap body->disc is filled; the 5-voxel gap is too long; a direct contact makes the
    # body voxel an endplate; canal between disc and nothing is never touched
    assert col == [49, 49, 62, 62, 100, 100, 0, 0, 0, 0, 0, 62, 100, 61, 0, 100]
    assert counts == {"gap_filled": 2 * 9, "contacts_relabelled": 9}
    out2, _ = fill_endplate_gaps(v.data, 1, max_gap=3, relabel_contacts=False)
    assert out2[2, 11, 2] == 49
    # endplates never appear where no body/disc pair is
    lone = _line_volume([49, 0, 0, 61, 0, 100])
    assert not (fill_endplate_gaps(lone.data, 1, max_gap=5)[0] == 62).any()


def test_cord_outside_canal_modes():
    canal = _line_volume([0, 61, 61, 61, 0, 0])
    cord = _line_volume([0, 0, 1, 1, 1, 0])  # one voxel below the canal
    body = _line_volume([0, 0, 0, 0, 0, 49])
    srcs = [LabelSource({61: 61}, canal), LabelSource({1: 60}, cord)]
    ext = fuse_sources(srcs, fill_endplates=False)
    assert ext.semantic.data[2, :, 2].tolist() == [0, 61, 60, 60, 60, 0]
    assert ext.report["sources"][1]["cord_outside_canal_kept"] == 9
    clip = fuse_sources(srcs, fill_endplates=False, cord_outside="clip")
    assert clip.semantic.data[2, :, 2].tolist() == [0, 61, 60, 60, 0, 0]
    # cord replaces canal even when the canal source comes later; canal never overwrites cord
    late = fuse_sources([LabelSource({1: 60}, cord), LabelSource({61: 61}, canal)], fill_endplates=False)
    assert late.semantic.data[2, :, 2].tolist() == [0, 61, 60, 60, 60, 0]
    # cord never overwrites other structures
    on_body = fuse_sources([LabelSource({49: 49}, body), LabelSource({1: 60}, _line_volume([0, 0, 0, 0, 0, 1]))],
                           fill_endplates=False)
    assert on_body.semantic.data[2, 5, 2] == 49
    with pytest.raises(UsageError):
        fuse_sources(srcs, cord_outside="bogus")


def test_sources_on_other_grids_are_resampled(phantom):
    from spineps.geometry.orientation import to_orientation
    from spineps.geometry.resampling import to_spacing

    sem = np.asarray(phantom.semantic.data)
    a, b, c = _sources(sem)
    grid = phantom.semantic
    # the substructure source on a P-I-R grid at half the resolution along one axis
    b_vol, _ = to_orientation(grid.with_data(b), ("P", "I", "R"))
    c_vol = to_spacing(grid.with_data(c), (2.0, 2.0, 1.0), order=0)
    res = fuse_sources([LabelSource({1: 49, 2: 100, 3: 61, 4: 26}, grid.with_data(a)),
                        LabelSource(parse_mapping("subregions"), b_vol), LabelSource({1: 60}, c_vol)])
    f = np.asarray(res.semantic.data)
    assert res.semantic.same_grid(grid)
    assert res.report["sources"][1]["resampled_to_reference"] is True
    # a pure permutation is exact
    assert np.array_equal(f[(sem >= 41) & (sem <= 48)], sem[(sem >= 41) & (sem <= 48)])
    assert ((f == 60) & (sem == 60)).sum() / (sem == 60).sum() > 0.9


def test_write_fusion_cli_and_sidecar(phantom, tmp_path):
    from spineps.cli.main import main

    sem = np.asarray(phantom.semantic.data)
    a, b, c = _sources(sem)
    pa, pb, pc = tmp_path / "bdc.nii.gz", tmp_path / "sub:reg.nii.gz", tmp_path / "cord.nii.gz"
    for p, d in ((pa, a), (pb, b), (pc, c)):
        save_volume(phantom.semantic.with_data(d), p)
    out = tmp_path / "out" / "sub-01_desc-spine_dseg.nii.gz"
    # through the real entry point: ``spineps fuse ...``
    assert main(["fuse", "--source", f"{pa}:1=49,2=100,3=61,4=sacrum", "--source", f"{pb}:subregions",
                 "--source", f"{pc}:cord", "-o", str(out)]) == 0
    fused = load_volume(out, kind="label")
    assert fused.data.dtype == np.uint8
    assert set(np.unique(fused.data)) <= {0, 26, 41, 42, 43, 44, 45, 46, 47, 48, 49, 60, 61, 62, 100}
    side = json.loads(out.with_name("sub-01_desc-spine_dseg.json").read_text())
    srcs = side["Fusion"]["sources"]
    assert [s["path"] for s in srcs] == [str(pa), str(pb), str(pc)]
    assert srcs[0]["sha256"] == sha256_of(pa)
    assert srcs[0]["mapping"] == {"1": 49, "2": 100, "3": 61, "4": 26}
    assert srcs[2]["preset"] == "cord"
    assert "never overwritten" in side["Fusion"]["rule"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".spineps-tmp")]


def test_parsing_errors(tmp_path):
    assert parse_mapping("1=49, 2=disc,3=canal") == {1: 49, 2: 100, 3: 61}
    for bad in ("1:49", "x=49", "1=nothing", "1=49,1=100", ""):
        with pytest.raises(UsageError):
            parse_mapping(bad)
    with pytest.raises(UsageError):
        LabelSource({1: 999})
    src = parse_source_spec(str(tmp_path / "a.nii.gz"))
    assert src.preset == "spine" and src.mapping[49] == 49
    with pytest.raises(InputError, match="does not exist"):
        fuse_sources([parse_source_spec(f"{tmp_path / 'missing.nii.gz'}:1=49")])
    with pytest.raises(UsageError):
        fuse_sources([])
    real = tmp_path / "m.nii.gz"
    real.write_bytes(b"")
    with pytest.raises(UsageError, match="preset"):
        parse_source_spec(f"{real}:cordd")


def test_non_overlapping_source_is_refused():
    a = _line_volume([49, 0, 100])
    far = Volume(a.data.copy(), a.affine.copy())
    far.affine[:3, 3] += 500.0
    with pytest.raises(InputError, match="does not overlap"):
        fuse_sources([LabelSource({49: 49, 100: 100}, a, name="a"), LabelSource({49: 49}, far, name="far")])


def test_cli_parsers_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import argparse, sys\n"
            "from spineps.training.cli import add_fuse_arguments, add_export_arguments\n"
            "p = argparse.ArgumentParser(); sub = p.add_subparsers()\n"
            "add_fuse_arguments(sub.add_parser('fuse'))\n"
            "add_export_arguments(sub.add_parser('export-nnunet'), 'nnunet')\n"
            "add_export_arguments(sub.add_parser('export-cutouts'), 'cutouts')\n"
            "a = p.parse_args(['export-cutouts', '--pair', 'a', 'b', '-o', 'x'])\n"
            "assert a.export_kind == 'cutouts'\n"
            "heavy = [m for m in ('numpy', 'nibabel', 'torch', 'scipy', 'nnunetv2') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
