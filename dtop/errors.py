"""Errors users see. Each names the problem in words; the CLI prints them without a traceback."""
from __future__ import annotations

import contextlib
import difflib
import signal
import threading
from typing import Iterable, Iterator, Sequence


class DToPError(ValueError):
    """Base class for dtop's user-facing errors."""


class InputError(DToPError):
    """An input tensor or file the model cannot take (shape, channels, size)."""


class ConfigError(DToPError):
    """An unknown preset, config key or inconsistent setting."""


class CheckpointError(DToPError):
    """A checkpoint file that is missing, unreadable or does not match the model."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped a long job. A job's loop catches the interruption and raises it again
    with what it had done: ``done`` (one clause: what finished, where its checkpoint or partial results are) and
    ``resume`` (arguments to add to the command line to continue, e.g. ``["--resume"]``; empty: rerun it as it
    was). The CLI prints it as one line and exits with :attr:`exit_status`. A ``KeyboardInterrupt``, so code
    that lets Ctrl-C through lets this through too."""

    def __init__(self, signum: int = signal.SIGINT, done: str = "", resume: Sequence[str] = ()):
        super().__init__(done)
        self.signum, self.done, self.resume = int(signum), done, list(resume)

    def __reduce__(self):
        return type(self), (self.signum, self.done, self.resume)

    @property
    def signal_name(self) -> str:
        """``SIGINT``, ``SIGTERM``, ..."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """The shell's convention for a job ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum

    @classmethod
    def wrap(cls, exc: BaseException, done: str, resume: Sequence[str] = ()) -> "Interrupted":
        """``exc`` (an Interrupted, or a plain KeyboardInterrupt: SIGINT) again, with the job's ``done`` and
        ``resume``; keeps the signal. Raise it ``from exc``."""
        return cls(getattr(exc, "signum", signal.SIGINT), done, resume)


INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(old: dict) -> None:
    for s, handler in old.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python


def raise_interrupted(signum: int, frame=None) -> None:
    """A signal handler: raise :class:`Interrupted` for ``signum`` (the CLI installs it for SIGINT and SIGTERM)."""
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (the previous handlers come back after
    it). Outside the main thread, where Python cannot set handlers, it does nothing."""
    if not _in_main_thread():
        yield
        return
    old = {s: signal.signal(s, raise_interrupted) for s in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        _restore(old)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them to the handlers that were in place:
    for a step that must not stop half-way (an optimiser update with its schedule, one image's output files).
    Outside the main thread (no Python signal handlers there) it does nothing."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        _restore(old)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the closest of ``known`` to ``name`` (difflib), or ``""``."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_name(what: str, name: object, known: Iterable[str]) -> ConfigError:
    """The one error for a name that is not among the ``known`` ones (a preset, head, layout, dataset, ...):
    ``unknown {what} 'name' (did you mean X?); choose from a, b, c``. Returned, for the caller to raise."""
    known = [str(k) for k in known]
    return ConfigError(f"unknown {what} {name!r}{did_you_mean(str(name), known)}; choose from {', '.join(known)}")
