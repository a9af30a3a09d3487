"""Waiting requests: a queue per class, each in arrival order, merged by aged rank.

Within one class every request ages at the same rate, so arrival order is urgency order, and
the lane's admission order is a lazy merge of the class queues' heads by aged rank: no list
of every waiting request is sorted per lane per step (the shape of vLLM's request queue).
"""

from __future__ import annotations

import bisect
import heapq
import operator
from typing import Callable, Iterator

from nitsum_jax.scheduler.classes import PriorityClass
from nitsum_jax.scheduler.requests import QueueFull, Request


_request = operator.itemgetter(2)


class WaitingQueues:
    def __init__(self, classes: dict[str, PriorityClass]):
        self.classes = classes
        self._queues: dict[str, list[tuple[float, int, Request]]] = {name: [] for name in classes}
        self._order = 0  # ties in arrival keep their order of entry

    def push(self, request: Request, *, bounded: bool = True) -> None:
        """Queue a request at its arrival's place (a requeued one keeps its place in line).
        `bounded`: refuse it (QueueFull) when its class is at `max_queue` (new requests only)."""
        queue = self._queues[request.priority_class]
        cls = self.classes[request.priority_class]
        if bounded and len(queue) >= cls.max_queue:
            raise QueueFull(f"class {cls.name!r} queue is full ({len(queue)} waiting, bound {cls.max_queue})")
        self._order += 1
        bisect.insort_right(queue, (request.arrival, self._order, request), key=lambda e: e[0])

    def remove(self, request: Request) -> None:
        queue = self._queues[request.priority_class]
        for i in range(bisect.bisect_left(queue, request.arrival, key=lambda e: e[0]), len(queue)):
            if queue[i][2] is request:
                del queue[i]
                return
        raise ValueError(f"request {request.request_id} is not waiting")

    def count(self, class_name: str) -> int:
        return len(self._queues[class_name])

    def counts(self) -> dict[str, int]:
        """Class -> how many of it wait."""
        return {name: len(q) for name, q in self._queues.items()}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def ordered(self, urgency: Callable[[Request], tuple], serves: Callable[[str], bool] = lambda c: True
                ) -> Iterator[Request]:
        """Waiting requests of the classes `serves` accepts, most urgent first, lazily. Iterates
        over a copy of each class queue, so the caller may admit, requeue or drop meanwhile."""
        heads = [map(_request, q.copy()) for name, q in self._queues.items() if q and serves(name)]
        return heapq.merge(*heads, key=urgency)

    def waiting_ranks(self, serves: Callable[[str], bool] = lambda c: True) -> list[int]:
        """The class ranks of the classes `serves` accepts that have waiting requests."""
        return [self.classes[name].rank for name, q in self._queues.items() if q and serves(name)]

    def all(self, urgency: Callable[[Request], tuple]) -> list[Request]:
        return list(self.ordered(urgency))
