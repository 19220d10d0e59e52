"""Lesson 10: model cache (LRU/LFU, warm-up), paged KV cache, prefix cache, block-table widget."""

import pytest
import torch
import torch.nn as nn

from lessons_lib.caching import (BlockAllocator, KVBlockPool, ModelCache, OutOfBlocksError,
                                 PagedSequenceCache, PrefixCache, block_hashes, contiguous_attention,
                                 paged_attention, prefill)
from lessons_lib.model import KVCache, ModelConfig, TinyLM
from lessons_lib.viz.kv_blocks import EXAMPLE_EVENTS, block_timeline, kv_blocks_widget

pytestmark = pytest.mark.lesson10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyLM(ModelConfig(n_layers=2)).eval()


# -- model cache ---------------------------------------------------------------------------
def _loader(sizes):
    def load(name):
        return nn.Linear(sizes[name], 1, bias=False)   # sizes[name] * 4 bytes
    return load


SIZES = {"a": 10, "b": 10, "c": 10, "d": 10}


def test_lru_evicts_the_least_recently_used():
    cache = ModelCache(_loader(SIZES), budget_bytes=120, policy="lru")   # room for three
    for name in ["a", "b", "c", "a", "d"]:
        cache.get(name)
    assert [e for e in cache.events if e[0] == "evict"] == [("evict", "b")]
    assert list(cache.entries) == ["c", "a", "d"] and (cache.hits, cache.misses) == (1, 4)


def test_lfu_evicts_the_least_frequently_used_ties_by_recency():
    cache = ModelCache(_loader(SIZES), budget_bytes=120, policy="lfu")
    for name in ["a", "a", "b", "b", "c", "d"]:   # c used once; d must evict c
        cache.get(name)
    assert ("evict", "c") in cache.events and set(cache.entries) == {"a", "b", "d"}
    cache.get("c")                               # d and c each once; d is older: d goes
    assert cache.events[-2:] == [("evict", "d"), ("load", "c")]


def test_warm_up_preloads_so_the_first_request_hits():
    cache = ModelCache(_loader(SIZES), budget_bytes=120)
    seconds = cache.warm_up(["a", "b"])
    assert len(seconds) == 2 and cache.misses == 0
    cache.get("a")
    assert (cache.hits, cache.misses) == (1, 0) and cache.used_bytes == 80


def test_bad_cache_settings_are_clear_errors():
    with pytest.raises(ValueError, match=r"budget_bytes=30 is not valid: expected at least 40 "
                                         r"\(smaller than model 'a' \(40 bytes\)\)"):
        ModelCache(_loader(SIZES), budget_bytes=30).get("a")
    with pytest.raises(ValueError, match=r"policy='fifo' is not valid: expected one of 'lru', 'lfu'"):
        ModelCache(_loader(SIZES), 100, policy="fifo")
    with pytest.raises(ValueError, match="budget_bytes=0"):
        ModelCache(_loader(SIZES), 0)


# -- block allocator -----------------------------------------------------------------------
def test_allocator_free_list_refcounts_and_out_of_blocks():
    alloc = BlockAllocator(3, 4)
    blocks = [alloc.allocate() for _ in range(3)]
    assert blocks == [0, 1, 2] and alloc.num_free == 0
    with pytest.raises(OutOfBlocksError, match="all 3 blocks of 4 tokens are in use"):
        alloc.allocate()
    alloc.incref(1)
    alloc.free(1)
    assert alloc.num_free == 0                   # still shared by one holder
    alloc.free(1)
    assert alloc.allocate() == 1
    alloc.free(0)
    with pytest.raises(ValueError, match="block=0 is not valid: expected an allocated block"):
        alloc.free(0)


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True])
def test_block_size_must_be_positive(block_size):
    with pytest.raises(ValueError, match="block_size=.* is not valid: expected an int >= 1 .tokens per block"):
        BlockAllocator(4, block_size)


# -- paged attention -------------------------------------------------------------------------
def test_paged_attention_equals_contiguous_attention():
    torch.manual_seed(5)
    n_kv, heads, d, seq, bs = 2, 4, 16, 37, 8
    k, v = torch.randn(1, n_kv, seq, d), torch.randn(1, n_kv, seq, d)
    q = torch.randn(1, heads, 5, d)
    pool_k, pool_v = torch.randn(20, bs, n_kv, d), torch.randn(20, bs, n_kv, d)   # garbage elsewhere
    table = [13, 2, 19, 7, 0]                    # scattered physical blocks
    for pos in range(seq):
        pool_k[table[pos // bs], pos % bs] = k[0, :, pos]
        pool_v[table[pos // bs], pos % bs] = v[0, :, pos]
    expected = contiguous_attention(q, k, v)
    assert torch.allclose(paged_attention(q, pool_k, pool_v, table, seq), expected, atol=1e-6)


def test_the_tiny_lm_on_a_paged_cache_matches_the_contiguous_cache(model):
    ids = torch.randint(0, 256, (1, 21))
    pool = KVBlockPool.for_model(model.config, num_blocks=12, block_size=4)
    pool.allocator.allocate()                   # so the sequence's blocks are not 0, 1, 2, ...
    paged, contiguous = PagedSequenceCache(pool), KVCache(model.config.n_layers)
    with torch.no_grad():
        for chunk in (ids[:, :13], ids[:, 13:14], ids[:, 14:21]):
            mask = torch.ones(1, contiguous.seq_len + chunk.shape[1], dtype=torch.long)
            a = model(chunk, attention_mask=mask, cache=contiguous)
            b = model(chunk, attention_mask=mask, cache=paged)
            assert torch.allclose(a, b, atol=1e-5)
    assert paged.seq_len == 21 and len(paged.block_table) == 6 and 0 not in paged.block_table
    paged.free()
    assert pool.allocator.num_free == 11


# -- prefix cache ---------------------------------------------------------------------------
def test_block_hashes_chain_to_the_parent():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3                           # the partial last block has no hash
    b = block_hashes([9, 9, 3, 4], 2)
    assert a[1] != b[1]                          # same tokens, different prefix


def test_prefix_cache_shares_blocks_counts_references_and_evicts_lru_free_only():
    alloc = BlockAllocator(6, 2)
    pc = PrefixCache(alloc)
    seq_a = [alloc.allocate() for _ in range(3)]
    pc.register([1, 2, 3, 4, 5, 6], seq_a)
    blocks, n = pc.match([1, 2, 3, 4, 9, 9])       # shares the first two blocks
    assert (blocks, n) == (seq_a[:2], 4) and alloc.ref_counts[seq_a[0]] == 2
    pc.release(seq_a)                              # a finishes: block 2 free but still cached
    assert alloc.ref_counts[seq_a[0]] == 1 and alloc.ref_counts[seq_a[2]] == 0
    assert pc.num_cached == 3
    # Three never-cached blocks are used before any cached one is evicted.
    fresh = [pc.allocate() for _ in range(3)]
    assert set(fresh) == {3, 4, 5} and pc.evictions == 0
    assert pc.allocate() == seq_a[2] and pc.evictions == 1      # the only free cached block
    with pytest.raises(OutOfBlocksError):
        pc.allocate()                              # blocks 0 and 1 are in use: never evicted
    assert pc.num_cached == 2


def test_prefix_cache_evicts_the_least_recently_released_first():
    alloc = BlockAllocator(4, 1)
    pc = PrefixCache(alloc)
    x, y = alloc.allocate(), alloc.allocate()
    pc.register([7, 0], [x])
    pc.register([8, 0], [y])
    [alloc.allocate() for _ in range(2)]
    pc.release([y])
    pc.release([x])                                # released later: used more recently
    assert pc.allocate() == y


def test_prefill_with_a_shared_system_prompt_reuses_blocks_and_gives_the_same_logits(model):
    system = list(range(40, 80))
    a, b = [256] + system + [1, 2, 3], [256] + system + [9, 8]
    pool = KVBlockPool.for_model(model.config, num_blocks=16, block_size=8)
    pc = PrefixCache(pool.allocator)
    _, seq_a, reused_a = prefill(model, a, pool, pc)
    logits_b, seq_b, reused_b = prefill(model, b, pool, pc)
    assert reused_a == 0 and reused_b == 40       # 41 shared tokens = 5 full blocks of 8
    assert seq_b.block_table[:5] == seq_a.block_table[:5]
    with torch.no_grad():
        full = model(torch.tensor([b]))
    assert torch.allclose(logits_b, full[:, reused_b:], atol=1e-5)


# -- a refused operation leaves the pool as it was ----------------------------------------------
def _state(allocator, prefix_cache=None):
    cached = None if prefix_cache is None else dict(prefix_cache.block_of)
    return list(allocator.free_blocks), list(allocator.ref_counts), cached


@pytest.mark.parametrize("use_prefix_cache", [False, True])
def test_prefill_too_long_for_the_pool_takes_nothing_and_the_next_request_runs(model, use_prefix_cache):
    pool = KVBlockPool.for_model(model.config, num_blocks=4, block_size=4)
    pc = PrefixCache(pool.allocator) if use_prefix_cache else None
    _, held, _ = prefill(model, [256, 1, 2, 3, 4], pool, pc)        # 2 blocks held
    before = _state(pool.allocator, pc)
    with pytest.raises(OutOfBlocksError, match=r"needs [34] new blocks .* only 2 of 4 are free"):
        prefill(model, [256, 1, 2, 3] + [9] * 9, pool, pc)          # 4 blocks (1 shared) > 2 free
    assert _state(pool.allocator, pc) == before
    _, seq, _ = prefill(model, [256], pool, pc)                     # the next one-token request
    assert len(seq.block_table) == 1 and pool.allocator.num_free == 1


def test_prefill_returns_every_block_when_the_model_fails(model):
    pool = KVBlockPool.for_model(model.config, num_blocks=8, block_size=4)
    pc = PrefixCache(pool.allocator)
    _, seq, _ = prefill(model, list(range(9)), pool, pc)
    pc.release(seq.block_table)
    before = _state(pool.allocator)

    def failing(ids, **kwargs):
        model(ids, **kwargs)                    # blocks are allocated and written, then:
        raise RuntimeError("the model failed")
    failing.config = model.config
    with pytest.raises(RuntimeError, match="the model failed"):
        prefill(failing, list(range(9)) + [5] * 6, pool, pc)
    free, refs, _ = _state(pool.allocator)
    assert sorted(free) == sorted(before[0]) and refs == before[1]


def test_paged_cache_that_outgrows_the_pool_takes_no_block(model):
    pool = KVBlockPool.for_model(model.config, num_blocks=2, block_size=4)
    seq = PagedSequenceCache(pool)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=seq)
        with pytest.raises(OutOfBlocksError, match="need 2 more blocks"):
            model(torch.tensor([[4] * 9]), cache=seq)
    assert seq.block_table == [0] and pool.allocator.num_free == 1 and seq.seq_len == 3


def test_release_of_a_bad_table_frees_nothing():
    alloc = BlockAllocator(4, 2)
    pc = PrefixCache(alloc)
    table = [alloc.allocate(), alloc.allocate()]
    before = _state(alloc, pc)
    for bad_table in ([table[0], table[0]], [table[1], 3], [table[0], 99], [table[0], "1"]):
        with pytest.raises(ValueError, match="block"):
            pc.release(bad_table)
        assert _state(alloc, pc) == before


def test_a_failed_load_leaves_the_model_cache_as_it_was():
    cache = ModelCache(_loader(dict(SIZES, big=31)), budget_bytes=120)    # big: 124 bytes
    for name in "abc":
        cache.get(name)

    def snapshot():
        return list(cache.entries), dict(cache.counts), list(cache.events), cache.hits, cache.misses

    before = snapshot()
    with pytest.raises(ValueError, match="budget_bytes=120"):
        cache.get("big")
    with pytest.raises(KeyError):
        cache.get("missing")                    # the loader raises
    assert snapshot() == before


# -- the widget ----------------------------------------------------------------------------
def test_block_timeline_replays_the_events():
    snaps = block_timeline(EXAMPLE_EVENTS, num_blocks=16, block_size=8)
    assert len(snaps) == len(EXAMPLE_EVENTS)
    assert snaps[0]["tables"] == {"A": [0, 1, 2]} and snaps[0]["fill"][:3] == [8, 8, 4]
    finish_a = next(s for s in snaps if s["label"] == "finish A")
    assert "A" not in finish_a["tables"] and finish_a["free"] == 9
    with pytest.raises(OutOfBlocksError, match="event 1"):
        block_timeline([("arrive", "A", 8), ("arrive", "B", 9)], num_blocks=2, block_size=8)
    with pytest.raises(ValueError, match=r"events\[0\] kind='leave' is not valid: expected one of"):
        block_timeline([("leave", "A")])


def test_widget_slider_redraws_the_chosen_step():
    import matplotlib
    matplotlib.use("Agg")
    box = kv_blocks_widget()
    assert box.data["step"] == 0
    box.controls["event"].value = 5
    assert box.data == block_timeline(EXAMPLE_EVENTS)[5] and box.data["label"] == "finish A"
