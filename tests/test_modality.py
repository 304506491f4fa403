"""A ``--bids-filter-file`` that selects scans of another contrast (T1w) than the semantic
model's modality (T2w) is refused before any scan runs, unless ``--allow-modality-mismatch``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spineps import loading
from spineps.cli.main import main
from spineps.cli.parser import build_parser
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters


@pytest.fixture
def ds(tmp_path: Path) -> BidsFactory:
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("01", acq="sag", suffix="T1w", seed=3)
    return f


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _filter(tmp_path: Path, query: dict) -> str:
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({"t2w": query}))
    return str(path)


def test_t1w_selected_by_a_filter_is_refused(ds: BidsFactory, tmp_path: Path, test_models: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main([str(ds.root), str(out), "participant", "--skip-bids-validation",
               "--bids-filter-file", _filter(tmp_path, {"suffix": ["T1w", "T2w"]})])
    err = capsys.readouterr().err
    assert rc == 64, err
    assert "is for T2w scans" in err and "sub-01_acq-sag_T1w.nii.gz" in err and "--allow-modality-mismatch" in err
    assert not list(out.glob("sub-*"))  # refused before any scan


def test_allow_modality_mismatch_segments_them_with_a_warning(ds: BidsFactory, tmp_path: Path, test_models: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert "--allow-modality-mismatch" in build_parser().format_help()
    rc = main([str(ds.root), str(out), "participant", "--skip-bids-validation", "--allow-modality-mismatch",
               "--bids-filter-file", _filter(tmp_path, {"suffix": "T1w"})])
    assert rc == 0
    assert "not to be trusted" in capsys.readouterr().err
    assert (out / "sub-01/anat/sub-01_acq-sag_desc-spine_dseg.nii.gz").is_file()


@pytest.mark.slow
def test_the_real_segmenter_says_its_modality(tmp_path: Path, ds: BidsFactory, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The modality comes from the model folder's inference_config.json."""
    torch = pytest.importorskip("torch")
    from spineps.models import registry
    from tests.tiny_models import build_tiny_model_folders

    monkeypatch.setattr(registry, "bundled_model_dir", lambda name: None)
    sem, _inst = build_tiny_model_folders(tmp_path / "models")
    threads = torch.get_num_threads()
    try:
        rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--no-n4",
                   "--semantic-model", str(sem), "--device", "cpu", "--nprocs", "1",
                   "--bids-filter-file", _filter(tmp_path, {"suffix": "T1w"})])
    finally:
        torch.set_num_threads(threads)
    assert rc == 64 and "is for T2w scans" in capsys.readouterr().err
