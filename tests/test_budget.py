"""Budget exits (exit_mode "budget"): exact counts per image, the context rule among the chosen, every
layout and the batch equal to the per-image path, GFLOPs equal to fvcore, fixed shapes for export."""
from __future__ import annotations

import pytest
import torch
from conftest import gflops, images, tiny_model

from dtop.errors import ConfigError
from dtop.pruning import kept_columns, select_budget, select_exits


def reference_budget(conf, label, count, k, valid, p_min):
    """select_budget written as a loop over one image: walk the tokens from the most confident; the first k
    of each class are context tokens; the exits are the first `count` others, then context tokens."""
    order = sorted(range(len(conf)), key=lambda i: (-float(conf[i]), i))
    seen, others, context = {}, [], []
    for i in order:
        if not valid[i] or (p_min > 0 and not conf[i] > p_min):
            continue
        c = int(label[i])
        seen[c] = seen.get(c, 0) + 1
        (context if seen[c] <= k else others).append(i)
    chosen = (others + context)[:count]
    out = torch.zeros(len(conf), dtype=torch.bool)
    out[chosen] = True
    return out


@pytest.mark.parametrize("seed", range(6))
def test_select_budget_equals_the_loop_and_exits_exactly_the_budget(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, K = 4, 40, 4
    conf = torch.rand(B, L, generator=g).round(decimals=1)  # ties on purpose
    label = torch.randint(0, K, (B, L), generator=g)
    valid = torch.rand(B, L, generator=g) > 0.2
    for count, k, p_min in [(10, 2, 0.0), (25, 5, 0.0), (30, 3, 0.0), (12, 2, 0.5), (0, 2, 0.0)]:
        got = select_budget(conf, label, count, k, valid, p_min, num_classes=K)
        for b in range(B):
            ref = reference_budget(conf[b], label[b], count, k, valid[b], p_min)
            assert torch.equal(got[b], ref), (b, count, k, p_min)
            eligible = int((valid[b] & ((conf[b] > p_min) if p_min > 0 else True)).sum())
            assert int(got[b].sum()) == min(count, eligible)
        assert not (got & ~valid).any()


def test_context_tokens_stay_when_others_can_take_their_places():
    g = torch.Generator().manual_seed(3)
    conf, label = torch.rand(2, 60, generator=g), torch.randint(0, 3, (2, 60), generator=g)
    exits = select_budget(conf, label, 30, k=4)
    context = ~select_exits(conf, label, -1.0, 4)  # the 4 most confident of each class
    assert (exits.sum(1) == 30).all()
    assert not (exits & context).any()
    # the exits are the most confident of the others: no other token left behind is more confident
    others = ~context
    for b in range(2):
        assert conf[b][exits[b]].min() >= conf[b][others[b] & ~exits[b]].max()


def test_select_budget_refuses_a_budget_above_the_tokens_in_play():
    with pytest.raises(ValueError, match="only 5 tokens"):
        select_budget(torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.long), 6)


def test_kept_columns_in_order():
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    assert kept_columns(keep, 3).tolist() == [[0, 2, 3], [1, 2, 4]]


def budget_model(**kw):
    model = tiny_model(**kw)
    model.set_budget([0.5, 0.25])
    return model


@pytest.mark.parametrize("cls_mode", ["segvit", "segmenter"])
@pytest.mark.parametrize("heads", [("atm", "atm", "atm"), ("linear", "atm", "mask")])
def test_every_image_exits_its_budget_and_layouts_equal_per_image(cls_mode, heads):
    model = budget_model(heads=heads, cls_mode=cls_mode)
    x = images(3, 64, 96)  # 24 tokens: 12 exit at stage 0, 6 at stage 1
    outs = {}
    for layout in ("per_image", "padded", "packed", "auto"):
        model.set_layout(layout)
        with torch.no_grad():
            outs[layout] = model(x)
    ref = outs["per_image"]
    P = model.backbone.prefix_in_blocks
    assert ref.head_tokens.tolist() == [[24, 12, 6]] * 3
    assert ref.tokens_per_block[:, -1].tolist() == [6 + P] * 3
    for s, n in enumerate([12, 6, 6]):
        assert ((ref.exit_stage == s).sum((1, 2)) == n).all()
    for layout, out in outs.items():
        torch.testing.assert_close(out.scores, ref.scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.exit_stage, ref.exit_stage), layout
        assert torch.equal(out.tokens_per_block, ref.tokens_per_block)
    # the batch equals each image alone
    for b in range(3):
        with torch.no_grad():
            alone = model(x[b:b + 1])
        torch.testing.assert_close(alone.scores, ref.scores[b:b + 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(alone.exit_stage, ref.exit_stage[b:b + 1])


def test_budget_batch_runs_without_padding_masks_or_host_syncs():
    from dtop.engine.opcount import count_ops

    model = budget_model()
    model.set_layout("auto")
    x = images(4, 64, 96)
    with torch.no_grad():
        model(x)
        c, _ = count_ops(lambda: model(x))
    assert c.syncs == 0, c.by_sync  # the output token counts are known on the host: nothing is read back


def test_budget_gflops_equal_fvcore():
    from test_flops import fvcore_count

    model = budget_model(heads=("linear", "atm", "mask"), topk=1)
    x = images(1, 64, 96, seed=2)
    with torch.no_grad():
        out = model(x)
    assert round(gflops(model, out).item() * 1e9) == fvcore_count(model, x)


def test_budget_trains_with_finite_gradients_equal_across_layouts():
    grads = {}
    for layout in ("per_image", "auto"):
        model = budget_model(heads=("atm", "linear", "atm")).train()
        model.set_layout(layout)
        out = model(images(2, 64, 96))
        out.scores.square().mean().backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(g).all()
        grads[layout] = g
    torch.testing.assert_close(grads["auto"], grads["per_image"], atol=1e-5, rtol=1e-4)


def test_p_min_makes_the_budget_an_upper_bound():
    model = tiny_model()
    model.set_budget([0.5, 0.25], p_min=0.999)
    x = images(2, 64, 96)
    with torch.no_grad():
        out = model(x)
    assert (out.head_tokens[:, 1] >= 12).all() and (out.head_tokens[:, 1] <= 24).all()


@pytest.mark.parametrize("ratios, match", [([0.6, 0.5], "sums to"), ([1.2, 0.0], r"\[0, 1\)"), ([0.1], "2 non-final"),
                                           (["a", 0.1], r"\[0, 1\)")])
def test_bad_budgets_are_refused(ratios, match):
    model = tiny_model()
    with pytest.raises(ConfigError, match=match):
        model.set_budget(ratios)
    assert model.exit_mode == "threshold"  # unchanged
    with pytest.raises(ConfigError, match="p_min"):
        model.set_budget([0.1, 0.1], p_min=1.5)


def test_torch_export_of_the_budget_model():
    model = budget_model()
    x = images(2, 64, 96)
    with torch.no_grad():
        ref = model(x).scores
    ep = torch.export.export(ExportWrapper(model), (x,))
    torch.testing.assert_close(ep.module()(x), ref, atol=1e-5, rtol=1e-5)


class ExportWrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).scores
