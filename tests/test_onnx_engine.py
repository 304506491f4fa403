"""``--engine``: ONNX Runtime in place of torch for the network forward passes on CPU.

The engine must give the labels torch gives (float32 both), follow nnU-Net when it copies
another fold's weights into the network, fall back to torch for shapes it was not exported
for, and refuse combinations that cannot hold with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spineps.cli.parser import build_parser, build_subcommand_parser
from spineps.errors import ModelError, UsageError
from spineps.models import onnx_engine
from spineps.settings import Settings

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_engine_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    r = onnx_engine.resolve_engine
    assert r("auto", "cpu", "fp32") == "onnxruntime"
    assert r("auto", "cpu", "bf16") == "torch"  # bfloat16 autocast is a torch feature
    assert r("auto", "cuda", "fp16") == r("auto", "cuda:1", "fp16") == "torch"
    assert r("torch", "cpu", "fp32") == "torch"
    assert r("onnxruntime", "cpu", "fp32") == "onnxruntime"
    for device, precision, why in (("cuda", "fp16", "CPU only"), ("cpu", "bf16", "float32")):
        with pytest.raises(ValueError, match=why):
            r("onnxruntime", device, precision)
    with pytest.raises(ValueError, match="unknown engine"):
        r("tensorrt", "cpu", "fp32")
    monkeypatch.setattr(onnx_engine, "onnxruntime_available", lambda: False)
    assert r("auto", "cpu", "fp32") == "torch"  # not installed: torch, silently
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        r("onnxruntime", "cpu", "fp32")


def test_engine_option_settings_and_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "bids").mkdir()
    bids, out = str(tmp_path / "bids"), str(tmp_path / "out")
    s = Settings.from_args(build_parser().parse_args([bids, out, "participant"]), environ={})
    assert s.engine == "auto" and s.parameters()["engine"] == "auto"
    s = Settings.from_args(build_parser().parse_args([bids, out, "participant", "--engine", "torch"]), environ={})
    assert s.parameters()["engine"] == "torch"
    assert json.loads(s.to_json())["engine"] == "torch"
    assert build_subcommand_parser().parse_args(["instance", "m", "o", "--engine", "onnxruntime"]).engine == \
        "onnxruntime"
    for extra, why in ((["--precision", "bf16"], "float32"), (["--device", "cuda"], "CPU")):
        ns = build_parser().parse_args([bids, out, "participant", "--engine", "onnxruntime", *extra])
        with pytest.raises(UsageError, match=why):
            Settings.from_args(ns, environ={})
    with pytest.raises(UsageError):
        build_parser().parse_args([bids, out, "participant", "--engine", "tvm"])


def _random_semantic(tmp_path: Path, folds: int) -> Path:
    from spineps.training.semantic import build_random_model_folder

    return build_random_model_folder(tmp_path / "sem", folds=folds, spacing_pir=(2.0, 2.0, 3.0),
                                     patch_rip=(8, 16, 16), features=(2, 4, 4))


def _image(shape=(28, 40, 14), seed: int = 1):
    from spineps.geometry.volume import Volume

    rng = np.random.default_rng(seed)
    return Volume(rng.uniform(0, 1000, shape).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))


def test_semantic_engine_follows_every_fold_and_keeps_the_labels(tmp_path: Path, threads: None) -> None:
    """Two folds of different random weights: nnU-Net copies each into the network before
    its sliding window; a session that kept the first fold's weights would give other
    logits and labels than torch."""
    from spineps.models.nnunet_folder import load_nnunet_folder
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    folder = _random_semantic(tmp_path, folds=2)
    img = _image()
    plain = NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, engine="torch")
    ort = NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, engine="onnxruntime")
    assert (plain.engine, ort.engine) == ("torch", "onnxruntime")
    a, b = plain.predict_indices(img), ort.predict_indices(img)
    assert ort._ort is not None and ort._ort.calls > 0 and ort._ort.fallbacks == 0
    assert len(ort._ort._sessions) == 2  # one per fold
    # exported from a smaller traced input, then fixed to the tile shape
    assert ort._ort.trace_shape != ort._ort.input_shape
    assert np.array_equal(a, b)
    calls = ort._ort.calls
    assert np.array_equal(ort.predict_indices(img), a)  # the weights reloaded: sessions found again
    assert len(ort._ort._sessions) == 2 and ort._ort.calls == 2 * calls
    prov = ort.provenance()
    assert prov["engine"]["engine"] == "onnxruntime" and prov["engine"]["opset"] == onnx_engine.OPSET
    assert plain.provenance()["engine"] == "torch"

    # the logits themselves, one tile, against the torch forward of the same weights
    net = ort.predictor.network
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(1, *ort._ort.input_shape)).astype(np.float32))
    with torch.inference_mode():
        got, want = net(x), ort._ort._plain(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)
    # another spatial shape than the tile: torch runs it
    y = torch.zeros((1, ort._ort.input_shape[0], 16, 16, 16))
    with torch.inference_mode():
        assert net(y).shape[2:] == (16, 16, 16)
    assert ort._ort.fallbacks == 1


def test_bf16_switches_the_semantic_engine_back_to_torch(tmp_path: Path, threads: None) -> None:
    from spineps.models.nnunet_folder import load_nnunet_folder
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    seg = NnUNetSemanticSegmenter(load_nnunet_folder(_random_semantic(tmp_path, folds=1)), device="cpu", nprocs=1,
                                  engine="auto", precision="fp32")
    assert seg.engine == "onnxruntime"
    seg.set_cpu_bf16(True)
    assert seg.engine == "torch" and seg._ort is None and seg.cpu_bf16
    assert seg.predict_indices(_image()).shape == (28, 40, 14)
    bf16 = NnUNetSemanticSegmenter(load_nnunet_folder(_random_semantic(tmp_path / "b", folds=1)), device="cpu",
                                   nprocs=1, engine="auto", precision="bf16")
    assert bf16.engine == "torch"
    with pytest.raises(ModelError, match="float32"):
        NnUNetSemanticSegmenter(load_nnunet_folder(_random_semantic(tmp_path / "c", folds=1)), device="cpu",
                                nprocs=1, engine="onnxruntime", precision="bf16")


def test_missing_onnxruntime_is_a_model_error_before_any_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              threads: None) -> None:
    from spineps.models.nnunet_folder import load_nnunet_folder
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    monkeypatch.setattr(onnx_engine, "onnxruntime_available", lambda: False)
    folder = _random_semantic(tmp_path, folds=1)
    with pytest.raises(ModelError, match="pip install onnxruntime"):
        NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, engine="onnxruntime")
    assert NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, engine="auto").engine == "torch"


def test_auto_falls_back_to_torch_when_the_export_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture, threads: None) -> None:
    """A network ONNX Runtime cannot take: ``auto`` warns and stays on torch (the run goes on);
    ``onnxruntime`` asked for is a ModelError naming the folder, before any scan."""
    from spineps.models.nnunet_folder import load_nnunet_folder
    from spineps.semantic.predict import NnUNetSemanticSegmenter

    def refuse(self, *a, **k):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(onnx_engine.OrtForward, "__init__", refuse)
    folder = _random_semantic(tmp_path, folds=1)
    with caplog.at_level("WARNING", logger="spineps.models.onnx_engine"):
        seg = NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, engine="auto")
    assert seg.engine == "torch" and seg._ort is None
    assert "frobnicate" in caplog.text and "runs in torch" in caplog.text
    assert seg.predict_indices(_image()).shape == (28, 40, 14)
    with pytest.raises(ModelError, match="frobnicate.*--engine torch") as err:
        NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, engine="onnxruntime")
    assert str(folder) in str(err.value)


def test_instance_engine_gives_the_torch_instances(threads: None) -> None:
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.models.registry import BUNDLED_INSTANCE, bundled_model_dir
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    folder = bundled_model_dir(BUNDLED_INSTANCE)
    if folder is None:
        pytest.skip("no bundled instance model in this installation")
    ph = make_phantom(PhantomSpec(fov="lumbar", spacing=(1.5, 1.5, 4.0), seed=3))
    plain = UNetInstanceSegmenter.from_folder(folder, device="cpu", nprocs=1, precision="fp32", engine="torch")
    auto = UNetInstanceSegmenter.from_folder(folder, device="cpu", nprocs=1, precision="fp32", engine="auto")
    ort = UNetInstanceSegmenter.from_folder(folder, device="cpu", nprocs=1, precision="fp32", engine="onnxruntime")
    assert (plain.engine, auto.engine, ort.engine) == ("torch", "torch", "onnxruntime")  # auto: torch is faster here
    assert ort.provenance()["engine"]["engine"] == "onnxruntime" and not ort.channels_last
    from spineps.pipeline import segment_from_semantic

    a, b = (segment_from_semantic(ph.semantic, m, measure=False) for m in (plain, ort))
    assert ort._ort is not None and ort._ort.calls > 0 and ort._ort.fallbacks == 0
    assert np.array_equal(np.asarray(a.instance.data), np.asarray(b.instance.data))
    assert a.naming["levels"] == b.naming["levels"]
    with pytest.raises(ModelError, match="float32"):
        UNetInstanceSegmenter.from_folder(folder, device="cpu", nprocs=1, precision="bf16", engine="onnxruntime")


@pytest.mark.slow
def test_bundled_semantic_model_same_labels_in_both_engines(threads: None) -> None:
    from spineps.models.registry import BUNDLED_SEMANTIC, bundled_model_dir
    from spineps.semantic.predict import NnUNetSemanticSegmenter
    from spineps.synth.anatomy import PhantomSpec, make_phantom
    from spineps.synth.render import render_t2w

    folder = bundled_model_dir(BUNDLED_SEMANTIC)
    if folder is None:
        pytest.skip("no bundled semantic model in this installation")
    ph = make_phantom(PhantomSpec(seed=4242, fov="lumbar", spacing=(1.2, 1.2, 3.3), orientation=("P", "I", "R"),
                                  crop={"S": 30.0}))
    img = render_t2w(ph, seed=4242, randomize=False, supersample=False)
    masks = {}
    for engine in ("torch", "onnxruntime"):
        seg = NnUNetSemanticSegmenter.from_folder(folder, device="cpu", nprocs=2, n4=False, precision="fp32",
                                                  engine=engine)
        assert seg.engine == engine
        masks[engine] = np.asarray(seg.segment(img).data)
    a, b = masks["torch"], masks["onnxruntime"]
    assert (a > 0).sum() > 1000
    # float32 both ways; summation order differs, so a voxel whose two best logits tie within
    # ~1e-5 may flip: none did on this phantom, allow a handful
    assert np.count_nonzero(a != b) <= 5, np.count_nonzero(a != b)
