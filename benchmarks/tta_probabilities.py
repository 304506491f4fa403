"""What ``--tta`` and ``--save-probabilities`` cost: whole participant runs of the app (the
real command line, default precision and engine) on one demo scan, each in a fresh output
folder and its own process, measured against the plain run.

    .venv/bin/python benchmarks/tta_probabilities.py [--subjects 1] [--rounds 2]
        [--work /tmp/spineps-bench-tta] [--json benchmarks/results/tta_probabilities.json]

Configurations: ``plain``; ``tta`` (``--tta`` with a copy of the bundled semantic model whose
``inference_config.json`` allows mirroring: the bundled model itself does not, so ``--tta``
alone would run without it; with its left/right labels, along the two axes that are not
left-right); ``probabilities`` (``--save-probabilities``). Per run: the wall
time and the CPU time (user + system) of the process, its peak resident memory (``wait4``
rusage), the semantic phase's time (``semantic_total`` in the sidecar's ``Timings``: N4,
resampling, network, clean-up), the mask's agreement with the plain run's (fraction of equal
voxels), and the bytes on disk of the ``_probseg`` map next to the masks. ``--rounds``
repeats the list interleaved (machine load hits all alike); minimum times, maximum memory kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "spineps" / "data" / "models" / "t2w_semantic"


def _mirroring_model(work: Path) -> Path:
    """A copy of the bundled semantic model that allows test-time mirroring (its
    ``inference_config.json`` with ``inference_augmentation: true``), same weights."""
    dst = work / "t2w_semantic_tta"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(BUNDLED, dst)
    cfg = json.loads((dst / "inference_config.json").read_text())
    cfg["inference_augmentation"] = True
    (dst / "inference_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _run(argv: list[str]) -> dict[str, Any]:
    """One process: wall time, CPU time (user + system, seconds: what the machine's other load
    changes least) and peak RSS (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(argv)}\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def _outputs(out: Path) -> dict[str, Any]:
    import nibabel as nib
    import numpy as np

    sems = sorted(out.rglob("*_desc-spine_dseg.nii.gz"))
    probs = sorted(out.rglob("*_desc-spine_probseg.nii.gz"))
    timings = [json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())["Timings"] for p in sems]
    return {
        "masks": {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sems},
        "semantic_s": round(sum(float(t.get("semantic_total", 0.0)) for t in timings), 3),
        "dseg_bytes": sum(p.stat().st_size for p in sems),
        "probseg_bytes": sum(p.stat().st_size for p in probs),
        "probseg_shape": list(nib.load(str(probs[0])).shape) if probs else None,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/spineps-bench-tta"))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "tta_probabilities.json")
    args = ap.parse_args(argv)
    import numpy as np

    from spineps.fsutil import write_json_atomic

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = list(os.getloadavg())
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = work / "demo"
    if demo.exists():
        shutil.rmtree(demo)
    subprocess.run([sys.executable, str(REPO / "run.py"), "demo", str(demo), "--subjects", str(args.subjects)],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    configs = {"plain": [], "tta": ["--tta", "--semantic-model", str(_mirroring_model(work))],
               "probabilities": ["--save-probabilities"]}
    results: dict[str, dict[str, Any]] = {}
    reference: dict[str, Any] = {}
    for rnd in range(args.rounds):
        for name, extra in configs.items():
            out = work / f"out_{name}_{rnd}"
            if out.exists():
                shutil.rmtree(out)
            run = _run([str(demo), str(out), "participant", "--skip-bids-validation", *extra])
            found = _outputs(out)
            masks = found.pop("masks")
            if name == "plain" and not reference:
                reference.update(masks)
            agree = [float(np.mean(masks[k] == reference[k])) for k in reference if k in masks]
            r = results.setdefault(name, {"args": extra[:1], "wall_s_runs": [], "cpu_s_runs": [],
                                          "semantic_s_runs": []})
            r["wall_s_runs"].append(run["wall_s"])
            r["cpu_s_runs"].append(run["cpu_s"])
            r["semantic_s_runs"].append(found["semantic_s"])
            r["peak_rss_mib"] = max(r.get("peak_rss_mib", 0.0), run["peak_rss_mib"])
            r.update({"wall_s": min(r["wall_s_runs"]), "cpu_s": min(r["cpu_s_runs"]),
                      "semantic_s": min(r["semantic_s_runs"]),
                      "mask_agreement_with_plain": round(min(agree), 6) if agree else None,
                      "dseg_bytes": found["dseg_bytes"], "probseg_bytes": found["probseg_bytes"],
                      "probseg_shape": found["probseg_shape"]})
            print(f"round {rnd} {name:14s} wall {run['wall_s']:.1f} s, CPU {run['cpu_s']:.1f} s, semantic phase "
                  f"{found['semantic_s']:.2f} s, peak RSS {run['peak_rss_mib']:.0f} MiB, "
                  f"probseg {found['probseg_bytes'] / 2**20:.2f} MiB", flush=True)
            shutil.rmtree(out)
    plain = results["plain"]
    summary = {
        "tta_semantic_phase_x": round(results["tta"]["semantic_s"] / plain["semantic_s"], 2),
        "tta_wall_x": round(results["tta"]["wall_s"] / plain["wall_s"], 2),
        "tta_cpu_x": round(results["tta"]["cpu_s"] / plain["cpu_s"], 2),
        "tta_extra_cpu_s": round(results["tta"]["cpu_s"] - plain["cpu_s"], 1),
        "probabilities_extra_cpu_s": round(results["probabilities"]["cpu_s"] - plain["cpu_s"], 1),
        "probabilities_extra_rss_mib": round(results["probabilities"]["peak_rss_mib"] - plain["peak_rss_mib"], 1),
        "probabilities_extra_wall_s": round(results["probabilities"]["wall_s"] - plain["wall_s"], 2),
        "probseg_mib_per_scan": round(results["probabilities"]["probseg_bytes"] / 2**20 / args.subjects, 2),
        "dseg_mib_per_scan": round(plain["dseg_bytes"] / 2**20 / args.subjects, 3),
    }
    cmd = "python benchmarks/tta_probabilities.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report = {"command": cmd, "started_utc": started,
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cores_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                          "platform": platform.platform(), "loadavg_end": list(os.getloadavg())},
              "loadavg_start": load_start, "subjects": args.subjects, "configs": results, "summary": summary}
    write_json_atomic(args.json, report)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
