"""PageAllocator: the host-side free list and per-sequence page lists of the paged KV cache."""

import numpy as np
import pytest

from nitsum_jax.kv import OutOfPages, PageAllocator


def test_reserving_a_new_sequence_allocates_ceil_tokens_over_page_size_pages():
    alloc = PageAllocator(num_pages=10, page_size=4)

    new = alloc.reserve("a", 9)  # 9 tokens -> 3 pages of 4

    assert len(new) == 3
    assert alloc.pages("a") == new
    assert len(set(new)) == 3
    assert all(0 <= p < 10 for p in new)
    assert alloc.capacity("a") == 12
    assert alloc.num_free == 7
    assert alloc.num_used == 3
    assert "a" in alloc and "b" not in alloc


def test_growing_a_sequence_allocates_only_the_missing_pages_and_keeps_the_old_ones():
    alloc = PageAllocator(num_pages=10, page_size=4)
    first = alloc.reserve("a", 5)  # 2 pages

    grown = alloc.reserve("a", 13)  # 4 pages in all: 2 more

    assert len(grown) == 2
    assert not set(grown) & set(first)
    assert alloc.pages("a") == first + grown
    assert alloc.num_free == 6


def test_reserving_no_more_than_already_held_allocates_nothing():
    alloc = PageAllocator(num_pages=10, page_size=4)
    held = alloc.reserve("a", 8)

    assert alloc.reserve("a", 8) == []
    assert alloc.reserve("a", 3) == []  # never shrinks
    assert alloc.pages("a") == held
    assert alloc.num_free == 8


def test_page_table_pads_short_rows_with_page_zero_and_fills_idle_rows_with_zero():
    alloc = PageAllocator(num_pages=10, page_size=4)
    alloc.reserve("filler", 4)  # takes page 0 so real pages are non-zero and padding shows
    a = alloc.reserve("a", 12)  # 3 pages
    b = alloc.reserve("b", 4)  # 1 page

    table = alloc.page_table(["a", None, "b"], pages_per_seq=5)

    assert table.dtype == np.int32
    assert table.shape == (3, 5)
    np.testing.assert_array_equal(table[0], a + [0, 0])
    np.testing.assert_array_equal(table[1], [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(table[2], b + [0, 0, 0, 0])
    assert 0 not in a + b


def test_page_table_truncates_pages_reserved_beyond_pages_per_seq():
    alloc = PageAllocator(num_pages=10, page_size=4)
    a = alloc.reserve("a", 16)  # 4 pages

    table = alloc.page_table(["a"], pages_per_seq=2)

    np.testing.assert_array_equal(table[0], a[:2])


def test_free_returns_every_page_to_the_free_list():
    alloc = PageAllocator(num_pages=8, page_size=2)
    alloc.reserve("a", 5)
    alloc.reserve("b", 4)
    b_pages = alloc.pages("b")

    assert alloc.free("a") == 3
    assert alloc.num_free == 6
    assert "a" not in alloc
    assert alloc.pages("b") == b_pages  # others untouched
    assert alloc.free("b") == 2
    assert alloc.num_free == alloc.num_pages == 8
    assert alloc.sequences == []


def test_freed_pages_are_handed_out_again():
    alloc = PageAllocator(num_pages=4, page_size=1)
    a = alloc.reserve("a", 4)
    alloc.free("a")

    b = alloc.reserve("b", 4)

    assert sorted(b) == sorted(a) == [0, 1, 2, 3]


def test_running_out_of_pages_raises_with_the_numbers_and_changes_nothing():
    alloc = PageAllocator(num_pages=6, page_size=4)
    other = alloc.reserve("other", 8)  # 2 pages
    mine = alloc.reserve("mine", 4)  # 1 page; 3 free

    with pytest.raises(OutOfPages) as info:
        alloc.reserve("mine", 20)  # 5 pages: needs 4 more, only 3 free

    msg = str(info.value)
    assert "'mine'" in msg
    assert "needs 4 more" in msg
    assert "20 tokens" in msg
    assert "page_size 4" in msg
    assert "3 of 6 are free" in msg
    assert alloc.pages("mine") == mine
    assert alloc.pages("other") == other
    assert alloc.num_free == 3
    # The allocator is still fully usable: exactly the free pages can still be taken.
    assert len(alloc.reserve("mine", 16)) == 3
    assert alloc.num_free == 0


def test_running_out_of_pages_for_a_new_sequence_does_not_register_it():
    alloc = PageAllocator(num_pages=2, page_size=4)

    with pytest.raises(OutOfPages, match=r"needs 3 more KV pages for 9 tokens"):
        alloc.reserve("new", 9)

    assert "new" not in alloc
    assert alloc.num_free == 2
    with pytest.raises(KeyError):
        alloc.pages("new")


def test_can_reserve_counts_pages_already_held():
    alloc = PageAllocator(num_pages=4, page_size=4)
    alloc.reserve("a", 8)  # 2 pages, 2 free

    assert alloc.can_reserve(16, "a")  # 4 pages, 2 held -> 2 more
    assert not alloc.can_reserve(20, "a")
    assert not alloc.can_reserve(16)  # a new sequence would need 4


def test_freeing_twice_raises_key_error_saying_already_freed():
    alloc = PageAllocator(num_pages=4, page_size=4)
    alloc.reserve("a", 4)
    alloc.free("a")

    with pytest.raises(KeyError, match="already freed"):
        alloc.free("a")
    assert alloc.num_free == 4


def test_freeing_an_unknown_sequence_raises_key_error():
    alloc = PageAllocator(num_pages=4, page_size=4)

    with pytest.raises(KeyError, match="'ghost'"):
        alloc.free("ghost")


@pytest.mark.parametrize("num_pages,page_size", [(0, 4), (4, 0), (-1, 4)])
def test_non_positive_sizes_are_refused(num_pages, page_size):
    with pytest.raises(ValueError):
        PageAllocator(num_pages, page_size)


def test_negative_token_count_is_refused():
    alloc = PageAllocator(num_pages=4, page_size=4)

    with pytest.raises(ValueError, match="num_tokens"):
        alloc.reserve("a", -1)


def test_random_reserve_and_free_never_give_one_page_to_two_sequences():
    rng = np.random.default_rng(20240601)
    alloc = PageAllocator(num_pages=32, page_size=4)
    tokens: dict[int, int] = {}  # our model of what each sequence asked for
    next_id = 0
    out_of_pages = 0

    for _ in range(600):
        action = rng.random()
        if action < 0.35 or not tokens:  # new sequence
            n = int(rng.integers(1, 40))
            before = alloc.num_free
            try:
                alloc.reserve(next_id, n)
                tokens[next_id] = n
            except OutOfPages:
                out_of_pages += 1
                assert next_id not in alloc and alloc.num_free == before
            next_id += 1
        elif action < 0.75:  # grow an existing one
            sid = int(rng.choice(list(tokens)))
            n = tokens[sid] + int(rng.integers(1, 24))
            held = alloc.pages(sid)
            try:
                new = alloc.reserve(sid, n)
                tokens[sid] = n
                assert alloc.pages(sid) == held + new
            except OutOfPages:
                out_of_pages += 1
                assert alloc.pages(sid) == held
        else:  # free one
            sid = int(rng.choice(list(tokens)))
            assert alloc.free(sid) == alloc.pages_for(tokens.pop(sid))

        owned = [alloc.pages(sid) for sid in alloc.sequences]
        flat = [p for pages in owned for p in pages]
        assert len(flat) == len(set(flat)), "a page is owned by two sequences"
        assert all(0 <= p < alloc.num_pages for p in flat)
        assert alloc.num_free + len(flat) == alloc.num_pages
        assert set(alloc.sequences) == set(tokens)
        for sid, n in tokens.items():
            assert len(alloc.pages(sid)) == alloc.pages_for(n)

    # The walk really exercised both the full and the out-of-pages paths.
    assert out_of_pages > 10
    for sid in list(tokens):
        alloc.free(sid)
    assert alloc.num_free == alloc.num_pages


def test_the_lowest_free_pages_go_first_so_a_sequence_reserved_at_once_gets_adjacent_pages():
    alloc = PageAllocator(num_pages=16, page_size=1)
    assert alloc.reserve("a", 4) == [0, 1, 2, 3]
    assert alloc.reserve("b", 3) == [4, 5, 6]
    alloc.free("a")
    assert alloc.reserve("c", 6) == [0, 1, 2, 3, 7, 8]  # the hole first, then on past "b"
    assert alloc.reserve("b", 4) == [9]  # growth takes the next free page
    alloc.free("c")
    alloc.free("b")
    assert alloc.reserve("d", 16) == list(range(16)) and alloc.num_free == 0


# -- cached pages: content keys, reference counts, eviction ----------------------------------
from hypothesis import settings as hsettings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

from nitsum_jax.pages import page_keys  # noqa: E402


def _cached_sequence(alloc, seq_id, tokens, rank=0, salt=None):
    """A sequence holding the pages of `tokens`, every full page published under its key."""
    keys = page_keys(tokens, alloc.page_size, salt)
    alloc.reserve(seq_id, len(tokens))
    for i, key in enumerate(keys):
        alloc.publish(seq_id, i, key, rank)
    return keys


def test_page_keys_of_two_prompts_agree_exactly_on_their_common_full_pages():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 1000, 22).tolist()
    b = a[:9] + [a[9] + 1] + a[10:]  # differs at token 9: page 2 of 4-token pages

    ka, kb = page_keys(a, 4), page_keys(b, 4)

    assert len(ka) == len(kb) == 5  # 22 tokens: 5 full pages, the partial sixth has no key
    assert ka[:2] == kb[:2]
    assert all(x != y for x, y in zip(ka[2:], kb[2:]))  # the chain carries the difference onwards
    assert len({*ka, *kb}) == 8


def test_page_keys_under_different_salts_share_nothing():
    tokens = np.random.default_rng(8).integers(0, 1000, 16).tolist()

    spaces = [page_keys(tokens, 4, salt) for salt in (None, "", "tenant-a", "tenant-b")]

    assert spaces[2] == page_keys(tokens, 4, "tenant-a")  # deterministic
    assert len({k for keys in spaces for k in keys}) == 16


def test_a_freed_sequences_published_pages_stay_cached_idle_and_count_as_free():
    alloc = PageAllocator(num_pages=8, page_size=4)
    tokens = np.random.default_rng(1).integers(0, 1000, 10).tolist()  # 2 full pages + 2 tokens
    keys = _cached_sequence(alloc, "a", tokens)

    assert alloc.free("a") == 3

    assert alloc.num_used == 0 and alloc.num_free == 8
    assert alloc.num_cached == 2 and alloc.num_keyed == 2
    assert len(alloc.match(keys)) == 2


def test_attached_cached_pages_are_shared_by_reference_count_and_stay_cached_while_held():
    alloc = PageAllocator(num_pages=8, page_size=4)
    keys = _cached_sequence(alloc, "a", np.random.default_rng(2).integers(0, 1000, 12).tolist())
    shared = alloc.match(keys[:2])

    alloc.attach("b", shared)
    alloc.reserve("b", 12)  # one page of its own after the two shared ones

    assert alloc.pages("b")[:2] == shared == alloc.pages("a")[:2]
    assert alloc.pages("b")[2] not in alloc.pages("a")
    assert [alloc.refs(p) for p in shared] == [2, 2]
    assert alloc.num_used == 4  # a shared page counts once
    alloc.free("a")
    assert [alloc.refs(p) for p in shared] == [1, 1] and alloc.num_cached == 1  # a's third page is idle
    alloc.free("b")
    assert alloc.num_used == 0 and alloc.num_cached == 3


def test_attaching_a_page_that_is_not_cached_or_to_a_live_sequence_is_refused():
    alloc = PageAllocator(num_pages=8, page_size=4)
    alloc.reserve("a", 8)

    with pytest.raises(ValueError, match="not cached"):
        alloc.attach("b", alloc.pages("a"))
    with pytest.raises(ValueError, match="already holds"):
        alloc.attach("a", [])


def test_publishing_a_key_another_page_holds_keeps_the_second_copy_private():
    alloc = PageAllocator(num_pages=8, page_size=4)
    tokens = np.random.default_rng(3).integers(0, 1000, 4).tolist()
    _cached_sequence(alloc, "a", tokens)

    alloc.reserve("b", 4)
    assert not alloc.publish("b", 0, page_keys(tokens, 4)[0])

    alloc.free("b")
    assert alloc.num_cached == 0 and alloc.num_keyed == 1  # b's copy went back to the free list


def test_reservations_take_the_free_list_first_then_evict_idle_pages_least_urgent_tier_first_then_lru():
    alloc = PageAllocator(num_pages=6, page_size=1)
    rng = np.random.default_rng(4)
    urgent = _cached_sequence(alloc, "urgent", rng.integers(0, 1000, 2).tolist(), rank=0)
    old_low = _cached_sequence(alloc, "old-low", rng.integers(0, 1000, 1).tolist(), rank=1)
    new_low = _cached_sequence(alloc, "new-low", rng.integers(0, 1000, 1).tolist(), rank=1)
    for seq in ("urgent", "old-low", "new-low"):
        alloc.free(seq)
    assert alloc.num_cached == 4 and alloc.num_free == 6

    alloc.reserve("x", 2)  # the two never-used pages: nothing evicted
    assert alloc.num_cached == 4
    alloc.reserve("y", 1)  # the least recently released page of the least urgent tier
    assert alloc.match(old_low) == [] and len(alloc.match(new_low)) == 1
    alloc.reserve("z", 2)  # then the other low page, then the urgent prompt's tail before its head
    assert alloc.match(new_low) == [] and len(alloc.match(urgent)) == 1
    assert alloc.num_free == 1


def test_eviction_under_pressure_never_takes_a_page_a_sequence_holds():
    alloc = PageAllocator(num_pages=4, page_size=2)
    keys = _cached_sequence(alloc, "a", [5, 6, 7, 8])
    held = alloc.pages("a")
    alloc.reserve("b", 4)

    with pytest.raises(OutOfPages, match="0 of 4 are free"):
        alloc.reserve("c", 1)

    assert alloc.pages("a") == held and alloc.match(keys) == held
    alloc.free("b")
    assert alloc.drop_cached() == 0  # a's cached pages are held: not dropped
    assert alloc.match(keys) == held


def test_idle_cached_pages_can_be_dropped_to_zero():
    alloc = PageAllocator(num_pages=8, page_size=2)
    keys = _cached_sequence(alloc, "a", list(range(11)))
    alloc.free("a")

    assert alloc.drop_cached() == 5

    assert alloc.num_cached == alloc.num_keyed == 0 and alloc.match(keys) == []
    assert alloc.reserve("all", 16) == list(range(8))  # every page is on the free list again


class CachingAllocatorMachine(RuleBasedStateMachine):
    """Random reserve, attach, publish, free and drop against a model of who holds what."""

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(num_pages=12, page_size=2)
        self.held: dict[int, list[int]] = {}  # model: sequence -> its page ids, as handed out
        self.prompts: dict[int, list[bytes]] = {}  # sequence -> keys of its prompt
        self.next_id = 0

    @rule(prefix=st.integers(0, 3), length=st.integers(1, 9), variant=st.integers(0, 2),
          rank=st.integers(0, 2), use_cache=st.booleans())
    def admit(self, prefix, length, variant, rank, use_cache):
        tokens = [1, 2, 3, 4, 5, 6][:2 * prefix] + [100 * variant + i for i in range(length)]
        keys = page_keys(tokens, 2)
        sid, self.next_id = self.next_id, self.next_id + 1
        cached = self.alloc.match(keys[:(len(tokens) - 1) // 2]) if use_cache else []
        if cached:
            self.alloc.attach(sid, cached, rank)
        try:
            self.alloc.reserve(sid, len(tokens))
        except OutOfPages:
            if cached:
                self.alloc.free(sid)
            return
        self.held[sid], self.prompts[sid] = self.alloc.pages(sid), keys
        assert self.held[sid][:len(cached)] == cached

    @rule(data=st.data())
    def publish(self, data):
        if self.held:
            sid = data.draw(st.sampled_from(sorted(self.held)))
            for i, key in enumerate(self.prompts[sid]):
                self.alloc.publish(sid, i, key)

    @rule(data=st.data(), more=st.integers(1, 4))
    def grow(self, data, more):
        if self.held:
            sid = data.draw(st.sampled_from(sorted(self.held)))
            try:
                self.held[sid] += self.alloc.reserve(sid, self.alloc.capacity(sid) + more)
            except OutOfPages:
                pass

    @rule(data=st.data())
    def free(self, data):
        if self.held:
            sid = data.draw(st.sampled_from(sorted(self.held)))
            assert self.alloc.free(sid) == len(self.held.pop(sid))

    @rule()
    def drop(self):
        self.alloc.drop_cached()
        assert self.alloc.num_cached == 0

    @invariant()
    def pages_of_live_sequences_are_never_taken_and_counts_add_up(self):
        alloc = self.alloc
        holders: dict[int, int] = {}
        for sid, pages in self.held.items():
            assert alloc.pages(sid) == pages  # eviction never touched a held page
            for p in pages:
                holders[p] = holders.get(p, 0) + 1
        assert all(alloc.refs(p) == holders.get(p, 0) for p in range(alloc.num_pages))
        assert alloc.num_used == len(holders)
        assert alloc.num_free + alloc.num_used == alloc.num_pages
        assert 0 <= alloc.num_cached <= alloc.num_keyed

    def teardown(self):
        for sid in list(self.held):
            self.alloc.free(sid)
        self.alloc.drop_cached()
        assert self.alloc.num_free == self.alloc.num_pages and self.alloc.num_keyed == 0
        assert self.alloc.reserve("everything", 24) == list(range(12))


TestCachingAllocatorMachine = CachingAllocatorMachine.TestCase
TestCachingAllocatorMachine.settings = hsettings(max_examples=60, stateful_step_count=30, deadline=None)
