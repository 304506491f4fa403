"""``spineps evaluate``: compare predicted masks with (manually corrected) reference masks.

``add_arguments(parser)`` only declares options (pure: imports nothing heavy, touches no
file); ``run(args)`` does the work and returns an exit code, raising the typed errors of
:mod:`spineps.errors` for bad input. Examples::

    spineps evaluate REF_DERIV PRED_DERIV -o eval/
    spineps evaluate REF_DERIV PRED_DERIV --compare OTHER_DERIV -o eval/   # + Wilcoxon tests
    spineps evaluate --pair ref_dseg.nii.gz pred_dseg.nii.gz -o eval/
    spineps evaluate VB2_REFS PRED --annotated-classes 49 --endplates-as-body -o eval/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spineps.cli.argtypes import number

__all__ = ["add_arguments", "run", "DESCRIPTION"]

_probability = number(float, "a number in (0, 1)", low=0, high=1, low_open=True, high_open=True)
_threshold = number(float, "a number in (0, 1]", low=0, high=1, low_open=True)

DESCRIPTION = (
    "Evaluate predicted spine masks against reference masks (SPINEPS paper section 2.6): global Dice "
    "and ASSD per structure, instance-wise Dice / RQ / SQ / PQ (IoU >= 0.5), level-name accuracy; "
    "summaries; a paired Wilcoxon comparison of two methods with --compare. Masks are matched by "
    "their entity stem (..._desc-spine_dseg.nii.gz, ..._desc-vertebrae_dseg.nii.gz).")




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``spineps evaluate`` on ``parser`` (no side effects)."""
    parser.add_argument("reference", nargs="?", type=Path, metavar="REF_DIR",
                        help="folder of reference masks (a BIDS derivatives folder; searched recursively)")
    parser.add_argument("prediction", nargs="?", type=Path, metavar="PRED_DIR",
                        help="folder of predicted masks (e.g. this app's output_dir)")
    parser.add_argument("--pair", action="append", nargs="+", type=Path, metavar="FILE", default=None,
                        help="REF PRED [PRED2]: evaluate one file pair (repeatable; instead of the folders). "
                             "A name containing 'vert' is an instance mask, else a semantic mask")
    parser.add_argument("-o", "--output-dir", "--output_dir", dest="output_dir", type=Path, required=True,
                        metavar="DIR", help="where the tables go (created if needed)")
    parser.add_argument("--compare", type=Path, metavar="PRED2_DIR",
                        help="a second method's predictions: both are evaluated and compared per structure and "
                             "metric with the Wilcoxon signed-rank test")
    parser.add_argument("--name", default=None, metavar="NAME",
                        help="name of the method in PRED_DIR in the tables (default: the folder name)")
    parser.add_argument("--compare-name", "--compare_name", dest="compare_name", default=None, metavar="NAME",
                        help="name of the method in PRED2_DIR (default: the folder name)")
    parser.add_argument("--masks", nargs="+", choices=("spine", "vertebrae"), default=["spine", "vertebrae"],
                        help="which masks to evaluate: spine (semantic) and/or vertebrae (instances) (default both)")
    parser.add_argument("--annotated-classes", "--annotated_classes", dest="annotated_classes", default="auto",
                        metavar="auto|all|LIST",
                        help="classes the references annotate: 'auto' (default: the classes present in at least "
                             "one reference semantic mask), 'all', or a comma list of values or names "
                             "(e.g. 49 or 49,100 or vertebral_body); classes not annotated are ignored")
    parser.add_argument("--endplates-as-body", "--endplates_as_body", dest="endplates_as_body", action="store_true",
                        help="count endplates (52, 53, 62; instance 200+X) as vertebral body / vertebra X in "
                             "both masks, for references that label bodies with their endplates")
    parser.add_argument("--iou-threshold", "--iou_threshold", dest="iou_threshold", type=_threshold, default=0.5,
                        metavar="T", help="IoU an instance pair needs to be a true positive (default 0.5)")
    parser.add_argument("--alpha", type=_probability, default=0.05,
                        help="significance level of the Wilcoxon tests (default 0.05)")
    parser.add_argument("--no-surface-distances", "--no_surface_distances", dest="surface_distances",
                        action="store_false", help="skip ASSD / HD95 (faster)")
    if "-v" not in parser._option_string_actions and "--verbose" not in parser._option_string_actions:
        parser.add_argument("-v", "--verbose", dest="verbose", action="count", default=0, help="more log output")


def _method_name(given: object, folder: object, fallback: str) -> str:
    if given:
        return str(given)
    if folder is not None:
        name = Path(str(folder)).resolve().name
        if name:
            return name
    return fallback


def run(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args`` (from :func:`add_arguments`); 0 on success."""
    import logging

    from spineps.errors import UsageError
    from spineps.evaluate import run as ev

    log = logging.getLogger("spineps.evaluate")
    pairs = getattr(args, "pair", None) or []
    ref_dir = getattr(args, "reference", None)
    pred_dir = getattr(args, "prediction", None)
    compare_dir = getattr(args, "compare", None)
    masks = tuple(dict.fromkeys(getattr(args, "masks", None) or ev.MASK_KINDS))
    if pairs and (ref_dir is not None or pred_dir is not None):
        raise UsageError("give either REF_DIR PRED_DIR or --pair files, not both")
    if pairs and compare_dir is not None:
        raise UsageError("--compare needs folders; with --pair give a third file: --pair REF PRED PRED2")
    unmatched: list = []
    if pairs:
        first, second = ev.pair_files(pairs, masks)
        name_a = getattr(args, "name", None) or "prediction"
        name_b = getattr(args, "compare_name", None) or "comparison"
        if name_a == name_b:
            raise UsageError(f"the two methods need different names (both are {name_a!r})")
        cases = {name_a: first, **({name_b: second} if second else {})}
        all_cases = first
    else:
        if ref_dir is None or pred_dir is None:
            raise UsageError("give REF_DIR and PRED_DIR, or --pair REF PRED")
        name_a = _method_name(getattr(args, "name", None), pred_dir, "prediction")
        first, un_a = ev.pair_folders(ref_dir, pred_dir, masks, method=name_a)
        unmatched += un_a
        cases = {name_a: first}
        all_cases = list(first)
        if compare_dir is not None:
            name_b = _method_name(getattr(args, "compare_name", None), compare_dir, "comparison")
            if name_b == name_a:
                name_b = f"{name_b}_2"
            second, un_b = ev.pair_folders(ref_dir, compare_dir, masks, method=name_b)
            unmatched += un_b
            if not second:
                log.warning("%s: no mask matches a reference; nothing to compare", compare_dir)
            cases[name_b] = second
            all_cases = all_cases + [c for c in second if c.scan not in {x.scan for x in first}]
    for method, why, path in unmatched:
        log.warning("unmatched (%s): %s: %s", method, why, path)
    if not any(cases.values()):
        from spineps.errors import NoMatchError

        raise NoMatchError("no reference mask has a predicted partner (matched by entity stem, e.g. "
                           "sub-01_acq-sag_desc-spine_dseg.nii.gz)", ref_dir or pairs[0][0])
    annotation = ev.detect_annotation(all_cases, getattr(args, "annotated_classes", "auto") or "auto",
                                      endplates_as_body=bool(getattr(args, "endplates_as_body", False)))
    log.info("annotation: %s", annotation.rule)
    options = ev.EvalOptions(masks=masks, annotation=annotation,
                             endplates_as_body=bool(getattr(args, "endplates_as_body", False)),
                             threshold=float(getattr(args, "iou_threshold", 0.5)),
                             surface_metrics=bool(getattr(args, "surface_distances", True)))
    result = ev.evaluate(cases, options, unmatched=unmatched, alpha=float(getattr(args, "alpha", 0.05)))
    settings = {
        "reference": str(ref_dir) if ref_dir is not None else None,
        "predictions": {name_a: str(pred_dir) if pred_dir is not None else None,
                        **({n: str(compare_dir) for n in list(cases)[1:]} if compare_dir is not None else {})},
        "pairs": [[str(f) for f in p] for p in pairs],
        "masks": list(masks),
        "endplates_as_body": options.endplates_as_body,
        "iou_threshold": options.threshold,
        "alpha": float(getattr(args, "alpha", 0.05)),
        "surface_distances": options.surface_metrics,
    }
    written = ev.write_outputs(result, args.output_dir, settings=settings)
    n_scans = len({r.scan for r in result.rows})
    log.info("evaluated %d scan(s) of %s in %.1f s; tables in %s", n_scans, " and ".join(result.methods),
             result.seconds, Path(args.output_dir))
    for key, path in written.items():
        log.debug("wrote %s: %s", key, path)
    return 0
