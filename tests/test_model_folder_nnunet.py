"""The nnU-Net semantic model folder: a folder with the official release's layout (3 folds,
a custom trainer name, 3d_fullres, P-I-R, 0.75/0.75/1.65 mm) loads and predicts; broken
folders fail at load time with a ModelError naming the file and the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spineps.errors import ModelError
from spineps.geometry.volume import Volume
from spineps.models.nnunet_folder import inspect_nnunet_folder, load_checkpoint, load_nnunet_folder
from spineps.semantic.predict import NnUNetSemanticSegmenter
from spineps.training.semantic import LABEL_ORDER, build_random_model_folder

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def official_like(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_random_model_folder(tmp_path_factory.mktemp("models") / "T2w_semantic_official_like")


@pytest.fixture
def folder(official_like, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(official_like, tmp_path / "model"))


def _cfg(folder: Path) -> dict:
    return json.loads((folder / "inference_config.json").read_text())


def _write_cfg(folder: Path, cfg: dict) -> None:
    (folder / "inference_config.json").write_text(json.dumps(cfg))


def test_official_layout_loads_with_custom_trainer_and_predicts(official_like):
    seg = NnUNetSemanticSegmenter.from_folder(official_like, device="cpu", nprocs=1, n4=False)
    assert seg.loaded.trainer_name == "nnUNetTrainer_SpinepsLikeCustom"
    assert seg.loaded.configuration == "3d_fullres"
    assert seg.loaded.folder.folds == (0, 1, 2)
    assert len(seg.loaded.parameters) == 3
    assert seg.config.orientation == ("P", "I", "R")
    assert seg.config.spacing_min == (0.75, 0.75, 1.65)
    assert seg.mirroring is False
    img = Volume(np.random.default_rng(0).random((20, 40, 12)).astype(np.float32) * 300, np.diag([-0.9, -0.9, 1.8, 1]))
    mask = seg.segment(img)
    assert mask.same_grid(img) and mask.data.dtype == np.uint8
    assert set(np.unique(mask.data)) <= {0, *LABEL_ORDER}
    prov = seg.provenance()
    assert prov["folds"] == [0, 1, 2] and prov["step_size"] == 0.5 and prov["mirroring"] is False
    assert prov["spacing"] == [0.75, 0.75, 1.65] and prov["device"] == "cpu" and prov["checksum"].startswith("sha256:")


def test_folds_argument_selects_folds(official_like):
    loaded = load_nnunet_folder(official_like, folds=(1,))
    assert loaded.folder.folds == (1,) and len(loaded.parameters) == 1


def test_best_checkpoint_is_the_fallback(folder):
    (folder / "fold_1" / "checkpoint_final.pth").rename(folder / "fold_1" / "checkpoint_best.pth")
    info = inspect_nnunet_folder(folder)
    assert info.checkpoints[1].name == "checkpoint_best.pth"
    assert len(load_nnunet_folder(folder).parameters) == 3


def test_checkpoint_with_numpy_scalars_loads_weights_only(official_like, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="spineps.models.nnunet_folder"):
        ck = load_checkpoint(official_like / "fold_0" / "checkpoint_final.pth")
    assert "trusted" not in caplog.text  # the allow-list sufficed
    assert isinstance(ck["logging"]["mean_fg_dice"][0], np.floating)


def _expect(folder: Path, *needles: str, folds=None) -> ModelError:
    with pytest.raises(ModelError) as ei:
        NnUNetSemanticSegmenter.from_folder(folder, device="cpu", nprocs=1, folds=folds)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, msg
    return ei.value


def test_missing_plans(folder):
    (folder / "plans.json").unlink()
    _expect(folder, "plans.json", "missing")


def test_missing_dataset_json(folder):
    (folder / "dataset.json").unlink()
    _expect(folder, "dataset.json")


def test_missing_fold(folder):
    shutil.rmtree(folder / "fold_2")
    _expect(folder, "fold_2", "missing")


def test_requested_fold_missing(folder):
    _expect(folder, "fold_7", folds=(7,))


def test_no_checkpoint(folder):
    (folder / "fold_1" / "checkpoint_final.pth").unlink()
    _expect(folder, "fold_1", "no checkpoint")


def test_malformed_config_json(folder):
    (folder / "inference_config.json").write_text("{not json")
    _expect(folder, "inference_config.json", "JSON")


def test_malformed_plans_json(folder):
    (folder / "plans.json").write_text("[1, 2")
    _expect(folder, "plans.json")


def test_unknown_label_name(folder):
    cfg = _cfg(folder)
    cfg["labels"]["3"] = "banana"
    _write_cfg(folder, cfg)
    _expect(folder, "unknown label", "banana")


def test_label_index_the_network_does_not_have(folder):
    cfg = _cfg(folder)
    cfg["labels"]["40"] = 41
    _write_cfg(folder, cfg)
    _expect(folder, "40", "outputs")


def test_network_output_without_label(folder):
    cfg = _cfg(folder)
    del cfg["labels"]["5"]
    _write_cfg(folder, cfg)
    _expect(folder, "[5]", "no entry")


@pytest.mark.parametrize("key,value,needle", [
    ("available_folds", "3", "available_folds"),
    ("default_step_size", "0.5", "default_step_size"),
    ("model_expected_orientation", ["P", "I", "P"], "model_expected_orientation"),
    ("resolution_range", [0.75, 0.75], "resolution_range"),
    ("modality", "t2w", "modality"),
    ("modeltype", "unet", "nnunet"),
])
def test_wrong_types_and_values(folder, key, value, needle):
    cfg = _cfg(folder)
    cfg[key] = value
    _write_cfg(folder, cfg)
    _expect(folder, needle)


def test_checkpoint_without_weights(folder):
    p = folder / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(str(p), weights_only=False)
    del ck["network_weights"]
    torch.save(ck, str(p))
    _expect(folder, "fold_0", "network_weights")


def test_checkpoint_configuration_not_in_plans(folder):
    for f in range(3):
        p = folder / f"fold_{f}" / "checkpoint_final.pth"
        ck = torch.load(str(p), weights_only=False)
        ck["init_args"]["configuration"] = "2d"
        torch.save(ck, str(p))
    _expect(folder, "'2d'", "plans.json")


def test_folds_that_disagree_on_the_configuration(folder):
    p = folder / "fold_1" / "checkpoint_final.pth"
    ck = torch.load(str(p), weights_only=False)
    ck["init_args"]["configuration"] = "3d_lowres"
    torch.save(ck, str(p))
    _expect(folder, "fold_1", "disagree")


def test_corrupt_checkpoint(folder):
    (folder / "fold_2" / "checkpoint_final.pth").write_bytes(b"not a checkpoint at all")
    _expect(folder, "fold_2", "cannot be loaded")


def test_weights_that_do_not_fit_the_plans(folder):
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [3, 6, 12]
    (folder / "plans.json").write_text(json.dumps(plans))
    _expect(folder, "do not fit")


def test_errors_come_before_any_scan(folder):
    """from_folder validates everything: a broken later fold fails even though fold 0 is fine."""
    (folder / "fold_2" / "checkpoint_final.pth").write_bytes(b"")
    _expect(folder, "fold_2")


class _Payload:
    """Unpickling this creates a file: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant_payload(folder: Path, marker: Path) -> None:
    p = folder / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(str(p), weights_only=False)
    ck["extra"] = _Payload(marker)
    torch.save(ck, str(p))


def test_checkpoint_that_needs_full_unpickling_is_refused_unless_allowed(folder, tmp_path, caplog):
    """A checkpoint the safe loader refuses used to be unpickled in full silently (any code in
    a model folder ran): now it is a ModelError naming the option that allows it, and only that
    option (whose help says what it risks) loads it, with a warning."""
    import logging

    marker = tmp_path / "code-ran"
    _plant_payload(folder, marker)
    with pytest.raises(ModelError, match="--allow-unsafe-checkpoints") as err:
        load_checkpoint(folder / "fold_0" / "checkpoint_final.pth")
    assert "safe loader" in str(err.value) and not marker.exists()
    with pytest.raises(ModelError, match="--allow-unsafe-checkpoints"):
        NnUNetSemanticSegmenter.from_folder(folder, device="cpu", nprocs=1, n4=False)
    assert not marker.exists()
    with caplog.at_level(logging.WARNING, logger="spineps.models.nnunet_folder"):
        load_checkpoint(folder / "fold_0" / "checkpoint_final.pth", allow_unsafe=True)
    assert marker.exists() and "may run code" in caplog.text


def test_unsafe_checkpoint_option_on_the_command_line(folder, tmp_path, monkeypatch):
    from spineps.cli.main import main
    from spineps.cli.parser import build_parser
    from spineps.models import registry
    from tests.bids_factory import BidsFactory

    help_text = build_parser().format_help()
    assert "--allow-unsafe-checkpoints" in help_text and "runs any Python code" in " ".join(help_text.split())
    marker = tmp_path / "code-ran"
    _plant_payload(folder, marker)
    monkeypatch.setattr(registry, "bundled_model_dir", lambda name: None)
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    args = [str(ds.root), str(tmp_path / "out"), "participant", "--semantic-model", str(folder), "--device", "cpu",
            "--nprocs", "1", "--no-n4", "--skip-bids-validation"]
    assert main(args) == 78 and not marker.exists()
    threads = torch.get_num_threads()
    try:
        assert main(args + ["--allow-unsafe-checkpoints"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert marker.exists()
