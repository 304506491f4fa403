#!/usr/bin/env python3
"""Write two tiny RANDOM-weight model folders in the released SPINEPS layouts, for smoke
tests of an image that has no real weights baked in (they check the chain, not accuracy):

    .venv/bin/python containers/make_test_models.py OUT_DIR   ->  OUT_DIR/semantic, OUT_DIR/instance

Never use these folders for real segmentation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def make_test_models(out: Path) -> tuple[Path, Path]:
    """``out/semantic`` (nnU-Net v2 folder, 1 fold) and ``out/instance`` (U-Net checkpoint)."""
    import torch

    from spineps.instance.checkpoint import save_instance_checkpoint
    from spineps.instance.network import InstanceUNet3D
    from spineps.training.instance import TrainConfig, model_config_dict
    from spineps.training.semantic import build_random_model_folder

    out.mkdir(parents=True, exist_ok=True)
    # patch (16, 32, 32): a demo scan is covered by a few hundred windows (minutes on a busy CPU)
    sem = build_random_model_folder(out / "semantic", folds=1, spacing_pir=(2.0, 2.0, 3.0), patch_rip=(16, 32, 32),
                                    features=(2, 4, 8))
    inst = out / "instance"
    inst.mkdir(exist_ok=True)
    cfg = TrainConfig(out=inst, spacing=(2.0, 2.0, 4.0), cutout_size=(24, 40, 16), corpus_size_cleaning=10,
                      vert_size_threshold=4)
    (inst / "inference_config.json").write_text(json.dumps(model_config_dict(cfg)))
    torch.manual_seed(0)
    save_instance_checkpoint(inst / "model_weights.ckpt", InstanceUNet3D(10, 8))
    return sem, inst


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__)
        sys.exit(64)
    make_test_models(Path(sys.argv[1]))
