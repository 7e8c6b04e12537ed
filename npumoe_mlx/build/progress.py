"""Progress output: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns, which floods a log file or a CI
transcript. When the stream is not a terminal we print one line per step instead,
and at most one every ``interval`` seconds (plus the last), so logs stay readable.
"""

import sys
import time

from tqdm import tqdm


class LinePrinter:
    """The part of tqdm's interface we use (iterate, update, close), as plain lines."""

    def __init__(self, iterable=None, desc="", total=None, unit="it", file=None, interval=2.0):
        self.iterable, self.desc, self.unit, self.file, self.interval = iterable, desc, unit, file, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self._last, self._t0, self._closed = 0, 0.0, time.perf_counter(), False

    def _line(self, force=False):
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of} {self.unit} ({now - self._t0:.1f} s)", file=self.file, flush=True)

    def update(self, n=1):
        self.n += n
        self._line(force=self.total is not None and self.n >= self.total)

    def close(self):
        if not self._closed and self.n and (self.total is None or self.n < self.total):
            self._line(force=True)
        self._closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(iterable=None, *, desc="", total=None, unit="it", disable=False, leave=True, file=None):
    """tqdm on a terminal; LinePrinter when ``file`` (default stderr) is not one; nothing if disabled."""
    file = file or sys.stderr
    if disable:
        return tqdm(iterable, total=total, disable=True)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=file)
    return LinePrinter(iterable, desc=desc, total=total, unit=unit, file=file)
