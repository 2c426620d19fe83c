"""The supplement's token-reduction alternatives: bookkeeping, geometry, GFLOPs, exactness limits."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import gflops, images, tiny_model
from dtop.errors import ConfigError
from dtop.flops import dense_flops, static_flops
from dtop.models import DToPSegmentor, ReducedSegmentor, SegmentorConfig, build_model
from dtop.models.config import ReductionSpec, default_block
from dtop.models.reduction import (SymmetricDownsample, cluster_tokens, query_downsample_block,
                                   reconstruction_weights, subsample, upsample_tokens, window_mask)
from test_flops import fvcore_count

KINDS = ["conv", "avgpool", "nearest", "shrunk", "expedite"]


def reduced(model: DToPSegmentor, kind: str, **spec) -> ReducedSegmentor:
    """``model``'s weights in a model with the reduction ``kind`` (new reducer weights keep their init)."""
    cfg = dataclasses.replace(model.cfg, reduction=ReductionSpec(kind, **spec))
    r = build_model(cfg).eval()
    missing, unexpected = r.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("reducer.") for k in missing)
    return r


def token_map(B=2, C=8, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, h * w, C, generator=g), (h, w)


# ---------------------------------------------------------------- pure functions
def test_symmetric_operators_on_odd_grids():
    t, grid = token_map()
    m = t.transpose(1, 2).reshape(2, 8, *grid)
    for kind in ("avgpool", "nearest", "conv"):
        out, small = SymmetricDownsample(kind, 8)(t, grid)
        assert small == (3, 4) and out.shape == (2, 12, 8)
        got = out.transpose(1, 2).reshape(2, 8, *small)
        if kind == "nearest":
            assert torch.equal(got, m[:, :, ::2, ::2])
        else:  # the 2x2 mean; cells cut by the odd edge: avgpool averages what is there, conv repeats the edge
            assert torch.allclose(got[:, :, 1, 1], m[:, :, 2:4, 2:4].mean((2, 3)), atol=1e-6)
            assert torch.allclose(got[:, :, 2, 3], m[:, :, 4, 6], atol=1e-6)  # corner cell: one token
            assert torch.allclose(got[:, :, 2, 0], m[:, :, 4, 0:2].mean(2), atol=1e-6)


def test_upsample_tokens_puts_each_coarse_value_over_its_own_cell():
    small, grid = (3, 4), (5, 7)
    v = torch.zeros(1, 1, 12)
    v[0, 0, 1 * 4 + 2] = 1.0  # coarse cell (1, 2) covers fine rows 2..3, columns 4..5
    up = upsample_tokens(v, small, grid).reshape(*grid)
    assert up.shape == grid
    assert up[2:4, 4:6].min() > up[[0, 4]].max()  # strongest under its own cell
    const = upsample_tokens(torch.full((2, 3, 12), 0.7), small, grid)
    assert const.shape == (2, 3, 35) and torch.allclose(const, torch.full_like(const, 0.7))


def test_query_downsampling_equals_the_full_block_subsampled():
    """Each query's output depends only on itself and all keys: subsampling the queries is exact."""
    model = tiny_model(cls_mode="segmenter")
    blk = model.backbone.blocks[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + 35, 64, generator=g)
    for fused in (True, False):
        blk.attn.fused_attn = fused
        with torch.no_grad():
            out, small = query_downsample_block(blk, x, 1, (5, 7))
            full = blk(x)
        assert small == (3, 4)
        expected = torch.cat([full[:, :1], subsample(full[:, 1:], (5, 7))], dim=1)
        assert torch.allclose(out, expected, atol=1e-5)


def test_window_mask_limits_each_token_to_nearby_centroids():
    mask = window_mask((8, 8), (4, 4), window=3)  # radius 1 centroid cell
    assert mask.shape == (64, 16)
    # token (0, 0) starts in centroid (0, 0): it may join centroids (0..1, 0..1)
    assert mask[0].reshape(4, 4).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    # token (5, 6) starts in centroid (2, 3): rows 1..3, columns 2..3
    assert mask[5 * 8 + 6].reshape(4, 4)[1:4, 2:4].all() and mask[5 * 8 + 6].sum() == 6
    assert window_mask((8, 8), (4, 4), window=9).all()


def test_clustering_starts_from_the_average_pool_and_stays_in_the_token_hull():
    t, grid = token_map(C=4)
    c0 = cluster_tokens(t, grid, (2, 3), iters=0)
    pooled = F.adaptive_avg_pool2d(t.transpose(1, 2).reshape(2, 4, *grid), (2, 3)).flatten(2).transpose(1, 2)
    assert torch.allclose(c0, pooled, atol=1e-6)
    c = cluster_tokens(t, grid, (2, 3), iters=5, tau=0.5)
    assert c.shape == (2, 6, 4) and not torch.allclose(c, c0)
    lo, hi = t.min(1).values[:, None], t.max(1).values[:, None]
    assert ((c >= lo - 1e-5) & (c <= hi + 1e-5)).all()  # weighted means of tokens


def test_reconstruction_weights_are_sparse_and_unit_norm():
    t, grid = token_map()
    c = cluster_tokens(t, grid, (2, 3), tau=0.5)
    w = reconstruction_weights(t, c, tau=0.5, topk=4)
    assert w.shape == (2, 35, 6)
    assert ((w > 0).sum(-1) <= 4).all() and ((w > 0).sum(-1) >= 1).all()
    assert torch.allclose(w.norm(dim=-1), torch.ones(2, 35), atol=1e-5)


# ---------------------------------------------------------------- models
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls_mode", ["segvit", "segmenter"])
def test_reduced_models_shapes_and_gflops_equal_fvcore(kind, cls_mode):
    model = reduced(tiny_model(("linear", "mask", "atm"), cls_mode=cls_mode), kind, block=1, cluster_scale=0.5)
    x = images(2, 48, 112)  # a 3 x 7 token grid: odd on both sides
    with torch.no_grad():
        out = model(x)
    assert out.scores.shape == (2, 5, 48, 112) and out.canvas.shape == (2, 5, 3, 7)
    assert torch.isfinite(out.scores).all()
    kept = 2 * 4  # halved: ceil(3/2) x ceil(7/2); Expedite at scale 0.5: round(1.5) x round(3.5)
    P = model.backbone.prefix_in_blocks
    assert out.tokens_per_block[0].tolist() == [P + 21, P + 21 if kind != "shrunk" else P + kept, P + kept,
                                                P + kept]
    assert out.head_tokens[0].tolist() == [0, 0, kept]  # eval: only the final head runs
    flops = round(gflops(model, out)[0].item() * 1e9)
    assert flops == fvcore_count(model, x[:1])
    assert flops == static_flops(model, (48, 112), final_head_only=True)
    assert flops < dense_flops(tiny_model(("linear", "mask", "atm"), cls_mode=cls_mode), (48, 112), True)


@pytest.mark.parametrize("kind", ["avgpool", "shrunk", "expedite"])
def test_training_forward_counts_every_head(kind):
    model = reduced(tiny_model(("linear", "linear", "linear")), kind, block=2, cluster_scale=0.5).train()
    x = images(1, 64, 96)
    out = model(x)
    assert len(out.stages) == 3 and all(s.logits.shape == (1, 5, 4, 6) for s in out.stages)
    assert round(gflops(model, out)[0].item() * 1e9) == fvcore_count(model.eval(), x) + (
        static_flops(model, (64, 96)) - static_flops(model, (64, 96), final_head_only=True))
    out.stages[0].logits.sum().backward()  # the heads before the reduction still train the backbone
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_expedite_with_a_centroid_per_token_reproduces_the_dense_model():
    base = tiny_model(("linear", "mask", "atm"), cls_mode="segmenter")
    x = images(2, 64, 96)
    # one centroid per token; a sharp tau makes assignment and reconstruction one-to-one
    model = reduced(base, "expedite", block=1, cluster_scale=1.0, tau=1e4)
    with torch.no_grad():
        dense, out = base.forward_dense(x), model(x)
    assert out.head_tokens[0, -1] == 24
    assert torch.allclose(out.scores, dense, atol=1e-4)
    # with the default tau the same model is no longer exact (the clusters blur)
    with torch.no_grad():
        blurred = reduced(base, "expedite", block=1, cluster_scale=1.0)(x).scores
    assert not torch.allclose(blurred, dense, atol=1e-4)


def test_conv_starts_as_average_pooling():
    base = tiny_model(("linear", "linear", "linear"))
    x = images(1, 64, 128)
    with torch.no_grad():
        assert torch.allclose(reduced(base, "conv", block=2)(x).scores, reduced(base, "avgpool", block=2)(x).scores,
                              atol=1e-5)


def test_reduction_config_errors_and_defaults():
    assert default_block("avgpool", 12) == 8 and default_block("shrunk", 12) == 7 and default_block("conv", 24) == 17
    base = tiny_model()
    with pytest.raises(ConfigError, match="unknown reduction"):
        reduced(base, "bilinear")
    with pytest.raises(ConfigError, match="blocks 0..3"):
        reduced(base, "avgpool", block=7)
    with pytest.raises(ConfigError, match="cluster_scale"):
        reduced(base, "expedite", block=1, cluster_scale=1.5)
    cfg = SegmentorConfig.from_dict({**base.cfg.to_dict(), "reduction": {"kind": "nearest", "block": 2}})
    assert cfg.reduction == ReductionSpec("nearest", block=2)
    with pytest.raises(ConfigError, match="reduction: unknown keys"):
        SegmentorConfig.from_dict({**base.cfg.to_dict(), "reduction": {"kind": "nearest", "layer": 2}})
