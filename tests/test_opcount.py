"""What a GPU pays for, counted here: dispatched operations and host syncs (dtop.engine.opcount), and the
packed layout's promise: launches that do not grow with the batch, one host sync per exit stage."""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_model

from dtop.apps.bench import count_forward_ops, forced_exits, spread
from dtop.engine.opcount import count_ops


def test_count_ops_counts_operations_and_each_kind_of_sync():
    a, b = torch.ones(4), torch.arange(4)
    assert count_ops(lambda: a + a)[0].as_dict() == {"ops": 1, "kernels": 1, "syncs": 0, "sync_ops": {}}
    assert count_ops(lambda: a.view(2, 2))[0].kernels == 0  # a view launches nothing
    for fn, name in [(lambda: a.sum().item(), "_local_scalar_dense"), (lambda: b.nonzero(), "nonzero"),
                     (lambda: a.tolist(), "tolist"), (lambda: a.cpu(), "cpu"),
                     (lambda: a.masked_select(a > 0), "masked_select"),
                     (lambda: a.repeat_interleave(b), "repeat_interleave")]:
        c, _ = count_ops(fn)
        assert c.syncs == 1 and c.by_sync == {name: 1}, name
    assert count_ops(lambda: a.repeat_interleave(b, output_size=6))[0].syncs == 0
    assert torch.Tensor.tolist(a) == [1.0] * 4  # the patched methods are restored


def test_a_registered_operator_counts_once_with_what_it_does_inside():
    """dtop::varlen_attention loops over sequences on CPU (host reads inside): one node, no sync counted."""
    from dtop.models.blocks import varlen_attention

    qkv = torch.randn(7, 3 * 8)
    cu = torch.tensor([0, 3, 7])
    with torch.no_grad():
        c, out = count_ops(lambda: varlen_attention(qkv, cu, 4, 2))
    assert (c.ops, c.syncs) == (1, 0) and out.shape == (7, 8)


@pytest.fixture(scope="module")
def counts():
    torch.manual_seed(0)
    model = tiny_model(heads=("atm", "atm", "atm"), blocks=(1, 2, 3)).eval()
    return count_forward_ops(model, (64, 96), [2, 4, 8], ["per_image", "padded", "packed"])


def test_packed_launches_do_not_grow_with_the_batch(counts):
    assert counts["4"]["packed"]["ops"] == counts["8"]["packed"]["ops"]
    assert counts["4"]["dense"]["ops"] == counts["8"]["dense"]["ops"]
    assert counts["8"]["per_image"]["ops"] > counts["4"]["per_image"]["ops"]  # the reference loops per image


def test_packed_makes_one_host_sync_per_exit_stage(counts):
    """Two exit stages: two reads of the kept counts and nothing else (the output token counts are the
    layout's host copies of them)."""
    for B in ("2", "4", "8"):
        c = counts[B]["packed"]
        assert c["sync_ops"] == {"tolist": 2}, c


def test_nothing_able_to_leave_costs_a_constant_few_operations(counts):
    for B in ("2", "4", "8"):
        assert counts[B]["p0_1"]["ops"] - counts[B]["dense"]["ops"] <= 8, counts[B]


def test_no_exit_forward_equals_the_general_one():
    """The p0 = 1 shortcut returns what the general forward returns with nothing leaving."""
    model = tiny_model(heads=("linear", "atm", "atm"), blocks=(1, 2, 3)).eval()
    x = images(2)
    with torch.no_grad():
        fast = model(x)
        model.force_exit = lambda stage, conf, valid: torch.zeros_like(valid)  # the general path, nobody exits
        slow = model(x)
    torch.testing.assert_close(fast.scores, slow.scores)
    torch.testing.assert_close(fast.canvas, slow.canvas)
    assert torch.equal(fast.exit_stage, slow.exit_stage)
    assert torch.equal(fast.tokens_per_block, slow.tokens_per_block)
    assert torch.equal(fast.head_tokens[:, -1], slow.head_tokens[:, -1])


def test_spread_and_forced_exits():
    assert spread(3) == pytest.approx([0.3, 0.6, 0.9])
    valid = torch.ones(3, 10, dtype=torch.bool)
    exits = forced_exits(spread(3))(0, torch.rand(3, 10), valid)
    assert exits.sum(1).tolist() == [3, 6, 9]


def test_no_exit_shortcut_only_when_no_stage_can_exit():
    """p0 1 at the first exit stage but not at the second: tokens still leave at the second."""
    model = tiny_model(heads=("linear", "linear", "linear"), blocks=(1, 2, 3)).eval()
    model.set_p0([1.0, 1e-6])  # every token is confident enough to leave at stage 2 (topk context aside)
    with torch.no_grad():
        out = model(images(2))
    assert (out.exit_stage == 1).any() and not (out.exit_stage == 0).any()


def test_atm_queries_cached_at_inference_equal_the_computed_ones_and_follow_the_weights():
    """An ATM head's first-layer query side depends on its weights only: inference reuses it (fewer
    operations), the outputs equal autograd's (which never uses the cache), and a weight change is seen."""
    from dtop.models.heads import ATMHead

    torch.manual_seed(0)
    head = ATMHead(16, 5, dim=8, num_layers=2).eval()
    x, valid = torch.randn(2, 7, 16), torch.rand(2, 7) > 0.3

    def run(grad: bool):
        with torch.set_grad_enabled(grad):
            out = head(x, valid)
        return out.logits.detach(), out.presence.detach()

    with torch.no_grad():
        first, _ = count_ops(lambda: head(x, valid))
        again, _ = count_ops(lambda: head(x, valid))
    assert again.ops < first.ops - 20
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.no_grad():
        head.query.add_(0.5)  # an optimiser step or load_state_dict changes the weights in place
        head.layers[0].self_attn.v.weight.mul_(2.0)
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    head.layers[0].norm1.weight = torch.nn.Parameter(head.layers[0].norm1.weight * 3)  # a new Parameter
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    import copy
    import pickle
    assert "_query_side_cache" not in pickle.loads(pickle.dumps(head)).__dict__
    assert "_query_side_cache" not in copy.deepcopy(head).__dict__


def test_host_counts_keeps_the_order_of_host_and_device_counts():
    """Blocks and heads whose counts the layout knew on the host and ones read from the device, in order;
    prefix tokens counted out of the heads' counts, zeros for what did not run."""
    from dtop.models.segmentor import host_counts

    per_block = [[5, 5], torch.tensor([4, 3]), [2, 3]]
    decoded = {0: [5, 5], 2: torch.tensor([2, 3])}
    tokens_per_block, head_tokens = host_counts(per_block, decoded, depth=4, num_stages=3, prefix=1)
    assert tokens_per_block.tolist() == [[5, 4, 2, 0], [5, 3, 3, 0]]
    assert head_tokens.tolist() == [[4, 0, 1], [4, 0, 2]]
    c, _ = count_ops(lambda: host_counts([[5, 5], [2, 3]], {0: [5, 5], 1: [2, 3]}, 2, 2, 0))
    assert c.syncs == 0
