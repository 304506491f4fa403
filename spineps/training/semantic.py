"""Train the bundled T2w semantic model with nnU-Net v2's own training machinery.

    python -m spineps.training.semantic --out spineps/data/models/t2w_semantic --seed 0 \\
        --work /tmp/spineps-semantic-work --phantoms 48 --epochs 36 --iters 50 --max-minutes 40

Stages (``--stages``, default all, in this order; each reuses the work folder):

``real``     export the labelled real scans of the training split (partial labels: every
             unannotated voxel is nnU-Net's ignore label, except the region clearly
             anterior to the annotated bodies/discs, which is certainly background)
``pseudo``   (self-training, with ``--pseudo-from MODEL``) that model's predictions fill the
             unknown voxels of the real targets (``spineps.training.pseudo_labels``)
``phantoms`` render domain-randomised phantoms with ``spineps.synth`` (fully labelled)
``plan``     nnU-Net fingerprint + ExperimentPlanner (classes passed directly, no lookup by
             name), then the plans edited to a small network at the bundled model's spacing;
             nnU-Net preprocessing; our own ``splits_final.json`` (one fold)
``train``    ``SpinepsSemanticTrainer`` (a subclass of ``nnUNetTrainer``: few epochs and
             iterations, no mirroring, restricted rotation), checkpoints every few epochs
``package``  the official model-folder layout: ``inference_config.json``, ``plans.json``,
             ``dataset.json``, ``fold_0/checkpoint_final.pth`` (``optimizer_state`` dropped)

Everything here imports nnU-Net lazily, after the ``nnUNet_*`` environment variables are set
(nnU-Net reads them at import time). The script must run under ``if __name__ == "__main__"``
(nnU-Net uses process pools).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_ORDER",
    "MODEL_SPACING_PIR",
    "MODEL_ORIENTATION",
    "HOLDOUT",
    "Recipe",
    "real_cases",
    "real_target",
    "plans_dict",
    "build_random_model_folder",
    "main",
]

#: network output index i+1 -> community label value (index 0 is background)
LABEL_ORDER: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48, 49, 60, 61, 62, 100, 26)
LABEL_NAMES = {41: "arcus", 42: "spinous_process", 43: "costal_process_left", 44: "costal_process_right",
               45: "superior_articular_left", 46: "superior_articular_right", 47: "inferior_articular_left",
               48: "inferior_articular_right", 49: "vertebra_body", 60: "spinal_cord", 61: "spinal_canal",
               62: "endplate", 100: "intervertebral_disc", 26: "sacrum"}
IGNORE_INDEX = len(LABEL_ORDER) + 1
MODEL_ORIENTATION = ("P", "I", "R")
#: bundled model spacing in P, I, R order (mm): coarser than the official 0.75/0.75/1.65
MODEL_SPACING_PIR = (1.5, 1.5, 3.0)
DATASET_ID = 731
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SpinepsT2wSemantic"
CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetPlans"

#: real scans kept out of training (evaluated by benchmarks/semantic_accuracy.py)
HOLDOUT: dict[str, tuple[str, ...]] = {
    "VB2": ("sub-vb202", "sub-vb207", "sub-vb212", "sub-vb219"),
    "VB3": ("sub-vb301", "sub-vb309"),
    # added with VB3extra (2026-12): every fifth scan of its sorted list, from the third
    "VB3extra": ("sub-vb318", "sub-vb324", "sub-vb329", "sub-vb335", "sub-vb340", "sub-vb345", "sub-vb350"),
    "IVD": ("sub-ivd11", "sub-ivd42"),
    "SCT": ("sub-sctcervical",),
}
#: which community value each real folder annotates, and the image suffix
REAL_SETS: dict[str, tuple[int, str]] = {"VB2": (49, "T2w"), "VB3": (49, "MR"), "VB3extra": (49, "MR"),
                                         "IVD": (100, "T2w")}


@dataclass
class Recipe:
    """Everything that determines the bundled model (saved beside it)."""

    seed: int = 0
    phantoms: int = 48
    epochs: int = 36
    iters: int = 50
    val_iters: int = 4
    batch_size: int = 2
    features: tuple[int, ...] = (8, 16, 32, 64, 64)
    patch_rip: tuple[int, int, int] = (24, 96, 80)  # nnU-Net axis order: R, I, P
    spacing_pir: tuple[float, float, float] = MODEL_SPACING_PIR
    initial_lr: float = 1e-2
    save_every: int = 5
    max_minutes: float = 0.0  # > 0: stop after the epoch that passes this wall time (final checkpoint saved)
    #: "bf16": the network's forward under CPU bfloat16 autocast (float32 master weights and
    #: loss; 2.3x faster steps on CPUs with native bf16, benchmarks/training_step_cost.py)
    train_precision: str = "fp32"
    #: warm start from the weights of this packaged model folder (same plans), e.g. the last round's
    init_from: str = ""
    #: self-training: this model folder's predictions fill the unknown voxels of the real
    #: scans' targets (``spineps.training.pseudo_labels``)
    pseudo_from: str = ""
    use_real: bool = True
    real_n4: bool = True
    anterior_margin_mm: float = 8.0
    #: lateral margin of the real targets' background beside bodies / discs (``Margins.lateral_mm``)
    lateral_margin_mm: float = 4.0
    holdout: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(HOLDOUT))


# ----------------------------------------------------------------------------------------------
# data export
# ----------------------------------------------------------------------------------------------
def _reorient(img: "Any", codes: tuple[str, str, str]) -> "Any":
    import nibabel as nib

    cur = nib.io_orientation(img.affine)
    tgt = nib.orientations.axcodes2ornt(codes)
    return img.as_reoriented(nib.orientations.ornt_transform(cur, tgt))


def _save_case(raw: Path, case: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(raw / "labelsTr" / f"{case}.nii.gz"))


def values_to_indices(mask: np.ndarray, unknown: int = IGNORE_INDEX) -> np.ndarray:
    """Community values -> network indices (0 stays 0; values the model does not predict
    become ``unknown``)."""
    lut = np.full(256 if mask.max(initial=0) < 256 else int(mask.max()) + 1, unknown, np.uint8)
    lut[0] = 0
    for i, v in enumerate(LABEL_ORDER, start=1):
        if v < lut.size:
            lut[v] = i
    return lut[np.asarray(mask).astype(np.int64)]


def real_cases(real_root: Path, split: str = "train", holdout: Optional[dict[str, tuple[str, ...]]] = None
               ) -> list[tuple[str, str, Path, Path, int]]:
    """(set, subject, image, label, annotated value) of the real scans of ``split``
    ('train' or 'holdout'); the SCT cervical cord scan only in 'holdout'."""
    holdout = HOLDOUT if holdout is None else holdout
    out = []
    for name, (value, suffix) in REAL_SETS.items():
        folder = Path(real_root) / name
        for img in sorted(folder.glob(f"sub-*_{suffix}.nii.gz")):
            sub = img.name.split("_")[0]
            lab = folder / f"{sub}_desc-spine_dseg.nii.gz"
            if not lab.is_file():
                continue
            if (sub in holdout.get(name, ())) == (split == "holdout"):
                out.append((name, sub, img, lab, value))
    if split == "holdout":
        sct = Path(real_root) / "SCT"
        img, lab = sct / "sub-sctcervical_T2w.nii.gz", sct / "sub-sctcervical_label-cord_mask.nii.gz"
        if img.is_file() and lab.is_file():
            out.append(("SCT", "sub-sctcervical", img, lab, 60))
    return out


def real_target(inst: np.ndarray, value: int, spacing: tuple[float, float, float], margins: Any = None
                ) -> np.ndarray:
    """Network target (P, I, R) of a real scan whose ``value`` structures (49 bodies or 100
    discs) are annotated as instances ``inst``: see ``spineps.training.partial_labels``."""
    from spineps.training.partial_labels import Margins, labels_from_bodies, labels_from_discs

    margins = margins or Margins()
    idx = {v: LABEL_ORDER.index(v) + 1 for v in (49, 100, 26)}
    if value == 49:
        return labels_from_bodies(inst, spacing, body=idx[49], disc=idx[100], ignore=IGNORE_INDEX, margins=margins)
    if value == 100:
        vals = [int(v) for v in np.unique(inst) if v > 0]
        return labels_from_discs(inst, spacing, body=idx[49], disc=idx[100], sacrum=idx[26], ignore=IGNORE_INDEX,
                                 lowest_is_l5_s1=bool(vals) and max(vals) == 124, margins=margins)
    raise ValueError(f"no target rule for annotated value {value}")


def export_real(raw: Path, recipe: Recipe, real_root: Path) -> list[str]:
    """The real scans of the training split: image N4-corrected once (kept when it exists),
    target rebuilt every time from the instance labels (``desc-vert``)."""
    import nibabel as nib

    from spineps.semantic.preprocess import n4_correct, normalize_range
    from spineps.training.partial_labels import Margins

    names = []
    margins = Margins(anterior_mm=recipe.anterior_margin_mm, lateral_mm=recipe.lateral_margin_mm)
    for set_name, sub, img_p, lab_p, value in real_cases(real_root, "train", recipe.holdout):
        case = f"real{set_name.lower()}_{sub.replace('sub-', '')}"
        vert_p = lab_p.with_name(lab_p.name.replace("desc-spine", "desc-vert"))
        img = _reorient(nib.load(str(img_p)), MODEL_ORIENTATION)
        lab = _reorient(nib.load(str(vert_p if vert_p.is_file() else lab_p)), MODEL_ORIENTATION)
        inst = np.asarray(lab.dataobj).astype(np.int64)
        if not vert_p.is_file():
            inst = ndimage_label(inst == value)
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        label = real_target(inst, value, spacing, margins)  # type: ignore[arg-type]
        image_file = raw / "imagesTr" / f"{case}_0000.nii.gz"
        if image_file.is_file():
            (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label.astype(np.uint8), img.affine), str(raw / "labelsTr" / f"{case}.nii.gz"))
        else:
            data = normalize_range(np.asarray(img.dataobj, dtype=np.float32))
            if recipe.real_n4:
                data = normalize_range(n4_correct(data, img.header.get_zooms()[:3]))
            _save_case(raw, case, data, label, img.affine)
        names.append(case)
        log.info("exported %s (%s)", case, img.shape)
    return names


def add_pseudo_labels(raw: Path, recipe: Recipe, real_root: Path, nprocs: int = 1) -> list[str]:
    """Complete the real training cases' targets (as ``export_real`` wrote them) with the
    predictions of the model folder ``recipe.pseudo_from`` (its N4-free path: the exported
    images are already corrected)."""
    import nibabel as nib

    from spineps.geometry.volume import Volume
    from spineps.semantic.predict import NnUNetSemanticSegmenter
    from spineps.training.pseudo_labels import pseudo_target

    seg = NnUNetSemanticSegmenter.from_folder(Path(recipe.pseudo_from), device="cpu", nprocs=nprocs, n4=False)
    idx = {v: LABEL_ORDER.index(v) + 1 for v in (49, 100, 26)}
    # the annotation decides the body and disc classes; the sacrum too in both kinds of scan
    # (its S1 rule places it below the lowest annotated level; a sacrum predicted elsewhere
    # in a body-annotated scan is the error the round-1 model made on water-fat contrast)
    decided = {49: (idx[49], idx[100], idx[26]), 100: (idx[100], idx[49], idx[26])}
    names = []
    for set_name, sub, _img_p, lab_p, value in real_cases(real_root, "train", recipe.holdout):
        case = f"real{set_name.lower()}_{sub.replace('sub-', '')}"
        img: Any = nib.load(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))  # an image class of nibabel's choosing
        lab_file = raw / "labelsTr" / f"{case}.nii.gz"
        lab: Any = nib.load(str(lab_file))
        target = np.asarray(lab.dataobj).astype(np.uint8)
        image = np.asarray(img.dataobj, dtype=np.float32)
        pred = seg.segment(Volume(image, img.affine))
        pred_idx = values_to_indices(np.asarray(pred.data))
        out = pseudo_target(target, pred_idx, ignore=IGNORE_INDEX, decided=decided[value])
        _grow_cord(out, target, image, np.asarray(pred.data), case)
        if value == 49:
            s1 = _s1_as_sacrum(lab_p, pred_idx, tuple(float(z) for z in img.header.get_zooms()[:3]))
            if s1 is not None:
                unknown = target == IGNORE_INDEX
                core = ndimage_erode(s1) & unknown
                out[s1 & unknown] = IGNORE_INDEX  # its border stays unknown, its interior is sacrum
                out[core] = idx[26]
                log.info("%s: %d voxels below the annotated L5 taught as sacrum (S1)", case, int(core.sum()))
        nib.save(nib.Nifti1Image(out, img.affine), str(lab_file))
        names.append(case)
        log.info("pseudo-labelled %s: %d of %d unknown voxels adopted", case,
                 int(((target == IGNORE_INDEX) & (out != IGNORE_INDEX)).sum()), int((target == IGNORE_INDEX).sum()))
    return names


def _grow_cord(out: np.ndarray, target: np.ndarray, image: np.ndarray, pred: np.ndarray, case: str) -> None:
    """In ``out`` (a pseudo-labelled target), the cord as ``pseudo_labels.cord_by_contrast``
    finds it in the unknown voxels: its interior taught as cord, its border left unknown
    (the model's thin cord would otherwise teach the rest of the cord as canal); the other
    dark canal voxels (``pseudo_labels.dark_canal``) are left unknown too."""
    from spineps.training.pseudo_labels import cord_by_contrast, dark_canal

    cord_idx = LABEL_ORDER.index(60) + 1
    grown = cord_by_contrast(image, pred, cord=60, canal=61, axis=MODEL_ORIENTATION.index("I"))
    unknown = target == IGNORE_INDEX
    before = int((out == cord_idx).sum())
    out[(grown | dark_canal(image, pred, cord=60, canal=61)) & unknown] = IGNORE_INDEX
    out[ndimage_erode(grown) & unknown] = cord_idx
    log.info("%s: cord by contrast %d voxels (was %d)", case, int((out == cord_idx).sum()), before)


def _s1_as_sacrum(lab_p: Path, pred_idx: np.ndarray, spacing: tuple[float, ...]) -> "np.ndarray | None":
    """The model's bone below the annotated L5 of a body-annotated scan (``desc-vert`` next to
    ``lab_p``), as ``partial_labels.sacrum_below_l5`` finds it; None when the scan has no
    level-named annotation or its lowest annotated body is not L5."""
    import nibabel as nib

    from spineps.training.partial_labels import sacrum_below_l5

    vert_p = lab_p.with_name(lab_p.name.replace("desc-spine", "desc-vert"))
    if not vert_p.is_file():
        return None
    inst = np.asarray(_reorient(nib.load(str(vert_p)), MODEL_ORIENTATION).dataobj).astype(np.int64)
    vals = [int(v) for v in np.unique(inst) if v > 0]
    if not vals or max(vals) != 24 or inst.shape != pred_idx.shape:
        return None
    bone = np.isin(pred_idx, [LABEL_ORDER.index(v) + 1 for v in (49, 62, 26)])
    return sacrum_below_l5(inst, bone, spacing)


def ndimage_erode(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.asarray(ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1)))


def ndimage_label(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.label(mask)[0]


#: share of training phantoms cut tightly around the canal (``phantom_spec``)
TIGHT_FOV_FRACTION = 0.15

FOVS = ("whole", "cervical", "thoracic", "lumbar", "lumbar", "thoracolumbar", "thoracolumbar", "cervicothoracic")


def phantom_spec(seed: int, k: int) -> Any:
    """A varied phantom: field of view, curvature, obliqueness, variants, crops and the
    acquisition grid (2/3 directly at the model spacing in P-I-R, 1/3 at a finer or
    thick-slice grid that nnU-Net resamples)."""
    from spineps.synth.anatomy import PhantomSpec

    rng = np.random.default_rng([seed, 17])
    spacing: tuple[float, float, float]
    if k % 3 == 2:
        a, b, c = (float(x) for x in rng.choice([(0.9, 0.9, 3.3), (1.0, 1.0, 1.0), (1.2, 1.2, 4.0)]))
        spacing = (a, b, c)
    else:
        spacing = MODEL_SPACING_PIR
    crop = None
    if rng.random() < 0.3:
        crop = {str(rng.choice(["S", "I"])): float(rng.uniform(5, 25))}
    oblique = float(rng.choice([0.0, 0.0, rng.uniform(0, 12)]))
    scoliosis = float(rng.choice([0.0, 0.0, rng.uniform(0, 25)]))
    t13, l6 = bool(rng.random() < 0.08), bool(rng.random() < 0.08)
    lordosis, stations = float(rng.uniform(0.7, 1.3)), int(1 + (rng.random() < 0.15))
    # small-FOV scans of the cord (the SCT cervical scan: 60 x 55 x 52 mm): a tight crop
    # across the canal for about one phantom in seven (drawn last: the others keep their draws)
    lr_half = ap_half = None
    if rng.random() < TIGHT_FOV_FRACTION:
        lr_half, ap_half = float(rng.uniform(22, 34)), float(rng.uniform(26, 42))
    return PhantomSpec(
        seed=seed, fov=FOVS[k % len(FOVS)], spacing=spacing, orientation=MODEL_ORIENTATION,
        oblique_deg=oblique, scoliosis=scoliosis, t13=t13, l6=l6, crop=crop,
        lordosis_scale=lordosis, stations=stations, lr_half_width=lr_half, ap_half_width=ap_half,
    )


def export_phantoms(raw: Path, recipe: Recipe) -> list[str]:
    """Phantoms from ``spineps.synth`` (fully labelled); every other one domain-randomised
    (random tissue intensities), the others with realistic T2w contrast."""
    from spineps.semantic.preprocess import normalize_range
    from spineps.synth.anatomy import make_phantom
    from spineps.synth.render import CORD_CONTRAST, render_t2w

    rng = np.random.default_rng(recipe.seed)
    seeds = [int(x) for x in rng.integers(0, 2**31 - 1, recipe.phantoms)]
    names = []
    for k, seed in enumerate(seeds):
        case = f"phantom_{k:03d}"
        if (raw / "labelsTr" / f"{case}.nii.gz").is_file():
            names.append(case)
            continue
        ph = make_phantom(phantom_spec(seed, k))
        # partial-volume super-sampling for every third phantom (it costs 5-10x the render time)
        img = render_t2w(ph, seed=seed, randomize=bool(k % 2), supersample=(k % 3 == 0),
                         cord_contrast=CORD_CONTRAST)
        image_nii = _reorient(_nifti(img.data, img.affine), MODEL_ORIENTATION)
        label_nii = _reorient(_nifti(ph.semantic.data, ph.semantic.affine), MODEL_ORIENTATION)
        data = normalize_range(np.asarray(image_nii.dataobj, dtype=np.float32))
        label = values_to_indices(np.asarray(label_nii.dataobj))
        _save_case(raw, case, data, label, image_nii.affine)
        names.append(case)
        log.info("phantom %s: %s %s", case, ph.spec.fov, data.shape)
    return names


def _nifti(data: np.ndarray, affine: np.ndarray) -> Any:
    import nibabel as nib

    return nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))


def write_dataset_json(raw: Path, n_training: int) -> None:
    labels = {"background": 0}
    for i, v in enumerate(LABEL_ORDER, start=1):
        labels[LABEL_NAMES[v]] = i
    labels["ignore"] = IGNORE_INDEX
    ds = {"channel_names": {"0": "T2"}, "labels": labels, "numTraining": n_training, "file_ending": ".nii.gz",
          "name": "SpinepsT2wSemantic", "description": "phantoms from spineps.synth + partially labelled real scans"}
    (raw / "dataset.json").write_text(json.dumps(ds, indent=2))


# ----------------------------------------------------------------------------------------------
# nnU-Net planning / preprocessing
# ----------------------------------------------------------------------------------------------
def set_nnunet_env(work: Path) -> None:
    for k, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        os.environ[k] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("nnUNet_def_n_proc", "2")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    os.environ.setdefault("nnUNet_compile", "0")


def small_plans(plans: dict, recipe: Recipe) -> dict:
    """Edit the planner's output: only ``3d_fullres``, at the bundled spacing, with a small
    PlainConvUNet and a fixed patch."""
    cfg = plans["configurations"][CONFIGURATION]
    sp_rip = [float(recipe.spacing_pir[2]), float(recipe.spacing_pir[1]), float(recipe.spacing_pir[0])]
    n_stages = len(recipe.features)
    strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n_stages - 2)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n_stages - 1)
    cfg["spacing"] = sp_rip
    cfg["patch_size"] = list(recipe.patch_rip)
    cfg["batch_size"] = recipe.batch_size
    cfg["median_image_size_in_voxels"] = cfg.get("median_image_size_in_voxels", list(recipe.patch_rip))
    arch = cfg["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    kw = arch["arch_kwargs"]
    kw.update({
        "n_stages": n_stages,
        "features_per_stage": list(recipe.features),
        "kernel_sizes": kernels,
        "strides": strides,
        "n_conv_per_stage": [2] * n_stages,
        "n_conv_per_stage_decoder": [2] * (n_stages - 1),
    })
    kw.pop("n_blocks_per_stage", None)
    cfg["use_mask_for_norm"] = [False]
    cfg["normalization_schemes"] = ["ZScoreNormalization"]
    plans["configurations"] = {CONFIGURATION: cfg}
    plans["transpose_forward"] = [0, 1, 2]
    plans["transpose_backward"] = [0, 1, 2]
    plans["original_median_spacing_after_transp"] = sp_rip
    return plans


def plan_and_preprocess(work: Path, recipe: Recipe, val_cases: list[str]) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    pre = work / "preprocessed" / DATASET_NAME
    DatasetFingerprintExtractor(DATASET_ID, 2, verbose=False).run(overwrite_existing=True)
    sp_rip = (recipe.spacing_pir[2], recipe.spacing_pir[1], recipe.spacing_pir[0])
    planner = ExperimentPlanner(DATASET_ID, overwrite_target_spacing=list(sp_rip), suppress_transpose=True)
    planner.plan_experiment()
    plans_path = pre / f"{PLANS_NAME}.json"
    plans = small_plans(json.loads(plans_path.read_text()), recipe)
    plans_path.write_text(json.dumps(plans, indent=2))
    DefaultPreprocessor(verbose=False).run(DATASET_ID, CONFIGURATION, PLANS_NAME, num_processes=2)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (work / "raw" / DATASET_NAME / "labelsTr").glob("*.nii.gz"))
    val = [c for c in cases if c in set(val_cases)]
    train = [c for c in cases if c not in set(val)]
    (pre / "splits_final.json").write_text(json.dumps([{"train": train, "val": val or train[:2]}], indent=2))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _load_weights(net: Any, folder: Path) -> None:
    """Warm start: the network weights of a packaged model folder's ``fold_0`` (same plans)."""
    import torch

    ck = torch.load(str(folder / "fold_0" / "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    own = net.state_dict()
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in ck["network_weights"].items()})


def _autocast_forward(net: Any) -> None:
    """Run ``net``'s forward under CPU bfloat16 autocast with float32 outputs (a list of
    outputs under deep supervision); parameters and state-dict keys are untouched."""
    import torch

    inner = net.forward

    def forward(x: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = inner(x)
        return [o.float() for o in out] if isinstance(out, (list, tuple)) else out.float()

    net.forward = forward


def make_trainer_class(recipe: Recipe) -> type:
    """Our nnUNetTrainer subclass (built here because nnU-Net may only be imported after the
    environment is set). Passed directly to training: no lookup by name."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class SpinepsSemanticTrainer(nnUNetTrainer):
        """Few short epochs, no mirroring (left/right labels), rotation limited to +-15 deg
        (scans are upright), regular checkpoints."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: Optional[torch.device] = None):
            super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cpu"))
            self.num_epochs = recipe.epochs
            self.num_iterations_per_epoch = recipe.iters
            self.num_val_iterations_per_epoch = recipe.val_iters
            self.initial_lr = recipe.initial_lr
            self.save_every = recipe.save_every

        def initialize(self):
            super().initialize()
            if recipe.init_from:
                _load_weights(self.network, Path(recipe.init_from))
                self.print_to_log_file(f"network weights initialised from {recipe.init_from}")
            if recipe.train_precision == "bf16" and self.device.type == "cpu":
                self.network.to(memory_format=torch.channels_last_3d)
                _autocast_forward(self.network)
                self.print_to_log_file("network forward under CPU bfloat16 autocast, channels-last weights")

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):  # noqa: N802
            from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

            patch_size = self.configuration_manager.patch_size
            rotation = (-15.0 / 360 * 2 * np.pi, 15.0 / 360 * 2 * np.pi)
            do_dummy_2d = True  # R axis is 2x coarser and the patch thin in R: rotate in-plane only
            initial = list(get_patch_size(patch_size, rotation, (0, 0), (0, 0), (0.85, 1.25)))
            initial[0] = patch_size[0]
            self.inference_allowed_mirroring_axes = None
            self.print_to_log_file("no mirroring; in-plane rotation +-15 deg")
            return rotation, do_dummy_2d, tuple(initial), None

        def run_training(self):
            """nnU-Net's epoch loop with a wall-time guard (``Recipe.max_minutes``)."""
            t_start = time.time()
            self.on_train_start()
            for _epoch in range(self.current_epoch, self.num_epochs):
                self.on_epoch_start()
                self.on_train_epoch_start()
                train_outputs = [self.train_step(next(self.dataloader_train))
                                 for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [self.validation_step(next(self.dataloader_val))
                                   for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val_outputs)
                self.on_epoch_end()
                if recipe.max_minutes > 0 and time.time() - t_start > 60 * recipe.max_minutes:
                    self.print_to_log_file(f"wall-time budget of {recipe.max_minutes} min reached after epoch "
                                           f"{self.current_epoch - 1}: stopping")
                    break
            self.on_train_end()

        def perform_actual_validation(self, save_probabilities: bool = False):
            self.print_to_log_file("full-case validation skipped (see benchmarks/semantic_accuracy.py)")

    return SpinepsSemanticTrainer


def train(work: Path, recipe: Recipe, threads: int = 2, continue_training: bool = False) -> Path:
    import torch

    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.set_num_threads(threads)
    pre = work / "preprocessed" / DATASET_NAME
    plans = json.loads((pre / f"{PLANS_NAME}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = continue_training
    cls = make_trainer_class(recipe)
    trainer = cls(plans, CONFIGURATION, 0, dataset_json, torch.device("cpu"))
    if continue_training:
        ckpt = Path(trainer.output_folder) / "checkpoint_latest.pth"
        if ckpt.is_file():
            trainer.load_checkpoint(str(ckpt))
    trainer.run_training()
    return Path(trainer.output_folder_base)


# ----------------------------------------------------------------------------------------------
# packaging into the official folder layout
# ----------------------------------------------------------------------------------------------
def inference_config(recipe: Recipe) -> dict:
    return {
        "log_name": "spineps-t2w-semantic-bundled",
        "modality": "T2w",
        "acquisition": "sag",
        "modeltype": "nnunet",
        "model_expected_orientation": list(MODEL_ORIENTATION),
        "available_folds": 1,
        "inference_augmentation": False,
        "resolution_range": [float(s) for s in recipe.spacing_pir],
        "default_step_size": 0.5,
        "labels": {"0": 0, **{str(i): v for i, v in enumerate(LABEL_ORDER, start=1)}},
        "expected_inputs": ["img"],
        "has_c1": False,
    }


def training_log(checkpoint: dict) -> dict:
    """Per-epoch numbers of nnU-Net's logger in a checkpoint: losses, learning rate, epoch
    time and the validation pseudo Dice per class (named by community value)."""
    lg = checkpoint.get("logging") or {}
    names = [LABEL_NAMES[v] for v in LABEL_ORDER]
    start, end = lg.get("epoch_start_timestamps", []), lg.get("epoch_end_timestamps", [])
    epochs = []
    def at(key: str, e: int) -> Any:
        vals = lg.get(key, [])
        return vals[e] if e < len(vals) else None

    for e in range(int(checkpoint.get("current_epoch", 0))):
        dice = at("dice_per_class_or_region", e)
        row = {"epoch": e, "train_loss": at("train_losses", e), "val_loss": at("val_losses", e), "lr": at("lrs", e),
               "ema_fg_dice": at("ema_fg_dice", e),
               "seconds": (end[e] - start[e]) if e < len(start) and e < len(end) else None,
               "pseudo_dice": ({n: float(d) for n, d in zip(names, dice)} if dice is not None else None)}
        epochs.append({k: (round(float(v), 5) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
    return {"trainer": checkpoint.get("trainer_name"), "epochs": epochs}


def package(results_folder: Path, out: Path, recipe: Recipe, checkpoint: str = "checkpoint_final.pth") -> Path:
    """Copy plans/dataset json and a slimmed checkpoint into ``out`` (official layout)."""
    import torch

    from spineps.fsutil import atomic_path, write_json_atomic

    out = Path(out)
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    src = results_folder / "fold_0" / checkpoint
    if not src.is_file():
        for alt in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
            if (results_folder / "fold_0" / alt).is_file():
                src = results_folder / "fold_0" / alt
                break
    ck = torch.load(str(src), map_location="cpu", weights_only=False)  # our own file, just written
    # float16 storage halves the file (the network loads them into its float32 parameters;
    # rounding error ~5e-4 relative, below what the bf16 inference default rounds anyway)
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in ck["network_weights"].items()}
    slim = {
        "network_weights": weights,
        "trainer_name": ck["trainer_name"],
        "init_args": {"configuration": ck["init_args"]["configuration"], "fold": ck["init_args"]["fold"]},
        "inference_allowed_mirroring_axes": None,
        "current_epoch": int(ck["current_epoch"]),
    }
    with atomic_path(out / "fold_0" / "checkpoint_final.pth") as tmp:
        torch.save(slim, str(tmp))
    for name in ("plans.json", "dataset.json"):
        write_json_atomic(out / name, json.loads((results_folder / name).read_text()))
    write_json_atomic(out / "inference_config.json", inference_config(recipe))
    write_json_atomic(out / "training_log.json", training_log(ck))
    rec = asdict(recipe)
    rec["source_checkpoint"] = src.name
    rec["epochs_done"] = int(ck["current_epoch"])
    write_json_atomic(out / "training_recipe.json", rec)
    return out


# ----------------------------------------------------------------------------------------------
# a random-weight folder in the official layout (tests, pipeline smoke runs)
# ----------------------------------------------------------------------------------------------
def plans_dict(spacing_pir: tuple[float, float, float], patch_rip: tuple[int, int, int],
               features: tuple[int, ...], dataset_name: str = "Dataset999_Tiny") -> dict:
    """A complete nnU-Net v2 plans dict (one ``3d_fullres`` configuration, PlainConvUNet)."""
    n = len(features)
    sp_rip = [float(spacing_pir[2]), float(spacing_pir[1]), float(spacing_pir[0])]
    strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (n - 2)
    kernels = [[1, 3, 3]] + [[3, 3, 3]] * (n - 1)
    resamp = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    cfg = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch_rip), "median_image_size_in_voxels": list(patch_rip), "spacing": sp_rip,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resamp, "resampling_fn_seg_kwargs": {**resamp, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resamp, "order": 1},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n,
                "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name, "plans_name": PLANS_NAME, "original_median_spacing_after_transp": sp_rip,
        "original_median_shape_after_transp": list(patch_rip), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {CONFIGURATION: cfg},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {"max": 1500.0, "mean": 300.0, "median": 280.0,
                                                              "min": 0.0, "percentile_00_5": 10.0,
                                                              "percentile_99_5": 1200.0, "std": 150.0}},
    }


def build_random_model_folder(out: Path, *, folds: int = 3, trainer_name: str = "nnUNetTrainer_SpinepsLikeCustom",
                              spacing_pir: tuple[float, float, float] = (0.75, 0.75, 1.65),
                              orientation: tuple[str, str, str] = ("P", "I", "R"),
                              patch_rip: tuple[int, int, int] = (16, 32, 32), features: tuple[int, ...] = (2, 4, 8),
                              label_values: tuple[int, ...] = LABEL_ORDER, seed: int = 0,
                              inference_augmentation: bool = False) -> Path:
    """A folder with the layout of the officially released T2w semantic model (``folds``
    folds, a custom ``trainer_name`` in the checkpoints, ``3d_fullres``) but a tiny
    random network. Checkpoints carry the usual nnU-Net keys, numpy scalars included."""
    import torch

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plans = plans_dict(spacing_pir, patch_rip, features)
    labels = {"background": 0, **{LABEL_NAMES.get(v, f"label_{v}"): i for i, v in enumerate(label_values, start=1)}}
    dataset_json = {"channel_names": {"0": "T2"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    arch = plans["configurations"][CONFIGURATION]["architecture"]
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    cfg = {
        "log_name": "tiny-random-official-layout", "modality": "T2w", "acquisition": "sag", "modeltype": "nnunet",
        "model_expected_orientation": list(orientation), "available_folds": folds,
        "inference_augmentation": inference_augmentation, "resolution_range": list(spacing_pir),
        "default_step_size": 0.5, "labels": {"0": 0, **{str(i): v for i, v in enumerate(label_values, start=1)}},
        "unknown_future_key": {"ignored": True},
    }
    (out / "inference_config.json").write_text(json.dumps(cfg, indent=2))
    for f in range(folds):
        torch.manual_seed(seed + f)
        net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     1, len(label_values) + 1, allow_init=True, deep_supervision=False)
        ck = {
            "network_weights": net.state_dict(),
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.4)],
                        "dice_per_class_or_region": [[np.float64(0.1)] * len(label_values)]},
            "_best_ema": np.float64(0.4),
            "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": f, "dataset_json": dataset_json},
            "trainer_name": trainer_name,
            "inference_allowed_mirroring_axes": (0, 1, 2) if inference_augmentation else None,
        }
        (out / f"fold_{f}").mkdir(exist_ok=True)
        torch.save(ck, str(out / f"fold_{f}" / "checkpoint_final.pth"))
    return out


# ----------------------------------------------------------------------------------------------
def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spineps.training.semantic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model folder to write (official layout)")
    p.add_argument("--work", type=Path, default=Path("/tmp/spineps-semantic-work"), help="nnU-Net work folder")
    p.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phantoms", type=int, default=Recipe.phantoms)
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--iters", type=int, default=Recipe.iters)
    p.add_argument("--val-iters", type=int, default=Recipe.val_iters)
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall-time budget of the training stage")
    p.add_argument("--features", default=",".join(map(str, Recipe.features)))
    p.add_argument("--no-real", action="store_true", help="phantoms only")
    p.add_argument("--no-real-n4", action="store_true")
    p.add_argument("--patch", default=",".join(map(str, Recipe.patch_rip)), help="patch R,I,P in voxels")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training process (1 is fastest on 2 shared cores: the "
                        "augmentation worker uses the other)")
    p.add_argument("--train-precision", choices=("fp32", "bf16"), default=Recipe.train_precision,
                   help="bf16: forward under CPU bfloat16 autocast (CPUs with native bf16)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="packaged model folder whose fold_0 weights start the training (same network)")
    p.add_argument("--pseudo-from", type=Path, default=None,
                   help="stage 'pseudo': this model folder's predictions fill the real targets' unknown voxels")
    p.add_argument("--anterior-margin-mm", type=float, default=Recipe.anterior_margin_mm,
                   help="real targets: background from this far in front of the annotated structures")
    p.add_argument("--lateral-margin-mm", type=float, default=Recipe.lateral_margin_mm,
                   help="real targets: background from this far beside the annotated structures")
    p.add_argument("--initial-lr", type=float, default=Recipe.initial_lr)
    p.add_argument("--continue", dest="cont", action="store_true", help="resume from checkpoint_latest")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint to package")
    p.add_argument("--stages", default="real,pseudo,phantoms,plan,train,package")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = _parse(argv)
    recipe = Recipe(seed=a.seed, phantoms=a.phantoms, epochs=a.epochs, iters=a.iters, val_iters=a.val_iters,
                    features=tuple(int(x) for x in a.features.split(",")), use_real=not a.no_real,
                    patch_rip=tuple(int(x) for x in a.patch.split(",")),  # type: ignore[arg-type]
                    max_minutes=a.max_minutes, train_precision=a.train_precision,
                    init_from=str(a.init_from) if a.init_from else "",
                    pseudo_from=str(a.pseudo_from) if a.pseudo_from else "",
                    anterior_margin_mm=a.anterior_margin_mm, lateral_margin_mm=a.lateral_margin_mm,
                    initial_lr=a.initial_lr,
                    real_n4=not a.no_real_n4)
    work = a.work.resolve()
    set_nnunet_env(work)
    raw = work / "raw" / DATASET_NAME
    raw.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    t0 = time.time()
    if "real" in stages and recipe.use_real:
        export_real(raw, recipe, a.real)
        log.info("real export done (%.0f s)", time.time() - t0)
    if "pseudo" in stages and recipe.use_real and recipe.pseudo_from:
        add_pseudo_labels(raw, recipe, a.real, nprocs=a.threads)
        log.info("pseudo-labels done (%.0f s)", time.time() - t0)
    if "phantoms" in stages and recipe.phantoms > 0:
        export_phantoms(raw, recipe)
        log.info("phantom export done (%.0f s)", time.time() - t0)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    if not recipe.use_real:
        cases = [c for c in cases if not c.startswith("real")]
    if "plan" in stages:
        write_dataset_json(raw, len(cases))
        phantom_cases = [c for c in cases if c.startswith("phantom")]
        val = phantom_cases[-2:] if len(phantom_cases) > 4 else []
        plan_and_preprocess(work, recipe, val)
        log.info("planning + preprocessing done (%.0f s)", time.time() - t0)
    if "train" in stages:
        train(work, recipe, a.threads, a.cont)
        log.info("training done (%.0f s)", time.time() - t0)
    if "package" in stages:
        res = work / "results" / DATASET_NAME
        folders = sorted(res.glob(f"*__{PLANS_NAME}__{CONFIGURATION}"))
        if not folders:
            log.error("no trained results folder under %s", res)
            return 1
        package(folders[0], a.out, recipe, a.checkpoint)
        log.info("packaged into %s", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
