"""The refcounted page allocator's prefix cache: keys, sharing, eviction, invariants."""

import pytest

from sunjax.paged import OutOfPages, PageAllocator, block_keys


def test_block_keys_chain_the_module_and_every_earlier_block():
    a = block_keys("fp-a", list(range(10)), 4)
    assert len(a) == 2  # the partial third block gets no key
    assert block_keys("fp-a", list(range(8)) + [99], 4) == a
    assert block_keys("fp-b", list(range(10)), 4)[0] != a[0]  # another prefill module
    changed = block_keys("fp-a", [7] + list(range(1, 10)), 4)
    assert changed[0] != a[0] and changed[1] != a[1]  # block 1 depends on block 0


def test_shared_pages_are_refcounted_and_freed_with_the_last_holder():
    alloc = PageAllocator(num_pages=16, page_size=4, max_pages_per_seq=8)
    keys = block_keys("fp", list(range(12)), 4)
    alloc.allocate("a", 13)  # 4 pages; blocks 0..2 full
    assert alloc.cache_blocks("a", keys) == 3
    alloc.check()
    hit = alloc.lookup(keys[:2])
    assert hit == list(alloc.pages("a")[:2])
    assert alloc.cost(10, hit) == 1  # held by "a": sharing them costs nothing
    alloc.allocate("b", 10, shared=hit)
    assert alloc.pages("b")[:2] == alloc.pages("a")[:2]
    alloc.check()
    alloc.free("a")
    alloc.check()
    assert alloc.num_cached == 3
    # block 2 is cached and held by nobody: it counts as free, and sharing it would pin it
    assert alloc.num_free == 15 - 3 - 1 + 1
    assert alloc.cost(13, alloc.lookup(keys)) == 1 + 1
    alloc.free("b")
    assert alloc.num_used == 0 and alloc.num_free == alloc.capacity
    alloc.check()
    assert alloc.clear_cache() == 3
    alloc.check()
    assert len(alloc._free) == alloc.capacity


def test_eviction_takes_least_recently_used_unheld_blocks():
    alloc = PageAllocator(num_pages=9, page_size=4, max_pages_per_seq=8)  # 8 pages
    ka, kb = block_keys("fp", [1] * 8, 4), block_keys("fp", [2] * 8, 4)
    for seq, keys in (("a", ka), ("b", kb)):
        alloc.allocate(seq, 8)
        alloc.cache_blocks(seq, keys)
        alloc.free(seq)
    assert alloc.num_free == 8 and alloc.num_cached == 4
    alloc.lookup(ka)  # "a" used more recently than "b"
    held = alloc.allocate("c", 4 * 5)  # 5 pages: 4 free + 1 evicted
    assert len(held) == 5 and alloc.evictions == 1
    assert len(alloc.peek(kb)) == 1 and len(alloc.peek(ka)) == 2  # b's chain, from its end
    alloc.check()
    alloc.allocate("d", 4 * 2)  # the rest of b, then a's last block
    assert alloc.evictions == 3 and len(alloc.peek(ka)) == 1 and not alloc.peek(kb)
    alloc.check()
    with pytest.raises(OutOfPages):
        alloc.allocate("e", 4 * 2)
    alloc.check()
    assert alloc.num_free == 1


def test_sharing_a_page_that_is_not_a_cached_block_is_refused():
    alloc = PageAllocator(num_pages=8, page_size=4, max_pages_per_seq=4)
    alloc.allocate("a", 8)
    with pytest.raises(ValueError, match="not cached block 0"):
        alloc.allocate("b", 8, shared=alloc.pages("a")[:1])
    alloc.check()


def test_check_catches_wrong_sharing_and_refcounts():
    def fresh():
        alloc = PageAllocator(num_pages=16, page_size=4, max_pages_per_seq=8)
        keys = block_keys("fp", list(range(8)), 4)
        alloc.allocate("a", 9)
        alloc.cache_blocks("a", keys)
        alloc.allocate("b", 9, shared=alloc.lookup(keys))
        alloc.check()
        return alloc

    corruptions = {
        "reference counts": lambda a: a._refs.__setitem__(a._pages["a"][0], 9),
        "belongs to": lambda a: a._pages["b"].__setitem__(2, a._pages["a"][2]),
        "is not block": lambda a: a._pages["b"].reverse(),
        "evictable": lambda a: setattr(a, "_evictable", 5),
    }
    for message, corrupt in corruptions.items():
        alloc = fresh()
        corrupt(alloc)
        with pytest.raises(RuntimeError, match=message):
            alloc.check()
