"""The canvas and the token layouts as units: writes, exits, the padding sink, and new objects on prune."""
import pytest
import torch

from conftest import images, tiny_model
from dtop.models import HeadOutput
from dtop.models.canvas import Canvas
from dtop.models.layouts import (LAYOUTS, BucketedTokens, PackedTokens, PaddedTokens, PerImageTokens, TokenLayout,
                                 to_layout)


def _canvas(mixed=False, B=2, grid=(2, 3), S=3):
    return Canvas(B, grid, S, mixed=mixed, device=torch.device("cpu"))


def test_first_write_is_the_whole_canvas_later_writes_only_their_tokens():
    c = _canvas()
    first = torch.arange(2 * 4 * 6, dtype=torch.float).reshape(2, 4, 6)
    pos = torch.arange(6).expand(2, 6)
    st = c.write(0, first, first, None, pos, torch.ones(2, 6, dtype=torch.bool))
    assert torch.equal(st.canvas, first.reshape(2, 4, 2, 3)) and st.valid.all()
    c.tokens_left()  # image 0's tokens 0 and 2 left at stage 0
    # image 0 keeps tokens 1, 3, 4, 5; image 1 keeps all six; padding column = N = 6
    pos2 = torch.tensor([[1, 3, 4, 5, 6, 6], [0, 1, 2, 3, 4, 5]])
    valid2 = pos2 < 6
    second = torch.full((2, 4, 6), -1.0)
    with torch.no_grad():
        st2 = c.write(2, second, second, None, pos2, valid2)
    expected = first.clone()
    expected[0][:, [1, 3, 4, 5]] = -1.0
    expected[1] = -1.0
    assert torch.equal(st2.canvas.flatten(2), expected)
    assert torch.equal(st.canvas, first.reshape(2, 4, 2, 3))  # the stage-0 snapshot kept its values
    assert c.exit_map().tolist() == [[[0, 2, 0], [2, 2, 2]], [[2, 2, 2], [2, 2, 2]]]


def test_exit_map_is_the_last_stage_that_decoded_each_token_padding_never_counts():
    c = _canvas(B=1, grid=(1, 4))
    assert c.exit_map().tolist() == [[[2, 2, 2, 2]]]  # nothing written yet: the final stage
    c.write(0, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), None, None, None)
    assert c.exit_map().tolist() == [[[0, 0, 0, 0]]]
    c.tokens_left()
    pos = torch.tensor([[1, 3, 4, 4]])  # two padding columns point at the sink N = 4
    c.write(1, torch.ones(1, 2, 4), torch.ones(1, 2, 4), None, pos, pos < 4)
    assert c.exit_map().tolist() == [[[0, 1, 0, 1]]]
    c.write(2, torch.ones(1, 2, 1), torch.ones(1, 2, 1), None, torch.tensor([[3]]), torch.tensor([[True]]))
    assert c.exit_map().tolist() == [[[0, 1, 0, 2]]]
    assert c.scores.shape == (1, 2, 4)  # the sink column is never part of the canvas


def test_mixed_heads_keep_a_canvas_and_coverage_per_head_kind():
    c = _canvas(mixed=True, B=1, grid=(1, 3))
    pos, valid = torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool)
    atm = c.write(0, torch.full((1, 2, 3), 0.5), torch.full((1, 2, 3), 7.0), torch.zeros(1, 2, 2), pos, valid)
    assert atm.valid.all() and (atm.logits == 7).all()
    c.tokens_left()  # token 0 left
    lin = c.write(1, torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 3.0), None, torch.tensor([[1, 2]]),
                  torch.ones(1, 2, dtype=torch.bool))
    assert lin.valid.tolist() == [[[False, True, True]]]  # the linear kind never saw token 0
    assert lin.logits[0, :, 0, 1:].eq(3).all() and lin.canvas[0, :, 0, 0].eq(0.5).all()
    assert set(c.native) == {"atm", "logits"}


def _state(B=3, N=6, P=1, C=4):
    x = torch.randn(B, P + N, C, generator=torch.Generator().manual_seed(0))
    return PaddedTokens.full(x, P, N)


@pytest.mark.parametrize("layout,bucket", [("per_image", False), ("padded", False), ("padded", True),
                                           ("packed", False)])
def test_every_layout_prunes_into_a_new_object(layout, bucket):
    keep = torch.tensor([[True, False, True, True, False, True], [True] * 6, [False, True] + [False] * 4])
    tokens = to_layout(_state().prune(keep), layout, bucket)
    assert isinstance(tokens, TokenLayout)
    before = tokens.counts().clone()
    _, pos, valid = tokens.decode(lambda x, v: HeadOutput(x.transpose(1, 2)))
    pruned = tokens.prune(valid & (pos % 2 == 1))  # keep the odd positions
    assert pruned is not tokens
    assert torch.equal(tokens.counts(), before)  # the old layout is untouched
    assert pruned.counts().tolist() == [1 + 2, 1 + 3, 1 + 1]
    assert to_layout(pruned, layout, bucket) is pruned  # once switched, a layout stays


def test_layout_classes_and_names():
    assert LAYOUTS == ("auto", "per_image", "padded", "packed")
    t = _state().prune(torch.ones(3, 6, dtype=torch.bool))
    assert isinstance(to_layout(t, "per_image"), PerImageTokens)
    assert isinstance(to_layout(t, "packed"), PackedTokens)
    assert isinstance(to_layout(t, "padded", bucket=True), BucketedTokens)
    assert to_layout(t, "padded") is t


def test_exit_decision_is_one_method_the_override_replaces():
    model = tiny_model(("linear", "linear", "linear"), p0=0.01, topk=0)
    x = images(1)
    with torch.no_grad():
        out = model.heads[0](model.backbone.embed(x)[0])
        valid = torch.ones(1, 24, dtype=torch.bool)
        assert model.decide_exits(0, out, valid).all()  # p0 0, no context tokens: every token leaves
        assert model.decide_exits(2, out, valid) is None  # never after the final stage
        model.force_exit = lambda stage, conf, v: torch.zeros_like(v)
        assert model.decide_exits(0, out, valid) is None  # the override decided: nobody leaves
        model.set_p0(1.0)
        model.force_exit = lambda stage, conf, v: v
        assert model.decide_exits(0, out, valid) is None  # p0 1: no decision is taken at all
