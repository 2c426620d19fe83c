"""Token pruning bookkeeping (pure functions)."""
from .tokens import confidence, gather_tokens, keep_indices, scatter_tokens, select_exits

__all__ = ["confidence", "select_exits", "keep_indices", "gather_tokens", "scatter_tokens"]
