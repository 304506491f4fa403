"""The one place where the stages chain: ``segment_scan`` (image -> masks and measurements)
and ``segment_from_semantic`` (an existing semantic mask -> the same; the instance phase
needs no image).

Stages, each called once per scan with what it needs:

1. the semantic phase (``SemanticSegmenter.segment``, see ``spineps.models.protocols``):
   the semantic mask on the image's grid;
2. the instance phase (``InstanceSegmenter.segment``): anonymous vertebrae 1..N on that grid;
3. ``postprocess`` on the spine's box (both masks cut to the bounding box of the semantic
   labels plus two voxels; ``crop_to_spine``): consistency of the two masks
   (``postprocess.consistency``), the vertebral-body centroids (computed here, once, and
   handed to the later stages), discs and endplates (``postprocess.discs``), level names
   (``labeling.levels``), and the way back onto the full grid;
4. measurements and QC (``measure.scan.measure_scan``) on the final masks, with the same
   centroids.

The result (``ScanResult``) is what ``spineps.participant`` writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from spineps.errors import one_line
from spineps.geometry.volume import Volume
from spineps.labels import BODY, SACRUM
from spineps.models.protocols import InstanceSegmenter, SemanticSegmenter, VertebraPrediction

if TYPE_CHECKING:  # pragma: no cover
    from spineps.geometry.cropping import Crop
    from spineps.measure.scan import Measurements
    from spineps.postprocess.vertebrae import VertebraCentroids

__all__ = [
    "SemanticSegmenter",
    "InstanceSegmenter",
    "VertebraPrediction",
    "NamingOptions",
    "Postprocessed",
    "ScanResult",
    "segment_scan",
    "segment_from_semantic",
    "crop_to_spine",
    "postprocess",
    "centroids_json",
    "Anonymous",
    "postprocess_anonymous",
    "finish_naming",
    "StationPrediction",
    "predict_station",
    "name_stations",
]

log = logging.getLogger(__name__)

#: voxels of background kept around the spine's box (the level naming's "cut by the border"
#: tests see the borders of the full volume)
SPINE_BOX_MARGIN = 2


@dataclass(frozen=True)
class NamingOptions:
    """How the vertebrae are named (``--level-rule``, ``--top-vertebra``)."""

    rule: str = "auto"  # one of spineps.labels.LEVEL_RULES
    top_vertebra: Optional[str] = None  # "the top-most vertebra in view is ..." (overrides the rule)


@dataclass
class Postprocessed:
    """The masks after post-processing and naming, on the grid they came on."""

    semantic: Volume  # endplates split 52/53, consistent with the instances voxel for voxel
    instance: Volume  # vertebrae 1..28, discs 100+X, endplates 200+X
    centroids: "VertebraCentroids"  # of the named vertebrae, on this grid
    sacrum_centroid: Optional[np.ndarray]  # voxel indices on this grid, None without sacrum
    naming: dict[str, Any]  # LevelNaming.as_dict()
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ScanResult:
    semantic: Volume
    instance: Optional[Volume]
    centroids: dict[int, dict[str, list[float]]]  # vertebra value -> {"voxel": [...], "world": [...]}
    naming: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str]
    provenance: dict[str, Any]
    measurements: Optional["Measurements"] = None
    measure_error: Optional[str] = None  # why the measurements failed (the masks stand)
    stations: Optional[dict[str, Any]] = None  # a station of a session: SessionNaming.as_dict (the sidecars)


def crop_to_spine(semantic: Volume, vertebrae: Volume) -> tuple[Volume, Volume, Optional["Crop"]]:
    """Both masks cut to the bounding box of the semantic labels plus ``SPINE_BOX_MARGIN``
    voxels, so every label keeps background around it unless it touches the volume border.
    Returns the crops and the ``Crop`` to undo it (None when the box is the whole volume or
    empty). Saves time and memory of the post-processing on large fields of view (whole
    spine: ~60 % of the voxels are outside the box)."""
    from spineps.geometry.cropping import bbox_of, crop_to_bbox

    box = bbox_of(np.asarray(semantic.data) > 0, SPINE_BOX_MARGIN)
    if box is None or all(sl.stop - sl.start == n for sl, n in zip(box, semantic.shape)):
        return semantic, vertebrae, None
    sem_c, crop = crop_to_bbox(semantic, box)
    vert_c, _ = crop_to_bbox(vertebrae, box)
    log.debug("post-processing on the spine's box %s of %s", sem_c.shape, semantic.shape)
    return sem_c, vert_c, crop


def _consistent(semantic: Volume, vertebrae: Volume) -> tuple[Volume, Volume, list[str]]:
    from spineps.postprocess.consistency import ConsistencyStats, make_consistent

    stats = ConsistencyStats()
    sem, vert = make_consistent(semantic, vertebrae, stats=stats)
    warnings = [] if not stats.surplus_to_sacrum else [
        f"{stats.surplus_to_sacrum} vertebra-like instance(s) below the 25th from the top were taken as sacral "
        "segments; check the level names of the lower spine"]
    return sem, vert, warnings


def _sacrum_centroid(semantic: Volume, instance: Volume) -> Optional[np.ndarray]:
    """Centre of the sacrum's body voxels (of all its voxels where it has none), or None."""
    from spineps.postprocess.vertebrae import label_centroids

    inst = np.asarray(instance.data)
    if not (inst == SACRUM).any():
        return None
    whole, _ = label_centroids(inst, [SACRUM])
    body, n_body = label_centroids(np.where(np.asarray(semantic.data) == BODY, inst, 0), [SACRUM])
    return np.asarray(body[0] if n_body[0] > 0 else whole[0])


@dataclass
class Anonymous:
    """The masks after post-processing, before the level naming: on the spine's box (``crop``
    puts them back onto the grid they came on; None: they are on it)."""

    semantic: Volume  # endplates split 52/53
    instance: Volume  # anonymous vertebrae 1..N top to bottom, discs 100+k, endplates 200+k, sacrum 26
    centroids: "VertebraCentroids"  # of the anonymous vertebrae, on the box
    crop: Optional["Crop"]
    s_range: tuple[float, float]  # world S-I range (RAS z, mm) of the original grid's field of view
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def postprocess_anonymous(semantic: Volume, vertebrae: Volume) -> Anonymous:
    """Consistency, centroids, discs and endplates on the spine's box: everything of
    :func:`postprocess` before the names."""
    from spineps.labeling.stations import station_s_range
    from spineps.postprocess.discs import assign_discs_and_endplates
    from spineps.postprocess.vertebrae import check_same_grid, vertebra_centroids

    check_same_grid(semantic, vertebrae)
    sem, vert, crop = crop_to_spine(semantic, vertebrae)
    t0 = time.perf_counter()
    sem, vert, warnings = _consistent(sem, vert)
    centroids = vertebra_centroids(sem, vert)  # once per scan: discs, naming and measurements use them
    sem, inst = assign_discs_and_endplates(sem, vert, centroids=centroids)
    return Anonymous(sem, inst, centroids, crop, station_s_range(semantic), warnings,
                     {"instance_postprocess": time.perf_counter() - t0})


def finish_naming(anon: Anonymous, levels: Any, naming_seconds: float = 0.0) -> Postprocessed:
    """The names of ``levels`` (a ``LevelNaming``) applied to the anonymous masks, the
    centroids renamed, and everything put back onto the full grid."""
    from spineps.geometry.cropping import uncrop
    from spineps.labeling.levels import apply_naming

    t0 = time.perf_counter()
    named = apply_naming(anon.instance, levels)
    named_centroids = anon.centroids.renamed(levels.mapping)
    sacrum = _sacrum_centroid(anon.semantic, named)
    sem = anon.semantic
    if anon.crop is not None:
        sem, named = uncrop(sem, anon.crop), uncrop(named, anon.crop)
        named_centroids = named_centroids.shifted(anon.crop.offset)
        sacrum = None if sacrum is None else sacrum + np.asarray(anon.crop.offset, dtype=float)
    timings = {**anon.timings, "instance_naming": naming_seconds + time.perf_counter() - t0}
    return Postprocessed(sem, named, named_centroids, sacrum, levels.as_dict(),
                         anon.warnings + list(levels.warnings), timings)


def postprocess(semantic: Volume, vertebrae: Volume, naming: NamingOptions = NamingOptions()) -> Postprocessed:
    """Consistency, centroids, discs and endplates, level names: the stages after the instance
    phase, on the spine's box, with the result put back onto the full grid."""
    from spineps.labeling.levels import name_levels

    anon = postprocess_anonymous(semantic, vertebrae)
    t0 = time.perf_counter()
    levels = name_levels(anon.semantic, anon.instance, rule=naming.rule, anchor=naming.top_vertebra,
                         centroids=anon.centroids)
    return finish_naming(anon, levels, time.perf_counter() - t0)


def centroids_json(post: Postprocessed) -> dict[int, dict[str, list[float]]]:
    """Vertebra value -> body centre in voxel indices and RAS world millimetres (rounded)."""
    affine = post.instance.affine
    rows = list(zip(post.centroids.ids, post.centroids.body))
    if post.sacrum_centroid is not None:
        rows.append((SACRUM, post.sacrum_centroid))
    out: dict[int, dict[str, list[float]]] = {}
    for v, vox in sorted(rows, key=lambda r: r[0]):
        world = affine[:3, :3] @ vox + affine[:3, 3]
        out[int(v)] = {"voxel": [round(float(x), 3) for x in vox], "world": [round(float(x), 3) for x in world]}
    return out


def _measure(result: ScanResult, centroids: Optional["VertebraCentroids"]) -> None:
    """Measurements and QC into ``result``. They are derived from the masks: a failure is
    recorded in ``measure_error`` (and logged by the caller), the masks stand."""
    from spineps.measure.scan import measure_scan

    t0 = time.perf_counter()
    try:
        result.measurements = measure_scan(result.semantic, result.instance, result.naming, centroids=centroids)
    except Exception as exc:  # derived outputs never fail a scan
        result.measure_error = f"{type(exc).__name__}: {one_line(str(exc))}"
        log.debug("measurement traceback", exc_info=True)
    result.timings["measure"] = time.perf_counter() - t0


def _instances(semantic: Volume, instance_model: InstanceSegmenter, naming: NamingOptions) -> tuple[ScanResult,
                                                                                                      Postprocessed]:
    t0 = time.perf_counter()
    pred = instance_model.segment(semantic)
    post = postprocess(semantic, pred.vertebrae, naming)
    timings = {"instance_total": time.perf_counter() - t0, **pred.timings, **post.timings}
    result = ScanResult(semantic=post.semantic, instance=post.instance, centroids=centroids_json(post),
                        naming=post.naming, timings=timings, warnings=list(pred.warnings) + post.warnings,
                        provenance={"instance_model": instance_model.provenance()})
    return result, post


def segment_from_semantic(semantic: Volume, instance_model: InstanceSegmenter,
                          naming: NamingOptions = NamingOptions(), *, measure: bool = True) -> ScanResult:
    """Instance phase, post-processing, level naming and (``measure``) measurements on an
    existing semantic mask."""
    result, post = _instances(semantic, instance_model, naming)
    if measure:
        _measure(result, post.centroids)
    return result


def segment_scan(image: Volume, semantic_model: SemanticSegmenter, instance_model: Optional[InstanceSegmenter],
                 naming: NamingOptions = NamingOptions(), *, measure: bool = True) -> ScanResult:
    """Semantic phase, then (when an instance model is given) the stages of
    :func:`segment_from_semantic`; measurements of what there is (``measure``)."""
    t0 = time.perf_counter()
    log.info("semantic phase (%s) on %s", semantic_model.name, image)
    semantic = semantic_model.segment(image)
    if not semantic.same_grid(image):
        raise RuntimeError(f"semantic model {semantic_model.name} returned a mask off the input grid")
    t_sem = time.perf_counter() - t0
    prov = {"semantic_model": semantic_model.provenance()}
    post: Optional[Postprocessed] = None
    if instance_model is None:
        result = ScanResult(semantic, None, {}, {}, {"semantic_total": t_sem}, [], prov)
    else:
        log.info("instance phase (%s)", instance_model.name)
        result, post = _instances(semantic, instance_model, naming)
        result.timings = {"semantic_total": t_sem, **result.timings}
        result.provenance = {**prov, **result.provenance}
    if measure:
        _measure(result, None if post is None else post.centroids)
    return result


# ------------------------------------------------------------------------------ stations
@dataclass
class StationPrediction:
    """One station of a session after the instance phase and the anonymous post-processing."""

    name: str
    anon: Anonymous
    warnings: list[str]
    timings: dict[str, float]
    provenance: dict[str, Any]


def predict_station(name: str, semantic: Volume, instance_model: InstanceSegmenter, *,
                    timings: Optional[dict[str, float]] = None,
                    provenance: Optional[dict[str, Any]] = None) -> StationPrediction:
    """The instance phase and :func:`postprocess_anonymous` on one station's semantic mask
    (``timings`` / ``provenance`` of the stages before, kept)."""
    t0 = time.perf_counter()
    pred = instance_model.segment(semantic)
    anon = postprocess_anonymous(semantic, pred.vertebrae)
    times = {**(timings or {}), "instance_total": time.perf_counter() - t0, **pred.timings, **anon.timings}
    prov = {**(provenance or {}), "instance_model": instance_model.provenance()}
    return StationPrediction(name, anon, list(pred.warnings), times, prov)


def name_stations(preds: list[StationPrediction], naming: NamingOptions = NamingOptions(), *,
                  measure: bool = True) -> tuple[dict[str, ScanResult], Any]:
    """The stations of one session named as one spine (``labeling.stations.name_session``),
    each finished like a scan (names applied, measured), and the session's alignment measures
    on every station of a joined chain: ``(results by station name, SessionNaming)``."""
    from spineps.labeling.stations import Station, name_session

    t0 = time.perf_counter()
    session = name_session([Station(p.name, p.anon.semantic, p.anon.instance, p.anon.s_range) for p in preds],
                           rule=naming.rule, anchor=naming.top_vertebra)
    seconds = (time.perf_counter() - t0) / max(len(preds), 1)
    results: dict[str, ScanResult] = {}
    for p in preds:
        post = finish_naming(p.anon, session.namings[p.name], seconds)
        warnings = [w for w in session.warnings if w not in post.warnings]
        res = ScanResult(semantic=post.semantic, instance=post.instance, centroids=centroids_json(post),
                         naming=post.naming, timings={**p.timings, **post.timings},
                         warnings=p.warnings + post.warnings + warnings, provenance=p.provenance,
                         stations=session.as_dict(p.name))
        if measure:
            _measure(res, post.centroids)
        results[p.name] = res
    if measure:
        _session_alignment(results, session, {p.name: p.anon.s_range for p in preds})
    return results, session


def _session_alignment(results: dict[str, ScanResult], session: Any, s_ranges: dict[str, tuple[float, float]]
                       ) -> None:
    """The alignment of every joined chain of stations, into each of its stations' measurements."""
    from spineps.measure.alignment import session_alignment

    for chain in session.chains:
        measured = [s for s in chain if (m := results[s].measurements) is not None and m.alignment is not None]
        if len(chain) < 2 or not measured:
            continue
        parts = []
        for s in measured:
            m = results[s].measurements
            assert m is not None
            heights = {(v.level, v.structure, v.measure): v.value for v in m.values}
            parts.append((m.alignment, session.offsets[s], s_ranges[s], heights))
        try:
            al = session_alignment(parts)
        except Exception as exc:  # derived measures never fail the stations
            log.warning("session alignment not measured: %s: %s", type(exc).__name__, one_line(str(exc)))
            continue
        for s in measured:
            m = results[s].measurements
            assert m is not None
            m.use_session_alignment(al, chain, {c: session.offsets[c] for c in chain})
