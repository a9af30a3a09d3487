"""Host-side KV page accounting: a free list and per-sequence page lists (NumPy, no JAX), so the
scheduler can reserve pages and be tested without a device."""

from __future__ import annotations

import math
from typing import Hashable, Iterable

import numpy as np


class OutOfPages(RuntimeError):
    """Not enough free KV pages; nothing was allocated."""


class PageAllocator:
    """Free physical pages (handed out lowest first) plus one page list per sequence."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Lowest free page first: a sequence reserved at once (a prompt, a moved sequence) gets
        # adjacent pages wherever the pool has them, which a KV move between GPUs sends by the copy
        # engines, one pitched copy per cache array (BENCHMARKS.md, "KV moves"); the bookkeeping is
        # vectorized (a move of 256 pages paid ~80 us of per-page Python before).
        self._used = np.zeros(num_pages, dtype=bool)
        self._num_free = num_pages
        self._low = 0  # every page below this one is in use
        self._pages: dict[Hashable, list[int]] = {}
        self._tokens: dict[Hashable, int] = {}

    # -- queries ---------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_pages - self._num_free

    def can_reserve(self, num_tokens: int, seq_id: Hashable | None = None) -> bool:
        held = len(self._pages.get(seq_id, ())) if seq_id is not None else 0
        return self.pages_for(num_tokens) - held <= self.num_free

    def pages(self, seq_id: Hashable) -> list[int]:
        return list(self._require(seq_id))

    def capacity(self, seq_id: Hashable) -> int:
        """Tokens the sequence's pages can hold."""
        return len(self._require(seq_id)) * self.page_size

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._pages

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._pages)

    # -- changes ---------------------------------------------------------------------------
    def reserve(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Make `seq_id` hold pages for `num_tokens` tokens (new sequence or growth).

        All or nothing: on `OutOfPages` the sequence keeps exactly what it had.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        held = self._pages.get(seq_id, [])
        need = self.pages_for(num_tokens) - len(held)
        if need > self._num_free:
            raise OutOfPages(f"sequence {seq_id!r} needs {need} more KV pages for {num_tokens} tokens "
                             f"(page_size {self.page_size}); {self._num_free} of {self.num_pages} are free")
        new = self._take(need) if need > 0 else []
        self._pages[seq_id] = held + new
        return new

    def _take(self, n: int) -> list[int]:
        """The `n` lowest free pages, marked used (the caller checked that `n` are free)."""
        low = self._low
        if low + n <= self.num_pages and not self._used[low:low + n].any():  # the next n pages are free
            self._used[low:low + n] = True
            self._num_free -= n
            self._low = low + n
            return list(range(low, low + n))
        found, start = [], low
        while sum(map(len, found)) < n:
            stop = min(self.num_pages, start + max(4 * n, 256))
            found.append(np.flatnonzero(~self._used[start:stop]) + start)
            start = stop
        pages = np.concatenate(found)[:n]
        self._used[pages] = True
        self._num_free -= n
        self._low = int(pages[-1]) + 1
        return pages.tolist()

    def free(self, seq_id: Hashable) -> int:
        """Give all of a sequence's pages back; returns how many. Freeing twice is refused."""
        if seq_id not in self._pages:
            raise KeyError(f"sequence {seq_id!r} holds no KV pages (unknown or already freed)")
        pages = self._pages.pop(seq_id)
        first, n = (pages[0], len(pages)) if pages else (0, 0)
        if n and pages[-1] - first == n - 1 and pages == list(range(first, first + n)):  # one run: slices
            if not self._used[first:first + n].all():
                raise AssertionError(f"pages of {seq_id!r} in {first}..{first + n - 1} were not marked as used")
            self._used[first:first + n] = False
            self._num_free += n
            self._low = min(self._low, first)
        elif pages:
            index = np.asarray(pages)
            if not self._used[index].all():
                raise AssertionError(f"pages {index[~self._used[index]].tolist()} of {seq_id!r} were not marked as used")
            self._used[index] = False
            self._num_free += len(pages)
            self._low = min(self._low, int(index.min()))
        return len(pages)

    def page_table(self, seq_ids: Iterable[Hashable | None], pages_per_seq: int) -> np.ndarray:
        """[len(seq_ids), pages_per_seq] int32; `None` rows (idle slots) and padding are page 0,
        which is safe: writes there are dropped and reads are masked by position."""
        seq_ids = list(seq_ids)
        table = np.zeros((len(seq_ids), pages_per_seq), dtype=np.int32)
        for row, sid in enumerate(seq_ids):
            if sid is None:
                continue
            # A sequence may hold pages reserved ahead of its length; the step only needs the
            # pages up to its current length, which the caller sized `pages_per_seq` for.
            pages = self._require(sid)[:pages_per_seq]
            table[row, :len(pages)] = pages
        return table

    def _require(self, seq_id: Hashable) -> list[int]:
        try:
            return self._pages[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} holds no KV pages") from None
