"""Cost of one training step (forward + backward + SGD, deep supervision) of candidate
semantic-network configurations on this machine's CPU, and their inference cost per mm³.

    .venv/bin/python benchmarks/training_step_cost.py [--threads 1] [--steps 6]
        [--json benchmarks/results/training_step_cost.json]

Networks are built from nnU-Net plans (``spineps.training.semantic.plans_dict`` and nnU-Net's
``get_network_from_plans``), exactly as training builds them, with random inputs: the data
pipeline is not included (see the training log for the whole epoch time). For every
candidate the table gives seconds per step, seconds per step per 1000 cm³ of tissue seen
(patch volume x batch, a fair unit across grids and 2D/3D), the forward time of one
inference tile, and the parameter count. Used to choose the bundled model's grid and size
(``spineps/data/models/t2w_semantic/MODEL_CARD.md``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: name -> (dim, spacing P-I-R mm, patch in network axis order, batch, features)
CANDIDATES: dict[str, tuple[int, tuple[float, float, float], tuple[int, ...], int, tuple[int, ...]]] = {
    "3d_1.5mm_f8 (round 1)": (3, (1.5, 1.5, 3.0), (24, 96, 80), 2, (8, 16, 32, 64, 64)),
    "3d_1.5mm_f16": (3, (1.5, 1.5, 3.0), (24, 96, 80), 2, (16, 32, 64, 128, 128)),
    "3d_1.5mm_f12": (3, (1.5, 1.5, 3.0), (24, 96, 80), 2, (12, 24, 48, 96, 128)),
    "3d_1.5mm_f16_deep": (3, (1.5, 1.5, 3.0), (32, 128, 96), 2, (16, 32, 64, 128, 192, 192)),
    "3d_1.0mm_f12": (3, (1.0, 1.0, 2.0), (32, 128, 112), 2, (12, 24, 48, 96, 128)),
    "2d_1.5mm_f16": (2, (1.5, 1.5, 3.0), (96, 80), 24, (16, 32, 64, 128, 256)),
    "2d_1.0mm_f16": (2, (1.0, 1.0, 2.0), (160, 128), 12, (16, 32, 64, 128, 256, 256)),
}


def build(dim: int, spacing: tuple[float, float, float], patch: tuple[int, ...], features: tuple[int, ...],
          n_classes: int = 15):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from spineps.training.semantic import plans_dict

    if dim == 3:
        plans = plans_dict(spacing, patch, features)  # type: ignore[arg-type]
        arch = plans["configurations"]["3d_fullres"]["architecture"]
        kw = arch["arch_kwargs"]
    else:
        n = len(features)
        kw = {"n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv2d",
              "kernel_sizes": [[3, 3]] * n, "strides": [[1, 1]] + [[2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
              "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
              "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
        arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return get_network_from_plans(arch["network_class_name"], kw, arch["_kw_requires_import"], 1, n_classes,
                                  allow_init=True, deep_supervision=True)


def measure(name: str, steps: int) -> dict:
    import torch

    dim, spacing, patch, batch, features = CANDIDATES[name]
    net = build(dim, spacing, patch, features)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(batch, 1, *patch)
    times = []
    for k in range(steps + 1):
        t0 = time.perf_counter()
        outs = net(x)
        loss = sum(o.float().mean() for o in outs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k:  # the first step warms up
            times.append(time.perf_counter() - t0)
    # inference tile: the 3D configurations' tile, or a 2D network over the same block slice by slice
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        xt = torch.randn(1, 1, *patch)
        net(xt)
        t0 = time.perf_counter()
        net(xt)
        t_tile = time.perf_counter() - t0
    vox_mm3 = spacing[0] * spacing[1] * spacing[2]
    # patch volume in cm³: 2D patches are one slice of thickness = the R spacing
    n_vox = batch
    for p in patch:
        n_vox *= p
    volume_cm3 = n_vox * vox_mm3 / 1000.0
    tile_cm3 = volume_cm3 / batch
    med = statistics.median(times)
    return {
        "name": name, "dim": dim, "spacing_pir_mm": list(spacing), "patch": list(patch), "batch": batch,
        "features": list(features), "parameters": int(sum(p.numel() for p in net.parameters())),
        "step_s_median": round(med, 3), "step_s_min": round(min(times), 3),
        "tissue_per_step_cm3": round(volume_cm3, 1),
        "step_s_per_1000cm3": round(med / volume_cm3 * 1000.0, 3),
        "inference_tile_s": round(t_tile, 3), "inference_s_per_1000cm3": round(t_tile / tile_cm3 * 1000.0, 3),
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "training_step_cost.json")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    names = [n for n in CANDIDATES if not a.only or n in a.only.split(",")]
    rows = []
    for n in names:
        rows.append(measure(n, a.steps))
        r = rows[-1]
        print(f"{n:24s} params {r['parameters']/1e6:6.2f} M  step {r['step_s_median']:6.3f} s  "
              f"{r['step_s_per_1000cm3']:6.3f} s/1000cm3  tile {r['inference_tile_s']:.3f} s  "
              f"{r['inference_s_per_1000cm3']:.3f} s/1000cm3", flush=True)
    from spineps.fsutil import write_json_atomic

    a.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.json, {"threads": a.threads, "steps": a.steps, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d"), "candidates": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
