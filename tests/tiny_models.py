"""Tiny random-weight model folders in the released layouts (a semantic nnU-Net folder and an
instance U-Net folder): real loaders, real inference, seconds on a CPU. Shared by the tests."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model_folders(root: Path) -> tuple[Path, Path]:
    """Write ``root/sem`` (nnU-Net v2 results folder + inference_config.json) and ``root/inst``
    (inference_config.json + one Lightning-style ``*weights*.ckpt``); return both paths."""
    import torch

    from spineps.training.instance import build_random_instance_folder
    from spineps.training.semantic import build_random_model_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sem = build_random_model_folder(root / "sem", folds=1, spacing_pir=(2.0, 2.0, 3.0), patch_rip=(8, 16, 16),
                                        features=(2, 4, 4))
        inst = build_random_instance_folder(root / "inst")
    finally:
        torch.set_num_threads(threads)
    return sem, inst
