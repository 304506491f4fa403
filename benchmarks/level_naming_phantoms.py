"""Level naming on ``spineps.synth`` phantoms: how often each rule names every vertebra right.

    .venv/bin/python benchmarks/level_naming_phantoms.py [--json benchmarks/results/level_naming_phantoms.json]

No network: the phantoms' own semantic masks and anonymous vertebra instances (what a perfect
semantic and instance phase would hand over, 2 mm grid) go through the post-processing and
``spineps.labeling.levels.name_levels``, and the names are compared with the phantom's truth.

- **An end in view** (``ends``): fields of view ``lumbar`` and ``thoracolumbar`` (sacrum in
  view), ``whole`` (C2 and sacrum), ``cervical`` (C2), each for standard spines and for spines
  with a T13 or an L6 (not for ``cervical``, where they look the same), 8 phantoms each
  (seeds 500-507), rule ``auto``. A phantom counts as right when every vertebra gets its true
  name.
- **Neither end in view** (``windows``): 24 windows of 5-8 vertebrae between C3 and L4 (seed
  300-323: ``numpy.random.default_rng(seed)`` draws the length, then the top), rules ``auto``
  (body sizes and costal-process tilt combined) and ``size``; exact = every name right, within
  one = the top vertebra named at most one level off.

Writes the counts (and every case) to the JSON; the README's "Limits" quote them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.0, 2.0, 2.0)
END_SEEDS = tuple(range(500, 508))
WINDOW_SEEDS = tuple(range(300, 324))
END_KINDS = (("lumbar", "standard"), ("lumbar", "t13"), ("lumbar", "l6"),
             ("thoracolumbar", "standard"), ("thoracolumbar", "t13"), ("thoracolumbar", "l6"),
             ("whole", "standard"), ("whole", "t13"), ("whole", "l6"), ("cervical", "standard"))


def _case(**kw: Any) -> tuple[list[int], Any, Any]:
    """(true vertebra levels top to bottom, post-processed semantic mask, anonymous instances)."""
    import numpy as np

    from spineps.postprocess.consistency import make_consistent
    from spineps.postprocess.discs import assign_discs_and_endplates
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    ph = make_phantom(PhantomSpec(spacing=SPACING, **kw))
    sem, inst = np.asarray(ph.semantic.data), np.asarray(ph.instance.data)
    verts = [v for v in ph.levels if v != 26]
    anon = np.zeros(inst.shape, np.int16)
    part = (sem >= 41) & (sem <= 49)
    for k, v in enumerate(verts, start=1):
        anon[part & (inst == v)] = k
    s3, i3 = assign_discs_and_endplates(*make_consistent(ph.semantic, ph.semantic.with_data(anon)))
    return verts, s3, i3


def _names(naming: Any) -> list[int]:
    return [naming.mapping[k] for k in sorted(naming.mapping)]


def ends_in_view() -> list[dict[str, Any]]:
    from spineps.labeling.levels import name_levels
    from spineps.labels import vertebra_name

    rows = []
    for fov, variant in END_KINDS:
        for seed in END_SEEDS:
            verts, s3, i3 = _case(seed=seed, fov=fov, t13=variant == "t13", l6=variant == "l6")
            naming = name_levels(s3, i3)
            got = _names(naming)
            rows.append({"fov": fov, "variant": variant, "seed": seed, "right": got == verts,
                         "rule_used": naming.rule_used, "truth": [vertebra_name(v) for v in verts],
                         "named": [vertebra_name(v) for v in got]})
            print(f"  {fov:<14} {variant:<8} seed {seed}: {'right' if got == verts else 'WRONG'} ({naming.rule_used})",
                  flush=True)
    return rows


def _window(seed: int) -> tuple[str, str]:
    import numpy as np

    from spineps.labeling.levels import VARIANTS
    from spineps.labels import vertebra_name

    seq = list(VARIANTS["standard"])
    lo, hi = seq.index(3), seq.index(23)  # C3 .. L4: neither C2 nor the sacrum in view
    rng = np.random.default_rng(seed)
    length = int(rng.integers(5, 9))
    start = int(rng.integers(lo, hi - length + 2))
    return vertebra_name(seq[start]), vertebra_name(seq[start + length - 1])


def windows() -> list[dict[str, Any]]:
    from spineps.labeling.levels import VARIANTS, name_levels
    from spineps.labels import vertebra_name

    seq = list(VARIANTS["standard"])
    rows = []
    for seed in WINDOW_SEEDS:
        top, bottom = _window(seed)
        verts, s3, i3 = _case(seed=seed, top=top, bottom=bottom)
        row: dict[str, Any] = {"seed": seed, "top": top, "bottom": bottom,
                               "truth": [vertebra_name(v) for v in verts]}
        for rule in ("auto", "size"):
            got = _names(name_levels(s3, i3, rule=rule))
            offset = seq.index(got[0]) - seq.index(verts[0]) if got and got[0] in seq and verts[0] in seq else None
            row[rule] = {"exact": got == verts, "top_offset": offset, "named": [vertebra_name(v) for v in got]}
        rows.append(row)
        print(f"  window {top}-{bottom} seed {seed}: auto {row['auto']['top_offset']:+d}, "
              f"size {row['size']['top_offset']:+d}", flush=True)
    return rows


def summarize(ends: list[dict[str, Any]], wins: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    for r in ends:
        k = by_kind.setdefault(f"{r['fov']}/{r['variant']}", {"right": 0, "n": 0})
        k["n"] += 1
        k["right"] += int(r["right"])
    out: dict[str, Any] = {"ends_in_view": by_kind}
    for rule in ("auto", "size"):
        offs = [r[rule]["top_offset"] for r in wins]
        out[f"windows_{rule}"] = {"n": len(wins), "exact": sum(int(r[rule]["exact"]) for r in wins),
                                  "within_one": sum(1 for o in offs if o is not None and abs(o) <= 1)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "level_naming_phantoms.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    t0 = time.time()
    print("an end in view (rule auto):")
    ends = ends_in_view()
    print("neither end in view:")
    wins = windows()
    summary = summarize(ends, wins)
    out = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)), "spacing_mm": list(SPACING),
           "end_seeds": list(END_SEEDS), "window_seeds": list(WINDOW_SEEDS), "summary": summary,
           "ends": ends, "windows": wins, "seconds": round(time.time() - t0, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    for kind, c in summary["ends_in_view"].items():
        print(f"{kind:<24} {c['right']}/{c['n']} right")
    for rule in ("auto", "size"):
        w = summary[f"windows_{rule}"]
        print(f"windows, rule {rule:<5} {w['exact']}/{w['n']} exact, {w['within_one']}/{w['n']} within one level")
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
