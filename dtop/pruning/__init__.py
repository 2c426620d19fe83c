"""Token pruning bookkeeping (pure functions)."""
from .tokens import confidence, gather_tokens, scatter_tokens, select_exits

__all__ = ["confidence", "select_exits", "gather_tokens", "scatter_tokens"]
