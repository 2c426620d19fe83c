"""fp32 CPU inference with linear weights pre-packed for oneDNN.

torch's ``F.linear`` on CPU calls MKL's sgemm, which re-packs the weight matrix into its blocked
layout on every call. A ViT-B block reads 28 MB of weights whatever its token count, so that
repacking is a cost that does not shrink when tokens leave (the blocks after an exit run on as few
as 100 tokens). oneDNN's linear with the weight packed once (``mkldnn::_reorder_linear_weight``, the
kernels torch.compile's CPU backend uses) skips it: on a 2-core x86 CPU six ViT-B blocks took about
15% less time on 1024 tokens and 38% less on 102 (``benchmarks/block_scaling.py``, in RESULTS.md).

:class:`PackedLinear` is an ``nn.Linear`` (same parameters, same ``state_dict``) that uses the packed
weight when it can (CPU, float32, no autograd, no autocast) and ``F.linear`` otherwise, and repacks
when its weight changes. :func:`use_linear_kernel` swaps a model's linears in or out.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, unknown_name

LINEAR_KERNELS = ("auto", "onednn", "aten")


@lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build runs oneDNN's packed linear (x86 and ARM builds with mkldnn do)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 3))
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), w, None, "none", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(y, torch.full((1, 2), 3.0)))


class PackedLinear(nn.Linear):
    """``nn.Linear`` that, for fp32 CPU inference, multiplies by a oneDNN-packed copy of its weight.

    The packed copy (as large as the weight) is made on the first forward that can use it and again
    whenever the weight changes (its version counter, storage, dtype or device); it is not part of the
    ``state_dict`` and is dropped when the module is copied or pickled."""

    _packed: Optional[Tensor] = None
    _packed_key: Optional[tuple] = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "PackedLinear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameters: nothing is copied
        new.train(lin.training)
        return new

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin

    def _usable(self, x: Tensor) -> bool:
        w = self.weight
        return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
                and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))

    def forward(self, x: Tensor) -> Tensor:
        if not self._usable(x):
            return F.linear(x, self.weight, self.bias)
        w = self.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._packed is None or self._packed_key != key:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            self._packed_key = key
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_packed", None)  # an opaque oneDNN tensor: cannot be copied or saved
        state.pop("_packed_key", None)
        return state


def _swap(model: nn.Module, kind: type, convert) -> None:
    """Replace every submodule of exactly type ``kind`` by ``convert(submodule)``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, convert(child))


def use_linear_kernel(model: nn.Module, kernel: str = "auto", device: Optional[torch.device] = None) -> str:
    """Make ``model``'s ``nn.Linear`` layers use ``kernel`` for fp32 CPU inference; returns the kernel in use.

    ``onednn``: :class:`PackedLinear` (an error where this torch has no oneDNN); ``aten``: plain
    ``nn.Linear`` (torch's default, MKL sgemm); ``auto``: ``onednn`` on a CPU ``device`` where available,
    else ``aten``. Subclasses of ``nn.Linear`` (e.g. inside ``nn.MultiheadAttention``) are left alone."""
    if kernel not in LINEAR_KERNELS:
        raise unknown_name("linear kernel", kernel, LINEAR_KERNELS)
    if kernel == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        kernel = "onednn" if on_cpu and onednn_available() else "aten"
    if kernel == "onednn":
        if not onednn_available():
            raise ConfigError("--linear onednn: this torch build has no oneDNN (mkldnn) linear; use --linear aten")
        _swap(model, nn.Linear, PackedLinear.from_linear)
    else:
        _swap(model, PackedLinear, PackedLinear.to_linear)
    return kernel
