"""Token pruning bookkeeping: pure functions on tensors, no modules (the model side is :mod:`dtop.models`)."""
from .tokens import compact, confidence, gather_tokens, pad_positions, select_exits

__all__ = ["confidence", "select_exits", "gather_tokens", "compact", "pad_positions"]
