"""The command line: a pure parser, exit codes, folder rules, settings, subcommands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spineps.cli.main import main
from spineps.cli.parser import build_parser, build_subcommand_parser
from spineps.errors import UsageError
from spineps import loading
from spineps.models import registry
from spineps.settings import Settings
from tests.bids_factory import BidsFactory
from tests.segmenters import make_test_segmenters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ds(tmp_path: Path) -> BidsFactory:
    f = BidsFactory(tmp_path / "bids")
    f.add("01", acq="sag")
    f.add("02", acq="sag")
    return f


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


# ------------------------------------------------------------------------ parser
def test_build_parser_has_no_side_effects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mods_before = set(sys.modules)
    p = build_parser()
    ns = p.parse_args([str(tmp_path / "missing"), str(tmp_path / "out"), "participant",
                       "--participant-label", "sub-01", "02", "-w", str(tmp_path / "work"), "-vv"])
    assert list(tmp_path.iterdir()) == []  # no folder created, nothing written
    new = set(sys.modules) - mods_before
    assert not any(m.split(".")[0] in ("torch", "numpy", "nibabel", "bids", "nnunetv2") for m in new), new
    assert ns.participant_label == ["01", "02"]  # prefix stripped
    assert ns.verbose == 2
    assert ns.device == "auto" and not ns.overwrite and not ns.no_n4


def test_parser_import_is_light() -> None:
    code = ("import sys; import spineps.cli.parser, spineps.cli.main; "
            "heavy = [m for m in ('torch', 'numpy', 'nibabel', 'bids', 'nnunetv2', 'scipy') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_parser_usage_error_is_64_not_2() -> None:
    with pytest.raises(UsageError):
        build_parser().parse_args(["a", "b", "participant", "--no-such-flag"])
    with pytest.raises(UsageError):
        build_parser().parse_args(["a", "b", "participant", "--nprocs", "0"])
    with pytest.raises(UsageError):
        build_subcommand_parser().parse_args(["demo"])


@pytest.mark.parametrize("alias", ["--participant-label", "--participant_label"])
def test_label_spellings(alias: str) -> None:
    ns = build_parser().parse_args(["a", "b", "participant", alias, "sub-01", "ses"])
    assert ns.participant_label == ["01", "ses"]
    ns = build_parser().parse_args(["a", "b", "participant", "--session_label", "ses-pre"])
    assert ns.session_label == ["pre"]


def test_every_documented_flag_parses(tmp_path: Path) -> None:
    ns = build_parser().parse_args([
        "in", "out", "group", "--participant-label", "01", "--session-label", "1", "--bids-filter-file", "f.json",
        "--skip-bids-validation", "-w", "w", "--nprocs", "2", "--omp-nthreads", "1", "--device", "cpu",
        "--semantic-model", "s", "--instance-model", "i", "--overwrite", "--no-n4", "-v"])
    assert (ns.nprocs, ns.omp_nthreads, ns.device, ns.no_n4, ns.overwrite, ns.skip_bids_validation) == \
        (2, 1, "cpu", True, True, True)
    assert ns.semantic_model == Path("s") and ns.instance_model == Path("i") and ns.work_dir == Path("w")


def test_help_lists_both_usages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "bids_dir output_dir participant" in out and "spineps demo OUT_DIR" in out
    assert "--participant-label" in out and "exit codes" in out
    assert main(["demo", "--help"]) == 0
    assert "--subjects" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import spineps

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    expected = (REPO / "version").read_text().strip()
    assert out == f"spineps {spineps.__version__}"
    assert spineps.__version__ == expected


def test_run_py_version() -> None:
    r = subprocess.run([sys.executable, str(REPO / "run.py"), "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "spineps " + (REPO / "version").read_text().strip()


# ------------------------------------------------------------------------ exit codes
def test_bad_option_is_64(ds: BidsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(ds.root), str(tmp_path / "out"), "participant", "--bogus"]) == 64
    err = capsys.readouterr().err
    assert "--bogus" in err and len(err.strip().splitlines()) == 1
    assert main([str(ds.root), str(tmp_path / "out")]) == 64  # level missing
    assert not (tmp_path / "out").exists()


def test_unknown_analysis_level_is_17(ds: BidsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(ds.root), str(tmp_path / "out"), "session"]) == 17
    assert "session" in capsys.readouterr().err


def test_missing_bids_dir_is_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_participant_is_18(ds: BidsFactory, tmp_path: Path, test_models: None,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--participant-label", "01", "sub-99",
               "--skip-bids-validation"])
    assert rc == 18
    err = capsys.readouterr().err
    assert "sub-99" in err
    assert not list((tmp_path / "out").glob("sub-*"))


def test_filters_selecting_nothing_is_18(ds: BidsFactory, tmp_path: Path, test_models: None,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t2w": {"acquisition": "cor"}}))
    rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--bids-filter-file", str(filt),
               "--skip-bids-validation"])
    assert rc == 18
    assert "cor" in capsys.readouterr().err


def test_missing_filter_file_is_64(ds: BidsFactory, tmp_path: Path) -> None:
    assert main([str(ds.root), str(tmp_path / "out"), "participant", "--bids-filter-file",
                 str(tmp_path / "none.json")]) == 64


def test_no_model_is_78(ds: BidsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SPINEPS_SEMANTIC_MODEL", raising=False)
    monkeypatch.delenv("SPINEPS_INSTANCE_MODEL", raising=False)
    monkeypatch.setattr(registry, "bundled_model_dir", lambda name: None)
    rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation"])
    assert rc == 78
    err = capsys.readouterr().err
    assert "--semantic-model" in err and "SPINEPS_SEMANTIC_MODEL" in err
    assert not list((tmp_path / "out").glob("sub-*"))


def test_broken_model_folder_is_78(ds: BidsFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "inference_config.json").write_text("{ not json")
    rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
               "--semantic-model", str(broken)])
    assert rc == 78
    assert str(broken) in capsys.readouterr().err
    # through the environment variable too, and a missing folder
    monkeypatch.setenv("SPINEPS_SEMANTIC_MODEL", str(tmp_path / "no-such-model"))
    assert main([str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation"]) == 78
    assert "no-such-model" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("sub-*"))


def test_traceback_only_with_vv(ds: BidsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
            "--semantic-model", str(tmp_path / "missing-model")]
    assert main(args + ["-v"]) == 78
    assert "Traceback" not in capsys.readouterr().err
    assert main(args + ["-vv"]) == 78
    assert "Traceback" in capsys.readouterr().err


def _config(modeltype: str) -> dict:
    return {"log_name": "m", "modality": "T2w", "acquisition": "sag", "modeltype": modeltype,
            "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
            "resolution_range": [0.75, 0.75, 1.65], "default_step_size": 0.5, "labels": {"0": 0, "1": 49}}


def test_wrong_modeltype_is_78(ds: BidsFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "inference_config.json").write_text(json.dumps(_config("unet")))
    rc = main([str(ds.root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
               "--semantic-model", str(unet)])
    assert rc == 78
    assert "nnunet" in capsys.readouterr().err


def test_output_dir_inside_bids_dir_is_refused(ds: BidsFactory, tmp_path: Path, test_models: None) -> None:
    before = ds.relpaths()
    assert main([str(ds.root), str(ds.root), "participant"]) == 64
    assert main([str(ds.root), str(ds.root / "out"), "participant"]) == 64
    assert main([str(ds.root), str(ds.root / "derivatives"), "participant"]) == 64
    assert main([str(ds.root), str(tmp_path / "out"), "participant", "-w", str(ds.root / "work")]) == 64
    assert ds.relpaths() == before
    # bids_dir/derivatives/<name> is allowed
    out = ds.root / "derivatives" / "spineps"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    assert (out / "sub-01" / "anat" / "sub-01_acq-sag_desc-spine_dseg.nii.gz").is_file()


def test_output_dir_not_creatable_is_73(ds: BidsFactory, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(ds.root), str(blocker / "out"), "participant", "--skip-bids-validation"]) == 73


# ------------------------------------------------------------------------ settings
def test_settings_from_args(ds: BidsFactory, tmp_path: Path) -> None:
    ns = build_parser().parse_args([str(ds.root), str(tmp_path / "o"), "participant", "--participant-label",
                                    "01", "sub-01", "--nprocs", "3", "--no-n4", "--instance-model", "rel/inst"])
    s = Settings.from_args(ns, {"SPINEPS_SEMANTIC_MODEL": str(tmp_path / "sem")})
    assert s.participant_labels == ("01",)
    assert s.nprocs == 3 and s.omp_nthreads == 3 and s.n4 is False
    assert s.semantic_model == (tmp_path / "sem").resolve() and s.semantic_model_source == "env"
    assert s.instance_model is not None and s.instance_model.is_absolute() and s.instance_model_source == "flag"
    assert s.bids_dir.is_absolute() and s.output_dir.is_absolute()
    d = json.loads(s.to_json())
    assert d["participant_labels"] == ["01"] and d["n4"] is False and d["bids_dir"] == str(s.bids_dir)
    assert str(os.getpid()) in s.run_id and s.log_file.parent == s.output_dir / "logs"
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nprocs = 1  # type: ignore[misc]  # assigning to a frozen field is what is tested


def test_group_works_without_bids_dir(ds: BidsFactory, tmp_path: Path, test_models: None) -> None:
    out = tmp_path / "out"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    import shutil

    shutil.rmtree(ds.root)
    assert main([str(ds.root), str(out), "group"]) == 0
    assert (out / "group_T2w.tsv").is_file()


def test_group_without_participant_outputs_is_18(tmp_path: Path) -> None:
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "group"]) == 66  # no output folder at all
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    assert main([str(tmp_path / "bids"), str(tmp_path / "out"), "group"]) == 18


def test_run_log_and_settings_per_run(ds: BidsFactory, tmp_path: Path, test_models: None) -> None:
    out = tmp_path / "out"
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    assert main([str(ds.root), str(out), "participant", "--skip-bids-validation"]) == 0
    logs = sorted((out / "logs").glob("*.log"))
    settings = sorted((out / "logs").glob("*_settings.json"))
    assert len(logs) == 2 and len(settings) == 2
    assert "[1/2] sub-01/anat/sub-01_acq-sag_T2w.nii.gz" in logs[0].read_text()
    sidecar = json.loads((out / "sub-01/anat/sub-01_acq-sag_desc-spine_dseg.json").read_text())
    assert sidecar["Parameters"]["SettingsFile"] in {s.relative_to(out).as_posix() for s in settings}


# ------------------------------------------------------------------------ demo subcommand
def test_demo_subcommand(tmp_path: Path) -> None:
    assert main(["demo", str(tmp_path / "demo"), "--subjects", "1", "--seed", "3"]) == 0
    assert (tmp_path / "demo" / "dataset_description.json").is_file()
    assert list((tmp_path / "demo").glob("sub-*"))


def test_shared_argument_types_reject_out_of_range_values():
    import argparse

    from spineps.cli.argtypes import nonneg_float, nonneg_int, number, positive_float, positive_int

    assert positive_int("3") == 3 and nonneg_int("0") == 0 and positive_float("0.5") == 0.5 and nonneg_float("0") == 0
    unit_open = number(float, "a number in (0, 1)", low=0, high=1, low_open=True, high_open=True)
    assert unit_open("0.25") == 0.25
    for convert, text in [(positive_int, "0"), (positive_int, "1.5"), (nonneg_int, "-1"), (positive_float, "0"),
                          (nonneg_float, "nan?"), (unit_open, "1"), (unit_open, "0")]:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            convert(text)


def test_readme_and_help_name_the_same_exit_codes() -> None:
    """The exit codes the README's table documents are the ones --help lists and the ones the
    typed errors carry; 74 (I/O error of the draft spec) is used nowhere (a failed read is 65,
    a failed write 73, a full disk or quota 75)."""
    import re

    from spineps import errors
    from spineps.cli.parser import _EPILOG

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("## Exit codes"):readme.index("## Containers")]
    in_readme = {int(c) for row in re.findall(r"^\| ([\d /]+) \|", table, re.M) for c in row.split("/")}
    in_help = {int(c) for c in re.findall(r"(?<![\d.])(\d{1,3})(?=[\s/])", _EPILOG.split("74 (I/O error)")[0])}
    carried = {cls.exit_code for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.SpinepsError)}
    assert in_readme == in_help, (in_readme, in_help)
    assert carried <= in_readme and 74 not in in_readme | carried
