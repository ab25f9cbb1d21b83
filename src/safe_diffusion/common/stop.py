"""A stop the command line has seen (Ctrl-C, SIGTERM), for long jobs to honour between units of work.

The command line's signal handlers raise ``KeyboardInterrupt`` (SIGTERM: ``SystemExit(143)``) at once, and the
job unwinds through its rollbacks. Python raises it at the next bytecode the main thread runs, which may be
inside a library that drops it: C code that clears the error of a lookup whose Python ``__eq__`` or
``__getattr__`` it was raised in, a bare ``except``. The job would then run to its end with the stop lost (seen
in CI: a Ctrl-C while the model loaded, and the command went on to exit 0 with its images written). So the
handlers also record the stop here, and it is raised again before any more work is done: at a guided call's
next denoiser step (the engine's pre-hook), at a job's next progress update (:class:`~.progress.ProgressLog`)
and before an attack's next batch; a command that still ends normally exits as stopped. Only the command line
records stops, and an in-process ``main([...])`` forgets its own when it returns: a library user's own Ctrl-C
is theirs to handle.
"""

from __future__ import annotations

import signal

_SEEN = {"status": 0}


def record(status: int) -> None:
    """A stop was asked for: 130 (Ctrl-C) or 143 (SIGTERM). The first one stands."""
    _SEEN["status"] = _SEEN["status"] or status


def status() -> int:
    """The exit status of the stop asked for (130, 143), or 0 if none was."""
    return _SEEN["status"]


def clear() -> None:
    """Forget the stop (a new in-process command starts)."""
    _SEEN["status"] = 0


def honour() -> None:
    """Raise the stop asked for, if any: ``KeyboardInterrupt`` for Ctrl-C, ``SystemExit`` for SIGTERM."""
    seen = _SEEN["status"]
    if seen == 128 + signal.SIGTERM:
        raise SystemExit(seen)
    if seen:
        raise KeyboardInterrupt
