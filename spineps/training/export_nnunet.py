"""Export image/mask pairs as an nnU-Net v2 raw dataset for the semantic phase.

    export_nnunet(pairs, out_raw_dir, 740, "MySpine", spacing=(0.75, 0.75, 1.65), n4=True)
    export_nnunet(None, out_raw_dir, 740, "MySpine", bids_dir=raw, derivatives_dir=deriv)

Writes ``out_raw_dir/Dataset<ID>_<name>/``:

- ``imagesTr/<case>_0000.nii.gz`` (float32) and ``labelsTr/<case>.nii.gz`` (uint8), both on
  one grid: reoriented to ``orientation`` (exact permutation/flip), optionally resampled to
  ``spacing`` (mm per axis *in that orientation*; cubic for the image, nearest for the
  label), optionally cropped to the bounding box of the annotation plus ``crop_margin_mm``.
  The image is always range-normalised as the reference does before its model
  (``spineps.semantic.preprocess.normalize_range``) and, with ``n4=True``, N4-corrected on
  its own grid first (``preprocess_image``).
- label values remapped to contiguous training indices: background 0, then
  ``label_values`` in order (default the 14 structures in the order of the bundled model:
  41..48, 49, 60, 61, 62, 100, 26) as 1..14; split endplates 52/53 count as 62.
- ``dataset.json``: channel names, ``labels`` (``{"background": 0, ..., "ignore": K}`` with
  the ignore label the highest index when ``ignore_unannotated``), ``numTraining``,
  ``file_ending``, plus our ``spineps`` block (index -> value, orientation, spacing).
- ``splits_final.json``: ``n_folds`` reproducible folds (``seed``), grouped by subject so that
  sessions of one subject never straddle train and validation. nnU-Net reads it from
  ``$nnUNet_preprocessed/Dataset<ID>_<name>/splits_final.json``: copy it there after
  ``nnUNetv2_plan_and_preprocess`` (or pass ``preprocessed_dir`` and it is written there too).
- ``inference_config.json`` template (``spineps_inference_config.json``): the network output
  index -> label value mapping, orientation, spacing and folds, so a model trained on the
  export is packaged by copying it as ``inference_config.json`` next to ``plans.json``,
  ``dataset.json`` and ``fold_<k>/``.
- ``export_report.json``: per case the source files, grids and label voxel counts.

Partial annotations (``ignore_unannotated=True``): a pair whose ``annotated`` names the
structures that were annotated marks every other voxel (background included) as *ignore*;
in any pair, voxels of :data:`UNANNOTATED_VALUE` (255) and values outside ``label_values``
are ignore too. With ``ignore_unannotated=False`` such values raise ``InputError``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np

from spineps.errors import InputError, NoInputError, UsageError
from spineps.geometry.volume import Volume

__all__ = [
    "ExportPair",
    "DEFAULT_LABEL_VALUES",
    "UNANNOTATED_VALUE",
    "MERGED_VALUES",
    "pairs_from_bids",
    "label_lut",
    "make_splits",
    "prepare_case",
    "inference_config_template",
    "export_nnunet",
    "dataset_folder_name",
]

log = logging.getLogger(__name__)

#: training index i (1-based) -> community value; the order of the bundled semantic model
DEFAULT_LABEL_VALUES: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48, 49, 60, 61, 62, 100, 26)
#: a label-map value meaning "not annotated" (-> nnU-Net's ignore label)
UNANNOTATED_VALUE = 255
#: values counted as another before the remap (post-processed split endplates -> endplate)
MERGED_VALUES: dict[int, int] = {52: 62, 53: 62}
_CASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

PathOrVolume = Union[str, Path, Volume]


@dataclass
class ExportPair:
    """One training case. ``image``/``label`` are files or in-memory volumes. ``annotated``:
    the community values that were annotated in this scan (None: fully annotated). ``group``:
    the unit kept together by the splits (default: the ``sub-XX`` prefix of the name, or the
    name)."""

    name: str
    image: PathOrVolume
    label: PathOrVolume
    annotated: Optional[tuple[int, ...]] = None
    group: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _CASE_RE.match(self.name):
            raise UsageError(f"case name {self.name!r} must be letters, digits, '_', '-', '.'")
        if self.group is None:
            m = re.match(r"^(sub-[A-Za-z0-9]+)", self.name)
            self.group = m.group(1) if m else self.name
        if self.annotated is not None:
            self.annotated = tuple(int(v) for v in self.annotated)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not (0 < int(dataset_id) < 1000):
        raise UsageError(f"nnU-Net dataset ids are 1..999, got {dataset_id}")
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise UsageError(f"dataset name {name!r} must be letters, digits, '_' or '-'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def pairs_from_bids(bids_dir: Union[str, Path], derivatives_dir: Union[str, Path], *, desc: str = "spine",
                    participant_labels: Optional[Sequence[str]] = None, annotated: Optional[tuple[int, ...]] = None,
                    ) -> list[ExportPair]:
    """Every sagittal T2w scan of ``bids_dir`` (``discover_scans``) that has a
    ``..._desc-<desc>_dseg.nii.gz`` mask in ``derivatives_dir`` (a fused or manual mask, BIDS
    derivative naming). Scans without a mask are skipped with a log line; none at all raises
    ``NoInputError``."""
    from spineps.bids.derivatives import derivative_path
    from spineps.bids.discovery import discover_scans

    found = discover_scans(bids_dir, participant_labels=participant_labels)
    pairs: list[ExportPair] = []
    for scan in found.scans:
        mask = derivative_path(derivatives_dir, scan, desc)
        if not mask.is_file():
            log.info("no %s mask for %s (looked for %s): skipped", desc, scan.relpath, mask)
            continue
        pairs.append(ExportPair(scan.stem, scan.path, mask, annotated=annotated, group=f"sub-{scan.subject}"))
    if not pairs:
        raise NoInputError(f"no scan of {bids_dir} has a desc-{desc} mask", derivatives_dir)
    return pairs


def label_lut(label_values: Sequence[int], ignore_index: Optional[int], max_value: int) -> np.ndarray:
    """Lookup table community value -> training index (0 background; unknown values ->
    ``ignore_index``, or 255 as a marker when there is no ignore label)."""
    unknown = 255 if ignore_index is None else ignore_index
    lut = np.full(max(max_value, 255) + 1, unknown, dtype=np.uint8)
    lut[0] = 0
    for i, v in enumerate(label_values, start=1):
        lut[v] = i
    for src, dst in MERGED_VALUES.items():
        if dst in label_values and src not in label_values:
            lut[src] = label_values.index(dst) + 1
    return lut


def make_splits(cases: Sequence[str], groups: Sequence[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """``n_folds`` train/val splits, whole groups per fold, reproducible in ``seed``; fold k's
    validation cases are the groups at positions k, k + n, ... of a seeded shuffle."""
    if n_folds < 2:
        raise UsageError(f"n_folds must be at least 2, got {n_folds}")
    uniq = sorted(set(groups))
    if len(uniq) < n_folds:
        raise UsageError(f"{n_folds} folds need at least {n_folds} subjects (groups), got {len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {uniq[j]: k % n_folds for k, j in enumerate(order)}
    splits = []
    for k in range(n_folds):
        val = sorted(c for c, g in zip(cases, groups) if fold_of[g] == k)
        train = sorted(c for c, g in zip(cases, groups) if fold_of[g] != k)
        splits.append({"train": train, "val": val})
    return splits


def _load(obj: PathOrVolume, kind: Literal["image", "label"]) -> Volume:
    if isinstance(obj, Volume):
        return obj
    from spineps.geometry.io import load_volume

    return load_volume(Path(obj), kind=kind)


@dataclass
class PreparedCase:
    image: Volume
    label: Volume  # training indices
    info: dict[str, Any]


def prepare_case(pair: ExportPair, *, orientation: Sequence[str], spacing: Optional[Sequence[float]],
                 n4: bool, crop: Optional[str], crop_margin_mm: float, label_values: Sequence[int],
                 ignore_index: Optional[int]) -> PreparedCase:
    """One case on its training grid: image (float32) and label (uint8 training indices)."""
    from spineps.geometry.cropping import bbox_of, crop_to_bbox
    from spineps.geometry.orientation import to_orientation
    from spineps.geometry.resampling import resample_to_grid, to_spacing
    from spineps.semantic.preprocess import preprocess_image

    where_img = pair.image if not isinstance(pair.image, Volume) else pair.name
    where_lab = pair.label if not isinstance(pair.label, Volume) else pair.name
    image = _load(pair.image, "image")
    label = _load(pair.label, "label")
    info: dict[str, Any] = {"image": str(where_img), "label": str(where_lab),
                            "input_shape": list(image.shape), "input_spacing": [round(s, 4) for s in image.spacing],
                            "input_axcodes": list(image.axcodes)}
    if not label.same_grid(image, atol=1e-3):
        if label.shape == image.shape and np.allclose(label.affine, image.affine, atol=0.05):
            label = Volume(label.data, image.affine)
        else:
            log.warning("%s: label is on another grid than the image; resampled (nearest)", pair.name)
            label = resample_to_grid(label, image.shape, image.affine, order=0, fill=0)
            info["label_resampled"] = True
    raw = np.asarray(label.data).astype(np.int64, copy=False)
    if raw.min(initial=0) < 0:
        raise InputError("label map holds negative values", where_lab)
    lut = label_lut(label_values, ignore_index, int(raw.max(initial=0)))
    idx = lut[raw]
    unknown = idx == (255 if ignore_index is None else ignore_index)
    unknown &= raw != 0
    if ignore_index is None and unknown.any():
        vals = sorted(int(v) for v in np.unique(raw[unknown]))
        raise InputError(f"label values {vals} are not among the exported labels {list(label_values)} "
                         "(pass ignore_unannotated=True to train them as nnU-Net's ignore label)", where_lab)
    annotated_mask = (idx != 0) & ~unknown
    if pair.annotated is not None:
        if ignore_index is None:
            raise UsageError(f"case {pair.name} is partially annotated; that needs ignore_unannotated=True")
        ann_idx = label_lut(label_values, ignore_index, 255)[
            [MERGED_VALUES.get(v, v) for v in pair.annotated if 0 < v < 256]]
        keep = np.isin(idx, ann_idx)
        idx = np.where(keep, idx, ignore_index).astype(np.uint8)
        annotated_mask = keep
    image = preprocess_image(image, n4=n4)
    image, _ = to_orientation(image, orientation)
    lab_vol, _ = to_orientation(Volume(idx.astype(np.uint8), label.affine), orientation)
    ann_vol, _ = to_orientation(Volume(annotated_mask.astype(np.uint8), label.affine), orientation)
    if spacing is not None:
        image = to_spacing(image, spacing, order=3)
        image = image.with_data(np.clip(image.data, 0, None).astype(np.float32))
        lab_vol = resample_to_grid(lab_vol, image.shape, image.affine, order=0)
        ann_vol = resample_to_grid(ann_vol, image.shape, image.affine, order=0)
    if crop == "label":
        margin = tuple(int(np.ceil(crop_margin_mm / s)) for s in image.spacing)
        box = bbox_of(ann_vol.data, margin)
        if box is None:
            raise InputError("label map has no annotated voxel to crop to", where_lab)
        image, _ = crop_to_bbox(image, box)
        lab_vol, _ = crop_to_bbox(lab_vol, box)
        info["crop_bbox"] = [[s.start, s.stop] for s in box]
    elif crop is not None:
        raise UsageError(f"crop must be None or 'label', got {crop!r}")
    counts = np.bincount(lab_vol.data.ravel(), minlength=1)
    info.update({"shape": list(image.shape), "spacing": [round(s, 4) for s in image.spacing],
                 "axcodes": list(image.axcodes),
                 "index_voxels": {str(i): int(c) for i, c in enumerate(counts) if c}})
    return PreparedCase(image, lab_vol, info)


def inference_config_template(name: str, label_values: Sequence[int], orientation: Sequence[str],
                              spacing: Sequence[float], n_folds: int, modality: str = "T2w") -> dict[str, Any]:
    """An ``inference_config.json`` for a model trained on the export (read by
    ``spineps.models.folder.read_model_config``). The ignore label is no network output."""
    return {
        "log_name": name,
        "modality": modality,
        "acquisition": "sag",
        "modeltype": "nnunet",
        "model_expected_orientation": [str(c) for c in orientation],
        "available_folds": int(n_folds),
        "inference_augmentation": False,
        "resolution_range": [round(float(s), 6) for s in spacing],
        "default_step_size": 0.5,
        "labels": {"0": 0, **{str(i): int(v) for i, v in enumerate(label_values, start=1)}},
        "expected_inputs": ["img"],
        "has_c1": False,
    }


def _label_name(value: int) -> str:
    from spineps.labels import SEMANTIC_BY_VALUE

    lab = SEMANTIC_BY_VALUE.get(int(value))
    return lab.name.replace(" ", "_") if lab is not None else f"label_{value}"


def export_nnunet(pairs: Optional[Sequence[ExportPair]], out_raw_dir: Union[str, Path], dataset_id: int, name: str,
                  *, bids_dir: Optional[Union[str, Path]] = None, derivatives_dir: Optional[Union[str, Path]] = None,
                  desc: str = "spine", orientation: Sequence[str] = ("P", "I", "R"),
                  spacing: Optional[Sequence[float]] = None, n4: bool = False, crop: Optional[str] = None,
                  crop_margin_mm: float = 20.0, ignore_unannotated: bool = False,
                  label_values: Sequence[int] = DEFAULT_LABEL_VALUES, n_folds: int = 3, seed: int = 0,
                  channel_name: str = "T2", modality: str = "T2w",
                  preprocessed_dir: Optional[Union[str, Path]] = None, overwrite: bool = False) -> Path:
    """Write the nnU-Net v2 raw dataset (see the module docstring); returns its folder.

    ``pairs`` or (``bids_dir`` and ``derivatives_dir``) give the cases. An existing dataset
    folder with other content raises ``OutputError`` unless ``overwrite``. Every file is
    written atomically."""
    from spineps.errors import OutputError
    from spineps.fsutil import write_json_atomic
    from spineps.geometry.io import save_volume

    if pairs is None:
        if bids_dir is None or derivatives_dir is None:
            raise UsageError("export_nnunet needs pairs, or bids_dir and derivatives_dir")
        pairs = pairs_from_bids(bids_dir, derivatives_dir, desc=desc)
    pairs = list(pairs)
    if not pairs:
        raise NoInputError("no cases to export", out_raw_dir)
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"case names must be unique, repeated: {dup}")
    label_values = tuple(int(v) for v in label_values)
    if len(set(label_values)) != len(label_values) or any(not (0 < v < 255) for v in label_values):
        raise UsageError(f"label_values must be distinct values in 1..254, got {label_values}")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise UsageError(f"spacing must be three positive numbers, got {spacing}")
    ignore_index = len(label_values) + 1 if ignore_unannotated else None
    folder = Path(out_raw_dir) / dataset_folder_name(dataset_id, name)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise OutputError("dataset folder exists and is not empty (pass overwrite=True)", folder)
    splits = make_splits(names, [str(p.group) for p in pairs], n_folds, seed)

    report: dict[str, Any] = {"cases": {}}
    spacings = []
    for pair in pairs:
        case = prepare_case(pair, orientation=orientation, spacing=spacing, n4=n4, crop=crop,
                            crop_margin_mm=crop_margin_mm, label_values=label_values, ignore_index=ignore_index)
        save_volume(case.image, folder / "imagesTr" / f"{pair.name}_0000.nii.gz", dtype=np.float32)
        save_volume(case.label, folder / "labelsTr" / f"{pair.name}.nii.gz", dtype=np.uint8)
        report["cases"][pair.name] = {**case.info, "group": pair.group,
                                      "annotated": list(pair.annotated) if pair.annotated else "all"}
        spacings.append(case.image.spacing)
        log.info("exported %s %s", pair.name, case.image.shape)

    # with overwrite: cases of an earlier export that are not in this one would break numTraining
    expected = {f"{n}_0000.nii.gz" for n in names} | {f"{n}.nii.gz" for n in names}
    for sub in ("imagesTr", "labelsTr"):
        for old in (folder / sub).glob("*.nii.gz"):
            if old.name not in expected:
                log.warning("removing %s (not a case of this export)", old)
                old.unlink()
    labels = {"background": 0, **{_label_name(v): i for i, v in enumerate(label_values, start=1)}}
    if ignore_index is not None:
        labels["ignore"] = ignore_index
    target_spacing = spacing if spacing is not None else tuple(float(x) for x in np.median(np.array(spacings), axis=0))
    dataset = {
        "channel_names": {"0": channel_name},
        "labels": labels,
        "numTraining": len(pairs),
        "file_ending": ".nii.gz",
        "name": name,
        "description": "exported by spineps.training.export_nnunet",
        "spineps": {"index_to_value": {str(i): v for i, v in enumerate(label_values, start=1)},
                    "orientation": list(orientation), "spacing": list(target_spacing), "n4": n4,
                    "crop": crop, "crop_margin_mm": crop_margin_mm if crop else None,
                    "ignore_index": ignore_index, "unannotated_value": UNANNOTATED_VALUE,
                    "merged_values": {str(k): v for k, v in MERGED_VALUES.items()}},
    }
    write_json_atomic(folder / "dataset.json", dataset)
    write_json_atomic(folder / "splits_final.json", splits)
    if preprocessed_dir is not None:
        write_json_atomic(Path(preprocessed_dir) / folder.name / "splits_final.json", splits)
    cfg = inference_config_template(name, label_values, orientation, target_spacing, n_folds, modality)
    write_json_atomic(folder / "spineps_inference_config.json", cfg)
    report.update({"dataset_id": int(dataset_id), "name": name, "n_folds": n_folds, "seed": seed,
                   "splits_note": "nnU-Net reads splits_final.json from $nnUNet_preprocessed/" + folder.name +
                                  "/: copy it there after nnUNetv2_plan_and_preprocess"})
    write_json_atomic(folder / "export_report.json", report)
    return folder
