"""Status lines on stderr for the steps a user waits through (docs/run.md, "What it says while you wait").

Assembling the default model, building the native kernels, loading a model and the prefill of a long
prompt each say what they are doing. The command line turns this on when stderr is a terminal and no
``--json`` output was asked for; ``qwenvl serve`` always (its start-up log). Library use stays silent
unless ``configure(True)`` is called.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"on": False}
_lock = threading.Lock()

LONG_PROMPT_TOKENS = 512  # prefills of at least this many tokens say so


def configure(on: bool) -> None:
    """Turn the status lines on or off for this process."""
    _state["on"] = bool(on)


def enabled() -> bool:
    return _state["on"]


def note(message: str) -> None:
    """One status line (when on)."""
    if _state["on"]:
        with _lock:
            _break_open_line()
            _write(f"qwenvl: {message}\n")


def notice(message: str) -> None:
    """A line that tells of a choice made for the user (not a progress line): always written."""
    with _lock:
        _break_open_line()
        _write(f"qwenvl: {message}\n")


@contextmanager
def step(message: str) -> Iterator[None]:
    """``qwenvl: MESSAGE …`` before a long step and ``done (N s)`` after it, on one line (when on); a
    step that starts inside another ends that line first, and the outer step's line is written again
    when it ends."""
    if not _state["on"]:
        yield
        return
    with _lock:
        _break_open_line()
        _write(f"qwenvl: {message} … ")
        _open.append([message, False])
    started = time.perf_counter()
    outcome = "failed"
    try:
        yield
        outcome = f"done ({time.perf_counter() - started:.1f} s)"
    finally:
        with _lock:
            _, broken = _open.pop()
            _write((f"qwenvl: {message} … " if broken else "") + outcome + "\n")


_open: list[list] = []  # the steps under way: [message, whether their line was ended by an inner one]


def _break_open_line() -> None:
    if _open and not _open[-1][1]:
        _write("\n")
        _open[-1][1] = True


def _write(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


__all__ = ["configure", "enabled", "note", "notice", "step", "LONG_PROMPT_TOKENS"]
