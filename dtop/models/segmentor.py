"""The DToP segmentor: a timm ViT cut into stages by heads, with early exit of easy tokens.

Forward pass (``docs/method/exit-rule.md``), per image ``b``:

1. Embed, run the blocks. After the block of stage ``m`` the stage head scores every token
   still in play; the canvas receives those scores at the tokens' positions (:mod:`.canvas`).
2. After a non-final stage, tokens with confidence ``> p0`` exit (all but the ``k`` most
   confident of each predicted class, which stay as context); they are removed from every
   later block (neither query nor key) and from every later head.
3. The final map is the canvas: each token holds the scores of the stage where it left.

While no token has left, the batch runs as one tensor; after the first exit the kept tokens run in the
model's layout (:mod:`.layouts`: per_image, padded or packed).

Score space of the canvas (:func:`score_space`, ``docs/method/canvas.md``):

- ``"atm"`` (every head is ATM): canvas holds mask logits; final score is
  ``softmax(z_final)[present] * sigmoid(canvas)`` (exited tokens use the final presence).
- ``"logits"`` (no ATM head): canvas holds per-token class logits.
- ``"prob"`` (mixed head types): canvas holds each stage's per-class probabilities
  (ATM: ``softmax(z_stage)[present] * sigmoid(A)``; others: softmax over classes).

:class:`Segmentor` holds what every variant shares (backbone, stage heads, the dense forward);
:class:`DToPSegmentor` adds early exit. The supplement's token-reduction alternatives are
:class:`dtop.models.reduction.ReducedSegmentor`. Build any of them with :func:`dtop.create_model`.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..pruning import confidence, select_budget, select_exits
from .backbone import ViTBackbone
from .canvas import Canvas
from .blocks import packed_block
from .config import SegmentorConfig
from .heads import HEADS, HeadOutput, atm_scores
from .layouts import PaddedTokens, check_layout, default_layout, drop_exits, known_counts
from .outputs import SegmentationOutput, StageOutput  # noqa: F401  (StageOutput: its former home)

Counts = Union[list[int], Tensor]  # (B,) token counts: host ints, or a tensor on the device
ExitOverride = Callable[[int, Tensor, Tensor], Tensor]  # (stage, conf (B, L), valid (B, L)) -> exits (B, L)


def score_space(head_types: list[str]) -> str:
    """``"atm"`` when every head is ATM, ``"logits"`` when none is, ``"prob"`` for a mix."""
    if all(t == "atm" for t in head_types):
        return "atm"
    if not any(t == "atm" for t in head_types):
        return "logits"
    return "prob"


def upsample_scores(score: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of class scores (B, K, h, w) -> (B, K, H, W), computed and returned in
    channels-last memory order: with the K classes innermost, torch's CPU kernel runs twice as fast
    (4x at batch 8; 150 classes at 512x512) and an argmax over the classes 4x faster."""
    score = score.contiguous(memory_format=torch.channels_last)
    return F.interpolate(score, size=size, mode="bilinear", align_corners=False)


def host_counts(per_block: list[Counts], decoded: dict[int, Counts], depth: int, num_stages: int, prefix: int
                ) -> tuple[Tensor, Tensor]:
    """The forward's token counts on the host: tokens_per_block (B, depth) and head_tokens (B, num_stages)
    (patch tokens only: the ``prefix`` tokens left out), zeros for blocks and heads that did not run.
    ``per_block`` holds each block's counts and ``decoded`` each stage head's, as B host ints where the layout
    knew them without reading the device (:func:`~dtop.models.layouts.known_counts`) or as (B,) device
    tensors, which come over in one copy (one host sync): a forward whose layouts knew every count (packed,
    per_image, budget exits) makes no sync here."""
    B = len(per_block[0])
    blocks = per_block + [[0] * B] * (depth - len(per_block))
    heads = [_minus(decoded[s], prefix) if s in decoded else [0] * B for s in range(num_stages)]
    if not any(isinstance(c, Tensor) for c in blocks + heads):
        return _host_table(blocks, B), _host_table(heads, B)
    rows = blocks + heads
    on_device = [i for i, c in enumerate(rows) if isinstance(c, Tensor)]
    on_host = [i for i, c in enumerate(rows) if not isinstance(c, Tensor)]
    table = torch.empty(len(rows), B, dtype=torch.long)
    table[on_device] = torch.stack([rows[i] for i in on_device]).cpu()  # the one copy
    if on_host:
        table[on_host] = _host_table([rows[i] for i in on_host], B).t()
    return table[:depth].t().contiguous(), table[depth:].t().contiguous()


def _minus(counts: Counts, n: int) -> Counts:
    """(B,) counts less ``n`` (host ints stay host ints)."""
    if not n:
        return counts
    return counts - n if isinstance(counts, Tensor) else [c - n for c in counts]


def _host_table(rows: list[list[int]], B: int) -> Tensor:
    """Rows of B host ints -> a (B, len(rows)) long tensor, built on the host."""
    table = torch.tensor(list(zip(*rows)), dtype=torch.long)
    return table if table.dim() == 2 else table.reshape(B, len(rows))  # no rows, or B = 0


class Segmentor(nn.Module):
    """A timm plain ViT with stage heads after some of its blocks: what DToP and the supplement's
    alternatives share. ``forward_dense`` is the plain model (every block, final head only)."""

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
        self.stage_blocks = [s.block for s in cfg.stages]
        self.stage_of_block = {b: s for s, b in enumerate(self.stage_blocks)}  # block index -> its stage head
        self.space = score_space([s.head for s in cfg.stages])

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def num_stages(self) -> int:
        return len(self.heads)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the optimiser leaves without weight decay beyond norms and biases
        (position embeddings, prefix tokens, class queries and embeddings), as timm's models report them."""
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        for s, head in enumerate(self.heads):
            names |= {f"heads.{s}.{n}" for n in getattr(head, "no_weight_decay", set)()}
        return names

    def decode(self, stage: int, x: Tensor, valid: Optional[Tensor] = None) -> HeadOutput:
        """Run stage head ``stage`` on patch tokens ``x`` (B, n, C) (final norm first on the last stage);
        ``valid`` (B, n) marks real tokens in a padded batch."""
        if stage == self.num_stages - 1 and self.cfg.final_norm:
            x = self.backbone.final_norm(x)
        return self.heads[stage](x, valid)

    def to_space(self, out: HeadOutput) -> Tensor:
        """A head's output (B, K, n) in the canvas's score space."""
        return out.probs() if self.space == "prob" else out.logits

    def finalise(self, canvas: Tensor, presence: Optional[Tensor], grid: tuple[int, int],
                 size: tuple[int, int]) -> Tensor:
        """The canvas (B, K, h*w) as final scores (B, K, H, W) at input ``size``."""
        score = atm_scores(presence, canvas) if self.space == "atm" else canvas
        return upsample_scores(score.reshape(*score.shape[:2], *grid), size)

    def compile(self, *args, dynamic: bool = True, **kwargs) -> None:
        """``torch.compile`` the parts, not the forward: every ViT block (its timm forward and, for the packed
        layout, :func:`~dtop.models.blocks.packed_block` on it) and every stage head, with dynamic token
        dimensions, so a new kept-token count reuses the compiled code instead of recompiling; the exit
        bookkeeping between them stays eager (its host syncs would break a whole-forward graph anyway).
        ``args``/``kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ...). In place; returns None, as
        ``nn.Module.compile`` does."""
        packed = torch.compile(packed_block, *args, dynamic=dynamic, **kwargs)
        for blk in self.backbone.blocks:
            blk.compile(*args, dynamic=dynamic, **kwargs)
            blk.dtop_packed_block = packed  # read by the packed layout (layouts.PackedTokens.run)
        for head in self.heads:
            head.compile(*args, dynamic=dynamic, **kwargs)

    def final_head(self, images: Tensor) -> tuple[HeadOutput, tuple[int, int]]:
        """Every block up to the last stage on all tokens, then the final head: (its output, the token grid)."""
        x, grid = self.backbone.embed(images)
        for blk in self.backbone.blocks[: self.stage_blocks[-1] + 1]:
            x = blk(x)
        return self.decode(self.num_stages - 1, x[:, self.backbone.prefix_in_blocks:]), grid

    def forward_dense(self, images: Tensor) -> Tensor:
        """The plain model: every block, final head on all tokens, no auxiliary head. -> (B, K, H, W)."""
        out, grid = self.final_head(images)
        return self.finalise(self.to_space(out), out.presence, grid, tuple(images.shape[-2:]))


class DToPSegmentor(Segmentor):
    """Plain-ViT segmentor with DToP early exit. Build with :func:`dtop.create_model` or from a config.

    p0: exit threshold per non-final stage; topk: context tokens kept per class; layout (``auto``,
    ``per_image``, ``padded``, ``packed``) and bucket: how kept tokens run (:meth:`set_layout`);
    force_exit: an optional override of the exit decisions (the benchmarks force exit patterns with it).
    """

    def __init__(self, cfg: SegmentorConfig) -> None:
        if cfg.reduction is not None:
            raise ConfigError(f"this config has a token-reduction alternative ({cfg.reduction.kind}): build it "
                              f"with dtop.create_model / dtop.models.build_model, which return a ReducedSegmentor")
        super().__init__(cfg)
        self.p0 = cfg.p0_per_stage()
        self.exit_mode = cfg.exit_mode
        self.exit_ratio = cfg.exit_ratio_per_stage()
        self.p_min = float(cfg.p_min)
        self.topk = cfg.topk
        self.layout = "auto"
        self.bucket = False  # padded layout only: group images of similar kept length
        self.force_exit: Optional[ExitOverride] = None

    def set_layout(self, layout: str = "auto", bucket: bool = False) -> None:
        """How kept tokens run after the first exit: ``auto`` (per_image on CPU, packed on CUDA),
        ``per_image``, ``padded`` (``bucket``: group images of similar kept length) or ``packed``."""
        self.layout, self.bucket = check_layout(layout), bucket

    def set_execution(self, path: str = "auto", bucket: bool = False) -> None:
        """Deprecated name of :meth:`set_layout`."""
        warnings.warn("set_execution is deprecated; use set_layout", DeprecationWarning, stacklevel=2)
        self.set_layout(path, bucket)

    @property
    def execution(self) -> str:
        """Deprecated name of :attr:`layout`."""
        return self.layout

    @execution.setter
    def execution(self, layout: str) -> None:
        self.set_layout(layout, self.bucket)

    def set_p0(self, p0) -> None:
        """The threshold rule (``exit_mode`` ``"threshold"``) at ``p0``: a float for every non-final stage or
        a list, one per non-final stage. ConfigError for a wrong count."""
        self.cfg.p0, self.cfg.exit_mode = p0, "threshold"
        self.p0, self.exit_mode = self.cfg.p0_per_stage(), "threshold"

    def set_budget(self, exit_ratio, p_min: float = 0.0) -> None:
        """The budget rule (``exit_mode`` ``"budget"``): at each non-final stage every image exits exactly
        ``round(exit_ratio[s] * N)`` of its N tokens (a float for every stage or one per stage), only tokens
        with confidence above ``p_min`` when it is > 0 (the count is then an upper bound).
        ConfigError for ratios outside [0, 1), a wrong count or a sum of 1 or more."""
        old = (self.cfg.exit_ratio, self.cfg.p_min, self.cfg.exit_mode)
        self.cfg.exit_ratio, self.cfg.p_min, self.cfg.exit_mode = exit_ratio, p_min, "budget"
        try:
            self.cfg.validate()
        except ConfigError:
            self.cfg.exit_ratio, self.cfg.p_min, self.cfg.exit_mode = old
            raise
        self.exit_ratio, self.p_min, self.exit_mode = self.cfg.exit_ratio_per_stage(), float(p_min), "budget"

    def exit_rule(self) -> dict:
        """The exit rule in force (mode, p0, exit ratios, floor), for :meth:`set_exit_rule` to restore."""
        return {"exit_mode": self.exit_mode, "p0": self.cfg.p0, "exit_ratio": self.cfg.exit_ratio, "p_min": self.cfg.p_min}

    def set_exit_rule(self, rule: dict) -> None:
        """Restore a rule :meth:`exit_rule` returned."""
        self.set_p0(rule["p0"])
        if rule["exit_mode"] == "budget":
            self.set_budget(rule["exit_ratio"], rule["p_min"])

    def exits_at(self, stage: int) -> bool:
        """Whether the exit rule can make a token leave at non-final stage ``stage``."""
        if self.exit_mode == "budget":
            return self.exit_ratio[stage] > 0
        return self.p0[stage] < 1.0

    def exact_budget(self) -> bool:
        """Whether every image exits exactly its budget (budget mode, no floor, no override): the kept tokens
        of a batch then stay one (B, n, C) tensor."""
        return self.exit_mode == "budget" and self.p_min <= 0 and self.force_exit is None

    def idle(self, stage: int) -> bool:
        """In eval, a non-final head where no token can leave is skipped: a later head overwrites all it writes."""
        return stage < self.num_stages - 1 and not self.training and not self.exits_at(stage)

    def budget(self, stage: int, num_tokens: int) -> int:
        """Budget mode's exits per image at non-final ``stage`` for an image of ``num_tokens`` patch tokens."""
        return int(round(self.exit_ratio[stage] * num_tokens))

    def decide_exits(self, stage: int, out: HeadOutput, valid: Tensor, check_any: bool = True,
                     num_tokens: Optional[int] = None) -> Optional[Tensor]:
        """Exit decisions after stage head ``stage`` (``docs/method/exit-rule.md``): (B, L) bool over the
        columns of ``out`` (``valid`` (B, L) marks real tokens), or None when no token can leave here (and,
        with ``check_any``, a host sync, when none does). Budget mode needs ``num_tokens``, the image's N."""
        if stage == self.num_stages - 1 or not self.exits_at(stage):
            return None
        with torch.no_grad():
            conf, label = confidence(out.probs().float())
            if self.exit_mode == "budget":
                if num_tokens is None:
                    raise ValueError("budget exits need num_tokens, the number of patch tokens of the image")
                count = min(self.budget(stage, num_tokens), conf.shape[1])
                exits = select_budget(conf, label, count, self.topk, valid, self.p_min, self.num_classes)
            else:
                exits = select_exits(conf, label, self.p0[stage], self.topk, valid, self.num_classes)
        if self.force_exit is not None:
            exits = self.force_exit(stage, conf, valid)
        return exits if not check_any or bool(exits.any()) else None

    def can_exit(self) -> bool:
        """Whether a token can leave early in this forward (training runs every head; eval needs a stage
        whose rule lets tokens leave: a p0 < 1, or an exit ratio > 0 in budget mode)."""
        return self.training or self.force_exit is not None or any(map(self.exits_at, range(self.num_stages - 1)))

    def forward_no_exit(self, images: Tensor) -> SegmentationOutput:
        """The forward where nothing can leave (eval, every p0 >= 1): the dense forward and the bookkeeping
        of every token finalised by the final head, built without per-block work (its dispatched operations
        are the dense model's plus a constant few)."""
        out, grid = self.final_head(images)
        B, N, S, run = images.shape[0], grid[0] * grid[1], self.num_stages, self.stage_blocks[-1] + 1
        canvas = Canvas(B, grid, S, mixed=self.space == "prob", device=images.device)
        stage = canvas.write(S - 1, self.to_space(out), out.logits, out.presence, None, None)
        counts = torch.tensor([[N + self.backbone.prefix_in_blocks] * run + [0] * (self.backbone.depth - run)] * B)
        head_tokens = torch.tensor([[0] * (S - 1) + [N]] * B)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return SegmentationOutput(
            scores=self.finalise(canvas.scores, out.presence, grid, size), canvas=stage.canvas,
            exit_stage=torch.full((B, *grid), S - 1, device=images.device), tokens_per_block=counts,
            head_tokens=head_tokens, image_size=size, stages=[stage])

    def forward(self, images: Tensor) -> SegmentationOutput:
        """DToP forward. images (B, 3, H, W), H and W multiples of the patch size -> SegmentationOutput."""
        if not self.can_exit():
            return self.forward_no_exit(images)
        x, grid = self.backbone.embed(images)
        B, depth, S = x.shape[0], self.backbone.depth, self.num_stages
        layout = self.layout if self.layout != "auto" else default_layout(x.device)
        P = self.backbone.prefix_in_blocks
        tokens = PaddedTokens.full(x, P, grid[0] * grid[1])
        canvas = Canvas(B, grid, S, mixed=self.space == "prob", device=x.device)
        per_block: list[Counts] = []  # each block's token counts: host ints, or a (B,) tensor on the device
        decoded: dict[int, Counts] = {}  # stage -> the tokens its head decoded (prefix included)
        stages = []
        for i, blk in enumerate(self.backbone.blocks[: self.stage_blocks[-1] + 1]):
            tokens.run(blk)
            per_block.append(known_counts(tokens))
            stage = self.stage_of_block.get(i)
            if stage is None or self.idle(stage):
                continue
            out, pos, valid = tokens.decode(partial(self.decode, stage))
            decoded[stage] = per_block[-1]  # its head decodes the tokens in play (prefix tokens too, counted out)
            stages.append(canvas.write(stage, self.to_space(out), out.logits, out.presence, pos, valid))
            exact = (self.exact_budget() and self.layout != "per_image" and isinstance(tokens, PaddedTokens)
                     and tokens.valid is None)
            exits = self.decide_exits(stage, out, valid, check_any=layout != "packed" and not exact,
                                      num_tokens=tokens.N)
            if exits is not None:
                canvas.tokens_left()
                if exact:  # every image exits exactly its budget: the kept tokens stay one (B, n, C) tensor
                    tokens = tokens.keep_exactly(~exits, exits.shape[1] - min(self.budget(stage, tokens.N),
                                                                              exits.shape[1]))
                else:
                    tokens = drop_exits(tokens, exits, layout, self.bucket)
        del tokens, out, x  # free the token features before the full-resolution upsampling (peak memory)
        tokens_per_block, head_tokens = host_counts(per_block, decoded, depth, S, P)
        size, scores = (int(images.shape[-2]), int(images.shape[-1])), canvas.scores
        return SegmentationOutput(
            scores=self.finalise(scores, stages[-1].presence, grid, size),
            canvas=scores.reshape(B, -1, *grid), exit_stage=canvas.exit_map(),
            tokens_per_block=tokens_per_block, head_tokens=head_tokens, image_size=size, stages=stages)


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch timm's fused scaled_dot_product_attention on or off in every attention layer
    (off lets FLOP counters such as fvcore see the attention matmuls)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled
