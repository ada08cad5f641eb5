"""Wall time and peak resident memory of a block of work."""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """Current resident set size of this process (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class Measure:
    """Context manager timing a block and sampling its peak resident-memory growth.

    ``peak_bytes`` is the largest resident set seen during the block minus the resident set
    at its start, sampled every ``interval`` seconds by a background thread.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.seconds = 0.0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, resident_bytes())

    def __enter__(self) -> Measure:
        self._stop.clear()  # a Measure can time several blocks, one after another
        self._base = resident_bytes()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._peak = max(self._peak, resident_bytes())
        self.peak_bytes = self._peak - self._base
