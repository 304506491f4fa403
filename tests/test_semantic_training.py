"""The training recipe's pure parts: label conversion with partial labels, the plans edit,
and the config the bundled folder gets (follows the release rules)."""

from __future__ import annotations

import json

import numpy as np

from spineps.models.folder import read_model_config
from spineps.training.partial_labels import (Margins, below_lowest_plane, labels_from_bodies, labels_from_discs,
                                             sacrum_below_l5)
from spineps.training.semantic import (IGNORE_INDEX, LABEL_ORDER, MODEL_ORIENTATION, Recipe, inference_config,
                                       plans_dict, real_cases, small_plans, values_to_indices)

BODY, DISC, SACRUM = (LABEL_ORDER.index(v) + 1 for v in (49, 100, 26))


def test_values_to_indices_maps_community_values_and_unknowns_to_ignore():
    m = np.array([[[0, 41, 49, 100, 26, 60, 61, 62, 52]]], dtype=np.uint8)
    idx = values_to_indices(m)
    assert idx[0, 0, 0] == 0
    for pos, v in enumerate(m[0, 0, 1:8], start=1):
        assert LABEL_ORDER[idx[0, 0, pos] - 1] == v
    assert idx[0, 0, 8] == IGNORE_INDEX  # 52 is not a network class


def _column(levels, P=60, n_i=80, R=40, lateral=(10, 30)):
    """Instances stacked along I (P, I, R arrays): ``levels`` = (id, i0, i1, p0, p1)."""
    inst = np.zeros((P, n_i, R), np.int64)
    for v, i0, i1, p0, p1 in levels:
        inst[p0:p1, i0:i1, lateral[0]:lateral[1]] = v
    return inst


def test_bodies_give_discs_between_them_endplate_layers_unknown_and_background_around():
    # two bodies 5 voxels apart (1 mm voxels); the lower one slightly more posterior
    inst = _column([(20, 10, 30, 20, 40), (21, 35, 55, 22, 42)])
    lab = labels_from_bodies(inst, (1.0, 1.0, 1.0), body=BODY, disc=DISC, ignore=IGNORE_INDEX,
                             margins=Margins(anterior_mm=5.0, lateral_mm=3.0, footprint_erosion_mm=2.0,
                                             gap_end_mm=1.0, endplate_mm=2.0))
    # body cores are body, the 2 mm next to each body's top and bottom unknown
    assert (lab[25:35, 14:26, 15:25] == BODY).all()
    assert (lab[25:35, 10:12, 15:25] == IGNORE_INDEX).all() and (lab[25:35, 28:30, 15:25] == IGNORE_INDEX).all()
    # the gap rows 30..34 inside the shared footprint (P 22..39, R 10..29, shrunk by 2): disc,
    # its first and last row (next to each body) unknown
    assert (lab[25:37, 31:34, 13:27] == DISC).all()
    assert (lab[25:37, 30, 15:25] == IGNORE_INDEX).all() and (lab[25:37, 34, 15:25] == IGNORE_INDEX).all()
    assert (lab[22:24, 31:34, 15:25] != DISC).all()  # outside the shrunk footprint
    # clearly in front: background; lateral in the front part of a body: background
    assert (lab[0:14, 15:25, :] == 0).all()
    assert (lab[21:30, 15:25, 0:6] == 0).all() and (lab[21:30, 15:25, 34:] == 0).all()
    # lateral but behind the front part (pedicles, processes): unknown; posterior: unknown
    assert (lab[36:40, 15:25, 0:6] == IGNORE_INDEX).all()
    assert (lab[45:, 15:25, :] == IGNORE_INDEX).all()
    # outside the annotated I range: unknown
    assert (lab[:, 0:8, :] == IGNORE_INDEX).all() and (lab[:, 60:, :] == IGNORE_INDEX).all()


def test_a_gap_too_long_for_a_disc_is_a_missing_level_not_a_disc():
    inst = _column([(20, 5, 25, 20, 40), (22, 55, 75, 20, 40)])  # 30 mm apart: L2 missing
    lab = labels_from_bodies(inst, (1.0, 1.0, 1.0), body=BODY, disc=DISC, ignore=IGNORE_INDEX)
    assert not (lab == DISC).any()


def test_discs_give_bodies_between_them_and_the_top_of_s1_below_l5_s1():
    inst = _column([(123, 10, 19, 20, 40), (124, 45, 54, 22, 42)])
    for lowest_is_l5_s1 in (True, False):
        lab = labels_from_discs(inst, (1.0, 1.0, 1.0), body=BODY, disc=DISC, sacrum=SACRUM, ignore=IGNORE_INDEX,
                                lowest_is_l5_s1=lowest_is_l5_s1,
                                margins=Margins(endplate_mm=2.0, sacrum_from_mm=2.0, sacrum_to_mm=10.0))
        assert (lab[inst > 0] == DISC).all()
        # body between the discs, 2 mm next to each disc unknown
        assert (lab[25:37, 21:43, 13:27] == BODY).all()
        assert (lab[25:37, 19:21, 15:25] == IGNORE_INDEX).all()
        if lowest_is_l5_s1:
            assert (lab[25:37, 55:64, 13:27] == SACRUM).all() and (lab[25:37, 66:, 15:25] == IGNORE_INDEX).all()
        else:
            assert not (lab == SACRUM).any()


def test_below_lowest_plane_follows_a_tilted_inferior_surface():
    # the lowest body's bottom descends 1 voxel per 4 voxels of P (a tilted endplate)
    inst = np.zeros((60, 80, 20), np.int64)
    inst[20:40, 5:15, 5:15] = 23
    for p in range(20, 40):
        inst[p, 25:30 + (p - 20) // 4, 5:15] = 24
    below = below_lowest_plane(inst, (1.0, 1.0, 1.0), margin_mm=3.0)
    # in front (p 20) the surface is at i 29, behind (p 39) at i 33 (a least-squares plane through
    # the steps); 3 mm margin
    assert not below[20, 31, 10] and below[20, 33, 10]
    assert not below[39, 36, 10] and below[39, 38, 10]
    # the plane extends beyond the body's footprint (P behind it, R beside it)
    assert below[55, 50, 0] and not below[55, 30, 0]
    assert not below_lowest_plane(np.zeros((4, 4, 4), np.int64), (1.0, 1.0, 1.0), 1.0).any()


def test_sacrum_below_l5_takes_the_bone_under_l5_not_l5_nor_far_pieces():
    inst = _column([(23, 10, 30, 20, 40), (24, 36, 56, 21, 41)], n_i=120)
    bone = np.zeros(inst.shape, bool)
    bone[inst > 0] = True  # the model's bodies over the annotation: never sacrum
    bone[22:44, 64:78, 12:28] = True  # S1, 8 mm below L5 (a disc between): sacrum
    bone[0:12, 100:112, 0:10] = True  # a 1.4 ml piece more than 25 mm from L5: not
    s1 = sacrum_below_l5(inst, bone, (1.0, 1.0, 1.0))
    assert s1[22:44, 64:78, 12:28].all()
    assert not s1[inst > 0].any() and not s1[0:12, 100:112, 0:10].any()
    # a piece smaller than min_ml is left alone; no annotation: nothing
    tiny = np.zeros(inst.shape, bool)
    tiny[30:33, 62:65, 18:21] = True
    assert not sacrum_below_l5(inst, tiny, (1.0, 1.0, 1.0)).any()
    assert not sacrum_below_l5(np.zeros_like(inst), bone, (1.0, 1.0, 1.0)).any()


def test_small_plans_and_plans_dict_agree_on_the_small_network():
    r = Recipe()
    planned = plans_dict((1.0, 1.0, 1.0), (64, 64, 64), (32, 64, 128, 256, 320))
    edited = small_plans(json.loads(json.dumps(planned)), r)
    cfg = edited["configurations"]["3d_fullres"]
    assert list(edited["configurations"]) == ["3d_fullres"]
    assert cfg["spacing"] == [r.spacing_pir[2], r.spacing_pir[1], r.spacing_pir[0]]
    assert cfg["patch_size"] == list(r.patch_rip)
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"] == list(r.features)
    # the patch is divisible by the total downsampling on every axis
    strides = np.prod(np.array(cfg["architecture"]["arch_kwargs"]["strides"]), axis=0)
    assert all(p % s == 0 for p, s in zip(cfg["patch_size"], strides))


def test_bundled_config_follows_the_release_rules(tmp_path):
    cfg = inference_config(Recipe())
    assert cfg["modality"] == "T2w" and cfg["acquisition"] == "sag" and cfg["modeltype"] == "nnunet"
    assert isinstance(cfg["resolution_range"], list) and len(cfg["resolution_range"]) == 3
    assert all(isinstance(x, float) for x in cfg["resolution_range"])
    assert cfg["labels"]["0"] == 0 and len(cfg["labels"]) == len(LABEL_ORDER) + 1
    (tmp_path / "inference_config.json").write_text(json.dumps(cfg))
    mc = read_model_config(tmp_path)
    assert mc.orientation == MODEL_ORIENTATION and mc.fixed_spacing
    assert set(mc.labels.values()) == {0, *LABEL_ORDER}


def test_holdout_is_disjoint_from_training(real_data):
    train = {(s, sub) for s, sub, *_ in real_cases(real_data, "train")}
    hold = {(s, sub) for s, sub, *_ in real_cases(real_data, "holdout")}
    assert train and hold and not (train & hold)
    assert ("SCT", "sub-sctcervical") in hold


def test_pseudo_target_fills_only_unknown_interiors_of_undecided_classes():
    from spineps.training.pseudo_labels import pseudo_target

    U = IGNORE_INDEX
    canal, arcus = LABEL_ORDER.index(61) + 1, LABEL_ORDER.index(41) + 1
    target = np.full((30, 30, 30), U, np.uint8)
    target[5:12, 5:25, 5:25] = BODY  # annotated
    pred = np.zeros_like(target)
    pred[4:14, 5:25, 5:25] = BODY  # the model's body is larger: must not be adopted
    pred[16:24, 5:25, 10:20] = canal
    pred[25:29, 5:25, 10:20] = arcus
    out = pseudo_target(target, pred, ignore=U, decided=(BODY, DISC), erode_vox=1, background_margin_vox=2)
    assert (out[5:12, 5:25, 5:25] == BODY).all()
    # body rows the annotation leaves out
    assert (out[4, 5:25, 5:25] == U).all() and (out[12:14, 5:25, 5:25] == U).all()
    assert (out[17:23, 6:24, 11:19] == canal).all()  # interior adopted
    assert (out[16, 6:24, 11:19] == U).all() and (out[23, 6:24, 11:19] == U).all()  # borders stay unknown
    assert (out[26:28, 6:24, 11:19] == arcus).all()
    # background only far from every structure; near them unknown
    assert (out[17:23, 6:24, 0:7] == 0).all() and (out[17:23, 6:24, 8] == U).all()
    # what the target already knew is kept
    known = target != U
    assert (out[known] == target[known]).all()


def _canal_slices(shape=(30, 12, 30)):
    """Arrays in P-I-R: a bright canal disc (radius 8) around a darker cord disc (radius 4)
    in every slice across the I axis; the model's prediction calls only the cord's centre cord."""
    ii, kk = np.meshgrid(np.arange(shape[0]), np.arange(shape[2]), indexing="ij")
    r = np.hypot(ii - 15, kk - 15)
    image = np.full(shape, 100.0, np.float32)
    pred = np.zeros(shape, np.uint8)
    for j in range(shape[1]):
        image[:, j][r <= 8] = 900.0
        image[:, j][r <= 4] = 300.0
        pred[:, j][r <= 8] = 61
        pred[:, j][r <= 1.5] = 60
    return image, pred, r


def test_cord_by_contrast_grows_the_thin_cord_to_the_dark_part_of_the_canal():
    from spineps.training.pseudo_labels import cord_by_contrast

    image, pred, r = _canal_slices()
    pred[:, 0][r <= 1.5] = 61  # a slice without predicted cord: nothing is grown there
    image[:, 1][r <= 8] = 350.0  # a slice without contrast: the CSF is not bright
    image[:, 1][r <= 4] = 300.0
    image[2, 5, 2] = 10.0  # dark, outside the canal: never cord
    out = cord_by_contrast(image, pred, cord=60, canal=61, axis=1)
    for j in range(2, 12):
        assert (out[:, j] == (r <= 4)).all(), j  # the whole dark disc, none of the CSF ring
    assert not out[:, 0].any()
    assert (out[:, 1] == (pred[:, 1] == 60)).all()
    assert not out[2, 5, 2]


def test_cord_by_contrast_keeps_dark_canal_not_touching_the_cord_out():
    from spineps.training.pseudo_labels import cord_by_contrast

    image, pred, r = _canal_slices()
    ii, kk = np.meshgrid(np.arange(30), np.arange(30), indexing="ij")
    islet = np.hypot(ii - 15, kk - 22) <= 0.8  # a dark rootlet in the CSF, apart from the cord
    image[:, 4][islet] = 200.0
    out = cord_by_contrast(image, pred, cord=60, canal=61, axis=1)
    assert not out[:, 4][islet].any() and (out[:, 4] == (r <= 4)).all()


def test_phantom_spec_cuts_some_training_phantoms_tightly_around_the_canal():
    from spineps.synth.anatomy import make_phantom
    from spineps.training.semantic import TIGHT_FOV_FRACTION, phantom_spec

    specs = [phantom_spec(1000 + k, k) for k in range(80)]
    tight = [s for s in specs if s.ap_half_width is not None]
    assert 0.5 * TIGHT_FOV_FRACTION * 80 <= len(tight) <= 2 * TIGHT_FOV_FRACTION * 80
    s = next(s for s in tight if s.fov == "lumbar")
    ph = make_phantom(s)
    sem = np.asarray(ph.semantic.data)
    ap_mm = sem.shape[0] * ph.semantic.spacing[0]  # P-I-R
    assert ap_mm <= 2 * s.ap_half_width + 2 * ph.semantic.spacing[0]
    assert (sem == 60).any() and (sem == 61).any() and (sem == 49).any()  # canal and bodies in view


def test_dark_canal_is_the_canal_as_dark_as_cord_and_nothing_without_a_predicted_cord():
    from spineps.training.pseudo_labels import dark_canal

    image, pred, r = _canal_slices()
    pred[:, 3:6][np.broadcast_to(r <= 1.5, (3, 30, 30)).transpose(1, 0, 2)] = 61  # no cord found here
    dark = dark_canal(image, pred, cord=60, canal=61)
    assert (dark[:, 4] == (r <= 4)).all()  # the cord the model missed: dark, not canal
    assert (dark[:, 8] == ((r <= 4) & (r > 1.5))).all()
    assert not dark_canal(image, np.where(pred == 60, 61, pred).astype(np.uint8), cord=60, canal=61).any()
