"""The prefix cache's bookkeeping alone: longest-prefix lookup, LRU by bytes, superseded
entries dropped, every dropped value released."""

from __future__ import annotations

from gpt2cli.serve.prefix_cache import PrefixCache, common_prefix


def make(budget: int) -> tuple[PrefixCache, list]:
    released = []
    return PrefixCache(budget, release=released.append), released


def test_lookup_finds_the_longest_shared_prefix():
    cache, _ = make(100)
    cache.add([1, 2, 3, 4], "a", 10)
    cache.add([1, 2, 9], "b", 10)
    entry, n = cache.lookup([1, 2, 3, 7, 8])
    assert (entry.value, n) == ("a", 3)
    entry, n = cache.lookup([1, 2, 9, 9])
    assert (entry.value, n) == ("b", 3)
    assert cache.lookup([5, 1, 2]) == (None, 0)


def test_least_recently_used_goes_first_and_is_released():
    cache, released = make(30)
    for value, tokens in (("a", [1]), ("b", [2]), ("c", [3])):
        cache.add(tokens, value, 10)
    cache.lookup([1, 5])  # "a" is used: "b" is now the oldest
    cache.add([4], "d", 10)
    assert released == ["b"]
    assert cache.nbytes == 30 and cache.entries == 3
    cache.add([5], "e", 25)  # needs room for 25 of 30: three go
    assert released == ["b", "c", "a", "d"]
    assert cache.nbytes == 25 <= cache.budget


def test_an_entry_extended_by_a_new_one_is_dropped():
    cache, released = make(100)
    cache.add([1, 2], "turn 1", 10)
    assert cache.covered([1]) and cache.covered([1, 2]) and not cache.covered([1, 2, 3])
    cache.add([1, 2, 3, 4], "turn 2", 20)
    assert released == ["turn 1"] and cache.entries == 1 and cache.nbytes == 20


def test_fits_refuses_what_the_budget_cannot_hold():
    cache, _ = make(10)
    assert cache.fits(10) and not cache.fits(11)
    assert not PrefixCache(0).fits(1)


def test_clear_releases_everything():
    cache, released = make(100)
    cache.add([1], "a", 10)
    cache.add([2], "b", 10)
    cache.clear()
    assert sorted(released) == ["a", "b"] and cache.nbytes == 0 and cache.entries == 0


def test_common_prefix():
    import numpy as np

    a = np.array([1, 2, 3], np.int32)
    assert common_prefix(a, np.array([1, 2, 3, 4], np.int32)) == 3
    assert common_prefix(a, np.array([1, 5], np.int32)) == 1
    assert common_prefix(a, np.array([], np.int32)) == 0
