"""Pieces shared by training and evaluation: devices, distributed setup, model and dataset building."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional

import timm
import torch
import torch.distributed as dist

from ..config import ExperimentConfig
from ..data import EvalTransform, TrainTransform, build_dataset
from ..errors import ConfigError
from ..models import create_model
from ..models.registry import get_config


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, dist_info: Optional[DistInfo] = None) -> torch.device:
    """``auto``: CUDA (the process's local rank) when available, else CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    ConfigError for another name or a device this machine does not have."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: this machine has no CUDA GPU that torch can use "
                              f"(torch.cuda.is_available() is False); use cpu or auto (--device cpu, or --set train.device=cpu "
                              f"where the device comes from the config)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        if dist_info is not None and dist_info.world_size > 1:
            return torch.device("cuda", dist_info.local_rank)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name}: MPS (Apple GPU) is not available here; use --device cpu (or auto)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name}: dtop runs on cpu, cuda or mps")
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the OS.

    By default glibc serves blocks above 32 MiB (a 150-class 512x512 score map is 157 MB) with
    ``mmap`` and returns them on ``free``, and trims the heap's top when a forward's activations are
    freed; the next forward then page-faults the same memory in again (about 40 ms for that score map
    on a 2-core CPU). With ``M_MMAP_MAX=0`` and no trimming, memory freed by one forward serves the next.
    The process keeps its peak resident size. Same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``
    in the environment. Returns whether it took effect (False off glibc, e.g. macOS, Windows, musl).
    """
    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (NCCL on CUDA, gloo on CPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def experiment_model(cfg: ExperimentConfig, num_classes: int):
    """The model of an experiment config's ``model`` section, with the dataset's number of classes."""
    overrides = dict(cfg.model.overrides)
    for key, where in (("pretrained", "model.pretrained"), ("num_classes", "the dataset (data.options)")):
        if key in overrides:
            raise ConfigError(f"model.overrides.{key}: set {where} instead; the experiment decides it there")
    return create_model(cfg.model.preset, num_classes=num_classes, pretrained=cfg.model.pretrained, **overrides)


def normalisation(cfg: ExperimentConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the input normalisation, 0..1 scale: ``data.mean``/``data.std`` when set, else the
    backbone's own from timm's pretrained config (``timm.get_pretrained_cfg``), else 0.5 / 0.5."""
    data = cfg.data
    if data.mean is not None and data.std is not None:
        return tuple(data.mean), tuple(data.std)
    backbone = cfg.model.overrides.get("backbone") or get_config(cfg.model.preset).backbone
    pretrained = timm.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
    mean = tuple(pretrained.mean) if pretrained is not None and pretrained.mean else (0.5, 0.5, 0.5)
    std = tuple(pretrained.std) if pretrained is not None and pretrained.std else (0.5, 0.5, 0.5)
    return tuple(data.mean) if data.mean is not None else mean, tuple(data.std) if data.std is not None else std


def experiment_dataset(cfg: ExperimentConfig, split: str, train: bool, **extra: Any):
    """The dataset of an experiment config's ``data`` section, with its train or eval pipeline (normalised
    with :func:`normalisation`) and ``data.ignore_index``. ConfigError when ``data.options`` also sets
    ``ignore_index`` to another value."""
    data = cfg.data
    mean, std = normalisation(cfg)

    if train:
        transform = TrainTransform(crop_size=tuple(data.crop_size), scale=tuple(data.scale) if data.scale else None,
                                   ratio_range=tuple(data.ratio_range), cat_max_ratio=data.cat_max_ratio,
                                   photometric=data.photometric, mean=mean, std=std, ignore_index=data.ignore_index)
        options = dict(data.options)
    else:
        transform = EvalTransform(scale=tuple(data.eval_scale) if data.eval_scale else None,
                                  mean=mean, std=std)
        options = {**data.options, **data.val_options}
    if data.root is not None:
        options["root"] = data.root
    if options.pop("ignore_index", data.ignore_index) != data.ignore_index:
        raise ConfigError(f"the dataset options set ignore_index, data.ignore_index is {data.ignore_index}: "
                          "set it once, as data.ignore_index")
    return build_dataset(data.name, split=split, transform=transform, ignore_index=data.ignore_index,
                         **options, **extra)


def progress_enabled(dist_info: Optional[DistInfo] = None) -> bool:
    """Progress bars only on a terminal, and only on the main process."""
    return sys.stderr.isatty() and (dist_info is None or dist_info.is_main)
