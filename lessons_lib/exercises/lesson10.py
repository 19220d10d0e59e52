"""Checkers for notebook 10 (caching): an LRU cache and a KV block allocator."""

from collections import OrderedDict

from .check import Incorrect, exercise


@exercise("10.lru_cache", "a least-recently-used cache with a capacity")
def check_lru_cache(candidate):
    cache = candidate(2)
    reference: OrderedDict = OrderedDict()
    steps = [("put", "a", 1), ("put", "b", 2), ("get", "a"), ("put", "c", 3), ("get", "b"),
             ("get", "c"), ("put", "a", 10), ("put", "d", 4), ("get", "c"), ("get", "a"),
             ("get", "d"), ("get", "zzz")]
    done = []
    for step in steps:
        done.append(step)
        if step[0] == "put":
            _, key, value = step
            cache.put(key, value)
            reference[key] = value
            reference.move_to_end(key)
            if len(reference) > 2:
                reference.popitem(last=False)
        else:
            key = step[1]
            expected = reference.get(key)
            if key in reference:
                reference.move_to_end(key)
            got = cache.get(key)
            if got != expected:
                trace = ", ".join(f"{s[0]}({', '.join(map(repr, s[1:]))})" for s in done)
                raise Incorrect(f"after {trace}: get({key!r}) returned {got!r}, expected {expected!r}. "
                                "A get counts as a use; the least recently used key goes when full")
    return "evicts the least recently used key, and a get refreshes a key"


@exercise("10.block_allocator", "a KV block allocator with a free list")
def check_block_allocator(candidate):
    alloc = candidate(4)
    got = [alloc.allocate() for _ in range(4)]
    if sorted(got) != [0, 1, 2, 3]:
        raise Incorrect(f"4 allocations from 4 blocks returned {got}; expected each id 0..3 once")
    try:
        extra = alloc.allocate()
    except RuntimeError:
        pass
    else:
        raise Incorrect(f"a fifth allocate() on 4 blocks returned {extra!r}; raise RuntimeError "
                        "(out of blocks) instead")
    alloc.free(got[2])
    again = alloc.allocate()
    if again != got[2]:
        raise Incorrect(f"after free({got[2]}) the only free block is {got[2]}, but allocate() "
                        f"returned {again!r}")
    alloc.free(got[0])
    try:
        alloc.free(got[0])
    except ValueError:
        pass
    else:
        raise Incorrect(f"freeing block {got[0]} twice must raise ValueError: a double free "
                        "would hand one block to two sequences")
    return "hands out each block once, reuses freed blocks, refuses double frees"
