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
