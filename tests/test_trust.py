"""Outputs a user can trust (issue 17): a rerun with other models or other voxel-changing
options recomputes instead of keeping stale outputs (items 1), demonstration models are
named as such in the log, in every sidecar and in the group report (item 2), and the start
of a run names every model it uses (item 3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spineps import loading
from spineps.bids.derivatives import sidecar_mismatch
from spineps.cli.main import main
from spineps.group.report import ScanRecord, _demonstration_roles, demonstration_banner
from spineps.models import registry
from tests.bids_factory import BidsFactory
from tests.segmenters import BandSemanticSegmenter, ComponentInstanceSegmenter

SEM_SIDECAR = "sub-01/anat/sub-01_acq-sag_desc-spine_dseg.json"
INST_SIDECAR = "sub-01/anat/sub-01_acq-sag_desc-vertebrae_dseg.json"
SEM_MASK = "sub-01/anat/sub-01_acq-sag_desc-spine_dseg.nii.gz"


def _side(out: Path, rel: str = SEM_SIDECAR) -> dict:
    return json.loads((out / rel).read_text())


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr (the app's log lines, INFO and up) of one command line."""
    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- item 1, unit
def test_sidecar_mismatch_names_what_differs() -> None:
    models = {"semantic": {"name": "m", "checksum": "sha256:" + "a" * 64, "precision": "bf16",
                           "engine": {"engine": "onnxruntime", "threads": 2}, "step_size": 0.5},
              "instance": {"name": "i", "checksum": "sha256:" + "b" * 64}}
    sidecar = {"Models": {"semantic": {"Name": "m", "Checksum": "sha256:" + "a" * 64, "precision": "bf16",
                                       "engine": {"engine": "onnxruntime", "threads": 1}, "step_size": 0.5},
                          "instance": {"Name": "i", "Checksum": "sha256:" + "b" * 64}},
               "Parameters": {"n4": True, "level_rule": "auto"}}
    params = {"n4": True, "level_rule": "auto", "device": "cpu"}
    assert sidecar_mismatch(sidecar, models, params) is None  # threads do not change voxels
    assert "another semantic model" in sidecar_mismatch(sidecar, {**models, "semantic": {
        **models["semantic"], "checksum": "sha256:" + "c" * 64}}, params)
    assert "semantic precision was 'bf16', this run's is 'fp32'" in sidecar_mismatch(
        sidecar, {**models, "semantic": {**models["semantic"], "precision": "fp32"}}, params)
    assert "engine" in sidecar_mismatch(sidecar, {**models, "semantic": {**models["semantic"], "engine": "torch"}},
                                        params)
    assert "step_size" in sidecar_mismatch(sidecar, {**models, "semantic": {**models["semantic"], "step_size": 0.25}},
                                           params)
    assert "level_rule" in sidecar_mismatch(sidecar, models, {**params, "level_rule": "sacrum"})
    assert "top_vertebra" in sidecar_mismatch(sidecar, models, {**params, "top_vertebra": "T12"})
    assert "n4" in sidecar_mismatch(sidecar, models, {**params, "n4": False})
    assert "this run uses semantic" in sidecar_mismatch(sidecar, {"semantic": models["semantic"]}, params)
    assert "names no models" in sidecar_mismatch({}, models, params)


# --------------------------------------------------------------------------- item 1, test segmenters
@pytest.fixture
def ds(tmp_path: Path) -> BidsFactory:
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    return f


def test_rerun_with_other_models_or_options_recomputes(ds: BidsFactory, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before, a scan counted as complete when its files existed: a rerun with another model
    kept the old masks, exit 0."""
    percentile = {"value": 40.0}
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: (
        BandSemanticSegmenter(percentile=percentile["value"]), ComponentInstanceSegmenter()))
    out = tmp_path / "out"
    args = [str(ds.root), str(out), "participant", "--skip-bids-validation"]
    assert _run(args, capsys)[0] == 0
    first = _side(out)["Models"]["semantic"]["Checksum"]

    rc, text = _run(args, capsys)  # same models, same options: skipped
    assert rc == 0 and "outputs complete, skipped" in text

    percentile["value"] = 60.0  # "another model": another checksum
    rc, text = _run(args, capsys)
    assert rc == 0 and "outputs exist, but they were made with another semantic model" in text
    assert "recomputing" in text and _side(out)["Models"]["semantic"]["Checksum"] != first
    assert _side(out, INST_SIDECAR)["Models"]["semantic"]["Checksum"] == _side(out)["Models"]["semantic"]["Checksum"]

    for extra, word in ((["--level-rule", "count-from-top"], "level_rule"), (["--top-vertebra", "T12"], "top_vertebra"),
                        (["--no-n4"], "parameter n4")):
        args = args + extra  # one more option each time: the one that differs is named
        rc, text = _run(args, capsys)
        assert rc == 0 and f"{word} was" in text and "recomputing" in text, (extra, text)
        rc, text = _run(args, capsys)
        assert rc == 0 and "outputs complete, skipped" in text, extra

    (out / SEM_SIDECAR).write_text("{truncated")  # unreadable sidecar: not trusted
    rc, text = _run(args, capsys)
    assert rc == 0 and "cannot be read" in text and json.loads((out / SEM_SIDECAR).read_text())

    rc, text = _run(args + ["--overwrite"], capsys)  # --overwrite: recompute whatever the sidecars say
    assert rc == 0 and "1 processed" in text and "outputs exist" not in text


# --------------------------------------------------------------------------- item 2, units
def test_a_copy_of_a_bundled_model_is_a_demonstration_model(tmp_path: Path) -> None:
    bundled = registry.bundled_model_dir(registry.BUNDLED_INSTANCE)
    if bundled is None:
        pytest.skip("no bundled instance model in this installation")
    copy = Path(shutil.copytree(bundled, tmp_path / "my-official-model"))
    (copy / "MODEL_CARD.md").write_text("renamed, still the same weights\n")
    assert registry.demonstration_model(bundled) == registry.BUNDLED_INSTANCE
    assert registry.demonstration_model(copy) == registry.BUNDLED_INSTANCE
    (tmp_path / "other").mkdir()
    assert registry.demonstration_model(tmp_path / "other") is None


def test_group_banner_from_new_and_old_sidecars(tmp_path: Path) -> None:
    sem = tmp_path / "a_desc-spine_dseg.nii.gz"
    sem.with_name("a_desc-spine_dseg.json").write_text(json.dumps(
        {"Models": {"semantic": {"Checksum": "sha256:1", "Demonstration": True}}}))
    old = tmp_path / "b_desc-spine_dseg.nii.gz"  # written before the field existed: known by its checksum
    old.with_name("b_desc-spine_dseg.json").write_text(json.dumps(
        {"Models": {"semantic": {"Checksum": "sha256:1"}, "instance": {"Checksum": "sha256:bundled-inst"}}}))
    bundled = {"sha256:bundled-inst": "instance"}
    assert _demonstration_roles(sem, None, bundled) == ["semantic"]
    assert _demonstration_roles(old, None, bundled) == ["instance"]
    recs = [ScanRecord("a", "01", None, sem, None, demonstration=["semantic"]),
            ScanRecord("c", "02", None, sem, None)]
    banner = demonstration_banner(recs)
    assert 'id="demonstration-banner"' in banner and "1 of 2 scan(s)" in banner and "demonstration" in banner
    assert demonstration_banner(recs[1:]) == ""


# --------------------------------------------------------------------------- items 1-3, real segmenters
@pytest.fixture(scope="module")
def two_model_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Semantic folders A and B (B: other weights) and one instance folder, tiny, random."""
    pytest.importorskip("torch")
    from spineps.training.semantic import build_random_model_folder
    from tests.tiny_models import build_tiny_model_folders

    root = tmp_path_factory.mktemp("two_models")
    sem_a, inst = build_tiny_model_folders(root / "a")
    sem_b = build_random_model_folder(root / "b" / "sem", folds=1, spacing_pir=(2.0, 2.0, 3.0),
                                      patch_rip=(8, 16, 16), features=(2, 4, 4), seed=1)
    return sem_a, sem_b, inst


@pytest.fixture
def keep_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_model_folders_that_differ(ds: BidsFactory, tmp_path: Path, two_model_folders: tuple[Path, Path, Path],
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                       keep_threads: None) -> None:
    """The issue's case: a first run with one model folder, then the same command pointed at
    another one: the outputs are recomputed, the log says why, the sidecars name the new model.
    The start of each run names every model and where it came from; none is a demonstration."""
    from spineps.models.folder import folder_checksum

    sem_a, sem_b, inst = two_model_folders
    monkeypatch.setenv("SPINEPS_INSTANCE_MODEL", str(inst))
    out = tmp_path / "out"
    base = [str(ds.root), str(out), "participant", "--skip-bids-validation", "--device", "cpu", "--nprocs", "1",
            "--precision", "fp32", "--engine", "torch"]
    rc, text = _run(base + ["--semantic-model", str(sem_a)], capsys)
    assert rc == 0
    start = [ln for ln in text.splitlines() if "models in use:" in ln]
    assert len(start) == 1 and f"semantic = tiny-random-official-layout ({sem_a}, --semantic-model)" in start[0]
    assert f"({inst}, $SPINEPS_INSTANCE_MODEL)" in start[0] and "DEMONSTRATION" not in text
    side = _side(out)
    assert side["Models"]["semantic"]["Checksum"] == f"sha256:{folder_checksum(sem_a)}"
    assert side["Models"]["semantic"]["Demonstration"] is False and side["Models"]["instance"]["Demonstration"] is False

    rc, text = _run(base + ["--semantic-model", str(sem_a)], capsys)
    assert rc == 0 and "outputs complete, skipped" in text

    rc, text = _run(base + ["--semantic-model", str(sem_b)], capsys)
    assert rc == 0 and "they were made with another semantic model" in text and "recomputing" in text
    assert _side(out)["Models"]["semantic"]["Checksum"] == f"sha256:{folder_checksum(sem_b)}"
    assert _side(out, INST_SIDECAR)["Models"]["semantic"]["Checksum"] == f"sha256:{folder_checksum(sem_b)}"

    rc, text = _run(base + ["--semantic-model", str(sem_b), "--engine", "onnxruntime"], capsys)  # resolved engine
    assert rc == 0 and "semantic engine was 'torch', this run's is 'onnxruntime'" in text
    rc, text = _run(base[:-4] + ["--precision", "bf16", "--semantic-model", str(sem_b)], capsys)
    assert rc == 0 and "precision was 'fp32', this run's is 'bf16'" in text
    rc, text = _run(base[:-4] + ["--precision", "bf16", "--semantic-model", str(sem_b)], capsys)
    assert rc == 0 and "outputs complete, skipped" in text


@pytest.mark.slow
def test_bundled_models_are_named_demonstration_models(ds: BidsFactory, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], keep_threads: None) -> None:
    """The bundled models were the silent default: now a WARNING at the start of the run, a
    field in every sidecar's model provenance and a banner in the group report."""
    if registry.bundled_model_dir(registry.BUNDLED_SEMANTIC) is None:
        pytest.skip("no bundled semantic model in this installation")
    for name in ("SPINEPS_SEMANTIC_MODEL", "SPINEPS_INSTANCE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    rc, text = _run([str(ds.root), str(out), "participant", "--skip-bids-validation", "--device", "cpu",
                     "--nprocs", "1"], capsys)
    assert rc == 0
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if "models in use:" in ln)
    assert "semantic = " in lines[start] and "instance = " in lines[start]
    assert lines[start].count("bundled with spineps, a DEMONSTRATION model") == 2
    warning = next(ln for ln in lines if "WARNING" in ln and "demonstration model" in ln)
    assert lines.index(warning) < next(i for i, ln in enumerate(lines) if "scan(s) selected" in ln)
    for rel in (SEM_SIDECAR, INST_SIDECAR):
        for role in ("semantic", "instance"):
            entry = _side(out, rel)["Models"][role]
            assert entry["Demonstration"] is True and "demonstration" in entry["DemonstrationNotice"]
    rc, text = _run([str(ds.root), str(out), "group"], capsys)
    assert rc == 0 and "segmented with demonstration models" in text
    html = (out / "group_T2w_report.html").read_text()
    assert 'id="demonstration-banner"' in html and "1 of 1 scan(s)" in html
