"""Label agreement: Dice per label, Dice of matched instances whatever their values, the
two tools' outputs against each other and against the phantom truth."""

from __future__ import annotations

from typing import Any, Optional, Sequence

#: the endplate values of the outputs (superior, inferior) and of the phantom truth (unsplit);
#: as in ``spineps.labels`` (not imported: the reference's worker imports this package too)
SPLIT_ENDPLATES = (52, 53)
ENDPLATE = 62

def _image(path: str) -> Any:
    """The NIfTI image at ``path`` (an image class of nibabel's choosing)."""
    import nibabel as nib

    return nib.load(path)


def dice_per_label(a: Any, b: Any, labels: Optional[Sequence[int]] = None) -> dict[int, Optional[float]]:
    """Dice of every label (except 0) present in either array (or of ``labels``); None where
    a label is absent from both."""
    import numpy as np

    a = np.asarray(a).astype(np.int64, copy=False).ravel()
    b = np.asarray(b).astype(np.int64, copy=False).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    vals = np.union1d(np.unique(a), np.unique(b)) if labels is None else np.asarray(sorted(set(labels)) or [0])
    vals = vals[vals != 0]
    if vals.size == 0:
        return {}
    lut_size = int(max(a.max(initial=0), b.max(initial=0), vals.max())) + 1
    lut = np.zeros(lut_size, np.int64)
    lut[vals] = np.arange(1, vals.size + 1)
    ia, ib = lut[a], lut[b]
    k = vals.size + 1
    conf = np.bincount(ia * k + ib, minlength=k * k).reshape(k, k)
    inter = np.diag(conf)[1:]
    sa = conf.sum(axis=1)[1:]
    sb = conf.sum(axis=0)[1:]
    out: dict[int, Optional[float]] = {}
    for v, i, x, y in zip(vals.tolist(), inter.tolist(), sa.tolist(), sb.tolist()):
        out[int(v)] = None if x + y == 0 else round(2.0 * i / (x + y), 4)
    return out

def matched_instance_dice(ours: Any, ref: Any) -> dict[str, Any]:
    """Instances compared regardless of their values: every reference instance is paired
    with the instance of ours it overlaps most; Dice per pair, and the mean."""
    import numpy as np

    a = np.asarray(ours).astype(np.int64, copy=False).ravel()
    b = np.asarray(ref).astype(np.int64, copy=False).ravel()
    fg = (a > 0) | (b > 0)
    a, b = a[fg], b[fg]
    pairs, counts = np.unique(np.stack([a, b]), axis=1, return_counts=True)
    size_a = dict(zip(*np.unique(a, return_counts=True)))
    size_b = dict(zip(*np.unique(b, return_counts=True)))
    best: dict[int, tuple[int, int]] = {}
    for (va, vb), c in zip(pairs.T.tolist(), counts.tolist()):
        if va and vb and c > best.get(vb, (0, 0))[1]:
            best[vb] = (va, c)
    dice = {}
    for vb, nb in size_b.items():
        if vb == 0:
            continue
        va, c = best.get(int(vb), (0, 0))
        dice[int(vb)] = round(2.0 * c / (nb + size_a.get(va, 0)), 4) if va else 0.0
    n_ours = sum(1 for v in size_a if v)
    return {"pairs": dice, "mean": round(float(np.mean(list(dice.values()))), 4) if dice else None,
            "instances_ours": n_ours, "instances_reference": len(dice)}

def agreement(ours_sem: str, ref_sem: str, ours_inst: Optional[str], ref_inst: Optional[str]) -> dict[str, Any]:
    """Dice per label of the two tools' outputs (on the input grid), and the voxel agreement."""
    import numpy as np

    def load(p: str) -> Any:
        return np.asanyarray(_image(p).dataobj)

    a, b = load(ours_sem), load(ref_sem)
    out: dict[str, Any] = {"semantic_dice": dice_per_label(a, b),
                           "semantic_voxel_agreement": round(float(np.mean(a == b)), 5),
                           "semantic_foreground_agreement": round(float(np.mean(a[(a > 0) | (b > 0)] ==
                                                                            b[(a > 0) | (b > 0)])), 5)
                           if np.any((a > 0) | (b > 0)) else None}
    if ours_inst and ref_inst:
        ia, ib = load(ours_inst), load(ref_inst)
        verts_a = np.where(ia < 100, ia, 0)
        verts_b = np.where(ib < 100, ib, 0)
        out["vertebra_dice_same_value"] = dice_per_label(verts_a, verts_b)
        out["vertebra_dice_matched"] = matched_instance_dice(verts_a, verts_b)
    return out

def truth_dice(mask: str, truth: str) -> dict[str, Any]:
    """Dice per semantic label against the phantom's ground truth. The truth has one endplate
    class (62, before the superior/inferior split); the outputs split it into 52 / 53, which are
    compared as one class with the truth's 62."""
    import numpy as np

    m = np.asanyarray(_image(mask).dataobj).astype(np.int64)
    t = np.asanyarray(_image(truth).dataobj).astype(np.int64)
    m = np.where(np.isin(m, SPLIT_ENDPLATES), ENDPLATE, m)
    d = dice_per_label(m, t, labels=[int(v) for v in np.unique(t) if v])
    vals = [v for v in d.values() if v is not None]
    return {"dice": d, "mean": round(float(np.mean(vals)), 4) if vals else None}
