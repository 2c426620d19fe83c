"""How the tokens still in play run through the blocks after the first exit.

Three layouts of the same computation, chosen per device and overridable
(``DToPSegmentor.execution``):

- ``per_image``: each image's kept tokens as its own (1, P + n_b, C) tensor, blocks run per image.
  The exact reference, and the fastest on CPU (no padding, no masks).
- ``padded``: kept tokens gathered to the longest kept length, a key-padding mask through
  ``scaled_dot_product_attention``; images optionally grouped into buckets of similar length.
- ``packed``: all kept tokens of the batch in one (T, C) sequence; per-token layers (qkv, MLP,
  norms: most of the FLOPs) run as one matmul, attention runs per image: with torch's
  variable-length kernel on CUDA (``torch.nn.attention.varlen.varlen_attn``) and one SDPA per
  image elsewhere.

Every layout offers the same operations: ``run(block)``, ``counts()`` (tokens each image sent
through the last block), ``decode(head)`` (head outputs padded to a common (B, K, L) with the
token positions, pad position = N) and ``prune(keep)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.heads import HeadOutput
from .tokens import gather_tokens

HeadFn = Callable[[Tensor, Optional[Tensor]], HeadOutput]
PATHS = ("auto", "per_image", "padded", "packed")


def default_path(device: torch.device) -> str:
    """``per_image`` on CPU (measured fastest there), ``packed`` on CUDA."""
    return "packed" if device.type == "cuda" else "per_image"


def _pad_outputs(outs: list[HeadOutput], lengths: list[int]) -> HeadOutput:
    """Per-image outputs (1, K, n_b) -> one (B, K, L) output, zeros in the padding."""
    L = max(lengths) if lengths else 0
    logits = torch.cat([F.pad(o.logits, (0, L - o.logits.shape[-1])) for o in outs])
    presence = torch.cat([o.presence for o in outs]) if outs[0].presence is not None else None
    return HeadOutput(logits, presence)


def _pad_positions(idx: list[Tensor], N: int) -> tuple[Tensor, Tensor]:
    """Per-image token positions -> (B, L) positions (pad = N) and (B, L) valid mask."""
    L = max(len(i) for i in idx)
    pos = torch.stack([F.pad(i, (0, L - len(i)), value=N) for i in idx])
    return pos, pos < N


class PaddedTokens:
    """(B, P + L, C) with a (B, L) validity mask; ``valid=None`` means no padding (the dense batch)."""

    def __init__(self, x: Tensor, pos: Tensor, valid: Optional[Tensor], P: int, N: int) -> None:
        self.x, self.pos, self.valid, self.P, self.N = x, pos, valid, P, N

    @classmethod
    def full(cls, x: Tensor, P: int, N: int) -> "PaddedTokens":
        B = x.shape[0]
        return cls(x, torch.arange(N, device=x.device).expand(B, N), None, P, N)

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
        if self.valid is None:
            return torch.full((self.x.shape[0],), self.pos.shape[1] + self.P, device=self.x.device)
        return self.valid.sum(1) + self.P

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        valid = self.valid if self.valid is not None else torch.ones_like(self.pos, dtype=torch.bool)
        return head(self.x[:, self.P:], self.valid), self.pos, valid

    def prune(self, keep: Tensor) -> "PaddedTokens":
        """keep (B, L): compact each image's kept tokens to the front, in their original order."""
        if self.valid is not None:
            keep = keep & self.valid
        lengths = keep.sum(1)
        L = int(lengths.max()) if len(lengths) else 0
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :L]
        valid = torch.arange(L, device=keep.device) < lengths[:, None]
        pos = torch.where(valid, self.pos.gather(1, order), torch.full_like(order, self.N))
        return PaddedTokens(gather_tokens(self.x, order, offset=self.P), pos, valid, self.P, self.N)


class BucketedTokens:
    """Images sorted by kept length and split into :class:`PaddedTokens` buckets whose longest
    member is at most ``1 + max_waste`` times their shortest, to cut padding."""

    def __init__(self, buckets: list[tuple[Tensor, PaddedTokens]], B: int, N: int) -> None:
        self.buckets, self.B, self.N = buckets, B, N

    @classmethod
    def from_padded(cls, t: PaddedTokens, max_waste: float = 0.25) -> "BucketedTokens":
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
            sub = PaddedTokens(t.x[ids, : t.P + L], t.pos[ids, :L], valid, t.P, t.N)
            buckets.append((ids, sub))
        return cls(buckets, t.x.shape[0], t.N)

    def run(self, blk: nn.Module) -> None:
        for _, sub in self.buckets:
            sub.run(blk)

    def counts(self) -> Tensor:
        out = torch.zeros(self.B, dtype=torch.long, device=self.buckets[0][0].device)
        for ids, sub in self.buckets:
            out[ids] = sub.counts()
        return out

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        parts = [(ids, *sub.decode(head)) for ids, sub in self.buckets]
        L = max(p[2].shape[1] for p in parts)
        K = parts[0][1].logits.shape[1]
        ref = parts[0][1].logits
        logits = ref.new_zeros(self.B, K, L)
        pos = torch.full((self.B, L), self.N, dtype=torch.long, device=ref.device)
        valid = torch.zeros(self.B, L, dtype=torch.bool, device=ref.device)
        presence = ref.new_zeros(self.B, K, 2) if parts[0][1].presence is not None else None
        for ids, out, p, v in parts:
            n = p.shape[1]
            logits[ids, :, :n], pos[ids, :n], valid[ids, :n] = out.logits, p, v
            if presence is not None:
                presence[ids] = out.presence
        return HeadOutput(logits, presence), pos, valid

    def prune(self, keep: Tensor) -> "BucketedTokens":
        for i, (ids, sub) in enumerate(self.buckets):
            self.buckets[i] = (ids, sub.prune(keep[ids, : sub.pos.shape[1]]))
        return self


class PerImageTokens:
    """One (1, P + n_b, C) tensor per image: the exact reference path."""

    def __init__(self, xs: list[Tensor], idx: list[Tensor], P: int, N: int) -> None:
        self.xs, self.idx, self.P, self.N = xs, idx, P, N

    @classmethod
    def from_padded(cls, t: PaddedTokens) -> "PerImageTokens":
        lengths = (t.counts() - t.P).tolist()  # one host sync, when the layout switches
        xs = [t.x[b:b + 1, : t.P + n] for b, n in enumerate(lengths)]
        return cls(xs, [t.pos[b, :n] for b, n in enumerate(lengths)], t.P, t.N)

    def run(self, blk: nn.Module) -> None:
        self.xs = [blk(x) if x.shape[1] else x for x in self.xs]

    def counts(self) -> Tensor:
        return torch.tensor([x.shape[1] for x in self.xs])

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        outs = [head(x[:, self.P:], None) for x in self.xs]
        pos, valid = _pad_positions(self.idx, self.N)
        return _pad_outputs(outs, [len(i) for i in self.idx]), pos, valid

    def prune(self, keep: Tensor) -> "PerImageTokens":
        for b, idx in enumerate(self.idx):
            k = keep[b, : len(idx)].nonzero(as_tuple=True)[0]
            self.xs[b] = gather_tokens(self.xs[b], k, offset=self.P)
            self.idx[b] = idx[k]
        return self


def _attention_per_sequence(q: Tensor, k: Tensor, v: Tensor, cu: Tensor) -> Tensor:
    """(T, H, D) packed q/k/v -> (T, H, D), attention within each sequence of ``cu``."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                                      v[s:e].transpose(0, 1)[None])[0].transpose(0, 1)
    return out


def varlen_kernel_available() -> bool:
    """Whether torch provides a variable-length attention kernel (``torch.nn.attention.varlen``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
    """Variable-length attention over packed sequences (T, H, D): torch's kernel on CUDA in fp16/bf16,
    one SDPA call per sequence elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_kernel_available():
        from torch.nn.attention.varlen import varlen_attn

        cu32 = cu.to(torch.int32)
        return varlen_attn(q, k, v, cu32, cu32, max_len, max_len)
    return _attention_per_sequence(q, k, v, cu)


def packed_block(blk: nn.Module, x: Tensor, cu: Tensor, max_len: int) -> Tensor:
    """A timm ``Block`` on packed tokens (T, C): per-token layers over all T at once, attention per sequence."""
    attn = blk.attn
    T = x.shape[0]
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(T, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = varlen_attention(q, k, v, cu, max_len).reshape(T, -1)
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class PackedTokens:
    """All kept tokens of the batch (prefix tokens first in each image's run) in one (T, C) tensor."""

    def __init__(self, x: Tensor, lengths: Tensor, idx: list[Tensor], P: int, N: int) -> None:
        self.x, self.lengths, self.idx, self.P, self.N = x, lengths, idx, P, N  # lengths include P

    @classmethod
    def from_padded(cls, t: PaddedTokens) -> "PackedTokens":
        per = PerImageTokens.from_padded(t)
        lengths = torch.tensor([x.shape[1] for x in per.xs])
        return cls(torch.cat([x[0] for x in per.xs]), lengths, per.idx, t.P, t.N)

    def _cu(self) -> Tensor:
        return F.pad(self.lengths.cumsum(0), (1, 0)).to(self.x.device)

    def run(self, blk: nn.Module) -> None:
        if self.x.shape[0]:
            self.x = packed_block(blk, self.x, self._cu(), int(self.lengths.max()))

    def counts(self) -> Tensor:
        return self.lengths.clone()

    def _split(self) -> list[Tensor]:
        return list(self.x.split(self.lengths.tolist()))

    def decode(self, head: HeadFn) -> tuple[HeadOutput, Tensor, Tensor]:
        pos, valid = _pad_positions(self.idx, self.N)
        L = pos.shape[1]
        rows = [F.pad(r[self.P:], (0, 0, 0, L - (r.shape[0] - self.P))) for r in self._split()]
        return head(torch.stack(rows), valid), pos, valid

    def prune(self, keep: Tensor) -> "PackedTokens":
        rows = []
        for b, (r, idx) in enumerate(zip(self._split(), self.idx)):
            k = keep[b, : len(idx)].nonzero(as_tuple=True)[0]
            rows.append(gather_tokens(r[None], k, offset=self.P)[0])
            self.idx[b] = idx[k]
        self.lengths = torch.tensor([r.shape[0] for r in rows])
        self.x = torch.cat(rows)
        return self


def switch_layout(t: PaddedTokens, path: str, bucket: bool = False):
    """The layout for the rest of the forward once tokens have started to leave."""
    if path == "per_image":
        return PerImageTokens.from_padded(t)
    if path == "packed":
        return PackedTokens.from_padded(t)
    if path == "padded":
        return BucketedTokens.from_padded(t) if bucket else t
    raise ValueError(f"unknown execution path {path!r}; choose from {PATHS}")
