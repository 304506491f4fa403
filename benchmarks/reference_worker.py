"""One run of the reference implementation (SPINEPS 2.1.3, PyPI) on one scan, timed.

Runs INSIDE the reference's virtual environment (``benchmarks/reference_venv.sh``), started
by ``run_benchmark.py`` with a working directory outside this repository, so ``spineps``
here is the reference package, not ours. From this repository it imports only the
measuring helpers of ``runbench.probe`` (its own folder is first on ``sys.path``; that
package imports nothing but the standard library at import time).

    /tmp/spineps-ref-venv/bin/python benchmarks/reference_worker.py CONFIG.json RESULT.json

CONFIG: ``image`` (a BIDS-named T2w file in its own folder ``dataset``), ``semantic_model``,
``instance_model`` (model folders), ``threads``, ``device`` (cpu/cuda/auto), ``n4``.
What is timed: imports, model loading, and ``segment_image`` (the reference's whole
per-scan pipeline: pre-processing with N4, semantic phase, instance phase, post-processing,
centroids, writing, snapshot figure), with the labelling model off (``model_labeling=None``)
and the automatic spine crop off (it would download another model). Its own defaults
otherwise. Pure network time is measured with forward hooks where the networks are found.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from runbench.probe import ForwardTimer, status_kib  # this script's folder: the same hooks and counters as ours


def main(cfg_path: str, result_path: str) -> int:
    t_start = time.perf_counter()
    cfg = json.loads(Path(cfg_path).read_text())
    import torch
    from TPTBox import BIDS_FILE

    from spineps.get_models import get_actual_model
    from spineps.seg_run import segment_image

    t_import = time.perf_counter() - t_start
    threads = int(cfg["threads"])
    torch.set_num_threads(threads)
    use_cpu = cfg.get("device", "cpu") == "cpu" or not torch.cuda.is_available()
    t0 = time.perf_counter()
    sem = get_actual_model(cfg["semantic_model"], use_cpu=use_cpu).load()
    inst = get_actual_model(cfg["instance_model"], use_cpu=use_cpu).load()
    torch.set_num_threads(threads)  # the nnU-Net loader may set its own thread count
    t_models = time.perf_counter() - t0
    rss_before_scan = status_kib("VmRSS")  # its memory floor: imports and models, before any voxel
    cuda = not use_cpu
    timers = {}
    net = getattr(getattr(sem, "predictor", None), "network", None)
    if isinstance(net, torch.nn.Module):
        timers["semantic"] = ForwardTimer(net, cuda)
    # the reference calls ``predictor.forward(x)`` directly (no hooks there); its ``network`` is called
    inner = getattr(getattr(inst, "predictor", None), "network", None)
    if isinstance(inner, torch.nn.Module):
        timers["instance"] = ForwardTimer(inner, cuda)

    image = Path(cfg["image"])
    ref = BIDS_FILE(str(image), dataset=str(cfg["dataset"]), verbose=False)
    t0 = time.perf_counter()
    out = segment_image(ref, model_semantic=sem, model_instance=inst, model_labeling=None,
                        derivative_name="derivatives_seg", override_semantic=True, override_instance=True,
                        override_postpair=True, override_ctd=True, auto_crop_to_spine=False,
                        proc_sem_n4_bias_correction=bool(cfg.get("n4", True)), verbose=False)
    t_scan = time.perf_counter() - t0
    paths, err = out[0], out[-1]
    root = Path(cfg["dataset"]) / "derivatives_seg"
    sem_out = sorted(root.rglob("*seg-spine_msk.nii.gz"))
    vert_out = sorted(root.rglob("*seg-vert_msk.nii.gz"))
    fwd = {k: round(t.seconds, 3) for k, t in timers.items()}
    from importlib.metadata import version

    res = {
        "case": cfg.get("case"),
        "repeat": cfg.get("repeat"),
        "errcode": str(err),
        "seconds": {"import": round(t_import, 3), "model_load": round(t_models, 3), "scan": round(t_scan, 3),
                    "forward_semantic": fwd.get("semantic"), "forward_instance": fwd.get("instance"),
                    "forward_total": round(sum(fwd.values()), 3) if fwd else None},
        "forward_calls": {k: t.calls for k, t in timers.items()},
        "peak_rss_mib_in_process": round(status_kib("VmHWM") / 1024, 1),
        "rss_before_scan_mib": round(rss_before_scan / 1024, 1),
        "outputs": {"semantic": str(sem_out[0]) if sem_out else None,
                    "instance": str(vert_out[0]) if vert_out else None},
        "version": version("spineps"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if not sem_out:
        print(f"the reference wrote no semantic mask under {root} (errcode {err}, paths {paths})", file=sys.stderr)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
