"""Tiny random-weight model folders in the released layouts (a semantic nnU-Net folder and an
instance U-Net folder): real loaders, real inference, seconds on a CPU. Shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path


def build_tiny_model_folders(root: Path) -> tuple[Path, Path]:
    """Write ``root/sem`` (nnU-Net v2 results folder + inference_config.json) and ``root/inst``
    (inference_config.json + one Lightning-style ``*weights*.ckpt``); return both paths."""
    import torch

    from spineps.instance.checkpoint import save_instance_checkpoint
    from spineps.instance.network import InstanceUNet3D
    from spineps.training.instance import TrainConfig, model_config_dict
    from spineps.training.semantic import build_random_model_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sem = build_random_model_folder(root / "sem", folds=1, spacing_pir=(2.0, 2.0, 3.0), patch_rip=(8, 16, 16),
                                        features=(2, 4, 4))
        inst = root / "inst"
        inst.mkdir(parents=True)
        cfg = TrainConfig(out=inst, spacing=(2.0, 2.0, 4.0), cutout_size=(24, 40, 16), corpus_size_cleaning=10,
                          vert_size_threshold=4)
        (inst / "inference_config.json").write_text(json.dumps(model_config_dict(cfg)))
        torch.manual_seed(0)
        save_instance_checkpoint(inst / "model_weights.ckpt", InstanceUNet3D(10, 8))
    finally:
        torch.set_num_threads(threads)
    return sem, inst
