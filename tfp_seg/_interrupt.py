"""A process-wide record of a Ctrl-C (SIGINT) request, set by `tfp-seg`'s signal handler.

Python raises `KeyboardInterrupt` where the signal lands, and library code does not always let
it through: Keras' bare `except:` clauses turn it into another error, and one landing inside a
C-extension call can come out as a `SystemError` that is printed and swallowed while training
goes on. The handler therefore also records the request here, and the training loop
(`tfp_seg.runs.train.InterruptGuard`) raises `KeyboardInterrupt` at the next batch boundary.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


def request() -> None:
    """Record an interrupt request."""
    _requested.set()


def requested() -> bool:
    """Whether an interrupt was requested since the last `clear()`."""
    return _requested.is_set()


def clear() -> None:
    """Forget an earlier request (at the start of a command)."""
    _requested.clear()
