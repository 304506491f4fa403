"""The Boutiques descriptor: generated from build_parser(), committed, valid for Boutiques and
its BIDS-App rules, and every command line it makes is one our parser accepts."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spineps.cli.boutiques import descriptor
from spineps.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "boutiques" / "spineps.json"


def _bosh(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("boutiques")
    exe = Path(sys.executable).with_name("bosh")
    if not exe.is_file():
        pytest.skip(f"boutiques is importable but its 'bosh' command is not beside {sys.executable}")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_committed_descriptor_is_the_generated_one():
    assert json.loads(COMMITTED.read_text()) == json.loads(json.dumps(descriptor())), (
        "boutiques/spineps.json is out of date: python -m spineps.cli.boutiques -o boutiques/spineps.json")


def test_every_parser_option_is_an_input_and_back():
    d = descriptor()
    ids = {i["id"] for i in d["inputs"]}
    p = build_parser()
    dests = {a.dest for a in p._actions if a.dest not in ("help", "version") and a.option_strings != ["--version"]}
    assert dests - {"output_dir"} <= ids
    flags = {i["command-line-flag"] for i in d["inputs"] if "command-line-flag" in i}
    known = {s for a in p._actions for s in a.option_strings}
    assert flags <= known
    assert d["custom"]["BIDS-App"]["version"] == d["tool-version"]


def test_bosh_validates_the_descriptor_with_the_bids_app_rules():
    r = _bosh("validate", "--bids", str(COMMITTED))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BIDS validation OK" in r.stdout + r.stderr


def _simulate(invocation: dict, tmp_path: Path) -> list[str]:
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps(invocation))
    r = _bosh("exec", "simulate", str(COMMITTED), "-i", str(inv))
    assert r.returncode == 0, r.stdout + r.stderr
    line = r.stdout.strip().splitlines()[-1]
    mkdir, _, command = line.partition("; ")
    assert mkdir.startswith("mkdir -p")
    argv = shlex.split(command)
    assert argv[0] == "spineps"
    return argv[1:]


def test_simulated_command_lines_parse_with_our_parser(tmp_path):
    model = tmp_path / "model dir"
    model.mkdir()
    full = {"bids_dir": str(tmp_path), "output_dir_name": str(tmp_path / "out put"), "analysis_level": "participant",
            "participant_label": ["01", "sub-02"], "session_label": ["1"], "skip_bids_validation": True,
            "nprocs": 2, "omp_nthreads": 1, "device": "cpu", "precision": "fp32", "engine": "onnxruntime",
            "semantic_model": str(model), "level_rule": "sacrum", "top_vertebra": "T12", "overwrite": True,
            "no_n4": True, "verbose": True}
    ns = build_parser().parse_args(_simulate(full, tmp_path))
    assert ns.bids_dir == tmp_path and ns.output_dir == tmp_path / "out put" and ns.analysis_level == "participant"
    assert ns.participant_label == ["01", "02"] and ns.session_label == ["1"]
    assert (ns.nprocs, ns.omp_nthreads, ns.device, ns.precision, ns.engine) == (2, 1, "cpu", "fp32", "onnxruntime")
    assert ns.semantic_model == model and ns.level_rule == "sacrum" and ns.top_vertebra == "T12"
    assert ns.skip_bids_validation and ns.overwrite and ns.no_n4 and ns.verbose == 1
    # the group level (Boutiques fills [OUTPUT_DIR] from the first input that has it: the name)
    group = {"bids_dir": str(tmp_path), "output_dir_name": str(tmp_path / "out put"), "analysis_level": "group"}
    ns = build_parser().parse_args(_simulate(group, tmp_path))
    assert ns.analysis_level == "group" and ns.output_dir == tmp_path / "out put"
    assert ns.device == "auto" and ns.level_rule == "auto"  # defaults as the parser's


def test_generator_writes_the_file(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "-m", "spineps.cli.boutiques", "-o", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == json.loads(COMMITTED.read_text())
