"""Token bookkeeping for DToP as pure functions.

Scores in, exit decisions and keep indices out, plus the index helpers the token layouts
(:mod:`dtop.models.layouts`) are built from. Nothing here knows about modules; every function is
unit-tested on its own (``tests/test_tokens.py``).

Shapes: ``B`` images, ``K`` classes, ``N`` tokens (patch tokens of the grid, in raster order),
``L`` tokens still in play (padded to the longest image), ``n`` tokens still in play for one image.
The rules are written out in ``docs/method/exit-rule.md`` and ``docs/method/context-rule.md``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def confidence(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token confidence and label from per-class probabilities.

    probs: (..., K, N) -> (conf (..., N), label (..., N) long); ``s_n = max_c P[c, n]``.
    """
    conf, label = probs.max(dim=-2)
    return conf, label


def select_exits(conf: Tensor, label: Tensor, p0: float, k: int = 5, valid: Optional[Tensor] = None,
                 num_classes: Optional[int] = None) -> Tensor:
    """Which tokens exit at this stage (``docs/method/exit-rule.md``, ``docs/method/context-rule.md``).

    A token is *easy* when ``conf > p0`` (strict). For every class among the easy
    tokens' labels, the ``k`` most confident easy tokens of that class stay in play
    (context rule); the remaining easy tokens exit.

    conf, label: (B, N); valid: (B, N) bool, tokens that may exit (default all); num_classes: an
    upper bound of the labels (saves a device-to-host sync on GPUs).
    Returns exit mask (B, N) bool. Ties in confidence go to the lower token index.
    Raises ValueError when conf and label are not both (B, N).
    """
    if conf.shape != label.shape or conf.dim() != 2:
        raise ValueError(f"conf and label must both be (B, N), got {tuple(conf.shape)} and {tuple(label.shape)}")
    easy = conf > p0
    if valid is not None:
        easy = easy & valid
    if k <= 0 or conf.numel() == 0:
        return easy
    num_groups = (num_classes if num_classes is not None else int(label.max()) + 1) + 1  # classes + "not easy"
    hard = ~easy
    group = label.masked_fill(hard, num_groups - 1)
    # Sort by confidence (descending), then stably by group: tokens end up grouped
    # by class, most confident first inside each group.
    by_conf = torch.argsort(conf.masked_fill(hard, -1.0), dim=1, descending=True, stable=True)
    sorted_group, by_group = torch.sort(group.gather(1, by_conf), dim=1, stable=True)
    order = by_conf.gather(1, by_group)
    # a token is among the k most confident of its group unless the token k places before it is of its group
    before = F.pad(sorted_group, (k, 0), value=-1)[:, : sorted_group.shape[1]]
    exits_sorted = (before == sorted_group) & (sorted_group < num_groups - 1)
    # back to token order: ``order`` is a permutation, so the scatter overwrites every entry of its copy
    return exits_sorted.scatter(1, order, exits_sorted)


def select_budget(conf: Tensor, label: Tensor, count: int, k: int = 5, valid: Optional[Tensor] = None,
                  p_min: float = 0.0, num_classes: Optional[int] = None) -> Tensor:
    """Budget exits (``docs/method/exit-rule.md``, "Budget mode"): in every image exactly ``count`` tokens
    exit, its most confident ones, with the context rule applied among them: the ``k`` most confident
    tokens of each predicted class stay (as :func:`select_exits` keeps them) and the next most confident
    take their places. Only when an image has fewer than ``count`` other tokens do context tokens exit too
    (most confident first), so the count stays exact. With ``p_min`` > 0 only tokens with ``conf > p_min``
    may exit, which makes ``count`` an upper bound.

    conf, label: (B, L); valid: (B, L) bool, the tokens in play (default all). Returns the exit mask
    (B, L) bool: ``min(count, number of eligible tokens)`` True per row. Ties go to the lower column.
    Fixed shapes and no host sync (exportable). Raises ValueError for a negative count or a count above L."""
    if conf.shape != label.shape or conf.dim() != 2:
        raise ValueError(f"conf and label must both be (B, L), got {tuple(conf.shape)} and {tuple(label.shape)}")
    B, L = conf.shape
    if not 0 <= count <= L:
        raise ValueError(f"budget of {count} exits per image, but only {L} tokens are in play")
    eligible = conf > p_min if p_min > 0 else torch.ones_like(conf, dtype=torch.bool)
    if valid is not None:
        eligible = eligible & valid
    if count == 0:
        return torch.zeros_like(eligible)
    others = select_exits(conf, label, -1.0, k, eligible, num_classes)  # eligible, not a context token
    # priority: non-context tokens first (+2), then context tokens (+0), by confidence; -1: never
    key = torch.where(others, conf.float() + 2.0, torch.where(eligible, conf.float(), conf.new_full((), -1.0).float()))
    chosen = torch.sort(key, dim=1, descending=True, stable=True)[1][:, :count]
    return torch.zeros_like(eligible).scatter(1, chosen, key.gather(1, chosen) >= 0)


def kept_columns(keep: Tensor, count: int) -> Tensor:
    """The columns of ``keep`` (B, L) bool that hold True, in order, when every row holds exactly ``count``:
    (B, count) long. Fixed shapes, no host sync (the budget layout's prune)."""
    L = keep.shape[1]
    col = torch.arange(L, device=keep.device).expand_as(keep)
    key = torch.where(keep, col, col + L)  # kept columns first, each group in column order
    return torch.sort(key, dim=1)[0][:, :count] % L


def gather_tokens(x: Tensor, idx: Tensor, offset: int = 0) -> Tensor:
    """Rows ``idx`` of ``x`` (B, T, C), keeping the first ``offset`` rows (prefix tokens such as CLS).

    idx: (n,) shared by the batch, or (B, n) per image. Returns (B, offset + n, C).
    """
    if idx.dim() == 1:
        idx = idx.expand(x.shape[0], -1)
    rows = x[:, offset:].gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :offset], rows], dim=1) if offset else rows


def compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's kept entries to the front, in their original order.

    keep: (B, L) bool -> order (B, L') long, the source column of each compacted entry, and
    valid (B, L') bool, which of them are kept; ``L'`` is the longest row's kept count (one host sync)."""
    lengths = keep.sum(1)
    width = int(lengths.max()) if len(lengths) else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.arange(width, device=keep.device) < lengths[:, None]


def pad_positions(positions: Sequence[Tensor], N: int) -> tuple[Tensor, Tensor]:
    """Per-image token positions (n_b,) -> (B, L) positions padded with ``N`` (the canvas's padding
    column) and the (B, L) mask of real entries; ``L = max n_b``."""
    L = max(len(p) for p in positions)
    pos = torch.stack([F.pad(p, (0, L - len(p)), value=N) for p in positions])
    return pos, pos < N
