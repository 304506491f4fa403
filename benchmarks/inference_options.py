"""CPU inference options for the semantic network (nnU-Net), and N4 settings, measured
against the default on the same input: time and label agreement with the default's output.

    .venv/bin/python benchmarks/inference_options.py [--model spineps/data/models/t2w_semantic]
        [--case whole] [--threads 2] [--tiles 12] [--rounds 2]
        [--options fp32,channels_last,bf16,channels_last_bf16,compile,onnxruntime,threads1]
        [--n4-options 10k,iters25] [--json benchmarks/results/inference_options.json]

The input is a benchmark case of ``run_benchmark.py`` (made there, cached under
``--work``), pre-processed and resampled onto the model grid, then cut to a block of about
``--tiles`` sliding-window tiles around its centre (so every option runs in minutes on 2
cores). Each option predicts the block twice (the first run warms up, e.g. compiles); the
second is timed: the whole ``predict_indices`` (nnU-Net sliding window) and the pure
network forward (hooks). ``--rounds`` repeats the whole list of options (interleaved, so a
change of machine load hits all alike); the minimum and the median are kept. Agreement =
fraction of voxels with the default's label, overall and on the voxels either labels as
foreground. N4 options: the block is predicted from the
image corrected with the changed N4 settings; their time is the N4 time on the whole scan.
An option is worth a default change only when it is faster and agreement >= 0.999.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

log = logging.getLogger("inference_options")


def _autocast_bf16(net: Any) -> Any:
    """A copy of ``net`` whose forward runs under CPU bfloat16 autocast (float32 output); the
    state dict keys stay the same (nnU-Net reloads the weights before each prediction)."""
    import copy

    import torch

    twin = copy.deepcopy(net)
    inner = twin.forward

    def forward(x: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(x).float()

    twin.forward = forward
    return twin


def _onnxruntime_twin(net: Any, patch_net: Sequence[int], threads: int) -> Any:
    """A copy of ``net`` whose forward runs in ONNX Runtime (the app's ``--engine
    onnxruntime``: ``spineps.models.onnx_engine.OrtForward``, exported for the tile shape)."""
    import copy

    import torch

    from spineps.models.onnx_engine import OrtForward

    twin = copy.deepcopy(net).eval()
    n_in = int(next(m for m in twin.modules() if isinstance(m, torch.nn.Conv3d)).in_channels)
    OrtForward(twin, (n_in, *[int(v) for v in patch_net]), threads, name="semantic").install()
    return twin


def _block(arr: Any, patch: Sequence[int], step: float, tiles: int) -> tuple[slice, ...]:
    """A centred block of about ``tiles`` sliding-window positions (patch in the array's axis order)."""
    import numpy as np

    shape = arr.shape
    n = [1, 1, 1]
    # grow the block along the axes in turn until it holds the wanted number of tiles
    while int(np.prod(n)) < tiles:
        grown = False
        for ax in np.argsort([-s / p for s, p in zip(shape, patch)]):
            size = int(patch[ax] + (n[ax]) * patch[ax] * step)
            if size <= shape[ax] and int(np.prod(n)) < tiles:
                n[ax] += 1
                grown = True
        if not grown:
            break
    out = []
    for ax in range(3):
        size = min(shape[ax], int(patch[ax] + (n[ax] - 1) * patch[ax] * step))
        start = (shape[ax] - size) // 2
        out.append(slice(start, start + size))
    return tuple(out)


def _crop(vol: Any, box: tuple[slice, ...]) -> Any:
    """The block ``box`` of ``vol`` as a Volume on its own (shifted) grid."""
    import numpy as np

    from spineps.geometry.volume import Volume

    aff = np.array(vol.affine, dtype=float)
    aff[:3, 3] = aff[:3, :3] @ np.array([b.start for b in box], float) + aff[:3, 3]
    return Volume(np.ascontiguousarray(np.asarray(vol.data)[box]), aff)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import run_benchmark as rb

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "spineps" / "data" / "models" / "t2w_semantic")
    ap.add_argument("--case", default="whole", choices=sorted(rb.CASES))
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--tiles", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="measure every option this often (min and median kept)")
    ap.add_argument("--options", default="fp32,channels_last,bf16,channels_last_bf16,compile,threads1")
    ap.add_argument("--n4-options", default="10k,iters25")
    ap.add_argument("--work", type=Path, default=rb.DEFAULT_WORK)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "inference_options.json")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = rb.loadavg()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(k, "/tmp/nnunet-unused")
    import numpy as np
    import torch

    from spineps.geometry.io import load_volume
    from spineps.models.nnunet_folder import load_nnunet_folder
    from spineps.semantic.predict import NnUNetSemanticSegmenter
    from spineps.semantic.preprocess import N4Settings, n4_correct, normalize_range

    case = rb.prepare_case(rb.CASES[args.case], args.work.resolve())
    if case is None:
        raise SystemExit(f"case {args.case} is not available")
    torch.set_num_threads(args.threads)
    seg = NnUNetSemanticSegmenter(load_nnunet_folder(Path(args.model)), device="cpu", nprocs=args.threads, n4=False,
                                  channels_last=False)  # the plain layout is the baseline here
    image = load_volume(case.image, kind="image")
    base_img = normalize_range(image.data)

    def model_block(data: Any) -> Any:
        grid = seg.to_model_grid(image.with_data(data))
        return grid

    t0 = time.perf_counter()
    n4_data = normalize_range(n4_correct(base_img, image.spacing))
    t_n4_default = time.perf_counter() - t0
    grid = model_block(n4_data)
    cm = seg.loaded.configuration_manager
    patch_rip = list(cm.patch_size)
    patch = [patch_rip[2], patch_rip[1], patch_rip[0]]  # our arrays are P, I, R
    box = _block(np.asarray(grid.data), patch, seg.step_size, args.tiles)
    block = _crop(grid, box)
    log.info("case %s: model grid %s, block %s (patch %s)", args.case, grid.shape, block.shape, patch)

    net0 = seg.predictor.network
    results: dict[str, Any] = {}
    reference: dict[str, Any] = {}

    def run(name: str, setup: Callable[[], None], teardown: Callable[[], None], img: Any = None) -> None:
        setup()
        timer = rb.ForwardTimer(seg.predictor.network)
        try:
            t0 = time.perf_counter()
            seg.predict_indices(img if img is not None else block)  # warm-up (compiles, allocates)
            t_first = time.perf_counter() - t0
            timer.seconds, timer.calls = 0.0, 0
            t0 = time.perf_counter()
            out = seg.predict_indices(img if img is not None else block)
            t = time.perf_counter() - t0
        finally:
            timer.remove()
            teardown()
        if "labels" not in reference:
            reference["labels"] = out
        ref = reference["labels"]
        fg = (ref > 0) | (out > 0)
        r = results.setdefault(name, {"predict_s_runs": [], "forward_s_runs": [], "first_call_s_runs": []})
        r["predict_s_runs"].append(round(t, 3))
        r["forward_s_runs"].append(round(timer.seconds, 3))
        r["first_call_s_runs"].append(round(t_first, 3))
        r.update({"predict_s": min(r["predict_s_runs"]), "forward_s": min(r["forward_s_runs"]),
                  "forward_s_median": round(float(np.median(r["forward_s_runs"])), 3), "tiles": timer.calls,
                  "agreement": round(float(np.mean(out == ref)), 6),
                  "foreground_agreement": round(float(np.mean(out[fg] == ref[fg])), 6) if fg.any() else None})
        log.info("%-18s predict %.2f s (forward %.2f s, %d tiles; first call %.1f s), agreement %.5f / fg %s", name,
                 t, timer.seconds, timer.calls, t_first, r["agreement"], r["foreground_agreement"])

    def set_net(net: Any) -> Callable[[], None]:
        def f() -> None:
            seg.predictor.network = net
        return f

    def restore() -> None:
        seg.predictor.network = net0
        torch.set_num_threads(args.threads)

    twins: dict[str, Any] = {}  # option networks made once, reused by every round
    export_info: dict[str, Any] = {}
    opts = [o.strip() for o in args.options.split(",") if o.strip()]
    if "fp32" not in opts:
        opts.insert(0, "fp32")
    for _round in range(args.rounds):  # rounds interleave the options: load changes hit all alike
        for opt in opts:
            if opt == "fp32":
                run("fp32", lambda: None, restore)
            elif opt == "channels_last":
                import copy

                cl = copy.deepcopy(net0).to(memory_format=torch.channels_last_3d)
                run("channels_last", set_net(cl), restore)
            elif opt == "bf16":
                run("bf16_autocast", set_net(_autocast_bf16(net0)), restore)
            elif opt == "channels_last_bf16":
                run("channels_last_bf16", set_net(_autocast_bf16(net0).to(memory_format=torch.channels_last_3d)),
                    restore)
            elif opt == "compile":
                try:
                    import copy

                    comp = copy.deepcopy(net0)
                    comp.compile()  # in place: the state dict keys stay the same
                    run("torch_compile", set_net(comp), restore)
                except Exception as exc:  # compile needs a C++ toolchain; record why it did not run
                    results["torch_compile"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    log.warning("torch.compile failed: %s", results["torch_compile"]["error"])
                    restore()
            elif opt == "onnxruntime":
                if "onnxruntime" not in twins:
                    t0 = time.perf_counter()
                    try:
                        twins["onnxruntime"] = _onnxruntime_twin(net0, cm.patch_size, args.threads)
                    except Exception as exc:  # not installed, or the export failed: record why
                        results["onnxruntime"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                        log.warning("ONNX Runtime option failed: %s", results["onnxruntime"]["error"])
                        continue
                    import onnxruntime

                    export_info["onnxruntime"] = {"export_and_session_s": round(time.perf_counter() - t0, 2),
                                                  "onnxruntime": onnxruntime.__version__}
                run("onnxruntime", set_net(twins["onnxruntime"]), restore)
            elif opt.startswith("threads"):
                n = int(opt[len("threads"):])
                run(f"threads{n}", lambda n=n: torch.set_num_threads(n), restore)
            else:
                raise SystemExit(f"unknown option {opt!r}")

    n4_results: dict[str, Any] = {"default": {"n4_s": round(t_n4_default, 3)}}
    for opt in [o.strip() for o in args.n4_options.split(",") if o.strip()]:
        settings = {"10k": N4Settings(max_fit_voxels=10_000), "iters25": N4Settings(iterations=(25, 25, 15)),
                    "conv1e-2": N4Settings(convergence=1e-2)}.get(opt)
        if settings is None:
            raise SystemExit(f"unknown N4 option {opt!r}")
        t0 = time.perf_counter()
        data = normalize_range(n4_correct(base_img, image.spacing, settings))
        t_n4 = time.perf_counter() - t0
        g = model_block(data)
        blk = _crop(g, box)
        run(f"n4_{opt}", lambda: None, restore, img=blk)
        n4_results[opt] = {"n4_s": round(t_n4, 3), **results.pop(f"n4_{opt}")}
    cmd = "python benchmarks/inference_options.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    report = {"command": cmd,
              "started_utc": started, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": rb.machine_info(args.threads), "loadavg_start": load_start, "loadavg_end": rb.loadavg(),
              "torch": torch.__version__, "model": str(args.model), "case": args.case,
              "model_grid": list(grid.shape), "block": list(block.shape), "patch_pir": patch,
              "network": results, "option_setup": export_info, "n4": n4_results}
    rb.write_json_atomic(args.json, report)
    print(json.dumps({"network": results, "n4": n4_results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
