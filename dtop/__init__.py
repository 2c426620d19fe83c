"""dtop: dynamic token pruning (DToP, ICCV 2023) for plain-ViT semantic segmentation."""
from ._version import __version__
from .errors import CheckpointError, ConfigError, DToPError, InputError
from .flops import forward_gflops
from .models import (DToPSegmentor, ReducedSegmentor, SegmentationOutput, SegmentorConfig, StageSpec, build_model,
                     create_model, get_config, list_models, load_model)

__all__ = [
    "create_model", "build_model", "load_model", "get_config", "list_models", "forward_gflops", "DToPSegmentor",
    "ReducedSegmentor", "SegmentationOutput", "SegmentorConfig", "StageSpec", "DToPError", "InputError",
    "ConfigError", "CheckpointError", "__version__",
]
