"""Token layouts: how the tokens still in play are held and run through the blocks (``docs/method/layouts.md``).

While no token has left, the batch is one (B, P + N, C) tensor (:class:`PaddedTokens` without padding).
After the first exit the kept tokens move to the model's layout (``DToPSegmentor.set_layout``):

- ``per_image``: each image's kept tokens as its own (1, P + n_b, C) tensor, blocks run per image.
  The exact reference, and the fastest on CPU (no padding, no masks).
- ``padded``: kept tokens gathered to the longest kept length, a key-padding mask through
  ``scaled_dot_product_attention``; with ``bucket`` the images are grouped into buckets of similar length.
- ``packed``: all kept tokens of the batch in one (T, C) sequence; per-token layers (qkv, MLP,
  norms: most of the FLOPs) run as one matmul, attention runs per image
  (:func:`dtop.models.blocks.varlen_attention`: torch's variable-length kernel on CUDA).

Every layout implements :class:`TokenLayout`; all are tested equal to ``per_image`` (scores, exit maps,
token counts, GFLOPs, gradients). ``P`` prefix tokens (CLS, registers: ``segmenter`` mode) never exit.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, Union, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import unknown_name
from ..pruning import compact, gather_tokens, kept_columns, pad_positions
from .blocks import packed_block
from .heads import HeadOutput

HeadFn = Callable[[Tensor, Optional[Tensor]], HeadOutput]
LAYOUTS = ("auto", "per_image", "padded", "packed")


@runtime_checkable
class TokenLayout(Protocol):
    """The operations the DToP forward needs from the tokens in play (B images, N patch tokens).

    - ``run(block)``: run one ViT block on the tokens in play (in place).
    - ``counts()`` -> (B,) long: tokens each image sent through the last block, prefix included.
    - ``host_counts()`` -> the same as a list of B host ints when the layout knows them without reading the
      device (no host sync), else None.
    - ``decode(head)`` -> (out, pos, valid): ``head(x (B, L, C), valid (B, L) or None)`` on the patch
      tokens in play, its output :class:`~dtop.models.heads.HeadOutput` with (B, K, L) per-token values,
      ``pos`` (B, L) long their token positions (None while no token has left: the L = N columns are every
      token in raster order) and ``valid`` (B, L) bool the real ones. Every padding column's position must
      be ``N``: the canvas writes through ``pos`` unmasked, and position N is its padding sink.
    - ``prune(keep)`` -> a new layout holding only the tokens where ``keep`` (B, L) (the columns of the
      last ``decode``) is True, in their original order.
    """

    def run(self, blk: nn.Module) -> None: ...

    def counts(self) -> Tensor: ...

    def host_counts(self) -> Optional[list[int]]: ...

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Optional[Tensor], Tensor]: ...

    def prune(self, keep: Tensor) -> "TokenLayout": ...


def default_layout(device: torch.device) -> str:
    """``per_image`` on CPU (measured fastest there), ``packed`` on CUDA."""
    return "packed" if device.type == "cuda" else "per_image"


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else a ConfigError naming the choices."""
    if layout not in LAYOUTS:
        raise unknown_name("layout", layout, LAYOUTS)
    return layout


def _patches(x: Tensor, P: int) -> Tensor:
    """The patch columns of x (B, P + L, ...): the columns after the ``P`` prefix ones (x itself when P = 0)."""
    return x[:, P:] if P else x


class PaddedTokens:
    """x (B, P + L, C) with a (B, L) validity mask; ``valid=None`` means no padding (the dense batch).
    pos (B, L): the token position of each column (padding = N); None: the L = N columns are every token in
    raster order (the batch before any token left; :attr:`pos` makes the positions when asked)."""

    def __init__(self, x: Tensor, pos: Optional[Tensor], valid: Optional[Tensor], P: int, N: int) -> None:
        self.x, self._pos, self.valid, self.P, self.N = x, pos, valid, P, N
        self._counts: Optional[Tensor] = None  # counts(), made once: the blocks do not change it

    @classmethod
    def full(cls, x: Tensor, P: int, N: int) -> "PaddedTokens":
        """The whole batch x (B, P + N, C), before any token has left."""
        return cls(x, None, None, P, N)

    @property
    def pos(self) -> Tensor:
        """(B, L) long: the token position of each column (padding = N)."""
        if self._pos is None:
            self._pos = torch.arange(self.N, device=self.x.device).expand(self.x.shape[0], self.N)
        return self._pos

    def _attn_mask(self) -> Optional[Tensor]:
        if self.valid is None:
            return None
        keys = torch.cat([self.valid.new_ones(self.valid.shape[0], self.P), self.valid], dim=1)
        # an image with no token left keeps one (padding) key so softmax stays finite; its rows are unused
        keys[:, 0] |= ~keys.any(dim=1)
        return keys[:, None, None]

    def run(self, blk: nn.Module) -> None:
        if self.x.shape[1] == 0:  # every token of every image here has left
            return
        mask = self._attn_mask()
        self.x = blk(self.x) if mask is None else blk(self.x, attn_mask=mask)

    def counts(self) -> Tensor:
        if self._counts is None:
            if self.valid is None:
                self._counts = torch.full((self.x.shape[0],), self.x.shape[1], device=self.x.device)
            else:
                self._counts = self.valid.sum(1) + self.P
        return self._counts

    def host_counts(self) -> Optional[list[int]]:
        return [self.x.shape[1]] * self.x.shape[0] if self.valid is None else None  # padded: only the device knows

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Optional[Tensor], Tensor]:
        B, L = self.x.shape[0], self.x.shape[1] - self.P
        valid = self.valid if self.valid is not None else self.x.new_ones(B, L, dtype=torch.bool)
        return head(_patches(self.x, self.P), self.valid), self._pos, valid

    def keep_exactly(self, keep: Tensor, count: int) -> "PaddedTokens":
        """The tokens where ``keep`` (B, L), when every image keeps exactly ``count`` (budget exits, no padding
        in ``self``): a (B, P + count, C) batch without padding. Fixed shapes, no host sync."""
        cols = kept_columns(keep, count)
        return PaddedTokens(gather_tokens(self.x, cols, offset=self.P), self.pos.gather(1, cols), None, self.P, self.N)

    def prune(self, keep: Tensor) -> "PaddedTokens":
        """Each image's kept tokens compacted to the front, in their original order."""
        if self.valid is not None:
            keep = keep & self.valid
        order, valid = compact(keep)
        pos = torch.where(valid, self.pos.gather(1, order), torch.full_like(order, self.N))
        return PaddedTokens(gather_tokens(self.x, order, offset=self.P), pos, valid, self.P, self.N)


class BucketedTokens:
    """Images as :class:`PaddedTokens` buckets ``(ids (b,), tokens)`` whose longest member is at most
    ``1 + max_waste`` times their shortest, to cut padding."""

    def __init__(self, buckets: list[tuple[Tensor, PaddedTokens]], B: int, N: int) -> None:
        self.buckets, self.B, self.N = buckets, B, N

    @classmethod
    def from_padded(cls, t: PaddedTokens, max_waste: float = 0.25) -> "BucketedTokens":
        """Sort the images by kept length and cut the order into buckets (one host sync)."""
        lengths = (t.counts() - t.P).cpu()
        order = torch.argsort(lengths, descending=True).tolist()
        groups: list[list[int]] = []
        for b in order:
            if groups and int(lengths[groups[-1][0]]) <= (1 + max_waste) * max(1, int(lengths[b])):
                groups[-1].append(b)
            else:
                groups.append([b])
        buckets = []
        for g in groups:
            ids = torch.tensor(g, device=t.x.device)
            L = int(lengths[g].max())
            valid = t.valid[ids, :L] if t.valid is not None else None
            buckets.append((ids, PaddedTokens(t.x[ids, : t.P + L], t.pos[ids, :L], valid, t.P, t.N)))
        return cls(buckets, t.x.shape[0], t.N)

    def run(self, blk: nn.Module) -> None:
        for _, sub in self.buckets:
            sub.run(blk)

    def counts(self) -> Tensor:
        out = torch.zeros(self.B, dtype=torch.long, device=self.buckets[0][0].device)
        for ids, sub in self.buckets:
            out[ids] = sub.counts()
        return out

    def host_counts(self) -> Optional[list[int]]:
        return None

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        parts = [(ids, *sub.decode(head)) for ids, sub in self.buckets]
        L = max(p[2].shape[1] for p in parts)
        ref = parts[0][1].logits
        logits = ref.new_zeros(self.B, ref.shape[1], L)
        pos = torch.full((self.B, L), self.N, dtype=torch.long, device=ref.device)
        valid = torch.zeros(self.B, L, dtype=torch.bool, device=ref.device)
        presence = ref.new_zeros(self.B, ref.shape[1], 2) if parts[0][1].presence is not None else None
        for ids, out, p, v in parts:
            n = p.shape[1]
            logits[ids, :, :n], pos[ids, :n], valid[ids, :n] = out.logits, p, v
            if presence is not None:
                presence[ids] = out.presence
        return HeadOutput(logits, presence), pos, valid

    def prune(self, keep: Tensor) -> "BucketedTokens":
        return BucketedTokens([(ids, sub.prune(keep[ids, : sub.pos.shape[1]])) for ids, sub in self.buckets],
                              self.B, self.N)


def _pad_outputs(outs: list[HeadOutput], lengths: list[int]) -> HeadOutput:
    """Per-image outputs (1, K, n_b) -> one (B, K, L) output, zeros in the padding."""
    L = max(lengths) if lengths else 0
    logits = torch.cat([F.pad(o.logits, (0, L - o.logits.shape[-1])) for o in outs])
    presence = torch.cat([o.presence for o in outs]) if outs[0].presence is not None else None
    return HeadOutput(logits, presence)


class PerImageTokens:
    """One (1, P + n_b, C) tensor per image and its (n_b,) token positions: the exact reference layout."""

    def __init__(self, xs: list[Tensor], idx: list[Tensor], P: int, N: int) -> None:
        self.xs, self.idx, self.P, self.N = xs, idx, P, N
        self._counts: Optional[Tensor] = None  # counts(), made once: the blocks do not change it

    @classmethod
    def from_padded(cls, t: PaddedTokens) -> "PerImageTokens":
        lengths = (t.counts() - t.P).tolist()  # one host sync, when the layout switches
        # fresh tensors, not views of the batch: a compiled block would otherwise recompile per stride/offset
        xs = [t.x[b:b + 1, : t.P + n].clone() for b, n in enumerate(lengths)]
        return cls(xs, [t.pos[b, :n] for b, n in enumerate(lengths)], t.P, t.N)

    def run(self, blk: nn.Module) -> None:
        self.xs = [blk(x) if x.shape[1] else x for x in self.xs]

    def counts(self) -> Tensor:
        if self._counts is None:
            self._counts = torch.tensor(self.host_counts(), device=self.xs[0].device)
        return self._counts

    def host_counts(self) -> list[int]:
        return [x.shape[1] for x in self.xs]

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        outs = [head(x[:, self.P:], None) for x in self.xs]
        pos, valid = pad_positions(self.idx, self.N)
        return _pad_outputs(outs, [len(i) for i in self.idx]), pos, valid

    def prune(self, keep: Tensor) -> "PerImageTokens":
        kept = [keep[b, : len(idx)].nonzero(as_tuple=True)[0] for b, idx in enumerate(self.idx)]
        return PerImageTokens([gather_tokens(x, k, offset=self.P) for x, k in zip(self.xs, kept)],
                              [idx[k] for idx, k in zip(self.idx, kept)], self.P, self.N)


class PackedTokens:
    """All kept tokens of the batch in one (T, C) tensor, image after image (each image's prefix tokens first).

    ``flat`` (T,) holds each row's place ``b * W + s`` in the (B, W) grid its image's tokens are padded to for
    the heads (``W`` the longest image, prefix included: slot ``s`` counts the image's rows in order), ``pos``
    (B, W - P) the token position of each patch column of that grid (padding = ``N``), ``lengths`` (B host
    ints) the rows per image, prefix included. Built so that a GPU pays a fixed number of launches whatever
    the batch: per-token layers are one matmul over T, attention is one registered operator
    (:func:`dtop.models.blocks.varlen_attention`), heads decode all images at once from one scatter into the
    grid, and :meth:`prune` gathers the kept rows straight from that grid with the layout's one host sync
    per exit stage (the kept counts, to size the kept tensors)."""

    def __init__(self, x: Tensor, flat: Tensor, pos: Tensor, lengths: list[int], P: int, N: int,
                 counts: Optional[Tensor] = None) -> None:
        self.x, self.flat, self.pos, self.lengths, self.P, self.N = x, flat, pos, lengths, P, N
        dev = x.device
        self._counts = torch.tensor(lengths, device=dev) if counts is None else counts
        # the varlen kernel's sequence offsets, made on the device (a host list copied over would be a second
        # host sync per stage on CUDA); an image without rows is an empty sequence, a repeated offset
        self._cu = F.pad(self._counts.cumsum(0), (1, 0))
        self._grid: Optional[Tensor] = None  # (B, W, C): the rows of the last decode
        self._valid: Optional[Tensor] = None  # (B, W - P) bool: its real patch columns

    @classmethod
    def from_grid(cls, grid: Tensor, keep: Tensor, pos: Optional[Tensor], P: int, N: int) -> "PackedTokens":
        """The prefix rows of ``grid`` (B, W, C) and its patch rows where ``keep`` (B, W - P) bool, packed in
        order; ``pos`` (B, W - P) the token positions of the patch columns (None: every token in raster order,
        W - P = N). One host sync (the counts)."""
        B, W, C = grid.shape
        keep = F.pad(keep, (P, 0), value=True) if P else keep
        counts = keep.sum(1)
        lengths = counts.tolist()
        width = max(lengths, default=0)
        # the kept cells in order: a stable descending sort of the mask puts them first, keeping their order
        # (sorting a bool tensor on CUDA needs torch 2.6, the floor in pyproject.toml)
        src = torch.sort(keep.reshape(-1), descending=True, stable=True).indices[: sum(lengths)]
        slot = keep.cumsum(1) - 1  # each kept column's slot in its image
        flat = src // W * width + slot.reshape(-1).index_select(0, src)
        if pos is None:  # raster order: a cell's column is its token's position (prefix cells: dropped below)
            kept_pos = src % W - P if P else src % W
        else:
            kept_pos = (F.pad(pos, (P, 0), value=N) if P else pos).reshape(-1).index_select(0, src)
        new_pos = torch.full((B * width,), N, dtype=torch.long, device=grid.device)
        new_pos = _patches(new_pos.index_copy_(0, flat, kept_pos).view(B, width), P)
        return cls(grid.reshape(B * W, C).index_select(0, src), flat, new_pos, lengths, P, N, counts)

    @classmethod
    def from_padded(cls, t: PaddedTokens, exits: Optional[Tensor] = None) -> "PackedTokens":
        """Pack a padded batch: the rows of ``t.x`` (B, P + L, C) that are prefix tokens or valid and, when
        ``exits`` (B, L) bool is given, not leaving (the first exit packs only the tokens that stay)."""
        if exits is None:
            keep = t.valid if t.valid is not None else t.x.new_ones(t.x.shape[0], t.x.shape[1] - t.P, dtype=torch.bool)
        else:
            keep = ~exits if t.valid is None else and_not(t.valid, exits)
        return cls.from_grid(t.x, keep, t._pos, t.P, t.N)

    def run(self, blk: nn.Module) -> None:
        if self.x.shape[0]:
            fn = getattr(blk, "dtop_packed_block", packed_block)  # compiled by Segmentor.compile, if it was
            self.x = fn(blk, self.x, self._cu, max(self.lengths))

    def counts(self) -> Tensor:
        return self._counts

    def host_counts(self) -> list[int]:
        return list(self.lengths)  # read when the layout was packed (its one host sync)

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        B, W, C = len(self.lengths), max(self.lengths, default=0), self.x.shape[1]
        self._grid = self.x.new_zeros(B * W, C).index_copy(0, self.flat, self.x).view(B, W, C)
        self._valid = self.pos < self.N
        return head(_patches(self._grid, self.P), self._valid), self.pos, self._valid

    def prune(self, keep: Tensor) -> "PackedTokens":
        """The tokens where ``keep`` (B, W - P) (the columns of the last :meth:`decode`) and the prefix rows."""
        return PackedTokens.from_grid(self._grid, keep & self._valid, self.pos, self.P, self.N)

    def drop(self, exits: Tensor) -> "PackedTokens":
        """The tokens of the last :meth:`decode` that stay, ``exits`` (B, W - P) being the ones that leave."""
        return PackedTokens.from_grid(self._grid, and_not(self._valid, exits), self.pos, self.P, self.N)


def known_counts(tokens: TokenLayout) -> Union[list[int], Tensor]:
    """``tokens.host_counts()`` when the layout knows its counts on the host, else the (B,) ``tokens.counts()``."""
    counts = tokens.host_counts()
    return tokens.counts() if counts is None else counts


def drop_exits(tokens: TokenLayout, exits: Tensor, layout: str, bucket: bool = False) -> TokenLayout:
    """The tokens in play after the ones where ``exits`` (B, L) (the columns of the last ``decode``) left, in
    layout ``layout``. The first exit packs the kept tokens of the padded batch (one host sync); the other
    layouts prune the padded batch and then convert it."""
    if layout == "packed":
        return tokens.drop(exits) if isinstance(tokens, PackedTokens) else PackedTokens.from_padded(tokens, exits)
    return to_layout(tokens.prune(~exits), layout, bucket)


def and_not(a: Tensor, b: Tensor) -> Tensor:
    """``a & ~b`` for bool tensors in one operation (``a > b``: True only where a is True and b is False)."""
    return a > b


def to_layout(tokens: TokenLayout, layout: str, bucket: bool = False) -> TokenLayout:
    """The layout ``layout`` (not ``auto``) for the rest of the forward, once tokens have started to leave:
    :class:`PaddedTokens` are converted, any other layout is returned as it is."""
    if not isinstance(tokens, PaddedTokens):
        return tokens
    if layout == "per_image":
        return PerImageTokens.from_padded(tokens)
    if layout == "packed":
        return PackedTokens.from_padded(tokens)
    if layout == "padded":
        return BucketedTokens.from_padded(tokens) if bucket else tokens
    raise unknown_name("layout", layout, LAYOUTS[1:])
