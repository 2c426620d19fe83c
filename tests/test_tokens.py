"""The token bookkeeping functions against brute-force reference implementations."""
import pytest
import torch

from dtop.pruning import compact, confidence, gather_tokens, pad_positions, select_exits


def brute_force_exits(conf, label, p0, k, valid=None):
    """Loop over images and classes: the rule of docs/method/context-rule.md, written the slow way."""
    B, N = conf.shape
    out = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        easy = [n for n in range(N) if conf[b, n] > p0 and (valid is None or valid[b, n])]
        for c in {int(label[b, n]) for n in easy}:
            members = [n for n in easy if int(label[b, n]) == c]
            members.sort(key=lambda n: (-float(conf[b, n]), n))
            for n in members[k:]:
                out[b, n] = True
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [0, 1, 5])
def test_select_exits_matches_brute_force(seed, k):
    g = torch.Generator().manual_seed(seed)
    B, N, K = 3, 60, 4
    conf = torch.rand(B, N, generator=g)
    conf[:, :5] = 0.7  # ties
    label = torch.randint(0, K, (B, N), generator=g)
    valid = torch.rand(B, N, generator=g) > 0.2
    for p0 in (0.0, 0.3, 0.7, 0.95):
        for v in (None, valid):
            assert torch.equal(select_exits(conf, label, p0, k, v), brute_force_exits(conf, label, p0, k, v))


def test_topk_keeps_min_count_k_per_class():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(1, 200, generator=g) * 0.5 + 0.5
    label = torch.randint(0, 6, (1, 200), generator=g)
    label[0, :3] = 7  # a class with fewer than k easy tokens
    exits = select_exits(conf, label, p0=0.5, k=5)
    for c in label.unique():
        members = label[0] == c
        stay = (members & ~exits[0]).sum().item()
        assert stay == min(int(members.sum()), 5)
        # the stayers are the most confident of their class
        if members.sum() > 5:
            assert conf[0][members & ~exits[0]].min() >= conf[0][members & exits[0]].max()


def test_threshold_is_strict_and_nothing_exits_at_p0_one():
    conf = torch.tensor([[0.9, 0.9000001, 1.0, 0.2]])
    label = torch.zeros(1, 4, dtype=torch.long)
    assert select_exits(conf, label, 0.9, k=0).tolist() == [[False, True, True, False]]
    assert not select_exits(conf, label, 1.0, k=0).any()


def test_confidence():
    probs = torch.tensor([[[0.1, 0.8], [0.9, 0.2]]])  # (B=1, K=2, N=2)
    conf, label = confidence(probs)
    assert torch.allclose(conf, torch.tensor([[0.9, 0.8]])) and label.tolist() == [[1, 0]]


def test_gather_with_prefix():
    x = torch.arange(2 * 6 * 3, dtype=torch.float).reshape(2, 6, 3)  # 1 prefix + 5 tokens
    idx = torch.tensor([0, 3, 4])
    g = gather_tokens(x, idx, offset=1)
    assert g.shape == (2, 4, 3)
    assert torch.equal(g[:, 0], x[:, 0]) and torch.equal(g[:, 1:], x[:, 1:][:, idx])
    per_image = torch.tensor([[0, 1, 2], [2, 3, 4]])
    g2 = gather_tokens(x, per_image, offset=1)
    assert torch.equal(g2[1, 1:], x[1, 1:][per_image[1]])


def test_compact_moves_kept_entries_to_the_front_in_order():
    keep = torch.tensor([[False, True, False, True, True], [True, False, False, False, False],
                         [False] * 5])
    order, valid = compact(keep)
    assert order.shape == (3, 3)  # the longest row keeps 3
    assert valid.tolist() == [[True, True, True], [True, False, False], [False, False, False]]
    assert order[0].tolist() == [1, 3, 4] and order[1, 0] == 0
    for b in range(3):  # brute force: the kept columns, in order
        assert order[b][valid[b]].tolist() == keep[b].nonzero()[:, 0].tolist()
    empty_order, empty_valid = compact(torch.zeros(2, 4, dtype=torch.bool))
    assert empty_order.shape == empty_valid.shape == (2, 0)


def test_pad_positions_pads_with_the_sink_column():
    pos, valid = pad_positions([torch.tensor([3, 5]), torch.tensor([0, 1, 7]), torch.tensor([], dtype=torch.long)],
                               N=8)
    assert pos.tolist() == [[3, 5, 8], [0, 1, 7], [8, 8, 8]]
    assert valid.tolist() == [[True, True, False], [True, True, True], [False, False, False]]
