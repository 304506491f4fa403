"""Command-line wiring of the training-data tools: ``spineps fuse``, ``spineps export-nnunet``
and ``spineps export-cutouts``.

``add_fuse_arguments`` / ``add_export_arguments`` only declare options (pure: nothing heavy
imported, no file touched); ``run_fuse`` / ``run_export`` do the work, return 0 and raise the
typed errors of :mod:`spineps.errors` for bad input. Examples::

    spineps fuse --source body_disc_canal.nii.gz:"1=49,2=100,3=61,4=26" \\
                 --source subreg.nii.gz:subregions --source cord.nii.gz:cord -o fused_dseg.nii.gz
    spineps export-nnunet --bids-dir BIDS --derivatives-dir DERIV -o nnUNet_raw --dataset-id 740 \\
                 --name MySpine --spacing 0.75 0.75 1.65 --n4 --crop-margin-mm 20
    spineps export-cutouts --pair spine_dseg.nii.gz vertebrae_dseg.nii.gz -o cutouts/ \\
                 --spacing 0.75 0.75 1.65 --cutout-size 248 304 64
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from spineps.cli.argtypes import nonneg_float as _nonneg_float
from spineps.cli.argtypes import positive_float as _positive_float

__all__ = ["add_fuse_arguments", "run_fuse", "add_export_arguments", "add_export_nnunet_arguments",
           "add_export_cutouts_arguments", "run_export", "FUSE_DESCRIPTION", "EXPORT_NNUNET_DESCRIPTION",
           "EXPORT_CUTOUTS_DESCRIPTION"]

log = logging.getLogger(__name__)

FUSE_DESCRIPTION = (
    "Fuse several automated label sources for one scan into one 14-structure semantic mask (SPINEPS section 2.2): "
    "sources are added in the given order and never overwrite a voxel of another structure, except that spinal "
    "cord replaces spinal canal; gaps between vertebral body and disc become endplate (62). Writes the mask "
    "atomically with a JSON sidecar recording the sources (paths, SHA-256, mappings), order and rule.")
EXPORT_NNUNET_DESCRIPTION = (
    "Export images and (fused or manual) semantic masks as an nnU-Net v2 raw dataset: imagesTr/labelsTr in one "
    "orientation/spacing, labels remapped to contiguous training indices, dataset.json (with nnU-Net's ignore "
    "label for partial annotations), subject-grouped splits_final.json and an inference_config.json template.")
EXPORT_CUTOUTS_DESCRIPTION = (
    "Export instance-phase training cutouts: around each vertebral body, the semantic cutout mapped to the "
    "network input values and the target 1/2/3 (vertebra above / centre / below), one .npz per cutout.")

_PRESET_HELP = "body-disc-canal, body, canal, cord, disc, sacrum, spine, subregions"




def _orientation(text: str) -> tuple[str, str, str]:
    t = text.strip().upper().replace(",", "")
    if len(t) != 3 or len({({"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}).get(c, -1) for c in t} - {-1}) != 3:
        raise argparse.ArgumentTypeError(f"orientation must name L/R, A/P and S/I once each (e.g. PIR), got {text!r}")
    return t[0], t[1], t[2]


# ------------------------------------------------------------------------------------ fuse
def add_fuse_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``spineps fuse`` on ``parser`` (no side effects)."""
    parser.add_argument("--source", action="append", required=True, metavar="FILE[:MAPPING]",
                        help="a label source, in priority order (repeatable; the first defines the grid). MAPPING "
                             "is SRC=DST pairs, e.g. '1=49,2=100,3=61,4=26' (DST may be a label name such as "
                             f"'body'), or a preset: {_PRESET_HELP}. Without MAPPING the file is taken as "
                             "already in the community values (preset spine)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE",
                        help="fused mask to write (.nii.gz); its sidecar goes beside it (.json)")
    parser.add_argument("--no-fill-endplates", dest="fill_endplates", action="store_false",
                        help="do not fill body/disc gaps with endplate (62)")
    parser.add_argument("--max-gap-mm", type=_positive_float, default=4.0, metavar="MM",
                        help="longest body/disc gap (along the cranio-caudal axis) filled as endplate (default 4)")
    parser.add_argument("--no-contact-endplates", dest="relabel_contacts", action="store_false",
                        help="do not turn body voxels that touch a disc directly into endplate")
    parser.add_argument("--cord-outside", choices=("extend", "clip"), default="extend",
                        help="cord voxels outside the canal: 'extend' keeps them where the voxel is background "
                             "(the canal is taken to extend around them), 'clip' drops them (default extend)")


def run_fuse(args: argparse.Namespace) -> int:
    """Run ``spineps fuse``; returns 0 (errors are raised as typed SpinepsErrors)."""
    from spineps.training.fuse import fuse_sources, parse_source_spec, write_fusion

    sources = [parse_source_spec(s) for s in args.source]
    result = fuse_sources(sources, fill_endplates=args.fill_endplates, max_gap_mm=args.max_gap_mm,
                          relabel_contacts=args.relabel_contacts, cord_outside=args.cord_outside)
    mask, side = write_fusion(result, args.output)
    log.info("fused %d source(s) into %s (sidecar %s)", len(sources), mask, side)
    return 0


# ------------------------------------------------------------------------------------ export
def add_export_nnunet_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spineps export-nnunet`` (no side effects)."""
    parser.set_defaults(export_kind="nnunet")
    parser.add_argument("--bids-dir", type=Path, metavar="DIR", help="BIDS dataset with the T2w images")
    parser.add_argument("--derivatives-dir", type=Path, metavar="DIR",
                        help="derivatives folder with the masks (<stem>_desc-<desc>_dseg.nii.gz)")
    parser.add_argument("--desc", default="spine", help="desc label of the masks (default spine)")
    parser.add_argument("--pair", action="append", nargs=2, type=Path, metavar=("IMAGE", "MASK"),
                        help="an image and its mask (repeatable; instead of the BIDS folders); the case name is "
                             "the image name without _T2w.nii.gz")
    parser.add_argument("-o", "--output-dir", dest="output_dir", type=Path, required=True, metavar="DIR",
                        help="nnU-Net raw folder ($nnUNet_raw); Dataset<ID>_<NAME>/ is created in it")
    parser.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1..999)")
    parser.add_argument("--name", required=True, help="dataset name (letters, digits, _ and -)")
    parser.add_argument("--orientation", type=_orientation, default=("P", "I", "R"),
                        help="axis codes of the exported arrays (default PIR, the released model's)")
    parser.add_argument("--spacing", type=_positive_float, nargs=3, metavar=("S0", "S1", "S2"),
                        help="resample to this spacing (mm per axis in --orientation order; default: keep)")
    parser.add_argument("--n4", action="store_true", help="N4 bias-field correction of the images")
    parser.add_argument("--crop-margin-mm", type=_nonneg_float, default=None, metavar="MM",
                        help="crop each case to the bounding box of its annotation plus this margin")
    parser.add_argument("--partial", type=str, default=None, metavar="VALUES",
                        help="the masks annotate only these structures (e.g. '49' or '49,100'): everything "
                             "else becomes nnU-Net's ignore label")
    parser.add_argument("--ignore-unannotated", action="store_true",
                        help="add nnU-Net's ignore label: unannotated voxels (value 255, unknown values) are "
                             "ignored in training (implied by --partial)")
    parser.add_argument("--folds", type=int, default=3, help="number of cross-validation folds (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    parser.add_argument("--preprocessed-dir", type=Path, metavar="DIR",
                        help="$nnUNet_preprocessed: also write splits_final.json where nnU-Net reads it")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing dataset folder")


def add_export_cutouts_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``spineps export-cutouts`` (no side effects)."""
    parser.set_defaults(export_kind="cutouts")
    parser.add_argument("--pair", action="append", nargs=2, type=Path, metavar=("SEMANTIC", "INSTANCE"),
                        help="a semantic mask and its instance mask (repeatable)")
    parser.add_argument("--derivatives-dir", type=Path, metavar="DIR",
                        help="instead of --pair: every *_desc-spine_dseg.nii.gz with a matching "
                             "*_desc-vertebrae_dseg.nii.gz under DIR")
    parser.add_argument("-o", "--output-dir", dest="output_dir", type=Path, required=True, metavar="DIR",
                        help="folder for the .npz cutouts")
    parser.add_argument("--model", type=Path, metavar="FOLDER",
                        help="take orientation, spacing, cutout_size and mapping from this instance model folder's "
                             "inference_config.json")
    parser.add_argument("--orientation", type=_orientation, default=None, help="axis codes (default PIR)")
    parser.add_argument("--spacing", type=_positive_float, nargs=3, metavar=("S0", "S1", "S2"),
                        help="model grid spacing (mm, in --orientation order; default 0.75 0.75 1.65)")
    parser.add_argument("--cutout-size", type=int, nargs=3, metavar=("N0", "N1", "N2"),
                        help="cutout size in voxels, multiples of 8 (default 248 304 64)")
    parser.add_argument("--no-raw", dest="keep_raw", action="store_false",
                        help="store only input and target (not the raw semantic/instance cutouts)")


def add_export_arguments(parser: argparse.ArgumentParser, kind: str = "nnunet") -> None:
    """Declare the options of ``spineps export-nnunet`` (``kind="nnunet"``) or
    ``spineps export-cutouts`` (``kind="cutouts"``) on ``parser``."""
    if kind == "nnunet":
        add_export_nnunet_arguments(parser)
    elif kind == "cutouts":
        add_export_cutouts_arguments(parser)
    else:
        raise ValueError(f"kind must be 'nnunet' or 'cutouts', got {kind!r}")


def _case_name(image: Path) -> str:
    name = image.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    for suffix in ("_T2w", "_dseg"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _run_export_nnunet(args: argparse.Namespace) -> int:
    from spineps.errors import UsageError
    from spineps.labels import resolve_label
    from spineps.training.export_nnunet import ExportPair, export_nnunet

    annotated = None
    if args.partial:
        try:
            annotated = tuple(resolve_label(t) for t in args.partial.split(",") if t.strip())
        except KeyError as exc:
            raise UsageError(f"--partial: unknown label {exc}") from None
    ignore = bool(args.ignore_unannotated or annotated)
    if args.pair:
        if args.bids_dir or args.derivatives_dir:
            raise UsageError("give either --pair or --bids-dir/--derivatives-dir, not both")
        pairs = [ExportPair(_case_name(img), img, mask, annotated=annotated) for img, mask in args.pair]
    else:
        if not (args.bids_dir and args.derivatives_dir):
            raise UsageError("export-nnunet needs --bids-dir and --derivatives-dir, or --pair IMAGE MASK")
        from spineps.training.export_nnunet import pairs_from_bids

        pairs = pairs_from_bids(args.bids_dir, args.derivatives_dir, desc=args.desc, annotated=annotated)
    folder = export_nnunet(pairs, args.output_dir, args.dataset_id, args.name, orientation=args.orientation,
                           spacing=args.spacing, n4=args.n4,
                           crop="label" if args.crop_margin_mm is not None else None,
                           crop_margin_mm=args.crop_margin_mm or 0.0, ignore_unannotated=ignore,
                           n_folds=args.folds, seed=args.seed, preprocessed_dir=args.preprocessed_dir,
                           overwrite=args.overwrite)
    log.info("nnU-Net dataset written to %s (%d cases)", folder, len(pairs))
    return 0


def _run_export_cutouts(args: argparse.Namespace) -> int:
    from spineps.errors import NoInputError, UsageError
    from spineps.geometry.io import load_volume
    from spineps.training.export_cutouts import export_cutouts, write_cutouts

    orientation, spacing, size, mapping = ("P", "I", "R"), (0.75, 0.75, 1.65), (248, 304, 64), None
    if args.model is not None:
        from spineps.models.folder import read_model_config

        cfg = read_model_config(args.model)
        orientation, spacing, size, mapping = cfg.orientation, cfg.spacing_min, cfg.cutout_size, cfg.mapping
    orientation = args.orientation or orientation
    spacing = tuple(args.spacing) if args.spacing else spacing
    size = tuple(args.cutout_size) if args.cutout_size else size
    pairs: list[tuple[Path, Path]] = [(Path(p[0]), Path(p[1])) for p in (args.pair or [])]
    if args.derivatives_dir is not None:
        if not args.derivatives_dir.is_dir():
            raise NoInputError("derivatives folder does not exist", args.derivatives_dir)
        for sem in sorted(args.derivatives_dir.rglob("*_desc-spine_dseg.nii.gz")):
            inst = sem.with_name(sem.name.replace("_desc-spine_dseg", "_desc-vertebrae_dseg"))
            if inst.is_file():
                pairs.append((sem, inst))
            else:
                log.info("no instance mask beside %s: skipped", sem)
    if not pairs:
        raise UsageError("export-cutouts needs --pair SEMANTIC INSTANCE or --derivatives-dir")
    total = 0
    for sem_p, inst_p in pairs:
        case = _case_name(sem_p).replace("_desc-spine", "")
        cutouts = export_cutouts(load_volume(sem_p, kind="label"), load_volume(inst_p, kind="label"),
                                 spacing=spacing, orientation=orientation, cutout_size=size, mapping=mapping,
                                 name=str(sem_p))
        total += len(write_cutouts(cutouts, args.output_dir, case, keep_raw=args.keep_raw))
    log.info("%d cutouts written to %s", total, args.output_dir)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Run ``spineps export-nnunet`` or ``spineps export-cutouts`` (by ``args.export_kind``)."""
    kind = getattr(args, "export_kind", "nnunet")
    if kind == "cutouts":
        return _run_export_cutouts(args)
    return _run_export_nnunet(args)
