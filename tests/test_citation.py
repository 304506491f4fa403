"""CITATION.cff: parseable, names the SPINEPS paper, and states this version."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_citation_file_names_the_paper_and_this_version():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert str(cff["version"]) == (REPO / "version").read_text().strip()
    paper = cff["preferred-citation"]
    assert paper["doi"] == "10.1007/s00330-024-11155-y" and paper["year"] == 2024
    assert paper["authors"][0]["family-names"] == "Möller" and paper["authors"][-1]["family-names"] == "Kirschke"
