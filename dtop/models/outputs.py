"""What a segmentor's forward returns: the final scores, the canvas, the exit map and the token counts.

GFLOPs are not part of the output: :func:`dtop.flops.forward_gflops` counts them from the token counts
kept here (``docs/method/flops.md``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(init=False)
class StageOutput:
    """The canvases after one stage head wrote to them (``docs/method/canvas.md``).

    canvas: (B, K, h, w) in the model's score space: the assembly after this stage (earlier stages keep
        their own snapshot: the canvas is written out of place).
    presence: (B, K, 2) presence logits for ATM heads, else None.
    logits: (B, K, h, w) the canvas in this head's own space (ATM mask logits or class logits), for
        its loss: tokens this head decoded hold its values, tokens that left at an earlier stage hold
        the values of the latest earlier head of the same kind (ATM or not).
    valid: (B, h, w) bool, tokens where ``logits`` is defined (all True unless head kinds are mixed
        and some tokens left at a head of the other kind).

    Built from the (B, K, h, w) maps, or (``grid`` given) from token-ordered (B, K, N) canvases (or (B, K, N + 1):
    a padding column last) and a (B, N)
    ``valid`` (None: all True), which are shaped into maps only when read: a forward that never reads a
    stage (inference) dispatches no operation for it. A dataclass, so that DistributedDataParallel finds
    the tensors it holds.
    """

    raw_canvas: Tensor
    presence: Optional[Tensor]
    raw_logits: Tensor
    raw_valid: Optional[Tensor]
    grid: Optional[tuple[int, int]] = None

    def __init__(self, canvas: Tensor, presence: Optional[Tensor], logits: Tensor, valid: Optional[Tensor],
                 grid: Optional[tuple[int, int]] = None) -> None:
        if valid is None and grid is None:
            raise ValueError("StageOutput: valid=None (all True) needs the token grid")
        self.raw_canvas, self.presence, self.raw_logits, self.raw_valid, self.grid = canvas, presence, logits, valid, grid

    def _map(self, t: Tensor) -> Tensor:
        if self.grid is None:
            return t
        N = self.grid[0] * self.grid[1]
        # a canvas may carry the writers' padding column N (dtop.models.canvas): never part of the map
        return (t if t.shape[-1] == N else t[..., :N]).reshape(t.shape[0], -1, *self.grid)

    @property
    def canvas(self) -> Tensor:
        return self._map(self.raw_canvas)

    @property
    def logits(self) -> Tensor:
        return self._map(self.raw_logits)

    @property
    def valid(self) -> Tensor:
        if self.raw_valid is None:
            B, h, w = self.raw_canvas.shape[0], *self.grid
            return torch.ones(B, h, w, dtype=torch.bool, device=self.raw_canvas.device)
        return self.raw_valid if self.grid is None else self.raw_valid.reshape(-1, *self.grid)


@dataclass
class SegmentationOutput:
    """Result of a forward pass.

    scores: (B, K, H, W) at input resolution (argmax = prediction): class logits, or probabilities in
        the ``"atm"``/``"prob"`` score spaces (``docs/method/canvas.md``).
    canvas: (B, K, h, w) the assembled canvas before the final transform and upsampling.
    exit_stage: (B, h, w) long, the stage index that finalised each token.
    tokens_per_block: (B, depth) long, tokens each block processed (prefix tokens included), on the CPU.
    head_tokens: (B, num_stages) long, tokens each stage head decoded, on the CPU.
    image_size: (H, W) of the input, for the GFLOPs count (:func:`dtop.flops.forward_gflops`).
    stages: one :class:`StageOutput` per stage head that ran, in order.

    ``logits`` and ``token_logits`` are deprecated names of ``scores`` and ``canvas``.
    """

    scores: Tensor
    canvas: Tensor
    exit_stage: Tensor
    tokens_per_block: Tensor
    head_tokens: Tensor
    image_size: tuple[int, int]
    stages: list[StageOutput] = field(default_factory=list)

    def exit_fractions(self) -> Tensor:
        """(B, num_stages) fraction of tokens finalised at each stage."""
        S = self.head_tokens.shape[1]
        flat = self.exit_stage.flatten(1)
        return F.one_hot(flat, S).float().mean(dim=1)

    @property
    def logits(self) -> Tensor:
        """Deprecated name of :attr:`scores` (they are probabilities in two of the three score spaces)."""
        warnings.warn("SegmentationOutput.logits is deprecated; use .scores", DeprecationWarning, stacklevel=2)
        return self.scores

    @property
    def token_logits(self) -> Tensor:
        """Deprecated name of :attr:`canvas`."""
        warnings.warn("SegmentationOutput.token_logits is deprecated; use .canvas", DeprecationWarning, stacklevel=2)
        return self.canvas

    @property
    def gflops(self) -> Tensor:
        """Removed: the model no longer counts its own FLOPs."""
        raise AttributeError("SegmentationOutput.gflops was removed: the model no longer counts its FLOPs; "
                             "use dtop.flops.forward_gflops(model, out), a (B,) float64 tensor")
