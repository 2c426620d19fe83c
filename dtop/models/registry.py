"""Named model presets, in the manner of timm's model registry.

Each preset is a function returning a :class:`SegmentorConfig`; :func:`dtop.models.factory.create_model`
builds the model from it with the caller's overrides.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import ConfigError, unknown_name
from .config import SegmentorConfig, StageSpec

_PRESETS: dict[str, Callable[..., SegmentorConfig]] = {}


def register_preset(fn: Callable[..., SegmentorConfig]) -> Callable[..., SegmentorConfig]:
    _PRESETS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_PRESETS)


def _atm(block: int, dim: int) -> StageSpec:
    """An ATM stage head with ONE decoder layer. SegViT's ATM decoder has three layers, one per
    backbone stage; in the DToP layout each stage gets its own head, so each holds one layer.
    This is the layout whose count reproduces the paper's GFLOPs (``docs/method/flops.md``); three
    layers per head (``head_kwargs={"num_layers": 3}``) cost about 4.5 GFLOPs more on ViT-B/512."""
    return StageSpec(block, "atm", {"dim": dim, "num_layers": 1})


def _segmenter(backbone: str, aux_blocks: list[int], final_block: int, atm_dim: int,
               aux_head: str = "atm", p0: float = 0.9) -> SegmentorConfig:
    """Segmenter: mask-transformer final head, CLS through the blocks, cheap auxiliary exit heads."""
    aux = [_atm(b, atm_dim) if aux_head == "atm" else StageSpec(b, aux_head) for b in aux_blocks]
    return SegmentorConfig(backbone=backbone, stages=aux + [StageSpec(final_block, "mask")], p0=p0,
                           cls_mode="segmenter", final_norm=True)


def _segvit(backbone: str, blocks: list[int], atm_dim: int, p0: float = 0.9) -> SegmentorConfig:
    """SegViT in the DToP layout: an ATM head at every stage, CLS dropped before the blocks, no final norm."""
    return SegmentorConfig(backbone=backbone, stages=[_atm(b, atm_dim) for b in blocks], p0=p0,
                           cls_mode="segvit", final_norm=False)


@register_preset
def segmenter_vit_t16(aux_head: str = "atm") -> SegmentorConfig:
    return _segmenter("vit_tiny_patch16_384", [5, 7], 11, 192, aux_head)


@register_preset
def segmenter_vit_s16(aux_head: str = "atm") -> SegmentorConfig:
    return _segmenter("vit_small_patch16_384", [5, 7], 11, 384, aux_head)


@register_preset
def segmenter_vit_b16(aux_head: str = "atm") -> SegmentorConfig:
    return _segmenter("vit_base_patch16_384", [5, 7], 11, 384, aux_head)


@register_preset
def segmenter_vit_l16(aux_head: str = "atm") -> SegmentorConfig:
    return _segmenter("vit_large_patch16_384", [7, 15], 23, 512, aux_head, p0=0.95)


@register_preset
def segvit_vit_t16() -> SegmentorConfig:
    return _segvit("vit_tiny_patch16_384", [5, 7, 11], 192)


@register_preset
def segvit_vit_b16() -> SegmentorConfig:
    return _segvit("vit_base_patch16_384", [5, 7, 11], 384)


@register_preset
def segvit_vit_l16() -> SegmentorConfig:
    return _segvit("vit_large_patch16_384", [7, 15, 23], 512, p0=0.95)


@register_preset
def segvit_dinov2_s14() -> SegmentorConfig:
    """SegViT (ATM heads) on DINOv2 ViT-S/14; pretrained="dinov2_s14_imgfocus" loads the weights dtop fetches."""
    return _segvit("vit_small_patch14_dinov2", [5, 7, 11], 384)


@register_preset
def segvit_dinov2_s14_reg4() -> SegmentorConfig:
    """SegViT on DINOv2 ViT-S/14 with 4 register tokens (dropped with CLS before the blocks)."""
    return _segvit("vit_small_patch14_reg4_dinov2", [5, 7, 11], 384)


@register_preset
def segvit_dinov2_b14() -> SegmentorConfig:
    return _segvit("vit_base_patch14_dinov2", [5, 7, 11], 384)


@register_preset
def segvit_dinov2_l14() -> SegmentorConfig:
    return _segvit("vit_large_patch14_dinov2", [7, 15, 23], 512, p0=0.95)


@register_preset
def segmenter_dinov2_s14(aux_head: str = "atm") -> SegmentorConfig:
    """Segmenter (mask transformer) on DINOv2 ViT-S/14: exits after blocks 5 and 7, final head after 11."""
    return _segmenter("vit_small_patch14_dinov2", [5, 7], 11, 384, aux_head)


@register_preset
def segmenter_dinov2_b14(aux_head: str = "atm") -> SegmentorConfig:
    return _segmenter("vit_base_patch14_dinov2", [5, 7], 11, 384, aux_head)


@register_preset
def segmenter_dinov2_l14(aux_head: str = "atm") -> SegmentorConfig:
    return _segmenter("vit_large_patch14_dinov2", [7, 15], 23, 512, aux_head, p0=0.95)


def get_config(name: str, aux_head: Optional[str] = None, **overrides: Any) -> SegmentorConfig:
    """The preset's config with ``overrides`` (any :class:`SegmentorConfig` field) applied."""
    if name not in _PRESETS:
        raise unknown_name("model preset", name, list_models())
    if aux_head is not None and not name.startswith("segmenter"):
        raise ConfigError(f"aux_head applies to segmenter_* presets only, not {name!r}")
    cfg = _PRESETS[name](aux_head=aux_head) if aux_head is not None else _PRESETS[name]()
    d = cfg.to_dict()
    d.update({k: v for k, v in overrides.items() if v is not None})
    d["name"] = name
    return SegmentorConfig.from_dict(d)
