"""Image geometry: the Volume type, NIfTI loading, orientation, resampling and cropping.

Every spatial transform sits beside its inverse (to_orientation / from_orientation,
to_spacing / back_to_grid, crop_to_bbox / uncrop, crop_or_pad / paste_cutout) and each round
trip is tested. Importing this package loads numpy only (nibabel and scipy are imported by
the functions that need them).
"""

from spineps.geometry.cropping import Crop, bbox_of, crop_or_pad, crop_to_bbox, paste_cutout, uncrop
from spineps.geometry.io import HeaderInfo, load_volume, read_header, save_volume
from spineps.geometry.orientation import (Reorientation, from_orientation, is_sagittal, through_plane_axis,
                                          to_orientation)
from spineps.geometry.resampling import back_to_grid, resample_labels, resample_to_grid, to_spacing
from spineps.geometry.volume import Volume

__all__ = [
    "Volume",
    "HeaderInfo",
    "read_header",
    "load_volume",
    "save_volume",
    "Reorientation",
    "to_orientation",
    "from_orientation",
    "through_plane_axis",
    "is_sagittal",
    "to_spacing",
    "resample_to_grid",
    "resample_labels",
    "back_to_grid",
    "Crop",
    "bbox_of",
    "crop_to_bbox",
    "uncrop",
    "crop_or_pad",
    "paste_cutout",
]
