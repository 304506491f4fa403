"""The semantic network at the released model's size, one sliding-window tile, per engine.

    .venv/bin/python benchmarks/semantic_official_layout.py [--threads 2] [--repeats 2]
        [--json benchmarks/results/semantic_official_layout.json]

The bundled semantic model is small (0.9 M parameters, 24 x 96 x 80 tiles); the released
SPINEPS model is not (patch 256 x 256 x 64). Its weights cannot be downloaded here, so this
builds nnU-Net's default 3d_fullres ``PlainConvUNet`` for that patch (6 stages, features
32-64-128-256-320-320, 15 outputs, instance norm: 31.2 M parameters) with random weights
(the cost of a forward pass does not depend on the values) and times one tile:

- ``torch``: float32 torch (what nnU-Net does on CPU; ``--engine torch --precision fp32``);
- ``onnxruntime``: ``spineps.models.onnx_engine.OrtForward`` as ``--engine auto`` sets it up
  for float32 (export traced on a small input, session fixed to the tile shape);
- ``bf16``: bfloat16 autocast + channels-last 3D in torch (``--precision bf16``).

Each variant runs in its own fresh process (spawned), so its peak RSS is its own; the
export/session time of ONNX Runtime is reported apart. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PATCH = (64, 256, 256)  # the released model's patch, in the network's (R, I, P) axis order
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
FEATURES = [32, 64, 128, 256, 320, 320]


def _hwm_mib() -> float:
    from runbench.probe import status_kib  # benchmarks/ is on sys.path

    return status_kib("VmHWM") / 1024.0


def _network() -> Any:
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    return PlainConvUNet(1, len(FEATURES), FEATURES, torch.nn.Conv3d, 3, STRIDES, [2] * len(FEATURES), 15,
                         [2] * (len(FEATURES) - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False).eval()


def _measure(args: dict, q: Any) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np
    import torch

    torch.set_num_threads(args["threads"])
    net = _network()
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 1, *PATCH)).astype(np.float32))
    setup_s = 0.0
    if args["variant"] == "onnxruntime":
        from spineps.models.onnx_engine import OrtForward

        t0 = time.perf_counter()
        total = np.prod(np.asarray(STRIDES), axis=0)
        OrtForward(net, (1, *PATCH), args["threads"], name="official-layout",
                   trace_shape=(1, *[int(min(p, 2 * t)) for p, t in zip(PATCH, total)])).install()
        setup_s = time.perf_counter() - t0
    elif args["variant"] == "bf16":
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    base = _hwm_mib()
    times = []
    with torch.inference_mode():
        for _ in range(args["repeats"]):
            t0 = time.perf_counter()
            if args["variant"] == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    net(x).float()
            else:
                net(x)
            times.append(time.perf_counter() - t0)
    q.put({"variant": args["variant"], "forward_s_runs": [round(t, 2) for t in times],
           "forward_s": round(min(times), 2), "setup_s": round(setup_s, 2),
           "peak_rss_mib": round(_hwm_mib(), 0), "rss_before_forward_mib": round(base, 0),
           "parameters_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2)})


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=2, help="forward passes per variant (the minimum is kept)")
    ap.add_argument("--variants", default="torch,onnxruntime,bf16")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "semantic_official_layout.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from instance_speed import _run  # a fresh spawned process per measurement
    from runbench.report import loadavg, machine_info, write_json_atomic

    report: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "machine": machine_info(args.threads), "loadavg_start": loadavg(),
                              "patch": list(PATCH), "features": FEATURES, "strides": STRIDES, "results": []}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        r = _run(_measure, {"variant": variant, "threads": args.threads, "repeats": args.repeats})
        report["results"].append(r)
        print(json.dumps(r), flush=True)
    report["loadavg_end"] = loadavg()
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(args.json, report)
    print(f"{'variant':12s} {'forward s':>10s} {'setup s':>8s} {'peak MiB':>9s}")
    for r in report["results"]:
        print(f"{r['variant']:12s} {r['forward_s']:10.2f} {r['setup_s']:8.2f} {r['peak_rss_mib']:9.0f}")
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
