"""Models: timm ViT backbone, stage heads, token layouts, the DToP segmentor, the supplement's
alternatives, presets and the factory that builds them."""
from .backbone import ViTBackbone
from .config import ReductionSpec, SegmentorConfig, StageSpec
from .factory import build_model, create_model, load_model
from .heads import HEADS, ATMHead, HeadOutput, LinearHead, MaskTransformerHead
from .layouts import LAYOUTS, TokenLayout
from .outputs import SegmentationOutput, StageOutput
from .reduction import ReducedSegmentor
from .registry import get_config, list_models, register_preset
from .segmentor import DToPSegmentor, Segmentor, set_fused_attn

__all__ = [
    "ViTBackbone", "SegmentorConfig", "StageSpec", "ReductionSpec", "HEADS", "ATMHead", "HeadOutput", "LinearHead",
    "MaskTransformerHead", "create_model", "build_model", "load_model", "get_config", "list_models",
    "register_preset", "Segmentor", "DToPSegmentor", "ReducedSegmentor", "SegmentationOutput", "StageOutput",
    "LAYOUTS", "TokenLayout", "set_fused_attn",
]
