"""The app's Boutiques descriptor, generated from ``build_parser()`` so the two cannot drift.

    python -m spineps.cli.boutiques [-o boutiques/spineps.json]

The descriptor follows the BIDS-Apps template of Boutiques (``bosh validate --bids``): the
command line starts ``mkdir -p [OUTPUT_DIR]; spineps [BIDS_DIR] [OUTPUT_DIR]
[ANALYSIS_LEVEL] [PARTICIPANT_LABEL] [SESSION_LABEL]``, the output directory is an input
both as a new folder name (participant level) and as an existing folder (group level), and
the one output is that folder. Every other option of the parser becomes an input of its own
(flags, choices, integers, lists, files). The ``custom`` block carries the BIDS-App fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["descriptor", "main"]

_REPOSITORY = "https://github.com/spineps/spineps"
_CONTAINER = "spineps/spineps"
_FIXED = {"bids_dir", "output_dir", "analysis_level", "participant_label", "session_label"}
#: options that name folders or files that must exist (Boutiques type File)
_EXISTING_PATHS = {"bids_filter_file", "semantic_model", "instance_model"}


def _flag(action: argparse.Action) -> str:
    """The option string a descriptor uses: the BIDS-Apps underscore spelling when the parser
    has one (``--participant_label``), else the first long option."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    if not longs:
        return action.option_strings[0]
    if "-" in longs[0][2:]:
        under = [s for s in longs if "_" in s]
        return (under or longs)[0]
    return longs[0]


def _value_key(dest: str) -> str:
    return f"[{dest.upper()}]"


def _input(action: argparse.Action) -> dict[str, Any]:
    from spineps.cli.argtypes import positive_int

    entry: dict[str, Any] = {"id": action.dest, "name": action.dest.replace("_", " ").capitalize(),
                             "description": (action.help or "").replace("%%", "%"),
                             "value-key": _value_key(action.dest), "optional": not action.required,
                             "command-line-flag": _flag(action)}
    if isinstance(action, argparse._StoreTrueAction):
        entry["type"] = "Flag"
        return entry
    if isinstance(action, argparse._CountAction):
        # -v / -vv: one flag in the descriptor (the first level of verbosity)
        entry["type"] = "Flag"
        return entry
    if action.choices:
        entry["type"] = "String"
        entry["value-choices"] = list(action.choices)
    elif action.type is int or action.type is positive_int or getattr(action.type, "__name__", "") == "nonneg_int":
        entry["type"] = "Number"
        entry["integer"] = True
        entry["minimum"] = 1 if action.type is positive_int else 0
    elif action.dest in _EXISTING_PATHS:
        entry["type"] = "File"
    else:
        entry["type"] = "String"
    if action.nargs in ("+", "*"):
        entry["list"] = True
    if action.default not in (None, argparse.SUPPRESS, False) and entry["type"] != "Flag":
        entry["default-value"] = action.default
    return entry


def descriptor(parser: Optional[argparse.ArgumentParser] = None) -> dict[str, Any]:
    """The Boutiques descriptor (schema 0.5) of ``parser`` (default: ``build_parser()``)."""
    from spineps import __version__
    from spineps.cli.parser import build_parser
    from spineps.settings import ANALYSIS_LEVELS

    p = parser or build_parser()
    actions = [a for a in p._actions
               if not isinstance(a, argparse._HelpAction) and a.dest not in (argparse.SUPPRESS, "help")
               and a.option_strings != ["--version"]]
    by_dest = {a.dest: a for a in actions}
    inputs: list[dict[str, Any]] = [
        {"id": "bids_dir", "name": "BIDS directory", "type": "File", "value-key": "[BIDS_DIR]", "optional": False,
         "description": by_dest["bids_dir"].help or ""},
        {"id": "output_dir_name", "name": "Output directory name", "type": "String", "value-key": "[OUTPUT_DIR]",
         "optional": True, "description": (by_dest["output_dir"].help or "") + " (participant level)"},
        {"id": "participant_level_analysis_dir", "name": "Participant outputs", "type": "File",
         "value-key": "[OUTPUT_DIR]", "optional": True,
         "description": "the output directory of the participant level (group level)"},
        {"id": "analysis_level", "name": "Analysis level", "type": "String", "value-key": "[ANALYSIS_LEVEL]",
         "optional": False, "value-choices": list(ANALYSIS_LEVELS),
         "description": by_dest["analysis_level"].help or ""},
    ]
    for dest in ("participant_label", "session_label"):
        inputs.append(_input(by_dest[dest]))
    rest = [a for a in actions if a.dest not in _FIXED]
    inputs += [_input(a) for a in rest]
    keys = " ".join(_value_key(a.dest) for a in rest)
    return {
        "name": "spineps",
        "tool-version": __version__,
        "description": "SPINEPS as a BIDS-App: whole-spine semantic and instance segmentation of sagittal "
                       f"T2w MRI. See {_REPOSITORY}",
        "author": "the spineps developers",
        "url": _REPOSITORY,
        "schema-version": "0.5",
        "command-line": "mkdir -p [OUTPUT_DIR]; spineps [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] "
                        f"[PARTICIPANT_LABEL] [SESSION_LABEL] {keys}",
        "container-image": {"type": "docker", "image": f"{_CONTAINER}:{__version__}"},
        "inputs": inputs,
        "output-files": [{"id": "output_dir", "name": "Output directory", "path-template": "[OUTPUT_DIR]",
                          "optional": False, "description": "the BIDS-Derivatives dataset the app writes"}],
        "groups": [{"id": "output_directory", "name": "Output directory",
                    "members": ["output_dir_name", "participant_level_analysis_dir"],
                    "description": "participant level: a (new) folder name; group level: the participant "
                                   "level's output folder",
                    "mutually-exclusive": True, "one-is-required": True}],
        "tags": {"domain": ["neuroinformatics", "mri", "spine", "segmentation", "bids"]},
        "custom": {"BIDS-App": {"version": __version__, "analysis-levels": list(ANALYSIS_LEVELS),
                                "bids-version": ">=1.8", "derivatives": "BIDS-Derivatives (dseg masks, sidecars)",
                                "entrypoint": "spineps"}},
    }


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spineps.cli.boutiques", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=None, help="file to write (default: standard output)")
    a = ap.parse_args(argv)
    text = json.dumps(descriptor(), indent=2) + "\n"
    if a.out is None:
        sys.stdout.write(text)
    else:
        from spineps.fsutil import atomic_path

        with atomic_path(a.out) as tmp:
            Path(tmp).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
