"""Instance matching and panoptic scores (RQ, SQ, PQ), instance-wise Dice and level naming.

Matching: every reference instance is paired with at most one predicted instance and vice
versa, by an optimal one-to-one assignment that maximises the summed IoU
(``scipy.optimize.linear_sum_assignment``); a pair is a true positive (TP) when its IoU is
>= the threshold (0.5, SPINEPS paper section 2.6). With a threshold above 0.5 the matching
is unique anyway; the assignment only matters for ties at exactly 0.5. Unmatched reference
instances are false negatives (FN), unmatched predicted instances false positives (FP).

- RQ = TP / (TP + FP/2 + FN/2)
- SQ = mean IoU of the TP pairs
- PQ = RQ x SQ
- instance Dice = mean Dice of the TP pairs (panoptica's ``sq_dsc``, what the paper reports)
- instance Dice (per reference) = mean over reference instances, 0 for each FN
- level accuracy = fraction of TP pairs whose predicted label value equals the reference
  value (the level name is right), vertebrae and discs separately.

Empty cases: no instance on either side -> RQ = SQ = PQ = instance Dice = 1, note
``both_empty`` (left out of summaries); instances on one side only, or no TP -> RQ = PQ = 0,
SQ and instance Dice undefined (NaN, note ``no_match``), level accuracy undefined.

The overlap table comes from one ``np.unique`` over the encoded (reference, prediction)
label pairs of the foreground voxels of the joint bounding box: no per-label full-volume
copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from spineps.evaluate.metrics import BOTH_EMPTY, NO_MATCH, Score, joint_bbox
from spineps.labels import instance_name, vertebra_name

__all__ = [
    "Overlap",
    "Pair",
    "Matching",
    "overlap_table",
    "match_instances",
    "panoptic_scores",
    "LevelNaming",
    "level_naming",
    "level_position",
    "select_values",
]


@dataclass(frozen=True)
class Overlap:
    """Sizes and pairwise intersections (voxel counts) of the instances of two label maps."""

    ref_ids: np.ndarray  # (R,) label values
    pred_ids: np.ndarray  # (P,)
    ref_sizes: np.ndarray  # (R,)
    pred_sizes: np.ndarray  # (P,)
    intersection: np.ndarray  # (R, P)

    def iou(self) -> np.ndarray:
        union = self.ref_sizes[:, None] + self.pred_sizes[None, :] - self.intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, self.intersection / np.maximum(union, 1), 0.0)

    def dice(self) -> np.ndarray:
        total = self.ref_sizes[:, None] + self.pred_sizes[None, :]
        return np.where(total > 0, 2.0 * self.intersection / np.maximum(total, 1), 0.0)


def overlap_table(ref: np.ndarray, pred: np.ndarray) -> Overlap:
    """Overlap of the non-zero labels of two integer label maps of one shape."""
    ref = np.asarray(ref)
    pred = np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"label maps have different shapes: {ref.shape} vs {pred.shape}")
    if (ref.size and int(ref.min()) < 0) or (pred.size and int(pred.min()) < 0):
        raise ValueError("label maps must not hold negative values")
    box = joint_bbox(ref, pred)
    if box is None:
        empty = np.zeros(0, dtype=np.int64)
        return Overlap(empty, empty, empty, empty, np.zeros((0, 0), dtype=np.int64))
    r = ref[box].astype(np.int64, copy=False)
    p = pred[box].astype(np.int64, copy=False)
    fg = (r > 0) | (p > 0)
    r = r[fg]
    p = p[fg]
    ref_ids, ref_sizes = np.unique(r[r > 0], return_counts=True)
    pred_ids, pred_sizes = np.unique(p[p > 0], return_counts=True)
    both = (r > 0) & (p > 0)
    base = int(p.max()) + 1 if p.size else 1
    codes, counts = np.unique(r[both] * base + p[both], return_counts=True)
    inter = np.zeros((ref_ids.size, pred_ids.size), dtype=np.int64)
    if codes.size:
        ri = np.searchsorted(ref_ids, codes // base)
        pi = np.searchsorted(pred_ids, codes % base)
        inter[ri, pi] = counts
    return Overlap(ref_ids.astype(np.int64), pred_ids.astype(np.int64), ref_sizes.astype(np.int64),
                   pred_sizes.astype(np.int64), inter)


@dataclass(frozen=True)
class Pair:
    ref: int
    pred: int
    iou: float
    dice: float


@dataclass(frozen=True)
class Matching:
    """The TP pairs and the unmatched instances of one comparison."""

    pairs: tuple[Pair, ...]
    unmatched_ref: tuple[int, ...]  # FN
    unmatched_pred: tuple[int, ...]  # FP
    threshold: float = 0.5
    ref_ids: tuple[int, ...] = field(default=())
    pred_ids: tuple[int, ...] = field(default=())

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fn(self) -> int:
        return len(self.unmatched_ref)

    @property
    def fp(self) -> int:
        return len(self.unmatched_pred)


def match_instances(ref: np.ndarray, pred: np.ndarray, *, threshold: float = 0.5,
                    overlap: Optional[Overlap] = None) -> Matching:
    """Optimal one-to-one matching by IoU; pairs with IoU >= ``threshold`` are TPs."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    ov = overlap if overlap is not None else overlap_table(ref, pred)
    iou = ov.iou()
    dsc = ov.dice()
    pairs: list[Pair] = []
    if iou.size:
        rows, cols = linear_sum_assignment(iou, maximize=True)
        for i, j in zip(rows, cols):
            # tolerance: an IoU of exactly 0.5 must not be lost to float rounding
            if iou[i, j] >= threshold - 1e-12 and ov.intersection[i, j] > 0:
                pairs.append(Pair(int(ov.ref_ids[i]), int(ov.pred_ids[j]), float(iou[i, j]), float(dsc[i, j])))
    matched_r = {p.ref for p in pairs}
    matched_p = {p.pred for p in pairs}
    pairs.sort(key=lambda p: p.ref)
    return Matching(
        pairs=tuple(pairs),
        unmatched_ref=tuple(int(v) for v in ov.ref_ids if int(v) not in matched_r),
        unmatched_pred=tuple(int(v) for v in ov.pred_ids if int(v) not in matched_p),
        threshold=threshold,
        ref_ids=tuple(int(v) for v in ov.ref_ids),
        pred_ids=tuple(int(v) for v in ov.pred_ids),
    )


def panoptic_scores(m: Matching) -> dict[str, Score]:
    """``rq``, ``sq``, ``pq``, ``instance_dice``, ``instance_dice_per_ref``, ``tp``, ``fp``,
    ``fn`` of a matching (see the module docstring for the empty cases)."""
    tp, fp, fn = m.tp, m.fp, m.fn
    counts = {"tp": Score(float(tp)), "fp": Score(float(fp)), "fn": Score(float(fn))}
    if tp + fp + fn == 0:
        one = Score(1.0, BOTH_EMPTY)
        return {"rq": one, "sq": one, "pq": one, "instance_dice": one, "instance_dice_per_ref": one,
                **{k: Score(0.0, BOTH_EMPTY) for k in counts}}
    rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    if tp == 0:
        undefined = Score(math.nan, NO_MATCH)
        per_ref = Score(0.0) if m.ref_ids else Score(math.nan, NO_MATCH)
        return {"rq": Score(0.0), "sq": undefined, "pq": Score(0.0), "instance_dice": undefined,
                "instance_dice_per_ref": per_ref, **counts}
    sq = float(np.mean([p.iou for p in m.pairs]))
    inst_dice = float(np.mean([p.dice for p in m.pairs]))
    n_ref = len(m.ref_ids)
    per_ref = Score(float(sum(p.dice for p in m.pairs) / n_ref)) if n_ref else Score(math.nan, NO_MATCH)
    return {"rq": Score(rq), "sq": Score(sq), "pq": Score(rq * sq), "instance_dice": Score(inst_dice),
            "instance_dice_per_ref": per_ref, **counts}


# --------------------------------------------------------------------------- level names
#: position of each vertebra in the standard column (C1 = 0 ... L5 = 23, sacrum/S1 = 24); a
#: transitional T13 takes L1's place and an L6 the sacrum's, so that offsets count levels of
#: a standard spine (T12 named L1 is +1, L5 named S1 is +1)
_LEVEL_POS: dict[int, int] = {**{v: v - 1 for v in range(1, 25)}, 28: 19, 25: 24, 26: 24}


def level_position(value: int) -> Optional[int]:
    """Position of a vertebra (1..28) or disc (100 + vertebra) value in the standard column,
    top to bottom (see ``_LEVEL_POS``); ``None`` for other values."""
    if value in _LEVEL_POS:
        return _LEVEL_POS[value]
    if 100 < value < 200 and (value - 100) in _LEVEL_POS:
        return _LEVEL_POS[value - 100]
    return None


def _name(value: int) -> str:
    try:
        return vertebra_name(value) if value < 100 else instance_name(value)
    except KeyError:
        return str(value)


@dataclass(frozen=True)
class LevelNaming:
    """How well the predicted label values (level names) agree with the reference on TPs.

    ``offsets``: predicted minus reference position in the standard column for each TP
    (positive: the prediction names the structure one level too low, e.g. L2 for L1).
    ``constant_offset``: the shared offset when every TP has the same non-zero one (the
    whole column is shifted), else ``None``."""

    n_matched: int
    n_correct: int
    offsets: tuple[int, ...]
    constant_offset: Optional[int]
    diagnosis: str

    @property
    def accuracy(self) -> Score:
        if self.n_matched == 0:
            return Score(math.nan, NO_MATCH)
        return Score(self.n_correct / self.n_matched)


def level_naming(m: Matching) -> LevelNaming:
    """Level-name accuracy of the TP pairs and a diagnosis of systematic shifts."""
    n = m.tp
    if n == 0:
        return LevelNaming(0, 0, (), None, "no matched instances")
    correct = sum(1 for p in m.pairs if p.pred == p.ref)
    offsets: list[int] = []
    for p in m.pairs:
        a, b = level_position(p.ref), level_position(p.pred)
        if a is not None and b is not None:
            offsets.append(b - a)
    const: Optional[int] = None
    if offsets and len(offsets) == n and len(set(offsets)) == 1 and offsets[0] != 0:
        const = offsets[0]
    if correct == n:
        text = f"all {n} matched level names correct"
    elif const is not None:
        k = abs(const)
        where = "lower" if const > 0 else "higher"
        example = m.pairs[0]
        text = (f"all {n} matched instances shifted by {const:+d} level{'s' if k > 1 else ''} "
                f"(named {k} level{'s' if k > 1 else ''} too {where}, e.g. reference {_name(example.ref)} "
                f"predicted as {_name(example.pred)})")
    else:
        wrong = [p for p in m.pairs if p.pred != p.ref]
        shown = ", ".join(f"{_name(p.ref)}->{_name(p.pred)}" for p in wrong[:5])
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        text = f"{correct} of {n} matched level names correct; no constant shift (wrong: {shown}{more})"
    return LevelNaming(n, correct, tuple(offsets), const, text)


def select_values(labels: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """``labels`` with every value not in ``values`` set to 0."""
    vals = np.fromiter((int(v) for v in values), dtype=np.int64)
    return np.where(np.isin(labels, vals), labels, 0)

