"""Reading weight files safely and loading them with errors that list what does not match."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_MAX_LISTED = 12


def _read(path: Union[str, Path]):
    """The object in a ``.safetensors`` file or a torch file read with ``weights_only=True``."""
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


def load_state_dict_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.bin`` (loaded with ``weights_only=True``) or ``.safetensors`` file.

    A nested ``state_dict``/``model`` entry is unwrapped and a ``module.`` prefix (DDP) stripped.
    """
    state = _read(path)
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


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
    import os

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
    ckpt = _read(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a dtop checkpoint (no 'model'/'model_config' entries); "
                              f"published Segmenter/SegViT weights load with dtop.convert.load_into")
    return ckpt


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu", reduction=None):
    """Rebuild a :class:`DToPSegmentor` from a dtop checkpoint and load its weights. ``reduction``
    (a :class:`~dtop.models.config.ReductionSpec`) applies a token-reduction alternative to the
    checkpoint's model: training-free for Expedite, pooling, sampling and shrunk (which reuse the
    weights); a convolution absent from the checkpoint starts as its 2x2 average."""
    from .models import DToPSegmentor, SegmentorConfig

    ckpt = load_checkpoint(path)
    extra = {"reduction": reduction} if reduction is not None else {}
    mcfg = SegmentorConfig.from_dict({**ckpt["model_config"], "pretrained": False, **extra})
    model = DToPSegmentor(mcfg)
    check_and_load(model, ckpt["model"], source=str(path), may_miss=("reducer.",) if reduction is not None else ())
    return model.to(device)
