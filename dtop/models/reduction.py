"""Token-reduction alternatives to DToP, from the paper's supplement (``docs/method/alternatives.md``).

Each alternative shrinks the token grid once, at a fixed block, for every image alike; the heads then
decode the reduced tokens and their outputs are brought back to the full token grid:

- symmetric downsampling (``conv``, ``avgpool``, ``nearest``): (h, w) -> (ceil(h/2), ceil(w/2)) after
  a block; head outputs are upsampled bilinearly (:func:`upsample_tokens`);
- SegViT shrunk (``shrunk``): one block runs with the stride-2 subsampled tokens as queries over all
  tokens as keys/values (:func:`dtop.models.blocks.query_downsample_block`); outputs upsampled as above;
- Expedite-ViT (``expedite``, training-free): tokens are clustered into centroids
  (:func:`cluster_tokens`); head outputs are reconstructed at every token from its nearest centroids
  (:func:`reconstruction_weights`).

The token bookkeeping is pure functions on (B, n, C) patch tokens (prefix tokens are split off by the
caller), so each is unit-tested on its own. :class:`ReducedSegmentor` is the segmentor that runs one of
them instead of early exit (``dtop.create_model(..., reduction={"kind": ...})`` builds it). FLOPs:
:mod:`dtop.flops` (``reduction_flops``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .blocks import half_grid, query_downsample_block, subsample
from .config import ReductionSpec, SegmentorConfig
from .outputs import SegmentationOutput, StageOutput
from .segmentor import Segmentor

__all__ = ["ReducedSegmentor", "TokenReducer", "SymmetricDownsample", "cluster_tokens", "reconstruction_weights",
           "reconstruct", "window_mask", "upsample_tokens", "subsample", "query_downsample_block", "half_grid",
           "cluster_grid"]

Grid = tuple[int, int]
Expand = Callable[[Tensor], Tensor]  # head output (B, K, m) on the reduced tokens -> (B, K, N)


def cluster_grid(grid: Grid, scale: float) -> Grid:
    """Expedite's centroid grid: ``scale`` times the token grid per side, at least 1 x 1."""
    return (max(1, round(grid[0] * scale)), max(1, round(grid[1] * scale)))


def _to_map(t: Tensor, grid: Grid) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def _to_tokens(m: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return m.flatten(2).transpose(1, 2)


def upsample_tokens(values: Tensor, small: Grid, grid: Grid) -> Tensor:
    """Head output on the halved grid back to the token grid: bilinear x2, then the overhang of odd
    sides cropped. values (B, K, h2*w2) -> (B, K, h*w)."""
    B, K = values.shape[:2]
    up = F.interpolate(values.reshape(B, K, *small), size=(2 * small[0], 2 * small[1]), mode="bilinear",
                       align_corners=False)
    return up[:, :, : grid[0], : grid[1]].reshape(B, K, -1)


class SymmetricDownsample(nn.Module):
    """Stride-2 convolution (2x2 kernel, initialised to the 2x2 average so fine-tuning starts from
    pooling), 2x2 average pooling or 2x2 nearest sampling of the patch tokens. Odd sides: the pooling
    window is cut at the edge, the convolution sees the edge repeated."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.conv: Optional[nn.Conv2d] = None
        if kind == "conv":
            self.conv = nn.Conv2d(dim, dim, kernel_size=2, stride=2)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[torch.arange(dim), torch.arange(dim)] = 0.25
                self.conv.bias.zero_()

    def forward(self, t: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
        """t (B, h*w, C) -> (B, h2*w2, C), (h2, w2)."""
        small = half_grid(grid)
        if self.kind == "nearest":
            return subsample(t, grid), small
        m = _to_map(t, grid)
        if self.kind == "avgpool":
            m = F.avg_pool2d(m, kernel_size=2, stride=2, ceil_mode=True)
        else:
            m = self.conv(F.pad(m, (0, grid[1] % 2, 0, grid[0] % 2), mode="replicate"))
        return _to_tokens(m), small


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """||a_i - b_j||^2 for a (B, n, C), b (B, m, C) -> (B, n, m), clamped at 0 against rounding."""
    d = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2 * torch.bmm(a, b.transpose(1, 2))
    return d.clamp_min(0)


def window_mask(grid: Grid, centroids: Grid, window: int, device=None) -> Tensor:
    """(h*w, m) bool: centroid j lies within ``window // 2`` centroid cells (per axis) of the cell that
    token i starts in (the nearest-neighbour map of the initial grid of centroids)."""
    r = window // 2

    def axis(n: int, k: int) -> Tensor:
        start = torch.arange(n, device=device) * k // n  # initial centroid row (column) of each token row
        return (start[:, None] - torch.arange(k, device=device)[None, :]).abs() <= r  # (n, k)

    rows, cols = axis(grid[0], centroids[0]), axis(grid[1], centroids[1])
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(grid[0] * grid[1], -1)


def cluster_tokens(t: Tensor, grid: Grid, centroids: Grid, iters: int = 5, tau: float = 0.02,
                   window: int = 5) -> Tensor:
    """Expedite's token clustering. t (B, h*w, C) -> centroids (B, m, C), m = centroids[0] * centroids[1].

    Centroids start as the adaptive average pool of the token map; each iteration gives every token a
    soft assignment ``softmax(-tau * ||t - c||^2)`` over the centroids of its local window, and every
    centroid becomes the assignment-weighted mean of its tokens. The assignments carry no gradient."""
    c = _to_tokens(F.adaptive_avg_pool2d(_to_map(t, grid), centroids))
    outside = ~window_mask(grid, centroids, window, t.device)
    for _ in range(iters):
        a = (-tau * squared_distances(t, c)).masked_fill(outside, float("-inf")).softmax(dim=-1).detach()
        c = torch.bmm(a.transpose(1, 2), t) / a.sum(1)[:, :, None].clamp_min(1e-16)  # (B, m, C)
    return c


def reconstruction_weights(t: Tensor, c: Tensor, tau: float = 0.02, topk: int = 20) -> Tensor:
    """Expedite's token reconstruction: weights ``exp(-tau * ||t_i - c_j||^2)`` kept for the ``topk``
    nearest centroids of each token and L2-normalised. t (B, n, C), c (B, m, C) -> (B, n, m)."""
    w = torch.exp(-tau * squared_distances(t, c))
    k = min(topk, c.shape[1])
    kth = w.topk(k, dim=-1).values[..., -1:]
    return F.normalize(torch.where(w >= kth, w, torch.zeros_like(w)), dim=-1)


def reconstruct(values: Tensor, weights: Tensor) -> Tensor:
    """Head output on the centroids back to every token. values (B, K, m), weights (B, n, m) -> (B, K, n)."""
    return torch.bmm(values, weights.transpose(1, 2))


class TokenReducer(nn.Module):
    """The configured reduction, applied to the token sequence between the backbone's blocks."""

    def __init__(self, spec: ReductionSpec, dim: int, depth: int) -> None:
        super().__init__()
        spec.validate(depth)
        self.spec = spec
        self.kind = spec.kind
        self.block = spec.resolved_block(depth)
        self.down = SymmetricDownsample(spec.kind, dim) if spec.kind in ("conv", "avgpool", "nearest") else None

    def reduced_grid(self, grid: Grid) -> Grid:
        return cluster_grid(grid, self.spec.cluster_scale) if self.kind == "expedite" else half_grid(grid)

    def run_block(self, blk: nn.Module, x: Tensor, prefix: int, grid: Grid) -> tuple[Tensor, Optional[Expand]]:
        """Block ``self.block`` and the reduction around it. x (B, P + h*w, C) -> (B, P + m, C) and the
        function that brings head outputs on the m reduced tokens back to the h*w grid."""
        if self.kind == "shrunk":
            x, small = query_downsample_block(blk, x, prefix, grid)
            return x, lambda v: upsample_tokens(v, small, grid)
        x = blk(x)
        pre, t = x[:, :prefix], x[:, prefix:]
        if self.kind == "expedite":
            s = self.spec
            tf = t.float()  # distances in fp32 also under autocast: exp(-tau * d) is sensitive to rounding
            c = cluster_tokens(tf, grid, self.reduced_grid(grid), s.iters, s.tau, s.window)
            weights = reconstruction_weights(tf, c, s.tau, s.topk)
            return torch.cat([pre, c.to(x.dtype)], dim=1), lambda v: reconstruct(v, weights.to(v.dtype))
        t, small = self.down(t, grid)
        return torch.cat([pre, t], dim=1), lambda v: upsample_tokens(v, small, grid)


class ReducedSegmentor(Segmentor):
    """A segmentor that runs a token-reduction alternative instead of early exit (the supplement's
    comparisons): every image's tokens are reduced at the reducer's block; each stage head decodes the
    tokens of its block and its output is brought back to the token grid (upsampled, or reconstructed
    for Expedite). In eval only the final head runs. State-dict keys: ``backbone.*``, ``heads.*``,
    ``reducer.*`` (the stride-2 convolution's weights)."""

    def __init__(self, cfg: SegmentorConfig) -> None:
        if cfg.reduction is None:
            raise ConfigError("ReducedSegmentor needs a config with a reduction (kind: conv, avgpool, nearest, "
                              "shrunk or expedite)")
        super().__init__(cfg)
        self.reducer = TokenReducer(cfg.reduction, self.backbone.embed_dim, self.backbone.depth)
        if self.reducer.block > cfg.stages[-1].block:
            raise ConfigError(f"reduction {cfg.reduction.kind} at block {self.reducer.block} comes after the "
                              f"final head (block {cfg.stages[-1].block})")

    def forward(self, images: Tensor) -> SegmentationOutput:
        """images (B, 3, H, W), H and W multiples of the patch size -> SegmentationOutput (no token exits
        early: ``exit_stage`` is the final stage everywhere)."""
        x, grid = self.backbone.embed(images)
        B, P, S = x.shape[0], self.backbone.prefix_in_blocks, self.num_stages
        expand: Optional[Expand] = None
        tokens_per_block, head_tokens = [0] * self.backbone.depth, [0] * S
        stages: list[StageOutput] = []
        for i, blk in enumerate(self.backbone.blocks[: self.stage_blocks[-1] + 1]):
            n = x.shape[1]
            if i == self.reducer.block:
                x, expand = self.reducer.run_block(blk, x, P, grid)
                if self.reducer.kind == "shrunk":
                    n = x.shape[1]  # query downsampling: the block's queries (its keys: all n tokens)
            else:
                x = blk(x)
            tokens_per_block[i] = n
            stage = self.stage_of_block.get(i)
            if stage is not None and (stage == S - 1 or self.training):
                head_tokens[stage] = x.shape[1] - P
                stages.append(self._decode_stage(stage, x[:, P:], expand, grid))
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return SegmentationOutput(
            scores=self.finalise(stages[-1].canvas.flatten(2), stages[-1].presence, grid, size),
            canvas=stages[-1].canvas, exit_stage=torch.full((B, *grid), S - 1, dtype=torch.long, device=x.device),
            tokens_per_block=torch.tensor([tokens_per_block] * B), head_tokens=torch.tensor([head_tokens] * B),
            image_size=size, stages=stages)

    def _decode_stage(self, stage: int, x: Tensor, expand: Optional[Expand], grid: Grid) -> StageOutput:
        """Stage head ``stage`` on the (possibly reduced) patch tokens x (B, m, C), brought back to ``grid``."""
        out = self.decode(stage, x)
        canvas, logits = self.to_space(out), out.logits
        if expand is not None:
            canvas = expand(canvas)
            logits = expand(logits) if self.space == "prob" else canvas
        B = x.shape[0]
        return StageOutput(canvas.reshape(B, -1, *grid), out.presence, logits.reshape(B, -1, *grid),
                           torch.ones(B, *grid, dtype=torch.bool, device=x.device))
