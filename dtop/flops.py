"""Analytic FLOP counts driven by the real token counts of a forward pass (``docs/method/flops.md``).

Convention (fvcore's): one multiply-add = one FLOP, batch 1; linear/conv/matmul count
in x out per row; LayerNorm 5 per element; bilinear upsampling 4 per output element;
softmax, activations, additions and index operations count zero. Attention matmuls are
counted (fvcore and FlopCounterMode miss them when they run as fused SDPA).

The models do not count themselves: a forward returns its token counts
(:class:`~dtop.models.SegmentationOutput`), and :func:`forward_gflops` turns them into GFLOPs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import InputError
from .models import ReducedSegmentor, Segmentor, SegmentationOutput, create_model
from .models.heads import ATMHead, LinearHead, MaskTransformerHead


def _norm(module: Optional[nn.Module], elements: int) -> int:
    """A LayerNorm over ``elements`` values costs 5 per element (4 without affine); Identity costs 0."""
    if isinstance(module, nn.LayerNorm):
        return elements * (5 if module.elementwise_affine else 4)
    return 0


def vit_block_flops(blk: nn.Module, n: int, keys: Optional[int] = None) -> int:
    """A timm ViT ``Block`` on ``n`` tokens; with ``keys``, the ``n`` tokens are queries attending to
    ``keys`` tokens (SegViT shrunk's query downsampling: norm1 and the k/v projections see every key)."""
    if n <= 0:
        return 0
    m = n if keys is None else keys
    attn, mlp = blk.attn, blk.mlp
    C = attn.qkv.in_features
    attn_dim = attn.proj.in_features
    hidden = mlp.fc1.out_features
    f = _norm(blk.norm1, m * C) + _norm(blk.norm2, n * C)
    f += n * C * attn_dim + m * C * (attn.qkv.out_features - attn_dim)  # q; k and v
    f += n * attn_dim * attn.proj.out_features  # out projection
    f += 2 * n * m * attn_dim  # q @ k^T and attn @ v over all heads
    f += _norm(getattr(attn, "q_norm", None), n * attn_dim) + _norm(getattr(attn, "k_norm", None), m * attn_dim)
    f += _norm(getattr(attn, "norm", None), n * attn_dim) + _norm(getattr(mlp, "norm", None), n * hidden)
    f += n * C * hidden + n * hidden * mlp.fc2.out_features
    return f


def atm_head_flops(head: ATMHead, n: int) -> int:
    """ATM head decoding ``n`` tokens: input projection, then per layer query self-attention,
    cross-attention to the tokens (k/v projections of all n tokens), FFN, three norms."""
    C, d = head.input_proj.in_features, head.input_proj.out_features
    K = head.num_classes
    f = n * C * d + _norm(head.proj_norm, n * d)
    for layer in head.layers:
        hidden = layer.ffn[0].out_features
        f += 4 * K * d * d + 2 * K * K * d  # self-attention: q, k, v, proj; logits and values
        f += 2 * K * d * d + 2 * n * d * d + 2 * K * n * d  # cross: q, proj on queries; k, v on tokens; matmuls
        f += 2 * K * d * hidden
        f += sum(_norm(nm, K * d) for nm in (layer.norm1, layer.norm2, layer.norm3))
    return f + K * d * head.presence.out_features


def mask_head_flops(head: MaskTransformerHead, n: int) -> int:
    """Segmenter mask transformer on ``n`` tokens: K class embeddings join the n tokens in its blocks."""
    C, d = head.proj_dec.in_features, head.proj_dec.out_features
    K = head.num_classes
    m = n + K
    f = n * C * d + sum(vit_block_flops(blk, m) for blk in head.blocks) + _norm(head.decoder_norm, m * d)
    f += n * d * d + K * d * d + n * K * d  # patch / class projections, masks = patches . classes^T
    return f + _norm(head.mask_norm, n * K)


def linear_head_flops(head: LinearHead, n: int) -> int:
    return _norm(head.norm, n * head.fc.in_features) + n * head.fc.in_features * head.fc.out_features


def head_flops(head: nn.Module, n: int) -> int:
    if n <= 0:
        return 0
    if isinstance(head, ATMHead):
        return atm_head_flops(head, n)
    if isinstance(head, MaskTransformerHead):
        return mask_head_flops(head, n)
    if isinstance(head, LinearHead):
        return linear_head_flops(head, n)
    raise TypeError(f"no FLOP formula for head type {type(head).__name__}")


def segmentor_flops(model, size: tuple[int, int], tokens_per_block: Sequence[int],
                    head_tokens: Sequence[int], reduced: bool = True) -> int:
    """FLOPs of one image's forward through ``model`` (a DToPSegmentor) at input ``size`` (H, W),
    given the tokens each block processed and the tokens each stage head decoded (``reduced=False``:
    ignoring the model's token-reduction alternative, if it has one). InputError for a size that is not
    whole patches (:func:`check_size`): the model refuses it too."""
    check_size(model, size)
    bb = model.backbone
    vit = bb.vit
    H, W = size
    p = bb.patch_size
    N = (H // p) * (W // p)
    conv = vit.patch_embed.proj
    f = conv.in_channels * conv.out_channels * p * p * N
    f += _norm(getattr(vit.patch_embed, "norm", None), N * bb.embed_dim)
    f += _norm(getattr(vit, "norm_pre", None), (bb.num_prefix + N) * bb.embed_dim)
    red = model.reducer if reduced and isinstance(model, ReducedSegmentor) else None
    shrunk = red is not None and red.kind == "shrunk"
    f += sum(vit_block_flops(blk, int(n), bb.prefix_in_blocks + N if shrunk and i == red.block else None)
             for i, (blk, n) in enumerate(zip(bb.blocks, tokens_per_block)))
    for s, (head, n) in enumerate(zip(model.heads, head_tokens)):
        f += head_flops(head, int(n))
        if s == model.num_stages - 1 and model.cfg.final_norm:
            f += _norm(vit.norm, int(n) * bb.embed_dim)
    if red is not None:
        f += reduction_flops(model, (H // p, W // p), head_tokens)
    return f + 4 * model.num_classes * H * W  # bilinear upsampling of the score map


def reduction_flops(model, grid: tuple[int, int], head_tokens: Sequence[int]) -> int:
    """The cost of a token-reduction alternative (:mod:`dtop.models.reduction`) beyond its blocks and heads:
    the reduction itself, and bringing the output of every head that ran after it back to the token grid."""
    red = model.reducer
    C, K = model.backbone.embed_dim, model.num_classes
    N = grid[0] * grid[1]
    h2, w2 = red.reduced_grid(grid)
    after = [n for s, n in zip(model.stage_blocks, head_tokens) if s >= red.block and int(n) > 0]
    per_map = 2 if model.space == "prob" else 1  # the prob space brings back both probabilities and logits
    if red.kind == "expedite":
        m = h2 * w2
        f = N * C + red.spec.iters * 2 * N * m * C + N * m * C  # init pool; per iteration distances, means; weights
        return f + len(after) * per_map * K * m * N  # reconstruction matmul
    f = C * C * 4 * h2 * w2 if red.kind == "conv" else 0  # pooling and sampling count zero (fvcore)
    return f + len(after) * per_map * 4 * K * (2 * h2) * (2 * w2)  # bilinear x2 upsampling


def reduced_counts(model, size: tuple[int, int], final_head_only: bool = False) -> tuple[list[int], list[int]]:
    """Token counts of a model with a token-reduction alternative (same for every image); InputError for a
    size that is not whole patches (:func:`check_size`)."""
    check_size(model, size)
    red, bb = model.reducer, model.backbone
    grid = (size[0] // bb.patch_size, size[1] // bb.patch_size)
    small = red.reduced_grid(grid)
    N, m, P = grid[0] * grid[1], small[0] * small[1], bb.prefix_in_blocks
    last = model.stage_blocks[-1]
    full = [i < red.block or (i == red.block and red.kind != "shrunk") for i in range(bb.depth)]
    tokens = [0 if i > last else P + (N if full[i] else m) for i in range(bb.depth)]
    heads = [0 if final_head_only and s < model.num_stages - 1 else (N if b < red.block else m)
             for s, b in enumerate(model.stage_blocks)]
    return tokens, heads


def _quadratic(fn) -> tuple[int, int, int]:
    """Exact (a, b, c) with fn(n) = a + b n + c n^2 for n >= 1 (every formula here is such a polynomial)."""
    f1, f2, f3 = fn(1), fn(2), fn(3)
    c2 = f3 - 2 * f2 + f1  # = 2c
    b = f2 - f1 - 3 * c2 // 2
    a = f1 - b - c2 // 2
    if fn(7) != a + 7 * b + 49 * (c2 // 2):
        raise AssertionError("FLOP formula is not quadratic in the token count")
    return a, b, c2 // 2


def _coefficients(model) -> tuple:
    """Per block and per stage head (with the final norm), the quadratic FLOP coefficients."""
    bb = model.backbone
    blocks = [_quadratic(lambda n, blk=blk: vit_block_flops(blk, n)) for blk in bb.blocks]
    heads = []
    for s, head in enumerate(model.heads):
        norm = model.cfg.final_norm and s == model.num_stages - 1
        heads.append(_quadratic(lambda n, h=head, fn=norm: head_flops(h, n) + (
            _norm(bb.vit.norm, n * bb.embed_dim) if fn else 0)))
    return blocks, heads


def segmentor_flops_batch(model, size: tuple[int, int], tokens_per_block: Tensor, head_tokens: Tensor) -> Tensor:
    """Vectorised :func:`segmentor_flops` for a batch: tokens_per_block (B, depth), head_tokens (B, S)
    integer tensors -> (B,) float64 FLOPs (exact integers up to 2**53)."""
    blocks, heads = _coefficients(model)
    const = segmentor_flops(model, size, [0] * len(blocks), [0] * len(heads))
    total = torch.full((tokens_per_block.shape[0],), float(const), dtype=torch.float64,
                       device=tokens_per_block.device)
    for counts, coeffs in ((tokens_per_block, blocks), (head_tokens, heads)):
        n = counts.to(torch.float64)
        for j, (a, b, c) in enumerate(coeffs):
            total += torch.where(n[:, j] > 0, a + b * n[:, j] + c * n[:, j] ** 2, 0.0)
    return total


def check_size(model, size: Sequence[int]) -> None:
    """InputError unless ``size`` (H, W) is positive multiples of the model's patch size (counting a size
    the model cannot take would silently count the floor of it)."""
    p = model.backbone.patch_size
    if len(size) != 2 or min(size) < p or size[0] % p or size[1] % p:
        near = " x ".join(str(max(p, -(-int(s) // p) * p)) for s in size)
        raise InputError(f"size {' x '.join(map(str, size))} is not a positive multiple of the patch size {p} "
                         f"(backbone {model.cfg.backbone}); use e.g. {near}: the data pipeline pads images "
                         f"to whole patches")


def dense_counts(model, size: tuple[int, int], final_head_only: bool = False) -> tuple[list[int], list[int]]:
    """Token counts of the dense model: every block up to the final head sees all tokens."""
    check_size(model, size)
    p = model.backbone.patch_size
    N = (size[0] // p) * (size[1] // p)
    T = N + model.backbone.prefix_in_blocks
    last = model.stage_blocks[-1]
    tokens = [T if i <= last else 0 for i in range(model.backbone.depth)]
    heads = [0 if final_head_only and s < model.num_stages - 1 else N for s in range(model.num_stages)]
    return tokens, heads


def dense_flops(model, size: tuple[int, int], final_head_only: bool = False) -> int:
    """FLOPs of the dense model at ``size``, with all stage heads or only the final one (a model with a
    token-reduction alternative: its forward without the reduction, as ``forward_dense`` runs it)."""
    return segmentor_flops(model, size, *dense_counts(model, size, final_head_only), reduced=False)


def static_flops(model, size: tuple[int, int], final_head_only: bool = False) -> int:
    """FLOPs of the model without early exit: the dense model, or the reduced forward of a model with
    a token-reduction alternative."""
    if not isinstance(model, ReducedSegmentor):
        return dense_flops(model, size, final_head_only)
    return segmentor_flops(model, size, *reduced_counts(model, size, final_head_only))


def forward_gflops(model: Segmentor, out: SegmentationOutput) -> Tensor:
    """(B,) float64 GFLOPs of each image of the forward that returned ``out``, counted from its token
    counts (``out.tokens_per_block``, ``out.head_tokens``) at ``out.image_size``."""
    if isinstance(model, ReducedSegmentor):  # every image alike; the reduction's cost is not a polynomial
        flops = segmentor_flops(model, out.image_size, out.tokens_per_block[0].tolist(), out.head_tokens[0].tolist())
        return torch.full((out.tokens_per_block.shape[0],), flops / 1e9, dtype=torch.float64)
    return segmentor_flops_batch(model, out.image_size, out.tokens_per_block, out.head_tokens) / 1e9


# The paper's dense GFLOPs (docs/method/flops.md):
# (preset, crop, classes, final head only, reference GFLOPs).
PAPER_TABLE: list[tuple[str, int, int, bool, float]] = [
    ("segmenter_vit_s16", 512, 150, True, 38.6),
    ("segmenter_vit_b16", 512, 150, True, 129.6),
    ("segmenter_vit_l16", 640, 150, True, 671.8),
    ("segvit_vit_b16", 512, 150, False, 109.9),
    ("segvit_vit_l16", 640, 150, False, 617.0),
    ("segvit_vit_l16", 480, 59, False, 315.4),
    ("segvit_vit_l16", 512, 171, False, 366.9),
]


def default_size(model) -> tuple[int, int]:
    """512 x 512 rounded up to whole patches (518 x 518 for patch 14): the size ``dtop flops`` counts by default."""
    p = model.backbone.patch_size
    return (-(-512 // p) * p,) * 2


def preset_gflops(name: str, size: Optional[tuple[int, int]], num_classes: int, final_head_only: bool = False,
                  **overrides) -> float:
    """GFLOPs of a preset without early exit (dense, or with a ``reduction`` override), built on the
    meta device (no weights allocated). ``size`` None: 512 x 512 rounded up to whole patches (518 for patch 14)."""
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **overrides)
    if size is None:
        size = default_size(model)
    return static_flops(model, size, final_head_only) / 1e9
