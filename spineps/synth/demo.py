"""A small BIDS dataset of rendered phantoms with reference masks, for demos and tests.

Layout (``n_subjects=3``)::

    out_dir/
      dataset_description.json  participants.tsv  participants.json  README
      sub-01/anat/sub-01_acq-sag_T2w.nii.gz (+ .json)     lumbar, 1.0 x 1.0 x 3.3 mm, P-I-R
      sub-02/anat/sub-02_acq-sag_T2w.nii.gz (+ .json)     thoracolumbar, 1.1 x 1.1 x 3.5 mm, A-S-R
      sub-03/anat/sub-03_acq-sag_T2w.nii.gz (+ .json)     whole spine, 1.4 x 1.4 x 4.0 mm, P-I-L
      derivatives/reference/
        dataset_description.json  desc-spine_dseg.tsv  desc-vertebrae_dseg.tsv
        sub-XX/anat/sub-XX_acq-sag_desc-spine_dseg.nii.gz       semantic (endplates split 52/53)
        sub-XX/anat/sub-XX_acq-sag_desc-vertebrae_dseg.nii.gz   instances (1..28, 100+X, 200+X)

More subjects cycle through the three fields of view with other seeds. Everything is
deterministic in ``seed``; all files are written atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from spineps import labels as L
from spineps.fsutil import write_json_atomic, write_text_atomic
from spineps.geometry.io import save_volume
from spineps.synth.anatomy import PhantomSpec, make_phantom
from spineps.synth.render import render_t2w

__all__ = ["DemoSubject", "DEMO_SUBJECTS", "demo_specs", "write_demo_dataset", "scan_sidecar",
           "write_dataset_files"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSubject:
    fov: str
    spacing: tuple[float, float, float]
    orientation: tuple[str, str, str]
    field_strength: float


DEMO_SUBJECTS: tuple[DemoSubject, ...] = (
    DemoSubject("lumbar", (1.0, 1.0, 3.3), ("P", "I", "R"), 1.5),
    DemoSubject("thoracolumbar", (1.1, 1.1, 3.5), ("A", "S", "R"), 3.0),
    DemoSubject("whole", (1.4, 1.4, 4.0), ("P", "I", "L"), 1.5),
)


def demo_specs(n_subjects: int = 3, seed: int = 0) -> list[PhantomSpec]:
    """The phantom specs of the demo subjects (sub-01, sub-02, ...)."""
    rng = np.random.default_rng([int(seed), 31337])
    specs = []
    for i in range(n_subjects):
        d = DEMO_SUBJECTS[i % len(DEMO_SUBJECTS)]
        specs.append(PhantomSpec(
            seed=int(rng.integers(0, 2 ** 31 - 1)), fov=d.fov, spacing=d.spacing, orientation=d.orientation,
            scoliosis=float(rng.choice([0.0, 0.0, 12.0])) if i >= len(DEMO_SUBJECTS) else 0.0,
            lr_half_width=None, stations=2 if d.fov == "whole" else 1,
        ))
    return specs


def _dseg_tsv(rows: Sequence[tuple[int, str, str, str, object]]) -> str:
    lines = ["index\tname\tabbreviation\tcolor\tmapping"]
    for value, name, abbr, color, mapping in rows:
        lines.append(f"{value}\t{name}\t{abbr}\t{color}\t{'n/a' if mapping is None else mapping}")
    return "\n".join(lines) + "\n"


def _readme(n: int) -> str:
    return (
        "# SPINEPS synthetic demo dataset\n\n"
        f"{n} synthetic subjects: sagittal T2-weighted TSE images rendered from spine phantoms made by\n"
        "`spineps.synth` (anatomical label maps along a curved centre-line, realistic T2w tissue\n"
        "contrast, partial volume of thick sagittal slices, bias field, Rician noise).\n"
        "No real person was imaged. Reference masks are in `derivatives/reference`\n"
        "(`desc-spine_dseg`: semantic structures; `desc-vertebrae_dseg`: vertebra instances 1..28,\n"
        "discs 100+X, endplates 200+X). Label tables: `derivatives/reference/desc-*_dseg.tsv`.\n\n"
        "Regenerate with `spineps.synth.demo.write_demo_dataset(out_dir, n_subjects=..., seed=...)`;\n"
        "the output is deterministic given the seed.\n"
    )


def scan_sidecar(spacing: Sequence[float], orientation: Sequence[str], field_strength: float) -> dict:
    """The JSON sidecar of a synthetic sagittal T2w TSE scan (slice thickness = the L-R spacing)."""
    lr_axis = [k for k, c in enumerate(orientation) if c in "LR"][0]
    return {
        "Modality": "MR",
        "MagneticFieldStrength": field_strength,
        "Manufacturer": "synthetic",
        "ManufacturersModelName": "spineps.synth phantom",
        "MRAcquisitionType": "2D",
        "ScanningSequence": "SE",
        "SequenceVariant": "SK",
        "SequenceName": "tse",
        "RepetitionTime": 3.5,
        "EchoTime": 0.1,
        "FlipAngle": 90,
        "SliceThickness": float(spacing[lr_axis]),
        "EchoTrainLength": 17,
    }


def write_dataset_files(out: Path, *, name: str, description: str, readme: Optional[str] = None) -> Path:
    """``dataset_description.json`` (and ``README``) of a synthetic raw dataset in ``out`` and
    the description and lookup tables of its ``derivatives/reference``; returns the latter."""
    from spineps import __version__

    write_json_atomic(out / "dataset_description.json", {
        "Name": name,
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["spineps contributors"],
        "GeneratedBy": [{"Name": "spineps.synth", "Version": __version__, "Description": description}],
    })
    write_text_atomic(out / "README", readme or f"# {name}\n\nSynthetic phantoms made by `spineps.synth` "
                                                 f"({description}); no real person was imaged.\n")
    ref = out / "derivatives" / "reference"
    write_json_atomic(ref / "dataset_description.json", {
        "Name": "Reference masks of the synthetic phantoms",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "spineps.synth", "Version": __version__,
                         "Description": "ground-truth label maps the images were rendered from"}],
        "SourceDatasets": [{"URL": "file://../../"}],
    })
    sem_rows = [(lab.value, lab.name, lab.abbreviation, lab.color, lab.mapping) for lab in L.SEMANTIC]
    ins_rows = [(lab.value, lab.name, lab.abbreviation, lab.color, lab.mapping) for lab in L.instance_labels()]
    write_text_atomic(ref / "desc-spine_dseg.tsv", _dseg_tsv(sem_rows))
    write_text_atomic(ref / "desc-vertebrae_dseg.tsv", _dseg_tsv(ins_rows))
    return ref


def write_demo_dataset(out_dir: Union[str, Path], *, n_subjects: int = 3, seed: int = 0) -> Path:
    """Write the demo BIDS dataset into ``out_dir`` (created if needed) and return it."""
    out = Path(out_dir)
    t0 = time.perf_counter()
    specs = demo_specs(n_subjects, seed)
    ref = write_dataset_files(out, name="SPINEPS synthetic spine phantoms (demo)",
                              description=f"write_demo_dataset(n_subjects={n_subjects}, seed={seed})",
                              readme=_readme(n_subjects))
    rows = ["participant_id\tspecies\tfov\tphantom_seed"]
    for i, spec in enumerate(specs, start=1):
        sub = f"sub-{i:02d}"
        d = DEMO_SUBJECTS[(i - 1) % len(DEMO_SUBJECTS)]
        ph = make_phantom(spec)
        img = render_t2w(ph, seed=spec.seed)
        anat = out / sub / "anat"
        img = img.with_data(np.clip(np.rint(img.data), 0, 32767).astype(np.int16))  # as scanners store it
        save_volume(img, anat / f"{sub}_acq-sag_T2w.nii.gz", dtype=np.int16)
        write_json_atomic(anat / f"{sub}_acq-sag_T2w.json", scan_sidecar(spec.spacing, spec.orientation,
                                                                          d.field_strength))
        sem = ph.semantic_split()
        save_volume(sem, ref / sub / "anat" / f"{sub}_acq-sag_desc-spine_dseg.nii.gz")
        save_volume(ph.instance, ref / sub / "anat" / f"{sub}_acq-sag_desc-vertebrae_dseg.nii.gz")
        rows.append(f"{sub}\thomo sapiens\t{spec.fov}\t{spec.seed}")
        log.info("demo %s: %s %s levels %s", sub, spec.fov, img.shape,
                 [L.vertebra_name(v) for v in ph.levels])
    write_text_atomic(out / "participants.tsv", "\n".join(rows) + "\n")
    write_json_atomic(out / "participants.json", {
        "species": {"Description": "species of the (simulated) participant"},
        "fov": {"Description": "field of view of the synthetic scan",
                "Levels": {"lumbar": "T11 to sacrum", "thoracolumbar": "T8 to sacrum",
                           "whole": "skull base to sacrum", "cervical": "C1 to T2",
                           "thoracic": "C7 to L1", "cervicothoracic": "C1 to T8"}},
        "phantom_seed": {"Description": "seed of spineps.synth.anatomy.PhantomSpec"},
    })
    log.info("demo dataset with %d subjects written to %s in %.1f s", n_subjects, out, time.perf_counter() - t0)
    return out
