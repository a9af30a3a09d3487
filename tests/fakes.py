"""Fakes the scheduler and engine-core tests share: a clock the test moves, and a lane that is
just a name, a spec and a page allocator (what the core reads of a lane)."""

import dataclasses

from nitsum_jax.pages import PageAllocator


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@dataclasses.dataclass
class FakeLane:
    name: str
    spec: object
    allocator: PageAllocator
