"""Reading and writing instance-model checkpoints in the released (PyTorch-Lightning) format.

A checkpoint is a torch zip file whose top-level dict holds ``epoch``, ``global_step``,
``pytorch-lightning_version``, ``state_dict`` (every key prefixed ``network.``), ``loops``,
``hparams_name`` and ``hyper_parameters``. The released files keep an
``argparse.Namespace`` in ``hyper_parameters``, which ``torch.load(weights_only=True)``
refuses; we allow-list exactly that class (``torch.serialization.safe_globals``) and never
fall back to unrestricted unpickling, so a checkpoint that smuggles any other class in is
rejected with ``ModelError``.

The network variant (width ``dim``, input channels) is read from the shapes of
``init_conv.weight`` (``[dim, in_channels, 7, 7, 7]``); a state dict whose names or shapes
do not match ``InstanceUNet3D`` exactly raises ``ModelError`` at load time.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from spineps.errors import ModelError
from spineps.fsutil import atomic_path
from spineps.instance.network import N_CLASSES, InstanceUNet3D

__all__ = [
    "LoadedInstanceModel",
    "load_instance_checkpoint",
    "save_instance_checkpoint",
    "read_checkpoint_dict",
    "network_state_dict",
    "detect_variant",
    "STATE_PREFIX",
    "LIGHTNING_VERSION",
    "REFERENCE_OPT_DEFAULTS",
]

log = logging.getLogger(__name__)

STATE_PREFIX = "network."
#: written into checkpoints we save; the reference reads only ``state_dict``
LIGHTNING_VERSION = "2.1.0"
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]
#: training hyper-parameters the reference's Lightning module reads when it restores a
#: checkpoint (values are only used for training; the paper's recipe where we have none)
REFERENCE_OPT_DEFAULTS: dict[str, Any] = {"channelwise": True, "n_epoch": 0, "lr": 1e-4, "lr_end_factor": 0.01,
                                          "l2_reg_w": 0.0, "dsc_loss_w": 1.0}


@dataclass
class LoadedInstanceModel:
    network: InstanceUNet3D
    in_channels: int
    dim: int
    path: Path
    meta: dict[str, Any]


def read_checkpoint_dict(path: Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` and only ``argparse.Namespace`` allow-listed."""
    path = Path(path)
    if not path.is_file():
        raise ModelError("instance checkpoint does not exist", path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read instance checkpoint safely (weights_only): {msg}", path) from None
    if not isinstance(obj, dict):
        raise ModelError(f"instance checkpoint holds a {type(obj).__name__}, expected a dict", path)
    return obj


def network_state_dict(ckpt: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The network's parameters from a Lightning checkpoint (``network.`` prefix removed);
    a bare state dict with or without the prefix is accepted too."""
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping):
        raise ModelError("instance checkpoint has no 'state_dict' mapping", path)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            continue
        out[k[len(STATE_PREFIX):] if k.startswith(STATE_PREFIX) else k] = v
    if not out:
        raise ModelError("instance checkpoint's state_dict holds no tensors", path)
    return out


def detect_variant(sd: Mapping[str, torch.Tensor], path: Path) -> tuple[int, int]:
    """``(in_channels, dim)`` from ``init_conv.weight``'s shape."""
    w = sd.get("init_conv.weight")
    if w is None or w.ndim != 5 or tuple(w.shape[2:]) != (7, 7, 7):
        raise ModelError("not an instance U-Net checkpoint: no init_conv.weight of shape [dim, in, 7, 7, 7]", path)
    dim, in_ch = int(w.shape[0]), int(w.shape[1])
    fc = sd.get("final_conv.weight")
    if fc is None or tuple(fc.shape) != (N_CLASSES, dim, 1, 1, 1):
        got = None if fc is None else tuple(fc.shape)
        raise ModelError(f"not an instance U-Net checkpoint: final_conv.weight is {got}, "
                         f"expected {(N_CLASSES, dim, 1, 1, 1)}", path)
    if dim % 8:
        raise ModelError(f"instance U-Net width {dim} is not a multiple of 8", path)
    return in_ch, dim


def load_instance_checkpoint(path: Path, device: str | torch.device = "cpu") -> LoadedInstanceModel:
    """Build ``InstanceUNet3D`` for the checkpoint's variant and load its weights (strict:
    every name and shape must match). The network is returned in eval mode on ``device``."""
    path = Path(path)
    ckpt = read_checkpoint_dict(path)
    sd = network_state_dict(ckpt, path)
    in_ch, dim = detect_variant(sd, path)
    net = InstanceUNet3D(in_channels=in_ch, dim=dim)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs "
                         f"{tuple(expected[k].shape)})")
        raise ModelError("checkpoint does not match the instance U-Net architecture: " + "; ".join(parts), path)
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    net.eval().to(device)
    meta: dict[str, Any] = {k: ckpt[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in ckpt}
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping):
        meta["hyper_parameters"] = {k: (vars(v) if isinstance(v, argparse.Namespace) else v) for k, v in hp.items()}
    log.info("loaded instance U-Net (dim %d, %d input channels) from %s", dim, in_ch, path)
    return LoadedInstanceModel(network=net, in_channels=in_ch, dim=dim, path=path, meta=meta)


def save_instance_checkpoint(path: Path, network: InstanceUNet3D, *, epoch: int = 0, global_step: int = 0,
                             hyper_parameters: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``network`` as a Lightning-style checkpoint (atomically).

    ``hyper_parameters`` are stored as an ``argparse.Namespace`` under ``opt`` like the
    released files, completed with what the reference implementation's Lightning module
    (``PLNet.load_from_checkpoint``) rebuilds the network from: ``num_channels`` and ``dim``
    beside ``opt``, and ``opt.channelwise`` (one-hot input), ``n_epoch``, ``lr``,
    ``lr_end_factor``, ``l2_reg_w``, ``dsc_loss_w``. So a folder we write loads in SPINEPS
    itself too, whatever its width."""
    path = Path(path)
    sd = {STATE_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous().clone()
          for k, v in network.state_dict().items()}
    in_ch, dim = int(network.init_conv.weight.shape[1]), int(network.init_conv.weight.shape[0])
    opt = argparse.Namespace(**{**REFERENCE_OPT_DEFAULTS, **dict(hyper_parameters or {}), "channelwise": True})
    ckpt = {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": sd,
        "loops": {},
        "hparams_name": "kwargs",
        "hyper_parameters": {"opt": opt, "do2D": False, "num_channels": in_ch, "dim": dim},
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path
