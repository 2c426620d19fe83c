"""Shared helpers: tiny models (4 blocks, 64 channels) that run in milliseconds on CPU."""
from __future__ import annotations

import pytest
import torch

from dtop.flops import forward_gflops
from dtop.models import DToPSegmentor, SegmentorConfig, StageSpec
from dtop.pruning import confidence

TINY = dict(embed_dim=64, depth=4, num_heads=2)
DINOV2_TINY = dict(backbone="vit_small_patch14_reg4_dinov2", img_size=56)  # patch 14, LayerScale, 4 registers
HEAD_KWARGS = {"atm": {"dim": 32, "num_layers": 2}, "mask": {"dim": 64, "num_layers": 1}, "linear": {}}


def tiny_model(heads=("atm", "atm", "atm"), blocks=(1, 2, 3), cls_mode="segvit", p0=1.0, num_classes=5,
               final_norm=None, topk=5, seed=0, backbone="vit_tiny_patch16_224", **backbone_kwargs) -> DToPSegmentor:
    """A 4-block, 64-channel segmentor; ``backbone``/``backbone_kwargs`` swap the timm architecture
    (DINOV2_TINY: patch 14, LayerScale, 4 register tokens)."""
    torch.manual_seed(seed)
    cfg = SegmentorConfig(
        backbone=backbone, num_classes=num_classes,
        stages=[StageSpec(b, h, dict(HEAD_KWARGS[h])) for b, h in zip(blocks, heads)],
        p0=p0, topk=topk, cls_mode=cls_mode,
        final_norm=(cls_mode == "segmenter") if final_norm is None else final_norm,
        backbone_kwargs={**TINY, **backbone_kwargs})
    return DToPSegmentor(cfg).eval()


def gflops(model, out) -> torch.Tensor:
    """(B,) GFLOPs of the forward that returned ``out`` (the model does not count them itself)."""
    return forward_gflops(model, out)


def images(batch=2, h=64, w=96, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


def stage_confidence(model: DToPSegmentor, images_: torch.Tensor, stage: int = 0) -> torch.Tensor:
    """Confidence of every token at ``stage`` computed without pruning, (B, N)."""
    x, _ = model.backbone.embed(images_)
    for blk in model.backbone.blocks[: model.stage_blocks[stage] + 1]:
        x = blk(x)
    return confidence(model.decode(stage, x[:, model.backbone.prefix_in_blocks:]).probs())[0]


def p0_at_quantile(model, images_, q=0.5, stage=0) -> float:
    """A threshold that makes about a fraction 1-q of the stage's tokens easy."""
    with torch.no_grad():
        return float(torch.quantile(stage_confidence(model, images_, stage).flatten(), q))


HEAD_SETS = {
    "atm": ("atm", "atm", "atm"),
    "mask": ("mask", "mask", "mask"),
    "linear": ("linear", "linear", "linear"),
    "mixed": ("atm", "linear", "mask"),
}
CLS_MODES = ["segvit", "segmenter"]


@pytest.fixture(params=list(HEAD_SETS))
def head_set(request):
    return HEAD_SETS[request.param]
