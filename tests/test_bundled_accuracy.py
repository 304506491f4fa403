"""Accuracy floors of the bundled models, so that a worse model fails CI.

Per class on held-out phantoms (seeds training never draws), per set on a fixed subset of the
real validation split (``spineps.training.semantic.HOLDOUT``, never trained on) where
``../shared/data/real`` is present, and through the whole pipeline on one real VB3 scan
(every annotated body found once, level names right). The full measurement, on every
held-out scan, is ``benchmarks/semantic_accuracy.py`` and ``benchmarks/pipeline_accuracy.py``;
the floors here sit below what those measured for the packaged weights (model card), with
room for CPU nondeterminism.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SEMANTIC = REPO / "spineps" / "data" / "models" / "t2w_semantic"
INSTANCE = REPO / "spineps" / "data" / "models" / "instance"

#: Dice floors per community value, pooled over the two phantoms below
PHANTOM_FLOORS: dict[int, float] = {
    41: 0.78, 42: 0.83, 43: 0.77, 44: 0.76, 45: 0.71, 46: 0.60, 47: 0.67, 48: 0.68,
    49: 0.90, 60: 0.87, 61: 0.87, 62: 0.65, 100: 0.86, 26: 0.88,
}  # measured for the packaged weights (round 6, same order):
#   0.822 0.873 0.813 0.801 0.749 0.648 0.709 0.725 0.939 0.921 0.912 0.684 0.901 0.932
#: (set, subject, annotated value) -> Dice floor inside the annotation's box + 10 mm
REAL_FLOORS: dict[tuple[str, str, int], float] = {
    ("VB2", "sub-vb212", 49): 0.82,  # measured 0.861 (benchmarks/results/semantic_accuracy.json)
    ("VB3", "sub-vb301", 49): 0.81,  # 0.855
    ("VB3extra", "sub-vb318", 49): 0.85,  # 0.899
    ("IVD", "sub-ivd42", 100): 0.73,  # 0.777
    ("SCT", "sub-sctcervical", 60): 0.55,  # 0.689 (nearest neighbour 0.696; round 4 0.512, round 3 0.252)
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


pa = _load("spineps_pipeline_accuracy", REPO / "benchmarks" / "pipeline_accuracy.py")


@pytest.fixture(scope="module")
def semantic():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    return NnUNetSemanticSegmenter.from_folder(SEMANTIC, device="cpu", nprocs=2, precision="auto", engine="auto")


@pytest.mark.slow
def test_every_class_on_held_out_phantoms(semantic):
    from spineps.synth.anatomy import PhantomSpec, make_phantom
    from spineps.synth.render import render_t2w

    inter = {v: 0 for v in PHANTOM_FLOORS}
    total = {v: 0 for v in PHANTOM_FLOORS}
    for seed, fov, spacing in ((4242, "whole", (1.2, 1.2, 3.3)), (4243, "lumbar", (0.9, 0.9, 3.3))):
        ph = make_phantom(PhantomSpec(seed=seed, fov=fov, spacing=spacing, orientation=("P", "I", "R")))
        img = render_t2w(ph, seed=seed, supersample=False)
        pred, gt = np.asarray(semantic.segment(img).data), np.asarray(ph.semantic.data)
        for v in PHANTOM_FLOORS:
            inter[v] += int(np.logical_and(pred == v, gt == v).sum())
            total[v] += int((pred == v).sum() + (gt == v).sum())
    dice = {v: 2 * inter[v] / max(total[v], 1) for v in PHANTOM_FLOORS}
    low = {v: round(d, 3) for v, d in dice.items() if d < PHANTOM_FLOORS[v]}
    assert not low, f"below the floors {PHANTOM_FLOORS}: {low} (all: { {v: round(d, 3) for v, d in dice.items()} })"


@pytest.mark.slow
@pytest.mark.real_data
def test_real_validation_subset_per_set(semantic, real_data):
    from spineps.geometry.io import load_volume
    from spineps.training.semantic import HOLDOUT, real_cases

    cases = {(s, sub): (img, lab, v) for s, sub, img, lab, v in real_cases(real_data, "holdout")}
    got = {}
    for set_name, sub, value in REAL_FLOORS:
        assert sub in HOLDOUT[set_name], f"{sub} is not in the validation split"
        if (set_name, sub) not in cases:
            pytest.skip(f"{set_name}/{sub} missing under {real_data}")
        img_p, lab_p, _ = cases[(set_name, sub)]
        img = load_volume(img_p, kind="image")
        ann = np.asarray(load_volume(lab_p, kind="label").data).astype(np.int64)
        ann = (ann > 0) if value == 60 else (ann == value)
        pred = np.asarray(semantic.segment(img).data)
        got[(set_name, sub, value)] = pa._box_dice(pred == value, ann, img.spacing)
    low = {k: round(d or 0.0, 3) for k, d in got.items() if (d or 0.0) < REAL_FLOORS[k]}
    assert not low, f"below the floors: {low} (all: { {k: round(d or 0, 3) for k, d in got.items()} })"


@pytest.mark.slow
@pytest.mark.real_data
def test_pipeline_finds_every_vb3_body_once_and_names_it(semantic, real_data):
    from spineps.geometry.io import load_volume
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.pipeline import segment_scan

    folder = real_data / "VB3"
    # sub-vb301: the round-2 model took its S1 for a vertebra (every name one level off); round 3
    # learnt S1 as sacrum below an annotated L5 (benchmarks/results/pipeline_accuracy.json)
    img_p, vert_p = folder / "sub-vb301_MR.nii.gz", folder / "sub-vb301_desc-vert_dseg.nii.gz"
    if not img_p.is_file():
        pytest.skip(f"{img_p} missing")
    ins = UNetInstanceSegmenter.from_folder(INSTANCE, device="cpu", nprocs=2, precision="auto", engine="auto")
    res = segment_scan(load_volume(img_p, kind="image"), semantic, ins, measure=False)
    ref = np.asarray(load_volume(vert_p, kind="label").data).astype(np.int64)
    rows = pa.per_body(ref, np.asarray(res.semantic.data).astype(np.int64),
                       np.asarray(res.instance.data).astype(np.int64), levels=True)
    assert len(rows) == 5
    assert all(r["found_once"] for r in rows), rows
    assert all(r["level_correct"] for r in rows), (rows, res.naming)
    assert min(r["precision"] for r in rows) > PIPELINE_BODY_FLOOR
    assert min(r["recall"] for r in rows) > PIPELINE_BODY_FLOOR


#: per-body precision and recall floor on sub-vb301 (whole pipeline; measured min 0.82 / 0.82)
PIPELINE_BODY_FLOOR = 0.76
