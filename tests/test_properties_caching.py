"""Properties of the paged KV cache and the prefix cache under random operation sequences.

After every operation: free + used == total, reference counts are what the live sequences hold,
no block is both free and referenced; an operation that raises changes nothing; and a cached
prefix is matched only while all its blocks are there, holding the keys of exactly its tokens.
"""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lessons_lib.caching import BlockAllocator, KVBlockPool, OutOfBlocksError, PrefixCache, prefill
from lessons_lib.caching.prefix_cache import block_hashes

pytestmark = pytest.mark.lesson10

VOCAB = 4      # few distinct tokens, so prompts share prefixes often


class KeysAreTokens:
    """A one-layer stand-in for the model: the key written at each position is that position's token.

    prefill talks to a model only through ``model(ids, attention_mask=, cache=)``, so this exercises
    the same paths as the tiny LM, fast enough for hundreds of sequences, and makes stale blocks
    visible: a block's keys must be its tokens. ``fail`` raises after the keys were written.
    """

    config = SimpleNamespace(vocab_size=VOCAB)

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def __call__(self, ids, attention_mask=None, cache=None):
        keys = ids.float()[:, None, :, None].expand(-1, 1, -1, 2)      # (1, kv_heads=1, n, head_dim=2)
        cache[0].update(keys, keys)
        if self.fail:
            raise RuntimeError("the model failed")
        return torch.zeros(1, ids.shape[1], VOCAB)


def _snapshot(alloc: BlockAllocator, pc: PrefixCache):
    return list(alloc.free_blocks), list(alloc.ref_counts), dict(pc.block_of), dict(pc.hash_of)


class World:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.pool = KVBlockPool(num_blocks, block_size, n_layers=1, n_kv_heads=1, head_dim=2)
        self.alloc = self.pool.allocator
        self.pc = PrefixCache(self.alloc)
        self.live: list[tuple[list[int], object]] = []   # (tokens, PagedSequenceCache or a block list)
        self.prompts: list[list[int]] = []
        self.failures = 0

    # -- operations --------------------------------------------------------------------------------
    def prefill(self, tokens: list[int], fail: bool) -> None:
        _, seq, _ = prefill(KeysAreTokens(fail), tokens, self.pool, self.pc)
        self.live.append((list(tokens), seq))
        self.prompts.append(list(tokens))

    def grow(self, i: int, tokens: list[int]) -> None:
        held, seq = self.live[i % len(self.live)]
        if isinstance(seq, list):
            return                                             # a bare block has no sequence to grow
        KeysAreTokens()(torch.tensor([tokens]), cache=seq)
        held.extend(tokens)

    def release(self, i: int) -> None:
        _, seq = self.live[i % len(self.live)]
        self.pc.release(seq if isinstance(seq, list) else seq.block_table)
        self.live.pop(i % len(self.live))

    def release_twice(self, i: int) -> None:
        _, seq = self.live[i % len(self.live)]
        table = seq if isinstance(seq, list) else seq.block_table
        # One block listed once more than it has references (other sequences may share it too).
        self.pc.release(table + table[:1] * self.alloc.ref_counts[table[0]])

    def allocate(self) -> None:
        self.live.append(([], [self.pc.allocate()]))       # may evict the LRU free cached block

    def take(self, block: int) -> None:
        self.alloc.take(block)
        self.live.append(([], [block]))

    def run(self, op) -> None:
        name, *args = op
        if name in ("grow", "release", "release_twice") and not self.live:
            return
        before = _snapshot(self.alloc, self.pc)
        try:
            getattr(self, name)(*args)
        except (OutOfBlocksError, ValueError) as err:
            self.failures += 1
            assert _snapshot(self.alloc, self.pc) == before, f"{op} raised {err!r} and changed the pool"
        except RuntimeError:                                # the model failed after writing keys
            self.failures += 1
            free, refs, _, _ = before
            assert sorted(self.alloc.free_blocks) == sorted(free) and self.alloc.ref_counts == refs
        self.check()

    # -- invariants ----------------------------------------------------------------------------------
    def check(self) -> None:
        alloc, pc, bs = self.alloc, self.pc, self.pool.block_size
        free = list(alloc.free_blocks)
        held = Counter(b for _, seq in self.live for b in (seq if isinstance(seq, list) else seq.block_table))
        assert len(free) == len(set(free))
        assert set(free) == {b for b in range(alloc.num_blocks) if alloc.ref_counts[b] == 0}
        assert len(free) + sum(r > 0 for r in alloc.ref_counts) == alloc.num_blocks
        assert min(alloc.ref_counts) >= 0
        assert dict(held) == {b: r for b, r in enumerate(alloc.ref_counts) if r}
        assert all(pc.hash_of[b] == h for h, b in pc.block_of.items()) and len(pc.hash_of) == len(pc.block_of)
        for tokens, seq in self.live:                       # every sequence's blocks hold its own keys
            if not isinstance(seq, list) and seq.block_table:
                keys = self.pool.k[0][seq.block_table].flatten(0, 1)[:seq.seq_len, 0, 0]
                assert keys.tolist() == [float(t) for t in tokens]
        for tokens in self.prompts:
            hashes = block_hashes(tokens[:-1], bs)
            blocks = pc.lookup(tokens)
            present = next((i for i, h in enumerate(hashes) if h not in pc.block_of), len(hashes))
            assert len(blocks) == present                   # the chain stops at the first missing block
            for i, block in enumerate(blocks):
                assert pc.hash_of[block] == hashes[i]
                keys = self.pool.k[0][block, :, 0, 0].tolist()
                assert keys == [float(t) for t in tokens[i * bs:(i + 1) * bs]]


# Prompts start with one of a few "system prompts", so prefixes are shared (and evicted) often.
SYSTEM = [[], [1, 2, 3, 0], [1, 2, 3, 0, 2, 2, 1, 3], [3, 3, 3]]
tokens = st.builds(lambda system, rest: system + rest, st.sampled_from(SYSTEM),
                   st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5))
ops = st.lists(st.one_of(
    st.tuples(st.just("prefill"), tokens, st.sampled_from([False, False, True])),   # True: the model fails
    st.tuples(st.just("prefill"), tokens, st.just(False)),
    st.tuples(st.just("grow"), st.integers(0, 20), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("release"), st.integers(0, 20)),     # twice: finished sequences keep blocks cached
    st.tuples(st.just("release_twice"), st.integers(0, 20)),
    st.tuples(st.just("allocate")),
    st.tuples(st.just("take"), st.integers(-1, 9)),
), min_size=5, max_size=40)


# database=None: nothing is written to .hypothesis/, so a run leaves no files behind.
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 16), block_size=st.integers(1, 4), ops=ops)
def test_random_operations_keep_the_pool_consistent_and_failures_change_nothing(num_blocks, block_size, ops):
    world = World(num_blocks, block_size)
    for op in ops:
        world.run(op)


def test_the_generated_sequences_do_exercise_failures_and_reuse():
    # Guards the property test against testing nothing: one fixed sequence with each kind of event.
    world = World(6, 2)
    for op in [("prefill", [1, 2, 3, 0, 1], False), ("release", 0),
               ("prefill", [1, 2, 3, 0, 2], False),          # shares 2 blocks, takes 1 of 6
               ("prefill", [3] * 9, False),                  # 5 blocks > 3 free: refused
               ("prefill", [2, 2, 2], True),                 # the model fails after writing
               ("release_twice", 0), ("take", 9), ("take", 0),
               ("grow", 0, [1] * 8),                         # 4 more blocks > 3 free: refused
               ("allocate",), ("allocate",), ("allocate",), ("allocate",)]:
        world.run(op)
    assert world.failures == 7 and world.pc.hits == 2 and world.alloc.num_free == 0
