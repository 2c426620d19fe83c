"""Degenerate token sets: images that lose every token at an exit.

Every layout must give the per-image result, finite, in inference and in training (loss and gradients):
one image of a batch empties at stage 1, every image empties at stage 1, a one-image batch empties, and a
later stage empties one image. No attention may see zero valid keys and turn a fully masked softmax row
into NaN (pytorch/pytorch#103749).
"""
import pytest
import torch

from conftest import CLS_MODES, DINOV2_TINY, HEAD_SETS, gflops, images, tiny_model
from dtop.engine.losses import segmentation_loss
from dtop.models.blocks import varlen_attention
from dtop.models.heads import ATMHead, HeadOutput, QueryAttention, masked_softmax
from dtop.models.layouts import PackedTokens

LAYOUTS = [("padded", False), ("padded", True), ("packed", False)]


def _rule(empty: set, every_other: bool):
    """(stage-independent) exits over the columns in play: images in ``empty`` lose every token; with
    ``every_other`` the others lose every other column (the same tokens in every layout: columns are the
    kept tokens in raster order)."""

    def exits(valid: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(valid.shape[0], 1, dtype=torch.bool)
        rows[sorted(empty)] = True
        odd = (torch.arange(valid.shape[1]) % 2 == 0)[None] & every_other
        return valid & (rows | odd)

    return exits


# scenario -> (batch size, {stage: exit rule}); images whose tokens all leave and at which stage
SCENARIOS = {
    "one_image_empties_at_stage1": (3, {0: _rule({0}, True)}),
    "all_images_empty_at_stage1": (2, {0: _rule({0, 1}, False)}),
    "single_image_batch_empties": (1, {0: _rule({0}, False)}),
    "later_stage_empties_one_image": (3, {0: _rule(set(), True), 1: _rule({1}, False)}),
}


def _model(heads, scenario, cls_mode="segvit", **kw):
    model = tiny_model(HEAD_SETS[heads], cls_mode=cls_mode, topk=0, **kw)
    B, rules = SCENARIOS[scenario]
    model.set_p0(0.5)  # below 1: exit decisions are made (and overridden) at every non-final stage
    model.force_exit = lambda stage, conf, valid: rules[stage](valid) if stage in rules else torch.zeros_like(valid)
    x = torch.cat([images(1, 64, 96, seed=s) * (0.5 + s) for s in range(B)])
    return model, x


def _assert_same(model, out, ref):
    assert torch.equal(gflops(model, out), gflops(model, ref))
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.canvas).all()
    torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.canvas, ref.canvas, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.exit_stage, ref.exit_stage)
    assert torch.equal(out.tokens_per_block, ref.tokens_per_block)
    assert torch.equal(out.head_tokens, ref.head_tokens)
    for a, b in zip(out.stages, ref.stages):
        assert torch.isfinite(a.logits).all()
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        if b.presence is not None:
            assert torch.isfinite(a.presence).all()
            torch.testing.assert_close(a.presence, b.presence, atol=1e-5, rtol=1e-5)


def _eval(model, x, layout, bucket=False):
    model.eval().set_layout(layout, bucket)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("cls_mode", CLS_MODES)
@pytest.mark.parametrize("heads", list(HEAD_SETS))
def test_empty_images_every_layout_equals_per_image(heads, cls_mode, scenario):
    model, x = _model(heads, scenario, cls_mode)
    ref = _eval(model, x, "per_image")
    assert torch.isfinite(ref.scores).all()
    B, rules = SCENARIOS[scenario]
    assert (ref.head_tokens[:, -1] == 0).any()  # some image reached the last head with no token
    if scenario == "all_images_empty_at_stage1":
        assert (ref.exit_stage == 0).all() and (ref.head_tokens[:, 1:] == 0).all()
    if scenario == "later_stage_empties_one_image":
        assert ref.head_tokens[1, 1] > 0 and ref.head_tokens[1, 2] == 0 and (ref.exit_stage[1] == 1).any()
    for layout, bucket in LAYOUTS:
        _assert_same(model, _eval(model, x, layout, bucket), ref)


def _loss_and_grads(model, x, label, layout, bucket=False):
    model.train().set_layout(layout, bucket)
    model.zero_grad()
    loss, _ = segmentation_loss(model(x), label)
    loss.backward()
    return loss.detach(), torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None])


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("heads,cls_mode", [("atm", "segvit"), ("mask", "segmenter"), ("linear", "segvit"),
                                            ("mixed", "segmenter")])
def test_empty_images_train_with_finite_equal_loss_and_gradients(heads, cls_mode, scenario):
    model, x = _model(heads, scenario, cls_mode)
    label = torch.randint(0, 5, (x.shape[0], 64, 96), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, x, label, "per_image")
    assert torch.isfinite(ref_loss) and torch.isfinite(ref_grads).all()
    for layout, bucket in LAYOUTS:
        loss, grads = _loss_and_grads(model, x, label, layout, bucket)
        assert torch.isfinite(loss) and torch.isfinite(grads).all(), layout
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-4)


def test_dinov2_registers_image_empties():
    """Prefix tokens (CLS and 4 registers) stay when every patch token of an image has left."""
    model, x = _model("atm", "one_image_empties_at_stage1", "segmenter", **DINOV2_TINY)
    x = x[..., :56, :84]
    ref = _eval(model, x, "per_image")
    assert ref.head_tokens[0, -1] == 0 and ref.tokens_per_block[0, -1] == 5
    for layout, bucket in LAYOUTS:
        _assert_same(model, _eval(model, x, layout, bucket), ref)


@pytest.mark.parametrize("heads", list(HEAD_SETS))
def test_flat_image_exits_at_stage1_with_topk0(heads):
    """The reported case: topk 0, p0 just below a flat grey image's lowest stage-1 confidence, so all its
    tokens exit at stage 1 and some of a busy image's do; padded and packed gave NaN scores and loss."""
    model = tiny_model(HEAD_SETS[heads], topk=0, seed=2)  # seed 2: every head set exits part of the busy image
    x = torch.cat([torch.zeros(1, 3, 64, 96), images(1, 64, 96) * 2])
    model.train()
    with torch.no_grad():
        s0 = model(x).stages[0]
    conf = HeadOutput(s0.logits.flatten(2), s0.presence).probs().max(1).values  # as the exit rule sees it
    model.set_p0(float(conf[0].min()) - 1e-4)
    ref = _eval(model, x, "per_image")
    frac = ref.exit_fractions()[:, 0]
    assert frac[0] == 1.0 and frac[1] < 1.0
    for layout, bucket in LAYOUTS:
        _assert_same(model, _eval(model, x, layout, bucket), ref)
    label = torch.randint(0, 5, (2, 64, 96), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, x, label, "per_image")
    for layout, bucket in LAYOUTS:
        loss, grads = _loss_and_grads(model, x, label, layout, bucket)
        assert torch.isfinite(loss) and torch.isfinite(grads).all(), layout
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_masked_softmax_without_keys_gives_zero_weights_and_finite_gradients():
    logits = torch.randn(2, 2, 3, 4, requires_grad=True)
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])
    w = masked_softmax(logits, valid)
    torch.testing.assert_close(w[0].sum(-1), torch.ones(2, 3))
    assert (w[0, ..., 2:] == 0).all() and (w[1] == 0).all()
    w.pow(2).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


def test_query_attention_padded_image_without_keys_equals_no_keys():
    """An image with only padding keys attends like an image with zero keys: output = proj(0)."""
    torch.manual_seed(0)
    attn = QueryAttention(8, 2)
    q = torch.randn(1, 3, 8)
    alone, _ = attn(q, torch.randn(1, 0, 8))
    padded, _ = attn(q, torch.randn(1, 4, 8), torch.zeros(1, 4, dtype=torch.bool))
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(alone, attn.proj.bias.expand(1, 3, 8))


@pytest.mark.parametrize("padded", [False, True])
def test_fused_atm_attention_equals_the_explicit_matmuls(padded):
    """The fused path (one SDPA, head-averaged logits as one full-width matmul) equals the explicit per-head
    matmuls that FLOP counters see: outputs, mask logits and gradients, with padding and an image without keys."""
    torch.manual_seed(0)
    head = ATMHead(16, 4, dim=16, num_layers=2)
    x = torch.randn(3, 6, 16, requires_grad=True)
    valid = torch.tensor([[True] * 6, [True, False, True, True, False, False], [False] * 6]) if padded else None
    results = []
    for fused in (True, False):
        for m in head.modules():
            if isinstance(m, QueryAttention):
                m.fused_attn = fused
        out = head(x, valid)
        loss = out.logits.pow(2).sum() + out.presence.pow(2).sum()
        grads = torch.autograd.grad(loss, [x, *head.parameters()])
        results.append((out.logits, out.presence, grads))
    (logits, presence, grads), (ref_logits, ref_presence, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(presence, ref_presence, atol=1e-5, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_atm_head_batch_with_an_empty_image_matches_each_image_alone():
    torch.manual_seed(0)
    head = ATMHead(16, 4, dim=16, num_layers=2).eval()
    x = torch.randn(2, 5, 16)
    valid = torch.tensor([[True] * 5, [False] * 5])
    out = head(x, valid)
    one, empty = head(x[:1]), head(x[1:, :0])
    assert torch.isfinite(out.presence).all()
    torch.testing.assert_close(out.presence, torch.cat([one.presence, empty.presence]))
    torch.testing.assert_close(out.logits[:1], one.logits)


def test_packed_attention_leaves_out_images_without_tokens():
    """An image without rows is an empty sequence (a repeated offset): the other images attend as alone."""
    torch.manual_seed(0)
    flat = torch.tensor([0, 1, 2, 6, 7])  # image 0: slots 0-2, image 1: none, image 2: slots 0-1 (width 3)
    t = PackedTokens(torch.randn(5, 8), flat, torch.tensor([[0, 1, 2], [6, 6, 6], [0, 1, 6]]), [3, 0, 2], 0, 6)
    assert t._cu.tolist() == [0, 3, 3, 5]
    qkv = torch.randn(5, 3 * 8)
    with torch.no_grad():
        out = varlen_attention(qkv, t._cu, 3, 2)
        for s, e in ((0, 3), (3, 5)):
            torch.testing.assert_close(out[s:e], varlen_attention(qkv[s:e], torch.tensor([0, e - s]), e - s, 2))


def test_atm_stages_after_a_linear_head_with_an_empty_image_train_finite():
    """Mixed score space: an image that empties at stage 1 leaves the later ATM canvas uncovered for it."""
    model = tiny_model(("linear", "atm", "atm"), topk=0)
    model.set_p0(0.5)
    rule = _rule({0}, True)
    model.force_exit = lambda stage, conf, valid: rule(valid) if stage == 0 else torch.zeros_like(valid)
    x = images(3, 64, 96)
    label = torch.randint(0, 5, (3, 64, 96), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(model, x, label, "per_image")
    assert torch.isfinite(ref_loss) and torch.isfinite(ref_grads).all()
    for layout, bucket in LAYOUTS:
        loss, grads = _loss_and_grads(model, x, label, layout, bucket)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-4)
