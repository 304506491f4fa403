"""Instance-phase speed and peak memory on CPU.

    .venv/bin/python benchmarks/instance_speed.py [--model spineps/data/models/instance]
        [--threads 2] [--official] [--out benchmarks/results/instance_speed.json]

Measures, each in a fresh subprocess (so peak RSS belongs to that measurement alone):
- one cutout forward of the bundled model (batch 1 and 2; contiguous vs channels_last_3d, and
  in ONNX Runtime as ``--engine onnxruntime`` runs it),
- one whole spine (a phantom, C2..sacrum, presented at 1.5 x 1.5 x 4 mm in RAS order):
  ``predict_vertebrae`` end to end (reorient, resample, centres, cutouts, forward, merge,
  back to the grid),
- with ``--official``: one forward of the released layout (dim 16, random weights) on the
  released cutout size 248 x 304 x 64, contiguous vs channels_last_3d vs ONNX Runtime.

Prints a table and writes the JSON atomically. Peak memory is the process's maximum RSS
minus its RSS before the measured call (MiB). The machine is shared: rerun for stable
numbers; the load average at the start is recorded.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "spineps" / "data" / "models" / "instance"


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cutout_forward(args: dict, q) -> None:
    import torch

    from spineps.instance.checkpoint import load_instance_checkpoint
    from spineps.instance.network import InstanceUNet3D

    torch.set_num_threads(args["threads"])
    if args.get("weights"):
        net = load_instance_checkpoint(Path(args["weights"])).network
    else:
        torch.manual_seed(0)
        net = InstanceUNet3D(in_channels=args["in_channels"], dim=args["dim"]).eval()
    size = tuple(args["size"])
    idx = torch.randint(0, net.in_channels, (args["batch"],) + size)
    x = torch.nn.functional.one_hot(idx, net.in_channels).permute(0, 4, 1, 2, 3).float()
    if args.get("engine") == "onnxruntime":  # the app's --engine onnxruntime (float32, contiguous input)
        from spineps.models.onnx_engine import OrtForward

        OrtForward(net, (net.in_channels, *size), args["threads"], name="instance").install()
        x = x.contiguous()
    elif args["channels_last"]:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x = x.contiguous()
    times = []
    base = _rss_mib()
    with torch.inference_mode():
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            net(x).argmax(1)
            times.append(time.perf_counter() - t0)
    q.put({"seconds": min(times), "seconds_all": times, "peak_mib_above_start": _peak_mib() - base})


def _whole_spine(args: dict, q) -> None:
    import torch

    from spineps.geometry.orientation import to_orientation
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    torch.set_num_threads(args["threads"])
    ph = make_phantom(PhantomSpec(seed=args["seed"], fov="whole", spacing=(1.5, 1.5, 4.0)))
    sem, _ = to_orientation(ph.semantic, ("R", "A", "S"))
    seg = UNetInstanceSegmenter.from_folder(Path(args["model"]), device="cpu", nprocs=args["threads"])
    base = _rss_mib()
    t0 = time.perf_counter()
    vol, res = seg._predict(sem)
    total = time.perf_counter() - t0
    q.put({"seconds": total, "peak_mib_above_start": _peak_mib() - base, "shape": list(sem.shape),
           "channels_last": seg.channels_last,
           "n_cutouts": len(res.centres), "n_vertebrae": int(vol.data.max()),
           "reference_vertebrae": len([v for v in ph.levels if v != 26]),
           "timings": {k: round(v, 3) for k, v in res.timings.items()}})


def _run(fn, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--official", action="store_true", help="also time the released layout at 248x304x64")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "instance_speed.json")
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from spineps.fsutil import write_json_atomic
    from spineps.instance.segmenter import find_weights
    from spineps.models.folder import read_model_config

    cfg = read_model_config(args.model)
    weights = find_weights(args.model)
    rows = []
    result = {"host": platform.node(), "cpu_count": os.cpu_count(), "threads": args.threads,
              "load_average_at_start": list(os.getloadavg()), "model": str(args.model.relative_to(REPO))
              if args.model.is_relative_to(REPO) else str(args.model),
              "cutout_size": list(cfg.cutout_size), "spacing": list(cfg.spacing_min), "measurements": rows}
    for batch in (1, 2):
        for cl in (False, True):
            r = _run(_cutout_forward, {"weights": str(weights), "size": list(cfg.cutout_size), "batch": batch,
                                       "channels_last": cl, "threads": args.threads, "repeats": 5})
            rows.append({"what": f"bundled cutout forward, batch {batch}", "channels_last_3d": cl,
                         "size": list(cfg.cutout_size), **r, "seconds_per_cutout": r["seconds"] / batch})
        r = _run(_cutout_forward, {"weights": str(weights), "size": list(cfg.cutout_size), "batch": batch,
                                   "channels_last": False, "threads": args.threads, "repeats": 5,
                                   "engine": "onnxruntime"})
        rows.append({"what": f"bundled cutout forward, batch {batch}, ONNX Runtime", "channels_last_3d": False,
                     "size": list(cfg.cutout_size), **r, "seconds_per_cutout": r["seconds"] / batch})
    r = _run(_whole_spine, {"model": str(args.model), "threads": args.threads, "seed": args.seed})
    rows.append({"what": "whole spine predict_vertebrae (phantom C2..sacrum)",
                 "channels_last_3d": r.pop("channels_last"), **r})
    if args.official:
        for cl in (False, True):
            r = _run(_cutout_forward, {"weights": None, "dim": 16, "in_channels": 10, "size": [248, 304, 64],
                                       "batch": 1, "channels_last": cl, "threads": args.threads, "repeats": 1})
            rows.append({"what": "released layout (dim 16) cutout forward", "channels_last_3d": cl,
                         "size": [248, 304, 64], **r, "seconds_per_cutout": r["seconds"]})
        r = _run(_cutout_forward, {"weights": None, "dim": 16, "in_channels": 10, "size": [248, 304, 64],
                                   "batch": 1, "channels_last": False, "threads": args.threads, "repeats": 1,
                                   "engine": "onnxruntime"})
        rows.append({"what": "released layout (dim 16) cutout forward, ONNX Runtime", "channels_last_3d": False,
                     "size": [248, 304, 64], **r, "seconds_per_cutout": r["seconds"]})
    write_json_atomic(args.out, result)
    print(f"{'what':55s} {'cl3d':>5s} {'s/cutout':>9s} {'total s':>8s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['what']:55s} {str(r['channels_last_3d']):>5s} {r.get('seconds_per_cutout', float('nan')):9.3f} "
              f"{r['seconds']:8.2f} {r['peak_mib_above_start']:9.0f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
