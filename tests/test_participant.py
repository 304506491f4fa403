"""The participant loop (in-process, with the test-only segmenters of tests/segmenters.py):
skip/resume, --overwrite, read-only input, per-scan failures, SIGTERM, sidecars; and the
model registry (precedence, dispatch, errors)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from spineps.cli.main import main
from spineps.cli.parser import build_parser
from spineps.errors import ModelError
from spineps.fsutil import TEMP_PREFIX
from spineps import loading
from spineps.models import registry
from spineps.settings import Settings
from tests.bids_factory import BidsFactory, phantom_data
from tests.segmenters import BandSemanticSegmenter, ComponentInstanceSegmenter, make_test_segmenters


@pytest.fixture
def ds(tmp_path: Path) -> BidsFactory:
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("02", acq="sag", seed=2)
    f.add("03", "a", acq="sag", seed=3)
    return f


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _run(ds: BidsFactory, out: Path, *extra: str) -> int:
    return main([str(ds.root), str(out), "participant", "--skip-bids-validation", *extra])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("sub-*/**/*") if p.is_file())


def _last_log(out: Path) -> str:
    return sorted((out / "logs").glob("participant_*.log"))[-1].read_text()


def test_rerun_skips_complete_scans_and_overwrite_recomputes(ds: BidsFactory, tmp_path: Path,
                                                              test_models: None) -> None:
    out = tmp_path / "out"
    assert _run(ds, out) == 0
    files = _outputs(out)
    assert len(files) == 3 * 8  # masks, sidecars, centroids, morphometry .tsv/.json, figure
    old = 1_000_000_000  # mark every output with an old mtime: a rewrite is then unmistakable
    for p in files:
        os.utime(p, ns=(old, old))
    assert _run(ds, out) == 0
    assert all(p.stat().st_mtime_ns == old for p in files)
    log = _last_log(out)
    assert log.count("outputs complete, skipped") == 3
    assert "3 scan(s): 0 processed, 3 skipped" in log

    assert _run(ds, out, "--overwrite", "--participant-label", "02") == 0
    changed = {p.relative_to(out).as_posix() for p in files if p.stat().st_mtime_ns != old}
    assert changed == {p.relative_to(out).as_posix() for p in files if "sub-02" in p.name}
    assert "1 scan(s): 1 processed, 0 skipped" in _last_log(out)


def test_incomplete_scan_is_recomputed(ds: BidsFactory, tmp_path: Path, test_models: None) -> None:
    out = tmp_path / "out"
    assert _run(ds, out) == 0
    sidecar = out / "sub-02/anat/sub-02_acq-sag_desc-vertebrae_dseg.json"
    sidecar.unlink()
    assert _run(ds, out) == 0
    assert sidecar.is_file()
    assert "1 processed, 2 skipped" in _last_log(out)


def test_read_only_bids_dir_is_never_written(ds: BidsFactory, tmp_path: Path, test_models: None) -> None:
    before = _snapshot(ds.root)
    modes = {p: p.stat().st_mode for p in [ds.root, *ds.root.rglob("*")]}
    for p in modes:  # read-only for real users; root ignores the bits, so the snapshot is what counts
        p.chmod(stat.S_IMODE(modes[p]) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        work = tmp_path / "work"
        assert _run(ds, tmp_path / "out", "-w", str(work)) == 0
        # also with validation on (the validator only reads)
        assert main([str(ds.root), str(tmp_path / "out2"), "participant"]) == 0
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert _snapshot(ds.root) == before
    assert (work / "pybids").is_dir() and not any((work / "pybids").iterdir())  # pybids index removed


def _truncated_scan(ds: BidsFactory, sub: str) -> Path:
    """A .nii.gz whose header reads but whose voxel data is cut short."""
    path = ds.add(sub, acq="sag", data=phantom_data((48, 64, 12), seed=7))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    return path


def test_corrupt_scan_fails_alone(ds: BidsFactory, tmp_path: Path, test_models: None,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = _truncated_scan(ds, "04")
    out = tmp_path / "out"
    rc = _run(ds, out)
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 scan(s) failed" in err and bad.relative_to(ds.root).as_posix() in err
    assert "truncated" in err or "corrupt" in err
    done = {p.name for p in _outputs(out)}
    for sub in ("01", "02"):
        assert f"sub-{sub}_acq-sag_desc-vertebrae_dseg.json" in done
    assert "sub-03_ses-a_acq-sag_desc-spine_dseg.json" in done
    assert not any("sub-04" in name for name in done)
    assert "3 processed, 0 skipped (outputs complete), 1 failed" in _last_log(out)
    # the group level still works on what finished
    assert main([str(ds.root), str(out), "group"]) == 0
    assert len((out / "group_T2w.tsv").read_text().splitlines()) == 1 + 3


class _Exploding(BandSemanticSegmenter):
    def segment(self, image):
        if image.data.shape == (24, 40, 9):
            raise RuntimeError("boom")
        return super().segment(image)


def test_unexpected_error_in_one_scan(ds: BidsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    ds.add("05", acq="sag", shape=(24, 40, 9))
    monkeypatch.setattr(loading, "load_segmenters", lambda s: (_Exploding(), ComponentInstanceSegmenter()))
    out = tmp_path / "out"
    assert _run(ds, out) == 1
    err = capsys.readouterr().err
    assert "sub-05/anat/sub-05_acq-sag_T2w.nii.gz" in err and "RuntimeError: boom" in err
    assert "Traceback" not in err  # one line without -vv
    assert "Traceback" in _last_log(out)  # the log file has it
    assert len([p for p in _outputs(out) if p.name.endswith("_dseg.json")]) == 3 * 2


def test_semantic_only_without_instance_model(ds: BidsFactory, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda s: make_test_segmenters(s, with_instance=False))
    out = tmp_path / "out"
    assert _run(ds, out) == 0
    names = sorted(p.name for p in _outputs(out))
    assert names == sorted(f"{stem}_desc-spine_{kind}" for stem in
                           ("sub-01_acq-sag", "sub-02_acq-sag", "sub-03_ses-a_acq-sag")
                           for kind in ("dseg.json", "dseg.nii.gz", "dseg.png", "morphometry.json", "morphometry.tsv"))
    assert main([str(ds.root), str(out), "group"]) == 0
    rows = (out / "group_T2w.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert header[0] == "bids_name"
    assert rows[1].split("\t")[header.index("levels")] == "n/a"


def test_sidecars_and_centroids(ds: BidsFactory, tmp_path: Path, test_models: None) -> None:
    out = tmp_path / "out"
    assert _run(ds, out, "--no-n4") == 0
    anat = out / "sub-03/ses-a/anat"
    sem = json.loads((anat / "sub-03_ses-a_acq-sag_desc-spine_dseg.json").read_text())
    inst = json.loads((anat / "sub-03_ses-a_acq-sag_desc-vertebrae_dseg.json").read_text())
    assert sem["Sources"] == ["bids:raw:sub-03/ses-a/anat/sub-03_ses-a_acq-sag_T2w.nii.gz"]
    assert inst["Sources"][1] == "bids::sub-03/ses-a/anat/sub-03_ses-a_acq-sag_desc-spine_dseg.nii.gz"
    assert sem["Manual"] is False and sem["SoftwareVersion"]
    assert sem["Models"]["semantic"]["Checksum"].startswith("sha256:")
    assert inst["Models"]["instance"]["Name"] == "test-components"
    assert sem["Parameters"]["n4"] is False and sem["Parameters"]["SettingsFile"].startswith("logs/")
    assert {"load", "semantic_total", "write"} <= set(sem["Timings"])
    # named by the real level naming on the fake instances (the fake numbers them 1..N only)
    assert inst["LevelNaming"]["rule"] and inst["LevelNaming"]["levels"]
    cent = json.loads((anat / "sub-03_ses-a_acq-sag_desc-vertebrae_centroids.json").read_text())
    assert list(cent["Vertebrae"]) == inst["LevelNaming"]["levels"]
    import nibabel as nib

    img = nib.load(str(anat / "sub-03_ses-a_acq-sag_desc-vertebrae_dseg.nii.gz"))
    src = nib.load(str(ds.root / "sub-03/ses-a/anat/sub-03_ses-a_acq-sag_T2w.nii.gz"))
    assert np.allclose(img.affine, src.affine) and img.shape == src.shape
    data = np.asarray(img.dataobj)
    for c in cent["Vertebrae"].values():
        vox = np.round(c["voxel"]).astype(int)
        world = img.affine[:3, :3] @ np.asarray(c["voxel"]) + img.affine[:3, 3]
        assert np.allclose(world, c["world"], atol=1e-2)
        assert data[tuple(vox)] == c["value"]  # the centre lies in its vertebra (convex slabs here)


class _SelfTerminating(BandSemanticSegmenter):
    calls: int = 0

    def segment(self, image):
        type(self).calls += 1
        if type(self).calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's time limit would
        return super().segment(image)


def test_sigterm_abandons_the_current_scan(ds: BidsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _SelfTerminating.calls = 0
    monkeypatch.setattr(loading, "load_segmenters", lambda s: (_SelfTerminating(), ComponentInstanceSegmenter()))
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)
    assert _run(ds, out) == 143
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored
    err = capsys.readouterr().err
    assert "sub-02/anat/sub-02_acq-sag_T2w.nii.gz" in err and "1 processed" in err
    names = {p.name for p in _outputs(out)}
    assert "sub-01_acq-sag_desc-vertebrae_dseg.json" in names
    assert not any(n.startswith("sub-02") for n in names)
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    # a rerun finishes the rest and skips what was done
    monkeypatch.setattr(loading, "load_segmenters", lambda s: make_test_segmenters(s))
    assert _run(ds, out) == 0
    assert "2 processed, 1 skipped" in _last_log(out)


def test_model_provenance_puts_name_version_checksum_first() -> None:
    from spineps.participant import model_provenance

    class A:
        name = "a"

        def provenance(self) -> dict:
            return {"name": "nn", "checksum": "ab12", "folds": (0, 1)}

    class B:
        name = "b"

        def provenance(self) -> dict:
            return {"checksum": "sha256:cd34", "log_name": "inst-v1"}

    assert model_provenance(A()) == {"name": "nn", "version": "unversioned", "checksum": "sha256:ab12",
                                     "Demonstration": False, "folds": [0, 1]}
    assert model_provenance(B()) == {"name": "b", "version": "inst-v1", "checksum": "sha256:cd34",
                                     "Demonstration": False, "log_name": "inst-v1"}
    assert list(model_provenance(A()))[:4] == ["name", "version", "checksum", "Demonstration"]


# ------------------------------------------------------------------------ registry
def _settings(tmp_path: Path, *args: str, environ: dict | None = None) -> Settings:
    (tmp_path / "bids").mkdir(exist_ok=True)
    ns = build_parser().parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", *args])
    return Settings.from_args(ns, environ or {})


def _model_folder(path: Path, modeltype: str) -> Path:
    path.mkdir(parents=True)
    (path / "inference_config.json").write_text(json.dumps({
        "log_name": f"{modeltype}-model", "modality": "T2w", "acquisition": "sag", "modeltype": modeltype,
        "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
        "resolution_range": [0.75, 0.75, 1.65], "default_step_size": 0.5, "labels": {"0": 0, "1": 49}}))
    return path


def test_model_precedence_flag_env_bundled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = _model_folder(tmp_path / "bundled_sem", "nnunet")
    monkeypatch.setattr(registry, "bundled_model_dir",
                        lambda name: bundled if name == registry.BUNDLED_SEMANTIC else None)
    sem, ins = registry.resolve_models(_settings(tmp_path))
    assert (sem.folder, sem.source) == (bundled, "bundled") and (ins.folder, ins.source) == (None, "none")
    sem, _ = registry.resolve_models(_settings(tmp_path, environ={"SPINEPS_SEMANTIC_MODEL": str(tmp_path / "e")}))
    assert (sem.folder, sem.source) == ((tmp_path / "e").resolve(), "env")
    sem, _ = registry.resolve_models(_settings(tmp_path, "--semantic-model", str(tmp_path / "f"),
                                               environ={"SPINEPS_SEMANTIC_MODEL": str(tmp_path / "e")}))
    assert (sem.folder, sem.source) == ((tmp_path / "f").resolve(), "flag")


def test_bundled_model_dir_needs_a_config() -> None:
    folder = registry.bundled_model_dir("no-such-model")
    assert folder is None
    found = registry.bundled_model_dir(registry.BUNDLED_SEMANTIC)
    assert found is None or (found / "inference_config.json").is_file()


def test_load_segmenters_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnunet -> NnUNetSemanticSegmenter.from_folder, unet -> UNetInstanceSegmenter.from_folder,
    with device, processes and N4 passed through; threads set once."""
    calls: list[tuple] = []

    class FakeSemantic:
        @classmethod
        def from_folder(cls, folder, **kw):
            calls.append(("semantic", Path(folder), kw))
            return BandSemanticSegmenter()

    class FakeInstance:
        @classmethod
        def from_folder(cls, folder, **kw):
            calls.append(("instance", Path(folder), kw))
            return ComponentInstanceSegmenter()

    monkeypatch.setitem(sys.modules, "spineps.semantic.predict",
                        types.SimpleNamespace(NnUNetSemanticSegmenter=FakeSemantic))
    monkeypatch.setitem(sys.modules, "spineps.instance.segmenter",
                        types.SimpleNamespace(UNetInstanceSegmenter=FakeInstance))
    sem_dir = _model_folder(tmp_path / "sem", "nnunet")
    ins_dir = _model_folder(tmp_path / "ins", "unet")
    import torch

    threads = torch.get_num_threads()
    try:
        s = _settings(tmp_path, "--semantic-model", str(sem_dir), "--instance-model", str(ins_dir), "--device", "cpu",
                      "--nprocs", "2", "--omp-nthreads", "1", "--no-n4")
        sem, ins = loading.load_segmenters(s)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert isinstance(sem, BandSemanticSegmenter) and isinstance(ins, ComponentInstanceSegmenter)
    # the segmenters get the threads of each step (--omp-nthreads 1), not the run's CPUs (--nprocs 2)
    assert calls == [("semantic", sem_dir.resolve(), {"device": "cpu", "nprocs": 1, "n4": False, "precision": "auto",
                                                      "engine": "auto", "allow_unsafe": False, "tta": False,
                                                      "probabilities": False, "n4_helper": True}),
                     ("instance", ins_dir.resolve(), {"device": "cpu", "nprocs": 1, "precision": "auto",
                                                     "engine": "auto"})]

    # a folder of the wrong type for its phase, and a loader that crashes: ModelError naming the folder
    s = _settings(tmp_path, "--semantic-model", str(sem_dir), "--instance-model", str(sem_dir), "--device", "cpu")
    with pytest.raises(ModelError, match="unet"):
        loading.load_segmenters(s)

    class Crashing:
        @classmethod
        def from_folder(cls, folder, **kw):
            raise KeyError("network_weights")

    monkeypatch.setitem(sys.modules, "spineps.semantic.predict",
                        types.SimpleNamespace(NnUNetSemanticSegmenter=Crashing))
    s = _settings(tmp_path, "--semantic-model", str(sem_dir), "--device", "cpu")
    with pytest.raises(ModelError) as exc:
        loading.load_segmenters(s)
    assert exc.value.exit_code == 78 and str(sem_dir.resolve()) in str(exc.value)
    assert "network_weights" in str(exc.value)


@pytest.mark.slow
def test_load_segmenters_builds_the_real_segmenters(tmp_path: Path) -> None:
    """The real loaders on the tiny random-weight folders the tests build (seconds), not fakes:
    the options of the run reach both segmenters."""
    torch = pytest.importorskip("torch")
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.semantic.predict import NnUNetSemanticSegmenter
    from tests.tiny_models import build_tiny_model_folders

    sem_dir, ins_dir = build_tiny_model_folders(tmp_path / "models")
    threads = torch.get_num_threads()
    try:
        s = _settings(tmp_path, "--semantic-model", str(sem_dir), "--instance-model", str(ins_dir), "--device", "cpu",
                      "--nprocs", "1", "--no-n4", "--precision", "fp32", "--engine", "torch")
        sem, ins = loading.load_segmenters(s)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(sem, NnUNetSemanticSegmenter) and isinstance(ins, UNetInstanceSegmenter)
    assert (sem.device.type, sem.n4, sem.nprocs, sem.precision, sem.engine) == ("cpu", False, 1, "fp32", "torch")
    assert (ins.device, ins.nprocs, ins.precision, ins.engine) == ("cpu", 1, "fp32", "torch")
    assert sem.provenance()["checksum"].startswith("sha256:") and ins.provenance()["checksum"].startswith("sha256:")
