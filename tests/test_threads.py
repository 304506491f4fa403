"""``--nprocs`` and ``--omp-nthreads`` with the real segmenters (tiny random-weight model
folders in the released layouts): every thread pool of the process stays within them, and
``--omp-nthreads`` is what each step uses (it used to be overridden by ``--nprocs``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from spineps import loading
from spineps.cli.parser import build_parser
from spineps.geometry.volume import Volume
from spineps.settings import Settings

torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.tiny_models import build_tiny_model_folders

    return build_tiny_model_folders(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    from spineps.semantic import preprocess

    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)  # restored afterwards (the loader sets a default)
    monkeypatch.setitem(preprocess._ITK_THREADS, "n", preprocess._ITK_THREADS["n"])
    threads, itk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk)


def _settings(tmp_path: Path, models: tuple[Path, Path], *args: str) -> Settings:
    (tmp_path / "bids").mkdir(exist_ok=True)
    ns = build_parser().parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                                    "--semantic-model", str(models[0]), "--instance-model", str(models[1]),
                                    "--device", "cpu", *args])
    return Settings.from_args(ns, environ={})


def _image() -> Volume:
    data = np.random.default_rng(0).random((16, 40, 10)).astype(np.float32) * 300
    return Volume(data, np.diag([-1.0, -1.0, 3.0, 1.0]))


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_omp_nthreads_is_what_each_step_uses(tmp_path: Path, tiny_models: tuple[Path, Path], engine: str,
                                            restore_threads: None, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    s = _settings(tmp_path, tiny_models, "--nprocs", "2", "--omp-nthreads", "1", "--precision", "fp32",
                  "--engine", engine)
    semantic, instance = loading.load_segmenters(s)
    assert instance is not None
    assert torch.get_num_threads() == 1  # --nprocs 2 used to win (set by the segmenters after --omp-nthreads)
    prov = semantic.provenance()
    assert prov["threads"] == 1 and semantic.engine == engine
    if engine == "onnxruntime":
        assert prov["engine"]["threads"] == 1  # the ONNX Runtime session's intra-op threads
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    with caplog.at_level(logging.DEBUG, logger="spineps.semantic.n4_helper"):
        mask = semantic.segment(_image())
    assert "with 1 ITK thread(s)" in caplog.text  # N4 (ITK, in its helper process)
    instance.segment(mask)
    assert torch.get_num_threads() == 1  # nnU-Net's helpers leave it as it was


def test_omp_nthreads_never_exceeds_nprocs(tmp_path: Path, tiny_models: tuple[Path, Path], restore_threads: None,
                                           caplog: pytest.LogCaptureFixture) -> None:
    s = _settings(tmp_path, tiny_models, "--nprocs", "1", "--omp-nthreads", "2", "--no-n4")
    assert s.threads == 1
    with caplog.at_level(logging.WARNING, logger="spineps.models.registry"):
        semantic, _ = loading.load_segmenters(s)
    assert "--omp-nthreads 2 is more than --nprocs 1" in caplog.text
    assert torch.get_num_threads() == 1 and semantic.provenance()["threads"] == 1
    s = _settings(tmp_path, tiny_models, "--nprocs", "2", "--no-n4")  # --omp-nthreads defaults to --nprocs
    semantic, _ = loading.load_segmenters(s)
    assert s.threads == 2 and torch.get_num_threads() == 2 and semantic.provenance()["threads"] == 2
