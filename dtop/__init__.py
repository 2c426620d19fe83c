"""dtop: dynamic token pruning (DToP, ICCV 2023) for plain-ViT semantic segmentation."""
from .errors import CheckpointError, ConfigError, DToPError, InputError
from .models import (DToPSegmentor, SegmentationOutput, SegmentorConfig, StageSpec, create_model, get_config,
                     list_models)

__version__ = "0.1.0"

__all__ = [
    "create_model", "get_config", "list_models", "DToPSegmentor", "SegmentationOutput", "SegmentorConfig",
    "StageSpec", "DToPError", "InputError", "ConfigError", "CheckpointError", "__version__",
]
