"""Whole-pipeline speed and peak memory per phase (CPU or CUDA), optionally side by side
with the reference implementation (SPINEPS 2.1.3 from PyPI, see ``reference_venv.sh``).

    .venv/bin/python benchmarks/run_benchmark.py [--cases whole,lumbar,real] [--repeats 3]
        [--threads N] [--device cpu|cuda|auto] [--semantic-model DIR] [--instance-model DIR]
        [--reference /tmp/spineps-ref-venv] [--reference-repeats N] [--work DIR]
        [--json benchmarks/results/cpu.json]

Cases (inputs are made once and cached under ``--work``):

- ``whole``: a whole-spine phantom (C1..sacrum) at NAKO-like geometry: 0.75 x 0.75 mm
  in-plane, 3.3 mm sagittal slices, three stitched stations (``spineps.synth``);
- ``lumbar``: a lumbar-only phantom at the same geometry, one station;
- ``real``: ``shared/data/real/SCT/sub-sctlumbar_T2w.nii.gz`` when present (else skipped);
- ``tiny``: a small coarse phantom for the smoke test (seconds with tiny models).

Every run of a case is a fresh process (``python run_benchmark.py --worker``) that loads
both models and runs the participant level (``spineps.participant.run_participant``) on a
one-scan BIDS dataset. Phases are timed by wrapping the pipeline's functions from outside
(exclusive time of the innermost active phase, like a profiler), and the peak RSS of each
phase is read from ``VmHWM`` after resetting it at each phase change
(``/proc/self/clear_refs``). Pure network time is measured with forward hooks on the two
networks, so the non-network overhead is visible as a fraction. The reference runs in its
own virtual environment through ``benchmarks/reference_worker.py`` on the same input
files and model folders; the outputs of both are compared label by label (Dice).

Prints a table and writes JSON (atomically). The median over ``--repeats`` runs is
reported; the machine load (``/proc/loadavg``) before and after is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
REAL_LUMBAR = REPO.parent / "shared" / "data" / "real" / "SCT" / "sub-sctlumbar_T2w.nii.gz"
REFERENCE_WORKER = REPO / "benchmarks" / "reference_worker.py"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "spineps-benchmark"

log = logging.getLogger("run_benchmark")

#: phases in pipeline order (what the table shows); "bookkeeping" is the participant loop
#: around the scan (output folder, lock, sidecar revocation)
PHASES = ("load", "preprocess_n4", "semantic_resample", "semantic_inference", "semantic_cleanup",
          "semantic_back_to_grid", "instance_resample", "instance_cutouts", "instance_forward", "instance_merge",
          "postprocess", "write", "measure", "figures", "bookkeeping")


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseSpec:
    name: str
    description: str
    fov: Optional[str] = None  # phantom field of view; None: a file
    spacing: tuple[float, float, float] = (0.75, 0.75, 3.3)  # P, I, R (mm)
    stations: int = 1
    seed: int = 0
    path: Optional[Path] = None

    def key(self) -> str:
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                           if k != "description"}, sort_keys=True)


CASES: dict[str, CaseSpec] = {
    "whole": CaseSpec("whole", "whole-spine phantom C1-sacrum, 0.75x0.75 mm in-plane, 3.3 mm sagittal slices, "
                      "3 stitched stations", fov="whole", stations=3, seed=4242),
    "lumbar": CaseSpec("lumbar", "lumbar phantom, 0.75x0.75 mm in-plane, 3.3 mm sagittal slices", fov="lumbar",
                       seed=4243),
    "real": CaseSpec("real", "real lumbar scan (SCT testing data, sub-sctlumbar_T2w)", path=REAL_LUMBAR),
    "tiny": CaseSpec("tiny", "small coarse lumbar phantom (smoke test)", fov="lumbar", spacing=(3.0, 3.0, 6.0),
                     seed=7),
}


@dataclass
class PreparedCase:
    spec: CaseSpec
    bids_dir: Path
    image: Path
    truth: Optional[Path]  # phantom ground-truth semantic mask


def prepare_case(spec: CaseSpec, work: Path) -> Optional[PreparedCase]:
    """A one-scan BIDS dataset for ``spec`` under ``work/inputs/<name>`` (made once, reused
    while the spec is unchanged). ``None`` when the case's file is absent."""
    import nibabel as nib
    import numpy as np

    root = work / "inputs" / spec.name
    bids = root / "bids"
    sub = f"sub-{spec.name}"
    image = bids / sub / "anat" / f"{sub}_acq-sag_T2w.nii.gz"
    truth = root / "truth_semantic.nii.gz" if spec.fov else None
    stamp = root / "spec.json"
    if stamp.is_file() and stamp.read_text() == spec.key() and image.exists():
        return PreparedCase(spec, bids, image, truth)
    if spec.path is not None and not Path(spec.path).is_file():
        log.warning("case %s skipped: %s is absent", spec.name, spec.path)
        return None
    shutil.rmtree(root, ignore_errors=True)
    image.parent.mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": f"spineps benchmark {spec.name}",
                                                               "BIDSVersion": "1.9.0"}))
    if spec.fov is None:
        shutil.copyfile(spec.path, image)  # a copy outside the repository (never committed)
    else:
        from spineps.synth.anatomy import PhantomSpec, make_phantom
        from spineps.synth.render import render_t2w

        t0 = time.perf_counter()
        ph = make_phantom(PhantomSpec(seed=spec.seed, fov=spec.fov, spacing=spec.spacing,
                                      orientation=("P", "I", "R"), stations=spec.stations))
        img = render_t2w(ph, seed=spec.seed, stations=spec.stations)
        nib.save(nib.Nifti1Image(np.asarray(img.data, np.float32), img.affine), str(image))
        nib.save(nib.Nifti1Image(np.asarray(ph.semantic.data, np.uint8), ph.semantic.affine), str(truth))
        log.info("made case %s %s in %.1f s", spec.name, img.shape, time.perf_counter() - t0)
    stamp.write_text(spec.key())
    return PreparedCase(spec, bids, image, truth)


# ----------------------------------------------------------------------------------------------
# measuring inside the worker
# ----------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PhaseProbe:
    """Exclusive wall time and peak RSS of named phases (innermost active phase wins).

    ``wrap(owner, attr, phase)`` replaces ``owner.attr`` by a timed wrapper. At every phase
    change the time since the last change and the high-water mark of the RSS (``VmHWM``) go
    to the phase that was active, then the high-water mark is reset (Linux ``clear_refs``
    5), so each phase gets its own peak. The process-wide peak is kept separately."""

    def __init__(self, outside: str = "outside") -> None:
        self.outside = outside
        self.stack: list[str] = []
        self.wall: dict[str, float] = defaultdict(float)
        self.peak_kib: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.process_peak_kib = _status_kib("VmHWM")
        self.can_reset = self._reset()
        self._t = time.perf_counter()
        self._wrapped: list[tuple[Any, str, Any]] = []

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def _switch(self) -> None:
        now = time.perf_counter()
        hwm = _status_kib("VmHWM")
        cur = self.stack[-1] if self.stack else self.outside
        self.wall[cur] += now - self._t
        self.peak_kib[cur] = max(self.peak_kib[cur], hwm)
        self.process_peak_kib = max(self.process_peak_kib, hwm)
        if self.can_reset:
            self._reset()
        self._t = time.perf_counter()

    def enter(self, name: str) -> None:
        self._switch()
        self.stack.append(name)
        self.calls[name] += 1

    def leave(self) -> None:
        self._switch()
        self.stack.pop()

    def wrap(self, owner: Any, attr: str, phase: str) -> None:
        orig = getattr(owner, attr)
        probe = self

        @functools.wraps(orig)
        def timed(*args: Any, **kwargs: Any) -> Any:
            probe.enter(phase)
            try:
                return orig(*args, **kwargs)
            finally:
                probe.leave()

        setattr(owner, attr, timed)
        self._wrapped.append((owner, attr, orig))

    def unwrap(self) -> None:
        for owner, attr, orig in reversed(self._wrapped):
            setattr(owner, attr, orig)
        self._wrapped.clear()

    def finish(self) -> None:
        self._switch()


class ForwardTimer:
    """Wall time inside a module's forward (outermost calls), through forward hooks;
    on CUDA the device is synchronised at both ends so the time is the kernels' time."""

    def __init__(self, module: Any, cuda: bool = False) -> None:
        import torch

        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._t = 0.0
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def pre(_m: Any, _inp: Any) -> None:
            if self._depth == 0:
                sync()
                self._t = time.perf_counter()
            self._depth += 1

        def post(_m: Any, _inp: Any, _out: Any) -> None:
            self._depth -= 1
            if self._depth == 0:
                sync()
                self.seconds += time.perf_counter() - self._t
                self.calls += 1

        self._handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def install_probe(probe: PhaseProbe) -> None:
    """Wrap the pipeline's functions with the phases of ``PHASES``."""
    import spineps.bids.derivatives as derivatives
    import spineps.fsutil as fsutil
    import spineps.geometry.io as gio
    import spineps.instance.merge as merge
    import spineps.labeling.levels as levels
    import spineps.measure.figures as figures
    import spineps.measure.scan as mscan
    import spineps.participant as participant
    import spineps.pipeline as pipeline
    import spineps.postprocess.consistency as consistency
    import spineps.postprocess.discs as discs
    import spineps.postprocess.vertebrae as vertebrae
    import spineps.resources as resources
    import spineps.semantic.predict as spredict
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    w = probe.wrap
    w(participant, "run_participant", "bookkeeping")
    w(participant, "process_scan", "write")  # its own code: dtype casts for saving, sidecar assembly
    w(gio, "read_header", "load")
    w(gio, "load_volume", "load")
    w(resources, "check_scan_resources", "load")
    w(participant, "_check_not_constant", "load")
    w(NnUNetSemanticSegmenter, "segment", "semantic_back_to_grid")  # its own code: back_to_grid, checks
    w(spredict, "preprocess_image", "preprocess_n4")
    w(NnUNetSemanticSegmenter, "to_model_grid", "semantic_resample")
    w(NnUNetSemanticSegmenter, "predict_indices", "semantic_inference")
    w(spredict, "clean_semantic", "semantic_cleanup")
    w(pipeline, "segment_scan", "postprocess")  # its own code: checks, result assembly
    w(UNetInstanceSegmenter, "segment", "instance_resample")  # its own code: timing
    w(UNetInstanceSegmenter, "_predict", "instance_resample")  # reorient, resample and back
    w(UNetInstanceSegmenter, "predict_model_grid", "instance_cutouts")  # centres, mapping, boxes
    w(UNetInstanceSegmenter, "forward_cutouts", "instance_forward")  # cutout extraction, one-hot, forward
    w(merge, "merge_cutout_predictions", "instance_merge")
    w(merge, "fill_unassigned", "instance_merge")
    w(pipeline, "postprocess", "postprocess")  # crop to the spine's box and back
    w(consistency, "make_consistent", "postprocess")
    w(vertebrae, "vertebra_centroids", "postprocess")
    w(discs, "assign_discs_and_endplates", "postprocess")
    w(levels, "name_levels", "postprocess")
    w(levels, "apply_naming", "postprocess")
    w(pipeline, "centroids_json", "postprocess")
    w(gio, "save_volume", "write")
    w(fsutil, "write_json_atomic", "write")
    w(derivatives, "write_sidecar", "write")
    w(mscan, "measure_scan", "measure")
    w(mscan, "write_measurements", "measure")
    w(figures, "write_figure", "figures")


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
        "cuda_peak_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if cuda else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(semantic.device),
        "semantic_model": _model_info(semantic),
        "instance_model": _model_info(instance) if instance is not None else None,
        "shape": list(_image_shape(Path(cfg["bids_dir"]))),
    }
    return res


def _model_info(model: Any) -> dict[str, Any]:
    from spineps.participant import model_provenance

    prov = model_provenance(model)
    keep = ("name", "version", "checksum", "folder", "epoch", "folds", "step_size", "mirroring", "network")
    return {k: prov[k] for k in keep if k in prov}


def _image_shape(bids: Path) -> tuple[int, ...]:
    import nibabel as nib

    img = next(bids.rglob("*_T2w.nii.gz"))
    return tuple(int(s) for s in nib.load(str(img)).shape)


# ----------------------------------------------------------------------------------------------
# running workers
# ----------------------------------------------------------------------------------------------
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
    in_process = res.get("peak_rss_mib_in_process")
    res["peak_rss_mib_rusage"] = round(ru.ru_maxrss / 1024, 1)
    res["peak_rss_mib"] = round(in_process if in_process else ru.ru_maxrss / 1024, 1)
    return res


def _resolved_precision(args: argparse.Namespace) -> str:
    from spineps.models.precision import resolve_precision

    return resolve_precision(args.precision, "cuda" if args.device == "cuda" else "cpu")


def _worker_env(threads: int) -> dict[str, str]:
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
    res = _spawn([sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_file), "--result",
                  str(out / "result.json")], out / "result.json", env=_worker_env(args.threads))
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
    env = {k: v for k, v in _worker_env(args.threads).items() if k != "PYTHONPATH"}
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


#: hyper-parameters the reference's ``PLNet_new`` (SPINEPS 2.1.3) reads when it rebuilds the
#: instance network from a checkpoint (``load_from_checkpoint`` passes them to ``__init__``)


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


# ----------------------------------------------------------------------------------------------
# agreement
# ----------------------------------------------------------------------------------------------
def dice_per_label(a: Any, b: Any, labels: Optional[Sequence[int]] = None) -> dict[int, Optional[float]]:
    """Dice of every label (except 0) present in either array (or of ``labels``); None where
    a label is absent from both."""
    import numpy as np

    a = np.asarray(a).astype(np.int64, copy=False).ravel()
    b = np.asarray(b).astype(np.int64, copy=False).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    vals = np.union1d(np.unique(a), np.unique(b)) if labels is None else np.asarray(sorted(set(labels)) or [0])
    vals = vals[vals != 0]
    if vals.size == 0:
        return {}
    lut_size = int(max(a.max(initial=0), b.max(initial=0), vals.max())) + 1
    lut = np.zeros(lut_size, np.int64)
    lut[vals] = np.arange(1, vals.size + 1)
    ia, ib = lut[a], lut[b]
    k = vals.size + 1
    conf = np.bincount(ia * k + ib, minlength=k * k).reshape(k, k)
    inter = np.diag(conf)[1:]
    sa = conf.sum(axis=1)[1:]
    sb = conf.sum(axis=0)[1:]
    out: dict[int, Optional[float]] = {}
    for v, i, x, y in zip(vals.tolist(), inter.tolist(), sa.tolist(), sb.tolist()):
        out[int(v)] = None if x + y == 0 else round(2.0 * i / (x + y), 4)
    return out


def matched_instance_dice(ours: Any, ref: Any) -> dict[str, Any]:
    """Instances compared regardless of their values: every reference instance is paired
    with the instance of ours it overlaps most; Dice per pair, and the mean."""
    import numpy as np

    a = np.asarray(ours).astype(np.int64, copy=False).ravel()
    b = np.asarray(ref).astype(np.int64, copy=False).ravel()
    fg = (a > 0) | (b > 0)
    a, b = a[fg], b[fg]
    pairs, counts = np.unique(np.stack([a, b]), axis=1, return_counts=True)
    size_a = dict(zip(*np.unique(a, return_counts=True)))
    size_b = dict(zip(*np.unique(b, return_counts=True)))
    best: dict[int, tuple[int, int]] = {}
    for (va, vb), c in zip(pairs.T.tolist(), counts.tolist()):
        if va and vb and c > best.get(vb, (0, 0))[1]:
            best[vb] = (va, c)
    dice = {}
    for vb, nb in size_b.items():
        if vb == 0:
            continue
        va, c = best.get(int(vb), (0, 0))
        dice[int(vb)] = round(2.0 * c / (nb + size_a.get(va, 0)), 4) if va else 0.0
    n_ours = sum(1 for v in size_a if v)
    return {"pairs": dice, "mean": round(float(np.mean(list(dice.values()))), 4) if dice else None,
            "instances_ours": n_ours, "instances_reference": len(dice)}


def agreement(ours_sem: str, ref_sem: str, ours_inst: Optional[str], ref_inst: Optional[str]) -> dict[str, Any]:
    """Dice per label of the two tools' outputs (on the input grid), and the voxel agreement."""
    import nibabel as nib
    import numpy as np

    def load(p: str) -> Any:
        return np.asanyarray(nib.load(p).dataobj)

    a, b = load(ours_sem), load(ref_sem)
    out: dict[str, Any] = {"semantic_dice": dice_per_label(a, b),
                           "semantic_voxel_agreement": round(float(np.mean(a == b)), 5),
                           "semantic_foreground_agreement": round(float(np.mean(a[(a > 0) | (b > 0)] ==
                                                                            b[(a > 0) | (b > 0)])), 5)
                           if np.any((a > 0) | (b > 0)) else None}
    if ours_inst and ref_inst:
        ia, ib = load(ours_inst), load(ref_inst)
        verts_a = np.where(ia < 100, ia, 0)
        verts_b = np.where(ib < 100, ib, 0)
        out["vertebra_dice_same_value"] = dice_per_label(verts_a, verts_b)
        out["vertebra_dice_matched"] = matched_instance_dice(verts_a, verts_b)
    return out


def truth_dice(mask: str, truth: str) -> dict[str, Any]:
    """Dice per semantic label against the phantom's ground truth (62 = endplates before the
    superior/inferior split is compared as one class with 62/63 of the output)."""
    import nibabel as nib
    import numpy as np

    m = np.asanyarray(nib.load(mask).dataobj).astype(np.int64)
    t = np.asanyarray(nib.load(truth).dataobj).astype(np.int64)
    m = np.where(m == 63, 62, m)
    d = dice_per_label(m, t, labels=[int(v) for v in np.unique(t) if v])
    vals = [v for v in d.values() if v is not None]
    return {"dice": d, "mean": round(float(np.mean(vals)), 4) if vals else None}


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------
def _median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return round(float(statistics.median(xs)), 3) if xs else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sec = {k: _median([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]}
    phases = {p: {"s": _median([r["phases"][p]["s"] for r in runs]),
                  "peak_mib": _median([r["phases"][p]["peak_mib"] for r in runs])} for p in PHASES}
    scan = sec["scan"] or 0.0
    return {
        "runs": len(runs),
        "failed_runs": sum(1 for r in runs if r.get("failed")),
        "failure": next((r["failed"] for r in runs if r.get("failed")), None),
        "seconds": sec,
        "seconds_all_runs": {"scan": [r["seconds"]["scan"] for r in runs],
                             "process_wall": [r["process_wall_s"] for r in runs]},
        "process_wall_s": _median([r["process_wall_s"] for r in runs]),
        "peak_rss_mib": _median([r["peak_rss_mib"] for r in runs]),
        "non_network_fraction": round(sec["non_network"] / scan, 4) if scan else None,
        "scans_per_hour": round(3600.0 / scan, 1) if scan else None,
        "phases": phases,
    }


def summarise_reference(runs: list[dict[str, Any]]) -> dict[str, Any]:
    sec = {k: _median([r["seconds"][k] for r in runs]) for k in runs[0]["seconds"]}
    return {"runs": len(runs), "seconds": sec, "process_wall_s": _median([r["process_wall_s"] for r in runs]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in runs]),
            "seconds_all_runs": {"scan": [r["seconds"]["scan"] for r in runs]},
            "version": runs[0].get("version"), "torch": runs[0].get("torch")}


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(fh.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cores_online": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": mem, "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": commit}


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def format_table(report: dict[str, Any]) -> str:
    cases = report["cases"]
    names = list(cases)
    lines = []
    head = f"{'phase':<24}" + "".join(f"{n + ' s':>12}{'peak MiB':>10}" for n in names)
    lines.append(head)
    lines.append("-" * len(head))
    for p in PHASES:
        row = f"{p:<24}"
        for n in names:
            ph = cases[n]["ours"]["phases"][p]
            row += f"{_fmt(ph['s']):>12}{_fmt(ph['peak_mib'], 0):>10}"
        lines.append(row)
    lines.append("-" * len(head))

    def line(label: str, get: Callable[[dict], Any], nd: int = 2) -> None:
        row = f"{label:<24}"
        for n in names:
            try:
                v = get(cases[n])
            except (KeyError, TypeError):
                v = None
            row += f"{_fmt(v, nd):>22}"
        lines.append(row)

    line("scan total s", lambda c: c["ours"]["seconds"]["scan"])
    line("  FAILED runs", lambda c: c["ours"]["failed_runs"] or None, 0)
    line("  network forward s", lambda c: c["ours"]["seconds"]["forward_total"])
    line("  non-network fraction", lambda c: c["ours"]["non_network_fraction"], 3)
    line("model load s", lambda c: c["ours"]["seconds"]["model_load"])
    line("process wall s", lambda c: c["ours"]["process_wall_s"])
    line("peak RSS MiB (process)", lambda c: c["ours"]["peak_rss_mib"], 0)
    line("scans per hour", lambda c: c["ours"]["scans_per_hour"], 0)
    if any("reference" in cases[n] for n in names):
        lines.append("-" * len(head))
        line("reference scan s", lambda c: c["reference"]["seconds"]["scan"])
        line("  reference N4 s", lambda c: c["reference"]["seconds"]["n4"])
        line("  reference forward s", lambda c: c["reference"]["seconds"]["forward_total"])
        line("reference process wall s", lambda c: c["reference"]["process_wall_s"])
        line("reference peak RSS MiB", lambda c: c["reference"]["peak_rss_mib"], 0)
        line("speed-up (scan)", lambda c: c["comparison"]["speedup_scan"])
        line("speed-up (process)", lambda c: c["comparison"]["speedup_process"])
        line("peak RSS ratio ours/ref", lambda c: c["comparison"]["peak_rss_ratio"], 3)
        line("semantic voxel agreement", lambda c: c["agreement"]["semantic_voxel_agreement"], 4)
        line("semantic mean Dice", lambda c: c["agreement"]["semantic_mean_dice"], 4)
        line("vertebra matched Dice", lambda c: c["agreement"]["vertebra_dice_matched"]["mean"], 4)
    if any("truth" in cases[n] for n in names):
        lines.append("-" * len(head))
        line("Dice vs phantom truth", lambda c: c["truth"]["ours"]["mean"], 3)
        line("ref Dice vs truth", lambda c: c["truth"]["reference"]["mean"], 3)
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """A short markdown summary of a result JSON (for the README): one row per case."""
    rows = ["| case | shape | scan s (median) | network s | non-network | N4 s | peak RSS MiB | reference scan s | "
            "reference peak MiB | speed-up | RSS ratio | semantic Dice vs ref | vertebra Dice vs ref |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, c in report["cases"].items():
        if "ours" not in c:
            rows.append(f"| {name} | skipped: {c.get('skipped', '')} |" + " |" * 11)
            continue
        o = c["ours"]
        ref, cmp_, agr = c.get("reference", {}), c.get("comparison", {}), c.get("agreement", {})
        vm = (agr.get("vertebra_dice_matched") or {}).get("mean")
        rows.append(" | ".join([
            f"| {name}", "x".join(str(s) for s in c["shape"]), _fmt(o["seconds"]["scan"], 1),
            _fmt(o["seconds"]["forward_total"], 1), _fmt(o["non_network_fraction"], 3),
            _fmt(o["phases"]["preprocess_n4"]["s"], 1), _fmt(o["peak_rss_mib"], 0),
            _fmt(ref.get("seconds", {}).get("scan"), 1), _fmt(ref.get("peak_rss_mib"), 0),
            _fmt(cmp_.get("speedup_scan"), 2), _fmt(cmp_.get("peak_rss_ratio"), 2),
            _fmt(agr.get("semantic_mean_dice"), 3), _fmt(vm, 3)]) + " |")
    return "\n".join(rows)


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="whole,lumbar,real", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--image", type=Path, action="append", default=[],
                    help="also benchmark this NIfTI file (a case named after the file; repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--semantic-model", type=Path, default=REPO / "spineps" / "data" / "models" / "t2w_semantic")
    ap.add_argument("--instance-model", type=Path, default=REPO / "spineps" / "data" / "models" / "instance")
    ap.add_argument("--reference", type=Path, default=None,
                    help="virtual environment of the reference (benchmarks/reference_venv.sh); off when absent")
    ap.add_argument("--reference-repeats", type=int, default=None, help="default: --repeats")
    ap.add_argument("--no-n4", action="store_true", help="both tools without N4")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="our networks' precision on CPU (the app's --precision; default auto = the app's default)")
    ap.add_argument("--engine", default="auto", choices=("auto", "torch", "onnxruntime"),
                    help="what runs our forward passes on CPU (the app's --engine; default auto = the app's default)")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="inputs (cached) and outputs")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/<device>.json")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                    help="print the table and a markdown summary of an existing result file, run nothing")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    if args.worker is not None:
        res = run_worker(json.loads(args.worker.read_text()))
        _write_json_atomic(args.result, res)
        return 0
    if args.summarize is not None:
        rep = json.loads(args.summarize.read_text())
        print("\n".join(rep.get("table", [])))
        print()
        print(format_markdown(rep))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    sys.path.insert(0, str(REPO))
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    specs = {n: CASES[n] for n in names}
    for img in args.image:
        stem = "".join(ch for ch in Path(img).name.split(".")[0] if ch.isalnum()) or "image"
        specs[stem] = CaseSpec(stem, f"file {img}", path=Path(img).resolve())
    for label, folder in (("semantic", args.semantic_model), ("instance", args.instance_model)):
        if not (Path(folder) / "inference_config.json").is_file():
            raise SystemExit(f"no {label} model folder at {folder} (inference_config.json missing)")
    ref_python = Path(args.reference) / "bin" / "python" if args.reference else None
    if ref_python is not None and not ref_python.is_file():
        log.warning("no reference venv at %s (run benchmarks/reference_venv.sh): reference skipped", args.reference)
        ref_python = None
    work = args.work.resolve()
    run_dir = work / "runs"
    if ref_python is not None:
        args.reference_instance_model = reference_instance_folder(Path(args.instance_model).resolve(), work)
    report: dict[str, Any] = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/run_benchmark.py " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "machine": machine_info(args.threads),
        "loadavg_start": _loadavg(),
        "device": args.device,
        "precision": args.precision,
        "precision_resolved": _resolved_precision(args),
        "engine": args.engine,
        "repeats": args.repeats,
        "note": args.note,
        "cases": {},
    }
    for name, spec in specs.items():
        case = prepare_case(spec, work)
        if case is None:
            report["cases"][name] = {"skipped": f"{spec.path} is absent"}
            continue
        log.info("case %s: %s", name, case.spec.description)
        ours: list[dict[str, Any]] = []
        refs: list[dict[str, Any]] = []
        ref_error: Optional[str] = None
        n_ref = (args.reference_repeats if args.reference_repeats is not None else args.repeats) if ref_python else 0
        # ours and the reference take turns, so a change of machine load hits both alike
        for r in range(max(args.repeats, n_ref)):
            if r < args.repeats:
                res = run_ours(case, r, args, run_dir)
                log.info("  ours run %d: scan %.2f s (forward %.2f s), process %.1f s, peak %.0f MiB", r,
                         res["seconds"]["scan"], res["seconds"]["forward_total"], res["process_wall_s"],
                         res["peak_rss_mib"])
                if res.get("failed"):
                    log.warning("  ours run %d: the scan FAILED: %s", r, res["failed"])
                ours.append(res)
            if r < n_ref and ref_error is None:
                try:
                    res = run_reference(case, r, args, run_dir)
                except RuntimeError as exc:
                    log.error("reference failed on %s: %s", name, exc)
                    ref_error = str(exc)[-3000:]
                    continue
                log.info("  reference run %d: scan %.2f s, process %.1f s, peak %.0f MiB", r,
                         res["seconds"]["scan"], res["process_wall_s"], res["peak_rss_mib"])
                refs.append(res)
        entry: dict[str, Any] = {"description": case.spec.description, "input": str(case.image),
                                 "shape": ours[0]["shape"], "ours": summarise(ours), "ours_runs": ours}
        if ref_error:
            entry["reference_error"] = ref_error
        report["machine"].setdefault("torch", ours[0]["torch"])
        report["machine"]["torch_threads"] = ours[0]["threads"]
        report.setdefault("models", {"semantic": ours[0]["semantic_model"], "instance": ours[0]["instance_model"]})
        if case.truth is not None and ours[0]["outputs"]["semantic"]:
            entry["truth"] = {"ours": truth_dice(ours[0]["outputs"]["semantic"], str(case.truth))}
        if refs:
            entry["reference"] = summarise_reference(refs)
            entry["reference_runs"] = refs
            o, f = entry["ours"], entry["reference"]
            entry["comparison"] = {
                "speedup_scan": round(f["seconds"]["scan"] / o["seconds"]["scan"], 2),
                "speedup_process": round(f["process_wall_s"] / o["process_wall_s"], 2),
                "peak_rss_ratio": round(o["peak_rss_mib"] / f["peak_rss_mib"], 3),
            }
            outs = refs[0].get("outputs", {})
            if outs.get("semantic") and ours[0]["outputs"]["semantic"]:
                agr = agreement(ours[0]["outputs"]["semantic"], outs["semantic"], ours[0]["outputs"]["instance"],
                                outs.get("instance"))
                vals = [v for v in agr["semantic_dice"].values() if v is not None]
                agr["semantic_mean_dice"] = round(sum(vals) / len(vals), 4) if vals else None
                entry["agreement"] = agr
                if case.truth is not None:
                    entry["truth"]["reference"] = truth_dice(outs["semantic"], str(case.truth))
        report["cases"][name] = entry
    report["loadavg_end"] = _loadavg()
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = {n: c for n, c in report["cases"].items() if "ours" in c}
    table = format_table({"cases": done}) if done else "(no case ran)"
    report["table"] = table.splitlines()
    out = args.json or (RESULTS / f"{'cpu' if args.device == 'cpu' else args.device}.json")
    _write_json_atomic(out, report)
    print(f"# {report['command']}")
    print(f"# {report['machine']['cpu']}, {report['machine']['cores_usable']} usable cores, torch "
          f"{report['machine'].get('torch')}, {args.threads} threads, device {args.device}; load average "
          f"{report['loadavg_start']} -> {report['loadavg_end']}; {report['started_utc']}")
    print(table)
    print(f"# JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
