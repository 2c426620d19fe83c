"""Segmentation heads that run on any subset of tokens.

Every head maps tokens ``x`` (B, n, C) to a :class:`HeadOutput` with per-class
scores for each token it saw (``docs/method/canvas.md``). Heads are registered by name in :data:`HEADS`:

- ``atm``: SegViT's Attention-to-Mask head (mask logits = cross-attention logits).
- ``mask``: Segmenter's mask transformer.
- ``linear``: LayerNorm + Linear per token.

The ATM head's attention is fused (``scaled_dot_product_attention``) like timm's and can be switched off
(every matmul explicit, so any FLOP counter sees them: :func:`dtop.models.set_fused_attn`), as can the
fused attention of the timm ``Block``s of the mask transformer.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn


@dataclass
class HeadOutput:
    """logits: (B, K, n) ATM mask logits or per-token class logits; presence: (B, K, 2) for ATM
    (index 0 = present, 1 = absent), else None."""

    logits: Tensor
    presence: Optional[Tensor] = None

    def probs(self) -> Tensor:
        """Per-class probabilities (B, K, n): ATM ``softmax(z)[present] * sigmoid(A)``, else softmax over K."""
        if self.presence is not None:
            return atm_scores(self.presence, self.logits)
        return self.logits.softmax(dim=1)


def atm_scores(presence: Tensor, mask_logits: Tensor) -> Tensor:
    """``softmax(z[c])[present] * sigmoid(A[c, n])``: presence (B, K, 2), mask_logits (B, K, n) -> (B, K, n)."""
    return presence.softmax(dim=-1)[..., :1] * mask_logits.sigmoid()


def masked_softmax(logits: Tensor, key_valid: Optional[Tensor] = None) -> Tensor:
    """Attention weights: softmax of ``logits`` (B, h, Q, n) over the keys where ``key_valid`` (B, n) bool
    (all keys when None) -> (B, h, Q, n), zero at the other keys.

    An image with no valid key (every token of it has left) gets all-zero weights, so its attention output
    is zero: the empty sum, what the image gives on its own with n = 0 keys. A fully masked softmax row
    would be NaN (pytorch/pytorch#103749) in the forward and the gradients; here it never forms."""
    if key_valid is None:
        return logits.softmax(dim=-1)
    keys, has_key = _keys(key_valid)
    return logits.masked_fill(~keys, float("-inf")).softmax(dim=-1) * has_key


def _keys(key_valid: Tensor) -> tuple[Tensor, Tensor]:
    """key_valid (B, n) bool -> the keys to attend (B, 1, 1, n), where an image without a valid key attends
    to all its (padding) keys so that its softmax stays finite, and has_key (B, 1, 1, 1) bool, to zero
    that image's output afterwards."""
    B, n = key_valid.shape
    has_key = key_valid.any(dim=1).view(B, 1, 1, 1)
    return key_valid.view(B, 1, 1, n) | ~has_key, has_key


def key_bias(key_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """key_valid (B, n) bool -> an additive attention bias (B, 1, 1, n): 0 at the valid keys, half the most
    negative ``dtype`` value at the others (finite: an image whose keys are all padding gets a uniform, finite
    softmax over them instead of NaN; with its padding values zeroed its output is then zero, the empty sum)."""
    B, n = key_valid.shape
    return (key_valid.to(dtype) - 1).mul(-torch.finfo(dtype).min / 2).view(B, 1, 1, n)


class QueryAttention(nn.Module):
    """Multi-head attention of queries over keys that also returns the pre-softmax logits averaged over heads
    (SegViT's ``attn``, the mask logits of the ATM head).

    ``fused_attn`` (default True, as timm's ``Attention``): the attention runs as one
    ``scaled_dot_product_attention`` and the head-averaged logits as one batched matmul of the full-width
    queries and keys (the heads split the channels, so the mean of the h per-head dot products is the
    full dot product / h): few dispatched operations. False: every matmul explicit (what FLOP counters
    such as fvcore see; :func:`dtop.models.set_fused_attn`). Both compute the same values."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = True
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def queries(self, xq: Tensor) -> Tensor:
        """The query projection scaled by ``scale / num_heads``: xq (B, Q, d) -> (B, Q, d). With that scale the
        full-width dot product with a key is the head-averaged attention logit."""
        return self.q(xq) * (self.scale / self.num_heads)

    def _heads(self, t: Tensor) -> Tensor:
        """(B, n, d) -> (B, h, n, d / h), a view."""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, xq: Tensor, xkv: Tensor, key_valid: Optional[Tensor] = None,
                q: Optional[Tensor] = None, batch: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """xq (B or 1, Q, d) queries, xkv (B, n, d) tokens or their rows (B * n, d) with ``batch`` = B,
        key_valid (B, n) bool or None -> out (B, Q, d), logits (B, Q, n).

        Keys where ``key_valid`` is False (padding) take no part in the softmax; an image without a valid key
        gets out = proj(0), the empty sum. ``q``: ``queries(xq)`` when the caller already has it (batch 1 or
        B). The key and value projections run on the token rows (one 2-D matmul each, no reshapes)."""
        d, h = xq.shape[-1], self.num_heads
        rows = xkv if batch is not None else xkv.reshape(-1, d)
        B = batch if batch is not None else xkv.shape[0]
        n, Q = rows.shape[0] // max(B, 1), xq.shape[1]
        q = (self.queries(xq) if q is None else q).expand(B, Q, d)
        k, v = self.k(rows).view(B, n, d), self.v(rows)
        if key_valid is not None:
            v = v * key_valid.reshape(B * n, 1)  # padding values are zero: an image without keys sums nothing
        v = v.view(B, n, h, d // h).transpose(1, 2)  # (B, h, n, d / h)
        if self.fused_attn:
            logits = torch.bmm(q, k.transpose(1, 2))  # (B, Q, n): the mean over heads of the scaled logits
            bias = key_bias(key_valid, k.dtype) if key_valid is not None else None
            # q carries scale / h: scale=h restores the per-head scale
            out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), v, attn_mask=bias, scale=float(h))
        else:
            per_head = self._heads(q) @ self._heads(k).transpose(-2, -1)  # (B, h, Q, n), scaled by scale / h
            logits = per_head.sum(dim=1)
            out = masked_softmax(per_head * h, key_valid) @ v
        return self.proj(out.transpose(1, 2).reshape(B * Q, d)).view(B, Q, d), logits


class ATMDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, query-to-token cross-attention, FFN (4d, ReLU)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.self_attn = QueryAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = QueryAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.norm3 = nn.LayerNorm(dim)

    def query_side(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """What this layer computes from its queries alone: q (B, Q, d) -> the queries after self-attention
        (B, Q, d) and their cross-attention projection (B, Q, d) (:meth:`QueryAttention.queries`)."""
        q = self.norm1(q + self.self_attn(q, q)[0])
        return q, self.cross_attn.queries(q)

    def forward(self, q: Tensor, x: Tensor, valid: Optional[Tensor] = None,
                query_side: Optional[tuple[Tensor, Tensor]] = None, batch: Optional[int] = None
                ) -> tuple[Tensor, Tensor]:
        """q (B or 1, Q, d) queries, x (B, n, d) tokens or their rows (B * n, d) with ``batch`` = B, valid (B, n)
        -> the queries' rows (B * Q, d) (the FFN runs on them), mask logits (B, Q, n). ``query_side``:
        ``self.query_side(q)`` when the caller already has it (broadcastable over B)."""
        q, q_proj = self.query_side(q) if query_side is None else query_side
        out, mask_logits = self.cross_attn(q, x, valid, q_proj, batch=batch)
        B, Q, d = out.shape
        q = self.norm2(q + out).view(B * Q, d)
        return self.norm3(q + self.ffn(q)), mask_logits


class ATMHead(nn.Module):
    """SegViT Attention-to-Mask head: one learned query per class (query c <-> class c)."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 384, num_layers: int = 3,
                 num_heads: Optional[int] = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.input_proj = nn.Linear(in_dim, dim)
        self.proj_norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.layers = nn.ModuleList(ATMDecoderLayer(dim, num_heads or max(1, dim // 64)) for _ in range(num_layers))
        self.presence = nn.Linear(dim, 2)
        trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimiser leaves without weight decay (besides norms and biases): the class queries."""
        return {"query"}

    def first_query_side(self) -> tuple[Tensor, Tensor]:
        """The first layer's query side (:meth:`ATMDecoderLayer.query_side` of the learned queries, (1, K, d)
        and (1, K, d)): it depends on the weights only, so inference (no autograd, not traced or
        compiled) computes it once per weight version, dtype and autocast state and reuses it; that saves
        about 50 dispatched operations per head and forward. The GFLOPs count keeps it (the paper's count,
        ``dtop.flops.atm_head_flops``; 4Kd^2 + 2K^2d + Kd^2 per head, about 0.1 GFLOPs at K 150, d 384)."""
        layer = self.layers[0]
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return layer.query_side(self.query)
        dev = self.query.device.type
        key = (tuple((p._version, p.data_ptr()) for p in self._query_side_params()), dev,
               torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        cached = self.__dict__.get("_query_side_cache")
        if cached is None or cached[0] != key:
            cached = (key, tuple(t.detach() for t in layer.query_side(self.query)))
            self.__dict__["_query_side_cache"] = cached  # not a buffer: never saved, moved or copied
        return cached[1]

    def _query_side_params(self) -> list[Tensor]:
        layer = self.layers[0]
        return [self.query, *layer.self_attn.parameters(), *layer.norm1.parameters(), *layer.cross_attn.q.parameters()]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_query_side_cache", None)
        return state

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> HeadOutput:
        """x (B, n, C); valid (B, n) bool marks real tokens when the batch is padded. The first layer's
        queries are the learned class queries (the same for every image: :meth:`first_query_side`)."""
        B, n, C = x.shape
        x = self.proj_norm(self.input_proj(x.reshape(B * n, C)))  # (B * n, d): per-token layers on the rows
        q, mask_logits = self.layers[0](None, x, valid, self.first_query_side(), batch=B)  # q: (B * K, d) rows
        for layer in self.layers[1:]:
            q, mask_logits = layer(q.view(B, self.num_classes, -1), x, valid, batch=B)
        return HeadOutput(logits=mask_logits, presence=self.presence(q).view(B, self.num_classes, 2))


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer: class embeddings decoded jointly with the patch tokens."""

    def __init__(self, in_dim: int, num_classes: int, dim: Optional[int] = None, num_layers: int = 2,
                 num_heads: Optional[int] = None, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        dim = dim or in_dim
        self.num_classes = num_classes
        self.scale = dim ** -0.5
        self.proj_dec = nn.Linear(in_dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        # Segmenter's decoder blocks: qkv with bias, LayerNorm eps 1e-5 (so published weights convert exactly)
        self.blocks = nn.ModuleList(Block(dim, num_heads or max(1, dim // 64), mlp_ratio=mlp_ratio, qkv_bias=True,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-5)) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        trunc_normal_(self.cls_emb, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimiser leaves without weight decay (besides norms and biases): the class embeddings."""
        return {"cls_emb"}

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> HeadOutput:
        """x (B, n, C); valid (B, n) bool marks real tokens when the batch is padded."""
        B, n = x.shape[:2]
        x = torch.cat([self.proj_dec(x), self.cls_emb.expand(B, -1, -1)], dim=1)
        mask = None
        if valid is not None:
            mask = torch.cat([valid, valid.new_ones(B, self.num_classes)], dim=1)[:, None, None]
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :n] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, n:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, n, K)
        return HeadOutput(logits=masks.transpose(1, 2))


class LinearHead(nn.Module):
    """LayerNorm + Linear(C -> K) per token."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(in_dim)
        self.fc = nn.Linear(in_dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> HeadOutput:
        """Per token: padding (``valid``) needs no special care."""
        return HeadOutput(logits=self.fc(self.norm(x)).transpose(1, 2))


HEADS: dict[str, Callable[..., nn.Module]] = {
    "atm": ATMHead,
    "mask": MaskTransformerHead,
    "linear": LinearHead,
}
