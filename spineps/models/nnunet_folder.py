"""Loading an nnU-Net v2 trained-model folder (the semantic model folder of the spec).

Layout: ``inference_config.json`` (our contract, ``spineps.models.folder``), ``plans.json``,
``dataset.json`` and ``fold_<k>/checkpoint_final.pth`` (``checkpoint_best.pth`` when final
is missing) for every fold in use.

The network is rebuilt from the plans with nnU-Net's own ``PlansManager`` /
``ConfigurationManager`` and ``get_network_from_plans`` and handed to
``nnUNetPredictor.manual_initialization``; the trainer class named in the checkpoint is never
looked up (that lookup imports every trainer module and crashes on CPU torch). A checkpoint
only needs ``network_weights``, ``init_args.configuration`` and ``trainer_name``.

Everything that can be checked is checked in ``inspect_nnunet_folder`` / ``load_nnunet_folder``
(at load time, before any scan), and every problem is a ``ModelError`` naming the file.

Checkpoints and torch >= 2.6: ``torch.load`` defaults to ``weights_only=True``, which
refuses the numpy scalars/arrays nnU-Net stores in its logging entries. We load with
``weights_only=True`` and an allow-list of the numpy types. A checkpoint that still needs
unrestricted unpickling is refused with ``ModelError`` (unpickling runs whatever code the
file holds) unless the user asked for it explicitly (``--allow-unsafe-checkpoints``, passed
here as ``allow_unsafe``): then it is loaded with ``weights_only=False`` and a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from spineps.errors import ModelError
from spineps.logging_setup import quiet_stdout
from spineps.models.folder import ModelConfig, read_model_config

__all__ = ["NnUNetFolder", "inspect_nnunet_folder", "load_checkpoint", "LoadedNnUNet", "load_nnunet_folder",
           "CHECKPOINT_NAMES", "UNSAFE_OPTION"]

log = logging.getLogger(__name__)

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")


@dataclass(frozen=True)
class NnUNetFolder:
    """What a semantic model folder holds (validated, nothing heavy loaded yet)."""

    path: Path
    config: ModelConfig
    plans: dict
    dataset_json: dict
    folds: tuple[int, ...]
    checkpoints: tuple[Path, ...]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelError(f"invalid nnU-Net model folder: missing {what}", path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"invalid nnU-Net model folder: {what} is not readable JSON ({exc})", path) from None
    if not isinstance(obj, dict):
        raise ModelError(f"invalid nnU-Net model folder: {what} must hold a JSON object", path)
    return obj


def inspect_nnunet_folder(folder: Path, folds: Optional[Sequence[int]] = None) -> NnUNetFolder:
    """Validate the folder's files (config, plans, dataset.json, one checkpoint per fold)
    without importing torch. ``folds`` overrides ``available_folds``."""
    folder = Path(folder)
    config = read_model_config(folder)
    if config.modeltype != "nnunet":
        raise ModelError(f"semantic model folder must have modeltype 'nnunet', got {config.modeltype!r}",
                         folder / "inference_config.json")
    plans = _read_json(folder / "plans.json", "plans.json")
    confs = plans.get("configurations")
    if not isinstance(confs, dict) or not confs:
        raise ModelError("plans.json has no 'configurations' object", folder / "plans.json")
    dataset_json = _read_json(folder / "dataset.json", "dataset.json")
    if not isinstance(dataset_json.get("labels"), dict) or not dataset_json["labels"]:
        raise ModelError("dataset.json has no 'labels' object", folder / "dataset.json")
    use = tuple(config.folds if folds is None else folds)
    if not use:
        raise ModelError("no folds selected", folder)
    if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in use):
        raise ModelError(f"folds must be non-negative integers, got {use!r}", folder)
    ckpts = []
    for f in use:
        fd = folder / f"fold_{f}"
        if not fd.is_dir():
            raise ModelError(f"fold {f} is listed (available_folds) but folder fold_{f} is missing", fd)
        for name in CHECKPOINT_NAMES:
            if (fd / name).is_file():
                ckpts.append(fd / name)
                break
        else:
            raise ModelError(f"fold {f} has no checkpoint ({' or '.join(CHECKPOINT_NAMES)})", fd)
    return NnUNetFolder(folder, config, plans, dataset_json, use, tuple(ckpts))


def _numpy_safe_globals() -> list:
    import numpy as np

    out: list = [np.dtype, np.ndarray, np.bool_, np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                 np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
    try:
        from numpy.core.multiarray import _reconstruct, scalar

        out += [_reconstruct, scalar]
    except ImportError:  # pragma: no cover - numpy layout differs
        pass
    try:
        from numpy._core.multiarray import _reconstruct as r2, scalar as s2

        out += [r2, s2]
    except ImportError:  # pragma: no cover
        pass
    out += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                         "uint8", "uint16", "uint32", "uint64", "bool")]
    return out


#: the option that allows unrestricted unpickling (named in the refusal)
UNSAFE_OPTION = "--allow-unsafe-checkpoints"


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says why (e.g. ``Unsupported global:
    GLOBAL mymodule.Thing``, ``Unsupported operand 103``), not its boilerplate."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error:", 1)[-1].strip()
            return (rest or (lines[i + 1] if i + 1 < len(lines) else line))[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def load_checkpoint(path: Path, allow_unsafe: bool = False) -> dict:
    """``torch.load`` a checkpoint of a model folder on CPU, weights only (see the module
    docstring); ``allow_unsafe`` lets a checkpoint the safe loader refuses be unpickled in
    full. Raises ``ModelError`` when unreadable, refused, or when it lacks the keys inference
    needs."""
    import pickle

    import torch

    path = Path(path)
    try:
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                ck = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            why = _weights_only_reason(exc)
            if "global" not in why.lower():  # not a class outside the allow-list: a broken file
                raise ModelError(f"checkpoint cannot be loaded (corrupt or not a torch checkpoint: {why})",
                                 path) from None
            if not allow_unsafe:
                raise ModelError(f"checkpoint refused by the safe loader (torch.load weights_only=True: {why}); "
                                 f"loading it in full would run any code it holds: only if you trust this model "
                                 f"folder completely, rerun with {UNSAFE_OPTION}", path) from None
            log.warning("%s: the safe loader refused it (%s); unpickling it in full (%s): it may run code",
                        path, why, UNSAFE_OPTION)
            ck = torch.load(str(path), map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, AttributeError,
            ModuleNotFoundError) as exc:
        raise ModelError(f"checkpoint cannot be loaded ({type(exc).__name__}: {str(exc)[:300]})", path) from None
    if not isinstance(ck, dict):
        raise ModelError(f"checkpoint must be a dict, got {type(ck).__name__}", path)
    missing = [k for k in ("network_weights", "init_args", "trainer_name") if k not in ck]
    if missing:
        raise ModelError(f"checkpoint lacks key(s) {', '.join(missing)}", path)
    if not isinstance(ck["network_weights"], dict) or not ck["network_weights"]:
        raise ModelError("checkpoint 'network_weights' must be a non-empty state dict", path)
    if not isinstance(ck["init_args"], dict) or not isinstance(ck["init_args"].get("configuration"), str):
        raise ModelError("checkpoint 'init_args.configuration' must be a string", path)
    if not isinstance(ck["trainer_name"], str):
        raise ModelError("checkpoint 'trainer_name' must be a string", path)
    return ck


@dataclass
class LoadedNnUNet:
    """A folder with its network built and weights loaded, ready for a predictor."""

    folder: NnUNetFolder
    configuration: str
    trainer_name: str
    network: Any  # torch.nn.Module
    parameters: list  # one state dict per fold
    plans_manager: Any
    configuration_manager: Any
    label_manager: Any
    num_outputs: int
    patch_size: tuple[int, ...]
    checkpoint_names: tuple[str, ...] = field(default_factory=tuple)
    mirror_axes: Optional[tuple[int, ...]] = None  # the checkpoint's inference_allowed_mirroring_axes
    num_inputs: int = 1  # input channels (nnU-Net's determine_num_input_channels)


def _configuration(info: NnUNetFolder, cks: list[dict[str, Any]]) -> str:
    """The nnU-Net configuration every fold's checkpoint names (and plans.json holds)."""
    configuration = str(cks[0]["init_args"]["configuration"])
    for p, ck in zip(info.checkpoints[1:], cks[1:]):
        if ck["init_args"]["configuration"] != configuration:
            raise ModelError(f"folds disagree on the configuration ({ck['init_args']['configuration']!r} vs "
                             f"{configuration!r})", p)
    if configuration not in info.plans["configurations"]:
        raise ModelError(f"checkpoint configuration {configuration!r} is not in plans.json "
                         f"({', '.join(info.plans['configurations'])})", info.path / "plans.json")
    return configuration


@dataclass
class _Network:
    """A network built from plans.json and dataset.json, with nnU-Net's managers."""

    network: Any
    plans_manager: Any
    configuration_manager: Any
    label_manager: Any
    n_in: int
    n_out: int
    patch: tuple[int, ...]


def _build_network(info: NnUNetFolder, configuration: str) -> _Network:
    """The network of ``configuration`` (weights not loaded)."""
    from spineps.models.nnunet_import import make_lazy

    make_lazy()  # nnU-Net's image readers import SimpleITK, unused here
    with quiet_stdout(log):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    try:
        with quiet_stdout(log):
            plans_manager = PlansManager(info.plans)
            cm = plans_manager.get_configuration(configuration)
            label_manager = plans_manager.get_label_manager(info.dataset_json)
            n_in = determine_num_input_channels(plans_manager, cm, info.dataset_json)
            n_out = label_manager.num_segmentation_heads
            network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                             cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                             allow_init=False, deep_supervision=False)
            patch = tuple(int(x) for x in cm.patch_size)
    except ModelError:
        raise
    except Exception as exc:  # malformed plans surface as many exception types inside nnU-Net
        raise ModelError(f"cannot build the network from plans.json/dataset.json "
                         f"({type(exc).__name__}: {str(exc)[:300]})", info.path / "plans.json") from None
    return _Network(network, plans_manager, cm, label_manager, int(n_in), int(n_out), patch)


def _check_outputs(info: NnUNetFolder, label_manager: Any, n_in: int, n_out: int) -> None:
    """One input channel, no regions, and every network output mapped by the config's labels."""
    if label_manager.has_regions:
        raise ModelError("region-based nnU-Net models are not supported", info.path / "dataset.json")
    if n_in != 1:
        raise ModelError(f"the semantic model must take one input channel, plans/dataset.json say {n_in}",
                         info.path / "dataset.json")
    cfg_labels = info.config.labels
    outside = sorted(k for k in cfg_labels if not 0 <= k < n_out)
    if outside:
        raise ModelError(f"inference_config.json 'labels' maps output index(es) {outside} the network does not "
                         f"have (it has {n_out} outputs)", info.path / "inference_config.json")
    unmapped = sorted(set(range(n_out)) - set(cfg_labels))
    if unmapped:
        raise ModelError(f"network output index(es) {unmapped} have no entry in inference_config.json 'labels'",
                         info.path / "inference_config.json")


def load_nnunet_folder(folder: Path, folds: Optional[Sequence[int]] = None, *,
                       allow_unsafe: bool = False) -> LoadedNnUNet:
    """Validate and load everything inference needs; all problems -> ``ModelError``.
    ``allow_unsafe``: see :func:`load_checkpoint`."""
    info = inspect_nnunet_folder(folder, folds)
    cks = [load_checkpoint(p, allow_unsafe) for p in info.checkpoints]
    configuration = _configuration(info, cks)
    net = _build_network(info, configuration)
    _check_outputs(info, net.label_manager, net.n_in, net.n_out)
    network = net.network
    params = []
    for p, ck in zip(info.checkpoints, cks):
        try:
            network.load_state_dict(ck["network_weights"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ModelError(f"checkpoint weights do not fit the network of plans.json "
                             f"({str(exc).splitlines()[0][:300]})", p) from None
        params.append(ck["network_weights"])
    network.load_state_dict(params[0])
    network.eval()
    axes = cks[0].get("inference_allowed_mirroring_axes")
    mirror_axes = tuple(int(a) for a in axes) if isinstance(axes, (list, tuple)) and axes else None
    return LoadedNnUNet(info, configuration, cks[0]["trainer_name"], network, params, net.plans_manager,
                        net.configuration_manager, net.label_manager, net.n_out, net.patch,
                        tuple(str(p.relative_to(info.path)) for p in info.checkpoints), mirror_axes, net.n_in)
