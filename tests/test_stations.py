"""Whole-spine stations named as one spine (``spineps.labeling.stations``,
``pipeline.name_stations``, the participant level and ``spineps instance``): phantoms cut into
stations that overlap (with a patient shift and different spacings), abut, leave a gap or
repeat one region. The stations' reference masks (anonymised: the level names taken away) go
through the real post-processing and the session naming, so these tests do not depend on the
quality of a model; the end-to-end test runs ``spineps instance`` with the bundled instance
model on the reference semantic masks, and the derivatives of such a run are checked against
the BIDS schema and ``bids-validator-deno``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from spineps.labels import SACRUM, vertebra_name
from spineps.pipeline import StationPrediction, name_stations, postprocess_anonymous
from spineps.synth.anatomy import PhantomSpec, make_phantom
from spineps.synth.stations import StationCut, cut_stations, even_cuts, write_station_dataset
from spineps.synth.truth import alignment_truth
from spineps.synth.truth import anonymous_vertebrae

WHOLE = PhantomSpec(seed=2, fov="whole", spacing=(2.0, 2.0, 3.5))
THORACOLUMBAR = PhantomSpec(seed=6, fov="thoracolumbar", spacing=(1.5, 1.5, 3.0))


def _anonymous_vertebrae(st):
    return anonymous_vertebrae(st.instance)


def _named(spec: PhantomSpec, cuts):
    stations = cut_stations(spec, cuts)
    preds = [StationPrediction(f"chunk-{k}", postprocess_anonymous(st.semantic, _anonymous_vertebrae(st)), [], {}, {})
             for k, st in enumerate(stations, start=1)]
    results, session = name_stations(preds)
    return stations, results, session


def _agreement(station, result) -> float:
    """Fraction of the reference vertebra voxels that carry their true name."""
    truth = np.asarray(station.instance.data)
    got = np.asarray(result.instance.data)
    vert = (truth > 0) & (truth < 100) & (truth != SACRUM)
    return float((got[vert] == truth[vert]).mean())


@pytest.fixture(scope="module")
def overlapping():
    cuts = even_cuts(WHOLE, 3, overlap_mm=40.0, spacings=[None, (1.5, 1.5, 3.0), (2.5, 2.5, 4.0)],
                     shifts=[(0.0, 0.0, 0.0), (0.0, 3.0, -5.0), (0.0, 0.0, 0.0)])
    return _named(WHOLE, cuts)


def test_overlapping_stations_with_a_patient_shift_are_named_as_one_spine(overlapping) -> None:
    stations, results, session = overlapping
    for k, st in enumerate(stations, start=1):
        assert _agreement(st, results[f"chunk-{k}"]) > 0.99, (k, results[f"chunk-{k}"].naming["levels"])
    assert session.chains == [["chunk-1", "chunk-2", "chunk-3"]]
    assert [lk.relation for lk in session.links] == ["overlap", "overlap"]
    assert all(lk.joined and lk.matched for lk in session.links)
    # the shift in chunk-2's header is found (and undone for chunk-3, which did not move)
    assert np.allclose(session.offsets["chunk-2"], [0.0, -3.0, 5.0], atol=1.5)
    assert np.allclose(session.offsets["chunk-3"], [0.0, 0.0, 0.0], atol=1.5)
    # the sidecar: order, anchor, offsets, matched vertebrae by name; the same for every station
    side = results["chunk-2"].stations
    assert side["Stations"] == ["chunk-1", "chunk-2", "chunk-3"] and not side["NamedAlone"]
    assert side["AnchoredBy"] in ("chunk-1", "chunk-3")  # C2 at the top or the sacrum at the bottom
    assert all(lk["matched_vertebrae"] and all(n[0] in "CTL" for n in lk["matched_vertebrae"]) for lk in side["Links"])
    assert results["chunk-1"].naming["confidence"] == results["chunk-3"].naming["confidence"] > 0.9


def test_the_session_alignment_spans_the_stations(overlapping) -> None:
    stations, results, _session = overlapping
    truth = alignment_truth(make_phantom(WHOLE).meta)
    for name, res in results.items():
        m = res.measurements
        assert m is not None and m.session is not None, name
        got = {(v.level, v.measure): v.value for v in m.values if v.structure == "spine"}
        # no station alone holds T4..T12 and L1..S1, the session does
        assert got[("T4-T12", "kyphosis_deg")] == pytest.approx(truth["kyphosis_T4_T12"], abs=3.0)
        assert got[("L1-S1", "lordosis_deg")] == pytest.approx(truth["lordosis_L1_S1"], abs=3.0)
        assert got[("all", "cobb_deg")] == pytest.approx(truth["cobb"], abs=3.0)
        # (the cervical endplates are too small for +-3 degrees on this 2 mm grid: test_alignment.py)
        assert m.session["Stations"] == ["chunk-1", "chunk-2", "chunk-3"]
    # L1 and S1 are in different stations: no station alone measures the lumbar lordosis
    alone = [r.measurements.alignment.get("L1-S1", "spine", "lordosis_deg") for r in results.values()]
    assert all(math.isnan(x) for x in alone)


def test_abutting_stations_are_joined_at_their_border() -> None:
    cuts = even_cuts(THORACOLUMBAR, 2, overlap_mm=0.0, spacings=[None, (1.2, 1.2, 3.0)])
    stations, results, session = _named(THORACOLUMBAR, cuts)
    assert session.links[0].relation == "abut" and session.links[0].joined
    for k, st in enumerate(stations, start=1):
        assert _agreement(st, results[f"chunk-{k}"]) > 0.99, results[f"chunk-{k}"].naming["levels"]
    assert results["chunk-1"].stations["AnchoredBy"] == "chunk-2"  # the sacrum is in the lower station


def test_stations_with_a_gap_are_named_alone_with_a_warning() -> None:
    cuts = even_cuts(THORACOLUMBAR, 2, overlap_mm=-40.0)
    stations, results, session = _named(THORACOLUMBAR, cuts)
    assert session.links[0].relation == "gap" and not session.links[0].joined
    assert session.chains == [["chunk-1"], ["chunk-2"]]
    for res in results.values():
        assert res.stations["NamedAlone"]
        assert any("do not meet" in w for w in res.warnings)
        assert res.measurements is not None and res.measurements.session is None
    assert _agreement(stations[1], results["chunk-2"]) > 0.99  # the sacrum names the lower one


def test_the_same_region_twice_is_a_repeat_not_stations() -> None:
    spec = PhantomSpec(seed=4, fov="lumbar", spacing=(1.5, 1.5, 3.0))
    top = even_cuts(spec, 1)[0]
    cuts = [top, StationCut(top.top_mm - 5.0, top.bottom_mm - 5.0, spacing=(1.2, 1.2, 3.5))]
    stations, results, session = _named(spec, cuts)
    assert session.links[0].relation == "repeat"
    for k, st in enumerate(stations, start=1):
        assert _agreement(st, results[f"chunk-{k}"]) > 0.99


def test_session_groups_join_chunks_and_runs_of_one_acquisition() -> None:
    from spineps.bids.masks import mask_scan
    from spineps.participant import session_groups

    root = Path("/data")
    names = ["sub-01_ses-1_acq-sag_chunk-1_T2w.nii.gz", "sub-01_ses-1_acq-sag_chunk-2_T2w.nii.gz",
             "sub-01_ses-2_acq-sag_T2w.nii.gz", "sub-02_acq-sag_run-1_T2w.nii.gz", "sub-02_acq-sag_run-2_T2w.nii.gz",
             "sub-02_acq-ax_run-1_T2w.nii.gz"]
    scans = [mask_scan(root / n, root) for n in names]
    groups = [[s.path.name for s in g] for g in session_groups(scans)]
    assert groups == [names[:2], names[2:3], names[3:5], names[5:6]]


@pytest.mark.skipif(not Path(__file__).resolve().parents[1].joinpath("spineps/data/models/instance").is_dir(),
                    reason="no bundled instance model")
def test_spineps_instance_names_a_session_of_stations(tmp_path: Path) -> None:
    import nibabel as nib

    from spineps.cli.main import main

    cuts = even_cuts(WHOLE, 3, overlap_mm=40.0, spacings=[None, (1.5, 1.5, 3.0), None],
                     shifts=[(0.0, 0.0, 0.0), (0.0, 3.0, -5.0), (0.0, 0.0, 0.0)])
    ds = write_station_dataset(tmp_path / "ds", [(WHOLE, cuts)], images=False)
    ref = ds / "derivatives" / "reference"
    out = tmp_path / "out"
    assert main(["instance", str(ref), str(out), "--nprocs", "1"]) == 0
    anat = "sub-01/ses-1/anat"
    spine_rows = []
    for k in (1, 2, 3):
        stem = f"sub-01_ses-1_acq-sag_chunk-{k}"
        truth = np.asarray(nib.load(str(ref / anat / f"{stem}_desc-vertebrae_dseg.nii.gz")).dataobj)
        got = np.asarray(nib.load(str(out / anat / f"{stem}_desc-vertebrae_dseg.nii.gz")).dataobj)
        vert = (truth > 0) & (truth < 100) & (truth != SACRUM)
        assert (got[vert] == truth[vert]).mean() > 0.9, k
        side = json.loads((out / anat / f"{stem}_desc-vertebrae_dseg.json").read_text())
        assert side["Stations"]["NamedTogether"] == [f"sub-01_ses-1_acq-sag_chunk-{i}" for i in (1, 2, 3)]
        cent = json.loads((out / anat / f"{stem}_desc-vertebrae_centroids.json").read_text())
        assert set(cent["Vertebrae"]) <= {vertebra_name(int(v)) for v in np.unique(truth[vert])} | {"S1"}
        rows = (out / anat / f"{stem}_desc-spine_morphometry.tsv").read_text().splitlines()
        spine_rows.append([r for r in rows if "\tspine\t" in r])
    assert spine_rows[0] == spine_rows[1] == spine_rows[2] and any("kyphosis_deg\tn/a" not in r for r in spine_rows[0])


def test_a_session_is_complete_only_when_every_station_is_this_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Stations and issue 17 together: a session is skipped only when every station's sidecars
    name this run's models and options (``_complete``), another option recomputes the whole
    session, and each station's memory check gets the run's footprint."""
    from spineps import loading, participant, resources
    from spineps.cli.main import main
    from tests.segmenters import ComponentInstanceSegmenter

    monkeypatch.setattr(loading, "load_instance_segmenter", lambda settings: ComponentInstanceSegmenter())
    run_footprint, footprints = object(), []  # the run's footprint, and what each station's check got
    monkeypatch.setattr(participant, "_footprint", lambda semantic, instance: run_footprint)
    check = resources.check_scan_resources
    monkeypatch.setattr(resources, "check_scan_resources", lambda *a, footprint=None, **kw: (
        footprints.append(footprint), check(*a, **kw))[1])
    ds = write_station_dataset(tmp_path / "ds", [(WHOLE, even_cuts(WHOLE, 2, overlap_mm=40.0))], images=False)
    out, anat = tmp_path / "out", "sub-01/ses-1/anat"
    args = ["instance", str(ds / "derivatives" / "reference"), str(out), "--nprocs", "1"]

    def run(extra: list[str]) -> str:
        capsys.readouterr()
        assert main(args + extra) == 0
        return capsys.readouterr().err

    def sidecars() -> list[dict]:
        return [json.loads((out / anat / f"sub-01_ses-1_acq-sag_chunk-{k}_desc-vertebrae_dseg.json").read_text())
                for k in (1, 2)]

    text = run([])
    assert "2 processed" in text and footprints == [run_footprint] * 2
    assert all(sc["Stations"]["NamedTogether"] and "test-components" in json.dumps(sc["Models"]) for sc in sidecars())
    text = run([])
    assert "outputs complete, skipped" in text and "2 skipped" in text and len(footprints) == 2
    text = run(["--level-rule", "count-from-top"])
    assert "level_rule was" in text and "recomputing" in text and "2 processed" in text, text
    assert [sc["Parameters"]["level_rule"] for sc in sidecars()] == ["count-from-top"] * 2
    assert all("Stations" in sc for sc in sidecars())


def test_stations_failures_are_recorded_and_stop_on_first_crash_stops_after_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Stations and issue 19 together: a failed station leaves its failure record (the session's
    other station is still named and written), ``--stop-on-first-crash`` stops after that
    session and lists the next session's stations as not attempted, a failed session naming
    records every station, a completed session clears each station's record; one methods text
    per run."""
    from spineps import loading, participant
    from spineps.cli.main import main
    from spineps.failures import read_failures
    from tests.segmenters import ComponentInstanceSegmenter

    monkeypatch.setattr(loading, "load_instance_segmenter", lambda settings: ComponentInstanceSegmenter())
    cuts = even_cuts(WHOLE, 2, overlap_mm=40.0)
    ds = write_station_dataset(tmp_path / "ds", [(WHOLE, cuts), (WHOLE, cuts)], images=False)
    out = tmp_path / "out"
    args = ["instance", str(ds / "derivatives" / "reference"), str(out), "--nprocs", "1"]
    predict, name = participant._predict_station, participant._name_session

    def broken_station(settings, scan, run):  # type: ignore[no-untyped-def]
        if scan.key.startswith("sub-01_ses-1_acq-sag_chunk-2"):
            raise RuntimeError("station broken on purpose")
        return predict(settings, scan, run)

    def recorded() -> dict[str, str]:
        return {rec["bids_name"]: rec["reason"] for rec in read_failures(out)}

    monkeypatch.setattr(participant, "_predict_station", broken_station)
    capsys.readouterr()
    assert main(args + ["--stop-on-first-crash"]) != 0
    text = capsys.readouterr().err
    assert "not attempted (--stop-on-first-crash): 2 scan(s)" in text and "sub-02_ses-1_acq-sag_chunk-1" in text
    assert list(recorded()) == ["sub-01_ses-1_acq-sag_chunk-2"] and "on purpose" in recorded()[
        "sub-01_ses-1_acq-sag_chunk-2"]
    assert (out / "sub-01/ses-1/anat/sub-01_ses-1_acq-sag_chunk-1_desc-vertebrae_dseg.json").is_file()
    assert not (out / "sub-02").exists() and len(list((out / "logs").glob("*_methods.md"))) == 1

    monkeypatch.setattr(participant, "_predict_station", predict)
    monkeypatch.setattr(participant, "_name_session", lambda runs, settings: (_ for _ in ()).throw(
        RuntimeError("naming broken on purpose")))
    assert main(args) != 0  # without --stop-on-first-crash: both sessions tried, every station recorded
    assert sorted(recorded()) == [f"sub-0{s}_ses-1_acq-sag_chunk-{k}" for s in (1, 2) for k in (1, 2)]
    assert all("naming broken on purpose" in why for why in recorded().values())

    monkeypatch.setattr(participant, "_name_session", name)
    assert main(args) == 0 and recorded() == {}
    assert len(list((out / "logs").glob("*_methods.md"))) == 3


def test_the_readme_numbers_are_the_benchmarks() -> None:
    """The README's station and alignment numbers come from benchmarks/naming_alignment.py."""
    repo = Path(__file__).resolve().parents[1]
    summary = json.loads((repo / "benchmarks" / "results" / "naming_alignment.json").read_text())["summary"]
    readme = " ".join((repo / "README.md").read_text(encoding="utf-8").split())
    for source in ("reference", "model"):
        for key in ("level_accuracy_session", "level_accuracy_alone"):
            assert f"{100 * summary[source][key]:.1f} %" in readme, (source, key)
    for key in ("curve_deg", "cobb_deg", "wedge_deg"):
        assert f"{summary['alignment_reference'][key]}°" in readme, key
    assert f"{summary['alignment_reference']['slip_mm']} mm (slips)" in readme
    assert summary["alignment_reference"]["curve_deg"] <= 3.0 and summary["alignment_reference"]["slip_mm"] <= 1.0


# --------------------------------------------------------------------------- BIDS validity
#: a session of three overlapping stations (the middle one with a patient shift in its
#: header), and one of two stations with a gap (named alone): small phantoms, so that the
#: bundled instance model runs both sessions in about 25 s (one thread, on two busy cores)
VALID_JOINED = PhantomSpec(seed=6, fov="thoracolumbar", spacing=(2.0, 2.0, 3.5))
VALID_ALONE = PhantomSpec(seed=4, fov="lumbar", spacing=(2.0, 2.0, 3.5))
PER_STATION = ["_desc-spine_dseg.json", "_desc-spine_dseg.nii.gz", "_desc-spine_dseg.png",
               "_desc-spine_morphometry.json", "_desc-spine_morphometry.tsv", "_desc-vertebrae_centroids.json",
               "_desc-vertebrae_dseg.json", "_desc-vertebrae_dseg.nii.gz"]


@pytest.fixture(scope="module")
def stations_derivatives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``spineps instance`` (the bundled instance model) on the reference masks of two
    sessions of stations: sub-01's ``chunk-1..3`` overlap (named as one spine), sub-02's
    ``chunk-1..2`` leave a gap (each named alone)."""
    from spineps.cli.main import main
    from spineps.models.registry import BUNDLED_INSTANCE, bundled_model_dir

    if bundled_model_dir(BUNDLED_INSTANCE) is None:
        pytest.skip("no bundled instance model in this installation")
    joined = even_cuts(VALID_JOINED, 3, overlap_mm=30.0, shifts=[(0.0, 0.0, 0.0), (0.0, 3.0, -5.0), (0.0, 0.0, 0.0)])
    alone = even_cuts(VALID_ALONE, 2, overlap_mm=-40.0)
    tmp = tmp_path_factory.mktemp("stations_bids")
    ds = write_station_dataset(tmp / "ds", [(VALID_JOINED, joined), (VALID_ALONE, alone)], images=False)
    out = tmp / "out"
    assert main(["instance", str(ds / "derivatives" / "reference"), str(out), "--nprocs", "1"]) == 0
    return out


def _station_stems() -> dict[str, list[str]]:
    return {"sub-01": [f"sub-01_ses-1_acq-sag_chunk-{k}" for k in (1, 2, 3)],
            "sub-02": [f"sub-02_ses-1_acq-sag_chunk-{k}" for k in (1, 2)]}


@pytest.mark.slow
def test_stations_derivatives_keep_chunk_and_carry_the_session_sidecar(stations_derivatives: Path) -> None:
    """Every output of a station keeps its ``chunk-`` entity, no per-session file is written,
    and the instance sidecar and the centroids JSON of every station carry the session's
    ``Stations`` section (order, anchoring station, offsets, matched vertebrae); the
    morphometry JSON the session's alignment."""
    out = stations_derivatives
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    per_subject = [f for f in files if f.startswith("sub-")]
    expected = sorted(f"{sub}/ses-1/anat/{stem}{kind}" for sub, stems in _station_stems().items()
                      for stem in stems for kind in PER_STATION)
    assert per_subject == expected  # every name keeps chunk-; nothing per session beside the stations
    anat = out / "sub-01" / "ses-1" / "anat"
    stems = _station_stems()["sub-01"]
    sections = []
    for stem in stems:
        inst = json.loads((anat / f"{stem}_desc-vertebrae_dseg.json").read_text())["Stations"]
        cent = json.loads((anat / f"{stem}_desc-vertebrae_centroids.json").read_text())["Stations"]
        assert inst == cent
        sections.append(inst)
        session = json.loads((anat / f"{stem}_desc-spine_morphometry.json").read_text())["SessionAlignment"]
        assert session["Stations"] == stems and set(session["OffsetsMM"]) == set(stems)
    assert sections[0] == sections[1] == sections[2]  # one session section, the same in every station
    for stem in stems:  # its names depend on the other stations' inputs: they are sources too
        sources = json.loads((anat / f"{stem}_desc-vertebrae_dseg.json").read_text())["Sources"]
        ref = "bids:semantic:sub-01/ses-1/anat/{}_desc-spine_dseg.nii.gz"
        assert sources[0] == ref.format(stem) and sources[2:] == [ref.format(o) for o in stems if o != stem]
    side = sections[0]
    assert side["Stations"] == side["NamedTogether"] == stems and side["NamedAlone"] is False
    assert side["AnchoredBy"] == stems[2]  # the sacrum is in the lowest station; chunk-1 has no anchor
    offsets = side["OffsetsMM"]
    assert set(offsets) == set(stems) and all(len(v) == 3 and all(isinstance(x, float) for x in v)
                                              for v in offsets.values())
    # chunk-2's header was shifted by (0, 3, -5) mm: its offset undoes that shift
    assert np.allclose(np.subtract(offsets[stems[1]], offsets[stems[0]]), [0.0, -3.0, 5.0], atol=1.5), offsets
    assert [(lk["upper"], lk["lower"], lk["relation"], lk["joined"]) for lk in side["Links"]] == [
        (stems[0], stems[1], "overlap", True), (stems[1], stems[2], "overlap", True)]
    assert all(lk["matched_vertebrae"] and all(isinstance(n, str) and n[0] in "TLS" for n in lk["matched_vertebrae"])
               for lk in side["Links"])
    # the gap: each station named alone, with a warning, its sidecar says so
    anat2 = out / "sub-02" / "ses-1" / "anat"
    for stem in _station_stems()["sub-02"]:
        alone = json.loads((anat2 / f"{stem}_desc-vertebrae_dseg.json").read_text())["Stations"]
        assert alone["NamedAlone"] is True and alone["Links"][0]["relation"] == "gap"
        assert not alone["Links"][0]["joined"] and any("do not meet" in w for w in alone["Warnings"])
        assert len(json.loads((anat2 / f"{stem}_desc-vertebrae_dseg.json").read_text())["Sources"]) == 2


@pytest.mark.slow
def test_stations_derivatives_pass_the_schema_name_check(stations_derivatives: Path) -> None:
    """The file names of the stations' derivatives against the BIDS schema
    (``bidsschematools``, no validator needed): every name is valid or covered by the
    dataset's ``.bidsignore``; the masks and their sidecars are valid names by themselves."""
    from spineps.bids.validation import check_names_with_schema

    out = stations_derivatives
    files = [p for p in out.rglob("*") if p.is_file()]
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert check_names_with_schema(files, root=out, derivative=True, bidsignore=ignore) == []
    unignored = check_names_with_schema(files, root=out, derivative=True)
    assert unignored and all(p.endswith(("_dseg.png", "_morphometry.json", "_morphometry.tsv", "_centroids.json"))
                             for p in unignored), unignored
    # the check tells a chunk- entity out of place (so the names above are really checked)
    assert check_names_with_schema(["sub-01/ses-1/anat/sub-01_ses-1_chunk-1_acq-sag_desc-vertebrae_dseg.nii.gz"],
                                   derivative=True) != []


@pytest.mark.slow
def test_stations_derivatives_pass_the_bids_validator(stations_derivatives: Path) -> None:
    """The whole derivative tree of a stations run through ``bids-validator-deno`` (the path
    the product uses, ``spineps.bids.validation.validate_dataset``): no errors."""
    from spineps.bids.validation import validate_dataset

    report = validate_dataset(stations_derivatives, derivative=True)
    if not report.available:
        pytest.skip(f"BIDS validator not available (the schema name check above still ran): {report.reason}")
    warnings = "\n  ".join(["warnings:", *report.warnings])
    assert report.ok and report.errors == [], f"{report.summary(100)}\n{warnings}"
    # no warning about a station's own outputs (their sidecars say what they are)
    assert not [w for w in report.warnings if "/sub-" in w], warnings


def test_a_station_lock_that_cannot_be_taken_fails_its_session_and_the_run_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A planted link in place of one station's lock file (an ``OutputError`` while the
    session takes its locks): that session's stations fail with a record each, the link's
    target is untouched, the other session is named and written, the exit is non-zero."""
    from spineps import loading
    from spineps.cli.main import main
    from spineps.failures import read_failures
    from tests.segmenters import ComponentInstanceSegmenter

    monkeypatch.setattr(loading, "load_instance_segmenter", lambda settings: ComponentInstanceSegmenter())
    cuts = even_cuts(WHOLE, 2, overlap_mm=40.0)
    ds = write_station_dataset(tmp_path / "ds", [(WHOLE, cuts), (WHOLE, cuts)], images=False)
    out = tmp_path / "out"
    (out / "logs" / "locks").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "logs" / "locks" / "sub-01_ses-1_acq-sag_chunk-2.lock").symlink_to(victim)
    capsys.readouterr()
    assert main(["instance", str(ds / "derivatives" / "reference"), str(out), "--nprocs", "1"]) == 1
    assert victim.read_text() == "precious\n"
    text = capsys.readouterr().err
    assert "OutputError" in text and "sub-01_ses-1_acq-sag_chunk-2" in text, text
    recorded = {rec["bids_name"]: rec["error"] for rec in read_failures(out)}
    assert recorded == {"sub-01_ses-1_acq-sag_chunk-1": "OutputError", "sub-01_ses-1_acq-sag_chunk-2": "OutputError"}
    assert not (out / "sub-01").exists()
    for k in (1, 2):
        assert (out / f"sub-02/ses-1/anat/sub-02_ses-1_acq-sag_chunk-{k}_desc-vertebrae_dseg.json").is_file()
