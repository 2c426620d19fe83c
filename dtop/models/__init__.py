"""Models: timm ViT backbone, stage heads, the DToP segmentor and its presets."""
from .backbone import ViTBackbone
from .config import SegmentorConfig, StageSpec
from .heads import HEADS, ATMHead, HeadOutput, LinearHead, MaskTransformerHead
from .registry import create_model, get_config, list_models, register_preset
from .segmentor import DToPSegmentor, SegmentationOutput, StageOutput, set_fused_attn

__all__ = [
    "ViTBackbone", "SegmentorConfig", "StageSpec", "HEADS", "ATMHead", "HeadOutput", "LinearHead",
    "MaskTransformerHead", "create_model", "get_config", "list_models", "register_preset", "DToPSegmentor",
    "SegmentationOutput", "StageOutput", "set_fused_attn",
]
