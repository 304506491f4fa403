"""BIDS-Derivatives output: names, folders, sidecars, dataset_description, lookup tables
and ``.bidsignore``. Every file is written atomically (``spineps.fsutil``), so participant
runs in parallel into one output folder never see a torn file.

Names are built from the source file name (``shared/spec/bids-app.md``): all source
entities in their order, the source suffix dropped, ``desc-<label>`` last, then the output
suffix. ``pybids.build_path`` is not used: its pattern drops ``run`` and ``chunk``.

Output kinds of one scan (``expected_outputs`` lists those that make a scan complete)::

    sub-01/[ses-1/]anat/sub-01_[ses-1_]acq-sag_run-2_desc-spine_dseg.nii.gz      semantic mask
    sub-01/[ses-1/]anat/sub-01_[ses-1_]acq-sag_run-2_desc-spine_dseg.json        its sidecar
    sub-01/[ses-1/]anat/sub-01_[ses-1_]acq-sag_run-2_desc-vertebrae_dseg.nii.gz  instance mask
    sub-01/[ses-1/]anat/sub-01_[ses-1_]acq-sag_run-2_desc-vertebrae_dseg.json    its sidecar
    sub-01/[ses-1/]anat/sub-01_[ses-1_]acq-sag_run-2_desc-vertebrae_centroids.json  (.bidsignore)
    sub-01/[ses-1/]anat/sub-01_[ses-1_]acq-sag_run-2_desc-spine_dseg.png          figure (.bidsignore)

plus ``desc-spine_dseg.tsv`` and ``desc-vertebrae_dseg.tsv`` (lookup tables inherited by
every mask) and ``dataset_description.json`` at the root.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import write_error
from ..fsutil import write_json_atomic, write_text_atomic
from .discovery import Scan

__all__ = [
    "OutputKind",
    "SEMANTIC_DESC",
    "INSTANCE_DESC",
    "SEMANTIC_MASK",
    "SEMANTIC_SIDECAR",
    "INSTANCE_MASK",
    "INSTANCE_SIDECAR",
    "CENTROIDS",
    "FIGURE",
    "PROBSEG",
    "PROBSEG_SIDECAR",
    "CODE_URL",
    "BIDS_VERSION",
    "BIDSIGNORE_LINES",
    "derivative_name",
    "derivative_dir",
    "derivative_path",
    "expected_outputs",
    "dataset_description",
    "write_dataset_description",
    "lookup_table_rows",
    "lookup_table_text",
    "write_lookup_tables",
    "write_bidsignore",
    "bids_uri",
    "make_sidecar",
    "write_sidecar",
    "VOXEL_MODEL_KEYS",
    "VOXEL_PARAMETERS",
    "sidecar_mismatch",
]

log = logging.getLogger(__name__)

#: BIDS version the derivatives follow
BIDS_VERSION = "1.10.0"
#: where the code lives (GeneratedBy.CodeURL, sidecar CodeURL); omitted while None
CODE_URL: Optional[str] = None
SEMANTIC_DESC = "spine"
INSTANCE_DESC = "vertebrae"


@dataclass(frozen=True)
class OutputKind:
    """One kind of per-scan output: ``<stem>_desc-<desc>_<suffix><extension>``."""

    desc: str
    suffix: str
    extension: str

    def name(self, scan: Scan) -> str:
        return derivative_name(scan, self.desc, self.suffix, self.extension)

    def path(self, output_dir: Union[str, Path], scan: Scan) -> Path:
        return derivative_path(output_dir, scan, self.desc, self.suffix, self.extension)


SEMANTIC_MASK = OutputKind(SEMANTIC_DESC, "dseg", ".nii.gz")
SEMANTIC_SIDECAR = OutputKind(SEMANTIC_DESC, "dseg", ".json")
INSTANCE_MASK = OutputKind(INSTANCE_DESC, "dseg", ".nii.gz")
INSTANCE_SIDECAR = OutputKind(INSTANCE_DESC, "dseg", ".json")
#: vertebral-body centroids (not a BIDS suffix: listed in .bidsignore)
CENTROIDS = OutputKind(INSTANCE_DESC, "centroids", ".json")
#: per-scan overview figure (listed in .bidsignore)
FIGURE = OutputKind(SEMANTIC_DESC, "dseg", ".png")
#: the semantic network's class probabilities (``--save-probabilities``): 4D float16, one
#: volume per network output (the sidecar's ``VolumeLabels`` says which label each holds)
PROBSEG = OutputKind(SEMANTIC_DESC, "probseg", ".nii.gz")
PROBSEG_SIDECAR = OutputKind(SEMANTIC_DESC, "probseg", ".json")

#: what :func:`write_bidsignore` puts into ``.bidsignore``
BIDSIGNORE_LINES: tuple[str, ...] = (
    "logs/",
    "figures/",
    "reports/",
    "work/",
    "*.png",
    "*.svg",
    "*.html",
    "*.log",
    "*_centroids.json",
    "group/",
    "group_*",  # the group level's tables and report
    "*_morphometry.tsv",  # per-scan measurements (spineps.measure.scan)
    "*_morphometry.json",
)


# --------------------------------------------------------------------------- names
def _check_label(value: str, what: str) -> str:
    if not value or not str(value).isalnum():
        raise ValueError(f"{what} must be letters and digits only, got {value!r}")
    return str(value)


def derivative_name(scan: Scan, desc: str, suffix: str = "dseg", extension: str = ".nii.gz") -> str:
    """``sub-01_ses-1_acq-sag_run-2_desc-spine_dseg.nii.gz``: every source entity kept in
    its order (a source ``desc`` is replaced), the source suffix dropped, ``desc`` last."""
    _check_label(desc, "desc")
    _check_label(suffix, "suffix")
    if extension and not extension.startswith("."):
        raise ValueError(f"extension must start with '.', got {extension!r}")
    ents = [f"{k}-{v}" for k, v in scan.entities.items() if k != "desc"]
    return "_".join([*ents, f"desc-{desc}", suffix]) + extension


def derivative_dir(output_dir: Union[str, Path], scan: Scan) -> Path:
    """``output_dir/sub-X/[ses-Y/]anat``."""
    folder = Path(output_dir) / f"sub-{scan.subject}"
    if scan.session is not None:
        folder = folder / f"ses-{scan.session}"
    return folder / "anat"


def derivative_path(output_dir: Union[str, Path], scan: Scan, desc: str, suffix: str = "dseg",
                    extension: str = ".nii.gz") -> Path:
    return derivative_dir(output_dir, scan) / derivative_name(scan, desc, suffix, extension)


def expected_outputs(output_dir: Union[str, Path], scan: Scan, *, with_instances: bool = True) -> list[Path]:
    """The files whose presence makes a scan complete (the figure is optional)."""
    kinds = [SEMANTIC_MASK, SEMANTIC_SIDECAR]
    if with_instances:
        kinds += [INSTANCE_MASK, INSTANCE_SIDECAR, CENTROIDS]
    return [k.path(output_dir, scan) for k in kinds]


# --------------------------------------------------------------------------- dataset level
def _uri(path_or_uri: Union[str, Path]) -> str:
    text = str(path_or_uri)
    if "://" in text or text.startswith(("bids:", "doi:", "file:")):
        return text
    return Path(text).absolute().as_uri()


def dataset_description(*, bids_dir: Union[str, Path], version: str,
                        container: Optional[Mapping[str, str]] = None,
                        code_url: Optional[str] = CODE_URL, source_name: str = "raw") -> dict[str, Any]:
    """The content of the derivative ``dataset_description.json`` (deterministic).
    ``source_name``: the key of the input dataset in ``DatasetLinks`` (``raw`` for the
    BIDS-App; ``semantic`` for ``spineps instance``, whose input is a folder of masks), as
    used in the sidecars' ``bids:<source_name>:...`` URIs."""
    gen: dict[str, Any] = {"Name": "spineps", "Version": str(version)}
    if code_url:
        gen["CodeURL"] = code_url
    if container:
        gen["Container"] = {k: str(v) for k, v in container.items()}
    raw = _uri(bids_dir)
    return {
        "Name": "SPINEPS spine segmentation",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [gen],
        "SourceDatasets": [{"URL": raw}],
        "DatasetLinks": {source_name: raw},
    }


def write_dataset_description(output_dir: Union[str, Path], *, bids_dir: Union[str, Path], version: str,
                              container: Optional[Mapping[str, str]] = None,
                              code_url: Optional[str] = CODE_URL, source_name: str = "raw") -> Path:
    """Write ``output_dir/dataset_description.json`` atomically. Many participant processes
    may call this at once: each writes the same content under its own temporary name and
    renames it into place, so readers see one whole file. An existing file with other
    content (e.g. another version or another raw dataset) is logged and replaced."""
    path = Path(output_dir) / "dataset_description.json"
    desc = dataset_description(bids_dir=bids_dir, version=version, container=container, code_url=code_url,
                               source_name=source_name)
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        old = None
    if old == desc:
        return path
    if old is not None:
        log.warning("%s describes another run (%s %s); rewriting it", path,
                    (old.get("GeneratedBy") or [{}])[0].get("Name") if isinstance(old, dict) else "?",
                    (old.get("GeneratedBy") or [{}])[0].get("Version") if isinstance(old, dict) else "?")
    _write_json(path, desc)
    return path


README_TEXT = """# SPINEPS spine segmentation

BIDS derivatives written by spineps {version}, a BIDS-App that segments the whole spine in
sagittal T2-weighted MRI (SPINEPS: a semantic phase, then an instance phase that separates
the vertebrae).

Per scan, next to the input's BIDS path (`sub-*/[ses-*/]anat/`):

- `*_desc-spine_dseg.nii.gz`: semantic mask (values in `desc-spine_dseg.tsv`);
- `*_desc-vertebrae_dseg.nii.gz`: instance mask (vertebrae by level, discs 100+X,
  endplates 200+X; values in `desc-vertebrae_dseg.tsv`) and `*_desc-vertebrae_centroids.json`;
- `*_desc-spine_morphometry.tsv/.json`: per-level measures; `*_desc-spine_dseg.png`: QC figure.

Each file's JSON sidecar names its sources, the models (name, version, checksum) and the
run's parameters; a scan is complete when its sidecars exist. The group level adds
`group_T2w*.tsv/.json` tables and `group_T2w_report.html`. `logs/` holds each run's log,
settings, methods boilerplate (`*_methods.md`, with references) and failure records.
"""


def write_readme(output_dir: Union[str, Path], *, version: str) -> Path:
    """Write ``output_dir/README.md`` (what the derivative dataset holds) atomically, unless it
    already has this content; a README someone else wrote (not starting with our title) is kept."""
    path = Path(output_dir) / "README.md"
    text = README_TEXT.format(version=version)
    try:
        old = path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        old = None
    if old == text or (old is not None and not old.startswith("# SPINEPS spine segmentation")):
        return path
    _write_text(path, text)
    return path


def _write_json(path: Path, obj: Any) -> None:
    try:
        write_json_atomic(path, obj)
    except OSError as exc:
        raise write_error(f"cannot write: {exc.strerror or exc}", path, exc) from exc


def _write_text(path: Path, text: str) -> None:
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise write_error(f"cannot write: {exc.strerror or exc}", path, exc) from exc


def lookup_table_rows(desc: str) -> list[dict[str, Any]]:
    """Rows of the lookup table of ``desc`` ("spine" or "vertebrae"), background first."""
    from .. import labels

    if desc == SEMANTIC_DESC:
        labs: Sequence[Any] = sorted(labels.SEMANTIC, key=lambda lab: lab.value)
    elif desc == INSTANCE_DESC:
        labs = labels.instance_labels()
    else:
        raise ValueError(f"no lookup table for desc {desc!r}")
    rows = [{"index": 0, "name": "background", "abbreviation": "BG", "color": "#000000", "mapping": 0}]
    for lab in labs:
        rows.append({"index": lab.value, "name": lab.name, "abbreviation": lab.abbreviation,
                     "color": lab.color, "mapping": lab.mapping})
    return rows


def lookup_table_text(desc: str) -> str:
    """TSV text: ``index name abbreviation color mapping``; ``n/a`` where no mapping fits."""
    cols = ("index", "name", "abbreviation", "color", "mapping")
    lines = ["\t".join(cols)]
    for row in lookup_table_rows(desc):
        lines.append("\t".join("n/a" if row[c] is None else str(row[c]) for c in cols))
    return "\n".join(lines) + "\n"


def write_lookup_tables(output_dir: Union[str, Path]) -> list[Path]:
    """``desc-spine_dseg.tsv`` and ``desc-vertebrae_dseg.tsv`` at the dataset root."""
    out: list[Path] = []
    for desc in (SEMANTIC_DESC, INSTANCE_DESC):
        path = Path(output_dir) / f"desc-{desc}_dseg.tsv"
        text = lookup_table_text(desc)
        if not (path.is_file() and _read_or_none(path) == text):
            _write_text(path, text)
        out.append(path)
    return out


def _read_or_none(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def write_bidsignore(output_dir: Union[str, Path], extra: Iterable[str] = ()) -> Path:
    """Add :data:`BIDSIGNORE_LINES` (and ``extra``) to ``output_dir/.bidsignore``, keeping
    the lines already there and never duplicating one."""
    path = Path(output_dir) / ".bidsignore"
    old = _read_or_none(path) or ""
    lines = old.splitlines()
    present = {ln.strip() for ln in lines}
    missing = [ln for ln in (*BIDSIGNORE_LINES, *extra) if ln.strip() and ln.strip() not in present]
    if not missing and path.is_file():
        return path
    for ln in missing:
        present.add(ln.strip())
    _write_text(path, "\n".join([*lines, *missing]).strip("\n") + "\n")
    return path


# --------------------------------------------------------------------------- sidecars
def bids_uri(source: Union[Scan, str, os.PathLike], dataset: str = "raw") -> str:
    """``bids:raw:sub-01/anat/sub-01_acq-sag_T2w.nii.gz`` for a scan or a relative path;
    a string that already is a BIDS URI (``bids:...``) is returned unchanged."""
    if isinstance(source, Scan):
        return f"bids:{dataset}:{source.relpath}"
    text = os.fspath(source)
    if text.startswith("bids:"):
        return text
    if Path(text).is_absolute():
        raise ValueError(f"a BIDS URI needs a path relative to the dataset root, got {text}")
    return f"bids:{dataset}:{Path(text).as_posix()}"


_MODEL_KEYS = {"name": "Name", "version": "Version", "checksum": "Checksum"}


def _model_entry(role: str, model: Any) -> dict[str, Any]:
    if not isinstance(model, Mapping):
        model = {k: getattr(model, k) for k in ("name", "version", "checksum") if hasattr(model, k)}
    out: dict[str, Any] = {}
    for key, value in model.items():
        out[_MODEL_KEYS.get(str(key).lower(), str(key))] = value
    missing = [v for v in _MODEL_KEYS.values() if v not in out]
    if missing:
        raise ValueError(f"model {role!r} lacks {', '.join(missing)}")
    return out


def make_sidecar(*, description: str, sources: Sequence[Union[Scan, str]], software_version: str,
                 models: Mapping[str, Any], parameters: Mapping[str, Any], timings: Mapping[str, Any],
                 extra: Optional[Mapping[str, Any]] = None,
                 spatial_reference: Optional[str] = None) -> dict[str, Any]:
    """The JSON sidecar of one output.

    ``sources``: scans (-> ``bids:raw:<relpath>``), relative paths in the raw dataset, or
    ready BIDS URIs (``bids::sub-01/anat/..._desc-spine_dseg.nii.gz`` for an output of this
    dataset). ``models``: role -> mapping (or object) with name, version and checksum, e.g.
    ``{"semantic": {"name": "T2w_segmentor", "version": "2.0", "checksum": "sha256:..."}}``.
    ``spatial_reference``: the image whose grid the output shares; default the first source
    (the outputs live on the native grid of their scan), written as ``SpatialReference``.
    Keys: ``Description``, ``Sources``, ``SpatialReference``, ``Manual`` (false), ``SoftwareName``,
    ``SoftwareVersion``, ``CodeURL`` (when known), ``Models``, ``Parameters``, ``Timings`` (seconds),
    then ``extra``."""
    uris = [bids_uri(s) for s in sources]
    if spatial_reference is None and uris:
        spatial_reference = uris[0]
    data: dict[str, Any] = {
        "Description": description,
        "Sources": uris,
        **({"SpatialReference": spatial_reference} if spatial_reference else {}),
        "Manual": False,
        "SoftwareName": "spineps",
        "SoftwareVersion": str(software_version),
        **({"CodeURL": CODE_URL} if CODE_URL else {}),
        "Models": {role: _model_entry(role, m) for role, m in models.items()},
        "Parameters": dict(parameters),
        "Timings": dict(timings),
    }
    for key, value in (extra or {}).items():
        data[key] = value
    json.dumps(data, default=str)  # fail here, not midway through writing, on odd values
    return data


def write_sidecar(path: Union[str, Path], data: Mapping[str, Any]) -> Path:
    """Write a sidecar JSON atomically."""
    path = Path(path)
    _write_json(path, dict(data))
    return path


# --------------------------------------------------------------------------- completeness
#: the keys of a model's provenance that change the voxels it produces (besides its checksum):
#: compared between a run and the sidecars of earlier outputs (resolved values: "auto" is what it
#: became, e.g. precision bf16 on one CPU and fp32 on another)
VOXEL_MODEL_KEYS: tuple[str, ...] = ("precision", "engine", "step_size", "mirroring", "folds", "configuration", "n4")
#: the run parameters (``Settings.parameters()``) that change the voxels (the level names are
#: voxel values of the instance mask)
VOXEL_PARAMETERS: tuple[str, ...] = ("n4", "level_rule", "top_vertebra", "input")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    if isinstance(value, str) and value.startswith("sha256:") and len(value) > 23:
        text = repr(value[:19] + "...")
    return text if len(text) <= 60 else text[:57] + "..."


def _engine_name(value: Any) -> Any:
    return value.get("engine") if isinstance(value, Mapping) else value


def sidecar_mismatch(sidecar: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]],
                     parameters: Mapping[str, Any]) -> Optional[str]:
    """Why the outputs a sidecar describes are not what this run would compute, or None when
    they are: the same model roles, each model's checksum and :data:`VOXEL_MODEL_KEYS` (where
    this run's provenance has them), and :data:`VOXEL_PARAMETERS`. ``models``: role ->
    provenance as written into ``Models`` (``name``/``Name``, ``checksum``/``Checksum``, ...);
    ``parameters``: this run's ``Parameters``."""
    old_models = sidecar.get("Models")
    if not isinstance(old_models, Mapping):
        return "its sidecar names no models"
    if set(old_models) != set(models):
        return (f"they were made with the {' and '.join(sorted(old_models)) or 'no'} model(s), this run uses "
                f"{' and '.join(sorted(models))}")
    for role, now in models.items():
        then = old_models[role] if isinstance(old_models[role], Mapping) else {}
        now_entry = {_MODEL_KEYS.get(str(k).lower(), str(k)): v for k, v in now.items()}
        if then.get("Checksum") != now_entry.get("Checksum"):
            return (f"they were made with another {role} model ({then.get('Name', '?')} {_short(then.get('Checksum'))}"
                    f", this run: {now_entry.get('Name', '?')} {_short(now_entry.get('Checksum'))})")
        for key in VOXEL_MODEL_KEYS:
            if key in now_entry:
                a, b = then.get(key), now_entry[key]
                if key == "engine":
                    a, b = _engine_name(a), _engine_name(b)
                if json.dumps(a, default=str) != json.dumps(b, default=str):
                    return f"their {role} {key} was {_short(a)}, this run's is {_short(b)}"
    old_params = sidecar.get("Parameters") if isinstance(sidecar.get("Parameters"), Mapping) else {}
    assert isinstance(old_params, Mapping)
    for key in VOXEL_PARAMETERS:
        a, b = old_params.get(key), parameters.get(key)
        if a != b:
            return f"their parameter {key} was {_short(a)}, this run's is {_short(b)}"
    return None
