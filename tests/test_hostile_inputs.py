"""Every hostile input of ``tests/hostile_corpus.py`` through the real CLI (``main([...])``
in-process, test-only segmenters): the exit code, a one-line message naming the file and
the reason, the hostile scan skipped, the good scan finished, no temporary file left; and
the table of ``docs/hostile-inputs.md`` equal to the corpus' expectations."""

from __future__ import annotations

from pathlib import Path

import pytest

from spineps.bids.derivatives import expected_outputs
from spineps.bids.discovery import Scan
from spineps.cli.main import main
from spineps.fsutil import TEMP_PREFIX
from spineps import loading
from tests.hostile_corpus import CASES, GOOD_SCAN, TABLE_BEGIN, TABLE_END, HostileCase, build_dataset, render_table
from tests.segmenters import make_test_segmenters

DOC = Path(__file__).resolve().parents[1] / "docs" / "hostile-inputs.md"


@pytest.fixture
def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "load_segmenters", lambda settings: make_test_segmenters(settings))


def _logs(out: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted((out / "logs").glob("*.log")))


def _lines_with(text: str, *needles: str) -> list[str]:
    low = [n.lower() for n in needles]
    return [line for line in text.splitlines() if all(n in line.lower() for n in low)]


def _outputs_of(out: Path, root: Path, rel: str) -> list[Path]:
    return expected_outputs(out, Scan.from_path(root / rel, root))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: HostileCase, tmp_path: Path, test_models: None,
                       capsys: pytest.CaptureFixture[str]) -> None:
    ds, rel = build_dataset(tmp_path / case.root_name, case)
    out = tmp_path / "out"
    rc = main([str(ds.root), str(out), "participant", *case.args])
    err = capsys.readouterr().err
    assert rc == case.exit_code, err
    assert "Traceback" not in err
    logs = _logs(out) if (out / "logs").is_dir() else ""

    if case.outcome == "run exits":
        if case.needles:
            assert _lines_with(err + logs, *case.needles), err
        if rc == 0:
            assert all(p.is_file() for p in _outputs_of(out, ds.root, GOOD_SCAN))
        else:  # nothing was processed
            assert not list(out.rglob("sub-*"))
        return

    assert rel is not None
    # the good scan always finishes
    assert all(p.is_file() for p in _outputs_of(out, ds.root, GOOD_SCAN)), err
    hostile_outputs = [p for p in out.rglob("sub-02*") if p.is_file()]
    if case.outcome == "failed":
        # one ERROR line naming the file and the reason, on stderr (and in the log)
        lines = _lines_with(err, rel, "failed", *case.needles)
        assert lines, err
        assert all(len(line) < 1000 for line in lines)
        assert f"  {rel}: " in err  # the final list of failed scans names it
        assert _lines_with(logs, "summary:", "1 failed")
        assert not hostile_outputs
    elif case.outcome == "not used":
        if case.needles:
            assert _lines_with(err, Path(rel).name, *case.needles), err
        assert not hostile_outputs
        assert not _lines_with(err, "ERROR")
        assert _lines_with(logs, "summary:", "1 processed", "0 failed")
    elif case.outcome == "processed":
        assert all(p.is_file() for p in _outputs_of(out, ds.root, rel)), err
        if case.needles:
            assert _lines_with(err + logs, "warning", *case.needles), err
        assert _lines_with(logs, "summary:", "2 processed", "0 failed")
    else:  # pragma: no cover - a typo in the corpus
        raise AssertionError(f"unknown outcome {case.outcome!r}")
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert not list((out / "logs").rglob("*.lock"))  # per-scan locks are released and removed


def test_every_failure_at_once_others_finish(tmp_path: Path, test_models: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Several hostile scans in one dataset: each is listed with its own reason, the good ones finish."""
    picked = ["truncated-gzip", "4d", "all-zero", "nan-voxels", "shear", "huge-dims", "malformed-sidecar"]
    from tests.bids_factory import BidsFactory
    from tests.hostile_corpus import case_by_name

    root = tmp_path / "bids"
    ds = BidsFactory(root)
    ds.add("01", acq="sag", seed=1)
    ds.add("99", acq="sag", seed=9)
    failed: dict[str, tuple[str, ...]] = {}
    for i, name in enumerate(picked):
        case = case_by_name(name)
        sub = tmp_path / f"case{i}"
        cds, rel = build_dataset(sub / "bids", case)
        assert rel is not None and rel.startswith("sub-02/")
        label = f"h{i}"
        for src in (sub / "bids" / "sub-02").rglob("*"):  # move the case's sub-02 to its own subject
            if src.is_file():
                dst = root / f"sub-{label}" / src.relative_to(sub / "bids" / "sub-02")
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
                dst.rename(dst.with_name(dst.name.replace("sub-02", f"sub-{label}")))
        failed[rel.replace("sub-02", f"sub-{label}")] = case.needles
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--skip-bids-validation"]) == 1
    err = capsys.readouterr().err
    assert f"{len(picked)} scan(s) failed" in err
    for rel, needles in failed.items():
        assert _lines_with(err, rel, *needles), (rel, err)
    for good in (GOOD_SCAN, "sub-99/anat/sub-99_acq-sag_T2w.nii.gz"):
        assert all(p.is_file() for p in _outputs_of(out, root, good))


def test_docs_table_matches_the_corpus() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert TABLE_BEGIN in text and TABLE_END in text, f"{DOC} lacks the table markers"
    table = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip("\n") + "\n"
    assert table == render_table(), ("docs/hostile-inputs.md is out of date: regenerate its table with "
                                     "`.venv/bin/python -m tests.hostile_corpus`")


def test_corpus_names_are_unique_and_outcomes_known() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert {c.outcome for c in CASES} <= {"failed", "not used", "processed", "run exits"}
    for c in CASES:
        assert (c.exit_code == 1) == (c.outcome == "failed") or c.outcome == "run exits", c.name
