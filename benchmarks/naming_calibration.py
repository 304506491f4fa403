"""Calibration of the level-naming confidence: is a naming of confidence c right c of the time?

    .venv/bin/python benchmarks/naming_calibration.py [--json benchmarks/results/naming_calibration.json]

A naming is *right* when every vertebra of the scan gets its true name (the confidence is
that of the whole naming: the softmax probability of the best candidate window among all
candidates, ``spineps.labeling.levels``).

Cases (no network: each phantom's own semantic mask and anonymous vertebra instances, 2 mm
grid, through the post-processing and ``name_levels``, as ``level_naming_phantoms.py``):

- fields of view with an end in view (lumbar, thoracolumbar, whole, cervical; standard, T13
  and L6 spines), windows of 5-8 vertebrae with neither end in view, and short windows of
  3-4 vertebrae anywhere from C3 to L5 (small fields of view);
- two disjoint seed ranges: the **fit** split (``FIT_SEEDS``) fits the Platt scaling
  ``c = sigmoid(a logit(p) + b)`` per kind of naming ("hard": a sacrum or C2 cue fixed the
  window; "soft": only ribs and sizes), the **check** split (``CHECK_SEEDS``) measures it.
- **VB3** (real, L1-L5 annotated): the participant pipeline's namings of the real validation
  split as ``benchmarks/pipeline_accuracy.py`` recorded them (its JSON; their raw softmax
  probability is ``confidence_raw`` there, or ``confidence`` for a JSON written before
  calibration existed), checked, never fitted on.

Reliability table: confidence bins of width 0.2, per bin the number of namings, their mean
confidence and the fraction right, and the expected calibration error (ECE: the bins'
|fraction right - mean confidence| weighted by their share), for the raw probability and
for the calibrated confidence. The fitted constants go to the JSON;
``spineps.labeling.levels.CONFIDENCE_CALIBRATION`` must hold the same (a test checks).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
FIT_SEEDS = tuple(range(600, 604))
CHECK_SEEDS = tuple(range(700, 704))
WINDOWS_PER_SPLIT = 24
SHORT_PER_SPLIT = 24
BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0 + 1e-9)


@functools.lru_cache(maxsize=None)
def _load_sibling(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"spineps_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _window(rng: Any, shortest: int, longest: int, lo_name: str, hi_name: str) -> tuple[str, str]:
    from spineps.labeling.levels import VARIANTS
    from spineps.labels import vertebra_name, vertebra_value

    seq = list(VARIANTS["standard"])
    lo, hi = seq.index(vertebra_value(lo_name)), seq.index(vertebra_value(hi_name))
    length = int(rng.integers(shortest, longest + 1))
    start = int(rng.integers(lo, hi - length + 2))
    return vertebra_name(seq[start]), vertebra_name(seq[start + length - 1])


def case_specs(seeds: Sequence[int], split_offset: int) -> list[dict[str, Any]]:
    """The phantom specs of one split (keyword arguments of ``PhantomSpec`` plus a ``kind``)."""
    import numpy as np

    lnp = _load_sibling("level_naming_phantoms")
    specs: list[dict[str, Any]] = []
    for fov, variant in lnp.END_KINDS:
        for seed in seeds:
            specs.append({"kind": f"ends/{fov}/{variant}", "seed": seed, "fov": fov,
                          "t13": variant == "t13", "l6": variant == "l6"})
    rng = np.random.default_rng(split_offset)
    for k in range(WINDOWS_PER_SPLIT):
        top, bottom = _window(rng, 5, 8, "C3", "L4")
        specs.append({"kind": "window", "seed": split_offset + k, "top": top, "bottom": bottom})
    for k in range(SHORT_PER_SPLIT):
        top, bottom = _window(rng, 3, 4, "C3", "L5")
        specs.append({"kind": "short", "seed": split_offset + 100 + k, "top": top, "bottom": bottom})
    return specs


def run_cases(specs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Name every case; per case the raw probability, its kind and whether it was right."""
    from spineps.labeling.levels import confidence_kind, name_levels
    from spineps.labels import vertebra_name

    lnp = _load_sibling("level_naming_phantoms")
    rows = []
    for spec in specs:
        kw = {k: v for k, v in spec.items() if k != "kind"}
        verts, s3, i3 = lnp._case(**kw)
        naming = name_levels(s3, i3)
        got = lnp._names(naming)
        rows.append({**spec, "right": got == verts, "rule_used": naming.rule_used,
                     "calibration_kind": confidence_kind(naming.rule_used),
                     "p_raw": round(float(naming.evidence["confidence_raw"]), 6),
                     "truth": [vertebra_name(v) for v in verts], "named": [vertebra_name(v) for v in got]})
        print(f"  {spec['kind']:<28} seed {spec['seed']}: {'right' if rows[-1]['right'] else 'WRONG'} "
              f"p={rows[-1]['p_raw']:.3f} ({naming.rule_used})", flush=True)
    return rows


def vb3_cases(pipeline_json: Path) -> list[dict[str, Any]]:
    """The VB3 / VB3extra namings recorded by ``pipeline_accuracy.py``."""
    from spineps.labeling.levels import confidence_kind

    if not pipeline_json.is_file():
        return []
    data = json.loads(pipeline_json.read_text())
    rows = []
    for r in data.get("real", []):
        if r.get("set") not in ("VB3", "VB3extra") or "naming" not in r:
            continue
        bodies = [b for b in r.get("bodies", []) if b.get("level_correct") is not None]
        if not bodies:
            continue
        nm = r["naming"]
        raw = nm.get("confidence_raw", nm.get("confidence"))
        if raw is None:
            continue
        rows.append({"kind": "vb3", "subject": r["subject"], "right": all(b["level_correct"] for b in bodies),
                     "rule_used": nm.get("rule"), "calibration_kind": confidence_kind(str(nm.get("rule"))),
                     "p_raw": float(raw), "levels": nm.get("levels")})
    return rows


def fit_platt(ps: Sequence[float], ys: Sequence[bool], l2: float = 0.05) -> tuple[float, float]:
    """(a, b) of ``sigmoid(a logit(p) + b)`` by maximum likelihood with a small pull towards
    the identity (``l2 ((a - 1)^2 + b^2)``: a split where every naming is right must not push
    ``b`` to infinity)."""
    import numpy as np
    from scipy.optimize import minimize

    p = np.clip(np.asarray(ps, float), 1e-6, 1 - 1e-6)
    x = np.log(p / (1 - p))
    y = np.asarray(ys, float)

    def loss(theta: np.ndarray) -> float:
        z = theta[0] * x + theta[1]
        ll = y * -np.logaddexp(0, -z) + (1 - y) * -np.logaddexp(0, z)
        return float(-ll.sum() + l2 * ((theta[0] - 1) ** 2 + theta[1] ** 2))

    res = minimize(loss, np.array([1.0, 0.0]), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    return round(float(res.x[0]), 4), round(float(res.x[1]), 4)


def reliability(confs: Sequence[float], ys: Sequence[bool]) -> dict[str, Any]:
    """Bins of width 0.2: n, mean confidence, fraction right; and the ECE."""
    bins = []
    n = len(confs)
    ece = 0.0
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = [(c, y) for c, y in zip(confs, ys) if lo <= c < hi]
        if not sel:
            bins.append({"bin": f"{lo:.1f}-{min(hi, 1.0):.1f}", "n": 0, "mean_confidence": None, "right": None})
            continue
        mc = sum(c for c, _ in sel) / len(sel)
        acc = sum(1 for _, y in sel if y) / len(sel)
        ece += len(sel) / n * abs(acc - mc)
        bins.append({"bin": f"{lo:.1f}-{min(hi, 1.0):.1f}", "n": len(sel), "mean_confidence": round(mc, 4),
                     "right": round(acc, 4)})
    return {"n": n, "right": sum(1 for y in ys if y), "ece": round(ece, 4) if n else None, "bins": bins}


def evaluate(rows: list[dict[str, Any]], params: dict[str, tuple[float, float]]) -> dict[str, Any]:
    from spineps.labeling.levels import calibrated_confidence

    ys = [bool(r["right"]) for r in rows]
    raw = [float(r["p_raw"]) for r in rows]
    cal = [calibrated_confidence(float(r["p_raw"]), r["calibration_kind"], params) for r in rows]
    for r, c in zip(rows, cal):
        r["confidence"] = round(c, 4)
    out = {"raw": reliability(raw, ys), "calibrated": reliability(cal, ys)}
    for kind in sorted({r["calibration_kind"] for r in rows}):
        sel = [i for i, r in enumerate(rows) if r["calibration_kind"] == kind]
        out[f"calibrated_{kind}"] = reliability([cal[i] for i in sel], [ys[i] for i in sel])
    return out


def _table(name: str, rel: dict[str, Any]) -> None:
    print(f"{name}: {rel['right']}/{rel['n']} right, ECE {rel['ece']}")
    for b in rel["bins"]:
        if b["n"]:
            print(f"   {b['bin']}  n={b['n']:<3} mean confidence {b['mean_confidence']:.3f}  right {b['right']:.3f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "naming_calibration.json")
    ap.add_argument("--pipeline-json", type=Path, default=REPO / "benchmarks" / "results" / "pipeline_accuracy.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from spineps.labeling.levels import NO_CUE_CONFIDENCE

    t0 = time.time()
    print("fit split:")
    fit = run_cases(case_specs(FIT_SEEDS, 10_000))
    print("check split:")
    check = run_cases(case_specs(CHECK_SEEDS, 20_000))
    vb3 = vb3_cases(args.pipeline_json)
    params: dict[str, tuple[float, float]] = {}
    for kind in ("hard", "soft"):
        sel = [r for r in fit if r["calibration_kind"] == kind]
        params[kind] = fit_platt([r["p_raw"] for r in sel], [r["right"] for r in sel]) if sel else (1.0, 0.0)
    out = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
           "fit_seeds": list(FIT_SEEDS), "check_seeds": list(CHECK_SEEDS),
           "calibration": {k: list(v) for k, v in params.items()}, "no_cue_confidence": NO_CUE_CONFIDENCE,
           "fit": evaluate(fit, params), "check": evaluate(check, params),
           "vb3": evaluate(vb3, params) if vb3 else None,
           "pipeline_json": str(args.pipeline_json.relative_to(REPO)) if args.pipeline_json.is_relative_to(REPO)
           else str(args.pipeline_json),
           "cases": {"fit": fit, "check": check, "vb3": vb3}}
    out["seconds"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"calibration (a, b): {params}")
    for split in ("fit", "check", "vb3"):
        if out[split] is None:
            continue
        _table(f"{split}, raw", out[split]["raw"])
        _table(f"{split}, calibrated", out[split]["calibrated"])
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
