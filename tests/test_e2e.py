"""End to end: the BIDS-App on a mixed dataset (subjects, sessions, runs, chunks, an axial
T2w, a T1w, a mislabelled scan) with the test-only segmenters; the exact derivative tree,
BIDS validity, a run killed with SIGKILL, and two participant processes in parallel."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spineps.bids.derivatives import expected_outputs
from spineps.bids.discovery import Scan
from spineps.cli.main import main
from spineps.fsutil import TEMP_PREFIX
from spineps import loading
from spineps.models import registry
from tests.bids_factory import BidsFactory, standard_dataset
from tests.segmenters import make_test_segmenters

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "_run_with_test_models.py"

STEMS = [
    "sub-01/anat/sub-01_acq-sag",
    "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-1_chunk-1",
    "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-1_chunk-2",
    "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-2_chunk-1",
    "sub-02/ses-1/anat/sub-02_ses-1_acq-sag_run-2_chunk-2",
    "sub-02/ses-2/anat/sub-02_ses-2",
]
PER_SCAN = ["_desc-spine_dseg.json", "_desc-spine_dseg.nii.gz", "_desc-spine_dseg.png", "_desc-spine_morphometry.json",
            "_desc-spine_morphometry.tsv", "_desc-vertebrae_centroids.json", "_desc-vertebrae_dseg.json",
            "_desc-vertebrae_dseg.nii.gz"]
ROOT_FILES = [".bidsignore", "README.md", "dataset_description.json", "desc-spine_dseg.tsv", "desc-vertebrae_dseg.tsv"]
GROUP_FILES = ["group_T2w.json", "group_T2w.tsv", "group_T2w_failed.json", "group_T2w_failed.tsv",
               "group_T2w_levels.json", "group_T2w_levels.tsv", "group_T2w_report.html"]
LOG_RE = re.compile(r"^logs/(participant|group)_\d{8}T\d{9}Z_pid\d+(\.log|_settings\.json|_methods\.(md|bib|json))$")


def _group_files(stems: list[str]) -> list[str]:
    """The group level's tables and report, and one page per scan."""
    return GROUP_FILES + [f"group_T2w_scans/{Path(s).name}.html" for s in stems]


def _tree(out: Path) -> tuple[list[str], list[str]]:
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return [f for f in files if not f.startswith("logs/")], [f for f in files if f.startswith("logs/")]


def _validate(path: Path):
    from spineps.bids.validation import validate_dataset

    report = validate_dataset(path, derivative=True)
    if not report.available:
        pytest.skip(f"BIDS validator not available: {report.reason}")
    return report


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def test_participant_then_group_exact_tree_and_valid(tmp_path: Path, test_models: None) -> None:
    std = standard_dataset(tmp_path / "bids")
    out = tmp_path / "out"
    # input validation on (the dataset is valid BIDS), as `run.py DS OUT participant` would
    assert main([str(std.root), str(out), "participant"]) == 0
    assert main([str(std.root), str(out), "group"]) == 0

    files, logs = _tree(out)
    expected = sorted(ROOT_FILES + _group_files(STEMS) + [s + k for s in STEMS for k in PER_SCAN])
    assert files == expected
    assert len(logs) == 7 and all(LOG_RE.match(f) for f in logs), logs  # 2 logs + settings, participant methods
    assert [s + "_T2w.nii.gz" for s in STEMS] == std.expected

    report = _validate(out)
    assert report.ok, report.summary()

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "spineps"
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert "logs/" in ignore and "group_*" in ignore and "*_centroids.json" in ignore

    rows = [r.split("\t") for r in (out / "group_T2w.tsv").read_text().splitlines()]
    assert rows[0][0] == "bids_name"
    assert [r[0] for r in rows[1:]] == [Path(s).name for s in STEMS]
    columns = json.loads((out / "group_T2w.json").read_text())
    assert list(columns) == rows[0]
    vb = rows[0].index("vol_VB")
    assert all(float(r[vb]) > 0 for r in rows[1:])
    assert columns["vol_VB"]["Units"] == "mm^3"


def _expected_for(out: Path, bids: Path, relpath: str) -> list[Path]:
    return expected_outputs(out, Scan.from_path(bids / relpath, bids))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_completes(tmp_path: Path, test_models: None) -> None:
    ds = BidsFactory(tmp_path / "bids")
    scans = [ds.add(s, acq="sag", seed=i) for i, s in enumerate(("01", "02", "03"))]
    rel = [p.relative_to(ds.root).as_posix() for p in scans]
    out = tmp_path / "out"
    first = _expected_for(out, ds.root, rel[0])
    second = _expected_for(out, ds.root, rel[1])
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), str(ds.root), str(out), "participant", "--skip-bids-validation"],
        env=_env(SPINEPS_TEST_SIDECAR_DELAY="1.5"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # wait until scan 1 is complete and scan 2 has written its masks (its sidecars are pending)
        while not (all(p.is_file() for p in first) and second[-1].is_file()):  # [-1]: centroids, before sidecars
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run did not get to the second scan"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert all(p.is_file() for p in first)
    assert not all(p.is_file() for p in second), "the killed scan must not look complete"
    assert not any(p.is_file() for p in _expected_for(out, ds.root, rel[2]))

    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    log = sorted((out / "logs").glob("participant_*.log"))[-1].read_text()
    assert f"{rel[0]}: outputs complete, skipped" in log and "2 processed, 1 skipped" in log
    for r in rel:
        assert all(p.is_file() for p in _expected_for(out, ds.root, r))
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert _validate(out).ok


@pytest.mark.slow
def test_two_participant_processes_into_one_output_dir(tmp_path: Path) -> None:
    std = standard_dataset(tmp_path / "bids")
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(RUNNER), str(std.root), str(out), "participant",
                               "--skip-bids-validation", "--participant-label", sub, "-w", str(tmp_path / "work")],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for sub in ("01", "02")]
    results = [(p.wait(timeout=300), p.stderr.read().decode() if p.stderr else "") for p in procs]
    for rc, err in results:
        assert rc == 0, err
    files, logs = _tree(out)
    assert files == sorted(ROOT_FILES + [s + k for s in STEMS for k in PER_SCAN])
    assert len([f for f in logs if f.endswith(".log")]) == 2  # one log per process, never shared
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    report = _validate(out)
    assert report.ok, report.summary()


@pytest.mark.slow
def test_real_model_folders_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real registry and segmenters (nnU-Net semantic + cutout U-Net instance), with
    tiny random-weight model folders in the released layouts: checks the chain, not accuracy."""
    torch = pytest.importorskip("torch")
    from tests.tiny_models import build_tiny_model_folders

    threads = torch.get_num_threads()
    monkeypatch.setattr(registry, "bundled_model_dir", lambda name: None)
    sem, inst = build_tiny_model_folders(tmp_path)
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    out = tmp_path / "out"
    monkeypatch.setenv("SPINEPS_INSTANCE_MODEL", str(inst))  # the instance model through the environment
    try:
        rc = main([str(ds.root), str(out), "participant", "--semantic-model", str(sem), "--device", "cpu",
                   "--nprocs", "1", "--no-n4", "--skip-bids-validation"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    files, _ = _tree(out)
    assert files == sorted(ROOT_FILES + ["sub-01/anat/sub-01_acq-sag" + k for k in PER_SCAN])
    side = json.loads((out / "sub-01/anat/sub-01_acq-sag_desc-vertebrae_dseg.json").read_text())
    assert side["Models"]["semantic"]["Checksum"].startswith("sha256:")
    assert side["Models"]["instance"]["Checksum"].startswith("sha256:")
    assert side["Parameters"]["n4"] is False
    report = _validate(out)
    assert report.ok, report.summary()


@pytest.mark.slow
def test_demo_dataset_through_the_app(tmp_path: Path, test_models: None) -> None:
    """`spineps demo DIR`, then participant + group into DIR/derivatives/spineps (the README's quick start,
    with the test-only segmenters in place of the bundled models)."""
    pytest.importorskip("spineps.synth.demo", reason="spineps.synth.demo is not there yet")
    demo = tmp_path / "demo"
    out = demo / "derivatives" / "spineps"
    assert main(["demo", str(demo), "--subjects", "1"]) == 0
    raw_before = sorted(p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file())
    assert main([str(demo), str(out), "participant"]) == 0
    assert main([str(demo), str(out), "group"]) == 0
    assert sorted(p.relative_to(demo).as_posix() for p in demo.rglob("*")
                  if p.is_file() and out not in p.parents) == raw_before
    files, _ = _tree(out)
    assert files == sorted(ROOT_FILES + _group_files(["sub-01_acq-sag"])
                           + ["sub-01/anat/sub-01_acq-sag" + k for k in PER_SCAN])
    report = _validate(out)
    assert report.ok, report.summary()
