"""Image geometry: the Volume type, NIfTI loading, orientation, resampling and cropping.

Every spatial transform sits beside its inverse (to_orientation / from_orientation,
to_spacing / back_to_grid, crop_to_bbox / uncrop) and each round trip is tested.
"""

from spineps.geometry.volume import Volume

__all__ = ["Volume"]
