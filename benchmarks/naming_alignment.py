"""Whole-spine stations and spinal alignment on phantoms (issue 18).

    .venv/bin/python benchmarks/naming_alignment.py [--instance-model DIR] [--nprocs 1]
        [--out benchmarks/results/naming_alignment.json]

1. **Level naming per station.** Whole-spine phantoms cut into stations in several ways
   (``spineps.synth.stations``: overlapping with a patient shift and a different spacing per
   station, abutting, with a gap). For each station the fraction of its vertebrae (reference
   vertebra voxels, majority per vertebra) that carry their true name, named (a) alone, each
   station by ``name_levels`` (what the pipeline did before), and (b) as one session
   (``pipeline.name_stations``). Two sources of instance masks: the reference masks
   anonymised (the names taken away: the station logic alone), and the bundled instance
   model's prediction on the reference semantic masks (``predict_station``, as
   ``spineps instance`` runs it). The semantic model is not used (it is being retrained).
2. **Alignment errors.** Measured minus true (``spineps.synth.truth``) for the sagittal curves
   (kyphosis T4-T12, lordosis L1-L5, L1-S1, C2-C7), the largest coronal Cobb angle, the body
   wedge angles and the slips of phantoms with curves, scoliosis, wedged bodies and slips,
   on the reference masks and on the instance model's masks.

Writes the JSON atomically and prints a summary. Numbers in the README (Outputs: stations and
alignment) come from this file's JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_INSTANCE = REPO / "spineps" / "data" / "models" / "instance"

# the session layouts: (name, spec kwargs, even_cuts kwargs)
SESSIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("overlap40-shift-spacings", dict(seed=2, fov="whole", spacing=(2.0, 2.0, 3.5)),
     dict(n=3, overlap_mm=40.0, spacings=[None, (1.5, 1.5, 3.0), (2.5, 2.5, 4.0)],
          shifts=[(0, 0, 0), (0, 3.0, -5.0), (0, 0, 0)])),
    ("overlap25", dict(seed=7, fov="whole", spacing=(1.8, 1.8, 3.5)), dict(n=3, overlap_mm=25.0)),
    ("abut", dict(seed=11, fov="whole", spacing=(2.0, 2.0, 3.5)), dict(n=3, overlap_mm=0.0)),
    ("overlap60-shift8", dict(seed=5, fov="whole", spacing=(2.0, 2.0, 4.0)),
     dict(n=2, overlap_mm=60.0, shifts=[(0, 0, 0), (1.0, -2.0, 8.0)])),
    ("gap30", dict(seed=3, fov="whole", spacing=(2.0, 2.0, 3.5)), dict(n=3, overlap_mm=-30.0)),
]

ALIGNMENT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("lumbar-slips-wedge", dict(seed=3, fov="lumbar", spacing=(0.9, 0.9, 3.0), oblique_deg=6.0,
                                slips=(("L4", 7.0), ("L2", -4.0), ("L5", 3.0)), wedges=(("L1", 14.0),))),
    ("whole-scoliosis", dict(seed=5, fov="whole", spacing=(0.9, 0.9, 3.0), orientation=("A", "S", "L"),
                             oblique_deg=4.0, scoliosis=15.0, wedges=(("T7", 8.0),))),
    ("thoracolumbar-scoliosis-slip", dict(seed=14, fov="thoracolumbar", spacing=(0.75, 0.75, 3.5),
                                          orientation=("S", "A", "R"), scoliosis=10.0, slips=(("L4", 5.0),))),
]


def _anonymous(instance):
    from spineps.labels import SACRUM, VERTEBRA_ORDER

    inst = np.asarray(instance.data)
    vals = [v for v in VERTEBRA_ORDER if v != SACRUM and (inst == v).any()]
    out = np.zeros(inst.shape, np.uint16)
    for k, v in enumerate(vals, start=1):
        out[inst == v] = k
    return instance.with_data(out)


def _level_accuracy(truth: np.ndarray, named: np.ndarray) -> tuple[int, int]:
    """(vertebrae right, vertebrae) of a station: a vertebra is right when most of its
    reference voxels carry its name."""
    from spineps.labels import SACRUM

    right = total = 0
    for v in np.unique(truth[(truth > 0) & (truth < 100) & (truth != SACRUM)]):
        got = named[truth == v]
        if got.size < 50:  # a sliver at the border
            continue
        total += 1
        right += int(np.bincount(got.astype(np.int64)).argmax() == v)
    return right, total


class _ReferenceInstances:
    """The instance phase answered by the reference masks (their names taken away)."""

    name = "reference-anonymised"

    def __init__(self, instance):
        self.instance = instance

    def segment(self, semantic):
        from spineps.models.protocols import VertebraPrediction

        return VertebraPrediction(vertebrae=_anonymous(self.instance))

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "version": "reference"}


def _alone(pred) -> np.ndarray:
    from spineps.labeling.levels import name_levels
    from spineps.pipeline import finish_naming

    a = pred.anon
    return np.asarray(finish_naming(a, name_levels(a.semantic, a.instance, centroids=a.centroids)).instance.data)


def _session_rows(model_of: Callable[[Any], Any], source: str) -> list[dict[str, Any]]:
    from spineps.pipeline import name_stations, predict_station
    from spineps.synth.anatomy import PhantomSpec
    from spineps.synth.stations import cut_stations, even_cuts

    rows = []
    for name, spec_kw, cut_kw in SESSIONS:
        spec = PhantomSpec(**spec_kw)
        stations = cut_stations(spec, even_cuts(spec, **cut_kw))
        t0 = time.perf_counter()
        preds = [predict_station(f"chunk-{k}", st.semantic, model_of(st)) for k, st in enumerate(stations, 1)]
        results, session = name_stations(preds, measure=False)
        for k, (st, p) in enumerate(zip(stations, preds), start=1):
            truth = np.asarray(st.instance.data)
            r_alone, n = _level_accuracy(truth, _alone(p))
            r_sess, _ = _level_accuracy(truth, np.asarray(results[p.name].instance.data))
            rows.append({"source": source, "session": name, "station": k, "vertebrae": n, "right_alone": r_alone,
                         "right_session": r_sess, "named_alone": results[p.name].stations["NamedAlone"],
                         "confidence": results[p.name].naming.get("confidence")})
        rows[-1]["seconds_session"] = round(time.perf_counter() - t0, 1)
        print(f"{source:9s} {name:26s} " + " ".join(f"{r['right_session']}/{r['vertebrae']}(alone {r['right_alone']})"
                                                     for r in rows if r["session"] == name and r["source"] == source))
    return rows


def _alignment_errors(measured, truth: dict[str, Any], meta: dict[str, Any]) -> dict[str, list[float]]:
    al = measured.alignment
    keys = {"T4-T12": "kyphosis_T4_T12", "L1-L5": "lordosis_L1_L5", "L1-S1": "lordosis_L1_S1",
            "C2-C7": "lordosis_C2_C7"}
    err: dict[str, list[float]] = {"curve_deg": [], "cobb_deg": [], "wedge_deg": [], "slip_mm": []}
    for lv in al.values:
        if not math.isfinite(lv.value):
            continue
        if lv.structure == "spine" and lv.level in keys and truth.get(keys[lv.level]) is not None:
            err["curve_deg"].append(lv.value - truth[keys[lv.level]])
        elif lv.measure == "cobb_deg":
            err["cobb_deg"].append(lv.value - truth["cobb"])
        elif lv.measure == "wedge_angle_deg" and lv.structure == "body" and lv.level in truth["wedge"]:
            err["wedge_deg"].append(lv.value - truth["wedge"][lv.level])
        elif lv.measure == "slip_mm" and lv.level in truth["slip"]:
            err["slip_mm"].append(lv.value - truth["slip"][lv.level][0])
    return err


def _alignment_rows(instance_model: Optional[Any]) -> list[dict[str, Any]]:
    from spineps.labels import vertebra_name
    from spineps.measure.scan import measure_scan
    from spineps.pipeline import segment_from_semantic
    from spineps.synth.anatomy import PhantomSpec, make_phantom
    from spineps.synth.truth import alignment_truth

    rows = []
    for name, kw in ALIGNMENT_CASES:
        ph = make_phantom(PhantomSpec(**kw))
        sources = ["reference"] + (["model"] if instance_model is not None else [])
        for source in sources:
            m = (measure_scan(ph.semantic_split(), ph.instance, {"rule": "sacrum"}) if source == "reference"
                 else segment_from_semantic(ph.semantic, instance_model).measurements)
            if m is None or m.alignment is None:
                rows.append({"case": name, "source": source, "error": "not measured"})
                continue
            whole = [vertebra_name(v) for v, bp in m.alignment.planes.items()
                     if (bp.superior is not None or v == 2) and (bp.inferior is not None or v == 26)]
            err = _alignment_errors(m, alignment_truth(ph.meta, whole), ph.meta)
            rows.append({"case": name, "source": source,
                         **{k: {"n": len(v), "mean_abs": round(float(np.mean(np.abs(v))), 3) if v else None,
                                "max_abs": round(float(np.max(np.abs(v))), 3) if v else None} for k, v in err.items()}})
            print(f"alignment {name:30s} {source:9s} " + " ".join(
                f"{k} max {v['max_abs']} (n={v['n']})" for k, v in rows[-1].items() if isinstance(v, dict)))
    return rows


def _summary(rows: list[dict[str, Any]], arows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in sorted({r["source"] for r in rows}):
        sel = [r for r in rows if r["source"] == source]
        joined = [r for r in sel if not r["named_alone"]]
        n = sum(r["vertebrae"] for r in sel)
        out[source] = {
            "stations": len(sel), "vertebrae": n,
            "level_accuracy_session": round(sum(r["right_session"] for r in sel) / n, 4),
            "level_accuracy_alone": round(sum(r["right_alone"] for r in sel) / n, 4),
            "stations_all_right_session": sum(r["right_session"] == r["vertebrae"] for r in sel),
            "stations_all_right_alone": sum(r["right_alone"] == r["vertebrae"] for r in sel),
            "joined_stations_accuracy": round(sum(r["right_session"] for r in joined)
                                              / max(sum(r["vertebrae"] for r in joined), 1), 4)}
    for source in sorted({r["source"] for r in arows}):
        sel = [r for r in arows if r["source"] == source]
        sel = [r for r in sel if "error" not in r]
        out[f"alignment_{source}"] = {
            k: max((r[k]["max_abs"] for r in sel if r[k]["max_abs"] is not None), default=None)
            for k in ("curve_deg", "cobb_deg", "wedge_deg", "slip_mm")}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instance-model", type=Path, default=DEFAULT_INSTANCE)
    ap.add_argument("--no-model", action="store_true", help="reference masks only")
    ap.add_argument("--nprocs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "naming_alignment.json")
    a = ap.parse_args(argv)
    import logging

    from spineps.fsutil import write_json_atomic

    logging.basicConfig(level=logging.ERROR)
    t0 = time.perf_counter()
    model = None
    if not a.no_model:
        from spineps.instance.segmenter import UNetInstanceSegmenter

        model = UNetInstanceSegmenter.from_folder(a.instance_model, device="cpu", nprocs=a.nprocs)
    rows = _session_rows(lambda st: _ReferenceInstances(st.instance), "reference")
    if model is not None:
        rows += _session_rows(lambda st: model, "model")
    arows = _alignment_rows(model)
    result = {"benchmark": "naming_alignment", "summary": _summary(rows, arows), "stations": rows,
              "alignment": arows, "sessions": [{"name": n, "spec": s, "cuts": c} for n, s, c in SESSIONS],
              "instance_model": None if model is None else str(a.instance_model),
              "seconds": round(time.perf_counter() - t0, 1), "python": platform.python_version()}
    write_json_atomic(a.out, json.loads(json.dumps(result, default=str)))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
