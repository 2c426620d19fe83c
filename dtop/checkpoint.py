"""Reading and writing weight files: safe loading, atomic saves, and errors that list what does not match.

This module reads and writes files and imports nothing from dtop but its errors; building a model from a
checkpoint is :func:`dtop.models.load_model`.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_MAX_LISTED = 12


def read_file(path: Union[str, Path]):
    """The object in a ``.safetensors`` file or a torch file read with ``weights_only=True``; CheckpointError
    for a missing or unreadable file and for a pickle that needs arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which can run code "
            f"(torch.load weights_only=True failed: {str(e).splitlines()[0]}). Re-save it as a plain "
            f"state dict of tensors or as .safetensors.") from e
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def unwrap_state_dict(obj, source: str = "the checkpoint") -> dict[str, Tensor]:
    """The state dict inside ``obj``: a nested ``state_dict``/``model``/``model_state``/``module`` entry is
    unwrapped and a ``module.`` prefix (DDP) stripped. CheckpointError naming ``source`` and the offending
    keys when it is not a dict of tensors."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} does not hold a state dict of tensors (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source} does not hold a state dict of tensors: non-tensor entries "
                              f"{_listing(sorted(map(str, bad)))}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_state_dict_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` (loaded with ``weights_only=True``) or ``.safetensors`` file
    (:func:`unwrap_state_dict` applied)."""
    return unwrap_state_dict(read_file(path), source=str(path))


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_and_load(module: nn.Module, state: dict[str, Tensor], source: str = "checkpoint",
                   may_miss: tuple[str, ...] = ()) -> list[str]:
    """``module.load_state_dict(state, strict=True)`` with an error listing missing, unexpected
    and wrongly shaped keys, raised before any weight is copied. Keys starting with a prefix in
    ``may_miss`` may be absent (they keep their initialisation); returns those that were."""
    own = module.state_dict()
    allowed = sorted(k for k in set(own) - set(state) if k.startswith(may_miss))
    missing = sorted(set(own) - set(state) - set(allowed))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state, strict=not allowed)
    return allowed


def save_atomic(obj: dict, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash leaves either the old checkpoint or the new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Union[str, Path]) -> dict:
    """A dtop training checkpoint (``weights_only=True``): keys model, model_config, config, iter, ..."""
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a dtop checkpoint (no 'model'/'model_config' entries); "
                              f"published Segmenter/SegViT weights load with dtop.convert.load_into")
    return ckpt
