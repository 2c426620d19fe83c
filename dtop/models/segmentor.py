"""The DToP segmentor: a timm ViT cut into stages by heads, with early exit of easy tokens.

Forward pass (DESIGN.md section 1), per image ``b``:

1. Embed, run the blocks. After the block of stage ``m`` the stage head scores every token
   still in play; the canvas receives those scores at the tokens' positions.
2. After a non-final stage, tokens with confidence ``> p0`` exit (all but the ``k`` most
   confident of each predicted class, which stay as context); they are removed from every
   later block (neither query nor key) and from every later head.
3. The final map is the canvas: each token holds the scores of the stage where it left.

Execution: while no token has exited, the batch runs together; after the first exit the kept tokens
run per image (the exact reference, default on CPU), padded with a key mask, or packed with
variable-length attention (default on CUDA): see :mod:`dtop.pruning.execution`.

Score space of the canvas (see :func:`score_space`):

- ``"atm"`` (every head is ATM): canvas holds mask logits; final score is
  ``softmax(z_final)[present] * sigmoid(canvas)`` (exited tokens use the final presence).
- ``"logits"`` (no ATM head): canvas holds per-token class logits.
- ``"prob"`` (mixed head types): canvas holds each stage's per-class probabilities
  (ATM: ``softmax(z_stage)[present] * sigmoid(A)``; others: softmax over classes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..pruning import confidence, select_exits
from ..pruning.execution import PATHS, PaddedTokens, default_path, switch_layout
from .backbone import ViTBackbone
from .config import SegmentorConfig
from .heads import HEADS, HeadOutput, atm_scores
from .reduction import TokenReducer


@dataclass
class StageOutput:
    """The canvases after one stage head wrote to them.

    canvas: (B, K, h, w) in the model's score space: the assembly so far when autograd is on (training);
        under ``torch.no_grad`` the canvas is written in place and every stage shows the final assembly.
    presence: (B, K, 2) for ATM heads, else None.
    logits: (B, K, h, w) the canvas in this head's own space (ATM mask logits or class logits), for
        its loss: tokens this head decoded hold its values, tokens that left at an earlier stage hold
        the values of the latest earlier head of the same kind (ATM or not).
    valid: (B, h, w) bool, tokens where ``logits`` is defined (all True unless head kinds are mixed
        and some tokens left at a head of the other kind).
    """

    canvas: Tensor
    presence: Optional[Tensor]
    logits: Tensor
    valid: Tensor


@dataclass
class SegmentationOutput:
    """Result of a forward pass.

    logits: (B, K, H, W) scores at input resolution (argmax = prediction); class logits,
        or probabilities in the ``"atm"``/``"prob"`` score spaces.
    token_logits: (B, K, h, w) the assembled canvas before the final transform and upsampling.
    exit_stage: (B, h, w) long, the stage index that finalised each token.
    tokens_per_block: (B, depth) long, tokens each block processed (prefix tokens included).
    head_tokens: (B, num_stages) long, tokens each stage head decoded.
    gflops: (B,) float64, per-image GFLOPs of this forward (analytic, fvcore convention).
    stages: one :class:`StageOutput` per stage, in order.
    """

    logits: Tensor
    token_logits: Tensor
    exit_stage: Tensor
    tokens_per_block: Tensor
    head_tokens: Tensor
    gflops: Tensor
    stages: list[StageOutput] = field(default_factory=list)

    def exit_fractions(self) -> Tensor:
        """(B, num_stages) fraction of tokens finalised at each stage."""
        S = self.head_tokens.shape[1]
        flat = self.exit_stage.flatten(1)
        return F.one_hot(flat, S).float().mean(dim=1)


def score_space(head_types: list[str]) -> str:
    if all(t == "atm" for t in head_types):
        return "atm"
    if not any(t == "atm" for t in head_types):
        return "logits"
    return "prob"


class DToPSegmentor(nn.Module):
    """Plain-ViT segmentor with DToP early exit. Build with :func:`dtop.create_model` or from a config."""

    def __init__(self, cfg: SegmentorConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = ViTBackbone(cfg.backbone, cls_mode=cfg.cls_mode, pretrained=cfg.pretrained,
                                    img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate,
                                    model_kwargs=cfg.backbone_kwargs)
        depth = self.backbone.depth
        for s in cfg.stages:
            if not 0 <= s.block < depth:
                raise ConfigError(f"stage head after block {s.block}, but {cfg.backbone} has blocks 0..{depth - 1}")
        C = self.backbone.embed_dim
        self.heads = nn.ModuleList(HEADS[s.head](C, cfg.num_classes, **s.head_kwargs) for s in cfg.stages)
        # a token-reduction alternative instead of early exit (dtop.models.reduction); None for DToP
        self.reducer = TokenReducer(cfg.reduction, C, depth) if cfg.reduction is not None else None
        if self.reducer is not None and self.reducer.block > cfg.stages[-1].block:
            raise ConfigError(f"reduction {cfg.reduction.kind} at block {self.reducer.block} comes after the "
                              f"final head (block {cfg.stages[-1].block})")
        self.stage_blocks = [s.block for s in cfg.stages]
        self.space = score_space([s.head for s in cfg.stages])
        self.p0 = cfg.p0_per_stage()
        self.topk = cfg.topk
        self.execution = "auto"  # layout of the kept tokens after the first exit (dtop.pruning.execution)
        self.bucket = False  # padded layout only: group images of similar kept length
        # Optional override of the exit decisions: fn(stage, conf (B, L), valid (B, L)) -> exits (B, L) bool
        # (benchmarks force exit patterns with it).
        self.force_exit: Optional[Callable[[int, Tensor, Tensor], Tensor]] = None

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def num_stages(self) -> int:
        return len(self.heads)

    def set_execution(self, path: str = "auto", bucket: bool = False) -> None:
        """``auto`` (per_image on CPU, packed on CUDA), ``per_image``, ``padded`` or ``packed``."""
        if path not in PATHS:
            raise ConfigError(f"unknown execution path {path!r}; choose from {', '.join(PATHS)}")
        self.execution, self.bucket = path, bucket

    def set_p0(self, p0) -> None:
        """Set the exit threshold(s): a float for every non-final stage or a list, one per non-final stage."""
        self.cfg.p0 = p0
        self.p0 = self.cfg.p0_per_stage()

    # ------------------------------------------------------------------ pieces
    def _decode(self, stage: int, x: Tensor, valid: Optional[Tensor] = None) -> HeadOutput:
        """Run stage head ``stage`` on patch tokens ``x`` (B, n, C) (final norm first on the last stage);
        ``valid`` (B, n) marks real tokens in a padded batch."""
        if stage == self.num_stages - 1 and self.cfg.final_norm:
            x = self.backbone.final_norm(x)
        return self.heads[stage](x, valid)

    def _to_space(self, out: HeadOutput) -> Tensor:
        return out.probs() if self.space == "prob" else out.logits

    def _finalise(self, canvas: Tensor, presence: Optional[Tensor], grid: tuple[int, int],
                  size: tuple[int, int]) -> Tensor:
        score = atm_scores(presence, canvas) if self.space == "atm" else canvas
        return upsample_scores(score.reshape(*score.shape[:2], *grid), size)

    # ------------------------------------------------------------------ forward
    def forward_dense(self, images: Tensor) -> Tensor:
        """The plain model: every block, final head on all tokens, no auxiliary head. -> (B, K, H, W)."""
        x, grid = self.backbone.embed(images)
        for blk in self.backbone.blocks[: self.stage_blocks[-1] + 1]:
            x = blk(x)
        out = self._decode(self.num_stages - 1, x[:, self.backbone.prefix_in_blocks:])
        return self._finalise(self._to_space(out), out.presence, grid, tuple(images.shape[-2:]))

    def forward(self, images: Tensor) -> SegmentationOutput:
        """DToP forward. images (B, 3, H, W), H and W multiples of the patch size.

        While no token has left, the batch runs as one tensor; after the first exit the kept tokens
        run in the layout of ``self.execution`` (see :mod:`dtop.pruning.execution`).
        A model with a token-reduction alternative (``cfg.reduction``) runs :meth:`forward_reduced`."""
        if self.reducer is not None:
            return self.forward_reduced(images)
        x, grid = self.backbone.embed(images)
        B, device = x.shape[0], x.device
        N = grid[0] * grid[1]
        S = self.num_stages
        path = self.execution if self.execution != "auto" else default_path(device)
        state = PaddedTokens.full(x, self.backbone.prefix_in_blocks, N)
        switched = False
        # token counts stay on the device until the end: no host sync per block
        tokens_per_block = torch.zeros(B, self.backbone.depth, dtype=torch.long, device=device)
        head_tokens = torch.zeros(B, S, dtype=torch.long, device=device)
        exit_stage = torch.full((B, N + 1), S - 1, dtype=torch.long, device=device)  # column N: padding
        canvas: Optional[Tensor] = None
        native: dict[str, Tensor] = {}  # per head kind ("atm" mask logits, "logits"), for the stage losses
        native_valid: dict[str, Tensor] = {}
        stages: list[StageOutput] = []
        stage = 0
        for i, blk in enumerate(self.backbone.blocks[: self.stage_blocks[-1] + 1]):
            state.run(blk)
            tokens_per_block[:, i] = state.counts()
            if i != self.stage_blocks[stage]:
                continue
            final = stage == S - 1
            if not final and not self.training and self.p0[stage] >= 1.0:
                stage += 1  # no token can leave here, and a later head overwrites all it would write
                continue

            # ---- stage head on the tokens in play, written to the canvas(es)
            everyone = isinstance(state, PaddedTokens) and state.valid is None  # no token has left yet
            out, pos, valid = state.decode(lambda t, v, s=stage: self._decode(s, t, v))
            head_tokens[:, stage] = valid.sum(1)
            values = self._to_space(out)
            canvas = values if everyone else _write(canvas, values, pos, valid, N)
            if self.space == "prob":  # mixed head kinds: per-kind canvases for the stage losses
                kind = "atm" if out.presence is not None else "logits"
                native[kind] = _write(native.get(kind), out.logits, pos, valid, N)
                seen = torch.zeros(B, N + 1, dtype=torch.bool, device=device).scatter(1, pos, valid)[:, :N]
                native_valid[kind] = native_valid.get(kind, seen) | seen
                stage_logits, stage_valid = native[kind], native_valid[kind]
            else:  # one head kind: the canvas is in the heads' own space and covers every token
                stage_logits, stage_valid = canvas, torch.ones(B, N, dtype=torch.bool, device=device)
            stages.append(StageOutput(canvas.reshape(B, -1, *grid), out.presence,
                                      stage_logits.reshape(B, -1, *grid), stage_valid.reshape(B, *grid)))

            # ---- exit decisions (never after the last stage)
            if not final and self.p0[stage] < 1.0:
                with torch.no_grad():
                    conf, label = confidence(out.probs().float())
                    exits = select_exits(conf, label, self.p0[stage], self.topk, valid, self.num_classes)
                if self.force_exit is not None:
                    exits = self.force_exit(stage, conf, valid)
                if bool(exits.any()):
                    exit_stage.scatter_(1, pos, torch.where(exits, stage, exit_stage.gather(1, pos)))
                    state = state.prune(~exits)
                    if not switched:
                        state, switched = switch_layout(state, path, self.bucket), True
            stage += 1

        del state, out, x  # free the token features before the full-resolution upsampling (peak memory)
        logits = self._finalise(canvas, stages[-1].presence, grid, tuple(images.shape[-2:]))
        from ..flops import segmentor_flops_batch  # local import: flops imports this module's types

        tokens_per_block, head_tokens = tokens_per_block.cpu(), head_tokens.cpu()
        gflops = segmentor_flops_batch(self, tuple(images.shape[-2:]), tokens_per_block, head_tokens) / 1e9
        return SegmentationOutput(logits=logits, token_logits=canvas.reshape(B, -1, *grid),
                                  exit_stage=exit_stage[:, :N].reshape(B, *grid), tokens_per_block=tokens_per_block,
                                  head_tokens=head_tokens, gflops=gflops, stages=stages)

    def forward_reduced(self, images: Tensor) -> SegmentationOutput:
        """The supplement's alternatives (no early exit): every image's tokens are reduced at the reducer's
        block; each stage head decodes the tokens of its block and its output is brought back to the
        token grid (upsampled, or reconstructed for Expedite). In eval only the final head runs."""
        from ..flops import segmentor_flops  # local import: flops imports this module's types

        x, grid = self.backbone.embed(images)
        B, P, S = x.shape[0], self.backbone.prefix_in_blocks, self.num_stages
        expand = None
        tokens_per_block = [0] * self.backbone.depth
        head_tokens = [0] * S
        stages: list[StageOutput] = []
        stage = 0
        for i, blk in enumerate(self.backbone.blocks[: self.stage_blocks[-1] + 1]):
            n = x.shape[1]
            if i == self.reducer.block:
                x, expand = self.reducer.run_block(blk, x, P, grid)
                if self.reducer.kind == "shrunk":
                    n = x.shape[1]  # query downsampling: the block's queries (its keys: all n tokens)
            else:
                x = blk(x)
            tokens_per_block[i] = n
            if i != self.stage_blocks[stage]:
                continue
            if stage == S - 1 or self.training:
                out = self._decode(stage, x[:, P:])
                head_tokens[stage] = x.shape[1] - P
                canvas, logits = self._to_space(out), out.logits
                if expand is not None:
                    canvas = expand(canvas)
                    logits = expand(logits) if self.space == "prob" else canvas
                stages.append(StageOutput(canvas.reshape(B, -1, *grid), out.presence, logits.reshape(B, -1, *grid),
                                          torch.ones(B, *grid, dtype=torch.bool, device=x.device)))
            stage += 1
        size = (int(images.shape[-2]), int(images.shape[-1]))
        logits = self._finalise(stages[-1].canvas.flatten(2), stages[-1].presence, grid, size)
        gflops = torch.full((B,), segmentor_flops(self, size, tokens_per_block, head_tokens) / 1e9,
                            dtype=torch.float64)
        return SegmentationOutput(logits=logits, token_logits=stages[-1].canvas,
                                  exit_stage=torch.full((B, *grid), S - 1, dtype=torch.long, device=x.device),
                                  tokens_per_block=torch.tensor([tokens_per_block] * B),
                                  head_tokens=torch.tensor([head_tokens] * B), gflops=gflops, stages=stages)


def upsample_scores(score: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of class scores (B, K, h, w) -> (B, K, H, W), computed and returned in
    channels-last memory order: with the K classes innermost, torch's CPU kernel runs twice as fast
    (4x at batch 8; 150 classes at 512x512) and an argmax over the classes 4x faster."""
    score = score.contiguous(memory_format=torch.channels_last)
    return F.interpolate(score, size=size, mode="bilinear", align_corners=False)


def _write(canvas: Optional[Tensor], values: Tensor, pos: Tensor, valid: Tensor, N: int) -> Tensor:
    """Write ``values`` (B, K, L) at token positions ``pos`` (B, L) where ``valid`` into ``canvas`` (B, K, N)
    (zeros when None). With autograd on, the write is out of place so earlier stage snapshots keep their
    values; without it (inference) the canvas is written in place, so no stage copy stays in memory."""
    if canvas is None:
        canvas = values.new_zeros(values.shape[0], values.shape[1], N)
    elif torch.is_grad_enabled():
        canvas = canvas.clone()
    b, l = valid.nonzero(as_tuple=True)
    canvas[b, :, pos[b, l]] = values[b, :, l].to(canvas.dtype)
    return canvas


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch timm's fused scaled_dot_product_attention on or off in every attention layer
    (off lets FLOP counters such as fvcore see the attention matmuls)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled
