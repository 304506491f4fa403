"""``--precision``: the choice, how it resolves per CPU and device, and the networks in
bfloat16 against float32 (the bundled instance model on a phantom semantic mask)."""

from __future__ import annotations

import numpy as np
import pytest

from spineps.cli.parser import build_parser, build_subcommand_parser
from spineps.errors import UsageError
from spineps.models import precision as prec

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_native_bf16_read_from_cpuinfo() -> None:
    assert prec.native_bf16_in_cpuinfo(X86_BF16)
    assert prec.native_bf16_in_cpuinfo("flags : sse2 amx_bf16 amx_tile\n")
    assert prec.native_bf16_in_cpuinfo(ARM_BF16)
    assert not prec.native_bf16_in_cpuinfo(X86_PLAIN)
    assert not prec.native_bf16_in_cpuinfo("")


def test_resolution_per_cpu_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.resolve_precision("auto", "cpu") == "fp32"
    assert prec.resolve_precision("bf16", "cpu") == "bf16"  # asked for: emulated where not native
    assert prec.resolve_precision("fp32", "cpu") == "fp32"
    assert prec.resolve_precision("fp32", "cuda") == prec.resolve_precision("auto", "cuda:0") == "fp16"
    with pytest.raises(ValueError):
        prec.resolve_precision("fp8", "cpu")


def test_precision_option_and_settings(tmp_path) -> None:
    from spineps.settings import Settings

    (tmp_path / "bids").mkdir()
    bids, out = str(tmp_path / "bids"), str(tmp_path / "out")
    ns = build_parser().parse_args([bids, out, "participant", "--precision", "fp32"])
    s = Settings.from_args(ns, environ={})
    assert s.precision == "fp32" and s.parameters()["precision"] == "fp32"
    ns = build_parser().parse_args([bids, out, "participant"])
    assert Settings.from_args(ns, environ={}).precision == "auto"
    assert build_subcommand_parser().parse_args(["instance", "m", "o", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(UsageError):
        build_parser().parse_args(["a", "b", "participant", "--precision", "half"])


def test_instance_network_in_bf16_agrees_with_fp32() -> None:
    from spineps.instance.segmenter import UNetInstanceSegmenter
    from spineps.models.registry import BUNDLED_INSTANCE, bundled_model_dir
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    folder = bundled_model_dir(BUNDLED_INSTANCE)
    if folder is None:
        pytest.skip("no bundled instance model in this installation")
    ph = make_phantom(PhantomSpec(fov="lumbar", spacing=(1.5, 1.5, 4.0), seed=3))
    fp32 = UNetInstanceSegmenter.from_folder(folder, device="cpu", nprocs=1, precision="fp32")
    bf16 = UNetInstanceSegmenter.from_folder(folder, device="cpu", nprocs=1, precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16") and bf16.channels_last
    assert bf16.provenance()["precision"] == "bf16"
    from spineps.pipeline import segment_from_semantic

    a, b = (segment_from_semantic(ph.semantic, m, measure=False) for m in (fp32, bf16))
    ia, ib = np.asarray(a.instance.data), np.asarray(b.instance.data)
    fg = (ia > 0) | (ib > 0)
    assert np.mean(ia[fg] == ib[fg]) >= 0.99
    assert a.naming["levels"] == b.naming["levels"]
