"""Request handles: a caller's view of one request, streaming its tokens as they are made."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator

from nitsum_jax.engine.core import Entry
from nitsum_jax.sequence import Completion

_END = object()


class RequestHandle:
    """Iterate for the tokens as they are made; `result()` blocks for the completion; `cancel()`
    stops the request at its lane's next step boundary (its KV pages are freed)."""

    def __init__(self, entry: Entry, cancel: Callable[[str], None]):
        self._entry, self._cancel = entry, cancel
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()

    # What the request is and how it went (read-only views of the engine's record).
    @property
    def request(self):
        return self._entry.request

    @property
    def seq(self):
        return self._entry.seq

    @property
    def first_token_time(self) -> float | None:
        return self._entry.first_token_time

    @property
    def finish_time(self) -> float | None:
        return self._entry.finish_time

    @property
    def served_by(self) -> tuple[str, str, int] | None:
        """(plan, lane, tp) of the request's last step."""
        return self._entry.served_by

    @property
    def error(self) -> str | None:
        """Why the request finished with "error"."""
        return self._entry.error

    @property
    def moved(self) -> int:
        """KV moves of the request between lanes (plan switches, preemptions)."""
        return self._entry.moved

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose K/V came from the prefix cache at the request's first admission (0
        until it is admitted, and with the cache off)."""
        return self._entry.request.cached_tokens or 0

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._events.get()
            if item is _END:
                self._events.put(_END)  # a second iteration ends too
                return
            yield item

    def cancel(self) -> None:
        """Stop the request at the next step boundary; its KV pages are freed."""
        self._cancel(self._entry.request.request_id)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; its tokens, text and finish reason (TimeoutError after `timeout` s)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.request_id} not done after {timeout}s")
        return dataclasses.replace(self.seq.completion(), finish_reason=self.request.finish_reason or "length")

    # The driver's side.
    def _token(self, token: int) -> None:
        self._events.put(token)

    def _finish(self) -> None:
        self._events.put(_END)
        self._done.set()
