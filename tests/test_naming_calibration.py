"""The level-naming confidence is calibrated: the constants in the code are the benchmark's
fit, and on the benchmark's held-out phantoms a confidence of c is right about c of the time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from spineps.labeling.levels import (CONFIDENCE_CALIBRATION, NO_CUE_CONFIDENCE, calibrated_confidence,
                                     confidence_kind, name_levels)
from tests.test_levels import _post
from tests.test_levels_phantom import build_phantom

RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "naming_calibration.json"


def _result() -> dict:
    return json.loads(RESULT.read_text())


def test_the_constants_are_the_benchmarks_fit() -> None:
    fit = _result()["calibration"]
    assert {k: tuple(v) for k, v in fit.items()} == CONFIDENCE_CALIBRATION
    assert _result()["no_cue_confidence"] == NO_CUE_CONFIDENCE


def test_calibrated_confidence_on_held_out_phantoms() -> None:
    check = _result()["check"]
    assert check["calibrated"]["n"] >= 80
    # the expected calibration error drops to a third or less of the raw softmax's, below 0.06
    assert check["calibrated"]["ece"] <= 0.06 < check["raw"]["ece"]
    assert check["calibrated"]["ece"] <= check["raw"]["ece"] / 2
    for b in check["calibrated"]["bins"]:
        if b["n"] >= 15:  # well-filled bins: right within 0.15 of their mean confidence
            assert abs(b["right"] - b["mean_confidence"]) <= 0.15, b


def test_calibration_is_monotone_and_kinds_follow_the_rule_used() -> None:
    for kind in ("hard", "soft"):
        cs = [calibrated_confidence(p, kind) for p in (0.05, 0.3, 0.5, 0.7, 0.95, 0.999)]
        assert all(a < b for a, b in zip(cs, cs[1:])) and all(0 < c < 1 for c in cs)
    assert calibrated_confidence(0.42, "anchor") == 0.42
    assert calibrated_confidence(1.0, "none") == NO_CUE_CONFIDENCE
    assert confidence_kind("sacrum+ribs") == "hard" and confidence_kind("c2") == "hard"
    assert confidence_kind("ribs+conus+size") == "soft" and confidence_kind("size") == "soft"
    assert confidence_kind("count-from-top") == "none" and confidence_kind("anchor") == "anchor"
    assert math.isclose(calibrated_confidence(0.5, "soft", {"soft": (1.0, 0.0)}), 0.5)


def test_a_naming_reports_its_raw_and_its_calibrated_confidence() -> None:
    ph = build_phantom(list(range(20, 25)), sacrum=True, seed=11)
    naming = name_levels(*_post(ph.semantic, ph.anonymous))
    raw = naming.evidence["confidence_raw"]
    assert naming.confidence == pytest.approx(calibrated_confidence(raw, confidence_kind(naming.rule_used)))
    assert naming.as_dict()["evidence"]["confidence_raw"] == pytest.approx(raw, abs=1e-3)
    forced = name_levels(*_post(ph.semantic, ph.anonymous), rule="count-from-top")
    assert forced.confidence == NO_CUE_CONFIDENCE  # a count is no evidence: flagged naming_uncertain


def test_the_readme_quotes_the_benchmark() -> None:
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    check = _result()["check"]
    assert (f"on {check['calibrated']['n']} held-out phantom namings its expected calibration error is "
            f"{check['calibrated']['ece']} (the raw softmax's: {check['raw']['ece']})") in readme
    vb3 = _result()["vb3"]["calibrated"]
    mean = sum(b["n"] * b["mean_confidence"] for b in vb3["bins"] if b["n"]) / vb3["n"]
    assert (f"on the {vb3['n']} real VB3 validation scans, through the whole pipeline: {vb3['right']}/{vb3['n']} "
            f"right at a mean confidence of {mean:.3f}") in readme
