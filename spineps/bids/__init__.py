"""BIDS input and output: scan discovery, derivative names and files, validation.

Importing this package is cheap (standard library only); pybids, nibabel and
bidsschematools are imported inside the functions that need them.
"""

from .derivatives import (
    CENTROIDS,
    FIGURE,
    INSTANCE_MASK,
    INSTANCE_SIDECAR,
    SEMANTIC_MASK,
    SEMANTIC_SIDECAR,
    OutputKind,
    derivative_dir,
    derivative_name,
    derivative_path,
    expected_outputs,
    make_sidecar,
    write_bidsignore,
    write_dataset_description,
    write_lookup_tables,
    write_sidecar,
)
from .discovery import Discovery, Scan, discover_scans, load_bids_filters
from .validation import ValidationReport, check_names_with_schema, find_validator, validate_dataset

__all__ = [
    "CENTROIDS",
    "FIGURE",
    "INSTANCE_MASK",
    "INSTANCE_SIDECAR",
    "SEMANTIC_MASK",
    "SEMANTIC_SIDECAR",
    "OutputKind",
    "Discovery",
    "Scan",
    "ValidationReport",
    "check_names_with_schema",
    "derivative_dir",
    "derivative_name",
    "derivative_path",
    "discover_scans",
    "expected_outputs",
    "find_validator",
    "load_bids_filters",
    "make_sidecar",
    "validate_dataset",
    "write_bidsignore",
    "write_dataset_description",
    "write_lookup_tables",
    "write_sidecar",
]
