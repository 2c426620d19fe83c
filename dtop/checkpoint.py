"""Reading and writing weight files: safe loading, atomic saves, errors that list what does not match, and
position tables fitted to a model's patch grid from their true source grid.

This module reads and writes files and imports nothing from dtop but its errors; building a model from a
checkpoint is :func:`dtop.models.load_model`.

Position grids: a ViT's absolute position table holds ``prefix + rows * cols`` vectors in raster order, and the
count alone does not give the shape (300 positions are 15 x 20 or 20 x 15). dtop checkpoints record each table's
(rows, cols) under ``"pos_grid"`` (:func:`position_grids`); :func:`recorded_grids` reads them back (or, for older
checkpoints, infers them from the training ``img_size`` in ``model_config``), and :func:`fit_position_tables`
resamples a table whose grid differs from the model's with timm's ``resample_abs_pos_embed``. A table of unknown,
non-square grid is refused with a :class:`CheckpointError` naming the setting that gives it; never copied as is.
"""
from __future__ import annotations

import math
import numbers
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .errors import CheckpointError

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_MAX_LISTED = 12
GRID_KEY = "pos_grid"  # in a dtop checkpoint: {state-dict key of a position table: [rows, cols]}
Grid = tuple[int, int]


def read_file(path: Union[str, Path]):
    """The object in a ``.safetensors`` file or a torch file read with ``weights_only=True``; CheckpointError
    for a missing or unreadable file and for a pickle that needs arbitrary code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    kind = _not_weights(path)
    if kind:
        raise CheckpointError(f"{path} is {kind}, not a checkpoint: pass the last.pt that `dtop train` wrote into "
                              f"its out_dir (or a .pth/.safetensors weight file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        # a zip-format torch file is memory-mapped: its tensors are read when used, so reading a checkpoint's
        # config (predict, eval, export read it beside load_model) does not read its weights a second time
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which can run code "
            f"(torch.load weights_only=True failed: {str(e).splitlines()[0]}). Re-save it as a plain "
            f"state dict of tensors or as .safetensors.") from e
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF file (WebP image, WAV audio)"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
          (b"%PDF", "a PDF document"), (b"BM", "a BMP image"))


def _not_weights(path: Path) -> Optional[str]:
    """What ``path`` is when its first bytes show it cannot hold weights (an image, a PDF, text), else None.
    torch files start with a zip header (``PK``) or a pickle protocol byte, safetensors with a header length."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if path.suffix != ".safetensors" and head and not head.startswith(b"PK") and head[:1] != b"\x80":
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return "a text file" + (" (YAML: a config? a command that takes one reads it as CONFIG: "
                                "dtop eval CONFIG --checkpoint CKPT)" if path.suffix in (".yaml", ".yml") else "")
    return None


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
                   may_miss: tuple[str, ...] = (), grids: Optional[dict[str, Sequence[int]]] = None) -> list[str]:
    """``module.load_state_dict(state, strict=True)`` with an error listing missing, unexpected
    and wrongly shaped keys, raised before any weight is copied. Keys starting with a prefix in
    ``may_miss`` may be absent (they keep their initialisation); returns those that were.

    Position tables are first fitted to the module's grid (:func:`fit_position_tables`) from ``grids``
    (the checkpoint's recorded grids, :func:`recorded_grids`), square ones inferred when not recorded; a
    downsampled table warns (lossy) and an unrecorded non-square one is a CheckpointError."""
    state, _ = fit_position_tables(module, state, grids, source=source)
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


# ---------------------------------------------------------------------------- position grids
def _position_tables(module: nn.Module) -> dict[str, tuple[Grid, int, int]]:
    """State-dict key of every absolute position table in ``module`` -> (its grid (rows, cols), the number
    of prefix positions before the grid, the patch size): timm ViTs (``pos_embed`` + ``patch_embed.grid_size``)."""
    found = {}
    for name, sub in module.named_modules():
        pos, patch = getattr(sub, "pos_embed", None), getattr(sub, "patch_embed", None)
        if isinstance(pos, Tensor) and getattr(patch, "grid_size", None) is not None:
            prefix = 0 if getattr(sub, "no_embed_class", False) else int(getattr(sub, "num_prefix_tokens", 1))
            grid = (int(patch.grid_size[0]), int(patch.grid_size[1]))
            found[f"{name}.pos_embed" if name else "pos_embed"] = (grid, prefix, int(patch.patch_size[0]))
    return found


def position_grids(module: nn.Module) -> dict[str, list[int]]:
    """{state-dict key: [rows, cols]} of the module's position tables: what a dtop checkpoint records under
    ``"pos_grid"`` beside its weights, e.g. ``{"backbone.vit.pos_embed": [15, 20]}`` for 240 x 320 px, patch 16."""
    return {key: list(grid) for key, (grid, _, _) in _position_tables(module).items()}


def _as_grid(value: Any, what: str) -> Grid:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise CheckpointError(f"{what} must be (rows, cols), two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _config_grid(cfg: Any) -> Optional[Grid]:
    """The patch grid a dtop ``model_config`` trained at: its ``img_size`` (or ``backbone_kwargs['img_size']``)
    over the patch size (``backbone_kwargs['patch_size']`` or ``patchN`` in the timm name); None if unknown."""
    if not isinstance(cfg, dict):
        return None
    kwargs = cfg.get("backbone_kwargs") or {}
    size = cfg.get("img_size") or kwargs.get("img_size")
    m = re.search(r"patch(\d+)", str(cfg.get("backbone", "")))
    patch = kwargs.get("patch_size") or (int(m.group(1)) if m else None)
    if size is None or not patch:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1])


def recorded_grids(ckpt: Any) -> Optional[dict[str, Grid]]:
    """The position grids a dtop checkpoint (the dict with ``model``, ``model_config``, ...) records under
    ``"pos_grid"``; for a checkpoint from before they were recorded, the grid of its ``model_config``'s
    ``img_size`` for every ``*pos_embed`` key; None when neither is there (square tables are then inferred).
    CheckpointError for a malformed record."""
    if not isinstance(ckpt, dict):
        return None
    if ckpt.get(GRID_KEY) is not None:
        grids = ckpt[GRID_KEY]
        if not isinstance(grids, dict):
            raise CheckpointError(f"the checkpoint's {GRID_KEY!r} must map position-table keys to (rows, cols), "
                                  f"got {type(grids).__name__}")
        return {str(k): _as_grid(v, f"{GRID_KEY}[{k!r}]") for k, v in grids.items()}
    grid = _config_grid(ckpt.get("model_config"))
    weights = ckpt.get("model")
    if grid is None or not isinstance(weights, dict):
        return None
    return {k: grid for k in weights if str(k).endswith("pos_embed")}


def source_grid(n: int, grid: Optional[Sequence[int]], name: str, setting: str) -> Grid:
    """The (rows, cols) of a position table of ``n`` grid positions: ``grid`` when known (CheckpointError
    if rows * cols != n), else the square root when ``n`` is a square. A non-square table of unknown grid
    is a CheckpointError naming ``setting`` (how the caller's user gives the grid): it is never guessed."""
    if grid is not None:
        rows, cols = _as_grid(grid, f"the grid of {name}")
        if rows * cols != n:
            raise CheckpointError(f"{name}: the given grid {rows}x{cols} holds {rows * cols} positions but the "
                                  f"table has {n}; give the grid it was trained at ({setting})")
        return rows, cols
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(
            f"{name}: its {n} grid positions are not a square and the checkpoint does not say the grid's shape "
            f"(15x20 and 20x15 both hold 300); give (rows, cols) = training image size / patch size: {setting}")
    return side, side


def resample_positions(pos: Tensor, old: Grid, new: Grid, num_prefix: int, name: str,
                       patch: Optional[int] = None) -> tuple[Tensor, Optional[str], Optional[str]]:
    """A position table (1, num_prefix + old rows * cols, C) resampled to the grid ``new`` with timm's
    ``resample_abs_pos_embed`` (bicubic, prefix positions kept). Returns (table, what was resampled or None
    when the grids are equal, why it is lossy or None): downsampling any side loses information; the message
    names the ``img_size`` that keeps the table exact."""
    from timm.layers import resample_abs_pos_embed

    if tuple(old) == tuple(new):
        return pos, None, None
    out = resample_abs_pos_embed(pos.float(), new_size=list(new), old_size=list(old),
                                 num_prefix_tokens=num_prefix).to(pos.dtype)
    what = f"{name}: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]}"
    return out, what, downsampling(what, old, new, patch)


def downsampling(what: str, old: Grid, new: Grid, patch: Optional[int] = None) -> Optional[str]:
    """Why resampling a position table from grid ``old`` to ``new`` loses information (a side shrinks),
    naming the ``img_size`` (pixels, from ``patch``) that keeps it exact; None when no side shrinks."""
    if new[0] >= old[0] and new[1] >= old[1]:
        return None
    if patch is None:
        fix = ""
    else:
        size = old[0] * patch if old[0] == old[1] else (old[0] * patch, old[1] * patch)
        fix = f"; build the model with img_size={size} to keep it exact"
    return f"{what} downsamples the position table (information lost){fix}"


def fit_position_tables(module: nn.Module, state: dict[str, Tensor], grids: Optional[dict] = None,
                        source: str = "checkpoint", setting: Optional[str] = None
                        ) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """``state`` with each of the module's position tables resampled from its source grid (``grids[key]``,
    else a square one inferred; else CheckpointError naming ``setting``) to the module's grid. Returns
    (state, {"resampled": [...], "lossy": [...]}); every lossy resampling also issues a warning. Tables whose
    channel count differs are left for the shape check."""
    report: dict[str, list[str]] = {"resampled": [], "lossy": []}
    out, tables = dict(state), _position_tables(module)
    own = module.state_dict() if tables else {}
    for key, (new, prefix, patch) in tables.items():
        pos = state.get(key)
        if pos is None or pos.dim() != 3 or pos.shape[-1] != own[key].shape[-1] or pos.shape[1] <= prefix:
            continue
        fix = setting or f"record it in the checkpoint as {GRID_KEY}={{{key!r}: [rows, cols]}}"
        old = source_grid(pos.shape[1] - prefix, (grids or {}).get(key), f"{source}: {key}", fix)
        out[key], what, lossy = resample_positions(pos, old, new, prefix, key, patch)
        report["resampled"] += [what] if what else []
        if lossy:
            report["lossy"].append(lossy)
            warnings.warn(f"{source}: {lossy}", stacklevel=3)
    return out, report
