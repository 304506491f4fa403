"""Evaluate predicted masks against reference masks: pair the files, compute every metric per
scan and structure, summarise, compare two methods, write the tables (atomically).

Structures (semantic ``desc-spine`` masks; see ``docs/evaluation.md``):

- ``vertebra``: all vertebra substructures 41..49 plus the endplates 52, 53, 62 (when the
  reference annotates them). The sacrum (26) is *not* part of it: it is reported on its own
  (``sacrum``), as many references do not label it and the instance mask treats it as S1.
- one structure per semantic class of the label registry (``vertebral_body``,
  ``intervertebral_disc``, ``spinal_canal`` (61 only, the CSF space), ``spinal_cord`` ...).

Instance structures (``desc-vertebrae`` masks): ``vertebra_instances`` (values 1..28) and
``disc_instances`` (100 + vertebra), each matched on its own.

Partial references: a semantic class is *annotated* when listed in ``--annotated-classes``,
or, with ``auto`` (the default), when it occurs in at least one reference mask of the
evaluated set (a dataset-level rule: a class that is absent from one scan but present in
others is truly absent there, so false positives of it count). ``all`` treats every class as
annotated. Classes that are not annotated are left out on both sides: no metric for them,
their voxels ignored inside groups, and instance voxels whose semantic class is not
annotated are dropped from both instance masks before matching (when the semantic masks are
there). ``vertebra`` is evaluated only when all of 41..49 are annotated; instance groups
only when annotated (auto: occurring in some reference instance mask).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from spineps.errors import InputError, NoInputError, NoMatchError, UsageError
from spineps.geometry.volume import Volume
from spineps.evaluate.matching import (Overlap, level_naming, match_instances, overlap_table, panoptic_scores,
                                      select_values)
from spineps.evaluate.metrics import BOTH_EMPTY, PRED_EMPTY, REF_EMPTY, Score, dice, joint_bbox, surface_distances
from spineps.evaluate.stats import ComparisonRow, MetricRow, SummaryRow, compare_methods, summarize
from spineps.fsutil import write_json_atomic, write_text_atomic
from spineps.labels import (BODY, DISC, ENDPLATE, ENDPLATE_INF, ENDPLATE_SUP, INSTANCE_PARTS, SEMANTIC,
                            SEMANTIC_BY_VALUE, VERTEBRA_PARTS, VERTEBRA_VALUES)

__all__ = [
    "SPINE",
    "VERTEBRAE",
    "MASK_KINDS",
    "Structure",
    "SEMANTIC_STRUCTURES",
    "VERTEBRA_GROUP_REQUIRED",
    "INSTANCE_GROUPS",
    "Case",
    "Annotation",
    "EvalOptions",
    "EvaluationResult",
    "parse_mask_name",
    "find_masks",
    "pair_folders",
    "pair_files",
    "detect_annotation",
    "evaluate_case",
    "evaluate",
    "write_outputs",
    "OUTPUT_FILES",
]

log = logging.getLogger(__name__)

SPINE = "spine"
VERTEBRAE = "vertebrae"
MASK_KINDS = (SPINE, VERTEBRAE)

_MASK_RE = re.compile(
    r"^(?P<stem>.+?)(?:_mod-[A-Za-z0-9]+)?_(?:desc|seg)-(?P<desc>spine|vert|vertebrae)_(?:dseg|msk)\.nii(?:\.gz)?$")

#: the vertebra classes that must all be annotated for the grouped ``vertebra`` structure
VERTEBRA_GROUP_REQUIRED: frozenset[int] = frozenset(INSTANCE_PARTS)
_ENDPLATES = (ENDPLATE_SUP, ENDPLATE_INF, ENDPLATE)
_ALL_SEMANTIC: frozenset[int] = frozenset(SEMANTIC_BY_VALUE)
_VERTEBRA_IDS = tuple(sorted(VERTEBRA_VALUES))
_DISC_IDS = tuple(100 + v for v in _VERTEBRA_IDS if v != 26)
#: instance group name -> its label values
INSTANCE_GROUPS: dict[str, tuple[int, ...]] = {"vertebra_instances": _VERTEBRA_IDS, "disc_instances": _DISC_IDS}

OUTPUT_FILES = {
    "per_scan": "evaluation_per_scan.tsv",
    "summary": "evaluation_summary.tsv",
    "comparison": "evaluation_comparison.tsv",
    "instances": "evaluation_instances.tsv",
    "unmatched": "evaluation_unmatched.tsv",
    "settings": "evaluation.json",
}


@dataclass(frozen=True)
class Structure:
    """A semantic structure: the union of ``members``; ``optional`` members join it only
    when annotated, ``required`` ones must all be annotated for it to be evaluated."""

    name: str
    required: frozenset[int]
    optional: frozenset[int] = frozenset()

    def members(self, annotated: frozenset[int]) -> Optional[frozenset[int]]:
        if not self.required <= annotated:
            return None
        return self.required | (self.optional & annotated)


def _structure_name(value: int) -> str:
    return SEMANTIC_BY_VALUE[value].name.replace(" ", "_")


SEMANTIC_STRUCTURES: tuple[Structure, ...] = (
    Structure("vertebra", VERTEBRA_GROUP_REQUIRED, frozenset(_ENDPLATES)),
    *(Structure(_structure_name(lab.value), frozenset({lab.value})) for lab in SEMANTIC),
)


@dataclass
class Case:
    """One scan: its reference and predicted masks by kind (``spine`` / ``vertebrae``)."""

    scan: str
    ref: dict[str, Path] = field(default_factory=dict)
    pred: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Annotation:
    """Which semantic classes and instance groups the references annotate, and why."""

    classes: frozenset[int]
    instance_groups: frozenset[str]
    rule: str

    @property
    def partial(self) -> bool:
        return not _ALL_SEMANTIC <= self.classes


@dataclass(frozen=True)
class EvalOptions:
    masks: tuple[str, ...] = MASK_KINDS
    annotation: Annotation = Annotation(_ALL_SEMANTIC, frozenset(INSTANCE_GROUPS), "all")
    endplates_as_body: bool = False
    threshold: float = 0.5
    surface_metrics: bool = True


@dataclass
class EvaluationResult:
    rows: list[MetricRow]
    instances: list[dict]
    summary: list[SummaryRow]
    comparison: list[ComparisonRow]
    unmatched: list[tuple[str, str, Path]]  # (method, reason, path)
    methods: tuple[str, ...]
    annotation: Annotation
    seconds: float


# --------------------------------------------------------------------------- files
def parse_mask_name(name: str) -> Optional[tuple[str, str]]:
    """``sub-01_acq-sag_desc-spine_dseg.nii.gz`` -> (``sub-01_acq-sag``, ``spine``);
    ``desc-vert``/``desc-vertebrae`` and the reference tool's ``_mod-T2w_seg-spine_msk`` /
    ``_seg-vert_msk`` names are understood too. ``None`` for anything else."""
    m = _MASK_RE.match(name)
    if not m:
        return None
    return m.group("stem"), (SPINE if m.group("desc") == "spine" else VERTEBRAE)


def find_masks(folder: Union[str, Path], masks: Sequence[str] = MASK_KINDS) -> dict[str, dict[str, Path]]:
    """Every mask file below ``folder``: entity stem -> {kind: path}. Hidden (temporary)
    files are skipped; two files for one stem and kind raise :class:`InputError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NoInputError("folder does not exist", folder)
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.rglob("*.nii*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        parsed = parse_mask_name(path.name)
        if parsed is None:
            continue
        stem, kind = parsed
        if kind not in masks:
            continue
        slot = found.setdefault(stem, {})
        if kind in slot:
            raise InputError(f"two {kind} masks for scan {stem}: {slot[kind]} and {path.name}", path)
        slot[kind] = path
    return found


def pair_folders(ref_dir: Union[str, Path], pred_dir: Union[str, Path], masks: Sequence[str] = MASK_KINDS,
                 method: str = "prediction") -> tuple[list[Case], list[tuple[str, str, Path]]]:
    """Cases with at least one (reference, prediction) pair of a kind, and the files that
    have no partner: (method, reason, path)."""
    ref = find_masks(ref_dir, masks)
    pred = find_masks(pred_dir, masks)
    cases: list[Case] = []
    unmatched: list[tuple[str, str, Path]] = []
    for stem in sorted(set(ref) | set(pred)):
        r, p = ref.get(stem, {}), pred.get(stem, {})
        case = Case(stem)
        for kind in masks:
            if kind in r and kind in p:
                case.ref[kind] = r[kind]
                case.pred[kind] = p[kind]
            elif kind in r:
                unmatched.append((method, f"reference {kind} mask without a prediction", r[kind]))
            elif kind in p:
                unmatched.append((method, f"predicted {kind} mask without a reference", p[kind]))
        if case.ref:
            cases.append(case)
    return cases, unmatched


def _pair_kind(ref: Path, pred: Path) -> tuple[str, str]:
    parsed = parse_mask_name(ref.name) or parse_mask_name(pred.name)
    if parsed is not None:
        return parsed
    name = ref.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    kind = VERTEBRAE if re.search(r"vert", ref.name + pred.name, re.IGNORECASE) else SPINE
    return name, kind


def pair_files(pairs: Sequence[Sequence[Union[str, Path]]], masks: Sequence[str] = MASK_KINDS
               ) -> tuple[list[Case], list[Case]]:
    """Cases from explicit ``(REF, PRED[, PRED2])`` file pairs (the kind from the names: a
    name with ``vert`` in it is an instance mask); pairs of one scan stem are merged.
    Returns (cases for PRED, cases for PRED2 — empty when no pair has a third file)."""
    first: dict[str, Case] = {}
    second: dict[str, Case] = {}
    for entry in pairs:
        files = [Path(f) for f in entry]
        if len(files) not in (2, 3):
            raise UsageError(f"--pair takes REF PRED [PRED2], got {len(files)} file(s)")
        for f in files:
            if not f.is_file():
                raise NoInputError("file does not exist", f)
        stem, kind = _pair_kind(files[0], files[1])
        if kind not in masks:
            log.info("skipping %s pair %s (not among --masks)", kind, files[0])
            continue
        for target, pred in ((first, files[1]), (second, files[2] if len(files) == 3 else None)):
            if pred is None:
                continue
            case = target.setdefault(stem, Case(stem))
            if kind in case.ref:
                raise UsageError(f"two {kind} pairs for scan {stem}")
            case.ref[kind] = files[0]
            case.pred[kind] = pred
    if second and set(second) != set(first):
        raise UsageError("either every --pair or none has a third file (PRED2)")
    return list(first.values()), list(second.values())


# --------------------------------------------------------------------------- annotation
def _present_values(path: Path) -> set[int]:
    from spineps.geometry.io import load_volume

    vol = load_volume(path, kind="label")
    return {int(v) for v in np.unique(vol.data) if v != 0}


def detect_annotation(cases: Iterable[Case], spec: str = "auto", *, endplates_as_body: bool = False) -> Annotation:
    """The annotated classes from ``spec``: ``auto`` (classes present in any reference),
    ``all``, or a comma list of values / names (``49,100`` or ``vertebral_body``)."""
    from spineps.labels import resolve_label

    spec = (spec or "auto").strip()
    if spec.lower() == "all":
        return Annotation(_ALL_SEMANTIC, frozenset(INSTANCE_GROUPS), "all classes annotated (--annotated-classes all)")
    if spec.lower() != "auto":
        classes: set[int] = set()
        for token in (t for t in spec.split(",") if t.strip()):
            try:
                value = resolve_label(token)
            except KeyError:
                raise UsageError(f"--annotated-classes: unknown class {token.strip()!r}") from None
            if value not in _ALL_SEMANTIC:
                raise UsageError(f"--annotated-classes: {token.strip()!r} ({value}) is no semantic class")
            classes.add(value)
        if not classes:
            raise UsageError("--annotated-classes: empty list")
        groups = set()
        if classes & (VERTEBRA_PARTS | {26}):
            groups.add("vertebra_instances")
        if DISC in classes:
            groups.add("disc_instances")
        return Annotation(frozenset(classes), frozenset(groups), f"given: {sorted(classes)}")
    sem: set[int] = set()
    inst: set[int] = set()
    n_sem = n_inst = 0
    for case in cases:
        if SPINE in case.ref:
            sem |= _present_values(case.ref[SPINE])
            n_sem += 1
        if VERTEBRAE in case.ref:
            inst |= _present_values(case.ref[VERTEBRAE])
            n_inst += 1
    unknown = sem - _ALL_SEMANTIC
    if unknown:
        log.warning("reference semantic masks hold values that are no known class: %s (ignored)", sorted(unknown))
    classes = (sem & _ALL_SEMANTIC) if n_sem else set(_ALL_SEMANTIC)
    if endplates_as_body:  # endplates are body voxels on both sides: never a class of their own
        classes -= set(_ENDPLATES)
    groups = set()
    if n_inst:
        if inst & set(_VERTEBRA_IDS) or (endplates_as_body and any(200 < v < 300 for v in inst)):
            groups.add("vertebra_instances")
        if inst & set(_DISC_IDS):
            groups.add("disc_instances")
    missing = sorted(_ALL_SEMANTIC - classes)
    rule = (f"auto: classes present in at least one of {n_sem} reference semantic mask(s)"
            + (f"; not annotated anywhere, so ignored: {missing}" if n_sem and missing else ""))
    if n_sem and missing:
        log.warning("partial references: classes %s occur in no reference mask and are treated as not annotated "
                    "(pass --annotated-classes all to count them as absent)", missing)
    return Annotation(frozenset(classes), frozenset(groups), rule)


# --------------------------------------------------------------------------- one case
def _load_pair(ref_path: Path, pred_path: Path) -> tuple[Volume, Volume]:
    from spineps.geometry.io import load_volume

    ref = load_volume(ref_path, kind="label")
    pred = load_volume(pred_path, kind="label")
    if ref.shape != pred.shape:
        raise InputError(f"prediction shape {pred.shape} differs from the reference {ref.shape} ({ref_path.name})",
                         pred_path)
    if not ref.same_grid(pred, atol=1e-3):
        raise InputError(f"prediction affine differs from the reference ({ref_path.name}); evaluate on one grid",
                         pred_path)
    if int(ref.data.min(initial=0)) < 0 or int(pred.data.min(initial=0)) < 0:
        raise InputError("label masks must not hold negative values", pred_path if pred.data.min() < 0 else ref_path)
    return ref, pred


def _semantic_remap(data: np.ndarray, endplates_as_body: bool) -> np.ndarray:
    if not endplates_as_body:
        return data
    return np.where(np.isin(data, _ENDPLATES), BODY, data).astype(data.dtype, copy=False)


def _instance_remap(data: np.ndarray, endplates_as_body: bool) -> np.ndarray:
    if not endplates_as_body:
        return data
    ep = (data > 200) & (data < 300)
    if not ep.any():
        return data
    out = data.copy()
    out[ep] = out[ep] - 200
    return out


def _distance_scores(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> dict[str, Score]:
    has_r, has_p = bool(ref.any()), bool(pred.any())
    if not has_r and not has_p:
        return {"assd": Score(0.0, BOTH_EMPTY), "hd95": Score(0.0, BOTH_EMPTY)}
    if not has_r or not has_p:
        note = REF_EMPTY if not has_r else PRED_EMPTY
        return {"assd": Score(math.nan, note), "hd95": Score(math.nan, note)}
    dists = surface_distances(ref, pred, spacing)
    assert dists is not None
    a, b = dists
    pooled = np.concatenate([a, b])
    return {"assd": Score(float((a.mean() + b.mean()) / 2.0)), "hd95": Score(float(np.percentile(pooled, 95)))}


def _semantic_rows(method: str, scan: str, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                   options: EvalOptions) -> list[MetricRow]:
    annotated = options.annotation.classes
    box = joint_bbox(ref, pred)
    r = ref[box] if box is not None else ref[:0, :0, :0]
    p = pred[box] if box is not None else pred[:0, :0, :0]
    rows: list[MetricRow] = []
    for st in SEMANTIC_STRUCTURES:
        members = st.members(annotated)
        if members is None or (options.endplates_as_body and members <= set(_ENDPLATES)):
            continue
        vals = np.fromiter(sorted(members), dtype=np.int64)
        rm = np.isin(r, vals)
        pm = np.isin(p, vals)
        scores = {"dice": dice(rm, pm)}
        if options.surface_metrics:
            scores.update(_distance_scores(rm, pm, spacing))
        for metric, sc in scores.items():
            rows.append(MetricRow(method, scan, st.name, metric, sc.value, sc.note))
    return rows


def _restrict_instances(inst: np.ndarray, sem: Optional[np.ndarray], annotated: frozenset[int]) -> np.ndarray:
    """Drop instance voxels whose semantic class is known but not annotated."""
    if sem is None:
        return inst
    drop = np.fromiter(sorted(_ALL_SEMANTIC - annotated), dtype=np.int64)
    if drop.size == 0:
        return inst
    mask = np.isin(sem, drop)
    if not mask.any():
        return inst
    out = inst.copy()
    out[mask] = 0
    return out


def _instance_rows(method: str, scan: str, ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float],
                   options: EvalOptions) -> tuple[list[MetricRow], list[dict]]:
    rows: list[MetricRow] = []
    details: list[dict] = []
    box = joint_bbox(ref, pred)
    r_all = ref[box] if box is not None else ref[:0, :0, :0]
    p_all = pred[box] if box is not None else pred[:0, :0, :0]
    for group, values in INSTANCE_GROUPS.items():
        if group not in options.annotation.instance_groups:
            continue
        r = select_values(r_all, values)
        p = select_values(p_all, values)
        ov = overlap_table(r, p)
        m = match_instances(r, p, threshold=options.threshold, overlap=ov)
        scores = panoptic_scores(m)
        for metric, sc in scores.items():
            rows.append(MetricRow(method, scan, group, metric, sc.value, sc.note))
        naming = level_naming(m)
        if m.tp == 0 and m.fp + m.fn == 0:
            rows.append(MetricRow(method, scan, group, "level_accuracy", 1.0, BOTH_EMPTY))
        else:
            acc = naming.accuracy
            rows.append(MetricRow(method, scan, group, "level_accuracy", acc.value, acc.note or naming.diagnosis))
            if naming.offsets:
                rows.append(MetricRow(method, scan, group, "level_offset_median",
                                      float(np.median(naming.offsets)), naming.diagnosis))
        if options.surface_metrics and m.pairs:
            vals = []
            for pair in m.pairs:
                rm = r == pair.ref
                pm = p == pair.pred
                sub = joint_bbox(rm, pm, pad=1)
                assert sub is not None
                d = _distance_scores(rm[sub], pm[sub], spacing)["assd"]
                vals.append(d.value)
            rows.append(MetricRow(method, scan, group, "instance_assd", float(np.mean(vals))))
        for pair in m.pairs:
            details.append({"method": method, "scan": scan, "group": group, "ref": pair.ref, "pred": pair.pred,
                            "iou": pair.iou, "dice": pair.dice, "status": "TP"})
        for v in m.unmatched_ref:
            details.append({"method": method, "scan": scan, "group": group, "ref": v, "pred": None,
                            "iou": _best(ov, v, True), "dice": None, "status": "FN"})
        for v in m.unmatched_pred:
            details.append({"method": method, "scan": scan, "group": group, "ref": None, "pred": v,
                            "iou": _best(ov, v, False), "dice": None, "status": "FP"})
    return rows, details


def _best(ov: Overlap, value: int, is_ref: bool) -> float:
    """Best IoU an unmatched instance reached with any instance of the other side."""
    iou = ov.iou()
    if is_ref:
        i = int(np.searchsorted(ov.ref_ids, value))
        return float(iou[i].max()) if iou.shape[1] else 0.0
    j = int(np.searchsorted(ov.pred_ids, value))
    return float(iou[:, j].max()) if iou.shape[0] else 0.0


def evaluate_case(case: Case, options: EvalOptions, method: str = "prediction") -> tuple[list[MetricRow], list[dict]]:
    """All metric rows (and per-instance match details) of one scan."""
    rows: list[MetricRow] = []
    details: list[dict] = []
    sem_ref = sem_pred = None
    if SPINE in case.ref and SPINE in case.pred and SPINE in options.masks:
        ref, pred = _load_pair(case.ref[SPINE], case.pred[SPINE])
        sem_ref = _semantic_remap(ref.data, options.endplates_as_body)
        sem_pred = _semantic_remap(pred.data, options.endplates_as_body)
        rows += _semantic_rows(method, case.scan, sem_ref, sem_pred, ref.spacing, options)
    if VERTEBRAE in case.ref and VERTEBRAE in case.pred and VERTEBRAE in options.masks:
        ref, pred = _load_pair(case.ref[VERTEBRAE], case.pred[VERTEBRAE])
        ri = _instance_remap(ref.data, options.endplates_as_body)
        pi = _instance_remap(pred.data, options.endplates_as_body)
        if sem_ref is not None and sem_ref.shape == ri.shape and sem_pred is not None:
            ri = _restrict_instances(ri, sem_ref, options.annotation.classes)
            pi = _restrict_instances(pi, sem_pred, options.annotation.classes)
        elif options.annotation.partial:
            log.info("%s: no semantic masks beside the instance masks; instances are not restricted to the "
                     "annotated classes", case.scan)
        r_rows, d = _instance_rows(method, case.scan, ri, pi, ref.spacing, options)
        rows += r_rows
        details += d
    return rows, details


# --------------------------------------------------------------------------- the set
def evaluate(cases_by_method: dict[str, list[Case]], options: EvalOptions, *,
             unmatched: Sequence[tuple[str, str, Path]] = (), alpha: float = 0.05) -> EvaluationResult:
    """Evaluate each method's cases; summarise; compare the first two methods when given."""
    t0 = time.perf_counter()
    methods = tuple(cases_by_method)
    if not methods or not any(cases_by_method.values()):
        raise NoMatchError("no (reference, prediction) mask pairs to evaluate")
    if len(methods) > 2:
        raise UsageError("at most two methods can be compared")
    rows: list[MetricRow] = []
    details: list[dict] = []
    for method, cases in cases_by_method.items():
        for case in cases:
            r, d = evaluate_case(case, options, method)
            rows += r
            details += d
            log.info("%s / %s: %d metric values", method, case.scan, len(r))
    summary = summarize(rows)
    comparison = compare_methods(rows, methods[0], methods[1], alpha=alpha) if len(methods) == 2 else []
    return EvaluationResult(rows, details, summary, comparison, list(unmatched), methods, options.annotation,
                            time.perf_counter() - t0)


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "n/a"
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return format(v, ".10g")
    text = str(value)
    return text.replace("\t", " ").replace("\n", " ")


def _tsv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["\t".join(header)]
    lines += ["\t".join(_fmt(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(result: EvaluationResult, out_dir: Union[str, Path], *,
                  settings: Optional[dict] = None) -> dict[str, Path]:
    """Write the tables and ``evaluation.json`` into ``out_dir`` (each atomically)."""
    from spineps.errors import OutputError

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror or exc})", out) from exc
    written: dict[str, Path] = {}

    def put(key: str, text: str) -> None:
        path = out / OUTPUT_FILES[key]
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise OutputError(f"cannot write ({exc.strerror or exc})", path) from exc
        written[key] = path

    put("per_scan", _tsv(("method", "scan", "structure", "metric", "value", "note"),
                         ((r.method, r.scan, r.structure, r.metric, r.value, r.note) for r in result.rows)))
    put("summary", _tsv(("method", "structure", "metric", "n", "mean", "sd", "median", "min", "max",
                         "n_undefined", "n_both_empty"),
                        ((s.method, s.structure, s.metric, s.n, s.mean, s.sd, s.median, s.min, s.max,
                          s.n_undefined, s.n_both_empty) for s in result.summary)))
    put("instances", _tsv(("method", "scan", "group", "status", "ref", "pred", "iou", "dice"),
                          ((d["method"], d["scan"], d["group"], d["status"], d["ref"], d["pred"], d["iou"],
                            d["dice"]) for d in result.instances)))
    put("unmatched", _tsv(("method", "reason", "path"), ((m, why, str(p)) for m, why, p in result.unmatched)))
    if len(result.methods) == 2:
        put("comparison", _tsv(("structure", "metric", "method_a", "method_b", "n_pairs", "median_a", "median_b",
                                "median_diff_b_minus_a", "mean_diff_b_minus_a", "better", "wilcoxon_statistic",
                                "p_value", "significant", "note"),
                               ((c.structure, c.metric, c.method_a, c.method_b, c.n_pairs, c.median_a, c.median_b,
                                 c.median_diff, c.mean_diff, c.better, c.statistic, c.p_value, c.significant,
                                 c.note) for c in result.comparison)))
    from spineps import __version__

    meta = {
        "software": {"name": "spineps", "version": __version__},
        "methods": list(result.methods),
        "annotated_classes": sorted(result.annotation.classes),
        "annotated_instance_groups": sorted(result.annotation.instance_groups),
        "annotation_rule": result.annotation.rule,
        "n_scans": {m: len({r.scan for r in result.rows if r.method == m}) for m in result.methods},
        "n_unmatched_files": len(result.unmatched),
        "seconds": round(result.seconds, 3),
        "outputs": {k: v.name for k, v in written.items()},
        **(settings or {}),
    }
    path = out / OUTPUT_FILES["settings"]
    try:
        write_json_atomic(path, meta)
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror or exc})", path) from exc
    written["settings"] = path
    return written
