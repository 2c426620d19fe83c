"""Token pruning bookkeeping: pure functions on tensors, no modules (the model side is :mod:`dtop.models`)."""
from .tokens import compact, confidence, gather_tokens, kept_columns, pad_positions, select_budget, select_exits

__all__ = ["confidence", "select_exits", "select_budget", "kept_columns", "gather_tokens", "compact", "pad_positions"]
