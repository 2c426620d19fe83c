"""What a GPU pays for, counted on any device: dispatched operations and host synchronisations.

Every aten operation that reaches the dispatcher is one kernel launch on CUDA (a registered custom
operator such as ``dtop::varlen_attention`` counts once: it is one node). A host synchronisation is an
operation whose output the host must wait for: ``.item()``/``int()``/``bool()`` on a tensor
(``aten._local_scalar_dense``), outputs whose shape depends on data (``nonzero``, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``), and copies to the host (``.tolist()``,
``.cpu()``, ``.numpy()``, which on CPU tensors never reach the dispatcher and are counted where Python
calls them). Counted with a ``TorchDispatchMode`` (``torch.utils._python_dispatch``), so the figures are
the same on CPU tensors as on CUDA ones, up to what a CUDA-only kernel choice changes.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
            aten._unique2, aten.unique_consecutive, aten.unique_dim, aten.nonzero_numpy}
HOST_COPIES = ("tolist", "cpu", "numpy")
VIEW_LIKE = {aten.unbind, aten.split, aten.split_with_sizes, aten.chunk, aten.detach, aten.lift_fresh}


@dataclass
class OpCount:
    """``ops``: dispatched operations; ``kernels``: those that compute (not views, which only change
    metadata and launch nothing on CUDA); ``syncs``: host synchronisations; ``by_sync``: which ones."""

    ops: int = 0
    kernels: int = 0
    syncs: int = 0
    by_sync: Counter = field(default_factory=Counter)
    depth: int = 0  # > 0 while an operator runs: what its own implementation does is not counted
    paused: bool = False  # True inside :meth:`uncounted`

    def add_sync(self, name: str) -> None:
        self.syncs += 1
        self.by_sync[name] += 1

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Leave out what runs inside (a benchmark's own harness, e.g. a forced exit choice)."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before

    def as_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "kernels": self.kernels, "syncs": self.syncs, "sync_ops": dict(self.by_sync)}


def _is_sync(func, kwargs: dict) -> bool:
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return True
    if packet is aten.repeat_interleave and func._overloadname in ("Tensor", "self_Tensor"):
        return kwargs.get("output_size") is None
    return False


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.count.paused:
            return func(*args, **kwargs)
        self.count.ops += 1
        self.count.kernels += not (func.is_view or func.overloadpacket in VIEW_LIKE)
        if _is_sync(func, kwargs):
            self.count.add_sync(func.overloadpacket.__name__)
        self.count.depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.count.depth -= 1


@contextmanager
def _count_host_copies(count: OpCount) -> Iterator[None]:
    """Count ``Tensor.tolist/cpu/numpy`` calls (on CPU tensors they do not dispatch)."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_COPIES}

    def wrap(name: str, orig: Callable) -> Callable:
        def counted(self, *args, **kwargs):
            if not count.depth and not count.paused:
                count.add_sync(name)
            return orig(self, *args, **kwargs)
        return counted

    try:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, wrap(name, orig))
        yield
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def count_ops(fn: Callable[[], Any], count: Optional[OpCount] = None) -> tuple[OpCount, Any]:
    """Run ``fn()`` once, counting its dispatched operations and host synchronisations (into ``count``, a
    new :class:`OpCount` when None); returns (the count, fn's result). Not thread-safe (patches three
    ``torch.Tensor`` methods while it runs)."""
    count = OpCount() if count is None else count
    with _count_host_copies(count), _Counter(count):
        result = fn()
    return count, result
