"""Progress of long jobs (extraction, training epochs, evaluation) on a terminal and in log files.

On a terminal: click's bar (done/total, ETA, a status text). When stderr is not a terminal
(a log file, a cluster job's output), a bar would be one endless line of carriage returns, so
instead a status line goes through `logging` every `interval` seconds (TWOSTREAM_PROGRESS_SECONDS,
default 30) and once at the end: done/total, percent, rate, ETA, failures and the status text.

`setup_logging(verbosity)` is what the command lines call for -v / -q.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import click

log = logging.getLogger("core.progress")
DEFAULT_INTERVAL = 30.0


def setup_logging(verbosity: int = 0) -> None:
    """-q (-1): warnings and errors only; default (0): progress and notes; -v (1+): debug detail."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it between commands)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def verbosity_options(f):
    """-v / -q for a command group: they call setup_logging before any command runs."""
    def set_level(ctx, param, value):
        if value:
            ctx.meta[param.name] = value
        level = -1 if ctx.meta.get("quiet") else ctx.meta.get("verbose", 0)
        setup_logging(level)
        return value
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=set_level,
                     help="Warnings, errors and final summaries only.")(f)
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=set_level,
                        help="More detail (-vv: debug).")(f)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress(total, "extracting", unit="videos") as p: p.update(1, status=..., failed=...)`."""

    def __init__(self, total: int, label: str, *, unit: str = "items", show: bool = True,
                 interval: float | None = None, terminal: bool | None = None):
        self.total, self.label, self.unit, self.show = int(total), label, unit, show
        self.interval = float(os.environ.get("TWOSTREAM_PROGRESS_SECONDS", DEFAULT_INTERVAL)) if interval is None \
            else interval
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.done = self.failed = 0
        self.status = ""
        self._bar = None
        self._shown = -1  # `done` at the last status line, so the final one is not a repeat

    def __enter__(self) -> "Progress":
        self.start = self._last = time.perf_counter()
        if self.show and self.terminal:
            self._bar = click.progressbar(length=self.total, label=self.label, show_pos=True, show_eta=True,
                                          item_show_func=lambda s: s, file=sys.stderr)
            self._bar.__enter__()
        return self

    def update(self, n: int = 1, status: str = "", failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        self.status = status or self.status
        if self._bar is not None:
            self._bar.update(n, self.status)
        elif self.show and time.perf_counter() - self._last >= self.interval:
            self._last = time.perf_counter()
            self._shown = self.done
            log.info(self.line())

    def line(self) -> str:
        dt = time.perf_counter() - self.start
        rate = self.done / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)", f"{rate:.2f} {self.unit}/s",
                 f"elapsed {_duration(dt)}", f"ETA {_duration(eta) if eta == eta else '?'}"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.status:
            parts.append(self.status)
        return ", ".join(parts)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.show and exc[0] is None and self._shown != self.done:
            log.info(self.line())
