"""Errors users see. Each names the problem in words; the CLI prints them without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class DToPError(ValueError):
    """Base class for dtop's user-facing errors."""


class InputError(DToPError):
    """An input tensor or file the model cannot take (shape, channels, size)."""


class ConfigError(DToPError):
    """An unknown preset, config key or inconsistent setting."""


class CheckpointError(DToPError):
    """A checkpoint file that is missing, unreadable or does not match the model."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest of ``known`` to ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_name(what: str, name: object, known: Iterable[str]) -> ConfigError:
    """The one error for a name that is not among the ``known`` ones (a preset, head, layout, dataset, ...):
    ``unknown {what} 'name' (did you mean X?); choose from a, b, c``. Returned, for the caller to raise."""
    known = [str(k) for k in known]
    return ConfigError(f"unknown {what} {name!r}{did_you_mean(str(name), known)}; choose from {', '.join(known)}")
