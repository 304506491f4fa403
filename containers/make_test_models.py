#!/usr/bin/env python3
"""Write two tiny RANDOM-weight model folders in the released SPINEPS layouts, for smoke
tests of an image that has no real weights baked in (they check the chain, not accuracy):

    .venv/bin/python containers/make_test_models.py OUT_DIR   ->  OUT_DIR/semantic, OUT_DIR/instance

Never use these folders for real segmentation.
"""

from __future__ import annotations

import sys
from pathlib import Path


def make_test_models(out: Path) -> tuple[Path, Path]:
    """``out/semantic`` (nnU-Net v2 folder, 1 fold) and ``out/instance`` (U-Net checkpoint)."""
    from spineps.training.instance import build_random_instance_folder
    from spineps.training.semantic import build_random_model_folder

    out.mkdir(parents=True, exist_ok=True)
    # patch (16, 32, 32): a demo scan is covered by a few hundred windows (minutes on a busy CPU)
    sem = build_random_model_folder(out / "semantic", folds=1, spacing_pir=(2.0, 2.0, 3.0), patch_rip=(16, 32, 32),
                                    features=(2, 4, 8))
    inst = build_random_instance_folder(out / "instance")
    return sem, inst


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__)
        sys.exit(64)
    make_test_models(Path(sys.argv[1]))
