"""Losses, one per stage head (``docs/method/training.md``).

ATM heads: presence cross-entropy (absent classes weighted 0.1) plus, for every class present in
the crop, 20 x sigmoid focal + 1 x dice on the stage's mask logits upsampled to label size.
Mask-transformer and linear heads: pixel cross-entropy. Pixels whose token the stage's canvas does
not cover (``StageOutput.valid``) and pixels labelled ``ignore_index`` are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.outputs import SegmentationOutput, StageOutput


def _pixel_valid(valid_tokens: Tensor, label: Tensor, ignore_index: int) -> Tensor:
    """(B, h, w) token mask -> (B, H, W) pixel mask, also excluding ignored pixels."""
    up = F.interpolate(valid_tokens[:, None].float(), size=label.shape[-2:], mode="nearest")[:, 0] > 0.5
    return up & (label != ignore_index)


def sigmoid_focal(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (RetinaNet)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * target + (1 - alpha) * (1 - target)) * loss


def atm_loss(stage: StageOutput, label: Tensor, ignore_index: int = 255, no_object_weight: float = 0.1,
             focal_weight: float = 20.0, dice_weight: float = 1.0) -> dict[str, Tensor]:
    """ATM loss of one stage. stage.logits: (B, K, h, w) mask logits; presence (B, K, 2); label (B, H, W)."""
    B, K = stage.logits.shape[:2]
    valid = _pixel_valid(stage.valid, label, ignore_index)  # (B, H, W)
    safe = torch.where(valid, label, torch.zeros_like(label))
    counts = torch.zeros(B, K, dtype=torch.long, device=label.device)
    counts.scatter_add_(1, safe.flatten(1), valid.flatten(1).long())
    present = counts > 0  # class c occurs among the valid pixels
    target = (~present).long()  # 0 = present, 1 = absent
    weight = torch.tensor([1.0, no_object_weight], device=label.device)
    loss_presence = F.cross_entropy(stage.presence.flatten(0, 1).float(), target.flatten(), weight=weight)

    b_idx, c_idx = present.nonzero(as_tuple=True)
    if len(b_idx) == 0:
        zero = stage.logits.sum() * 0.0
        return {"presence": loss_presence, "focal": zero, "dice": zero}
    masks = F.interpolate(stage.logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    m = masks[b_idx, c_idx].flatten(1)  # (M, H*W)
    t = (safe[b_idx] == c_idx[:, None, None]).flatten(1).float()
    v = valid[b_idx].flatten(1).float()
    n_valid = v.sum(1).clamp_min(1.0)
    focal = (sigmoid_focal(m, t) * v).sum(1) / n_valid
    p = m.sigmoid() * v
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + (t * v).sum(1) + 1)
    return {"presence": loss_presence, "focal": focal_weight * focal.mean(), "dice": dice_weight * dice.mean()}


def pixel_ce_loss(stage: StageOutput, label: Tensor, ignore_index: int = 255) -> dict[str, Tensor]:
    """Cross-entropy of the stage's class logits (B, K, h, w) upsampled to label size."""
    logits = F.interpolate(stage.logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    target = torch.where(_pixel_valid(stage.valid, label, ignore_index), label, torch.full_like(label, ignore_index))
    if not (target != ignore_index).any():
        return {"ce": logits.sum() * 0.0}
    return {"ce": F.cross_entropy(logits, target, ignore_index=ignore_index)}


def segmentation_loss(out: SegmentationOutput, label: Tensor, ignore_index: int = 255) -> tuple[Tensor, dict[str, float]]:
    """Sum of every stage head's loss (weight 1 each). Returns (total, {"s{m}.{part}": value})."""
    total = label.new_zeros((), dtype=torch.float32)
    parts: dict[str, float] = {}
    for m, stage in enumerate(out.stages):
        losses = atm_loss(stage, label, ignore_index) if stage.presence is not None else \
            pixel_ce_loss(stage, label, ignore_index)
        for name, value in losses.items():
            total = total + value
            parts[f"s{m}.{name}"] = float(value.detach())
    return total, parts
