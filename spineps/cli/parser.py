"""The command-line parsers. Pure: building or using them reads no file, creates no
folder and imports nothing heavy (no torch, no numpy), so ``--help`` and ``--version``
answer instantly.

Two usages share the ``spineps`` command:

- the BIDS-App: ``spineps bids_dir output_dir {participant,group} [options]``;
- tool subcommands, chosen by the first argument: ``spineps demo OUT_DIR [--subjects N]``.

Usage errors raise :class:`spineps.errors.UsageError` (exit 64) instead of argparse's
``sys.exit(2)`` (2 is reserved by the BIDS-Apps execution spec).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from spineps.cli.argtypes import nonneg_int as _nonneg_int
from spineps.cli.argtypes import positive_int as _positive_int
from spineps.cli.argtypes import vertebra_level as _vertebra_level
from spineps.errors import UsageError
from spineps.labels import LEVEL_RULES
from spineps.models.device import DEVICES
from spineps.models.onnx_engine import ENGINES
from spineps.models.precision import PRECISIONS
from spineps.settings import ANALYSIS_LEVELS, INSTANCE_MODEL_ENV, SEMANTIC_MODEL_ENV

__all__ = [
    "build_parser",
    "build_subcommand_parser",
    "SUBCOMMANDS",
    "ANALYSIS_LEVELS",
    "DEVICES",
    "SEMANTIC_MODEL_ENV",
    "INSTANCE_MODEL_ENV",
    "is_subcommand",
    "add_level_naming_arguments",
]

_PRECISION_HELP = ("network arithmetic on CPU: fp32, or bf16 (bfloat16 autocast, several times faster on CPUs with "
                   "native bfloat16, labels >= 99.9 %% the same); auto = bf16 where the CPU has native bfloat16, "
                   "else fp32. On CUDA nnU-Net's float16 autocast is used either way (default: auto)")
_ENGINE_HELP = ("what runs the network forward passes on CPU: torch, or onnxruntime (float32 only; the same labels "
                "as torch, several times faster); auto = onnxruntime for the semantic network when the precision is "
                "fp32, torch otherwise (default: auto)")
_NPROCS_HELP = ("CPUs this run may use in all: no thread pool of the process (torch, ONNX Runtime, N4, nnU-Net) "
                "uses more; the scans run one after the other in this one process (start several participant "
                "jobs to run scans in parallel). Default: the CPUs this process may use (affinity, SLURM masks)")
_OMP_HELP = ("threads of each parallel step (torch/OpenMP, ONNX Runtime, N4), at most --nprocs "
             "(default: --nprocs)")
#: tool subcommands (not BIDS-App runs), chosen when they are the first argument
SUBCOMMANDS = ("demo", "instance", "evaluate", "fuse", "export-nnunet", "export-cutouts")
#: subcommands whose arguments and runner live in their own (light) module:
#: name -> (module, add-arguments function, run function, extra keyword arguments, help)
TOOL_MODULES: dict[str, tuple[str, str, str, dict, str]] = {
    "evaluate": ("spineps.evaluate.cli", "add_arguments", "run", {},
                 "compare predicted derivatives with reference masks (Dice, ASSD, RQ/SQ/PQ, levels)"),
    "fuse": ("spineps.training.cli", "add_fuse_arguments", "run_fuse", {},
             "fuse several label sources into one 14-structure semantic mask"),
    "export-nnunet": ("spineps.training.cli", "add_export_arguments", "run_export", {"kind": "nnunet"},
                      "export images + masks as an nnU-Net v2 raw dataset (with splits)"),
    "export-cutouts": ("spineps.training.cli", "add_export_arguments", "run_export", {"kind": "cutouts"},
                       "export instance-phase training cutouts (labels 1/2/3)"),
}

_DESCRIPTION = """\
SPINEPS as a BIDS-App: whole-spine semantic and instance segmentation of sagittal T2w MRI.

usages:
  spineps bids_dir output_dir participant [options]   segment every sagittal T2w scan
  spineps bids_dir output_dir group [options]         tables from the participant outputs
  spineps demo OUT_DIR [--subjects N] [--seed S]      write a small phantom BIDS dataset
  spineps instance MASKS_DIR OUTPUT_DIR [options]     instance phase on existing semantic masks
  spineps evaluate REF_DIR PRED_DIR -o OUT [options]  metrics against reference masks
  spineps fuse --source FILE:MAPPING ... -o OUT        fuse label sources (training data)
  spineps export-nnunet / export-cutouts ...          training-data export for both phases
"""

_EPILOG = """\
exit codes: 0 success; 1 some scans failed (the others finished); 16 input failed BIDS
validation; 17 unknown analysis level; 18 labels or filters selected no files; 64 usage
error (also scans the semantic model's modality does not match); 65 bad input data (also an
unreadable input); 66 input missing; 73 output cannot be created (also a failed write); 75
temporary failure (memory, disk or quota full; also when every failed scan only lacked
memory or disk); 78 no usable model; 130/143 interrupted. 74 (I/O error) is not used.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ``UsageError`` (exit 64) instead of exiting with 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _version_string() -> str:
    # spineps.__version__ reads installed metadata (cheap, no heavy import)
    from spineps import __version__

    return f"spineps {__version__}"


class _VersionAction(argparse.Action):
    """Like argparse's ``version`` action, but the version is looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: Optional[str] = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        import sys

        parser._print_message(_version_string() + "\n", sys.stdout)
        parser.exit(0)




def _label(prefix: str) -> Callable[[str], str]:
    """Accept labels with or without their ``sub-``/``ses-`` prefix; return them bare."""

    def parse(text: str) -> str:
        bare = text[len(prefix):] if text.startswith(prefix) else text
        if not bare or not bare.isalnum():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a valid label (letters and digits, optionally prefixed with '{prefix}')")
        return bare

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The BIDS-App parser: ``bids_dir output_dir {participant,group}`` and options."""
    p = _Parser(
        prog="spineps",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset (read only; never written)")
    p.add_argument("output_dir", type=Path,
                   help="where the derivatives go (must not lie inside bids_dir, except under bids_dir/derivatives/)")
    # no argparse `choices` here: an unknown level is exit 17, not a usage error
    p.add_argument("analysis_level", metavar="{participant,group}",
                   help="participant: segment scans; group: collect the participant outputs into tables")
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")

    _add_input_arguments(p)
    _add_resource_arguments(p)
    _add_model_arguments(p)
    add_level_naming_arguments(p)

    o = p.add_argument_group("run behaviour")
    o.add_argument("--overwrite", action="store_true",
                   help="recompute scans whose outputs are complete (default: skip them)")
    o.add_argument("--no-n4", "--no_n4", dest="no_n4", action="store_true",
                   help="skip N4 bias-field correction before the semantic phase")
    o.add_argument("--stop-on-first-crash", "--stop_on_first_crash", dest="stop_on_first_crash", action="store_true",
                   help="stop at the first scan that fails (the scans not attempted are listed; default: log the "
                        "failure, go on with the other scans)")
    o.add_argument("--tta", action="store_true",
                   help="test-time augmentation: the semantic phase also predicts on mirrored copies and averages, "
                        "along the axes the model allows (its checkpoint's inference_allowed_mirroring_axes; a "
                        "model without them is run without, with a warning); about 4-8x the semantic network's "
                        "time on CPU (default: off)")
    o.add_argument("--save-probabilities", "--save_probabilities", dest="save_probabilities", action="store_true",
                   help="also write the semantic network's class probabilities per scan: a 4D "
                        "_desc-spine_probseg.nii.gz on the scan's grid, one volume per class, 16-bit fixed point "
                        "(NIfTI has no float16; 2 bytes per value) (default: off)")
    o.add_argument("-v", "--verbose", dest="verbose", action="count", default=0,
                   help="more log output (-v debug messages; -vv also tracebacks)")
    return p


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selecting inputs")
    g.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+",
                   type=_label("sub-"), metavar="LABEL",
                   help="subjects to process, with or without 'sub-' (default: all)")
    g.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                   type=_label("ses-"), metavar="LABEL",
                   help="sessions to process, with or without 'ses-' (default: all)")
    g.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filter_file", type=Path, metavar="FILE",
                   help='JSON file of pybids filters, e.g. {"t2w": {"acquisition": "sag"}}; '
                        'null means "entity absent", "*" means "any value"')
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
                   action="store_true", help="do not validate the input dataset")


def _add_resource_arguments(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("resources")
    r.add_argument("-w", "--work-dir", "--work_dir", dest="work_dir", type=Path, metavar="DIR",
                   help="folder for intermediate files (the pybids index, removed after indexing); must not "
                        "lie inside bids_dir (default: none, the index is kept in memory)")
    r.add_argument("--nprocs", "--n-cpus", "--n_cpus", dest="nprocs", type=_positive_int, metavar="N",
                   help=_NPROCS_HELP)
    r.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=_positive_int, metavar="N",
                   help=_OMP_HELP)
    add_mem_argument(r)
    r.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the networks run; auto picks CUDA when available, else CPU (default: auto)")
    r.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help=_PRECISION_HELP)
    r.add_argument("--engine", choices=ENGINES, default="auto", help=_ENGINE_HELP)


def add_mem_argument(p: Any) -> None:
    """``--mem-mb`` (the BIDS-App and ``spineps instance``)."""
    p.add_argument("--mem-mb", "--mem_mb", dest="mem_mb", type=_positive_int, metavar="MB",
                   help="memory budget in MB: the per-scan resource check compares its estimate with this "
                        "instead of the memory detected (MemAvailable, cgroup limit); default: detected")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("models")
    m.add_argument("--semantic-model", "--semantic_model", dest="semantic_model", type=Path, metavar="DIR",
                   help=f"semantic (nnU-Net) model folder (default: ${SEMANTIC_MODEL_ENV}, else the bundled model)")
    m.add_argument("--instance-model", "--instance_model", dest="instance_model", type=Path, metavar="DIR",
                   help=f"instance (cutout U-Net) model folder (default: ${INSTANCE_MODEL_ENV}, "
                        "else the bundled model; without one only the semantic mask is written)")
    m.add_argument("--allow-unsafe-checkpoints", "--allow_unsafe_checkpoints", dest="allow_unsafe_checkpoints",
                   action="store_true",
                   help="RISK: load a semantic checkpoint that the safe loader (torch.load weights_only=True) "
                        "refuses by unpickling it in full, which runs any Python code the file holds, with your "
                        "rights. Only for a model folder from a source you trust completely (default: such a "
                        "checkpoint is refused, exit 78)")
    m.add_argument("--allow-modality-mismatch", "--allow_modality_mismatch", dest="allow_modality_mismatch",
                   action="store_true",
                   help="segment scans whose suffix (e.g. T1w, selected by a --bids-filter-file) is not a modality "
                        "of the semantic model (its inference_config.json 'modality', T2w for the SPINEPS T2w "
                        "models): their masks come from a model that never saw such images (default: such a "
                        "selection is refused, exit 64)")


def add_level_naming_arguments(p: argparse.ArgumentParser) -> None:
    """``--level-rule`` and ``--top-vertebra`` (shared by the BIDS-App and ``spineps instance``)."""
    n = p.add_argument_group("level naming")
    n.add_argument("--level-rule", "--level_rule", dest="level_rule", choices=LEVEL_RULES, default="auto",
                   help="how vertebrae get their names: auto combines every cue (sacrum in view -> the vertebra "
                        "above is L5 or L6; C2 shape at the top; costal-process cues; body sizes); the others "
                        "force one cue (count-from-top: top vertebra = C2, the reference behaviour; "
                        "count-from-bottom: bottom vertebra = L5). The rule used is recorded in the sidecar "
                        "(default: auto)")
    n.add_argument("--top-vertebra", "--top_vertebra", dest="top_vertebra", type=_vertebra_level, metavar="LEVEL",
                   help="the top-most vertebra in view is LEVEL (e.g. T12): overrides every rule, for cohorts "
                        "with a known field of view")


def build_subcommand_parser() -> argparse.ArgumentParser:
    """The tool subcommands (not BIDS-App runs): ``spineps demo OUT_DIR``."""
    p = _Parser(prog="spineps", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False)
    p.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    demo = sub.add_parser("demo", help="write a small phantom BIDS dataset to try the app on",
                          description="Write a small phantom BIDS dataset (sagittal T2w scans) to OUT_DIR.")
    demo.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to create the dataset in")
    demo.add_argument("--subjects", type=_positive_int, default=3, metavar="N", help="number of subjects (default 3)")
    demo.add_argument("--seed", type=_nonneg_int, default=0, metavar="S", help="random seed (default 0)")
    demo.add_argument("-v", "--verbose", dest="verbose", action="count", default=0, help="more log output")
    add_instance_arguments(sub.add_parser(
        "instance", help="the instance phase on existing semantic masks (no image needed)",
        description=_INSTANCE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    import importlib

    for name, (module, adder, _runner, kwargs, help_text) in TOOL_MODULES.items():
        tool = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), adder)(tool, **kwargs)
    return p


_INSTANCE_DESCRIPTION = """\
The instance phase on its own: vertebra instances, disc and endplate assignment, level names,
centroids, morphometry and the QC figure from existing semantic masks -- the outputs of a
participant run (same names, same derivatives), without an image.

The masks hold the community label values (41-48 vertebra processes, 49 vertebral body,
52/53/62 endplates, 60 cord, 61 canal, 100 discs, 26 sacrum; see desc-spine_dseg.tsv) and
BIDS-like names that start with sub-<label>. Entities that describe the mask (desc, seg,
label, mod) are left out of the output names. Masks from our semantic phase match the
default --pattern; for others, e.g. manual ones named sub-01/anat/sub-01_desc-manual_dseg.nii.gz:
  spineps instance manual/ out/ --pattern 'sub-*/**/*_desc-manual_dseg.nii.gz'
Then `spineps MASKS_DIR OUTPUT_DIR group` summarises them like any participant run.
"""


def add_instance_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``spineps instance MASKS_DIR OUTPUT_DIR``."""
    p.add_argument("masks_dir", type=Path, metavar="MASKS_DIR",
                   help="folder of semantic masks, e.g. the derivatives of an earlier run (read only)")
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR",
                   help="where the derivatives go (not MASKS_DIR itself, nor inside it)")
    p.add_argument("--pattern", default=None, metavar="GLOB",
                   help="which files under MASKS_DIR are the semantic masks ('**' spans folders; "
                        "default: 'sub-*/**/*_desc-spine_dseg.nii*')")
    p.add_argument("--participant-label", "--participant_label", dest="participant_label", nargs="+",
                   type=_label("sub-"), metavar="LABEL", help="subjects to process (default: all)")
    p.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                   type=_label("ses-"), metavar="LABEL", help="sessions to process (default: all)")
    p.add_argument("--instance-model", "--instance_model", dest="instance_model", type=Path, metavar="DIR",
                   help=f"instance (cutout U-Net) model folder (default: ${INSTANCE_MODEL_ENV}, else the bundled "
                        "model)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where the network runs (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=_PRECISION_HELP)
    p.add_argument("--engine", choices=ENGINES, default="auto", help=_ENGINE_HELP)
    p.add_argument("--nprocs", "--n-cpus", "--n_cpus", dest="nprocs", type=_positive_int, metavar="N",
                   help=_NPROCS_HELP)
    p.add_argument("--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=_positive_int, metavar="N",
                   help=_OMP_HELP)
    add_level_naming_arguments(p)
    add_mem_argument(p)
    p.add_argument("--stop-on-first-crash", "--stop_on_first_crash", dest="stop_on_first_crash", action="store_true",
                   help="stop at the first mask that fails (default: go on with the others)")
    p.add_argument("--overwrite", action="store_true", help="recompute masks whose outputs are complete")
    p.add_argument("-v", "--verbose", dest="verbose", action="count", default=0,
                   help="more log output (-v debug messages; -vv also tracebacks)")


def is_subcommand(argv: Sequence[str]) -> bool:
    """True when ``argv`` asks for a tool subcommand rather than a BIDS-App run."""
    return bool(argv) and argv[0] in SUBCOMMANDS
