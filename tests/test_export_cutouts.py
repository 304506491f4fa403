"""Instance-phase training cutouts (spineps.training.export_cutouts) on phantoms."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from spineps.errors import InputError, UsageError
from spineps.geometry.io import save_volume
from spineps.labels import DEFAULT_INSTANCE_MAPPING, VERTEBRA_ORDER
from spineps.training.export_cutouts import export_cutouts, load_cutout, vertebra_order, write_cutouts

SIZE = (48, 64, 16)
SPACING = (3.0, 3.0, 6.0)


@pytest.fixture(scope="module")
def phantom():
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    # R-A-S arrays at 1.5/1.5/3 mm: export_cutouts must reorient to P-I-R and resample
    return make_phantom(PhantomSpec(seed=5, fov="thoracolumbar", spacing=(3.0, 1.5, 1.5), orientation=("R", "A", "S")))


@pytest.fixture(scope="module")
def cutouts(phantom):
    return export_cutouts(phantom.semantic, phantom.instance, spacing=SPACING, orientation=("P", "I", "R"),
                          cutout_size=SIZE)


def test_one_cutout_per_vertebra_with_body(phantom, cutouts):
    sem, inst = np.asarray(phantom.semantic.data), np.asarray(phantom.instance.data)
    with_body = {int(v) for v in np.unique(inst[sem == 49]) if 0 < v < 100 and v != 26}
    ids = [c.centre_id for c in cutouts]
    assert set(ids) <= with_body and len(ids) >= len(with_body) - 1  # a border sliver may vanish at 3 mm
    assert ids == vertebra_order(ids)  # top to bottom
    assert 26 not in ids


def test_labels_1_2_3_and_size(phantom, cutouts):
    present = vertebra_order([int(v) for v in np.unique(phantom.instance.data) if 0 < v < 100 and v != 26])
    for c in cutouts:
        assert c.input.shape == c.target.shape == c.semantic.shape == SIZE
        assert c.input.dtype == np.uint8 and c.target.dtype == np.uint8
        k = present.index(c.centre_id)
        assert c.above == (present[k - 1] if k else 0)
        assert c.below == (present[k + 1] if k + 1 < len(present) else 0)
        # the centre voxel of the cutout is the centre vertebra
        assert c.target[tuple(s // 2 for s in SIZE)] == 2
        # labels follow the instance mask exactly on the network's input voxels
        vis = c.input > 0
        assert np.array_equal(c.target == 2, (c.instance == c.centre_id) & vis)
        if c.above:
            assert np.array_equal(c.target == 1, (c.instance == c.above) & vis)
            assert (c.target == 1).any()
        else:
            assert not (c.target == 1).any()
        if c.below:
            assert np.array_equal(c.target == 3, (c.instance == c.below) & vis)
        else:
            assert not (c.target == 3).any()
        # geometry: above is superior (smaller I index in P-I-R), below inferior
        rows = {t: np.argwhere(c.target == t)[:, 1].mean() for t in (1, 2, 3) if (c.target == t).any()}
        assert sorted(rows, key=rows.get) == sorted(rows)
        # inputs are the mapped values: vertebra parts 1..9, nothing else
        assert set(np.unique(c.input)) <= set(range(10))
        lut = np.zeros(256, np.uint8)
        for s, d in DEFAULT_INSTANCE_MAPPING.items():
            lut[s] = d
        assert np.array_equal(c.input, lut[c.semantic])
    assert [c for c in cutouts if c.above and c.below], "no inner vertebra with both neighbours"


def test_write_load_roundtrip_and_cli(phantom, cutouts, tmp_path):
    paths = write_cutouts(cutouts[:2], tmp_path / "npz", "case")
    assert [p.name for p in paths] == [f"case_vert-{c.centre_id:02d}.npz" for c in cutouts[:2]]
    back = load_cutout(paths[0])
    assert np.array_equal(back.input, cutouts[0].input) and np.array_equal(back.target, cutouts[0].target)
    assert (back.above, back.centre_id, back.below) == (cutouts[0].above, cutouts[0].centre_id, cutouts[0].below)
    assert back.orientation == ("P", "I", "R") and back.spacing == pytest.approx(SPACING)
    with pytest.raises(InputError):
        load_cutout(tmp_path / "npz" / "missing.npz")

    from spineps.training.cli import add_export_arguments, run_export

    sem_p = tmp_path / "d" / "sub-01_desc-spine_dseg.nii.gz"
    save_volume(phantom.semantic, sem_p)
    save_volume(phantom.instance, tmp_path / "d" / "sub-01_desc-vertebrae_dseg.nii.gz")
    model = tmp_path / "model"
    model.mkdir()
    (model / "inference_config.json").write_text(json.dumps({
        "log_name": "x", "modality": "SEG", "acquisition": "sag", "modeltype": "unet",
        "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
        "resolution_range": list(SPACING), "default_step_size": 0.5, "labels": {"0": 0, "1": 1, "2": 2, "3": 3},
        "expected_inputs": ["seg"], "cutout_size": list(SIZE)}))
    parser = argparse.ArgumentParser()
    add_export_arguments(parser, "cutouts")
    args = parser.parse_args(["--derivatives-dir", str(tmp_path / "d"), "-o", str(tmp_path / "cli"),
                              "--model", str(model), "--no-raw"])
    assert run_export(args) == 0
    files = sorted((tmp_path / "cli").glob("sub-01_vert-*.npz"))
    assert len(files) == len(cutouts)
    one = load_cutout(files[0])
    assert one.input.shape == SIZE and not one.semantic.any()  # raw arrays left out


def test_bad_arguments(phantom):
    with pytest.raises(UsageError):
        export_cutouts(phantom.semantic, phantom.instance, spacing=SPACING, cutout_size=(50, 64, 16))
    empty = phantom.semantic.with_data(np.zeros(phantom.semantic.shape, np.uint8))
    assert export_cutouts(empty, phantom.instance, spacing=SPACING, cutout_size=SIZE) == []
    with pytest.raises(ValueError):
        vertebra_order([99])
    assert vertebra_order([20, 19, 28, 1]) == [1, 19, 28, 20] == [v for v in VERTEBRA_ORDER if v in (1, 19, 20, 28)]


def test_cutouts_feed_the_instance_recipe(cutouts):
    """The stored raw cutouts are what the instance training recipe's target builder needs:
    on uncorrupted cutouts it gives the same 1/2/3 labels as the export."""
    inst_mod = pytest.importorskip("spineps.training.instance")
    make_target = getattr(inst_mod, "make_target", None)
    if make_target is None:
        pytest.skip("spineps.training.instance has no make_target")
    c = next(c for c in cutouts if c.above and c.below)
    inst = np.where((c.instance > 0) & (c.instance < 100), c.instance, 0).astype(np.uint8)
    theirs = make_target(c.semantic, inst, c.above, c.centre_id, c.below)
    agree = (theirs == c.target).mean()
    assert agree > 0.999, agree
