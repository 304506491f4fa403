"""The training recipe's pure parts: label conversion with partial labels, the plans edit,
and the config the bundled folder gets (follows the release rules)."""

from __future__ import annotations

import json

import numpy as np

from spineps.models.folder import read_model_config
from spineps.training.semantic import (IGNORE_INDEX, LABEL_ORDER, MODEL_ORIENTATION, Recipe, inference_config,
                                       partial_label, plans_dict, real_cases, small_plans, values_to_indices)


def test_values_to_indices_maps_community_values_and_unknowns_to_ignore():
    m = np.array([[[0, 41, 49, 100, 26, 60, 61, 62, 52]]], dtype=np.uint8)
    idx = values_to_indices(m)
    assert idx[0, 0, 0] == 0
    for pos, v in enumerate(m[0, 0, 1:8], start=1):
        assert LABEL_ORDER[idx[0, 0, pos] - 1] == v
    assert idx[0, 0, 8] == IGNORE_INDEX  # 52 is not a network class


def test_partial_label_anterior_background_annotated_class_rest_ignore():
    P, I, R = 40, 30, 6
    ann = np.zeros((P, I, R), bool)
    ann[20:30, 5:10, 2:4] = True  # a "body"
    ann[22:32, 15:20, 2:4] = True  # another one, a bit more posterior
    lab = partial_label(ann, 49, spacing_p=1.0, margin_mm=5.0)
    body = LABEL_ORDER.index(49) + 1
    assert (lab[ann] == body).all()
    # clearly anterior (small P index) inside the annotated I range: background
    assert (lab[0:14, 5:10, :] == 0).all()
    assert (lab[0:16, 15:20, :] == 0).all()
    # between the bodies (the disc rows) the threshold is interpolated
    assert (lab[0:14, 12, :] == 0).all()
    # posterior of the bodies, the margin zone, and rows outside the annotated range: unknown
    assert (lab[35:, 5:10, :] == IGNORE_INDEX).all()
    assert (lab[16:20, 5:10, :] == IGNORE_INDEX).all()
    assert (lab[:, 0:5, :] == IGNORE_INDEX).all() and (lab[:, 20:, :] == IGNORE_INDEX).all()


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
