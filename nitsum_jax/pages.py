"""Host-side KV page accounting: a free list, per-sequence page lists and a cache of full pages
by content (NumPy, no JAX), so the scheduler can reserve and share pages and be tested without
a device.

Prefix caching (the idea of vLLM's automatic prefix caching): a full page of a prompt is named
by a key chained over its tokens and every token before it (`page_keys`), so equal keys mean
equal K/V. Pages are reference-counted: several sequences may hold one cached page (its id
appears in several page-table rows), and a cached page no sequence holds stays, idle, until
its room is needed. Only full pages that are already computed are cached, and a sequence only
writes positions past the pages it shares, so a shared page is never written.
"""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Hashable, Iterable, Sequence

import numpy as np


class OutOfPages(RuntimeError):
    """Not enough free KV pages; nothing was allocated."""


def page_keys(token_ids: Sequence[int], page_size: int, salt: str | None = None) -> list[bytes]:
    """The keys of the full pages of `token_ids` (a partial last page has none): page i's key is
    a 256-bit BLAKE2b hash of page i-1's key and page i's token ids, the chain rooted in `salt`
    (None: the shared namespace), so two prompts share the keys of exactly their common full
    pages, and prompts of different salts share none. 256 bits: a collision would hand one
    request another's K/V, so the key is as wide as a content hash needs to be."""
    data = np.asarray(token_ids, dtype="<i4").tobytes()  # one conversion; pages are slices of it
    step = 4 * page_size
    key = _root_key(salt)
    keys: list[bytes] = []
    for start in range(0, len(data) - step + 1, step):
        key = hashlib.blake2b(key + data[start:start + step], digest_size=32).digest()
        keys.append(key)
    return keys


def _root_key(salt: str | None) -> bytes:
    return hashlib.blake2b(b"\0" if salt is None else b"\1" + salt.encode(), digest_size=32).digest()


def next_page_key(parent: bytes | None, page_tokens: Sequence[int], salt: str | None = None) -> bytes:
    """The key of the full page `page_tokens` after the page keyed `parent` (None: the first page)."""
    if parent is None:
        parent = _root_key(salt)
    return hashlib.blake2b(parent + np.asarray(page_tokens, dtype="<i4").tobytes(), digest_size=32).digest()


class PageAllocator:
    """Free physical pages (handed out lowest first), one page list per sequence, and cached full
    pages by key (shared by reference count; idle ones evicted least urgent tier first, then
    least recently released).

    Counts: `num_free` pages can be reserved now (the free list plus idle cached pages, which a
    reservation evicts once the free list is empty), `num_used` are held by sequences, and
    `num_cached` are idle cached pages (part of `num_free`)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Lowest free page first: a sequence reserved at once (a prompt, a moved sequence) gets
        # adjacent pages wherever the pool has them, which a KV move between GPUs sends by the copy
        # engines, one pitched copy per cache array (BENCHMARKS.md, "KV moves"); the bookkeeping is
        # vectorized (a move of 256 pages paid ~80 us of per-page Python before).
        self._used = np.zeros(num_pages, dtype=bool)  # not on the free list: held or cached
        self._refs = np.zeros(num_pages, dtype=np.int32)  # sequences holding each page
        self._num_free = num_pages  # pages on the free list
        self._low = 0  # every page below this one is off the free list
        self._pages: dict[Hashable, list[int]] = {}
        self._key_of: dict[int, bytes] = {}  # cached page -> its key
        self._page_of: dict[bytes, int] = {}  # key -> its cached page
        self._rank: dict[int, int] = {}  # cached page -> the eviction rank of its latest users
        # Idle cached pages per rank, least recently released first (the eviction order).
        self._idle: dict[int, collections.OrderedDict[int, None]] = {}
        self._num_idle = 0

    # -- queries ---------------------------------------------------------------------------
    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    @property
    def num_free(self) -> int:
        """Pages a reservation can take now: the free list plus the idle cached pages."""
        return self._num_free + self._num_idle

    @property
    def num_used(self) -> int:
        """Pages held by sequences (a page several sequences share counts once)."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Idle cached pages: no sequence holds them; kept for a later prompt until evicted."""
        return self._num_idle

    @property
    def num_keyed(self) -> int:
        """Cached pages, held or idle."""
        return len(self._key_of)

    def refs(self, page: int) -> int:
        """How many sequences hold `page`."""
        return int(self._refs[page])

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `keys` (page ids in key order), held or idle."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_reserve(self, num_tokens: int, seq_id: Hashable | None = None) -> bool:
        held = len(self._pages.get(seq_id, ())) if seq_id is not None else 0
        return self.pages_for(num_tokens) - held <= self.num_free

    def covers(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether the sequence holds pages for `num_tokens` tokens already (False if it holds none)."""
        held = self._pages.get(seq_id)
        return held is not None and len(held) * self.page_size >= num_tokens

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
        if need > self.num_free:
            raise OutOfPages(f"sequence {seq_id!r} needs {need} more KV pages for {num_tokens} tokens "
                             f"(page_size {self.page_size}); {self.num_free} of {self.num_pages} are free")
        if need <= 0:
            self._pages[seq_id] = held
            return []
        from_list = min(need, self._num_free)  # the free list first: cached pages stay while they can
        new = (self._take(from_list) if from_list else []) + self._evict(need - from_list)
        self._refs[new] = 1
        self._pages[seq_id] = held + new
        return new

    def attach(self, seq_id: Hashable, pages: Sequence[int], rank: int = 0) -> None:
        """A new sequence starts by holding cached `pages` (from `match`): its first
        len(pages) x page_size tokens need no computing. `rank`: the eviction rank of the
        sequence's tier (0 = most urgent); a page remembers the most urgent rank of the sequences
        that held it since it was last idle."""
        if seq_id in self._pages:
            raise ValueError(f"sequence {seq_id!r} already holds KV pages; only a new sequence attaches cached ones")
        stale = [p for p in pages if p not in self._key_of]
        if stale:
            raise ValueError(f"pages {stale} are not cached (evicted since they were matched?)")
        for page in pages:
            if self._refs[page] == 0:  # idle: it leaves the eviction order
                del self._idle[self._rank[page]][page]
                self._num_idle -= 1
                self._rank[page] = rank
            else:
                self._rank[page] = min(self._rank[page], rank)
            self._refs[page] += 1
        self._pages[seq_id] = list(pages)

    def publish(self, seq_id: Hashable, index: int, key: bytes, rank: int = 0) -> bool:
        """The sequence's page `index` is full and computed, its content named by `key`: cache it.
        False (nothing changes) when the page is cached already or another page holds `key`
        (two equal prompts computed side by side: the second copy stays private)."""
        page = self._require(seq_id)[index]
        if page in self._key_of or key in self._page_of:
            return False
        self._key_of[page], self._page_of[key], self._rank[page] = key, page, rank
        return True

    def drop_cached(self) -> int:
        """Every idle cached page goes back to the free list (cached pages that sequences hold stay
        cached); returns how many."""
        pages = self._evict(self._num_idle)
        self._release(np.asarray(pages, dtype=np.int64))
        return len(pages)

    def _evict(self, n: int) -> list[int]:
        """`n` idle cached pages leave the cache (least urgent rank first, then least recently
        released), still off the free list: the caller hands them out or releases them."""
        out: list[int] = []
        for rank in sorted(self._idle, reverse=True):
            idle = self._idle[rank]
            while idle and len(out) < n:
                page, _ = idle.popitem(last=False)
                del self._page_of[self._key_of.pop(page)], self._rank[page]
                out.append(page)
        self._num_idle -= len(out)
        return out

    def _take(self, n: int) -> list[int]:
        """The `n` lowest free pages, marked used (the caller checked that `n` are free)."""
        low = self._low
        if n == 1 and low < self.num_pages and not self._used[low]:  # one page (a decode row's growth)
            self._used[low] = True
            self._num_free -= 1
            self._low = low + 1
            return [low]
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
        """The sequence gives all its pages back; returns how many it held. A page no sequence
        holds any more returns to the free list, or, if cached, waits idle for a later prompt.
        Freeing twice is refused."""
        if seq_id not in self._pages:
            raise KeyError(f"sequence {seq_id!r} holds no KV pages (unknown or already freed)")
        held = self._pages.pop(seq_id)
        if not held:
            return 0
        pages = np.asarray(held, dtype=np.int64)  # [pages], distinct within one sequence
        if not (self._refs[pages] > 0).all():
            raise AssertionError(f"pages {pages[self._refs[pages] <= 0].tolist()} of {seq_id!r} were not held")
        self._refs[pages] -= 1
        released = pages[self._refs[pages] == 0]
        if self._key_of:
            cached = np.fromiter((p in self._key_of for p in released.tolist()), dtype=bool, count=len(released))
            # The last page first, so that of one prompt's pages its tail is evicted before its head
            # (a later prompt can only use a page whose every predecessor is still cached).
            for page in reversed(released[cached].tolist()):
                self._idle.setdefault(self._rank[page], collections.OrderedDict())[page] = None
            self._num_idle += int(cached.sum())
            released = released[~cached]
        self._release(released)
        return len(held)

    def _release(self, pages: np.ndarray) -> None:
        """Pages (off the free list, held by nobody, not cached) go back to the free list."""
        if not len(pages):
            return
        if not self._used[pages].all():
            raise AssertionError(f"pages {pages[~self._used[pages]].tolist()} were already free")
        self._used[pages] = False
        self._num_free += len(pages)
        self._low = min(self._low, int(pages.min()))

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
