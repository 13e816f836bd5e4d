"""Progress of long loops: a tqdm bar on a terminal, a plain line now and then anywhere else.

A bar redrawn with carriage returns is what a person at a terminal wants and what ruins a redirected log (a
SLURM file, ``> run.log``): every redraw stays in the file. `progress_bar` looks at the stream and returns
either a tqdm bar or a `LineProgress`, which takes the same calls (``update``, ``set_postfix``, ``close``,
``with``), so the trainer and the evaluators never ask which one they have.

`set_phase` names the study phase that is running (``mae 2/6 · finetune 3/4``); every bar opened while it
is set carries that name, so a progress line in a log says which part of the study it belongs to.
"""
from __future__ import annotations

import contextvars
import sys
import time
from numbers import Number
from typing import Any, TextIO

from tqdm.auto import tqdm

# A log gets a line when another EVERY_PERCENT of the loop is done, at most one per MIN_GAP_S (short
# loops stay at one line, their last), and at least one every EVERY_S while the loop moves at all.
EVERY_PERCENT = 10.0
EVERY_S = 30.0
MIN_GAP_S = 5.0

# tqdm's own fields and its classic right-hand side, without the bar and without carriage returns.
_KNOWN_TOTAL = "{desc}: {percentage:.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_UNKNOWN_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"

_phase: contextvars.ContextVar[str | None] = contextvars.ContextVar("mugbench_phase", default=None)


def set_phase(label: str | None) -> None:
    """Name the study phase now running (None: no phase); bars opened from now on are prefixed with it."""
    _phase.set(label)


def phase() -> str | None:
    """The study phase now running, as `set_phase` named it, or None."""
    return _phase.get()


def is_interactive(stream: TextIO) -> bool:
    """Whether ``stream`` shows a redrawn bar to a person: a terminal, or the output of a Jupyter kernel
    (no terminal, but it renders tqdm.auto's widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules and stream in (sys.stdout, sys.stderr)


class LineProgress:
    """A progress bar for logs: plain lines, each ending in a newline, never a carriage return.

    Writes a line when another ``every_percent`` of ``total`` is done (at most one per ``min_gap_s``) or
    ``every_s`` passed since the last one, and a last line when closed, in tqdm's words (``desc: 40% 4/10
    [00:12<00:18, 3.00s/step, loss=0.61]``; the time left is tqdm's estimate from the rate so far).
    """

    def __init__(self, total: int | None = None, *, desc: str = "", initial: int = 0, unit: str = "it",
                 stream: TextIO | None = None, every_percent: float = EVERY_PERCENT, every_s: float = EVERY_S,
                 min_gap_s: float = MIN_GAP_S, clock=time.monotonic):
        self.total, self.desc, self.n, self.initial, self.unit = total, desc, initial, initial, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_percent, self.every_s, self.min_gap_s, self.clock = every_percent, every_s, min_gap_s, clock
        self.postfix = ""
        self.start = self.last_line = clock()
        self.next_mark = self._mark_after(initial)
        self.written: tuple[int, str] | None = None  # the count and postfix of the last line
        self.closed = False

    def _mark_after(self, n: int) -> float:
        """The count at which the next ``every_percent`` step of the total is reached (inf without a total)."""
        if not self.total:
            return float("inf")
        step = self.total * self.every_percent / 100
        return (n // step + 1) * step

    def update(self, n: int = 1) -> None:
        """Count ``n`` more done; write a line if one is due."""
        self.n += n
        now = self.clock()
        since = now - self.last_line
        if since >= self.every_s or (self.n >= self.next_mark and since >= self.min_gap_s):
            self._write(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """The ``key=value`` figures after the count, as tqdm's ``set_postfix`` formats them; shown in
        the next line (``refresh`` is accepted for tqdm's signature and ignored: lines have their own pace)."""
        items = dict(ordered_dict or {}, **{k: kwargs[k] for k in sorted(kwargs)})
        self.postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, Number) else str(v).strip()}"
                                 for k, v in items.items())

    def line(self, now: float | None = None) -> str:
        """The progress so far as one line (without its newline)."""
        elapsed = (self.clock() if now is None else now) - self.start
        return tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc, unit=self.unit,
                                 postfix=self.postfix or None, initial=self.initial,
                                 bar_format=_KNOWN_TOTAL if self.total else _UNKNOWN_TOTAL)

    def _write(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self.last_line, self.written = now, (self.n, self.postfix)
        self.next_mark = self._mark_after(self.n)

    def close(self) -> None:
        """Write the last line, unless the line before said the same."""
        if not self.closed:
            self.closed = True
            if self.written != (self.n, self.postfix):
                self._write(self.clock())

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None = None, *, desc: str = "", initial: int = 0, unit: str = "it",
                 disable: bool = False, stream: TextIO | None = None, **line_options: Any):
    """A progress bar for a loop of ``total`` steps: tqdm's on a terminal (or in Jupyter), a `LineProgress`
    writing plain lines on any other ``stream`` (default: standard error, read when called). ``desc``
    is prefixed with the study phase (`set_phase`) when one is running; ``disable`` (ranks other than 0)
    gives a bar that shows nothing. ``line_options`` tune the `LineProgress` pace."""
    stream = stream if stream is not None else sys.stderr
    label = phase()
    desc = f"[{label}] {desc}" if label else desc
    if disable or is_interactive(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream,
                    dynamic_ncols=True, leave=False)
    return LineProgress(total, desc=desc, initial=initial, unit=unit, stream=stream, **line_options)
