"""One run of one case in a fresh process: ours (``run_benchmark.py --worker``, the
participant level with the phase probe installed) or the reference's
(``reference_worker.py`` in its own virtual environment)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from runbench.cases import REPO, PreparedCase
from runbench.probe import PHASES, ForwardTimer, PhaseProbe, install_probe

log = logging.getLogger("run_benchmark")

RUN_BENCHMARK = REPO / "benchmarks" / "run_benchmark.py"
REFERENCE_WORKER = REPO / "benchmarks" / "reference_worker.py"


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One run of one case in this (fresh) process; returns the measurements."""
    t_start = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(k, str(Path(tempfile.gettempdir()) / "nnunet-unused"))
    import torch

    import spineps.participant as participant
    from spineps.loading import load_segmenters
    from spineps.settings import Settings

    t_import = time.perf_counter() - t_start
    threads = int(cfg["threads"])
    torch.set_num_threads(threads)
    out = Path(cfg["output_dir"])
    settings = Settings(bids_dir=Path(cfg["bids_dir"]), output_dir=out, analysis_level="participant",
                        skip_bids_validation=True, nprocs=threads, omp_nthreads=threads, device=cfg["device"],
                        semantic_model=Path(cfg["semantic_model"]), instance_model=Path(cfg["instance_model"]),
                        semantic_model_source="flag", instance_model_source="flag", overwrite=True,
                        n4=bool(cfg.get("n4", True)), precision=str(cfg.get("precision", "auto")),
                        engine=str(cfg.get("engine", "auto")), version="benchmark")
    t0 = time.perf_counter()
    # the benchmark reads the networks of our two segmenters (not part of the protocols)
    semantic: Any
    instance: Any
    semantic, instance = load_segmenters(settings)
    t_models = time.perf_counter() - t0
    cuda = str(getattr(semantic, "device", "cpu")).startswith("cuda")
    fwd_sem = ForwardTimer(semantic.predictor.network, cuda)
    fwd_ins = ForwardTimer(instance.network, cuda) if instance is not None else None
    t0 = time.perf_counter()
    discovery = participant.check_inputs(settings)
    t_discovery = time.perf_counter() - t0

    probe = PhaseProbe()
    install_probe(probe)
    helper_peaks = _watch_n4_helpers()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from spineps.errors import ScanFailuresError

    failed: Optional[dict[str, str]] = None
    t0 = time.perf_counter()
    try:
        participant.run_participant(settings, semantic, instance, discovery)  # looked up after wrapping
    except ScanFailuresError as exc:  # the scan failed: keep the timings up to the failure, say so
        failed = {k: str(v) for k, v in dict(getattr(exc, "failures", {}) or {}).items()} or {"scan": str(exc)}
    t_scan = time.perf_counter() - t0
    probe.finish()
    probe.unwrap()
    phases = {p: {"s": round(probe.wall.get(p, 0.0), 4), "peak_mib": round(probe.peak_kib.get(p, 0) / 1024, 1),
                  "calls": probe.calls.get(p, 0)} for p in PHASES}
    forward = fwd_sem.seconds + (fwd_ins.seconds if fwd_ins else 0.0)
    res = {
        "case": cfg["case"],
        "repeat": cfg["repeat"],
        "failed": failed,
        "seconds": {"import": round(t_import, 3), "model_load": round(t_models, 3),
                    "discovery": round(t_discovery, 3), "scan": round(t_scan, 3),
                    "forward_semantic": round(fwd_sem.seconds, 3),
                    "forward_instance": round(fwd_ins.seconds if fwd_ins else 0.0, 3),
                    "forward_total": round(forward, 3),
                    "non_network": round(t_scan - forward, 3)},
        "forward_calls": {"semantic": fwd_sem.calls, "instance": fwd_ins.calls if fwd_ins else 0},
        "engines": {"semantic": getattr(semantic, "engine", "torch"),
                    "instance": getattr(instance, "engine", "torch") if instance is not None else None},
        "non_network_fraction": round((t_scan - forward) / t_scan, 4) if t_scan > 0 else None,
        "phases": phases,
        "phase_peaks_reset": probe.can_reset,
        "peak_rss_mib_in_process": round(probe.process_peak_kib / 1024, 1),
        # N4 runs in a helper process (spineps.semantic.n4_helper): its own peak, and what this
        # process held meanwhile plus that (the process tree's peak during N4, an upper bound)
        "n4_helper_peak_mib": max(helper_peaks, default=None),
        "peak_rss_mib_with_n4_helper": round(max(probe.process_peak_kib / 1024,
                                                 phases["preprocess_n4"]["peak_mib"] + max(helper_peaks, default=0.0)),
                                             1),
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(semantic.device),
        "semantic_model": _model_info(semantic),
        "instance_model": _model_info(instance) if instance is not None else None,
        "shape": list(_image_shape(Path(cfg["bids_dir"]))),
    }
    return res

def _watch_n4_helpers() -> list[float]:
    """The peak RSS (MiB) of every N4 helper process of this run, as each reports it."""
    from spineps.semantic.n4_helper import N4Job

    peaks: list[float] = []
    plain = N4Job.wait

    def wait(self: Any) -> Any:
        try:
            return plain(self)
        finally:
            if self.info.get("peak_rss_mib") is not None:
                peaks.append(float(self.info["peak_rss_mib"]))

    N4Job.wait = wait  # type: ignore[method-assign]
    return peaks


def _model_info(model: Any) -> dict[str, Any]:
    from spineps.participant import model_provenance

    prov = model_provenance(model)
    keep = ("name", "version", "checksum", "folder", "epoch", "folds", "step_size", "mirroring", "network")
    return {k: prov[k] for k in keep if k in prov}

def _image_shape(bids: Path) -> tuple[int, ...]:
    import nibabel as nib

    img = next(bids.rglob("*_T2w.nii.gz"))
    image: Any = nib.load(str(img))  # an image class of nibabel's choosing
    return tuple(int(s) for s in image.shape)

def _spawn(cmd: list[str], result_file: Path, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
           timeout: float = 7200.0) -> dict[str, Any]:
    """Run a worker process; return its JSON result with the kernel's peak RSS of the
    process (``wait4``) and the wall time as seen from outside."""
    t0 = time.perf_counter()
    with open(result_file.with_suffix(".log"), "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_file.is_file():
        tail = result_file.with_suffix(".log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    res = json.loads(result_file.read_text())
    res["process_wall_s"] = round(wall, 3)
    # The worker's own high-water mark (VmHWM, read inside it) when it reports one: the kernel's
    # ru_maxrss of a child also counts the parent's RSS at fork time (the pre-exec image), which
    # made later cases of a run inherit this process's size (seen 2026-11-27: 789 MiB for a scan
    # whose worker peaked at 649 MiB).
    # With N4 in its helper process, the peak counts the helper too (``peak_rss_mib_with_n4_helper``).
    in_process = res.get("peak_rss_mib_with_n4_helper") or res.get("peak_rss_mib_in_process")
    res["peak_rss_mib_rusage"] = round(ru.ru_maxrss / 1024, 1)
    res["peak_rss_mib"] = round(in_process if in_process else ru.ru_maxrss / 1024, 1)
    return res

def resolved_precision(args: argparse.Namespace) -> str:
    from spineps.models.precision import resolve_precision

    return resolve_precision(args.precision, "cuda" if args.device == "cuda" else "cpu")

def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # no nnUNet_def_n_proc here: nnU-Net caps its inference threads at that value (a value of 1
    # made our forward passes 1.5x slower in the 2026-11-26 runs; the reference ignores it)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               PYTHONHASHSEED="0")
    for k in ("nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env

def run_ours(case: PreparedCase, repeat: int, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    out = run_dir / "ours" / case.spec.name / f"run{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = {"case": case.spec.name, "repeat": repeat, "bids_dir": str(case.bids_dir), "output_dir": str(out / "deriv"),
           "threads": args.threads, "device": args.device, "semantic_model": str(args.semantic_model),
           "instance_model": str(args.instance_model), "n4": not args.no_n4, "precision": args.precision,
           "engine": args.engine}
    cfg_file = out / "worker.json"
    cfg_file.write_text(json.dumps(cfg))
    res = _spawn([sys.executable, str(RUN_BENCHMARK), "--worker", str(cfg_file), "--result",
                  str(out / "result.json")], out / "result.json", env=worker_env(args.threads))
    res["outputs"] = {"semantic": _one(out / "deriv", "*_desc-spine_dseg.nii.gz"),
                      "instance": _one(out / "deriv", "*_desc-vertebrae_dseg.nii.gz")}
    return res

def run_reference(case: PreparedCase, repeat: int, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    out = run_dir / "reference" / case.spec.name / f"run{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    (out / "bids").mkdir(parents=True)
    image = out / "bids" / case.image.name
    shutil.copyfile(case.image, image)
    cfg = {"case": case.spec.name, "repeat": repeat, "image": str(image), "dataset": str(out / "bids"),
           "threads": args.threads, "device": args.device, "semantic_model": str(args.semantic_model),
           "instance_model": str(args.reference_instance_model), "n4": not args.no_n4}
    cfg_file = out / "worker.json"
    cfg_file.write_text(json.dumps(cfg))
    env = {k: v for k, v in worker_env(args.threads).items() if k != "PYTHONPATH"}
    py = Path(args.reference) / "bin" / "python"
    # cwd outside the repository, so the reference's own ``spineps`` package is the one imported
    res = _spawn([str(py), str(REFERENCE_WORKER), str(cfg_file), str(out / "result.json")], out / "result.json",
                 env=env, cwd=out)
    # the reference logs its N4 time; keep it (its main non-network cost)
    import re

    m = re.search(r"N4 Bias field correction done in ([0-9.]+) sec",
                  (out / "result.log").read_text(errors="replace"))
    res["seconds"]["n4"] = round(float(m.group(1)), 3) if m else None
    return res

def reference_instance_folder(folder: Path, work: Path) -> Path:
    """The instance model folder as the reference can load it: the same weights, with the
    hyper-parameters ``PLNet_new`` needs to rebuild a network of this width and input
    channel count (``dim``, ``num_channels``, ``opt.channelwise`` ...). The reference's
    legacy ``PLNet`` is fixed to width 16 with 10 channels and its ``PLNet_new`` defaults to
    width 8 with 11 channels; a width-8, 10-channel checkpoint loads only with these keys.
    Returns ``folder`` itself when its checkpoint already carries them (every checkpoint
    ``spineps.instance.checkpoint.save_instance_checkpoint`` writes, the bundled one included)."""
    import argparse as _argparse

    import torch

    from spineps.instance.checkpoint import REFERENCE_OPT_DEFAULTS

    from spineps.instance.checkpoint import detect_variant, network_state_dict, read_checkpoint_dict
    from spineps.instance.segmenter import find_weights

    weights = find_weights(folder)
    ck = read_checkpoint_dict(weights)
    hp = dict(ck.get("hyper_parameters") or {})
    opt = hp.get("opt")
    in_ch, dim = detect_variant(network_state_dict(ck, weights), weights)
    if (in_ch, dim) == (10, 16) or (isinstance(opt, _argparse.Namespace) and hasattr(opt, "channelwise")
                                    and hp.get("num_channels") == in_ch and hp.get("dim") == dim):
        return folder
    out = work / "reference_models" / folder.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copyfile(folder / "inference_config.json", out / "inference_config.json")
    fields = dict(REFERENCE_OPT_DEFAULTS, **(vars(opt) if isinstance(opt, _argparse.Namespace) else {}))
    fields["channelwise"] = True
    ck["hyper_parameters"] = {"opt": _argparse.Namespace(**fields), "do2D": False, "num_channels": in_ch, "dim": dim}
    torch.save(ck, str(out / weights.name))
    log.info("reference copy of the instance model (hyper-parameters for PLNet_new added): %s", out)
    return out

def _one(root: Path, pattern: str) -> Optional[str]:
    found = sorted(root.rglob(pattern))
    return str(found[0]) if found else None
