"""Progress of long jobs, readable on a terminal and in a cluster job's log.

On a terminal: a tqdm bar. Elsewhere (``nohup``, Slurm, a pipe): one line at the first update, at
most one every `interval` seconds after it (``SAFE_DIFFUSION_PROGRESS_INTERVAL``, default 60), and one
when the job ends, each with counts, percentage, rate, elapsed time and ETA:

    generate: 40/4703 images (0.9%), 2.31 images/s, elapsed 0:00:17, ETA 0:33:36

Off with ``enabled=False`` or ``TQDM_DISABLE=1`` (what ``--quiet`` sets).
"""

from __future__ import annotations

import math
import os
import sys
import time

from . import stop


def format_duration(seconds: float) -> str:
    """``H:MM:SS``, or ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def default_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("SAFE_DIFFUSION_PROGRESS_INTERVAL", 60)))
    except ValueError:
        return 60.0


def format_rate(done: int, elapsed: float, unit: str) -> str:
    """``2.31 images/s``; ``1,250 images/s`` above 100; ``? images/s`` before a second has passed (a count done
    at once, e.g. read from a cache, is no rate: 3.15e+05 images/s was what that printed)."""
    if elapsed < 1.0 or done <= 0:
        return f"? {unit}/s"
    rate = done / elapsed
    return f"{rate:.2f} {unit}/s" if rate < 100 else f"{rate:,.0f} {unit}/s"


class ProgressLog:
    """Counts `done` of `total` `unit`s, starting at `start` (a resumed job), and shows them (see the module)."""

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        unit: str = "images",
        start: int = 0,
        enabled: bool = True,
        interval: float | None = None,
        stream=None,
    ):
        self.desc, self.total, self.unit, self.start, self.done = desc, total, unit, start, start
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0 and os.environ.get("TQDM_DISABLE", "") in ("", "0")
        self.interval = default_interval() if interval is None else interval
        self.started = time.monotonic()
        self.last: float | None = None
        self.note = ""
        self.bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def text(self) -> str:
        """The log line for where the job stands now."""
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.start) / elapsed if elapsed >= 1.0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else (0.0 if self.done >= self.total else math.inf)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        note = f", {self.note}" if self.note else ""
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.1f}%){note}, "
            f"{format_rate(self.done - self.start, elapsed, self.unit)}, "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}"
        )

    def update(self, n: int = 1, note: str = "") -> None:
        """`n` more done; `note` (e.g. "3 edited") shows beside the counts."""
        self.set(self.done + n, note)

    def set(self, done: int, note: str = "") -> None:
        """`done` of `total` are done. A stop the command line saw and a library dropped is raised here, so the
        job stops before its next unit of work (see :mod:`.stop`)."""
        stop.honour()
        self.done = done
        self.note = note or self.note
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if self.last is None or self.done >= self.total or now - self.last >= self.interval:
            self.last = now
            print(self.text(), file=self.stream, flush=True)

    def line(self, text: str) -> None:
        """A message between updates (a checkpoint written, a resumed run), without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and (self.last is None or self.done < self.total):
            print(self.text(), file=self.stream, flush=True)

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
