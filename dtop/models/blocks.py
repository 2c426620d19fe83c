"""timm ``Block`` forwards that dtop needs in another shape: the one place to check when timm changes.

Both functions below are derived from timm's ``Block.forward`` and ``Attention.forward``
(``timm/models/vision_transformer.py``, timm 1.0): ``x + drop_path1(ls1(attn(norm1(x))))`` then
``x + drop_path2(ls2(mlp(norm2(x))))``, with ``Attention`` = fused ``qkv`` projection, optional
``q_norm``/``k_norm``, scaled dot-product attention, ``norm``, ``proj``. They read the block's own
submodules, so weights, LayerScale, DropPath and QK-norm behave as in timm.

- :func:`packed_block`: the block on all kept tokens of a batch packed into one (T, C) sequence
  (the ``packed`` layout, :mod:`dtop.models.layouts`);
- :func:`query_downsample_block`: the block with 2x2-subsampled queries over all keys (SegViT shrunk,
  :mod:`dtop.models.reduction`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Grid = tuple[int, int]


def _attention_per_sequence(q: Tensor, k: Tensor, v: Tensor, cu: Tensor) -> Tensor:
    """(T, H, D) packed q/k/v -> (T, H, D), attention within each sequence of ``cu`` (empty ones skipped)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                                      v[s:e].transpose(0, 1)[None])[0].transpose(0, 1)
    return out


def varlen_kernel_available() -> bool:
    """Whether torch provides a variable-length attention kernel (``torch.nn.attention.varlen``) and CUDA."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _varlen(qkv: Tensor, cu: Tensor, max_len: int, num_heads: int) -> Tensor:
    """qkv (T, 3 * C) -> (T, C): torch's variable-length kernel on CUDA in fp16/bf16, one SDPA call per sequence
    elsewhere (which reads ``cu`` on the host: on CUDA in fp32 that is a host sync per call)."""
    T = qkv.shape[0]
    q, k, v = qkv.view(T, 3, num_heads, -1).unbind(1)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_kernel_available():
        from torch.nn.attention.varlen import varlen_attn

        cu32 = cu.to(torch.int32)
        return varlen_attn(q, k, v, cu32, cu32, max_len, max_len).reshape(T, -1)
    return _attention_per_sequence(q, k, v, cu).reshape(T, -1)


@torch.library.custom_op("dtop::varlen_attention", mutates_args=())
def _varlen_op(qkv: Tensor, cu: Tensor, max_len: int, num_heads: int) -> Tensor:
    """The packed attention as one registered operator, taking the fused qkv projection as flash-attention's
    ``qkvpacked`` variant does: one dispatched op (one launch on CUDA, where it is torch's variable-length
    kernel in fp16/bf16), one opaque node with a fake implementation for torch.compile. Elsewhere its body
    loops over the sequences (the fastest measured on CPU)."""
    return _varlen(qkv, cu, max_len, num_heads)


@_varlen_op.register_fake
def _(qkv: Tensor, cu: Tensor, max_len: int, num_heads: int) -> Tensor:
    return qkv.new_empty(qkv.shape[0], qkv.shape[1] // 3)


def varlen_attention(qkv: Tensor, cu: Tensor, max_len: int, num_heads: int) -> Tensor:
    """Attention within each of the packed sequences delimited by the cumulative lengths ``cu`` (S + 1,) long
    (an empty sequence repeats an offset), ``max_len`` the longest: qkv (T, 3 * C), the fused projection
    ``[q | k | v]`` with ``num_heads`` heads each -> (T, C). The registered operator ``dtop::varlen_attention``
    for inference; with autograd on (training), the same computation as differentiable torch calls (one SDPA
    call per sequence, or torch's variable-length kernel on CUDA in fp16/bf16)."""
    if not (torch.is_grad_enabled() and qkv.requires_grad):
        return _varlen_op(qkv, cu, max_len, num_heads)
    return _varlen(qkv, cu, max_len, num_heads)


def _qk_normed(attn: nn.Module, qkv: Tensor) -> Tensor:
    """qkv (T, 3 * C) with timm's ``q_norm``/``k_norm`` (QK-norm ViTs) applied per head; as it is without them."""
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        return qkv
    q, k, v = qkv.view(qkv.shape[0], 3, attn.num_heads, attn.head_dim).unbind(1)
    return torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=1).flatten(1)


def packed_block(blk: nn.Module, x: Tensor, cu: Tensor, max_len: int) -> Tensor:
    """A timm ``Block`` on packed tokens x (T, C) -> (T, C): per-token layers over all T at once, attention
    within each sequence of ``cu`` (S + 1,) cumulative lengths, ``max_len`` the longest. Derived from
    timm's ``Block.forward``."""
    attn = blk.attn
    qkv = _qk_normed(attn, attn.qkv(blk.norm1(x)))
    o = varlen_attention(qkv, cu, max_len, attn.num_heads)
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(o)))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def half_grid(grid: Grid) -> Grid:
    """The token grid after 2x2 downsampling: (ceil(h/2), ceil(w/2))."""
    return (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))


def subsample(t: Tensor, grid: Grid) -> Tensor:
    """2x2 nearest sampling: the top-left token of every 2x2 cell. (B, h*w, C) -> (B, ceil(h/2)*ceil(w/2), C)."""
    m = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)[:, :, ::2, ::2]
    return m.flatten(2).transpose(1, 2)


def query_downsample_block(blk: nn.Module, x: Tensor, prefix: int, grid: Grid) -> tuple[Tensor, Grid]:
    """A timm ``Block`` whose queries are the ``prefix`` tokens and the 2x2-subsampled patch tokens, attending
    to all tokens (SegViT shrunk's query-based downsampling). x (B, P + h*w, C) -> (B, P + h2*w2, C) and
    the halved grid (h2, w2).
    Derived from timm's ``Block.forward`` and ``Attention.forward`` (fused or explicit attention)."""
    attn = blk.attn
    B, T, C = x.shape
    h = blk.norm1(x)

    def queries(t: Tensor) -> Tensor:
        return torch.cat([t[:, :prefix], subsample(t[:, prefix:], grid)], dim=1)

    xq, hq = queries(x), queries(h)
    M = xq.shape[1]
    d = attn.qkv.out_features // 3
    w, b = attn.qkv.weight, attn.qkv.bias
    q = F.linear(hq, w[:d], None if b is None else b[:d]).reshape(B, M, attn.num_heads, -1).transpose(1, 2)
    kv = F.linear(h, w[d:], None if b is None else b[d:]).reshape(B, T, 2, attn.num_heads, -1)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if blk.training else 0.0)
    else:
        o = attn.attn_drop(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(B, M, d))))
    x = xq + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), half_grid(grid)
