"""Accuracy of the whole pipeline (semantic phase, instance phase, post-processing, level
naming) with the bundled models (or the folders given), on the fixed real validation split
and on held-out phantoms.

    .venv/bin/python benchmarks/pipeline_accuracy.py [--semantic-model DIR] [--instance-model DIR]
        [--nprocs 2] [--skip-real] [--skip-phantoms] [--json benchmarks/results/pipeline_accuracy.json]

Real validation split (``spineps.training.semantic.HOLDOUT``; never trained on):

- VB2 / VB3 / VB3extra (vertebral bodies annotated as instances): global body Dice inside the
  annotated bodies' bounding box + 10 mm; per annotated body the predicted vertebra whose body
  voxels overlap it most: its body's precision and recall against the annotation; "found
  exactly once" = exactly one predicted vertebra's body has IoU >= 0.5 with it and no other
  predicted vertebra holds >= 20 % of it; on VB3 / VB3extra (levels L1-L5 annotated; VB2's
  level values are known to be wrong) the level name of the matched vertebra.
- IVD (lumbar discs): disc Dice inside the discs' bounding box + 10 mm.
- SCT cervical T2w (cord mask): cord Dice inside the cord's bounding box + 10 mm.

Held-out phantoms (``spineps.synth``, seeds never drawn by training): one per field of view,
rendered as realistic T2w (level names against the phantom truth: exact match of every
matched vertebra, IoU >= 0.5, ``spineps.evaluate.matching``), split by whether the sacrum is
in view.

Prints tables and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("pipeline_accuracy")

DEFAULT_SEMANTIC = REPO / "spineps" / "data" / "models" / "t2w_semantic"
DEFAULT_INSTANCE = REPO / "spineps" / "data" / "models" / "instance"
DEFAULT_REAL = REPO.parent / "shared" / "data" / "real"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pipeline_accuracy.json"

#: (seed, field of view, spacing of the output arrays (P, I, R order of the orientation), orientation)
PHANTOM_CASES: tuple[tuple[int, str, tuple[float, float, float], tuple[str, str, str]], ...] = (
    (201, "lumbar", (0.9, 0.9, 3.3), ("P", "I", "R")),
    (202, "thoracolumbar", (1.0, 1.0, 3.0), ("R", "A", "S")),
    (203, "cervical", (0.8, 0.8, 2.5), ("P", "I", "R")),
    (204, "whole", (1.2, 1.2, 3.3), ("P", "I", "R")),
    (205, "thoracic", (0.9, 0.9, 3.3), ("A", "S", "R")),
    (206, "cervicothoracic", (1.0, 1.0, 3.0), ("P", "I", "R")),
    (207, "lumbar", (1.1, 1.1, 4.0), ("L", "P", "S")),
    (208, "thoracolumbar", (0.9, 0.9, 3.5), ("P", "I", "R")),
)


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    sa, sb = int(a.sum()), int(b.sum())
    return None if sa + sb == 0 else 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def _box_dice(pred: np.ndarray, ann: np.ndarray, spacing: tuple[float, ...]) -> Optional[float]:
    from spineps.geometry.cropping import bbox_of

    box = bbox_of(ann, margin=[int(np.ceil(10.0 / s)) for s in spacing])
    return dice(pred[box], ann[box])


def per_body(ref_inst: np.ndarray, pred_sem: np.ndarray, pred_inst: np.ndarray, *, levels: bool) -> list[dict]:
    """One row per annotated body: the best-overlapping predicted vertebra's body
    precision / recall, whether the body was found exactly once, and (``levels``) whether the
    predicted vertebra carries the annotated level."""
    from spineps.labels import BODY

    pred_body = np.where(pred_sem == BODY, pred_inst, 0)
    pred_ids, pred_sizes = np.unique(pred_body[pred_body > 0], return_counts=True)
    size_of = dict(zip(pred_ids.tolist(), pred_sizes.tolist()))
    rows = []
    for v in sorted(int(x) for x in np.unique(ref_inst) if x > 0):
        ref = ref_inst == v
        n_ref = int(ref.sum())
        hit, counts = np.unique(pred_body[ref & (pred_body > 0)], return_counts=True)
        row: dict[str, Any] = {"reference": v, "voxels": n_ref}
        if not hit.size:
            rows.append({**row, "matched": None, "precision": 0.0, "recall": 0.0, "found_once": False,
                         "level_correct": False if levels else None})
            continue
        best = int(hit[np.argmax(counts)])
        inter = int(counts.max())
        ious = [c / (n_ref + size_of[int(h)] - c) for h, c in zip(hit, counts)]
        n_iou = sum(1 for x in ious if x >= 0.5)
        holders = sum(1 for c in counts if c >= 0.2 * n_ref)
        rows.append({**row, "matched": best, "precision": inter / size_of[best], "recall": inter / n_ref,
                     "found_once": n_iou == 1 and holders == 1,
                     "level_correct": (best == v) if levels else None})
    return rows


def real_benchmark(sem: Any, ins: Any, real_root: Path) -> list[dict]:
    from spineps.geometry.io import load_volume
    from spineps.pipeline import segment_scan
    from spineps.training.semantic import real_cases

    out = []
    for set_name, sub, img_p, lab_p, value in real_cases(real_root, "holdout"):
        img = load_volume(img_p, kind="image")
        ann_all = np.asarray(load_volume(lab_p, kind="label").data).astype(np.int64)
        ann = (ann_all > 0) if value == 60 else (ann_all == value)
        t0 = time.perf_counter()
        res = segment_scan(img, sem, ins, measure=False)
        dt = time.perf_counter() - t0
        ps = np.asarray(res.semantic.data).astype(np.int64)
        row: dict[str, Any] = {"set": set_name, "subject": sub, "class": value, "seconds": round(dt, 2),
                               "dice": _box_dice(ps == value, ann, img.spacing)}
        if value == 49 and res.instance is not None:
            vert = lab_p.with_name(lab_p.name.replace("desc-spine", "desc-vert"))
            ref_inst = np.asarray(load_volume(vert, kind="label").data).astype(np.int64)
            bodies = per_body(ref_inst, ps, np.asarray(res.instance.data).astype(np.int64),
                              levels=set_name in ("VB3", "VB3extra"))
            row["bodies"] = bodies
            row["naming"] = {k: res.naming.get(k) for k in ("rule", "confidence", "levels") if k in res.naming}
            row["naming"]["confidence_raw"] = res.naming.get("evidence", {}).get("confidence_raw")
        out.append(row)
        log.info("real %s %s: Dice %s (%.1f s)", set_name, sub, _fmt(row["dice"]), dt)
    return out


def phantom_benchmark(sem: Any, ins: Any, cases=PHANTOM_CASES) -> list[dict]:
    from spineps.evaluate.matching import level_naming, match_instances
    from spineps.labels import VERTEBRA_VALUES
    from spineps.pipeline import segment_scan
    from spineps.synth.anatomy import PhantomSpec, make_phantom
    from spineps.synth.render import render_t2w

    out = []
    for seed, fov, spacing, orient in cases:
        ph = make_phantom(PhantomSpec(seed=seed, fov=fov, spacing=spacing, orientation=orient))
        img = render_t2w(ph, seed=seed)
        t0 = time.perf_counter()
        res = segment_scan(img, sem, ins, measure=False)
        dt = time.perf_counter() - t0
        gt = np.asarray(ph.instance.data).astype(np.int64)
        sacrum = bool((np.asarray(ph.semantic.data) == 26).any())
        ref = np.where(np.isin(gt, list(VERTEBRA_VALUES)), gt, 0)
        pred_i = np.asarray(res.instance.data).astype(np.int64) if res.instance is not None else np.zeros_like(gt)
        pred = np.where(np.isin(pred_i, list(VERTEBRA_VALUES)), pred_i, 0)
        m = match_instances(ref, pred)
        ln = level_naming(m)
        out.append({"seed": seed, "fov": fov, "sacrum_in_view": sacrum, "reference_vertebrae": len(m.ref_ids),
                    "matched": m.tp, "correct": ln.n_correct, "fp": m.fp, "fn": m.fn, "diagnosis": ln.diagnosis,
                    "rule": res.naming.get("rule"), "seconds": round(dt, 2)})
        log.info("phantom %s %s: %d/%d named right (%s)", seed, fov, ln.n_correct, m.tp, ln.diagnosis)
    return out


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def summarize(real: list[dict], ph: list[dict]) -> dict:
    s: dict[str, Any] = {}
    by_set: dict[str, list[float]] = {}
    for r in real:
        if r["dice"] is not None:
            by_set.setdefault(f"{r['set']}:{r['class']}", []).append(r["dice"])
    s["real_dice"] = {k: round(float(np.mean(v)), 4) for k, v in by_set.items()}
    bodies = [b for r in real for b in r.get("bodies", [])]
    if bodies:
        s["bodies"] = len(bodies)
        s["body_precision_mean"] = round(float(np.mean([b["precision"] for b in bodies])), 4)
        s["body_recall_mean"] = round(float(np.mean([b["recall"] for b in bodies])), 4)
        s["bodies_found_once"] = sum(1 for b in bodies if b["found_once"])
        lv = [b for b in bodies if b["level_correct"] is not None]
        s["vb3_levels_correct"] = f"{sum(1 for b in lv if b['level_correct'])}/{len(lv)}"
    vb = [d for k, v in by_set.items() if k.endswith(":49") for d in v]
    if vb:
        s["real_body_dice_mean"] = round(float(np.mean(vb)), 4)
    for key, sel in (("phantom_levels_sacrum_in_view", True), ("phantom_levels_no_sacrum", False)):
        rows = [p for p in ph if p["sacrum_in_view"] == sel]
        if rows:
            s[key] = f"{sum(p['correct'] for p in rows)}/{sum(p['matched'] for p in rows)}"
    if ph:
        s["phantom_levels_all"] = f"{sum(p['correct'] for p in ph)}/{sum(p['matched'] for p in ph)}"
    return s


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--semantic-model", type=Path, default=DEFAULT_SEMANTIC)
    ap.add_argument("--instance-model", type=Path, default=DEFAULT_INSTANCE)
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-phantoms", action="store_true")
    ap.add_argument("--json", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from spineps.fsutil import write_json_atomic
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    torch.set_num_threads(a.nprocs)
    # the app's defaults: precision and engine "auto"
    sem = NnUNetSemanticSegmenter.from_folder(a.semantic_model, device="cpu", nprocs=a.nprocs, precision="auto",
                                              engine="auto")
    ins = UNetInstanceSegmenter.from_folder(a.instance_model, device="cpu", nprocs=a.nprocs, precision="auto",
                                            engine="auto")
    t0 = time.time()
    real = [] if a.skip_real or not a.real.is_dir() else real_benchmark(sem, ins, a.real)
    ph = [] if a.skip_phantoms else phantom_benchmark(sem, ins)
    summary = summarize(real, ph)
    print(json.dumps(summary, indent=1))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, {"semantic_model": str(a.semantic_model.resolve().relative_to(REPO))
                               if a.semantic_model.resolve().is_relative_to(REPO) else str(a.semantic_model),
                               "instance_model": str(a.instance_model),
                               "date": time.strftime("%Y-%m-%d"), "minutes": round((time.time() - t0) / 60, 1),
                               "summary": summary, "real": real, "phantoms": ph})
    return 0


if __name__ == "__main__":
    sys.exit(main())
