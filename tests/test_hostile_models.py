"""Broken model folders through the real CLI and the real loaders (the registry,
``NnUNetSemanticSegmenter.from_folder``, ``UNetInstanceSegmenter.from_folder``): missing
files, a corrupt checkpoint, a config with wrong types or unknown labels, a checkpoint of
the wrong architecture. Each must stop the run with exit 78 and one line naming the folder
(or file) and the reason, before any scan is processed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from spineps.cli.main import main
from spineps.models import registry
from tests.bids_factory import BidsFactory

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random-weight semantic (nnU-Net) and instance (U-Net) folder in the released layouts."""
    from tests.tiny_models import build_tiny_model_folders

    return build_tiny_model_folders(tmp_path_factory.mktemp("models"))


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _sem_ckpt(folder: Path) -> Path:
    return next(folder.glob("fold_0/checkpoint_*.pth"))


def _inst_ckpt(folder: Path) -> Path:
    return next(folder.glob("*.ckpt"))


def _wrong_arch_plans(folder: Path) -> None:
    def change(plans: dict) -> None:
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [f * 2 + 1 for f in arch["features_per_stage"]]
    _edit_json(folder / "plans.json", change)


def _wrong_arch_instance(folder: Path) -> None:
    from spineps.instance.network import InstanceUNet3D

    net = InstanceUNet3D(10, 8)
    sd = {"network." + k: v for k, v in net.state_dict().items()}
    sd["network.final_conv.weight"] = torch.zeros(5, 8, 1, 1, 1)  # a 5-class head
    path = _inst_ckpt(folder)
    path.unlink()
    torch.save({"state_dict": sd, "epoch": 0}, folder / "model_weights.ckpt")


def _set(key: str, value: object) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        def change(cfg: dict) -> None:
            cfg[key] = value
        _edit_json(folder / "inference_config.json", change)
    return apply


def _unknown_label(folder: Path) -> None:
    def change(cfg: dict) -> None:
        cfg["labels"][next(iter(cfg["labels"]))] = "banana"
    _edit_json(folder / "inference_config.json", change)


#: (name, which folder is broken, how, words of the message)
MODEL_CASES: list[tuple[str, str, Callable[[Path], None], tuple[str, ...]]] = [
    ("semantic-folder-missing", "semantic", lambda f: shutil.rmtree(f), ("does not exist",)),
    ("semantic-config-missing", "semantic", lambda f: (f / "inference_config.json").unlink(),
     ("inference_config.json",)),
    ("semantic-config-not-json", "semantic", lambda f: (f / "inference_config.json").write_text("{oops"),
     ("inference_config.json", "JSON")),
    ("semantic-config-wrong-type", "semantic", _set("available_folds", "three"), ("available_folds",)),
    ("semantic-config-wrong-orientation", "semantic", _set("model_expected_orientation", ["P", "I", "P"]),
     ("model_expected_orientation",)),
    ("semantic-unknown-label", "semantic", _unknown_label, ("banana",)),
    ("semantic-plans-missing", "semantic", lambda f: (f / "plans.json").unlink(), ("plans.json",)),
    ("semantic-corrupt-checkpoint", "semantic", lambda f: _sem_ckpt(f).write_bytes(b"not a checkpoint"),
     ("fold_0", "cannot be loaded")),
    ("semantic-empty-checkpoint", "semantic", lambda f: _sem_ckpt(f).write_bytes(b""), ("fold_0",)),
    ("semantic-wrong-architecture", "semantic", _wrong_arch_plans, ("do not fit",)),
    ("semantic-is-an-instance-model", "semantic-as-instance", lambda f: None, ("nnunet",)),
    ("instance-corrupt-checkpoint", "instance", lambda f: _inst_ckpt(f).write_bytes(b"not a zip"),
     ("model_weights.ckpt",)),
    ("instance-no-checkpoint", "instance", lambda f: _inst_ckpt(f).unlink(), ("exactly one",)),
    ("instance-wrong-architecture", "instance", _wrong_arch_instance, ("final_conv",)),
    ("instance-config-wrong-type", "instance", _set("resolution_range", "fine"), ("resolution_range",)),
]


@pytest.mark.parametrize("name,which,breaker,needles", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_broken_model_folder_stops_before_any_scan(name: str, which: str, breaker: Callable[[Path], None],
                                                   needles: tuple[str, ...], pristine: tuple[Path, Path],
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(registry, "bundled_model_dir", lambda _name: None)
    monkeypatch.delenv("SPINEPS_SEMANTIC_MODEL", raising=False)
    monkeypatch.delenv("SPINEPS_INSTANCE_MODEL", raising=False)
    sem = Path(shutil.copytree(pristine[0], tmp_path / "sem"))
    inst = Path(shutil.copytree(pristine[1], tmp_path / "inst"))
    if which == "semantic-as-instance":
        sem, broken = inst, inst
    else:
        broken = sem if which == "semantic" else inst
        breaker(broken)
    ds = BidsFactory(tmp_path / "bids")
    ds.add("01", acq="sag")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        rc = main([str(ds.root), str(out), "participant", "--semantic-model", str(sem), "--instance-model", str(inst),
                   "--device", "cpu", "--nprocs", "1", "--omp-nthreads", "1", "--no-n4", "--skip-bids-validation"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 78, err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if " ERROR " in f" {ln} " or ln.startswith("spineps: error")]
    assert len(errors) == 1, err
    line = errors[0]
    assert str(broken.resolve()) in line or str(broken) in line, line
    for n in needles:
        assert n.lower() in line.lower(), line
    assert not [p for p in out.rglob("sub-*") if p.is_file()]  # no scan was touched
    log = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "[1/1]" not in log and "scan(s) selected" not in log
