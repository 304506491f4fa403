"""The per-job cost of a participant process (issue 20): what it imports, the validator
running beside the model loading, and processes that share a cohort sharing its work (the
per-scan locks taken without waiting first, held scans taken up at the end)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spineps.cli.main import main
from spineps.fsutil import LockHeld, exclusive_lock
from spineps import loading
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "_run_with_test_models.py"

#: stacks a participant run on images does not use (torch.compile's, ONNX's, training's)
NOT_NEEDED = ("torch._dynamo", "torch._inductor", "sympy", "torch.distributed.fsdp", "onnx", "onnxruntime",
              "torch.onnx", "tensorboard", "lightning", "pytorch_lightning", "torchvision")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("nnUNet_compile", None)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


_MODULES_OF_A_RUN = """
import json, sys
from spineps.cli.main import main
code = main(sys.argv[2:])
json.dump({"code": code, "modules": sorted(sys.modules)}, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_participant_process_imports_only_what_the_run_needs(tmp_path: Path) -> None:
    """A whole participant run (real nnU-Net semantic folder and instance U-Net, tiny random
    weights; N4 and BIDS validation as by default) in a fresh process: none of the stacks of
    ``NOT_NEEDED`` is imported, nnU-Net's predictor is (the real one)."""
    pytest.importorskip("torch")
    from tests.tiny_models import build_tiny_model_folders

    sem, inst = build_tiny_model_folders(tmp_path / "models")
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    result = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", _MODULES_OF_A_RUN, str(result), str(ds.root), str(tmp_path / "out"),
                           "participant", "--semantic-model", str(sem), "--instance-model", str(inst),
                           "--device", "cpu", "--nprocs", "1"], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["code"] == 0
    modules = set(got["modules"])
    assert "nnunetv2.inference.predict_from_raw_data" in modules  # nnU-Net's own predictor ran
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_acq-sag_desc-vertebrae_dseg.json").is_file()
    heavy = sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in NOT_NEEDED))
    assert not heavy, f"a participant run imported {heavy}"
    # pandas (nnU-Net's import chain) stays a lazy module that never ran: none of its submodules
    assert not [m for m in modules if m.startswith("pandas.")], "a participant run loaded pandas"


_PREDICTOR_IMPORT = """
import json, sys
from spineps.models.nnunet_import import nnunet_predictor_class
cls = nnunet_predictor_class()
mod = sys.modules["nnunetv2.inference.predict_from_raw_data"]
out = {"class": f"{cls.__module__}.{cls.__qualname__}", "dynamo_after": "torch._dynamo" in sys.modules,
       "stand_in": mod.OptimizedModule.__module__}
out["pandas_lazy"] = type(sys.modules["pandas"]).__name__ == "_LazyModule" and "pandas.core" not in sys.modules
out["sitk_lazy"] = type(sys.modules["SimpleITK"]).__name__ == "_LazyModule" and "SimpleITK.SimpleITK" not in sys.modules
import torch._dynamo
out["real"] = f"{torch._dynamo.OptimizedModule.__module__}.{torch._dynamo.OptimizedModule.__qualname__}"
from nnunetv2.preprocessing.resampling import default_resampling  # uses pd in its functions
out["pandas_works"] = bool(default_resampling.pd.isna(float("nan"))) and "pandas.core" in sys.modules
from pandas import DataFrame
out["dataframe"] = DataFrame({"a": [1, 2]}).shape == (2, 1) and type(sys.modules["pandas"]).__name__ == "module"
import numpy as np
from spineps.semantic.preprocess import n4_correct  # imports SimpleITK when it runs
out["n4"] = n4_correct(np.ones((8, 8, 8), np.float32), (1.0, 1.0, 1.0)).shape == (8, 8, 8)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("compile_env", [None, "1"])
def test_nnunet_predictor_without_dynamo_and_with_it_when_compiling(compile_env: str) -> None:
    """nnU-Net's class itself, imported without ``torch._dynamo``; a later ``import
    torch._dynamo`` gets the real module; with ``nnUNet_compile`` set the full import is used."""
    pytest.importorskip("nnunetv2")
    env = _env(**({"nnUNet_compile": compile_env} if compile_env else {}))
    proc = subprocess.run([sys.executable, "-c", _PREDICTOR_IMPORT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == "nnunetv2.inference.predict_from_raw_data.nnUNetPredictor"
    assert out["real"] == "torch._dynamo.eval_frame.OptimizedModule"
    if compile_env:
        assert out["dynamo_after"] and out["stand_in"] == "torch._dynamo.eval_frame"
    else:
        assert not out["dynamo_after"] and out["stand_in"] == "spineps.models.nnunet_import"
        assert out["pandas_lazy"], "pandas ran while nnU-Net's predictor was imported"
        assert out["sitk_lazy"], "SimpleITK was loaded while nnU-Net's predictor was imported"
    assert out["pandas_works"] and out["dataframe"] and out["n4"]  # lazy modules load themselves on first use


# ----------------------------------------------------------------------------- validation beside model loading
def _fake_validator(tmp_path: Path, seconds: float, errors: int, name: str = "fake-validator") -> Path:
    """A validator that takes ``seconds``, reports ``errors`` errors and leaves ``<name>.done``."""
    issues = [{"code": "FAKE_ERROR", "severity": "error", "location": f"/f{i}"} for i in range(errors)]
    fake = tmp_path / name
    fake.write_text(f"#!/bin/sh\nsleep {seconds}\necho '{json.dumps({'issues': {'issues': issues}})}'\n"
                    f"touch '{fake}.done'\nexit {16 if errors else 0}\n")
    fake.chmod(0o755)
    return fake


def test_validation_starts_in_the_background(tmp_path: Path) -> None:
    from spineps.bids import validation as V

    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    t0 = time.monotonic()
    pending = V.start_validation(ds.root, validator=[str(_fake_validator(tmp_path, 1.0, errors=2))])
    assert time.monotonic() - t0 < 0.5  # returned at once
    report = pending.result()
    assert time.monotonic() - t0 >= 1.0
    assert report.available and not report.ok and len(report.errors) == 2
    pending = V.start_validation(ds.root, validator=[str(_fake_validator(tmp_path, 30, errors=0))], timeout=0.5)
    report = pending.result()
    assert not report.available and "did not finish" in report.reason


def test_models_load_while_the_validator_runs_and_its_verdict_comes_first(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The models are loaded while the validator runs (not after it); an invalid dataset
    still exits 16 before any scan, also when model loading fails meanwhile."""
    from spineps.bids import validation as V
    from spineps.errors import ModelError

    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    slow = _fake_validator(tmp_path, 6.0, errors=0, name="slow-validator")
    validator_done_at_load: list[bool] = []

    def load(settings: object) -> object:
        validator_done_at_load.append(Path(f"{slow}.done").exists())
        return make_test_segmenters(settings)

    monkeypatch.setattr(loading, "load_segmenters", load)
    monkeypatch.setattr(V, "find_validator", lambda: [str(slow)])
    assert main([str(ds.root), str(tmp_path / "out"), "participant"]) == 0
    assert validator_done_at_load == [False]  # the models were loaded while it ran
    assert Path(f"{slow}.done").exists()  # and its verdict was awaited

    monkeypatch.setattr(V, "find_validator", lambda: [str(_fake_validator(tmp_path, 0.5, errors=1))])
    assert main([str(ds.root), str(tmp_path / "out2"), "participant"]) == 16
    assert not list((tmp_path / "out2").rglob("*_dseg.nii.gz"))

    def broken(settings: object) -> object:
        raise ModelError("broken model folder")

    monkeypatch.setattr(loading, "load_segmenters", broken)
    assert main([str(ds.root), str(tmp_path / "out3"), "participant"]) == 16


# ----------------------------------------------------------------------------- work sharing
def test_lock_without_waiting_raises_while_held(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "scan.lock"
    code = ("import sys, time; from pathlib import Path; from spineps.fsutil import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True); time.sleep(1.5)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(lock)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    with pytest.raises(LockHeld):
        with exclusive_lock(lock, wait=False):
            pytest.fail("entered a held lock")
    assert lock.exists()  # the holder's file is left alone
    assert child.wait(timeout=60) == 0
    with exclusive_lock(lock, wait=False) as locked:
        assert locked
    assert not lock.exists()


def test_a_held_scan_is_left_for_the_end_and_computed_when_its_holder_gives_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds sub-01's lock (and does not complete it): this run computes
    sub-02 first, then comes back to sub-01, waits for the lock and computes it."""
    from spineps.bids.discovery import Scan

    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    ds.add("02", acq="sag", seed=2)
    out = tmp_path / "out"
    key = Scan.from_path(ds.root / "sub-01/anat/sub-01_acq-sag_T2w.nii.gz", ds.root).key
    lock = out / "logs" / "locks" / f"{key}.lock"
    code = ("import sys, time; from pathlib import Path; from spineps.fsutil import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True); time.sleep(3)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    assert holder.wait(timeout=60) == 0
    text = sorted((out / "logs").glob("participant_*.log"))[-1].read_text()
    assert "sub-01_acq-sag_T2w.nii.gz: another run is computing this scan; taking the next one" in text
    assert text.index("sub-02_acq-sag_T2w.nii.gz: done in") < text.index("sub-01_acq-sag_T2w.nii.gz: done in")
    assert "2 processed, 0 skipped" in text
    assert not list((out / "logs" / "locks").glob("*.lock"))


def test_a_session_with_a_held_station_is_left_for_the_end_without_keeping_its_other_locks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Work sharing on units (issue 18's sessions of stations): another process holds the
    lock of sub-01's second station. This run does not take sub-01's first station alone
    (it takes every station's lock or none, so none is held while it computes sub-02), computes
    sub-02's session, then comes back to sub-01, waits for the lock and names its two stations
    together."""
    from spineps import participant
    from spineps.bids.masks import mask_scan
    from spineps.synth.anatomy import PhantomSpec
    from spineps.synth.stations import even_cuts, write_station_dataset
    from tests.segmenters import ComponentInstanceSegmenter

    monkeypatch.setattr(loading, "load_instance_segmenter", lambda settings: ComponentInstanceSegmenter())
    spec = PhantomSpec(seed=2, fov="whole", spacing=(2.0, 2.0, 3.5))
    cuts = even_cuts(spec, 2, overlap_mm=40.0)
    ds = write_station_dataset(tmp_path / "ds", [(spec, cuts), (spec, cuts)], images=False)
    ref = ds / "derivatives" / "reference"
    out, locks = tmp_path / "out", tmp_path / "out" / "logs" / "locks"

    def lock_of(sub: str, k: int) -> Path:
        name = f"{sub}/ses-1/anat/{sub}_ses-1_acq-sag_chunk-{k}_desc-spine_dseg.nii.gz"
        return locks / f"{mask_scan(ref / name, ref).key}.lock"

    release = tmp_path / "release"
    code = ("import sys, time; from pathlib import Path; from spineps.fsutil import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True)\n"
            "    t = time.time()\n"
            "    while not Path(sys.argv[2]).exists() and time.time() - t < 120: time.sleep(0.05)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock_of("sub-01", 2)), str(release)], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    first_free, predict = [], participant._predict_station

    def predict_and_look(settings, scan, run):  # type: ignore[no-untyped-def]
        if scan.subject == "02" and not first_free:  # sub-01 deferred: is its first station's lock free?
            try:
                with exclusive_lock(lock_of("sub-01", 1), wait=False):
                    first_free.append(True)
            except LockHeld:
                first_free.append(False)
            release.touch()  # the holder gives up without completing sub-01
        return predict(settings, scan, run)

    monkeypatch.setattr(participant, "_predict_station", predict_and_look)
    capsys.readouterr()
    code_ = main(["instance", str(ref), str(out), "--nprocs", "1"])
    text = capsys.readouterr().err
    assert holder.wait(timeout=60) == 0
    assert code_ == 0, text[-3000:]
    assert first_free == [True]
    assert "sub-01_ses-1_acq-sag_chunk-2_desc-spine_dseg.nii.gz: another run is computing this station" in text
    assert "back to 2 scan(s) other runs were computing" in text
    second_pass = text.index("[1-2/4] sub-01/ses-1/anat/sub-01_ses-1_acq-sag_chunk-1_desc-spine_dseg.nii.gz, ")
    assert text.index("[3-4/4] sub-02") < second_pass
    assert "4 processed, 0 skipped" in text
    for sub in ("sub-01", "sub-02"):
        for k in (1, 2):
            side = out / sub / "ses-1" / "anat" / f"{sub}_ses-1_acq-sag_chunk-{k}_desc-vertebrae_dseg.json"
            assert len(json.loads(side.read_text())["Stations"]["NamedTogether"]) == 2
    assert not list(locks.glob("*.lock"))


_DONE = re.compile(r"(sub-\d+)_acq-sag_T2w\.nii\.gz: done in")
_SUMMARY = re.compile(r"summary: (\d+) scan\(s\): (\d+) processed, (\d+) skipped")


@pytest.mark.slow
def test_processes_started_together_share_a_cohort(tmp_path: Path) -> None:
    """Three real processes started at once on six scans into one output folder: each scan
    is computed exactly once, by whichever process took it first, and the work is spread
    over the processes (the first one does not do them all while the others wait)."""
    ds = BidsFactory(tmp_path / "bids")
    for i in range(1, 7):
        ds.add(f"{i:02d}", acq="sag", seed=i)
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(RUNNER), str(ds.root), str(out), "participant",
                               "--skip-bids-validation", "--nprocs", "1"], env=_env(SPINEPS_TEST_DELAY="3"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
    processed, done = [], []
    for proc in procs:
        assert proc.wait(timeout=600) == 0
        assert proc.stderr is not None
        text = proc.stderr.read().decode()
        proc.stderr.close()
        m = _SUMMARY.search(text)
        assert m, text[-2000:]
        processed.append(int(m.group(2)))
        done += _DONE.findall(text)
    assert sorted(done) == [f"sub-{i:02d}" for i in range(1, 7)]  # each scan computed once
    assert sum(processed) == 6
    assert sum(1 for n in processed if n > 0) >= 2, processed
    assert not list((out / "logs" / "locks").glob("*.lock"))


# ----------------------------------------------------------------------------- indexing one participant
def test_participant_labels_index_only_their_folders(tmp_path: Path) -> None:
    from spineps.bids.discovery import _LayoutHandle, discover_scans
    from spineps.errors import NoMatchError

    ds = BidsFactory(tmp_path / "bids")
    for sub in ("01", "010", "02"):
        ds.add(sub, acq="sag")
    handle = _LayoutHandle(ds.root, None, ["01"])
    assert handle.layout.get_subjects() == ["01"]  # not "010", not "02"
    found = discover_scans(ds.root, participant_labels=["01"])
    assert [s.subject for s in found.scans] == ["01"]
    found = discover_scans(ds.root, participant_labels=["sub-010", "02"])
    assert sorted(s.subject for s in found.scans) == ["010", "02"]
    assert len(discover_scans(ds.root).scans) == 3
    with pytest.raises(NoMatchError, match=r"sub-03 \(available: sub-01, sub-02, sub-010\)"):
        discover_scans(ds.root, participant_labels=["03"])


# ----------------------------------------------------------------------------- the benchmark's own parts
def _job_cost_module():  # benchmarks/job_cost.py, loaded by path
    import importlib.util

    spec = importlib.util.spec_from_file_location("job_cost", REPO / "benchmarks" / "job_cost.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_cost_timeline_wraps_the_steps_on_import_and_splits_imports() -> None:
    code = ("import sys, json, time; sys.path.insert(0, sys.argv[1])\n"
            "from jobcost.timeline import install\n"
            "tl = install(time.time())\n"
            "import spineps.bids.discovery as d\n"
            "try:\n    d.discover_scans('/nonexistent-dataset')\n"
            "except Exception as exc:\n    err = type(exc).__name__\n"
            "print(json.dumps({'wrapped': hasattr(d.discover_scans, '__wrapped__'), 'steps': tl.steps, 'err': err,"
            " 'imports': tl.import_s}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "benchmarks")], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["wrapped"] and out["err"] == "NoInputError" and out["imports"] > 0
    assert [s["step"] for s in out["steps"]] == ["indexing"] and out["steps"][0]["rss_after_mib"] > 0


def test_job_cost_fixed_cost_parts_add_up() -> None:
    jc = _job_cost_module()
    res = {"interpreter_s": 0.1, "first_voxel": {"at_s": 3.0, "imports_s": 2.0, "rss_mib": 400.0},
           "peak_rss_mib": 600.0,
           "steps": [{"step": "indexing", "s": 0.5, "imports_s": 0.3, "rss_after_mib": 80.0},
                     {"step": "model_loading", "s": 2.0, "imports_s": 1.5, "rss_after_mib": 390.0},
                     {"step": "validation", "s": 0.1, "imports_s": 0.0, "rss_after_mib": 390.0}]}
    parts = jc.fixed_cost(res)
    assert parts["before_first_voxel"] == 3.0 and parts["imports"] == pytest.approx(0.2)
    total = sum(v for k, v in parts.items() if k != "before_first_voxel")
    assert total == pytest.approx(3.0)
    assert jc.memory(res) == {"after_indexing": 80.0, "after_model_loading": 390.0, "after_validation": 390.0,
                              "floor_at_first_voxel": 400.0, "peak": 600.0}
    assert jc.tree_rss_mib(os.getpid()) > 0


def test_job_cost_fixed_cost_with_the_models_loading_after_the_first_voxel() -> None:
    """The N4 helper reads the first scan while the models load: the model loading is then
    no part of the cost before the first voxel, and is reported beside it."""
    jc = _job_cost_module()
    res = {"interpreter_s": 0.1, "first_voxel": {"at_s": 0.7, "imports_s": 0.4, "rss_mib": 70.0},
           "peak_rss_mib": 450.0,
           "steps": [{"step": "indexing", "start_s": 0.2, "s": 0.45, "imports_s": 0.3, "rss_after_mib": 70.0},
                     {"step": "model_loading", "start_s": 0.72, "s": 1.5, "imports_s": 1.4, "rss_after_mib": 340.0},
                     {"step": "validation", "start_s": 2.3, "s": 0.1, "imports_s": 0.0, "rss_after_mib": 340.0}]}
    parts = jc.fixed_cost(res)
    assert parts["before_first_voxel"] == 0.7
    assert parts["model_loading"] == 0.0 and parts["model_loading_imports"] == 0.0
    assert parts["model_loading_after_first_voxel"] == 1.5 and parts["validation_after_first_voxel"] == 0.1
    assert parts["imports"] == pytest.approx(0.1)
    total = sum(v for k, v in parts.items() if k != "before_first_voxel" and not k.endswith("_after_first_voxel"))
    assert total == pytest.approx(0.7)


_MODEL_LOADING = """
import json, sys
from pathlib import Path
from spineps.semantic.predict import NnUNetSemanticSegmenter
NnUNetSemanticSegmenter.from_folder(Path(sys.argv[1]), device="cpu", nprocs=1)
print(json.dumps({"sitk": type(sys.modules.get("SimpleITK")).__name__,
                  "sitk_loaded": "SimpleITK.SimpleITK" in sys.modules,
                  "pandas_loaded": any(m.startswith("pandas.") for m in sys.modules)}))
"""


@pytest.mark.slow
def test_loading_the_semantic_model_loads_neither_simpleitk_nor_pandas() -> None:
    """nnU-Net's plans handling imports its image readers (SimpleITK) and the predictor its
    resampling (pandas); both stay lazy until N4 (or anything else) uses them."""
    pytest.importorskip("nnunetv2")
    folder = Path(__file__).resolve().parents[1] / "spineps" / "data" / "models" / "t2w_semantic"
    proc = subprocess.run([sys.executable, "-c", _MODEL_LOADING, str(folder)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"sitk": "_LazyModule", "sitk_loaded": False, "pandas_loaded": False}, out


def test_stop_on_first_crash_with_a_held_scan_neither_waits_nor_computes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds sub-01's lock; sub-02 is broken. With --stop-on-first-crash the
    run defers sub-01, fails on sub-02 and stops there: it does not wait for sub-01's holder,
    and lists the deferred sub-01 and the untried sub-03 as not attempted."""
    from spineps.bids.discovery import Scan

    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    bad = ds.add("02", acq="sag", seed=2)
    ds.add("03", acq="sag", seed=3)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    out, release = tmp_path / "out", tmp_path / "release"
    key = Scan.from_path(ds.root / "sub-01/anat/sub-01_acq-sag_T2w.nii.gz", ds.root).key
    code = ("import sys, time; from pathlib import Path; from spineps.fsutil import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True)\n"
            "    t = time.time()\n"
            "    while not Path(sys.argv[2]).exists() and time.time() - t < 120: time.sleep(0.05)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / "logs" / "locks" / f"{key}.lock"), str(release)],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        rc = main([str(ds.root), str(out), "participant", "--skip-bids-validation", "--stop-on-first-crash"])
        assert holder.poll() is None  # the run ended while sub-01 was still held: it did not wait
    finally:
        release.touch()
        holder.wait(timeout=60)
    assert rc == 1
    text = sorted((out / "logs").glob("participant_*.log"))[-1].read_text()
    assert "sub-01_acq-sag_T2w.nii.gz: another run is computing this scan; taking the next one" in text
    assert "stopping at the first failure (--stop-on-first-crash): 2 scan(s) not attempted" in text
    assert ("not attempted (--stop-on-first-crash): 2 scan(s): sub-01/anat/sub-01_acq-sag_T2w.nii.gz, "
            "sub-03/anat/sub-03_acq-sag_T2w.nii.gz") in text
    assert not list(out.rglob("sub-01_*dseg*")) and not list(out.rglob("sub-03_*dseg*"))
