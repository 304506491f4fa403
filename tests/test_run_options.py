"""The options cluster users expect: --stop-on-first-crash, --mem-mb, --tta and
--save-probabilities (real nnU-Net predictor, real files; the descriptor and README list them)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from spineps import loading
from spineps.bids.validation import find_validator, validate_dataset
from spineps.cli.main import main
from spineps.failures import read_failures
from spineps.geometry.volume import Volume
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _three(tmp_path: Path, broken: bool = True) -> BidsFactory:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    bad = ds.add("02", acq="sag", seed=2)
    ds.add("03", acq="sag", seed=3)
    if broken:
        raw = bad.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    return ds


def _log(out: Path) -> str:
    return sorted((out / "logs").glob("participant_*.log"))[-1].read_text()


def test_stop_on_first_crash(tmp_path: Path, test_models: None) -> None:
    ds = _three(tmp_path)
    out = tmp_path / "out"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation", "--stop-on-first-crash"]) == 1
    assert list(out.rglob("sub-01_acq-sag_desc-spine_dseg.json")) and not list(out.rglob("sub-03_*"))
    text = _log(out)
    assert "stopping at the first failure (--stop-on-first-crash): 1 scan(s) not attempted" in text
    assert "not attempted (--stop-on-first-crash): 1 scan(s): sub-03/anat/sub-03_acq-sag_T2w.nii.gz" in text
    assert [r["bids_name"] for r in read_failures(out)] == ["sub-02_acq-sag"]
    # without it, the others finish
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 1
    assert list(out.rglob("sub-03_acq-sag_desc-spine_dseg.json"))


def test_mem_mb_replaces_the_detected_memory(tmp_path: Path, test_models: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _three(tmp_path, broken=False)
    out = tmp_path / "out"
    argv = [str(ds.root), str(out), "participant", "--skip-bids-validation"]
    assert main([*argv, "--mem-mb", "1"]) == 75  # every scan only lacked memory: temporary failure
    recs = read_failures(out)
    assert len(recs) == 3 and all(r["error"] == "ResourceError" and "(--mem-mb)" in r["reason"] for r in recs)
    monkeypatch.setenv("SPINEPS_MEMORY_LIMIT_MB", "1")  # the detected memory is too small ...
    assert main(argv) == 75
    assert main([*argv, "--mem-mb", "64000"]) == 0  # ... the budget given is used instead
    assert read_failures(out) == []


torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def random_models(tmp_path_factory) -> dict[bool, Path]:
    from spineps.training.semantic import build_random_model_folder

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    return {aug: build_random_model_folder(root / f"aug{int(aug)}", folds=1, inference_augmentation=aug)
            for aug in (False, True)}


def test_tta_mirrors_where_the_model_allows(random_models, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    img = Volume(np.random.default_rng(0).random((20, 40, 12)).astype(np.float32) * 300,
                 np.diag([-0.9, -0.9, 1.8, 1]))
    plain = NnUNetSemanticSegmenter.from_folder(random_models[True], device="cpu", nprocs=1, n4=False, tta=False)
    tta = NnUNetSemanticSegmenter.from_folder(random_models[True], device="cpu", nprocs=1, n4=False, tta=True)
    assert plain.mirroring is False and plain.predictor.use_mirroring is False
    assert tta.mirroring is True and tta.predictor.use_mirroring is True
    assert tta.provenance()["mirroring"] is True
    calls = {"n": 0}
    forward = tta.predictor.network.forward

    def counting(x):
        calls["n"] += 1
        return forward(x)

    tta.predictor.network.forward = counting
    assert tta.segment(img).same_grid(img)
    # the model has left/right labels: never mirrored left-right (network axis 0: P-I-R reversed)
    assert tta.tta_axes == (1, 2) and tta.provenance()["mirror_axes"] == [1, 2]
    assert calls["n"] >= 4 and calls["n"] % 4 == 0  # every tile plain and along the 3 combinations of 2 axes
    from spineps.training.semantic import build_random_model_folder

    no_sides = build_random_model_folder(tmp_path / "no_sides", folds=1, inference_augmentation=True,
                                         label_values=(49, 61, 100))
    assert NnUNetSemanticSegmenter.from_folder(no_sides, device="cpu", nprocs=1, n4=False, tta=True).tta_axes == \
        (0, 1, 2)
    with caplog.at_level(logging.WARNING, logger="spineps"):
        refused = NnUNetSemanticSegmenter.from_folder(random_models[False], device="cpu", nprocs=1, n4=False,
                                                      tta=True)
    assert refused.mirroring is False and "allows no test-time mirroring" in caplog.text


def test_save_probabilities_writes_a_valid_probseg(tmp_path: Path, random_models) -> None:
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    out = tmp_path / "out"
    argv = [str(ds.root), str(out), "participant", "--skip-bids-validation", "--semantic-model",
            str(random_models[False]), "--save-probabilities", "--tta", "--no-n4"]
    assert main(argv) == 0
    [prob] = out.rglob("*_desc-spine_probseg.nii.gz")
    img = nib.load(str(prob))
    sem = nib.load(str(next(out.rglob("*_desc-spine_dseg.nii.gz"))))
    # 16-bit fixed point (NIfTI has no float16): uint16 with scl_slope 1/65535
    assert img.get_data_dtype() == np.uint16 and img.shape == (*sem.shape, 15)
    assert np.allclose(img.affine, sem.affine) and img.dataobj.slope == pytest.approx(1 / 65535)
    data = img.get_fdata(dtype=np.float32)
    assert data.min() >= 0 and data.max() <= 1 and np.allclose(data.sum(axis=-1), 1.0, atol=0.02)
    meta = json.loads(prob.with_name(prob.name.replace(".nii.gz", ".json")).read_text())
    labels = meta["VolumeLabels"]
    assert len(labels) == 15 and labels[0] == {"index": 0, "value": 0, "name": "background"}
    assert meta["Sources"] == ["bids:raw:sub-01/anat/sub-01_acq-sag_T2w.nii.gz"]
    assert "allows no test-time mirroring" in _log(out)
    if find_validator() is not None:
        report = validate_dataset(out, derivative=True)
        assert report.ok, report.summary()
    # the map is part of a complete scan: a rerun skips it, a missing map recomputes it
    assert main(argv) == 0 and "outputs complete, skipped" in _log(out)
    prob.unlink()
    assert main(argv) == 0 and prob.is_file()


def test_readme_costs_are_the_benchmark_s() -> None:
    """The README's --tta / --save-probabilities costs are benchmarks/tta_probabilities.py's."""
    res = json.loads((REPO / "benchmarks" / "results" / "tta_probabilities.json").read_text())
    s, c = res["summary"], res["configs"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tta = (f"{s['tta_cpu_x']:g}x the CPU time of a whole participant run ({c['plain']['cpu_s']:.0f} -> "
           f"{c['tta']['cpu_s']:.0f} CPU-s for one demo scan")
    assert tta in readme and f"agree on {c['tta']['mask_agreement_with_plain']:.1%} of the voxels" in readme
    prob = (f"+{s['probabilities_extra_rss_mib']:.0f} MiB peak memory, +{s['probabilities_extra_cpu_s']:g} CPU-s "
            f"and {s['probseg_mib_per_scan']:g} MiB on disk for one demo scan")
    assert prob in readme
