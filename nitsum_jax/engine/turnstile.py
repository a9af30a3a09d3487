"""A fair lock: host CPU lanes take their steps in arrival order."""

from __future__ import annotations

import collections
import threading


class Turnstile:
    """A lock that lets waiting threads through in arrival order (threading.Lock is not fair)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._busy = False

    def __enter__(self):
        turn = threading.Event()
        with self._lock:
            if not self._busy:
                self._busy = True
                return self
            self._waiting.append(turn)
        turn.wait()
        return self

    def __exit__(self, *exc):
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # handed over: stays busy
            else:
                self._busy = False
