"""Instance phase: network layout, checkpoints, cutouts, consensus merging, segmenter plumbing.

All CPU-fast: small synthetic label maps built here (boxes for the vertebral parts).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from spineps.errors import ModelError
from spineps.geometry.volume import Volume
from spineps.instance.checkpoint import (
    load_instance_checkpoint,
    read_checkpoint_dict,
    save_instance_checkpoint,
)
from spineps.instance.cutouts import (
    body_centres,
    cutout_boxes,
    extract_cutout,
    make_cutout_input,
    map_semantic,
)
from spineps.instance.merge import merge_cutout_predictions
from spineps.instance.network import InstanceUNet3D, count_parameters
from spineps.labels import DEFAULT_INSTANCE_MAPPING

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec"


# ---------------------------------------------------------------------------------------
# toy spines on a P-I-R grid: vertebra k occupies rows [top_k, top_k + height) along axis 1

def toy_spine(n: int = 5, height: int = 8, gap: int = 3, shape_pr: tuple[int, int] = (24, 12),
              start: int = 4, touching: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(semantic, instance) arrays: body (49) in front, arcus (41) and spinous (42) behind,
    left/right articular processes (45/46), discs (100) between bodies."""
    gap = 0 if touching else gap
    n_i = start * 2 + n * height + (n - 1) * gap
    sem = np.zeros((shape_pr[0], n_i, shape_pr[1]), np.uint8)
    inst = np.zeros_like(sem)
    r0, r1 = 2, shape_pr[1] - 2
    for k in range(n):
        top = start + k * (height + gap)
        rows = slice(top, top + height)
        sem[2:10, rows, r0:r1] = 49
        inst[2:10, rows, r0:r1] = k + 1
        sem[12:16, rows, r0 + 2:r1 - 2] = 41
        inst[12:16, rows, r0 + 2:r1 - 2] = k + 1
        sem[16:21, top + 2:top + height - 1, r0 + 4:r1 - 4] = 42
        inst[16:21, top + 2:top + height - 1, r0 + 4:r1 - 4] = k + 1
        sem[12:15, top + 1:top + 4, r0:r0 + 2] = 45
        sem[12:15, top + 1:top + 4, r1 - 2:r1] = 46
        inst[12:15, top + 1:top + 4, r0:r0 + 2] = k + 1
        inst[12:15, top + 1:top + 4, r1 - 2:r1] = k + 1
        if k + 1 < n and gap:
            sem[2:10, top + height:top + height + gap, r0:r1] = 100
    return sem, inst


def perfect_predictions(inst: np.ndarray, centres, order, cutout_size):
    """What an ideal network predicts in each cutout: 1/2/3 for the vertebra above/at/below
    its centre (``order`` lists the instance ids top to bottom; centre k is order[k])."""
    boxes = cutout_boxes(centres, cutout_size, inst.shape)
    preds = []
    for box in boxes:
        lut = np.zeros(256, np.uint8)
        centre_id = int(inst[box.centre])
        j = order.index(centre_id)
        if j > 0:
            lut[order[j - 1]] = 1
        lut[order[j]] = 2
        if j + 1 < len(order):
            lut[order[j + 1]] = 3
        preds.append(lut[extract_cutout(inst, box)])
    return preds, boxes


def body_centre_of(inst: np.ndarray, sem: np.ndarray, v: int) -> tuple[int, int, int]:
    pts = np.argwhere((inst == v) & (sem == 49))
    return tuple(int(x) for x in np.round(pts.mean(axis=0)))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """a and b label the same voxels with a one-to-one relabelling."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(set(pairs[0])) == pairs.shape[1] == len(set(pairs[1]))


CUT = (24, 40, 16)


# ---------------------------------------------------------------------------------------
# network layout

def _tsv(name: str) -> list[tuple[str, str]]:
    path = SPEC / name
    if not path.is_file():
        pytest.skip(f"key list {path} not available (shared/spec lies beside the checkout)")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(r[0], r[1]) for r in rows]


@pytest.mark.parametrize("tsv,in_ch,dim,count", [
    ("instance-unet3d-legacy-keys.tsv", 10, 16, 5_375_124),
    ("instance-unet3d-dim8-ch11-keys.tsv", 11, 8, 1_361_924),
])
def test_network_layout_matches_released_key_lists(tsv, in_ch, dim, count):
    net = InstanceUNet3D(in_channels=in_ch, dim=dim)
    ours = [("network." + k, str(tuple(v.shape))) for k, v in net.state_dict().items()]
    assert ours == _tsv(tsv)
    assert count_parameters(net) == count
    assert not list(net.buffers())


def test_network_forward_shapes_and_divisibility():
    net = InstanceUNet3D(in_channels=10, dim=8).eval()
    with torch.no_grad():
        y = net(torch.zeros(2, 10, 16, 24, 8))
    assert y.shape == (2, 4, 16, 24, 8)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 10, 16, 20, 8))


def test_channels_last_gives_same_argmax():
    torch.manual_seed(0)
    net = InstanceUNet3D(in_channels=10, dim=8).eval()
    idx = torch.randint(0, 10, (1, 16, 16, 8))
    x = torch.nn.functional.one_hot(idx, 10).permute(0, 4, 1, 2, 3).float()
    with torch.no_grad():
        a = net(x)
        b = net.to(memory_format=torch.channels_last_3d)(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------------------------------
# checkpoints

def test_checkpoint_round_trip_and_lightning_keys(tmp_path):
    torch.manual_seed(1)
    net = InstanceUNet3D(in_channels=10, dim=8).eval()
    path = save_instance_checkpoint(tmp_path / "instance_weights.ckpt", net, epoch=3, global_step=30,
                                    hyper_parameters={"n_epoch": 3})
    raw = read_checkpoint_dict(path)
    assert set(raw) == {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops",
                        "hparams_name", "hyper_parameters"}
    assert all(k.startswith("network.") for k in raw["state_dict"])
    assert len(raw["state_dict"]) == 182
    loaded = load_instance_checkpoint(path)
    assert (loaded.in_channels, loaded.dim) == (10, 8)
    assert loaded.meta["epoch"] == 3 and loaded.meta["hyper_parameters"]["opt"]["n_epoch"] == 3
    # what the reference's Lightning module rebuilds the network from (PLNet.load_from_checkpoint)
    hp = raw["hyper_parameters"]
    assert (hp["num_channels"], hp["dim"], hp["do2D"]) == (10, 8, False)
    assert hp["opt"].channelwise is True
    assert all(hasattr(hp["opt"], k) for k in ("lr", "lr_end_factor", "l2_reg_w", "dsc_loss_w", "n_epoch"))
    x = torch.rand(1, 10, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.network(x))
    # no stray temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance_weights.ckpt"]


def test_bundled_checkpoint_carries_the_reference_hyper_parameters():
    """The bundled folder loads in SPINEPS 2.1.3 as it is (checked by hand, see its model
    card): the hyper-parameters agree with the weights' shapes."""
    from spineps.models.registry import BUNDLED_INSTANCE, bundled_model_dir

    folder = bundled_model_dir(BUNDLED_INSTANCE)
    if folder is None:
        pytest.skip("no bundled instance model in this installation")
    raw = read_checkpoint_dict(folder / "instance_weights.ckpt")
    hp = raw["hyper_parameters"]
    w = raw["state_dict"]["network.init_conv.weight"]
    assert (hp["dim"], hp["num_channels"]) == (w.shape[0], w.shape[1]) == (8, 10)
    assert hp["opt"].channelwise is True and hp["do2D"] is False


def test_variant_detected_from_shapes(tmp_path):
    net = InstanceUNet3D(in_channels=11, dim=8)
    path = save_instance_checkpoint(tmp_path / "w_weights.ckpt", net)
    loaded = load_instance_checkpoint(path)
    assert (loaded.in_channels, loaded.dim) == (11, 8)


def test_wrong_architecture_is_a_model_error(tmp_path):
    net = InstanceUNet3D(in_channels=10, dim=8)
    sd = {"network." + k: v for k, v in net.state_dict().items()}
    # a missing block
    bad = {k: v for k, v in sd.items() if ".ups.1." not in k}
    torch.save({"state_dict": bad, "epoch": 0}, tmp_path / "a.ckpt")
    with pytest.raises(ModelError, match="missing"):
        load_instance_checkpoint(tmp_path / "a.ckpt")
    # one tensor of the wrong shape
    bad = dict(sd)
    bad["network.mid_block1.block1.proj.weight"] = torch.zeros(32, 64, 3, 3, 3)
    torch.save({"state_dict": bad}, tmp_path / "b.ckpt")
    with pytest.raises(ModelError, match="wrong shape"):
        load_instance_checkpoint(tmp_path / "b.ckpt")
    # some other network entirely
    torch.save({"state_dict": {"network.conv.weight": torch.zeros(3, 3)}}, tmp_path / "c.ckpt")
    with pytest.raises(ModelError, match="init_conv"):
        load_instance_checkpoint(tmp_path / "c.ckpt")
    # a 5-class head
    bad = dict(sd)
    bad["network.final_conv.weight"] = torch.zeros(5, 8, 1, 1, 1)
    torch.save({"state_dict": bad}, tmp_path / "d.ckpt")
    with pytest.raises(ModelError, match="final_conv"):
        load_instance_checkpoint(tmp_path / "d.ckpt")
    # not a checkpoint at all
    (tmp_path / "e.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ModelError):
        load_instance_checkpoint(tmp_path / "e.ckpt")


class _Payload:
    """Unpickling this would create a file: a stand-in for an arbitrary-code pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weights_only_refuses_foreign_pickles(tmp_path):
    marker = tmp_path / "pwned"
    net = InstanceUNet3D(in_channels=10, dim=8)
    sd = {"network." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"opt": _Payload(marker)}}, tmp_path / "evil.ckpt",
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ModelError, match="weights_only"):
        load_instance_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_argparse_namespace_is_allowed(tmp_path):
    import argparse

    net = InstanceUNet3D(in_channels=10, dim=8)
    sd = {"network." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"opt": argparse.Namespace(n_epoch=300, lr=1e-4)},
                "epoch": 299}, tmp_path / "ok.ckpt")
    loaded = load_instance_checkpoint(tmp_path / "ok.ckpt")
    assert loaded.meta["hyper_parameters"]["opt"] == {"n_epoch": 300, "lr": 1e-4}


# ---------------------------------------------------------------------------------------
# cutouts

def test_body_centres_one_per_body_top_to_bottom():
    sem, inst = toy_spine(n=5)
    cs = body_centres(sem, spacing=(2, 2, 4), axis=1, corpus_size_cleaning=10)
    assert len(cs) == 5
    assert [int(inst[c]) for c in cs] == [1, 2, 3, 4, 5]
    assert all(sem[c] == 49 for c in cs)


def test_body_centres_split_merged_bodies():
    sem, inst = toy_spine(n=6)
    # the semantic phase merged bodies 3 and 4 through their disc
    sem[(sem == 100) & (np.roll(inst, 1, axis=1) == 3)] = 49
    gap = (sem == 100)
    assert gap.any()
    cs = body_centres(sem, spacing=(2, 2, 4), axis=1, corpus_size_cleaning=10, erosion=0)
    ids = [int(inst[c]) if inst[c] else -1 for c in cs]
    assert len(cs) == 6, ids
    # each centre lies within a body, near the right vertebra
    assert sorted(set(i for i in ids if i > 0)) == ids or len(set(ids)) >= 5


def test_body_centres_touching_bodies_and_small_components():
    sem, inst = toy_spine(n=4, gap=1)
    # neighbouring bodies touch through a bridge across the one-voxel disc
    bridge = (sem == 100)
    bridge[:, :, :5] = False
    bridge[:, :, -5:] = False
    sem[bridge] = 49
    sem[20:22, 0:2, 0:2] = 49  # a small spurious body fragment
    cs = body_centres(sem, spacing=(2, 2, 4), axis=1, corpus_size_cleaning=10)
    assert len(cs) == 4
    assert [int(inst[c]) for c in cs] == [1, 2, 3, 4]


def test_body_centre_is_moved_onto_the_body():
    sem = np.zeros((20, 30, 12), np.uint8)
    sem[4:16, 10:20, 2:10] = 49
    sem[7:13, 10:20, 2:10] = 0  # C shape: the centre of mass is in the hole
    sem[4:16, 10:13, 2:10] = 49
    cs = body_centres(sem, corpus_size_cleaning=10, erosion=0)
    assert len(cs) == 1 and sem[cs[0]] == 49


def test_cutout_boxes_zero_pad_at_borders():
    vol = np.arange(10 * 12 * 6).reshape(10, 12, 6)
    (box,) = cutout_boxes([(1, 11, 3)], (8, 8, 8), vol.shape)
    cut = extract_cutout(vol, box)
    assert cut.shape == (8, 8, 8)
    assert box.start == (-3, 7, -1)
    assert np.array_equal(cut[3:8, 0:5, 1:7], vol[0:5, 7:12, 0:6])
    assert cut[:3].sum() == 0 and cut[:, 5:].sum() == 0


def test_cutout_input_one_hot_via_mapping():
    sem, _ = toy_spine(n=3)
    sem[0, 0, 0] = 26  # sacrum -> background channel
    sem[1, 0, 0] = 50  # legacy body value -> channel 9
    mapped = map_semantic(sem, DEFAULT_INSTANCE_MAPPING)
    assert mapped[0, 0, 0] == 0 and mapped[1, 0, 0] == 9
    assert set(np.unique(mapped)) <= set(range(10))
    assert not mapped[sem == 100].any()  # discs are not an input
    (box,) = cutout_boxes([(12, 10, 6)], (16, 24, 16), sem.shape)
    x = make_cutout_input(mapped, box, 10)
    assert x.shape == (10, 16, 24, 16) and x.dtype == np.float32
    assert np.array_equal(x.sum(axis=0), np.ones((16, 24, 16)))
    assert np.array_equal(x.argmax(axis=0), extract_cutout(mapped, box))


# ---------------------------------------------------------------------------------------
# consensus merging on constructed predictions

def _setup(n=5, **kw):
    sem, inst = toy_spine(n=n, **kw)
    order = list(range(1, n + 1))
    centres = [body_centre_of(inst, sem, v) for v in order]
    return sem, inst, order, centres


def test_merge_perfect_predictions_recovers_every_vertebra():
    sem, inst, order, centres = _setup()
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)  # numbered 1..N top to bottom
    # inner vertebrae were seen three times, the outer ones twice
    assert [g["n_predictions"] for g in res.groups] == [2, 3, 3, 3, 2]


def test_merge_vertebra_predicted_only_twice():
    sem, inst, order, centres = _setup()
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    preds[1][preds[1] == 3] = 0  # cutout 1 misses the vertebra below (3): seen twice only
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)
    assert res.groups[2]["n_predictions"] == 2


def test_merge_disagreeing_cutout_is_outvoted():
    sem, inst, order, centres = _setup(n=6)
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    # cutout 2 (centre vertebra 3) is off by one: it calls vertebra 3 "above", 4 "centre", 5 "below"
    cut = extract_cutout(inst, boxes[2])
    lut = np.zeros(256, np.uint8)
    lut[3], lut[4], lut[5] = 1, 2, 3
    preds[2] = lut[cut]
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)


def test_merge_cutout_that_merges_two_vertebrae_does_not_merge_them():
    sem, inst, order, centres = _setup(n=5)
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    p = preds[2]
    p[p == 3] = 2  # cutout 2 calls vertebrae 3 and 4 one "centre" vertebra
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert same_partition(res.instance, inst)
    assert res.instance.max() == 5


def test_merge_two_touching_vertebrae_stay_apart():
    sem, inst, order, centres = _setup(n=4, touching=True)
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)


def test_merge_missing_centre_still_finds_the_vertebra():
    sem, inst, order, centres = _setup(n=5)
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    # no body centre for vertebra 3: drop its cutout. Cutout 1 (vertebra 2) still sees it as
    # "below" and cutout 3 (vertebra 4) as "above".
    keep = [0, 1, 3, 4]
    res = merge_cutout_predictions([preds[k] for k in keep], [boxes[k] for k in keep], inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)


def test_merge_duplicate_centres_in_one_vertebra():
    sem, inst, order, centres = _setup(n=5)
    # vertebra 3's body was split in two: two cutouts centred in it
    extra = list(centres[2])
    extra[1] += 2
    centres2 = centres[:3] + [tuple(extra)] + centres[3:]
    preds, boxes = perfect_predictions(inst, centres2, order, CUT)
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)


def test_merge_respects_valid_mask_and_min_voxels():
    sem, inst, order, centres = _setup(n=4)
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    valid = sem == 49
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1, valid=valid)
    assert not res.instance[~valid].any()
    assert np.array_equal(res.instance[valid], inst[valid])
    big = merge_cutout_predictions(preds, boxes, inst.shape, axis=1, min_voxels=10**6)
    assert big.instance.max() == 0


# ---------------------------------------------------------------------------------------
# training helpers

def test_flip_swaps_left_and_right_labels():
    from spineps.training.instance import flip_lr

    sem = np.zeros((2, 2, 4), np.uint8)
    sem[0, 0, 0] = 43
    sem[0, 0, 1] = 45
    sem[0, 0, 2] = 48
    sem[1, 1, 3] = 49
    out = flip_lr(sem)
    assert out[0, 0, 3] == 44 and out[0, 0, 2] == 46 and out[0, 0, 1] == 47 and out[1, 1, 0] == 49
    assert np.array_equal(flip_lr(out), sem)


def test_training_sample_targets():
    from spineps.training.instance import TrainConfig, case_from_arrays, sample_cutout

    sem, inst = toy_spine(n=5)
    case = case_from_arrays(sem, inst)
    assert case.order == [1, 2, 3, 4, 5]
    cfg = TrainConfig(out=Path("unused"), cutout_size=(24, 32, 16))
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = sample_cutout(case, cfg, rng, augment_p=0.0)
        assert x.shape == y.shape == (24, 32, 16)
        assert set(np.unique(y)) <= {0, 1, 2, 3} and 2 in y
        assert not y[x == 0].any()


def test_evaluate_instances():
    from spineps.training.instance import evaluate_instances

    _, inst = toy_spine(n=4)
    assert evaluate_instances(inst, inst)["rq"] == 1.0
    merged = inst.copy()
    merged[merged == 2] = 1
    m = evaluate_instances(merged, inst)
    assert m["fn"] == 1 and m["rq"] < 1.0


# ---------------------------------------------------------------------------------------
# model folder and segmenter plumbing (untrained weights: checks the chain, not accuracy)

def _folder(tmp_path: Path, *, modality="SEG", n_ckpt=1, cutout=(24, 40, 16)) -> Path:
    from spineps.training.instance import TrainConfig, model_config_dict

    folder = tmp_path / "inst"
    folder.mkdir(parents=True)
    cfg = TrainConfig(out=folder, spacing=(2.0, 2.0, 4.0), cutout_size=cutout, corpus_size_cleaning=10,
                      vert_size_threshold=4)
    conf = model_config_dict(cfg)
    conf["modality"] = modality
    (folder / "inference_config.json").write_text(json.dumps(conf))
    torch.manual_seed(0)
    for i in range(n_ckpt):
        save_instance_checkpoint(folder / f"model{i}_weights.ckpt", InstanceUNet3D(10, 8))
    return folder


def test_folder_contract_errors(tmp_path):
    from spineps.instance.segmenter import UNetInstanceSegmenter

    with pytest.raises(ModelError, match="exactly one"):
        UNetInstanceSegmenter.from_folder(_folder(tmp_path / "a", n_ckpt=2), device="cpu")
    with pytest.raises(ModelError, match="exactly one"):
        UNetInstanceSegmenter.from_folder(_folder(tmp_path / "b", n_ckpt=0), device="cpu")
    with pytest.raises(ModelError, match="SEG"):
        UNetInstanceSegmenter.from_folder(_folder(tmp_path / "c", modality="T2w"), device="cpu")


def _toy_volume(axcodes_affine: np.ndarray | None = None) -> Volume:
    sem, _ = toy_spine(n=4)
    aff = np.zeros((4, 4))
    aff[1, 0], aff[2, 1], aff[0, 2], aff[3, 3] = -2.0, -2.0, 4.0, 1.0  # P, I, R axes at 2 x 2 x 4 mm
    aff[:3, 3] = [30, 80, -20]
    return Volume(sem, aff)


def test_segmenter_predicts_on_the_input_grid(tmp_path):
    from spineps.geometry.orientation import to_orientation
    from spineps.instance.segmenter import UNetInstanceSegmenter

    seg = UNetInstanceSegmenter.from_folder(_folder(tmp_path), device="cpu", nprocs=1)
    vol = _toy_volume()
    assert vol.axcodes == ("P", "I", "R")
    # present it in RAS order: the result must come back on exactly that grid
    ras, _ = to_orientation(vol, ("R", "A", "S"))
    pred = seg.segment(ras)
    out = pred.vertebrae
    assert out.same_grid(ras) and out.data.dtype == np.uint16
    assert not out.data[~np.isin(ras.data, np.arange(41, 50))].any()
    assert {"instance_forward", "instance_merge", "instance_network_total"} <= set(pred.timings)
    prov = seg.provenance()
    assert prov["network"] == {"dim": 8, "in_channels": 10} and prov["checksum"].startswith("sha256:")
    assert len(prov["checksum"]) == len("sha256:") + 64
    assert prov["device"] == "cpu" and prov["half_precision"] is False


def test_pipeline_chains_postprocessing_and_naming(tmp_path):
    """The instance phase, then the pipeline's post-processing, naming and measurements, on
    the input grid (untrained weights: structure, not accuracy)."""
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.pipeline import segment_from_semantic

    seg = UNetInstanceSegmenter.from_folder(_folder(tmp_path), device="cpu", nprocs=1)
    vol = _toy_volume()
    out = segment_from_semantic(vol, seg)
    assert out.instance is not None and out.instance.same_grid(vol) and out.semantic.same_grid(vol)
    assert "rule" in out.naming and "levels" in out.naming
    assert {"instance_forward", "instance_merge", "instance_postprocess", "instance_naming", "measure"} <= set(
        out.timings)
    assert out.measurements is not None and out.measure_error is None


def test_merge_drops_an_unconfirmed_fragment_but_keeps_a_real_single():
    sem, inst, order, centres = _setup(n=5)
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    # the bottom cutout calls a few voxels at the lower edge of its centre vertebra "below"
    p = preds[4]
    rows = np.argwhere(p == 2)[:, 1]
    edge = (p == 2) & (np.indices(p.shape)[1] == rows.max())
    edge[:, :, :6] = False
    p[edge] = 3
    res = merge_cutout_predictions(preds, boxes, inst.shape, axis=1)
    assert res.instance.max() == 5
    assert same_partition(res.instance, np.where(res.instance > 0, inst, 0))
    # a whole vertebra seen by one cutout only (the top one, with its own cutout missing) stays
    preds, boxes = perfect_predictions(inst, centres, order, CUT)
    res = merge_cutout_predictions(preds[1:], boxes[1:], inst.shape, axis=1)
    assert np.array_equal(res.instance, inst)
