"""The participant level: every selected sagittal T2w scan through ``segment_scan``, with
outputs written atomically, complete scans skipped on reruns, and one scan's failure
logged and skipped while the others go on.

Order of writes per scan: semantic mask, instance mask, centroids, morphometry table and QC
figure (``spineps.measure``), then the sidecars. The
sidecars are the last files of ``expected_outputs``, so a scan counts as complete only
when everything before them was written (every single write is atomic, see
``spineps.fsutil``), and only when its sidecars name this run's models and voxel-changing
options (``_complete``): outputs of other models or options are recomputed.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar

from spineps.errors import BIDSValidationError, ResourceError, ScanFailuresError, SpinepsError, one_line, write_error
from spineps.fsutil import LockHeld, jsonable

if TYPE_CHECKING:  # pragma: no cover
    from spineps.bids.validation import PendingValidation
    from spineps.models.protocols import InstanceSegmenter, SemanticSegmenter
    from spineps.pipeline import NamingOptions, ScanResult
    from spineps.settings import Settings

__all__ = ["ParticipantSummary", "start_validation", "finish_validation", "validated_first", "check_inputs",
           "start_n4_prefetch",
           "select_scans", "run_participant", "process_scan", "process_mask", "load_semantic_mask",
           "model_provenance", "run_models", "session_groups", "STATION_ENTITIES"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")



@dataclass
class ParticipantSummary:
    """What one participant-level run did (relative paths of the source scans)."""

    total: int = 0
    processed: list[str] = field(default_factory=list)
    skipped_complete: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_selected: dict[str, str] = field(default_factory=dict)  # discovery's skips: path -> reason
    seconds: float = 0.0
    temporary: set[str] = field(default_factory=set)  # failed scans that only lacked memory or disk
    not_attempted: list[str] = field(default_factory=list)  # left after the first failure (--stop-on-first-crash)

    def lines(self) -> list[str]:
        out = [f"{self.total} scan(s): {len(self.processed)} processed, {len(self.skipped_complete)} skipped "
               f"(outputs complete), {len(self.failed)} failed; {len(self.not_selected)} other file(s) not used; "
               f"{self.seconds:.1f} s"]
        out += [f"  failed: {name}: {why}" for name, why in self.failed.items()]
        if self.not_attempted:
            out.append(f"  not attempted (--stop-on-first-crash): {len(self.not_attempted)} scan(s): "
                       + ", ".join(self.not_attempted))
        return out


def start_validation(settings: "Settings") -> Optional["PendingValidation"]:
    """Start the BIDS validator on the input dataset in the background (None when the run
    skips validation or reads semantic masks): it runs while the models load, and
    :func:`check_inputs` waits for its verdict before any scan is selected."""
    if settings.input_kind == "semantic-mask" or settings.skip_bids_validation:
        return None
    from spineps.bids.validation import start_validation as start

    return start(settings.bids_dir, derivative=False)


def finish_validation(settings: "Settings", pending: Optional["PendingValidation"] = None) -> None:
    """The validator's verdict (waiting for a run started by :func:`start_validation`);
    ``BIDSValidationError`` for an invalid dataset."""
    from spineps.bids.validation import validate_dataset

    report = pending.result() if pending is not None else validate_dataset(settings.bids_dir, derivative=False)
    if not report.available:
        log.warning("the input dataset was not validated: %s", getattr(report, "reason", "validator not available"))
        return
    for w in list(report.warnings)[:20]:
        log.debug("BIDS validator warning: %s", w)
    if not report.ok:
        errors = list(report.errors)
        shown = "; ".join(str(e) for e in errors[:5]) + (f"; ... ({len(errors)} in all)" if len(errors) > 5 else "")
        raise BIDSValidationError(f"the input dataset is not valid BIDS ({shown}); fix it, or run with "
                                  "--skip-bids-validation", settings.bids_dir)
    log.info("input dataset passed BIDS validation")


def validated_first(settings: "Settings", pending: Optional["PendingValidation"], step: Callable[[], _T]) -> _T:
    """Run ``step`` while the validator started by :func:`start_validation` runs; when the
    step fails, the validator's verdict comes first (an invalid dataset is reported as
    such, exit 16, whatever else went wrong, as when validation ran before everything)."""
    try:
        return step()
    except BaseException:
        if pending is not None:
            if isinstance(sys.exc_info()[1], Exception):
                finish_validation(settings, pending)  # raises BIDSValidationError for an invalid dataset
            else:
                pending.cancel()
        raise


def check_inputs(settings: "Settings", pending: Optional["PendingValidation"] = None):  # -> Discovery
    """Validate the input dataset (unless skipped; ``pending``: a validator run started by
    :func:`start_validation`) and select the scans. Raises ``BIDSValidationError`` (16) and,
    for labels or filters that select nothing, ``NoMatchError`` (18)."""
    if settings.input_kind != "semantic-mask":
        if settings.skip_bids_validation:
            log.info("BIDS validation skipped (--skip-bids-validation)")
        else:
            finish_validation(settings, pending)
    return select_scans(settings)


def select_scans(settings: "Settings"):  # -> Discovery
    """The scans of the run (pybids discovery, or the semantic masks of ``spineps instance``),
    without validation; ``NoMatchError`` (18) for labels or filters that select nothing."""
    from spineps.bids.discovery import discover_scans, load_bids_filters

    if settings.input_kind == "semantic-mask":
        from spineps.bids.masks import DEFAULT_MASK_PATTERN, discover_semantic_masks

        return discover_semantic_masks(settings.bids_dir, settings.mask_pattern or DEFAULT_MASK_PATTERN,
                                       participant_labels=list(settings.participant_labels) or None,
                                       session_labels=list(settings.session_labels) or None)
    filters = load_bids_filters(settings.bids_filter_file) if settings.bids_filter_file else None
    database_dir = (settings.work_dir / "pybids") if settings.work_dir else None  # a fresh subfolder per run
    return discover_scans(
        settings.bids_dir,
        participant_labels=list(settings.participant_labels) or None,
        session_labels=list(settings.session_labels) or None,
        bids_filters=filters,
        database_dir=database_dir,
    )  # discovery logs each skipped file with its reason


def start_n4_prefetch(settings: "Settings", discovery: Any) -> Optional[Any]:  # -> Optional[N4Job]
    """N4 of the first scan the run will compute, started in a helper process
    (``spineps.semantic.n4_helper.start_prefetch``) so that it runs while the models load.
    None when there is nothing to start: N4 off, masks as input, no scan, or the first
    scans' outputs already there or their locks held by other runs (the first other one is
    taken; whether it is really computed is decided later: an unused helper is cancelled)."""
    if not settings.n4 or settings.input_kind != "image":
        return None
    for scan in list(getattr(discovery, "scans", ()) or ())[:_PREFETCH_LOOKAHEAD]:
        if all(p.exists() for p in expected_scan_outputs(settings, scan, with_instances=True)):
            continue
        if (settings.logs_dir / "locks" / f"{scan.key}.lock").exists():
            continue  # another run is computing it (runs that share a cohort take the next scan)
        from spineps.semantic.n4_helper import start_prefetch
        from spineps.semantic.preprocess import N4Settings

        return start_prefetch(scan.path, N4Settings(), settings.threads)
    return None


#: how many scans from the start :func:`start_n4_prefetch` looks through for one to correct
_PREFETCH_LOOKAHEAD = 8


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _prepare_output_dir(settings: "Settings") -> None:
    """Dataset-level files; every write is atomic, so parallel runs can all do it."""
    from spineps.bids.derivatives import (write_bidsignore, write_dataset_description, write_lookup_tables,
                                          write_readme)
    from spineps.fsutil import remove_stale_locks, remove_stale_temps

    remove_stale_temps(settings.output_dir)
    remove_stale_locks(settings.logs_dir / "locks")
    write_dataset_description(settings.output_dir, bids_dir=settings.bids_dir, version=settings.version,
                              container=settings.container_info(), source_name=_source_name(settings))
    write_lookup_tables(settings.output_dir)
    write_readme(settings.output_dir, version=settings.version)
    write_bidsignore(settings.output_dir)


def _source_name(settings: "Settings") -> str:
    """The input dataset's key in ``DatasetLinks`` and the sidecars' BIDS URIs."""
    return "semantic" if settings.input_kind == "semantic-mask" else "raw"


_IMAGE_DESCRIPTION = ("Semantic segmentation of the spine (vertebra substructures, discs, spinal canal and cord); "
                      "values as in desc-spine_dseg.tsv")
_MASK_DESCRIPTION = ("Semantic segmentation of the spine, post-processed by the instance phase (endplates split, "
                     "voxels consistent with the instances) from the input mask in Sources; values as in "
                     "desc-spine_dseg.tsv")


def run_participant(settings: "Settings", semantic: Optional["SemanticSegmenter"],
                    instance: Optional["InstanceSegmenter"], discovery: Any = None) -> ParticipantSummary:
    """Process every selected scan. Raises ``ScanFailuresError`` at the end when any scan
    failed (the others are finished first); ``KeyboardInterrupt`` (also SIGTERM, see
    ``spineps.cli.main``) abandons the current scan after logging what finished.

    With ``settings.input_kind == "semantic-mask"`` (``spineps instance``) the "scans" are
    semantic masks, ``semantic`` is None and each mask goes through :func:`process_mask`."""
    from_masks = settings.input_kind == "semantic-mask"
    if from_masks and instance is None:
        raise ValueError("the instance phase on semantic masks needs an instance model")
    if not from_masks and semantic is None:
        raise ValueError("a participant run on images needs a semantic model")
    t_start = time.perf_counter()
    if discovery is None:
        discovery = check_inputs(settings)
    scans = list(discovery.scans)
    if not from_masks:
        _check_modality(settings, scans, semantic)
    summary = _summary_of(settings, discovery, len(scans))
    if settings.stop_on_first_crash and summary.failed:  # an unreadable input: stop before any scan
        summary.not_attempted, scans = [s.relpath for s in scans], []
        log.error("stopping at the first failure (--stop-on-first-crash): %d scan(s) not attempted",
                  len(summary.not_attempted))
    _prepare_output_dir(settings)
    models = run_models(semantic, instance)
    footprint = _footprint(semantic, instance)
    _write_methods(settings, models)
    log.info("%d scan(s) selected", len(scans))
    try:
        _process_all(settings, scans, (semantic, instance, models, footprint), summary)
    finally:
        summary.seconds = time.perf_counter() - t_start
    for line in summary.lines():
        log.info("summary: %s", line.strip())
    if summary.failed:
        raise ScanFailuresError(summary.failed, temporary=set(summary.failed) <= summary.temporary)
    return summary


def _check_modality(settings: "Settings", scans: list[Any], semantic: Any) -> None:
    """A scan whose suffix (``T1w``, ...) is no modality of the semantic model (its
    ``inference_config.json`` ``modality``, e.g. ``["T2w"]``) would get masks of a model that
    never saw such images (a ``--bids-filter-file`` can select them): ``UsageError`` (64)
    naming them, before any scan runs, unless ``--allow-modality-mismatch`` (then a warning)."""
    from spineps.errors import UsageError

    modality = tuple(getattr(semantic, "modality", None) or ())
    if not modality:
        return  # a segmenter that does not say
    foreign = [scan for scan in scans if scan.suffix not in modality]
    if not foreign:
        return
    suffixes = ", ".join(sorted({scan.suffix for scan in foreign}))
    shown = ", ".join(scan.relpath for scan in foreign[:3]) + (f", ... ({len(foreign)} in all)"
                                                               if len(foreign) > 3 else "")
    what = (f"the semantic model {getattr(semantic, 'name', '?')} is for {'/'.join(modality)} scans (modality in its "
            f"inference_config.json), but {len(foreign)} selected scan(s) are {suffixes}: {shown}")
    if settings.allow_modality_mismatch:
        log.warning("%s; segmenting them anyway (--allow-modality-mismatch): their masks are not to be trusted", what)
        return
    raise UsageError(f"{what}. Select {'/'.join(modality)} scans (check the --bids-filter-file), give a model for "
                     f"{suffixes}, or pass --allow-modality-mismatch to segment them anyway")


def expected_scan_outputs(settings: "Settings", scan: Any, with_instances: bool) -> list[Path]:
    """The files that make ``scan`` complete (``expected_outputs``; with ``--save-probabilities``
    also its ``_probseg`` map, put first: the sidecars stay last)."""
    from spineps.bids.derivatives import PROBSEG, PROBSEG_SIDECAR, expected_outputs

    expected = list(expected_outputs(settings.output_dir, scan, with_instances=with_instances))
    if settings.save_probabilities and settings.input_kind == "image":
        expected = [PROBSEG.path(settings.output_dir, scan), PROBSEG_SIDECAR.path(settings.output_dir, scan),
                    *expected]
    return expected


def _process_all(settings: "Settings", scans: list[Any], run: tuple[Any, Any, dict, Any],
                 summary: ParticipantSummary) -> None:
    """The scans in units (:func:`session_groups`: the stations of one session together, every
    other scan alone), in two passes that share the work with other runs on the same output
    folder: first the units nobody holds (a held one is deferred), then the deferred ones,
    waiting for their holders (:func:`_take_unit`; complete units are skipped and their
    failure records cleared). With ``--stop-on-first-crash`` the run ends after the first unit
    with a failure, in either pass, the scans left listed as not attempted. ``run``: as for
    :func:`_run_one`."""
    units = session_groups(scans) if run[1] is not None else [[s] for s in scans]
    current: list[Optional[str]] = [None]  # the unit in progress, for the interrupt message
    try:
        deferred = _one_pass(settings, _tagged(units, len(scans)), run, summary, False, current)
        if deferred and not summary.not_attempted:
            log.info("back to %d scan(s) other runs were computing: waiting for them, then computing any they did "
                     "not complete", sum(len(unit) for _, unit in deferred))
            _one_pass(settings, deferred, run, summary, True, current)
    except KeyboardInterrupt:
        log.error("interrupted while processing %s (its outputs are incomplete and will be recomputed by a rerun); "
                  "finished before: %d processed, %d already complete, %d failed",
                  current[0] or "no scan", len(summary.processed), len(summary.skipped_complete),
                  len(summary.failed))
        raise


def _one_pass(settings: "Settings", tagged: list[tuple[str, list[Any]]], run: tuple[Any, Any, dict, Any],
              summary: ParticipantSummary, wait: bool, current: list[Optional[str]]) -> list[tuple[str, list[Any]]]:
    """One pass of :func:`_process_all` over the tagged units: the ones held by other runs
    (``wait`` False) are returned for the second pass. With ``--stop-on-first-crash`` the pass
    ends after the first unit with a failure, the units deferred so far and those left noted
    in ``summary.not_attempted`` (and nothing is returned)."""
    deferred: list[tuple[str, list[Any]]] = []
    for n, (tag, unit) in enumerate(tagged, start=1):
        current[0] = ", ".join(s.relpath for s in unit)
        if not _take_unit(settings, unit, tag, run, summary, wait=wait):
            deferred.append((tag, unit))
        current[0] = None
        if settings.stop_on_first_crash and summary.failed:
            summary.not_attempted = [s.relpath for _, later in deferred + tagged[n:] for s in later]
            log.error("stopping at the first failure (--stop-on-first-crash): %d scan(s) not attempted",
                      len(summary.not_attempted))
            return []
    return deferred


def _write_methods(settings: "Settings", models: dict[str, dict[str, Any]]) -> None:
    """The run's methods boilerplate (``spineps.methods``) under ``logs/``, from the run's
    ``Models`` (:func:`run_models`); a failure to write it is logged, never fatal (the scans'
    outputs do not depend on it)."""
    from spineps.methods import write_methods

    try:
        write_methods(settings, models)
    except OSError as exc:
        log.warning("methods boilerplate not written: %s", one_line(str(exc)))


def _summary_of(settings: "Settings", discovery: Any, total: int) -> ParticipantSummary:
    """A run's summary before any scan: discovery's skips, and the inputs that cannot be read
    (meant as input: failed scans)."""
    summary = ParticipantSummary(total=total)
    summary.not_selected = {_rel(Path(p), settings.bids_dir): str(why) for p, why in discovery.skipped}
    from spineps.failures import record_failure

    for p, why in getattr(discovery, "unusable", ()):
        rel = _rel(Path(p), settings.bids_dir)
        summary.not_selected.pop(rel, None)
        summary.failed[rel] = one_line(f"InputError: {why}")
        log.error("%s failed: %s", rel, summary.failed[rel])
        record_failure(settings, rel, "InputError", str(why))
    return summary


def run_models(semantic: Optional["SemanticSegmenter"],
               instance: Optional["InstanceSegmenter"]) -> dict[str, dict[str, Any]]:
    """The ``Models`` of this run's sidecars (role -> :func:`model_provenance`), once per run."""
    models: dict[str, dict[str, Any]] = {}
    if semantic is not None:
        models["semantic"] = model_provenance(semantic)
    if instance is not None:
        models["instance"] = model_provenance(instance)
    return models


def _complete(settings: "Settings", scan: Any, expected: list[Path], models: dict[str, dict[str, Any]],
              what: str) -> bool:
    """Whether the scan's outputs are complete *and this run's*: every expected file exists and
    its sidecars name the same models (checksums) and the same voxel-changing options
    (``spineps.bids.derivatives.sidecar_mismatch``). Outputs of other models or options are
    recomputed, and the log says why; ``--overwrite`` recomputes every scan."""
    import json

    from spineps.bids.derivatives import INSTANCE_SIDECAR, SEMANTIC_SIDECAR, sidecar_mismatch

    if settings.overwrite or not all(Path(p).is_file() for p in expected):
        return False
    params = settings.parameters()
    for kind in (SEMANTIC_SIDECAR, INSTANCE_SIDECAR):
        path = kind.path(settings.output_dir, scan)
        if path not in expected:
            continue
        try:
            sidecar = json.loads(path.read_text(encoding="utf-8"))
            why = sidecar_mismatch(sidecar, models, params) if isinstance(sidecar, dict) else "no JSON object"
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            why = f"its sidecar {path.name} cannot be read ({type(exc).__name__})"
        if why is not None:
            log.info("%s: outputs exist, but %s: recomputing", what, why)
            return False
    return True


def _unit_complete(settings: "Settings", unit: list[Any], expected: list[list[Path]],
                   models: dict[str, dict[str, Any]], what: str) -> bool:
    """Whether every scan of a unit (one scan, or the stations of one session) is
    :func:`_complete`: a session is recomputed as a whole when any station is not."""
    return all(_complete(settings, scan, exp, models, what) for scan, exp in zip(unit, expected))


def _footprint(semantic: Any, instance: Any) -> Any:  # -> Optional[spineps.resources.Footprint]
    """The run's networks for the memory estimate (``spineps.resources.Footprint``), logged once."""
    from spineps.resources import Footprint

    footprint = Footprint.of(semantic, instance)
    log.debug("memory footprint of the networks: %s", footprint)
    return footprint


def _tagged(units: list[list[Any]], total: int) -> list[tuple[str, list[Any]]]:
    """Each unit with its tag in the log: ``[3/9]`` for a scan, ``[4-6/9]`` for three stations."""
    out, done = [], 0
    for unit in units:
        out.append((f"[{done + 1}{f'-{done + len(unit)}' if len(unit) > 1 else ''}/{total}]", unit))
        done += len(unit)
    return out


def _take_unit(settings: "Settings", unit: list[Any], tag: str, run: tuple[Any, Any, dict, Any],
               summary: ParticipantSummary, wait: bool) -> bool:
    """One unit (a scan, or the stations of one session), unless its outputs are complete
    (skipped). False when ``wait`` is False and another run holds the lock of (a station of)
    the unit (it is left for later, no lock kept), True when it was dealt with."""
    from spineps.failures import clear_failure

    names = ", ".join(s.relpath for s in unit)
    expected = [expected_scan_outputs(settings, s, with_instances=run[1] is not None) for s in unit]
    if _unit_complete(settings, unit, expected, run[2], f"{tag} {names}"):
        log.info("%s %s: outputs complete, skipped (use --overwrite to recompute)", tag, names)
        summary.skipped_complete.extend(s.relpath for s in unit)
        for scan in unit:
            clear_failure(settings, scan.key)
        return True
    if wait:
        log.info("%s %s", tag, names)
    if len(unit) == 1:
        return _run_one(settings, unit[0], tag, expected[0], run, summary, wait=wait)
    assert run[1] is not None  # stations are named from instances (session_groups only then)
    return _run_session(settings, unit, tag, expected, run, summary, wait=wait)


def _run_one(settings: "Settings", scan: Any, tag: str, expected: list[Path], run: tuple[Any, Any, dict, Any],
             summary: ParticipantSummary, wait: bool = True) -> bool:
    """One scan under its lock; its outcome (processed, skipped, failed and why) into ``summary``
    and, for a failure, a record in the output dataset (``spineps.failures``; cleared when the
    scan completes). ``run``: the semantic and instance segmenters, their ``Models``
    (:func:`run_models`) and their memory footprint (``spineps.resources.Footprint``).
    A failure is logged and recorded, never raised (``KeyboardInterrupt`` is). With ``wait``
    False and the lock held by another run, nothing is done (no record either) and False is
    returned."""
    from spineps.failures import clear_failure

    name = scan.relpath
    semantic, instance, models, footprint = run

    def work() -> bool:
        with _scan_lock(settings, scan, f"{tag} {name}", wait=wait):
            if not wait:
                log.info("%s %s", tag, name)
            if _complete(settings, scan, expected, models, f"{tag} {name}"):
                log.info("%s %s: outputs completed by another run meanwhile, skipped", tag, name)
                summary.skipped_complete.append(name)
                clear_failure(settings, scan.key)
                return False
            _revoke_complete(settings, scan)
            if settings.input_kind == "semantic-mask":
                assert instance is not None  # checked by run_participant
                process_mask(settings, scan, instance, models, footprint)
            else:
                assert semantic is not None  # checked by run_participant
                process_scan(settings, scan, semantic, instance, models, footprint)
            return True

    try:
        if _guarded(settings, summary, scan, tag, work):
            summary.processed.append(name)
            clear_failure(settings, scan.key)
    except LockHeld:
        log.info("%s %s: another run is computing this scan; taking the next one (back to it at the end)", tag, name)
        return False
    return True


def _guarded(settings: "Settings", summary: ParticipantSummary, scan: Any, tag: str, fn: Any) -> Any:
    """``fn()``, or None with the scan's failure (its reason) logged, noted in ``summary`` and
    recorded in the output dataset (``spineps.failures``); ``KeyboardInterrupt`` is raised, and
    ``LockHeld``: a held lock is no failure, the caller leaves the scan for later."""
    from spineps.failures import record_failure

    name = scan.relpath
    try:
        return fn()
    except LockHeld:
        raise
    except SpinepsError as exc:
        if isinstance(exc, ResourceError):
            summary.temporary.add(name)
        why = exc.reason if exc.path is not None and Path(exc.path) == Path(scan.path) else str(exc)
        _failed(settings, summary, scan, tag, type(exc).__name__, why)
    except MemoryError:
        summary.temporary.add(name)
        _failed(settings, summary, scan, tag, "MemoryError", "out of memory")
    except OSError as exc:  # a write no typed error wrapped; disk or quota full is temporary (75)
        err = write_error(f"{type(exc).__name__}: {one_line(str(exc))}", getattr(exc, "filename", None), exc)
        if isinstance(err, ResourceError):
            summary.temporary.add(name)
        log.error("%s %s failed: %s", tag, name, err.reason)
        log.debug("traceback for %s", name, exc_info=True)
        summary.failed[name] = err.reason
        record_failure(settings, name, type(err).__name__, err.reason, bids_name=scan.key)
    except Exception as exc:  # a bug or a library failure: keep going with the other scans
        log.debug("traceback for %s", name, exc_info=True)
        _failed(settings, summary, scan, tag, type(exc).__name__, str(exc))
    return None


def _failed(settings: "Settings", summary: ParticipantSummary, scan: Any, tag: str, error: str, why: str) -> None:
    """Log a scan's failure, note it in the summary and write its record."""
    from spineps.failures import record_failure

    text = "out of memory" if error == "MemoryError" else f"{error}: {one_line(why)}"
    log.error("%s %s failed: %s", tag, scan.relpath, text)
    summary.failed[scan.relpath] = text
    record_failure(settings, scan.relpath, error, why, bids_name=scan.key)


# ------------------------------------------------------------------------------ stations
#: the entities that tell the stations of one acquisition apart
STATION_ENTITIES = ("chunk", "run")


def session_groups(scans: list[Any]) -> list[list[Any]]:
    """The scans in units: the stations of one session (the same entities and suffix but for
    ``chunk`` / ``run``) together, every other scan alone; in the order of their first scan."""
    groups: dict[tuple, list[Any]] = {}
    for scan in scans:
        key = (scan.suffix, tuple((k, v) for k, v in scan.entities.items() if k not in STATION_ENTITIES))
        groups.setdefault(key, []).append(scan)
    return list(groups.values())


@dataclass
class _StationRun:
    """What one station needs for its outputs once the session is named."""

    scan: Any
    header: Any
    image: Any
    t_load: float
    models: dict[str, Any]
    description: str
    prediction: Any  # pipeline.StationPrediction


def _predict_station(settings: "Settings", scan: Any, run: tuple[Any, Any, dict, Any]) -> _StationRun:
    """Load one station, the semantic phase (images) and the instance phase up to the names.
    ``run`` as for :func:`_run_one`: the segmenters, the run's ``Models`` and the memory
    footprint (checked against this station's size, as :func:`process_scan` does)."""
    from spineps.geometry.io import load_volume, read_header
    from spineps.pipeline import predict_station
    from spineps.resources import check_scan_resources

    semantic, instance, models, footprint = run
    assert instance is not None  # stations are named from instances
    t0 = time.perf_counter()
    header = read_header(scan.path)
    check_scan_resources(header, settings.output_dir, footprint=footprint, memory_budget_mb=settings.mem_mb)
    if settings.input_kind == "semantic-mask":
        image, mask = None, load_semantic_mask(scan.path)
        t_load, times, prov = time.perf_counter() - t0, {}, {}
        description = _MASK_DESCRIPTION
    else:
        assert semantic is not None
        image = load_volume(scan.path, kind="image")
        _check_not_constant(image, scan.path)
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        mask = semantic.segment(image)
        if not mask.same_grid(image):
            raise RuntimeError(f"semantic model {semantic.name} returned a mask off the input grid")
        times, prov = {"semantic_total": time.perf_counter() - t1}, {"semantic_model": semantic.provenance()}
        description = _IMAGE_DESCRIPTION
        if settings.save_probabilities:
            _write_probabilities(settings, scan, semantic, header, image.affine, models)
    pred = predict_station(scan.stem, mask, instance, timings=times, provenance=prov)
    return _StationRun(scan, header, image, t_load, models, description, pred)


def _name_session(runs: list[_StationRun], settings: "Settings") -> dict[str, Any]:
    """The session's stations named together (``pipeline.name_stations``); should that fail,
    each alone, with a warning."""
    from spineps.pipeline import name_stations

    preds = [r.prediction for r in runs]
    try:
        results, _session = name_stations(preds, _naming_options(settings))
        return results
    except Exception as exc:  # the stations can still be named one by one
        log.warning("stations %s could not be named together (%s: %s): each named alone",
                    ", ".join(p.name for p in preds), type(exc).__name__, one_line(str(exc)))
        log.debug("traceback", exc_info=True)
        return {p.name: name_stations([p], _naming_options(settings))[0][p.name] for p in preds}


def _run_session(settings: "Settings", scans: list[Any], tag: str, expected: list[list[Path]],
                 run: tuple[Any, Any, dict, Any], summary: ParticipantSummary, wait: bool = True) -> bool:
    """The stations of one session under their locks: each predicted (a failure skips that
    station), the survivors named as one spine, each station's outputs written. ``run`` as for
    :func:`_run_one` (segmenters, ``Models``, memory footprint). The session takes all its
    stations' locks (in the order of ``scans``, the same in every run) or, with ``wait``
    False and one held by another run, none: False is returned and nothing is done. A
    station's failure is recorded (``spineps.failures``), a written station's record cleared."""
    from spineps.failures import clear_failure

    models = run[2]
    with ExitStack() as locks:
        try:
            for scan in scans:
                if _guarded(settings, summary, scan, tag, _Lock(settings, scan, f"{tag} {scan.relpath}", wait,
                                                                 locks)) is None:
                    # a lock that cannot be taken (OutputError: a planted link, a symlinked
                    # folder) fails the whole session, nothing of it touched; the run goes on
                    _share_failure(settings, summary, scan, [s for s in scans if s is not scan])
                    return True
        except LockHeld:
            log.info("%s %s: another run is computing this station; taking the next scan (back to its session at "
                     "the end)", tag, scan.relpath)
            return False  # the locks taken are released on leaving
        if not wait:
            log.info("%s %s", tag, ", ".join(s.relpath for s in scans))
        if _unit_complete(settings, scans, expected, models, tag):
            log.info("%s: outputs completed by another run meanwhile, skipped", tag)
            summary.skipped_complete.extend(s.relpath for s in scans)
            for scan in scans:
                clear_failure(settings, scan.key)
            return True
        runs = [r for scan in scans
                if (r := _guarded(settings, summary, scan, tag, _Predict(settings, scan, run))) is not None]
        if not runs:
            return True
        t0 = time.perf_counter()
        results = _guarded(settings, summary, runs[0].scan, tag, lambda: _name_session(runs, settings)) or {}
        if not results:
            _share_failure(settings, summary, runs[0].scan, [r.scan for r in runs[1:]])
        log.info("%s: %d station(s) named as one session in %.1f s", tag, len(runs), time.perf_counter() - t0)
        for r in runs:
            if r.prediction.name in results and _guarded(settings, summary, r.scan, tag, _Write(settings, r, results)):
                summary.processed.append(r.scan.relpath)
                clear_failure(settings, r.scan.key)
    return True


def _share_failure(settings: "Settings", summary: ParticipantSummary, failed: Any, others: list[Any]) -> None:
    """The failure of ``failed`` (naming the session) noted and recorded for the ``others``
    (the session's other stations) too."""
    from spineps.failures import record_failure

    text = summary.failed.get(failed.relpath, "the stations could not be named")
    if text == "out of memory":
        error, reason = "MemoryError", text
    else:
        error, _, reason = text.partition(": ") if ": " in text else ("RuntimeError", "", text)
    for scan in others:
        summary.failed[scan.relpath] = text
        record_failure(settings, scan.relpath, error, reason, bids_name=scan.key)


@dataclass
class _Lock:
    """A station's lock entered into the session's ``locks`` (for ``_guarded``): True once held."""

    settings: "Settings"
    scan: Any
    what: str
    wait: bool
    locks: ExitStack

    def __call__(self) -> bool:
        self.locks.enter_context(_scan_lock(self.settings, self.scan, self.what, wait=self.wait))
        return True


@dataclass
class _Predict:
    """A station's old sidecars removed, then :func:`_predict_station` (for ``_guarded``)."""

    settings: "Settings"
    scan: Any
    run: tuple[Any, Any, dict, Any]  # segmenters, Models, footprint (as for _run_one)

    def __call__(self) -> _StationRun:
        _revoke_complete(self.settings, self.scan)
        return _predict_station(self.settings, self.scan, self.run)


@dataclass
class _Write:
    """A named station's outputs (for ``_guarded``): True once written."""

    settings: "Settings"
    run: _StationRun
    results: dict[str, Any]

    def __call__(self) -> bool:
        r = self.run
        _write_outputs(self.settings, r.scan, self.results[r.prediction.name], header=r.header, image=r.image,
                       t_load=r.t_load, models=r.models, semantic_description=r.description)
        return True


@contextmanager
def _scan_lock(settings: "Settings", scan: Any, what: str, wait: bool = True) -> Iterator[None]:
    """One scan is computed by one process at a time: an ``fcntl.flock`` on
    ``logs/locks/<scan key>.lock`` in the output folder (removed on release; the kernel
    releases it when a process dies). Runs that share a cohort share its work: a run first
    takes the scans nobody holds (``wait=False``: ``LockHeld`` for a held one), then comes
    back to the held ones and waits for each (``wait=True``), skipping it when its holder
    completed it (or recomputing it with ``--overwrite``, or when the holder failed or died);
    the stations of one session are taken together (:func:`_run_session`).

    The lock folder and the scan's output folder must be real folders (no symlink between
    ``output_dir`` and them; ``spineps.fsutil.check_real_folder``) and the lock file a plain
    file of its own: ``OutputError`` (73) otherwise, before anything of the scan is touched."""
    from spineps.bids.derivatives import derivative_dir
    from spineps.errors import OutputError
    from spineps.fsutil import check_real_folder, exclusive_lock

    path = settings.logs_dir / "locks" / f"{scan.key}.lock"
    with ExitStack() as stack:
        try:
            check_real_folder(path.parent, settings.output_dir)
            check_real_folder(derivative_dir(settings.output_dir, scan), settings.output_dir)
            stack.enter_context(exclusive_lock(path, on_wait=lambda: log.info(
                "%s: another run is computing this scan; waiting for it", what), wait=wait))
        except OSError as exc:
            raise OutputError(f"{exc.strerror or exc}", Path(exc.filename) if exc.filename else path) from exc
        yield


def _revoke_complete(settings: "Settings", scan: Any) -> None:
    """Remove the scan's sidecars before anything of it is rewritten: an interrupted rerun
    (e.g. with --overwrite) must not leave new masks beside old sidecars that would make the
    scan look complete."""
    from spineps.bids.derivatives import INSTANCE_SIDECAR, SEMANTIC_SIDECAR
    from spineps.errors import OutputError

    for kind in (SEMANTIC_SIDECAR, INSTANCE_SIDECAR):
        path = kind.path(settings.output_dir, scan)
        try:
            path.unlink()
            log.debug("removed %s (recomputing)", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OutputError(f"cannot remove an old sidecar: {exc.strerror or exc}", path) from exc


def _naming_options(settings: "Settings") -> "NamingOptions":
    from spineps.pipeline import NamingOptions

    return NamingOptions(rule=settings.level_rule, top_vertebra=settings.top_vertebra)


def process_scan(settings: "Settings", scan: Any, semantic: "SemanticSegmenter",
                 instance: Optional["InstanceSegmenter"], models: Optional[dict[str, Any]] = None,
                 footprint: Any = None) -> "ScanResult":
    """Load, segment and write the outputs of one scan (sidecars last). ``models``: the
    sidecars' ``Models`` (:func:`run_models`, computed here when not given); ``footprint``: the
    networks' memory footprint (``spineps.resources.Footprint``, computed here when not given)."""
    from spineps.geometry.io import load_volume, read_header
    from spineps.pipeline import segment_scan
    from spineps.resources import check_scan_resources

    t0 = time.perf_counter()
    header = read_header(scan.path)
    footprint = footprint if footprint is not None else _footprint(semantic, instance)
    # InputError / ResourceError before any voxel is read
    check_scan_resources(header, settings.output_dir, footprint=footprint, memory_budget_mb=settings.mem_mb)
    image = load_volume(scan.path, kind="image")
    _check_not_constant(image, scan.path)
    t_load = time.perf_counter() - t0
    log.debug("loaded %s", image)
    result = segment_scan(image, semantic, instance, _naming_options(settings))
    models = models if models is not None else run_models(semantic, instance)
    if settings.save_probabilities:
        _write_probabilities(settings, scan, semantic, header, image.affine, models)
    _write_outputs(settings, scan, result, header=header, image=image, t_load=t_load, models=models,
                   semantic_description=_IMAGE_DESCRIPTION)
    log.info("%s: done in %.1f s", scan.relpath, time.perf_counter() - t0)
    return result


def process_mask(settings: "Settings", scan: Any, instance: "InstanceSegmenter",
                 models: Optional[dict[str, Any]] = None, footprint: Any = None) -> "ScanResult":
    """``spineps instance``: the instance phase, post-processing and level naming on one
    existing semantic mask (``scan`` is the mask), then the same outputs as
    :func:`process_scan` (no image: the figure shows the masks alone)."""
    from spineps.geometry.io import read_header
    from spineps.pipeline import segment_from_semantic
    from spineps.resources import check_scan_resources

    t0 = time.perf_counter()
    header = read_header(scan.path)
    footprint = footprint if footprint is not None else _footprint(None, instance)
    check_scan_resources(header, settings.output_dir, footprint=footprint, memory_budget_mb=settings.mem_mb)
    semantic = load_semantic_mask(scan.path)
    t_load = time.perf_counter() - t0
    result = segment_from_semantic(semantic, instance, _naming_options(settings))
    _write_outputs(settings, scan, result, header=header, image=None, t_load=t_load,
                   models=models if models is not None else run_models(None, instance),
                   semantic_description=_MASK_DESCRIPTION)
    log.info("%s: done in %.1f s", scan.relpath, time.perf_counter() - t0)
    return result


def load_semantic_mask(path: Path) -> Any:  # -> Volume
    """Load a semantic mask and check its values: integers, only the community label values
    of ``desc-spine_dseg.tsv``, and at least one vertebral-body voxel. ``InputError``
    (naming the file and the values) otherwise; an instance mask given by mistake (values
    1-28) is recognised as such."""
    import numpy as np

    from spineps.errors import InputError
    from spineps.geometry.io import load_volume
    from spineps.labels import BODY, SEMANTIC

    mask = load_volume(path, kind="label")  # InputError for non-integral values
    values = np.unique(np.asarray(mask.data))
    known = {lab.value for lab in SEMANTIC} | {0}
    unknown = [int(v) for v in values if int(v) not in known]
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:12])
        shown += f", ... ({len(unknown)} in all)" if len(unknown) > 12 else ""
        hint = ""
        if all(1 <= v <= 28 or 100 <= v <= 299 for v in unknown):
            hint = " -- this looks like an instance (vertebra) mask; give the semantic mask"
        raise InputError(f"values that are no semantic label: {shown}{hint} (expected "
                         f"{', '.join(str(v) for v in sorted(known - {0}))}, as in desc-spine_dseg.tsv)", path)
    if not np.any(values == BODY):
        raise InputError(f"no vertebral-body voxels (value {BODY}): the instance phase starts from the vertebral "
                         "bodies and has nothing to separate", path)
    return mask


def _write_outputs(settings: "Settings", scan: Any, result: "ScanResult", *, header: Any, image: Any,
                   t_load: float, models: dict[str, Any], semantic_description: str) -> None:
    """Masks, centroids, morphometry and figure, then the sidecars (which mark the scan complete)."""
    import numpy as np

    from spineps.bids.derivatives import CENTROIDS, INSTANCE_MASK, INSTANCE_SIDECAR, SEMANTIC_MASK, SEMANTIC_SIDECAR, \
        make_sidecar, write_sidecar
    from spineps.geometry.io import save_volume

    out = settings.output_dir
    t1 = time.perf_counter()
    sem_path = SEMANTIC_MASK.path(out, scan)
    save_volume(result.semantic.with_data(np.asarray(result.semantic.data).astype(np.uint8)), sem_path,
                dtype=np.uint8, like=header)
    inst_path = cent_path = None
    if result.instance is not None:
        inst_path = INSTANCE_MASK.path(out, scan)
        save_volume(result.instance.with_data(np.asarray(result.instance.data).astype(np.uint16)), inst_path,
                    dtype=np.uint16, like=header)
        cent_path = CENTROIDS.path(out, scan)
        write_sidecar(cent_path, _centroids_json(result, scan))  # a JSON write like the sidecars (typed errors)
    t_write = time.perf_counter() - t1
    extra_timings = _write_measurements_and_figure(out, scan, result, image, sem_path)
    timings = {"load": round(t_load, 3), **{k: round(float(v), 3) for k, v in result.timings.items()},
               "write": round(t_write, 3), **extra_timings}
    for w in result.warnings:
        log.warning("%s: %s", scan.relpath, w)

    source = f"bids:{_source_name(settings)}:{scan.relpath}"
    params = {**settings.parameters(), "SettingsFile": settings.settings_uri(), "RunId": settings.run_id}
    sem_extra: dict[str, Any] = {"Warnings": list(result.warnings)} if result.warnings else {}
    write_sidecar(SEMANTIC_SIDECAR.path(out, scan), make_sidecar(
        description=semantic_description, sources=[source], software_version=settings.version, models=models,
        parameters=params, timings=timings, extra=sem_extra or None))
    if inst_path is not None and cent_path is not None:
        inst_source = f"bids::{sem_path.relative_to(out).as_posix()}"
        # a station named with others: its names depend on their inputs too
        together = [f"bids:{_source_name(settings)}:{rel}" for rel in _stations_together(scan, result.stations)]
        inst_extra = {"LevelNaming": jsonable(result.naming)}
        if result.stations is not None:
            inst_extra["Stations"] = jsonable(result.stations)
        if result.warnings:
            inst_extra["Warnings"] = list(result.warnings)
        write_sidecar(INSTANCE_SIDECAR.path(out, scan), make_sidecar(
            description="Instance segmentation of the spine: vertebrae 1-28, intervertebral discs 100+X, "
                        "endplates 200+X; values as in desc-vertebrae_dseg.tsv",
            sources=[source, inst_source, *together], software_version=settings.version, models=models,
            parameters=params, timings=timings, extra=inst_extra))


def _stations_together(scan: Any, stations: Optional[dict[str, Any]]) -> list[str]:
    """The input paths (relative, like ``scan.relpath``) of the other stations named together
    with ``scan`` (its ``Stations`` section's ``NamedTogether``; stations are named by their
    stems and lie in one folder); none for a scan named alone."""
    if not stations:
        return []
    rel = PurePosixPath(scan.relpath)
    return [str(rel.with_name(rel.name.replace(scan.stem, other, 1)))
            for other in stations.get("NamedTogether", []) if other != scan.stem]


def _write_probabilities(settings: "Settings", scan: Any, semantic: "SemanticSegmenter", header: Any,
                         affine: Any, models: dict[str, Any]) -> None:
    """``--save-probabilities``: the ``_probseg`` map and its sidecar, before the masks'
    sidecars (which mark the scan complete). ``ModelError`` for a segmenter that gives none."""
    from spineps.bids.derivatives import PROBSEG, PROBSEG_SIDECAR, make_sidecar, write_sidecar
    from spineps.errors import ModelError
    from spineps.semantic.probabilities import save_probseg, volume_labels

    found = getattr(semantic, "last_probabilities", None)
    if found is None:
        raise ModelError("--save-probabilities: the semantic segmenter gives no class probabilities")
    data, labels = found
    t0 = time.perf_counter()
    path = save_probseg(PROBSEG.path(settings.output_dir, scan), data, affine, like=header)
    write_sidecar(PROBSEG_SIDECAR.path(settings.output_dir, scan), make_sidecar(
        description="Class probabilities of the semantic network (softmax, before the clean-up that the "
                    "desc-spine mask had), linearly interpolated onto the source grid and stored as 16-bit fixed "
                    "point (scl_slope 1/65535); one volume per class along the 4th axis, as listed in VolumeLabels",
        sources=[f"bids:{_source_name(settings)}:{scan.relpath}"], software_version=settings.version,
        models={"semantic": models["semantic"]}, parameters={**settings.parameters(), "RunId": settings.run_id},
        timings={"write": round(time.perf_counter() - t0, 3)}, extra={"VolumeLabels": volume_labels(labels)}))
    semantic.last_probabilities = None  # type: ignore[attr-defined]
    log.info("%s: class probabilities written (%s, %.1f MB)", scan.relpath, path.name, path.stat().st_size / 2**20)


def _check_not_constant(image: Any, path: Path) -> None:
    """An image with one value everywhere (all zero: an empty export, a failed conversion)
    holds nothing to segment: ``InputError`` before the model runs (documented in
    ``docs/hostile-inputs.md``)."""
    import numpy as np

    from spineps.errors import InputError

    data = np.asarray(image.data)
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise InputError(f"image is constant (every voxel is {lo:g}): nothing to segment", path)


def _write_measurements_and_figure(out: Path, scan: Any, result: "ScanResult", image: Any,
                                   sem_path: Path) -> dict[str, float]:
    """Per-scan morphometry (``_desc-spine_morphometry.tsv`` + ``.json``, measured by the
    pipeline) and the QC figure (``FIGURE``), written after the masks and before the sidecars
    that mark the scan complete. They are derived from the masks: a failure is logged and the
    scan still completes (the group level measures scans without morphometry from their masks)."""
    from spineps.bids.derivatives import FIGURE

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        from spineps.measure.scan import morphometry_paths, write_measurements

        if result.measurements is None:
            raise RuntimeError(result.measure_error or "not measured")
        write_measurements(result.measurements, morphometry_paths(sem_path)[0])
        for flag in result.measurements.qc.flags:
            log.info("%s: QC flag %s", scan.relpath, flag)
    except Exception as exc:  # measurements are optional outputs: never fail the scan for them
        why = result.measure_error if result.measurements is None and result.measure_error else \
            f"{type(exc).__name__}: {one_line(str(exc))}"
        log.warning("%s: measurements not written: %s", scan.relpath, why)
        log.debug("traceback", exc_info=True)
    timings["measure_write"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    try:
        from spineps.measure.figures import write_figure

        m = result.measurements
        write_figure(result.semantic, result.instance, FIGURE.path(out, scan), image=image,
                     title=Path(scan.relpath).name, alignment=m.alignment if m is not None else None,
                     session_values=[v for v in m.values if v.structure == "spine"]
                     if m is not None and m.session else None)
    except Exception as exc:
        log.warning("%s: figure not written: %s: %s", scan.relpath, type(exc).__name__, one_line(str(exc)))
        log.debug("traceback", exc_info=True)
    timings["figure"] = round(time.perf_counter() - t0, 3)
    return timings


def model_provenance(model: Any) -> dict[str, Any]:
    """A segmenter's ``provenance()`` with the keys every sidecar needs first: ``name``,
    ``version`` and ``checksum`` (``sha256:<hex>``; a bare hex digest gets the prefix), then
    ``Demonstration`` (true for a model bundled with spineps, or a copy of one, with the
    ``DemonstrationNotice`` that says what that means; false otherwise); the rest is kept as
    it is."""
    from spineps.models.registry import DEMONSTRATION_NOTICE, demonstration_model

    prov = dict(model.provenance() or {})
    name = prov.pop("name", None) or getattr(model, "name", None) or type(model).__name__
    checksum = prov.pop("checksum", None)
    if checksum and ":" not in str(checksum):
        checksum = f"sha256:{checksum}"
    version = prov.pop("version", None) or prov.get("log_name") or "unversioned"
    folder = prov.get("folder")
    demo = demonstration_model(Path(folder)) if folder else None
    flags: dict[str, Any] = {"Demonstration": demo is not None}
    if demo is not None:
        flags["DemonstrationNotice"] = f"{DEMONSTRATION_NOTICE} (bundled folder {demo})"
    return {"name": str(name), "version": str(version), "checksum": str(checksum) if checksum else "n/a",
            **flags, **jsonable(prov)}


def _centroids_json(result: "ScanResult", scan: Any) -> dict[str, Any]:
    from spineps.labels import VERTEBRA_ORDER, vertebra_name

    return {
        "Description": "Centre of each vertebral body (whole vertebra where it has no body voxel): voxel indices "
                       "of the source image and RAS world coordinates in mm",
        "Source": Path(scan.path).name,
        "CoordinateSystem": "RAS+ scanner world (mm), voxel indices 0-based",
        "LevelNaming": jsonable(result.naming),
        **({"Stations": jsonable(result.stations)} if result.stations is not None else {}),
        "Vertebrae": {
            vertebra_name(int(v)): {"value": int(v), "voxel": c["voxel"], "world": c["world"]}
            for v, c in sorted(result.centroids.items(), key=lambda kv: VERTEBRA_ORDER.index(int(kv[0])))
        },
    }
