"""The canvas: where each stage head's scores are assembled into one map (``docs/method/canvas.md``).

The first head that runs writes every token; each later head overwrites only the tokens still in play,
so every token ends up holding the scores of the stage where it left. Alongside, the canvas keeps

- ``exit_stage`` (B, N + 1): the stage that finalised each token, the last stage whose head decoded it.
  Column ``N`` is a padding sink: the layouts pad their token positions with ``N``, so writes through
  padding land there and are dropped (the score canvas has the same column once tokens left);
- for models whose heads are of mixed kinds (ATM and not; the ``"prob"`` score space), one canvas per
  head kind in that kind's own space (ATM mask logits, class logits) and the tokens it covers, for the
  stage losses.

Tensors only (no parameters): one :class:`Canvas` per forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .outputs import StageOutput


def write_tokens(canvas: Optional[Tensor], values: Tensor, pos: Tensor, valid: Tensor, N: int) -> Tensor:
    """Write ``values`` (B, K, L) at token positions ``pos`` (B, L) where ``valid`` into ``canvas`` (B, K, N)
    (zeros when None); returns the new canvas (out of place, so earlier stage snapshots keep their values).
    Two writes to one position keep one of them: the layouts never write a real position twice."""
    B, K, _ = values.shape
    if canvas is None:
        canvas = values.new_zeros(B, K, N)
    # a fixed number of tensor ops and no host sync: invalid entries go to a padding column N, then dropped
    index = torch.where(valid, pos, N)[:, None, :].expand(B, K, -1)
    padded = F.pad(canvas, (0, 1))
    return padded.scatter(2, index, values.to(canvas.dtype))[:, :, :N]


class Canvas:
    """The score canvas of one forward over ``batch`` images of token grid ``grid``.

    mixed: the heads are of mixed kinds (``"prob"`` score space): keep per-kind canvases for the losses.
    The exit map needs no step when tokens exit: a token is decoded by every head while it is in play and by
    none after it left, so the stage that finalised it is the last stage whose head decoded it (each head's
    write records its stage at its positions).
    """

    def __init__(self, batch: int, grid: tuple[int, int], num_stages: int, mixed: bool,
                 device: torch.device) -> None:
        self.grid = grid
        self.N = grid[0] * grid[1]
        self.mixed = mixed
        self._scores: Optional[Tensor] = None  # (B, K, N), or (B, K, N + 1) once tokens left: the model's space
        self.native: dict[str, Tensor] = {}  # head kind ("atm", "logits") -> (B, K, N) in its own space
        self.coverage: dict[str, Tensor] = {}  # head kind -> (B, N) bool, tokens its canvas holds
        self._shape = (batch, self.N + 1, device)
        self._all_at = num_stages - 1  # the last stage that decoded every token
        self._exit_stage: Optional[Tensor] = None  # (B, N + 1) long, once tokens left
        self.exited = False  # whether any token has left yet

    def write(self, stage: int, values: Tensor, logits: Tensor, presence: Optional[Tensor], pos: Optional[Tensor],
              valid: Optional[Tensor]) -> StageOutput:
        """Write stage head ``stage``'s output: ``values`` (B, K, L) in the score space and ``logits`` (B, K, L)
        in the head's own space, at token positions ``pos`` (B, L) where ``valid`` (B, L) (both None: every
        token in raster order, L = N); ``presence`` (B, K, 2) for ATM heads. ``pos`` holds ``N`` wherever
        ``valid`` is False (the layouts' contract, :class:`dtop.models.layouts.TokenLayout`). Returns the
        stage's view of the canvases (:class:`StageOutput`)."""
        B = values.shape[0]
        if self.exited:  # later heads write at their positions, padding (position N) into a column never read
            self._scores = self._write_wide(values, pos)
            self._mark_decoded(stage, pos)
        else:  # no token has left: this head decoded every token in raster order, its output is the canvas
            self._scores, self._all_at = values, stage
        if self.mixed and pos is None:  # every token, in raster order (the forward where nothing leaves)
            pos = torch.arange(self.N, device=values.device).expand(B, self.N)
            valid = torch.ones(B, self.N, dtype=torch.bool, device=values.device)
        if self.mixed:
            kind = "atm" if presence is not None else "logits"
            self.native[kind] = write_tokens(self.native.get(kind), logits, pos, valid, self.N)
            seen = torch.zeros(B, self.N + 1, dtype=torch.bool, device=pos.device).scatter(1, pos, valid)[:, :self.N]
            self.coverage[kind] = self.coverage.get(kind, seen) | seen
            own, covered = self.native[kind], self.coverage[kind]
        else:  # one head kind: the canvas is in the heads' own space and covers every token
            own, covered = self._scores, None
        return StageOutput(self._scores, presence, own, covered, self.grid)

    @property
    def scores(self) -> Optional[Tensor]:
        """(B, K, N): the canvas in the model's score space (None before the first write)."""
        s = self._scores
        return s if s is None or s.shape[-1] == self.N else s[..., : self.N]

    def _write_wide(self, values: Tensor, pos: Tensor) -> Tensor:
        """The (B, K, N + 1) score canvas with ``values`` (B, K, L) written at ``pos`` (B, L), out of place
        (earlier stage snapshots keep their values): three tensor ops, no host sync."""
        B, K, L = values.shape
        return self._scores.scatter(2, pos[:, None, :].expand(B, K, L), values.to(self._scores.dtype))

    def _mark_decoded(self, stage: int, pos: Tensor) -> None:
        self._exit_stage.scatter_(1, pos, stage)  # padding positions (N) land in the sink column

    def tokens_left(self) -> None:
        """Some tokens have left: from now on each head writes only the tokens still in play, through
        positions whose padding (N) lands in a sink column of the canvas and of the exit map."""
        if not self.exited:
            B, width, device = self._shape
            self._scores = F.pad(self._scores, (0, 1))
            self._exit_stage = torch.full((B, width), self._all_at, dtype=torch.long, device=device)
            self.exited = True

    def exit_map(self) -> Tensor:
        """(B, h, w) long: the stage that finalised each token (the last stage whose head decoded it)."""
        if self._exit_stage is None:
            B, _, device = self._shape
            return torch.full((B, *self.grid), self._all_at, dtype=torch.long, device=device)
        return self._exit_stage[:, : self.N].reshape(-1, *self.grid)
