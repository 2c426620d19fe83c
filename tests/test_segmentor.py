"""The DToP engine: equivalence with the dense model, exit semantics, batch vs per-image."""
import pytest
import torch

from conftest import CLS_MODES, DINOV2_TINY, gflops, images, p0_at_quantile, stage_confidence, tiny_model
from dtop.errors import ConfigError
from dtop.flops import dense_flops
from dtop.pruning import confidence, gather_tokens


@pytest.mark.parametrize("cls_mode", CLS_MODES)
def test_no_pruning_equals_dense(head_set, cls_mode):
    model = tiny_model(head_set, cls_mode=cls_mode, p0=1.0)
    x = images(2, 64, 96)
    with torch.no_grad():
        out = model(x)
        dense = model.forward_dense(x)
    assert out.scores.shape == (2, 5, 64, 96)
    torch.testing.assert_close(out.scores, dense, atol=1e-5, rtol=0)
    N = 4 * 6
    P = 1 if cls_mode == "segmenter" else 0
    assert (out.tokens_per_block == N + P).all()
    # in eval, heads where no token can leave are skipped (the final head overwrites them)
    assert out.head_tokens.tolist() == [[0, 0, N]] * 2 and len(out.stages) == 1
    assert (out.exit_stage == 2).all()
    assert (gflops(model, out) == gflops(model, out).new_tensor(dense_flops(model, (64, 96), final_head_only=True) / 1e9)).all()
    # in training every stage head runs (each has a loss), and the output is still the dense one
    model.train()
    with torch.no_grad():
        train_out = model(x)
    assert (train_out.head_tokens == N).all() and len(train_out.stages) == 3
    torch.testing.assert_close(train_out.scores, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls_mode", CLS_MODES)
def test_dinov2_with_registers_no_pruning_equals_dense(cls_mode):
    model = tiny_model(("atm", "linear", "mask"), cls_mode=cls_mode, p0=1.0, **DINOV2_TINY)
    x = images(2, 56, 84)
    with torch.no_grad():
        out = model(x)
        dense = model.forward_dense(x)
    torch.testing.assert_close(out.scores, dense, atol=1e-5, rtol=0)
    assert (out.tokens_per_block == 4 * 6 + (5 if cls_mode == "segmenter" else 0)).all()


def test_p0_of_one_per_stage_disables_pruning_and_above_one_is_refused():
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        tiny_model(p0=[1.0, 1.5])
    model = tiny_model(p0=[1.0, 1.0])
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x).scores, model.forward_dense(x), atol=1e-5, rtol=0)


def _run_reference(model, x, out):
    """Independent recomputation of every stage's head logits on the tokens the stage saw,
    from the exit map alone: returns per stage (B, K, N) head values (NaN where not computed)."""
    P = model.backbone.prefix_in_blocks
    feats, grid = model.backbone.embed(x)
    exit_flat = out.exit_stage.flatten(1)
    results = []
    B, N = exit_flat.shape
    for b in range(B):
        xb = feats[b:b + 1]
        kept = torch.arange(N)
        per_stage = []
        prev = -1
        for s, block in enumerate(model.stage_blocks):
            for blk in model.backbone.blocks[prev + 1: block + 1]:
                xb = blk(xb)
            prev = block
            head_out = model.decode(s, xb[:, P:])
            vals = head_out.probs() if model.space == "prob" else head_out.logits
            full = torch.full((1, model.num_classes, N), float("nan"))
            full[:, :, kept] = vals
            per_stage.append(full)
            stay = exit_flat[b, kept] > s
            kept = kept[stay]
            xb = gather_tokens(xb, stay.nonzero()[:, 0], offset=P)
        results.append(per_stage)
    return [torch.cat([r[s] for r in results]) for s in range(model.num_stages)]


@pytest.mark.parametrize("cls_mode", CLS_MODES)
def test_exited_tokens_keep_their_exit_stage_logits(head_set, cls_mode):
    model = tiny_model(head_set, cls_mode=cls_mode, topk=2)
    x = images(2, 64, 96, seed=3)
    model.set_p0([p0_at_quantile(model, x, 0.4), p0_at_quantile(model, x, 0.4, stage=1)])
    with torch.no_grad():
        out = model(x)
        ref = _run_reference(model, x, out)
    counts = torch.bincount(out.exit_stage.flatten(), minlength=3)
    assert counts[0] > 0 and counts[2] > 0, counts  # tokens exit early and tokens go on
    canvas = out.canvas.flatten(2)
    exit_flat = out.exit_stage.flatten(1)
    for s in range(3):
        sel = (exit_flat == s).unsqueeze(1).expand_as(canvas)
        torch.testing.assert_close(canvas[sel], ref[s][sel], atol=1e-5, rtol=0)
    if model.space == "atm":  # final score uses the final stage's presence for every token
        expected = out.stages[-1].presence.softmax(-1)[..., :1] * out.canvas.flatten(2).sigmoid()
        up = torch.nn.functional.interpolate(expected.reshape(2, 5, 4, 6), size=(64, 96), mode="bilinear")
        torch.testing.assert_close(out.scores, up, atol=1e-6, rtol=0)


def test_topk_context_tokens_stay_in_play():
    model = tiny_model(topk=3)
    x = images(2, 96, 96, seed=5)
    model.set_p0(1e-6)  # every token is easy at every non-final stage: only context tokens go on
    with torch.no_grad():
        out = model(x)
        _, label = confidence(_stage0_probs(model, x))
    for b in range(2):
        stayed = out.exit_stage[b].flatten() > 0
        for c in label[b].unique():
            members = label[b] == c
            assert int((members & stayed).sum()) == min(int(members.sum()), 3)


def _stage0_probs(model, x):
    feats, _ = model.backbone.embed(x)
    for blk in model.backbone.blocks[: model.stage_blocks[0] + 1]:
        feats = blk(feats)
    return model.decode(0, feats[:, model.backbone.prefix_in_blocks:]).probs()


@pytest.mark.parametrize("cls_mode", CLS_MODES)
def test_no_block_after_an_exit_sees_the_token(cls_mode):
    model = tiny_model(("atm", "atm", "mask"), blocks=(0, 2, 3), cls_mode=cls_mode, topk=1)
    x = images(1, 64, 64, seed=7)
    model.set_p0([p0_at_quantile(model, x, 0.3), 1e-6])
    seen, outputs = {}, {}
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, blk in enumerate(model.backbone.blocks)]
    hooks += [blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach().clone()))
              for i, blk in enumerate(model.backbone.blocks)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    P = model.backbone.prefix_in_blocks
    ex = out.exit_stage.flatten()
    assert (ex == 0).any() and (ex == 1).any()
    # block 1 follows stage 0 (block 0): it sees exactly the prefix + tokens that did not exit at stage 0
    alive1 = (ex > 0).nonzero()[:, 0]
    torch.testing.assert_close(seen[1], gather_tokens(outputs[0], alive1, offset=P))
    assert out.tokens_per_block[0].tolist() == [P + 16, P + len(alive1), P + len(alive1), P + int((ex > 1).sum())]
    alive3 = (ex > 1).nonzero()[:, 0]
    torch.testing.assert_close(seen[3], gather_tokens(outputs[2], (ex[alive1] > 1).nonzero()[:, 0], offset=P))
    assert seen[3].shape[1] == P + len(alive3)


@pytest.mark.parametrize("heads", [("atm", "atm", "atm"), ("atm", "atm", "mask"), ("linear", "linear", "linear")])
def test_batch_equals_one_by_one(heads):
    model = tiny_model(heads, cls_mode="segmenter" if "mask" in heads else "segvit", topk=1)
    x = torch.cat([images(1, 96, 128, seed=s) * (0.5 + s) for s in range(3)])
    model.set_p0(p0_at_quantile(model, x, 0.5))
    with torch.no_grad():
        batch = model(x)
        singles = [model(x[b:b + 1]) for b in range(3)]
    assert len({tuple(o.exit_stage.flatten().tolist()) for o in singles}) > 1  # images prune differently
    for b, one in enumerate(singles):
        torch.testing.assert_close(batch.scores[b], one.scores[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.exit_stage[b], one.exit_stage[0])
        assert torch.equal(batch.tokens_per_block[b], one.tokens_per_block[0])
        assert gflops(model, batch)[b] == gflops(model, one)[0]
    assert len(set(gflops(model, batch).tolist())) > 1


def test_pruned_training_step_has_gradients_in_every_head():
    model = tiny_model(("atm", "atm", "mask"), cls_mode="segmenter").train()
    x = images(2)
    model.set_p0(p0_at_quantile(model.eval(), x, 0.5))
    model.train()
    out = model(x)
    loss = sum(s.canvas.square().mean() for s in out.stages) + out.scores.mean()
    loss.backward()
    for i, head in enumerate(model.heads):
        grads = [p.grad for p in head.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"head {i} got no gradient"


def test_exit_fractions_and_gflops_drop_with_pruning():
    model = tiny_model()
    x = images(2)
    with torch.no_grad():
        dense = model(x)
        model.set_p0(p0_at_quantile(model, x, 0.3))
        pruned = model(x)
    fr = pruned.exit_fractions()
    torch.testing.assert_close(fr.sum(1), torch.ones(2))
    assert (fr[:, 0] > 0).all()
    assert (gflops(model, pruned) < gflops(model, dense)).all()
    conf = stage_confidence(model, x)
    assert conf.shape == (2, 24)


def test_upsampled_scores_are_channels_last_and_equal_plain_interpolation():
    from dtop.models.segmentor import upsample_scores

    score = torch.randn(2, 7, 4, 6, generator=torch.Generator().manual_seed(0))
    up = upsample_scores(score, (32, 48))
    assert up.shape == (2, 7, 32, 48) and up.is_contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.interpolate(score, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(up.argmax(1), ref.argmax(1))
