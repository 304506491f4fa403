"""Find the sagittal T2w scans of a BIDS dataset.

``discover_scans`` indexes the dataset with pybids (``validate=False``: the CLI validates
separately), in memory or in a scratch folder under the work dir, never inside the dataset,
and returns the scans to segment plus the ones it skipped with the reason. With participant
labels only those subjects' folders are indexed (a one-participant job on a large cohort
indexes one folder); the other labels are read from the root's ``sub-*`` folder names.

Selection (``shared/spec/bids-app.md``, "Finding sagittal T2w scans"):

1. query: ``datatype="anat"``, ``suffix="T2w"``, ``extension`` ``.nii``/``.nii.gz``,
   updated by the ``"t2w"`` query of a ``--bids-filter-file``, on the files pybids indexed,
   with their entities parsed from the path relative to the dataset root (pybids 0.22.0
   parses the absolute path: see :func:`_indexed_files`).
2. Each candidate's header (never the voxel data) must be readable and 3D (trailing
   singleton dimensions are fine).
3. Orientation, see :func:`slice_orientation`. A scan whose ``acq`` label starts with
   ``sag`` (``acq-sag``, ``acq-sagittal``, ``acq-sagLumbar``) is taken as sagittal unless
   its affine is *clearly* something else (a thick-slice stack whose slices run along S-I or
   A-P): then it is skipped with a reason that says so. Any other scan is kept only when
   its orientation is sagittal.
4. Preference for ``acq-sag``: with the default query, a session that has kept ``acq-sag``
   scans drops its other T2w scans (skipped, reason says why). A filter file's ``t2w`` query
   is the user's explicit choice, so it switches this preference off.
5. Two inputs that would map to one output name (same entities, e.g. ``.nii`` and
   ``.nii.gz`` of one scan) never both survive: the first in sorted order is kept.

Scans are sorted by subject, session and the natural order of the remaining entities
(``run-2`` before ``run-10``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import InputError, NoInputError, NoMatchError, UsageError
from ..fsutil import is_within

__all__ = [
    "Scan",
    "Discovery",
    "Orientation",
    "FILTER_QUERIES",
    "DEFAULT_T2W_QUERY",
    "parse_bids_name",
    "load_bids_filters",
    "slice_orientation",
    "merged_sidecar",
    "discover_scans",
]

log = logging.getLogger(__name__)

#: top-level queries a ``--bids-filter-file`` may hold
FILTER_QUERIES: tuple[str, ...] = ("t2w",)
#: the pybids query for input scans before filters are applied
DEFAULT_T2W_QUERY: dict[str, Any] = {
    "datatype": "anat",
    "suffix": "T2w",
    "extension": [".nii", ".nii.gz"],
}
_NIFTI_EXT = re.compile(r"(\.nii(\.gz)?)$")
_ENTITY_RE = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")
_LABEL_RE = re.compile(r"^[a-zA-Z0-9]+$")
#: a largest voxel spacing this many times the second largest makes a "2D stack"
STACK_RATIO = 1.25
#: a field of view this many times smaller than the next marks the through-plane axis
FOV_RATIO = 0.8


# --------------------------------------------------------------------------- names
def _split_extension(name: str) -> tuple[str, str]:
    m = _NIFTI_EXT.search(name)
    if m:
        return name[: m.start()], m.group(1)
    dot = name.find(".")
    return (name, "") if dot < 0 else (name[:dot], name[dot:])


def parse_bids_name(name: str) -> tuple[dict[str, str], str, str]:
    """``"sub-01_ses-1_acq-sag_run-2_T2w.nii.gz"`` -> (``{"sub": "01", "ses": "1",
    "acq": "sag", "run": "2"}``, ``"T2w"``, ``".nii.gz"``); entities keep their file order.
    Raises ``ValueError`` for a name that is not ``key-value_..._suffix.ext``."""
    base, ext = _split_extension(Path(name).name)
    parts = base.split("_")
    if len(parts) < 2:
        raise ValueError(f"not a BIDS file name (no entities or no suffix): {name}")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        m = _ENTITY_RE.match(part)
        if not m or m.group(1) in entities:
            raise ValueError(f"not a BIDS file name ({part!r} is no key-value entity): {name}")
        entities[m.group(1)] = m.group(2)
    suffix = parts[-1]
    if not _LABEL_RE.match(suffix) or "sub" not in entities:
        raise ValueError(f"not a BIDS file name: {name}")
    return entities, suffix, ext


@dataclass(frozen=True)
class Scan:
    """One input image: where it is, what its name says, and its merged JSON sidecar."""

    path: Path
    bids_dir: Path
    entities: dict[str, str]
    suffix: str
    extension: str
    sidecar: dict = field(default_factory=dict, compare=False, hash=False)

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def subject(self) -> str:
        return self.entities["sub"]

    @property
    def session(self) -> Optional[str]:
        return self.entities.get("ses")

    @property
    def relpath(self) -> str:
        """Relative to the dataset root, POSIX (``sub-01/anat/sub-01_acq-sag_T2w.nii.gz``)."""
        return self.path.relative_to(self.bids_dir).as_posix()

    @property
    def stem(self) -> str:
        """The file name without suffix and extension: ``sub-01_ses-1_acq-sag_run-2``."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())

    @property
    def key(self) -> str:
        """Unique among the scans of one discovery (duplicates are dropped there); it is
        also the prefix of every output name of the scan."""
        return self.stem

    @classmethod
    def from_path(cls, path: Union[str, Path], bids_dir: Union[str, Path],
                  sidecar: Optional[dict] = None) -> "Scan":
        """A scan from a file name alone (the sidecar is not read unless given)."""
        path = Path(path).absolute()
        entities, suffix, ext = parse_bids_name(path.name)
        return cls(path, Path(bids_dir).absolute(), entities, suffix, ext, dict(sidecar or {}))


@dataclass
class Discovery:
    """What :func:`discover_scans` found: the scans to segment and the skipped files."""

    scans: list[Scan]
    skipped: list[tuple[Path, str]]
    #: the skipped files that were meant as input but cannot be used (a header that cannot be
    #: read, not 3D, a malformed JSON sidecar, a name that is not BIDS): a participant run
    #: counts them as failed scans, unlike deliberate skips (not sagittal, duplicates)
    unusable: list[tuple[Path, str]] = field(default_factory=list)

    def subjects(self) -> list[str]:
        return sorted({s.subject for s in self.scans}, key=_natural_key)


def _natural_key(text: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def _scan_sort_key(scan: Scan) -> tuple:
    rest = tuple(_natural_key(f"{k}-{v}") for k, v in scan.entities.items() if k not in ("sub", "ses"))
    return (_natural_key(scan.subject), _natural_key(scan.session or ""), rest, scan.suffix, scan.extension)


# --------------------------------------------------------------------------- filters
def load_bids_filters(path: Union[str, Path]) -> dict:
    """Read a ``--bids-filter-file``: ``{"t2w": {"acquisition": "sag", "run": null}}``.

    Values are kept as written (``null`` = entity absent, ``"*"`` = any value, a list = any
    of these); :func:`discover_scans` turns them into pybids queries. A missing or malformed
    file, or a top-level query other than :data:`FILTER_QUERIES`, raises ``UsageError``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the BIDS filter file: {exc.strerror or exc}", path) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the BIDS filter file is not valid JSON: {exc}", path) from exc
    if not isinstance(data, dict):
        raise UsageError(f"the BIDS filter file must hold a JSON object, got {type(data).__name__}", path)
    for name, query in data.items():
        if name not in FILTER_QUERIES:
            raise UsageError(f"unknown query {name!r} in the BIDS filter file (known: {', '.join(FILTER_QUERIES)})",
                             path)
        if not isinstance(query, dict):
            raise UsageError(f"query {name!r} must be a JSON object of entity: value", path)
        for entity, value in query.items():
            ok = value is None or isinstance(value, (str, int, bool)) or (
                isinstance(value, list) and all(isinstance(v, (str, int)) for v in value))
            if not ok:
                raise UsageError(f"query {name!r}: value of {entity!r} must be a string, null, or a list of "
                                 f"strings, got {value!r}", path)
    return data


def _value_matches(value: Any, wanted: Any) -> bool:
    """One entity's value against one filter value: ``None`` = absent, ``"*"`` = present, a
    list = any of these, else equal (as text, or as numbers: ``run-01`` matches ``1``)."""
    if wanted is None:
        return value is None
    if value is None:
        return False
    if isinstance(wanted, list):
        return any(_value_matches(value, w) for w in wanted)
    if wanted == "*" or str(value) == str(wanted):
        return True
    try:
        return int(str(value)) == int(str(wanted))
    except ValueError:
        return False


def _matches(entities: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    return all(_value_matches(entities.get(key), wanted) for key, wanted in query.items())


# --------------------------------------------------------------------------- orientation
@dataclass(frozen=True)
class Orientation:
    """The plane of a scan's slices and how it was decided.

    ``plane`` is "sagittal", "axial" or "coronal"; ``source`` one of "slice spacing",
    "ImageOrientationPatientDICOM", "ImageOrientationText", "field of view", "slice axis";
    ``clear`` is True only for "slice spacing" (a thick-slice 2D stack)."""

    plane: str
    source: str
    detail: str

    @property
    def clear(self) -> bool:
        return self.source == "slice spacing"


_PLANE_OF_WORLD_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # slice normal along x / y / z


def _world_axis(affine, axis: int) -> int:
    import numpy as np

    return int(np.argmax(np.abs(np.asarray(affine)[:3, axis])))


def slice_orientation(affine, shape: Sequence[int], sidecar: Optional[Mapping[str, Any]] = None,
                      slice_axis: Optional[int] = None) -> Orientation:
    """Decide the slice plane from the geometry, in this order:

    1. a 2D stack (largest spacing > ``STACK_RATIO`` x the second largest): its
       through-plane axis is the thick one;
    2. the sidecar's ``ImageOrientationPatientDICOM`` (slice normal = row x column);
    3. the sidecar's ``ImageOrientationText`` ("Sag", "Tra", "Cor", "Sag>Tra", ...);
    4. the axis with the clearly smallest field of view (a sagittal spine scan is narrow
       from left to right);
    5. ``slice_axis`` (the NIfTI header's slice dimension) or else the last axis.

    The plane follows from the world axis (``aff2axcodes``-style, largest component) the
    through-plane axis maps to: L-R sagittal, S-I axial, A-P coronal."""
    import numpy as np

    aff = np.asarray(affine, dtype=float)
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    order = np.argsort(spacing)[::-1]
    sp_text = "x".join(f"{s:.3g}" for s in spacing)
    if spacing[order[0]] > STACK_RATIO * spacing[order[1]]:
        axis = int(order[0])
        plane = _PLANE_OF_WORLD_AXIS[_world_axis(aff, axis)]
        return Orientation(plane, "slice spacing", f"thick axis {axis} of spacing {sp_text} mm is {plane}")
    sidecar = sidecar or {}
    iop = sidecar.get("ImageOrientationPatientDICOM")
    if isinstance(iop, (list, tuple)) and len(iop) == 6:
        try:
            normal = np.cross(np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float))
        except (TypeError, ValueError):
            normal = None
        if normal is not None and np.linalg.norm(normal) > 1e-6:
            plane = _PLANE_OF_WORLD_AXIS[int(np.argmax(np.abs(normal)))]
            return Orientation(plane, "ImageOrientationPatientDICOM",
                               f"slice normal {np.round(normal, 3).tolist()} is {plane}")
    text = sidecar.get("ImageOrientationText")
    if isinstance(text, str) and text.strip():
        main = text.strip().split(">")[0].strip().lower()
        named = {"sag": "sagittal", "tra": "axial", "ax": "axial", "cor": "coronal"}.get(main[:3]) or \
            {"ax": "axial"}.get(main[:2])
        if named:
            return Orientation(named, "ImageOrientationText", f"ImageOrientationText {text!r}")
    fov = spacing * np.asarray(shape[:3], dtype=float)
    fov_order = np.argsort(fov)
    if fov[fov_order[0]] < FOV_RATIO * fov[fov_order[1]]:
        axis = int(fov_order[0])
        plane = _PLANE_OF_WORLD_AXIS[_world_axis(aff, axis)]
        return Orientation(plane, "field of view",
                           f"narrowest axis {axis} ({'x'.join(f'{f:.0f}' for f in fov)} mm) is {plane}")
    axis = 2 if slice_axis is None else int(slice_axis)
    plane = _PLANE_OF_WORLD_AXIS[_world_axis(aff, axis)]
    return Orientation(plane, "slice axis", f"slice axis {axis} is {plane}")


def merged_sidecar(path: Union[str, Path], bids_dir: Union[str, Path]) -> dict:
    """The JSON metadata of ``path`` by the BIDS inheritance principle: every ``.json`` in
    the dataset root, ``sub-X/``, ``sub-X/ses-Y/`` and the file's own folder whose suffix is
    the file's suffix and whose entities are a subset of the file's, merged from the top
    (least specific) down, so the file's own sidecar wins. Raises ``InputError`` naming a
    malformed JSON file (pybids' metadata index is not used: one broken sidecar anywhere
    would stop it from indexing the whole dataset)."""
    path = Path(path).absolute()
    root = Path(bids_dir).absolute()
    entities, suffix, _ = parse_bids_name(path.name)
    folders = [path.parent]
    while folders[-1] != root and root in folders[-1].parents:
        folders.append(folders[-1].parent)
    merged: dict = {}
    for folder in reversed(folders):
        found: list[tuple[int, Path]] = []
        try:
            candidates = sorted(folder.glob(f"*{suffix}.json"))
        except OSError:
            continue
        for cand in candidates:
            base = cand.name[: -len(".json")]
            parts = base.split("_")
            if parts[-1] != suffix:
                continue
            ents: dict[str, str] = {}
            for part in parts[:-1]:
                m = _ENTITY_RE.match(part)
                if not m:
                    ents = {"": ""}  # not a BIDS name: never applies
                    break
                ents[m.group(1)] = m.group(2)
            if all(entities.get(k) == v for k, v in ents.items()):
                found.append((len(ents), cand))
        for _, cand in sorted(found):
            try:
                data = json.loads(cand.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"malformed JSON sidecar: {exc}", cand) from exc
            if not isinstance(data, dict):
                raise InputError("the JSON sidecar does not hold an object", cand)
            merged.update(data)
    return merged


def _drop_symlink_aliases(candidates: list[Path], bids_dir: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """One file reached under several names (a folder symlink, e.g. a loop ``anat/loop -> ..``
    that pybids walks into again and again) is kept once, under its shortest name; the
    aliases are skipped (one WARNING for all of them, each at DEBUG level)."""
    import os

    first: dict[str, Path] = {}
    kept: list[Path] = []
    aliases: list[Path] = []
    for path in sorted(candidates, key=lambda p: (len(p.parts), p.as_posix())):
        try:
            real = os.path.realpath(path, strict=True)
        except OSError:  # broken or looping file symlink: _read_header says so
            kept.append(path)
            continue
        if real in first:
            reason = f"the same file as {first[real]} (reached through a folder symlink)"
            log.debug("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            aliases.append(path)
            continue
        first[real] = path
        kept.append(path)
    if aliases:
        log.warning("skipping %d file(s) reached again through folder symlinks under %s (e.g. %s)", len(aliases),
                    bids_dir, aliases[0])
    return sorted(kept, key=lambda p: p.as_posix())


def _read_header(path: Path) -> tuple[Any, tuple[int, ...], Optional[int]]:
    """(affine, spatial shape, slice axis or None) from the header only; raises InputError."""
    import os

    import nibabel as nib

    try:
        os.stat(path)  # follows symlinks: a loop or a dangling link says so here
    except OSError as exc:
        raise InputError(f"cannot read the image header: {exc.strerror or exc}", path) from exc
    try:
        img: Any = nib.load(str(path))  # an image class of nibabel's choosing
        shape = tuple(int(n) for n in img.shape)
        affine = img.affine
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"cannot read the image header: {exc}", path) from exc
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"not a 3D image (shape {shape})", path)
    slice_axis = None
    try:
        slice_axis = img.header.get_dim_info()[2]
    except Exception:  # pragma: no cover - only NIfTI headers have dim_info
        pass
    return affine, shape, slice_axis


def _declares_sagittal(entities: Mapping[str, str]) -> bool:
    return entities.get("acq", "").lower().startswith("sag")


# --------------------------------------------------------------------------- discovery
def _strip(label: str, prefix: str) -> str:
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


def _normalise_labels(labels: Optional[Iterable[str]], prefix: str, what: str) -> Optional[list[str]]:
    if labels is None:
        return None
    if isinstance(labels, str):
        labels = [labels]
    out: list[str] = []
    for raw in labels:
        lab = _strip(raw, prefix)
        if not _LABEL_RE.match(lab):
            raise UsageError(f"invalid {what} label {raw!r}: BIDS labels are letters and digits only")
        if lab not in out:
            out.append(lab)
    return out or None


class _LayoutHandle:
    """A pybids layout indexed in memory or in a fresh folder under ``database_dir``;
    ``close()`` removes that folder. Nothing is ever written into the dataset."""

    def __init__(self, bids_dir: Path, database_dir: Optional[Path], subjects: Optional[list[str]] = None):
        from bids import BIDSLayout, BIDSLayoutIndexer

        self._tmp: Optional[Path] = None
        # metadata is read by merged_sidecar: a malformed JSON anywhere would stop pybids
        kwargs: dict[str, Any] = {"validate": False,
                                  "indexer": BIDSLayoutIndexer(validate=False, index_metadata=False,
                                                               ignore=_ignore_other_subjects(subjects))}
        if database_dir is not None:
            database_dir = Path(database_dir).absolute()
            if is_within(database_dir.resolve(), bids_dir.resolve()):
                raise UsageError("the pybids database folder must not be inside the BIDS dataset", database_dir)
            database_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix="pybids-", dir=database_dir))
            kwargs["database_path"] = str(self._tmp)
        if not (bids_dir / "dataset_description.json").is_file():
            log.warning("%s has no dataset_description.json: indexing it anyway (it is not a valid BIDS "
                        "dataset; run the BIDS validator)", bids_dir)
        try:
            self.layout = BIDSLayout(str(bids_dir), **kwargs)
        except Exception as exc:
            self.close()
            raise InputError(f"pybids could not index the dataset: {exc}", bids_dir) from exc

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _ignore_other_subjects(subjects: Optional[list[str]]) -> Optional[list[Any]]:
    """pybids' ``ignore`` list that leaves out the subject folders not asked for (None: its
    defaults, every subject indexed). A one-participant job (a SLURM array task) then indexes
    its own folder, not the whole cohort's."""
    if not subjects:
        return None
    try:
        from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE
        defaults = list(DEFAULT_LOCATIONS_TO_IGNORE)
    except ImportError:  # pragma: no cover - the documented defaults of pybids' indexer
        defaults = [re.compile(r"^/(code|models|sourcedata|stimuli)")]
    wanted = "|".join(re.escape(s) for s in subjects)
    return [*defaults, re.compile(rf"^/sub-(?!(?:{wanted})(?:/|$))[^/]+")]


def _subject_folders(bids_dir: Path) -> list[str]:
    """The subject labels of the ``sub-*`` folders at the dataset's root."""
    try:
        return sorted((p.name[4:] for p in bids_dir.iterdir() if p.name.startswith("sub-") and p.is_dir()),
                      key=_natural_key)
    except OSError:
        return []


def _describe(labels: Sequence[str], prefix: str, limit: int = 20) -> str:
    text = ", ".join(f"{prefix}{lab}" for lab in labels[:limit])
    return text + (f", ... ({len(labels)} in all)" if len(labels) > limit else "")


def _t2w_query(bids_filters: Optional[Mapping[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The T2w query (the default one, replaced/extended by a filter file's ``t2w``) and whether
    ``acq-sag`` scans are preferred (only without a filter file)."""
    filters = dict(bids_filters or {})
    unknown = set(filters) - set(FILTER_QUERIES)
    if unknown:
        raise UsageError(f"unknown BIDS filter query {sorted(unknown)} (known: {', '.join(FILTER_QUERIES)})")
    return {**DEFAULT_T2W_QUERY, **dict(filters.get("t2w") or {})}, "t2w" not in filters


#: an indexed file: its path and the entities pybids parses from its root-relative path
_Indexed = tuple[Path, dict[str, Any]]


def _indexed_files(layout: Any, bids_dir: Path) -> list[_Indexed]:
    """Every file pybids indexed, with its entities parsed from the path *relative to the
    dataset root*. pybids 0.22.0 matches its entity patterns against the absolute path, so a
    dataset below a folder named like a datatype (``/projects/perf/bids/``, ``.../anat/...``)
    gets that datatype for every file and its T2w scans are never found (pybids issue #1270,
    fixed after 0.22.0 by PR #1273); parsing ``/sub-01/anat/sub-01_T2w.nii.gz`` instead sees
    only what lies inside the dataset."""
    from bids.layout import parse_file_entities
    from bids.layout.models import Config

    config = Config.load("bids")
    roots = (bids_dir, bids_dir.resolve())
    out: list[_Indexed] = []
    for name in layout.get(return_type="filename"):
        path = Path(name)
        rel = next((path.relative_to(r) for r in roots if is_within(path, r)), None)
        if rel is None:  # pragma: no cover - pybids indexes below its root only
            continue
        entities = parse_file_entities("/" + rel.as_posix(), config=[config])
        out.append((path, dict(entities)))
    return out


def _known_entities() -> set[str]:
    from bids.layout.models import Config

    return set(Config.load("bids").entities)


def _check_labels(files: list[_Indexed], bids_dir: Path, subjects: Optional[list[str]],
                  sessions: Optional[list[str]]) -> None:
    """``NoMatchError`` naming the participant or session labels that do not exist (with
    ``subjects``, only their folders are indexed: the others are listed from the root)."""
    indexed = {str(e["subject"]) for _p, e in files if e.get("subject")}
    all_subjects = sorted(indexed | set(_subject_folders(bids_dir)) if subjects is not None else indexed,
                          key=_natural_key)
    if subjects is not None:
        missing = [s for s in subjects if s not in indexed]
        if missing:
            raise NoMatchError(f"participant label(s) not found in {bids_dir}: "
                               f"{_describe(missing, 'sub-')} (available: "
                               f"{_describe(all_subjects, 'sub-') or 'none'})")
    if sessions is not None:
        subset = set(subjects or all_subjects)
        all_sessions = sorted({str(e["session"]) for _p, e in files
                               if e.get("session") and str(e.get("subject")) in subset}, key=_natural_key)
        missing = [s for s in sessions if s not in all_sessions]
        if missing:
            scope = f" for {_describe(subjects, 'sub-')}" if subjects else ""
            raise NoMatchError(f"session label(s) not found in {bids_dir}{scope}: "
                               f"{_describe(missing, 'ses-')} (available: "
                               f"{_describe(all_sessions, 'ses-') or 'none'})")


def _query_files(files: list[_Indexed], bids_dir: Path, query: dict[str, Any], subjects: Optional[list[str]],
                 sessions: Optional[list[str]]) -> list[Path]:
    """The files of the query for the labels, sorted; ``NoMatchError`` when there is none and
    ``UsageError`` for a query on an entity pybids does not know."""
    unknown = sorted(set(query) - _known_entities())
    if unknown:
        raise UsageError(f"the BIDS query {query} cannot be run: {', '.join(map(repr, unknown))} "
                         f"{'is no' if len(unknown) == 1 else 'are no'} BIDS entity name(s) pybids knows "
                         "(e.g. 'acquisition', 'run', 'reconstruction', 'chunk', 'suffix')")
    full = dict(query)
    if subjects is not None:
        full["subject"] = list(subjects)
    if sessions is not None:
        full["session"] = list(sessions)
    candidates = sorted({p for p, ents in files if _matches(ents, full)}, key=lambda p: p.as_posix())
    if not candidates:
        raise NoMatchError(f"no file in {bids_dir} matches the query {json.dumps(query, default=str)}"
                           + (f" for {_describe(subjects, 'sub-')}" if subjects else "")
                           + (f" and {_describe(sessions, 'ses-')}" if sessions else ""))
    return candidates


def discover_scans(
    bids_dir: Union[str, Path],
    *,
    participant_labels: Optional[Iterable[str]] = None,
    session_labels: Optional[Iterable[str]] = None,
    bids_filters: Optional[Mapping[str, Any]] = None,
    database_dir: Optional[Union[str, Path]] = None,
) -> Discovery:
    """The sagittal T2w scans of ``bids_dir`` (see the module docstring for the rules).

    Raises ``NoInputError`` when ``bids_dir`` is missing, ``NoMatchError`` for a participant
    or session label that does not exist (the message names it) and when the query selects
    no file or every selected file is skipped (the message lists why)."""
    bids_dir = Path(bids_dir).absolute()
    if not bids_dir.is_dir():
        raise NoInputError("the BIDS dataset folder does not exist", bids_dir)
    subjects = _normalise_labels(participant_labels, "sub-", "participant")
    sessions = _normalise_labels(session_labels, "ses-", "session")
    query, prefer_sag = _t2w_query(bids_filters)
    handle = _LayoutHandle(bids_dir, Path(database_dir) if database_dir is not None else None, subjects)
    try:
        files = _indexed_files(handle.layout, bids_dir)
        _check_labels(files, bids_dir, subjects, sessions)
        candidates = _query_files(files, bids_dir, query, subjects, sessions)
        scans, skipped, unusable = _select(candidates, bids_dir, prefer_sag)
    finally:
        handle.close()
    if not scans:
        reasons = "; ".join(f"{p.relative_to(bids_dir) if is_within(p.resolve(), bids_dir.resolve()) else p}: {why}"
                            for p, why in skipped)
        raise NoMatchError(f"no usable sagittal T2w scan in {bids_dir}: every selected file was skipped ({reasons})")
    return Discovery(scans, skipped, unusable)


class _Skips:
    """The files left out, with why (``unusable``: meant as input but broken)."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Path, str]] = []
        self.unusable: list[tuple[Path, str]] = []

    def skip(self, path: Path, reason: str, level: int = logging.INFO, broken: bool = False) -> None:
        log.log(level, "skipping %s: %s", path, reason)
        self.skipped.append((path, reason))
        if broken:
            self.unusable.append((path, reason))


def _candidate(path: Path, bids_dir: Path, skips: _Skips) -> Optional[tuple[Scan, bool]]:
    """``(scan, declared acq-sag)`` of a sagittal candidate, None when it is skipped."""
    try:
        entities, suffix, ext = parse_bids_name(path.name)
    except ValueError as exc:
        skips.skip(path, str(exc), logging.WARNING, broken=True)
        return None
    try:
        sidecar = merged_sidecar(path, bids_dir)
    except InputError as exc:  # a malformed JSON sidecar
        skips.skip(path, f"cannot read its JSON sidecar {exc.path}: {exc.reason}", logging.WARNING, broken=True)
        return None
    try:
        affine, shape, slice_axis = _read_header(path)
    except InputError as exc:
        skips.skip(path, exc.reason, logging.WARNING, broken=True)
        return None
    orient = slice_orientation(affine, shape, sidecar, slice_axis)
    declared = _declares_sagittal(entities)
    if declared:
        if orient.clear and orient.plane != "sagittal":
            skips.skip(path, f"named acq-{entities['acq']} but its affine is {orient.plane}: {orient.detail}",
                       logging.WARNING)
            return None
    elif orient.plane != "sagittal":
        skips.skip(path, f"not sagittal: {orient.plane} ({orient.detail}, from {orient.source})")
        return None
    return Scan(path, bids_dir, entities, suffix, ext, sidecar), declared


def _preferring_sag(kept: list[tuple[Scan, bool]], skips: _Skips) -> list[Scan]:
    """Where a session has ``acq-sag`` scans, its other T2w scans are left out."""
    sag_sessions = {(s.subject, s.session) for s, declared in kept if declared}
    final: list[Scan] = []
    for scan, declared in kept:
        if not declared and (scan.subject, scan.session) in sag_sessions:
            skips.skip(scan.path, "not acq-sag while this session has acq-sag scans (acq-sag is preferred; "
                                  "select it with a --bids-filter-file to use it)")
            continue
        final.append(scan)
    return final


def _select(candidates: list[Path], bids_dir: Path,
            prefer_sag: bool) -> tuple[list[Scan], list[tuple[Path, str]], list[tuple[Path, str]]]:
    skips = _Skips()
    kept = [c for c in (_candidate(p, bids_dir, skips)
                        for p in _drop_symlink_aliases(candidates, bids_dir, skips.skipped)) if c is not None]
    final = _preferring_sag(kept, skips) if prefer_sag else [s for s, _ in kept]
    final.sort(key=_scan_sort_key)
    unique: list[Scan] = []
    seen: dict[str, Scan] = {}
    for scan in final:
        if scan.key in seen:
            skips.skip(scan.path, f"same entities as {seen[scan.key].relpath}: both would map to the same outputs",
                       logging.WARNING)
            continue
        seen[scan.key] = scan
        unique.append(scan)
    skips.skipped.sort(key=lambda t: t[0].as_posix())
    skips.unusable.sort(key=lambda t: t[0].as_posix())
    return unique, skips.skipped, skips.unusable
