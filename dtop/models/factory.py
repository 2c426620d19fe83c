"""One factory for every segmentor: from a preset name, from a config, or from a dtop checkpoint with its
config beside the weights (in the manner of Segmenter's ``load_model`` and timm's ``create_model``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..checkpoint import check_and_load, load_checkpoint, position_grids, recorded_grids
from .config import ReductionSpec, SegmentorConfig
from .reduction import ReducedSegmentor
from .registry import get_config
from .segmentor import DToPSegmentor, Segmentor


def build_model(cfg: SegmentorConfig) -> Segmentor:
    """The segmentor ``cfg`` describes: a :class:`DToPSegmentor`, or a :class:`ReducedSegmentor` when
    ``cfg.reduction`` is set. Raises ConfigError for inconsistent settings."""
    return ReducedSegmentor(cfg) if cfg.reduction is not None else DToPSegmentor(cfg)


def create_model(name: str, num_classes: int = 150, p0: Union[float, list[float], None] = None,
                 pretrained: Union[bool, str] = False, aux_head: Optional[str] = None, **overrides: Any) -> Segmentor:
    """Build a preset: ``dtop.create_model("segvit_vit_b16", num_classes=150, p0=0.9)``.

    pretrained: True for timm hub weights (online), or a local ``.pth``/``.safetensors`` path.
    overrides: any :class:`SegmentorConfig` field (``stages``, ``topk``, ``backbone_kwargs``,
    ``reduction``, ...). Raises ConfigError for an unknown preset or field.
    """
    cfg = get_config(name, aux_head=aux_head, num_classes=num_classes, p0=p0, pretrained=pretrained, **overrides)
    return build_model(cfg)


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
               reduction: Optional[ReductionSpec] = None) -> Segmentor:
    """Rebuild the segmentor of a dtop checkpoint from the model config saved beside its weights, and
    load them (CheckpointError listing what does not match). ``reduction`` applies a token-reduction
    alternative to the checkpoint's model: training-free for Expedite, pooling, sampling and shrunk
    (which reuse the weights); a convolution absent from the checkpoint starts as its 2x2 average.
    The position table is taken on the grid the checkpoint records (``pos_grid``); one saved before grids were
    recorded is on the grid of its own config, which rebuilt the model."""
    ckpt = load_checkpoint(path)
    extra = {"reduction": reduction} if reduction is not None else {}
    model = build_model(SegmentorConfig.from_dict({**ckpt["model_config"], "pretrained": False, **extra}))
    check_and_load(model, ckpt["model"], source=str(path), may_miss=("reducer.",) if reduction is not None else (),
                   grids=recorded_grids(ckpt) or position_grids(model))
    return model.to(device)
