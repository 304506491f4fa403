"""The benchmark harness (``benchmarks/run_benchmark.py``): its measuring pieces on known
inputs, and one smoke run of the whole script on a tiny scan with tiny random-weight model
folders (checks that it runs and reports every phase, not how fast anything is)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import mmap
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rb = _load_module("spineps_run_benchmark", REPO / "benchmarks" / "run_benchmark.py")


def test_dice_per_label_known_values() -> None:
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros_like(a)
    a[0, :2] = 41  # 8 voxels
    b[0, :1] = 41  # 4 voxels, all inside a's
    a[3] = 100  # 16 voxels, b has none
    b[2, 0, 0] = 60  # only in b
    d = rb.dice_per_label(a, b)
    assert d == {41: round(2 * 4 / 12, 4), 60: 0.0, 100: 0.0}
    assert rb.dice_per_label(a, a) == {41: 1.0, 100: 1.0}
    # asked-for labels absent from both come back as None
    assert rb.dice_per_label(a, a, labels=[41, 49]) == {41: 1.0, 49: None}
    with pytest.raises(ValueError):
        rb.dice_per_label(a, b[:2])


def test_matched_instance_dice_ignores_values() -> None:
    ours = np.zeros((10, 4, 4), np.uint16)
    ref = np.zeros_like(ours)
    ours[0:3] = 20
    ours[5:8] = 21
    ref[0:3] = 2  # same object, other value
    ref[5:7] = 3  # 2/3 of ours' 21
    ref[9] = 4  # no partner
    m = rb.matched_instance_dice(ours, ref)
    assert m["pairs"] == {2: 1.0, 3: round(2 * 32 / (32 + 48), 4), 4: 0.0}
    assert m["instances_ours"] == 2 and m["instances_reference"] == 3


def test_phase_probe_exclusive_time_and_own_peaks() -> None:
    def inner() -> int:
        # ~40 MiB of fresh pages, touched: an anonymous mapping of its own (malloc may hand
        # back heap memory that is already resident after earlier tests, which raises no peak)
        with mmap.mmap(-1, 40 * 2 ** 20) as big:
            big.write(b"\1" * len(big))
            time.sleep(0.3)
            return big[0]

    def outer() -> int:
        time.sleep(0.05)
        return ns.inner() + 1

    ns = SimpleNamespace(inner=inner, outer=outer)
    probe = rb.PhaseProbe()
    probe.wrap(ns, "inner", "b")
    probe.wrap(ns, "outer", "a")
    assert ns.outer() == 2
    probe.finish()
    probe.unwrap()
    assert ns.inner is inner and ns.outer is outer
    assert probe.calls == {"a": 1, "b": 1}
    assert probe.wall["a"] >= 0.05 and probe.wall["b"] >= 0.3
    assert probe.wall["a"] < probe.wall["b"]  # exclusive time: a's excludes b's
    assert probe.process_peak_kib >= max(probe.peak_kib.values())
    if probe.can_reset:  # each phase has its own high-water mark
        assert probe.peak_kib["b"] - probe.peak_kib["a"] > 30 * 1024


def test_phase_probe_notices_an_ignored_peak_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    # a kernel that accepts the clear_refs write but keeps the high-water mark (seen on a CI
    # machine): the probe must say its per-phase peaks are not per phase
    mod = sys.modules[rb.PhaseProbe.__module__]
    real = mod.status_kib
    monkeypatch.setattr(mod, "status_kib", lambda key: real(key) + (500 * 1024 if key == "VmHWM" else 0))
    probe = rb.PhaseProbe()
    assert probe.can_reset is False
    monkeypatch.setattr(mod, "status_kib", real)
    probe = rb.PhaseProbe()
    monkeypatch.setattr(mod, "status_kib", lambda key: real(key) + (500 * 1024 if key == "VmHWM" else 0))
    probe.enter("a")  # a reset that stops working later is noticed at the next phase change
    probe.leave()
    assert probe.can_reset is False


def test_forward_timer_counts_outermost_calls_only() -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    timer = rb.ForwardTimer(net)
    inner = rb.ForwardTimer(net[0])
    with torch.inference_mode():
        for _ in range(3):
            net(torch.zeros(2, 4))
    timer.remove()
    net(torch.zeros(2, 4))
    assert timer.calls == 3 and inner.calls == 4
    assert timer.seconds >= 0.0


def test_reference_instance_folder_keeps_weights_and_adds_hyper_parameters(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from spineps.instance.checkpoint import load_instance_checkpoint, read_checkpoint_dict, save_instance_checkpoint
    from spineps.instance.network import InstanceUNet3D

    src = tmp_path / "instance"
    src.mkdir()
    (src / "inference_config.json").write_text(json.dumps({"modeltype": "unet", "modality": "SEG"}))
    torch.manual_seed(0)
    save_instance_checkpoint(src / "instance_weights.ckpt", InstanceUNet3D(10, 8), hyper_parameters={"dim": 8})
    assert rb.reference_instance_folder(src, tmp_path / "work0") == src  # our checkpoints load as they are
    # a checkpoint written without the reference's keys (as ours were before 2026-11-27)
    ck = read_checkpoint_dict(src / "instance_weights.ckpt")
    ck["hyper_parameters"] = {"opt": argparse.Namespace(dim=8), "do2D": False}
    torch.save(ck, str(src / "instance_weights.ckpt"))
    out = rb.reference_instance_folder(src, tmp_path / "work")
    assert out != src and (out / "inference_config.json").is_file()
    ck = read_checkpoint_dict(out / "instance_weights.ckpt")  # still loads with weights_only
    hp = ck["hyper_parameters"]
    assert hp["num_channels"] == 10 and hp["dim"] == 8 and hp["opt"].channelwise is True
    assert hp["opt"].dim == 8  # the original options are kept
    a = load_instance_checkpoint(src / "instance_weights.ckpt").network.state_dict()
    b = load_instance_checkpoint(out / "instance_weights.ckpt").network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rb.reference_instance_folder(out, tmp_path / "work2") == out  # already compatible: used as it is


@pytest.mark.slow
def test_benchmark_script_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole script on a tiny scan (one fresh worker process, tiny random models)."""
    torch = pytest.importorskip("torch")
    import nibabel as nib

    from spineps.instance.checkpoint import save_instance_checkpoint
    from spineps.instance.network import InstanceUNet3D
    from spineps.training.instance import TrainConfig, model_config_dict
    from spineps.training.semantic import build_random_model_folder

    sem = build_random_model_folder(tmp_path / "sem", folds=1, spacing_pir=(3.0, 3.0, 6.0), patch_rip=(8, 16, 16),
                                    features=(2, 4, 4))
    inst = tmp_path / "inst"
    inst.mkdir()
    cfg = TrainConfig(out=inst, spacing=(3.0, 3.0, 6.0), cutout_size=(24, 40, 16), corpus_size_cleaning=10,
                      vert_size_threshold=4)
    (inst / "inference_config.json").write_text(json.dumps(model_config_dict(cfg)))
    torch.manual_seed(0)
    save_instance_checkpoint(inst / "model_weights.ckpt", InstanceUNet3D(10, 8))
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 100, (12, 40, 30)).astype(np.float32)
    img[4:8, 5:35, 10:20] += 800.0
    scan = tmp_path / "tiny_T2w.nii.gz"
    nib.save(nib.Nifti1Image(img, np.diag([3.0, 1.5, 1.5, 1.0])), str(scan))
    out_json = tmp_path / "res.json"
    rc = rb.main(["--cases", "", "--image", str(scan), "--repeats", "1", "--threads", "1", "--semantic-model",
                  str(sem), "--instance-model", str(inst), "--no-n4", "--work", str(tmp_path / "work"), "--json",
                  str(out_json)])
    assert rc == 0
    rep = json.loads(out_json.read_text())
    case = rep["cases"]["tinyT2w"]
    assert set(case["ours"]["phases"]) == set(rb.PHASES)
    assert case["ours"]["seconds"]["scan"] > 0 and case["ours"]["peak_rss_mib"] > 50
    assert case["ours"]["phases"]["semantic_inference"]["s"] > 0
    assert case["ours_runs"][0]["forward_calls"]["semantic"] >= 1
    assert 0.0 <= case["ours"]["non_network_fraction"] <= 1.0
    assert rep["machine"]["torch"].startswith("2.") and rep["machine"]["threads"] == 1
    printed = capsys.readouterr().out
    assert "semantic_inference" in printed and "scan total s" in printed
    assert rb.main(["--summarize", str(out_json)]) == 0  # the README summary from the JSON
    assert "| tinyT2w | 12x40x30 |" in capsys.readouterr().out


def test_semantic_channels_last_gives_the_same_labels_and_bf16_is_opt_in(tmp_path: Path) -> None:
    """The semantic segmenter's CPU speed options: ``channels_last`` changes no label;
    both are off by default; ``cpu_bf16`` can be switched on and off again."""
    torch = pytest.importorskip("torch")
    from spineps.geometry.volume import Volume
    from spineps.models.nnunet_folder import load_nnunet_folder
    from spineps.semantic.predict import NnUNetSemanticSegmenter
    from spineps.training.semantic import build_random_model_folder

    threads = torch.get_num_threads()
    folder = build_random_model_folder(tmp_path / "sem", folds=1, spacing_pir=(2.0, 2.0, 3.0), patch_rip=(8, 16, 16),
                                       features=(2, 4, 4))
    rng = np.random.default_rng(1)
    img = Volume(rng.uniform(0, 1000, (20, 24, 12)).astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    try:
        plain = NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, channels_last=False)
        default = NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1)
        assert not default.channels_last and not default.cpu_bf16
        fast = NnUNetSemanticSegmenter(load_nnunet_folder(folder), device="cpu", nprocs=1, channels_last=True)
        assert fast.channels_last and not plain.channels_last and not fast.cpu_bf16
        conv = next(m for m in fast.predictor.network.modules() if isinstance(m, torch.nn.Conv3d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        a, b = plain.predict_indices(img), fast.predict_indices(img)
        assert np.array_equal(a, b)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)  # kept after nnU-Net reloads weights
        fast.set_cpu_bf16(True)
        assert fast.cpu_bf16 and fast.provenance()["precision"] == "bf16"
        assert fast.predict_indices(img).shape == a.shape
        fast.set_cpu_bf16(False)
        assert "forward" not in vars(fast.predictor.network)
        assert np.array_equal(fast.predict_indices(img), a)
    finally:
        torch.set_num_threads(threads)


def test_worker_environment_does_not_cap_nnunet_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net runs its sliding window with at most ``nnUNet_def_n_proc`` threads: the
    benchmark workers must not inherit a small value (it made our forward passes 1.5x slower)."""
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    env = rb.worker_env(2)
    assert "nnUNet_def_n_proc" not in env and "nnUNet_n_proc_DA" not in env
    assert env["OMP_NUM_THREADS"] == "2"


def test_semantic_segmenter_warns_when_nnunet_caps_its_threads(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    import nnunetv2.configuration

    from spineps.semantic import predict

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 1)
        predict._warn_if_nnunet_caps_threads()
        assert "nnUNet_def_n_proc=1 limits nnU-Net's inference to 1 thread" in caplog.text
        caplog.clear()
        monkeypatch.setattr(nnunetv2.configuration, "default_num_processes", 8)
        predict._warn_if_nnunet_caps_threads()
        assert "nnUNet_def_n_proc" not in caplog.text
    finally:
        torch.set_num_threads(threads)


def test_truth_dice_compares_split_endplates_with_the_truth_endplates(tmp_path: Path) -> None:
    """The phantom truth has one endplate class (62); the outputs split it into 52 / 53."""
    import nibabel as nib

    truth = np.zeros((6, 6, 4), np.uint8)
    truth[0:2] = 49
    truth[2] = 62
    truth[3] = 100
    mask = truth.copy()
    mask[2, :3] = 52
    mask[2, 3:] = 53
    paths = []
    for name, data in (("mask", mask), ("truth", truth)):
        paths.append(str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(data, np.eye(4)), paths[-1])
    got = rb.truth_dice(*paths)
    assert got["dice"] == {49: 1.0, 62: 1.0, 100: 1.0} and got["mean"] == 1.0


def test_semantic_accuracy_error_profile_on_known_masks() -> None:
    sa = _load_module("spineps_semantic_accuracy", REPO / "benchmarks" / "semantic_accuracy.py")
    ann = np.zeros((20, 20, 20), bool)
    ann[5:15, 5:15, 5:15] = True
    pred = np.zeros_like(ann)
    pred[4:16, 5:15, 5:15] = True  # one voxel too long at both ends: 200 false positives at 1 mm
    pred[0:2, 0:2, 0:2] = True  # a separate blob far away: 8 false positives
    prof = sa.error_profile(pred, ann, (1.0, 1.0, 1.0))
    assert prof["precision"] == round(1000 / 1208, 4) and prof["recall"] == 1.0
    assert prof["fp_within_2mm"] == round(200 / 208, 3) and prof["fp_beyond_5mm"] == round(8 / 208, 3)
    assert prof["dice_touching"] == round(2000 / 2200, 4)  # the far blob does not touch the annotation
    # on a coarser grid the same outline error lies 2.5 mm out: no longer "within 2 mm"
    assert sa.error_profile(pred, ann, (2.5, 1.0, 1.0))["fp_within_2mm"] == 0.0
    empty = sa.error_profile(np.zeros_like(ann), ann, (1.0, 1.0, 1.0))
    assert empty["precision"] is None and empty["recall"] == 0.0 and empty["fp_within_2mm"] is None
