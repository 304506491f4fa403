"""Accuracy of a semantic model folder (default: the bundled one).

1. Phantoms the model was not trained on (``spineps.synth``, seeds disjoint from training:
   training draws its seeds from ``numpy.random.default_rng(recipe seed)``, these are fixed
   small numbers; several fields of view, input orientations and slice thicknesses): global
   Dice per structure, per case and pooled.
2. The held-out real scans (``spineps.training.semantic.HOLDOUT``): Dice of the one class
   each scan annotates (VB2/VB3 vertebral bodies, IVD discs, SCT cervical cord), restricted
   to the annotated region's bounding box grown by 10 mm (other, unannotated levels of
   the same class are not counted as false positives). Beside the Dice: precision and
   recall, how far the false-positive voxels lie from the annotation (the fraction within
   2 mm: an outline drawn too wide, against more than 5 mm: another structure), and the
   Dice counting only the predicted components that touch the annotation (parts of an
   unannotated neighbour, T12 or S1, inside the 10 mm margin left out).

    .venv/bin/python benchmarks/semantic_accuracy.py [--model FOLDER] [--nprocs 2] [--no-n4]

Prints a table and writes ``benchmarks/results/semantic_accuracy.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spineps.labels import SEMANTIC_BY_VALUE  # noqa: E402

log = logging.getLogger("semantic_accuracy")

DEFAULT_MODEL = REPO / "spineps" / "data" / "models" / "t2w_semantic"
DEFAULT_REAL = REPO.parent / "shared" / "data" / "real"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "semantic_accuracy.json"

#: (seed, fov, spacing of the output arrays, orientation, oblique degrees, randomize contrast)
PHANTOM_CASES: tuple[tuple[int, str, tuple[float, float, float], tuple[str, str, str], float, bool], ...] = (
    (101, "lumbar", (0.75, 0.75, 3.3), ("P", "I", "R"), 0.0, False),
    (102, "thoracolumbar", (1.0, 1.0, 3.0), ("R", "A", "S"), 0.0, False),
    (103, "cervical", (0.8, 0.8, 2.5), ("L", "P", "S"), 8.0, False),
    (104, "whole", (1.5, 1.5, 3.0), ("P", "I", "R"), 0.0, False),
    (105, "lumbar", (1.0, 1.0, 4.0), ("I", "P", "L"), 5.0, True),
    (106, "thoracic", (0.9, 0.9, 3.3), ("A", "S", "R"), 0.0, False),
)
STRUCTURES = (41, 42, 43, 44, 45, 46, 47, 48, 49, 60, 61, 62, 100, 26)


def dice(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _name(v: int) -> str:
    lab = SEMANTIC_BY_VALUE.get(v)
    return lab.abbreviation if lab else str(v)


def phantom_benchmark(seg: Any, cases=PHANTOM_CASES) -> list[dict]:
    from spineps.synth.anatomy import PhantomSpec, make_phantom
    from spineps.synth.render import render_t2w

    out = []
    for seed, fov, spacing, orient, oblique, randomize in cases:
        ph = make_phantom(PhantomSpec(seed=seed, fov=fov, spacing=spacing, orientation=orient, oblique_deg=oblique))
        img = render_t2w(ph, seed=seed, randomize=randomize)
        gt = ph.semantic
        t0 = time.perf_counter()
        pred = seg.segment(img)
        dt = time.perf_counter() - t0
        assert pred.same_grid(img)
        p, g = np.asarray(pred.data), np.asarray(gt.data)
        d = {str(v): dice(p == v, g == v) for v in STRUCTURES}
        fg = dice(p > 0, g > 0)
        out.append({"seed": seed, "fov": fov, "spacing": list(spacing), "orientation": "".join(orient),
                    "oblique_deg": oblique, "randomized_contrast": randomize, "shape": list(img.shape),
                    "seconds": round(dt, 2), "timings": {k: round(v, 2) for k, v in seg.timings.items()},
                    "dice": d, "dice_foreground": fg})
        log.info("phantom %s %s %s: fg Dice %.3f (%.1f s)", seed, fov, "".join(orient), fg or 0, dt)
    return out


def real_benchmark(seg: Any, real_root: Path) -> list[dict]:
    from spineps.geometry.cropping import bbox_of
    from spineps.geometry.io import load_volume
    from spineps.training.semantic import real_cases

    out = []
    for set_name, sub, img_p, lab_p, value in real_cases(real_root, "holdout"):
        img = load_volume(img_p, kind="image")
        lab = load_volume(lab_p, kind="label")
        ann = np.asarray(lab.data).astype(np.int64)
        ann = (ann > 0) if value == 60 else (ann == value)
        t0 = time.perf_counter()
        pred = seg.segment(img)
        dt = time.perf_counter() - t0
        margin = [int(np.ceil(10.0 / s)) for s in img.spacing]
        box = bbox_of(ann, margin=margin)
        p = np.asarray(pred.data)[box] == value
        d = dice(p, ann[box])
        out.append({"set": set_name, "subject": sub, "class": value, "class_name": _name(value),
                    "dice": d, **error_profile(p, ann[box], img.spacing),
                    "seconds": round(dt, 2), "shape": list(img.shape),
                    "timings": {k: round(v, 2) for k, v in seg.timings.items()}})
        log.info("real %s %s %s: Dice %.3f (%.1f s)", set_name, sub, _name(value), d or 0, dt)
    return out


def error_profile(pred: np.ndarray, ann: np.ndarray, spacing: Any) -> dict[str, Optional[float]]:
    """Precision and recall of ``pred`` against ``ann``; of its false-positive voxels the
    fractions within 2 mm and beyond 5 mm of the annotation; the Dice of the predicted
    components (26-connected) that touch the annotation."""
    from scipy import ndimage

    tp, n_pred, n_ann = int((pred & ann).sum()), int(pred.sum()), int(ann.sum())
    fp = pred & ~ann
    near = far = None
    if fp.any() and ann.any():
        dist = ndimage.distance_transform_edt(~ann, sampling=[float(s) for s in spacing])[fp]
        near, far = round(float((dist <= 2.0 + 1e-6).mean()), 3), round(float((dist > 5.0).mean()), 3)
    comp, _ = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    touching = np.isin(comp, np.unique(comp[pred & ann]))  # labels > 0: pred holds them
    d_touch = dice(touching, ann)
    return {"precision": round(tp / n_pred, 4) if n_pred else None, "recall": round(tp / n_ann, 4) if n_ann else None,
            "fp_within_2mm": near, "fp_beyond_5mm": far,
            "dice_touching": round(d_touch, 4) if d_touch is not None else None}


def summarize(ph: list[dict], real: list[dict]) -> dict:
    per_structure = {}
    for v in STRUCTURES:
        vals = [c["dice"][str(v)] for c in ph if c["dice"][str(v)] is not None]
        per_structure[_name(v)] = round(float(np.mean(vals)), 4) if vals else None
    per_set: dict[str, list[float]] = {}
    profile: dict[str, dict[str, list[float]]] = {}
    for c in real:
        if c["dice"] is not None:
            per_set.setdefault(f"{c['set']}:{c['class_name']}", []).append(c["dice"])
        for key in ("precision", "recall", "fp_within_2mm", "fp_beyond_5mm", "dice_touching"):
            if c.get(key) is not None:
                profile.setdefault(f"{c['set']}:{c['class_name']}", {}).setdefault(key, []).append(c[key])
    return {
        "phantom_mean_dice_per_structure": per_structure,
        "phantom_mean_dice_foreground": round(float(np.mean([c["dice_foreground"] for c in ph])), 4) if ph else None,
        "real_mean_dice": {k: round(float(np.mean(v)), 4) for k, v in per_set.items()},
        "real_mean_error_profile": {k: {m: round(float(np.mean(v)), 4) for m, v in d.items()}
                                    for k, d in profile.items()},
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--no-n4", action="store_true")
    ap.add_argument("--skip-phantoms", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from spineps.fsutil import write_json_atomic
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    seg = NnUNetSemanticSegmenter.from_folder(a.model, device="auto", nprocs=a.nprocs, n4=not a.no_n4,
                                              precision="auto", engine="auto")  # the app's defaults
    ph = [] if a.skip_phantoms else phantom_benchmark(seg)
    real = [] if (a.skip_real or not a.real.is_dir()) else real_benchmark(seg, a.real)
    summary = summarize(ph, real)
    result = {"model": seg.provenance(), "n4": not a.no_n4, "summary": summary, "phantoms": ph, "real": real}
    write_json_atomic(a.out, result)

    lines = ["", f"model {seg.name} ({a.model})", "", "phantoms (not in training): mean Dice per structure"]
    for k, v in summary["phantom_mean_dice_per_structure"].items():
        lines.append(f"  {k:6s} {_fmt(v)}")
    lines.append(f"  {'fg':6s} {summary['phantom_mean_dice_foreground']}")
    lines += ["", "held-out real scans (annotated class only)"]
    for c in real:
        lines.append(f"  {c['set']:4s} {c['subject']:18s} {c['class_name']:4s} "
                     f"{_fmt(c['dice'])}  precision {_fmt(c['precision'])} recall {_fmt(c['recall'])}"
                     f"  FP <=2 mm {_fmt(c['fp_within_2mm'])} >5 mm {_fmt(c['fp_beyond_5mm'])}"
                     f"  touching {_fmt(c['dice_touching'])}  {c['seconds']:.1f} s")
    for k, v in summary["real_mean_dice"].items():
        lines.append(f"  mean {k}: {v:.3f}")
    lines.append(f"\nwritten to {a.out}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
