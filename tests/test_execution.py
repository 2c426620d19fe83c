"""Every execution layout gives the reference (per-image) result."""
import pytest
import torch

from conftest import CLS_MODES, DINOV2_TINY, HEAD_SETS, gflops, images, p0_at_quantile, tiny_model
from dtop.errors import ConfigError
from dtop.models.layouts import BucketedTokens, PaddedTokens

LAYOUTS = [("padded", False), ("padded", True), ("packed", False)]


def _batch():
    return torch.cat([images(1, 96, 128, seed=s) * (0.5 + s) for s in range(4)])


def per_image_and(model, x, layout, bucket):
    """The outputs of the per-image layout and of ``layout`` on ``x``, thresholds set so images keep
    different numbers of tokens."""
    model.set_p0([p0_at_quantile(model, x, 0.4), p0_at_quantile(model, x, 0.5, stage=1)])
    with torch.no_grad():
        model.set_layout("per_image")
        ref = model(x)
        model.set_layout(layout, bucket)
        return ref, model(x)


@pytest.mark.parametrize("heads", list(HEAD_SETS))
@pytest.mark.parametrize("cls_mode", CLS_MODES)
@pytest.mark.parametrize("layout,bucket", LAYOUTS)
def test_layout_equals_per_image(heads, cls_mode, layout, bucket):
    model = tiny_model(HEAD_SETS[heads], cls_mode=cls_mode, topk=1)
    ref, out = per_image_and(model, _batch(), layout, bucket)
    assert len(set(ref.tokens_per_block[:, -1].tolist())) > 1  # images kept different numbers of tokens
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.canvas, ref.canvas, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.exit_stage, ref.exit_stage)
    assert torch.equal(out.tokens_per_block, ref.tokens_per_block)
    assert torch.equal(out.head_tokens, ref.head_tokens)
    assert torch.equal(gflops(model, out), gflops(model, ref))
    for a, b in zip(out.stages, ref.stages):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.valid, b.valid)


@pytest.mark.parametrize("layout,bucket", LAYOUTS)
def test_layouts_train_with_the_same_gradients(layout, bucket):
    from dtop.engine import segmentation_loss

    x = _batch()
    label = torch.randint(0, 5, (4, 96, 128), generator=torch.Generator().manual_seed(0))
    grads = []
    for p, b in (("per_image", False), (layout, bucket)):
        model = tiny_model(("atm", "linear", "mask"), cls_mode="segmenter", topk=1)
        model.set_p0(p0_at_quantile(model, x, 0.4))
        model.train().set_layout(p, b)
        loss, _ = segmentation_loss(model(x), label)
        loss.backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_image_with_every_token_gone_stays_finite():
    model = tiny_model(("linear", "linear", "linear"), topk=0)  # no context tokens: an image can empty out
    x = _batch()
    model.force_exit = lambda stage, conf, valid: valid & (torch.arange(4)[:, None] == 0)  # image 0: all leave
    model.set_p0(0.5)
    for layout, bucket in [("per_image", False)] + LAYOUTS:
        model.set_layout(layout, bucket)
        with torch.no_grad():
            out = model(x)
        assert torch.isfinite(out.scores).all(), layout
        assert out.tokens_per_block[0, -1] == 0 and (out.exit_stage[0] == 0).all()


def test_bucketing_groups_similar_lengths():
    x = torch.randn(4, 10, 3)
    t = PaddedTokens.full(x, 0, 10)
    keep = torch.zeros(4, 10, dtype=torch.bool)
    for b, n in enumerate([10, 2, 9, 3]):
        keep[b, :n] = True
    bucketed = BucketedTokens.from_padded(t.prune(keep), max_waste=0.25)
    groups = sorted(sorted(ids.tolist()) for ids, _ in bucketed.buckets)
    assert groups == [[0, 2], [1], [3]]
    assert bucketed.counts().tolist() == [10, 2, 9, 3]


def test_unknown_layout():
    with pytest.raises(ConfigError, match="unknown layout 'fast'"):
        tiny_model().set_layout("fast")


@pytest.mark.parametrize("cls_mode", CLS_MODES)
@pytest.mark.parametrize("layout,bucket", LAYOUTS)
def test_dinov2_with_registers_layout_equals_per_image(cls_mode, layout, bucket):
    """Patch 14, LayerScale, CLS + 4 registers (5 prefix tokens through the blocks in segmenter mode)."""
    model = tiny_model(HEAD_SETS["mixed"], cls_mode=cls_mode, topk=1, **DINOV2_TINY)
    ref, out = per_image_and(model, torch.cat([images(1, 84, 112, seed=s) * (0.5 + s) for s in range(3)]),
                             layout, bucket)
    assert (ref.exit_stage < 2).any()
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.exit_stage, ref.exit_stage)
    assert torch.equal(out.tokens_per_block, ref.tokens_per_block)
