"""Train the bundled instance model on phantom semantic maps.

    python -m spineps.training.instance --out spineps/data/models/instance --seed 0

Recipe (SPINEPS appendix A, on our coarser grid): cutouts around each vertebral body,
labelled 1 (vertebra above), 2 (centre vertebra), 3 (vertebra below); augmentations each
with 10 % chance: scaling in [-0.2, 0.2], erosion, down- then up-sampling, label drop;
vertical crop with 25 % chance; left-right flip (which swaps the left/right label values
43<->44, 45<->46, 47<->48) with 50 %; batch size 2; Adam, learning rate decaying
linearly over the run (1e-3 to 1e-5 here: ten times the paper's 1e-4 to 1e-6, because this
CPU run has about a thousand steps, not 300 epochs). On top, the typical errors of a semantic phase are
simulated on the input: missing and extra small components, eroded or dilated borders,
two bodies merged through their disc, label noise between substructures.

The target of every vertebra-part voxel of the (corrupted) input is the reference vertebra
nearest to it (within a few voxels), mapped to 1/2/3 or 0 for other vertebrae.

The model folder (``inference_config.json`` + ``instance_weights.ckpt`` +
``training_log.json``) is rewritten atomically at every validation, keeping the best
validation score, so an interrupted run still leaves a loadable folder.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from spineps.labels import INSTANCE_PARTS

__all__ = ["TrainConfig", "Case", "make_case", "sample_cutout", "augment", "train", "main", "FLIP_PAIRS",
           "flip_lr", "evaluate_instances", "model_config_dict", "build_random_instance_folder"]

log = logging.getLogger("spineps.training.instance")

#: left/right label pairs swapped by a left-right flip
FLIP_PAIRS = ((43, 44), (45, 46), (47, 48))
VERT_PARTS = INSTANCE_PARTS  # the nine substructures a vertebra instance covers (41..49)


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    spacing: tuple[float, float, float] = (3.0, 3.0, 6.0)  # P, I, R (mm)
    cutout_size: tuple[int, int, int] = (64, 80, 16)  # 192 x 240 x 96 mm
    dim: int = 8
    in_channels: int = 10
    batch_size: int = 2
    # the paper: 1e-4 -> 1e-6 over 300 epochs; ten times that here for a run of ~1000 steps
    lr_start: float = 1e-3
    lr_end: float = 1e-5
    max_steps: int = 100000
    max_minutes: float = 55.0
    n_train_cases: int = 60
    n_initial_cases: int = 12
    grow_every: int = 40
    n_val_cases: int = 2
    val_every: int = 150
    threads: int = 1  # under CPU contention one thread beats two (no OpenMP barrier waits)
    corpus_size_cleaning: int = 3  # ~ the released 100 voxels at 0.75 x 0.75 x 1.65 mm (93 mm^3), in voxels here
    vert_size_threshold: int = 4  # ~ the released 250 voxels (232 mm^3)
    log_every: int = 25
    extra: dict = field(default_factory=dict)


@dataclass
class Case:
    """A phantom on the model grid (P, I, R): semantic values and vertebra instances."""

    semantic: np.ndarray  # uint8
    instance: np.ndarray  # uint8, vertebrae 1..25, 28 (others 0)
    order: list[int]  # vertebra ids present, top to bottom
    centres: dict[int, np.ndarray]  # vertebra id -> body centre of mass (voxel)
    name: str = ""


# -- phantoms ------------------------------------------------------------------------

_FOVS = ("whole", "whole", "whole", "lumbar", "thoracolumbar", "thoracic", "cervicothoracic", "cervical")


def phantom_spec_kwargs(rng: np.random.Generator, spacing: Sequence[float]) -> dict:
    """Varied phantom parameters: whole spines, partial fields of view (with the border
    cutting a vertebra), scoliosis, stitched stations, lordosis, T13/L6 variants."""
    kw: dict[str, Any] = {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "fov": str(rng.choice(_FOVS)),
        "spacing": tuple(float(s) for s in spacing),
        "orientation": ("P", "I", "R"),
        "scoliosis": float(rng.choice([0.0, 0.0, rng.uniform(5, 35)])),
        "lordosis_scale": float(rng.uniform(0.7, 1.3)),
        "stations": int(rng.choice([1, 1, 2])),
        "oblique_deg": float(rng.choice([0.0, rng.uniform(0, 8)])),
    }
    if rng.random() < 0.4:
        kw["crop"] = {str(rng.choice(["S", "I"])): float(rng.uniform(5, 40))}
    if rng.random() < 0.08:
        kw["t13"] = True
    elif rng.random() < 0.08:
        kw["l6"] = True
    return kw


def make_case(spec_kw: dict, spacing: Sequence[float], name: str = "") -> Case:
    """One phantom from ``spineps.synth`` on the model grid (P-I-R at ``spacing``)."""
    from spineps.geometry.orientation import to_orientation
    from spineps.geometry.resampling import to_spacing
    from spineps.synth.anatomy import PhantomSpec, make_phantom

    ph = make_phantom(PhantomSpec(**spec_kw))
    sem_v, _ = to_orientation(ph.semantic, ("P", "I", "R"))
    inst_v, _ = to_orientation(ph.instance, ("P", "I", "R"))
    if not np.allclose(sem_v.spacing, spacing, atol=1e-3):
        sem_v = to_spacing(sem_v, spacing, order=0)
        inst_v = to_spacing(inst_v, spacing, order=0)
    return case_from_arrays(np.asarray(sem_v.data).astype(np.uint8), np.asarray(inst_v.data), name=name)


def case_from_arrays(sem: np.ndarray, inst: np.ndarray, name: str = "") -> Case:
    from scipy import ndimage

    inst = np.asarray(inst)
    vert = np.where(np.isin(sem, VERT_PARTS) & (inst >= 1) & (inst <= 28) & (inst != 26), inst, 0).astype(np.uint8)
    ids = [int(v) for v in np.unique(vert) if v > 0]
    body = sem == 49
    centres: dict[int, np.ndarray] = {}
    for v in ids:
        m = body & (vert == v)
        if m.sum() >= 4:
            centres[v] = np.asarray(ndimage.center_of_mass(m))
    # order by the mean index along I (axis 1), over the whole vertebra
    pos = {}
    for v, sl in zip(range(1, int(vert.max()) + 1), ndimage.find_objects(vert)):
        if sl is not None and v in ids:
            pos[v] = float(np.argwhere(vert[sl] == v)[:, 1].mean() + sl[1].start)
    order = sorted(ids, key=lambda v: pos[v])
    return Case(np.asarray(sem, np.uint8), vert, order, centres, name)


# -- augmentation ----------------------------------------------------------------------

def flip_lr(sem: np.ndarray, axis: int = 2) -> np.ndarray:
    """Mirror left-right and swap the left/right label values (43<->44, 45<->46, 47<->48)."""
    out = np.flip(sem, axis=axis).copy()
    lut = np.arange(256, dtype=np.uint8)
    for a, b in FLIP_PAIRS:
        lut[a], lut[b] = b, a
    return lut[out]


def _rand_blob(shape: Sequence[int], centre: Sequence[int], radius: float) -> tuple[tuple[slice, ...], np.ndarray]:
    r = int(math.ceil(radius))
    sl = tuple(slice(max(int(c) - r, 0), min(int(c) + r + 1, n)) for c, n in zip(centre, shape))
    grid = np.ogrid[tuple(slice(s.start - int(c), s.stop - int(c)) for s, c in zip(sl, centre))]
    d2 = np.zeros(())
    for g in grid:
        d2 = d2 + g.astype(float) ** 2
    return sl, np.asarray(d2 <= radius ** 2)


def augment(sem: np.ndarray, inst: np.ndarray, centre_id: int, rng: np.random.Generator,
            p: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Augment a semantic cutout (and its vertebra instances where geometry changes)."""
    from scipy import ndimage

    sem = sem.copy()
    inst = inst.copy()
    shape = sem.shape
    if rng.random() < 0.5:  # left-right flip (doubles the data)
        sem = flip_lr(sem)
        inst = np.flip(inst, axis=2).copy()
    if rng.random() < p:  # scaling in [-0.2, 0.2] about the cutout centre
        s = 1.0 + rng.uniform(-0.2, 0.2)
        c = (np.asarray(shape) - 1) / 2.0
        mat = np.full(3, 1.0 / s)
        off = c - mat * c
        sem = ndimage.affine_transform(sem, mat, offset=off, order=0, mode="constant", cval=0)
        inst = ndimage.affine_transform(inst, mat, offset=off, order=0, mode="constant", cval=0)
    vert = np.isin(sem, VERT_PARTS)
    if rng.random() < p:  # erosion of the vertebra parts (each part eroded separately)
        ero = np.zeros_like(vert)
        for v in VERT_PARTS:
            m = sem == v
            if m.any():
                ero |= ndimage.binary_erosion(m, iterations=1)
        keep = ero | ~vert
        if rng.random() < 0.5:  # erode the bodies only
            keep |= vert & (sem != 49)
        sem[~keep] = 0
    if rng.random() < p:  # dilation of a random part into the background
        v = int(rng.choice(VERT_PARTS))
        m = sem == v
        if m.any():
            grow = ndimage.binary_dilation(m) & (sem == 0)
            sem[grow] = v
    if rng.random() < p:  # down- then up-sampling (blocky borders)
        f = int(rng.choice([2, 2, 3]))
        axes = [a for a in range(3) if rng.random() < 0.7] or [int(rng.integers(0, 3))]
        sl = tuple(slice(None, None, f) if a in axes else slice(None) for a in range(3))
        small = sem[sl]
        for a in axes:
            small = np.repeat(small, f, axis=a)
        sem = small[tuple(slice(0, n) for n in shape)]
    if rng.random() < p:  # label drop: one part value everywhere, or some components
        v = int(rng.choice(VERT_PARTS[:-1]))  # the body keeps its role as anchor
        sem[sem == v] = 0
    if rng.random() < 0.15:  # missing small components (a part of one vertebra)
        ids = [int(i) for i in np.unique(inst) if i > 0 and i != centre_id]
        if ids:
            vid = int(rng.choice(ids))
            v = int(rng.choice(VERT_PARTS[:-1]))
            sem[(inst == vid) & (sem == v)] = 0
    if rng.random() < 0.15:  # extra small components near the vertebrae
        pts = np.argwhere(np.isin(sem, VERT_PARTS))
        for _ in range(int(rng.integers(1, 4))):
            if len(pts) == 0:
                break
            c = pts[rng.integers(len(pts))] + rng.integers(-6, 7, size=3) * np.array([1, 1, 0])
            c = np.clip(c, 0, np.asarray(shape) - 1)
            sl, ball = _rand_blob(shape, c, rng.uniform(1.0, 2.5))
            region = sem[sl]
            region[ball & (region == 0)] = int(rng.choice(VERT_PARTS))
    if rng.random() < 0.15:  # label noise between substructures
        pts = np.argwhere(np.isin(sem, VERT_PARTS))
        for _ in range(int(rng.integers(1, 6))):
            if len(pts) == 0:
                break
            c = pts[rng.integers(len(pts))]
            sl, ball = _rand_blob(shape, c, rng.uniform(1.0, 3.0))
            region = sem[sl]
            sel = ball & np.isin(region, VERT_PARTS)
            region[sel] = int(rng.choice(VERT_PARTS))
    if rng.random() < 0.1:  # two bodies merged through their disc
        body = sem == 49
        disc = np.isin(sem, (100, 62, 52, 53))
        grow = ndimage.binary_dilation(body, iterations=2) & disc
        if rng.random() < 0.5:  # only the discs next to the centre body
            near = ndimage.binary_dilation((inst == centre_id) & body, iterations=3)
            grow &= near
        sem[grow] = 49
    if rng.random() < 0.25:  # vertical crop: the field of view ends above or below the centre
        body = np.argwhere((inst == centre_id) & (sem == 49))
        if len(body):
            lo, hi = int(body[:, 1].min()), int(body[:, 1].max())
            if rng.random() < 0.5 and lo > 2:
                cut = int(rng.integers(0, lo))
                sem[:, :cut] = 0
            elif hi < shape[1] - 3:
                cut = int(rng.integers(hi + 1, shape[1]))
                sem[:, cut:] = 0
    return sem, inst


def make_target(sem: np.ndarray, inst: np.ndarray, above: int, centre: int, below: int,
                max_dist: float = 3.0) -> np.ndarray:
    """1/2/3 for the vertebra above/centre/below at every vertebra-part voxel of ``sem``,
    taken from the nearest reference vertebra voxel (within ``max_dist`` voxels)."""
    from scipy import ndimage

    vert = np.isin(sem, VERT_PARTS)
    lut = np.zeros(256, dtype=np.uint8)
    if above:
        lut[above] = 1
    lut[centre] = 2
    if below:
        lut[below] = 3
    has = inst > 0
    if not has.any():
        return np.zeros(sem.shape, np.uint8)
    dist, idx = ndimage.distance_transform_edt(~has, return_indices=True)
    nearest = inst[tuple(idx)]
    target = lut[nearest]
    target[~vert | (dist > max_dist)] = 0
    return target


def sample_cutout(case: Case, cfg: TrainConfig, rng: np.random.Generator, augment_p: float = 0.1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A mapped input cutout (uint8 values 0..9) and its 0..3 target."""
    from spineps.instance.cutouts import cutout_boxes, extract_cutout, map_semantic
    from spineps.labels import DEFAULT_INSTANCE_MAPPING

    with_centre = [v for v in case.order if v in case.centres]
    v = int(rng.choice(with_centre))
    k = case.order.index(v)
    above = case.order[k - 1] if k > 0 else 0
    below = case.order[k + 1] if k + 1 < len(case.order) else 0
    c = case.centres[v] + rng.normal(0, 1.0, size=3) * np.array([1.0, 1.5, 0.5])
    c = np.round(c).astype(int)
    box = cutout_boxes([c], cfg.cutout_size, case.semantic.shape)[0]
    sem = extract_cutout(case.semantic, box)
    inst = extract_cutout(case.instance, box)
    # keep only the vertebrae of the cutout so distant ones do not leak through nearest-voxel targets
    sem, inst = augment(sem, inst, v, rng, p=augment_p)
    target = make_target(sem, inst, above, v, below)
    mapped = map_semantic(sem, DEFAULT_INSTANCE_MAPPING)
    return mapped, target


# -- evaluation ----------------------------------------------------------------------

def evaluate_instances(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Match predicted to reference instances (IoU >= 0.5): RQ, mean Dice of matches,
    and whether every reference vertebra was found exactly once."""
    p_ids = [int(v) for v in np.unique(pred) if v > 0]
    r_ids = [int(v) for v in np.unique(ref) if v > 0]
    if not r_ids and not p_ids:
        return {"rq": 1.0, "dice": 1.0, "tp": 0, "fp": 0, "fn": 0}
    both = (pred > 0) | (ref > 0)
    pairs = np.stack([pred[both].astype(np.int64), ref[both].astype(np.int64)])
    uniq, counts = np.unique(pairs, axis=1, return_counts=True)
    p_size = {v: int(c) for v, c in zip(*np.unique(pred[pred > 0], return_counts=True))}
    r_size = {v: int(c) for v, c in zip(*np.unique(ref[ref > 0], return_counts=True))}
    matched_p, matched_r, dices = set(), set(), []
    scored = []
    for (pv, rv), inter in zip(uniq.T, counts):
        if pv == 0 or rv == 0:
            continue
        scored.append((inter / (p_size[pv] + r_size[rv] - inter), int(pv), int(rv), int(inter)))
    for iou, pv, rv, inter in sorted(scored, reverse=True):  # one-to-one, best overlaps first
        if iou >= 0.5 and pv not in matched_p and rv not in matched_r:
            matched_p.add(pv)
            matched_r.add(rv)
            dices.append(2 * inter / (p_size[pv] + r_size[rv]))
    tp = len(matched_r)
    fp = len(p_ids) - len(matched_p)
    fn = len(r_ids) - tp
    rq = tp / max(tp + 0.5 * fp + 0.5 * fn, 1e-9)
    return {"rq": float(rq), "dice": float(np.mean(dices)) if dices else 0.0, "tp": tp, "fp": fp, "fn": fn}


# -- model folder ----------------------------------------------------------------------

def model_config_dict(cfg: TrainConfig) -> dict[str, Any]:
    from spineps.labels import DEFAULT_INSTANCE_MAPPING

    return {
        "log_name": "spineps-instance-phantom-dim8",
        "modality": "SEG",
        "acquisition": "sag",
        "modeltype": "unet",
        "model_expected_orientation": ["P", "I", "R"],
        "available_folds": 1,
        "inference_augmentation": False,
        "resolution_range": [float(s) for s in cfg.spacing],
        "default_step_size": 0.5,
        "labels": {"0": 0, "1": 1, "2": 2, "3": 3},
        "expected_inputs": ["seg"],
        "has_c1": False,
        "needs_corp": False,
        "sacrum_ids": [26],
        "cutout_size": [int(s) for s in cfg.cutout_size],
        "corpus_size_cleaning": int(cfg.corpus_size_cleaning),
        "vert_size_threshold": int(cfg.vert_size_threshold),
        "mapping": {str(k): int(v) for k, v in sorted(DEFAULT_INSTANCE_MAPPING.items())},
        "trained_by": "python -m spineps.training.instance",
        "grid_note": ("coarser than the released model (0.75 x 0.75 x 1.65 mm, cutout 248 x 304 x 64): "
                      "spacing and cutout_size here are this model's own; both are read from this file"),
    }


def write_model_folder(out: Path, network, cfg: TrainConfig, *, step: int, epoch: int, log_obj: dict) -> None:
    from spineps.fsutil import write_json_atomic
    from spineps.instance.checkpoint import save_instance_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "inference_config.json", model_config_dict(cfg))
    hp = {"n_epoch": epoch, "seed": cfg.seed, "dim": cfg.dim, "in_channels": cfg.in_channels,
          "batch_size": cfg.batch_size, "lr_start": cfg.lr_start, "lr_end": cfg.lr_end,
          "spacing": list(cfg.spacing), "cutout_size": list(cfg.cutout_size),
          # the names the reference's Lightning module reads (see save_instance_checkpoint)
          "lr": cfg.lr_start, "lr_end_factor": cfg.lr_end / cfg.lr_start, "l2_reg_w": 0.0, "dsc_loss_w": 1.0}
    save_instance_checkpoint(out / "instance_weights.ckpt", network, epoch=epoch, global_step=step,
                             hyper_parameters=hp)
    write_json_atomic(out / "training_log.json", log_obj)


def build_random_instance_folder(out: Path, *, spacing: tuple[float, float, float] = (2.0, 2.0, 4.0),
                                 cutout_size: tuple[int, int, int] = (24, 40, 16), dim: int = 8, in_channels: int = 10,
                                 corpus_size_cleaning: int = 10, vert_size_threshold: int = 4, seed: int = 0) -> Path:
    """An instance model folder in the released layout with random weights (for tests and
    container smoke runs; the twin of ``spineps.training.semantic.build_random_model_folder``)."""
    import torch

    from spineps.fsutil import write_json_atomic
    from spineps.instance.checkpoint import save_instance_checkpoint
    from spineps.instance.network import InstanceUNet3D

    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(out=out, spacing=spacing, cutout_size=cutout_size, dim=dim, in_channels=in_channels,
                      corpus_size_cleaning=corpus_size_cleaning, vert_size_threshold=vert_size_threshold)
    write_json_atomic(out / "inference_config.json", model_config_dict(cfg))
    torch.manual_seed(seed)
    save_instance_checkpoint(out / "model_weights.ckpt", InstanceUNet3D(in_channels, dim))
    return out


# -- the loop ------------------------------------------------------------------------

def _soft_dice_loss(logits, target, n_classes: int = 4):
    import torch

    prob = torch.softmax(logits.float(), dim=1)
    oh = torch.nn.functional.one_hot(target, n_classes).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter = (prob * oh).sum(dims)
    den = prob.sum(dims) + oh.sum(dims)
    dice = (2 * inter + 1.0) / (den + 1.0)
    return 1.0 - dice[1:].mean()


def build_cases(cfg: TrainConfig, n: int, seed: int, prefix: str) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kw = phantom_spec_kwargs(rng, cfg.spacing)
        t0 = time.perf_counter()
        case = make_case(kw, cfg.spacing, name=f"{prefix}{i}")
        if case.centres:
            cases.append(case)
        log.debug("case %s: %d vertebrae, shape %s (%.1f s)", case.name, len(case.order), case.semantic.shape,
                  time.perf_counter() - t0)
    return cases


def validate(network, cfg: TrainConfig, cases: list[Case]) -> dict[str, float]:
    """Whole-case inference (centres, cutouts, merge) on the model grid."""
    import torch

    from spineps.instance.cutouts import body_centres, cutout_boxes, extract_cutout, map_semantic
    from spineps.instance.merge import fill_unassigned, merge_cutout_predictions
    from spineps.labels import DEFAULT_INSTANCE_MAPPING

    network.eval()
    rqs, dices, exact = [], [], 0
    with torch.inference_mode():
        for case in cases:
            centres = body_centres(case.semantic, spacing=cfg.spacing, axis=1,
                                   corpus_size_cleaning=cfg.corpus_size_cleaning)
            boxes = cutout_boxes(centres, cfg.cutout_size, case.semantic.shape)
            mapped = map_semantic(case.semantic, DEFAULT_INSTANCE_MAPPING)
            preds = []
            for i in range(0, len(boxes), 4):
                idx = torch.from_numpy(np.stack([extract_cutout(mapped, b) for b in boxes[i:i + 4]]).astype(np.int64))
                x = torch.nn.functional.one_hot(idx, cfg.in_channels).permute(0, 4, 1, 2, 3).float()
                x = x.contiguous(memory_format=torch.channels_last_3d)
                preds.extend(list(network(x).argmax(1).to(torch.uint8).numpy()))
            valid = np.isin(case.semantic, VERT_PARTS)
            res = merge_cutout_predictions(preds, boxes, case.semantic.shape, axis=1, valid=valid,
                                           min_voxels=cfg.vert_size_threshold)
            m = evaluate_instances(fill_unassigned(res.instance, valid, max_dist=2.0), case.instance)
            rqs.append(m["rq"])
            dices.append(m["dice"])
            exact += int(m["fp"] == 0 and m["fn"] == 0)
    network.train()
    return {"rq": float(np.mean(rqs)), "dice": float(np.mean(dices)), "exact_cases": exact, "n_cases": len(cases)}


def train(cfg: TrainConfig) -> dict:
    import torch

    from spineps.instance.network import InstanceUNet3D, count_parameters
    from spineps.models.device import to_memory_format

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.perf_counter()
    n_initial = min(cfg.n_initial_cases, cfg.n_train_cases)
    log.info("building %d training (growing to %d during the run) and %d validation phantoms", n_initial,
             cfg.n_train_cases, cfg.n_val_cases)
    case_rng = np.random.default_rng(cfg.seed * 1000 + 1)

    def new_case() -> Optional[Case]:
        c = make_case(phantom_spec_kwargs(case_rng, cfg.spacing), cfg.spacing, name=f"train{len(train_cases)}")
        return c if c.centres else None

    train_cases: list[Case] = []
    while len(train_cases) < n_initial:
        c = new_case()
        if c is not None:
            train_cases.append(c)
    val_cases = build_cases(cfg, cfg.n_val_cases, cfg.seed * 1000 + 2, "val")
    log.info("phantoms ready (%d train, %d val) in %.0f s", len(train_cases), len(val_cases),
             time.perf_counter() - t_start)

    net = to_memory_format(InstanceUNet3D(in_channels=cfg.in_channels, dim=cfg.dim), torch.channels_last_3d)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr_start, weight_decay=1e-5)
    ce = torch.nn.CrossEntropyLoss()
    budget = cfg.max_minutes * 60.0
    t_loop = time.perf_counter()
    history: list[dict] = []
    best: Optional[dict] = None
    step = 0
    run_loss = []
    log_obj: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
                               "parameters": count_parameters(net), "history": history}
    while step < cfg.max_steps:
        frac = max(step / cfg.max_steps, (time.perf_counter() - t_loop) / budget)
        if frac >= 1.0:
            break
        lr = cfg.lr_start + (cfg.lr_end - cfg.lr_start) * frac
        for g in opt.param_groups:
            g["lr"] = lr
        xs, ys = [], []
        for _ in range(cfg.batch_size):
            case = train_cases[int(rng.integers(len(train_cases)))]
            x, y = sample_cutout(case, cfg, rng)
            xs.append(x)
            ys.append(y)
        idx = torch.from_numpy(np.stack(xs).astype(np.int64))
        xb = torch.nn.functional.one_hot(idx, cfg.in_channels).permute(0, 4, 1, 2, 3).float()
        xb = xb.contiguous(memory_format=torch.channels_last_3d)
        yb = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = net(xb)
        loss = ce(logits, yb) + _soft_dice_loss(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run_loss.append(float(loss.detach()))
        if step % cfg.grow_every == 0 and len(train_cases) < cfg.n_train_cases:
            c = new_case()
            if c is not None:
                train_cases.append(c)
        if step % cfg.log_every == 0:
            log.info("step %d  loss %.4f  lr %.2e  %.0f s", step, float(np.mean(run_loss)), lr,
                     time.perf_counter() - t_loop)
            run_loss = []
        if step % cfg.val_every == 0:
            v = validate(net, cfg, val_cases)
            v.update(step=step, minutes=round((time.perf_counter() - t_loop) / 60, 2), lr=lr)
            history.append(v)
            log.info("validation at step %d: %s", step, v)
            score = v["rq"] + v["dice"]
            if best is None or score >= best["rq"] + best["dice"]:
                best = v
                log_obj["best"] = best
                write_model_folder(cfg.out, net, cfg, step=step, epoch=step, log_obj=log_obj)
    v = validate(net, cfg, val_cases)
    v.update(step=step, minutes=round((time.perf_counter() - t_loop) / 60, 2), final=True)
    history.append(v)
    log.info("final validation: %s", v)
    if best is None or v["rq"] + v["dice"] >= best["rq"] + best["dice"]:
        best = v
        log_obj["best"] = best
        write_model_folder(cfg.out, net, cfg, step=step, epoch=step, log_obj=log_obj)
    else:
        from spineps.fsutil import write_json_atomic

        write_json_atomic(cfg.out / "training_log.json", log_obj)
    log_obj["total_minutes"] = round((time.perf_counter() - t_start) / 60, 2)
    from spineps.fsutil import write_json_atomic

    write_json_atomic(cfg.out / "training_log.json", log_obj)
    return log_obj


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spineps.training.instance", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes,
                   help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--train-cases", type=int, default=60, help="phantoms in the end (the pool grows during the run)")
    p.add_argument("--initial-cases", type=int, default=12)
    p.add_argument("--val-cases", type=int, default=TrainConfig.n_val_cases)
    p.add_argument("--val-every", type=int, default=TrainConfig.val_every)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=TrainConfig.lr_start, help="start learning rate (decays linearly)")
    p.add_argument("--lr-end", type=float, default=TrainConfig.lr_end)
    p.add_argument("--spacing", type=float, nargs=3, default=list(TrainConfig.spacing), metavar=("P", "I", "R"))
    p.add_argument("--cutout", type=int, nargs=3, default=list(TrainConfig.cutout_size), metavar=("P", "I", "R"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    cfg = TrainConfig(out=args.out, seed=args.seed, max_minutes=args.max_minutes, max_steps=args.max_steps,
                      n_train_cases=args.train_cases, n_initial_cases=args.initial_cases, n_val_cases=args.val_cases,
                      val_every=args.val_every,
                      threads=args.threads, batch_size=args.batch_size, lr_start=args.lr, lr_end=args.lr_end,
                      spacing=tuple(args.spacing), cutout_size=tuple(args.cutout))
    if any(c % 8 for c in cfg.cutout_size):
        p.error(f"--cutout sizes must be divisible by 8, got {cfg.cutout_size}")
    result = train(cfg)
    log.info("done: best %s", result.get("best"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
