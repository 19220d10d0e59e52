"""Lesson 10's exercises: the solution passes, a stub is not attempted, the library is refused, and
each plausible wrong answer earns the hint about its own mistake."""

import pytest

from exercise_catalogue import assert_correct, assert_hint, assert_not_attempted, assert_refused

pytestmark = pytest.mark.lesson10


def stub(*args):
    raise NotImplementedError()


# -- 10.paged_requests (predict) ------------------------------------------------------------
def predicted_right():
    per_token = 2 * 4 * 2 * 32 * 4                 # K and V, 4 layers, 2 KV heads, head_dim 32, float32
    blocks = 2 ** 20 // (16 * per_token)
    return blocks // -(-100 // 16)


def predicted_with_library():
    from lessons_lib.caching import blocks_needed
    return 32 // blocks_needed(100, 16)


@pytest.mark.parametrize("guess, fragments", [
    (5, ["whole blocks of 16 tokens", "refused"]),
    (9, ["half the bytes per token", "key and a value"]),
    (2, ["all 4 query heads", "2 KV heads"]),
    (18, ["one layer"]),
    (0, ["contiguous cache", "max_seq_len = 1024"]),
    (7, ["too high", "the measurement is 4 requests", "blocks one prompt holds"]),
])
def test_paged_requests_wrong_predictions(guess, fragments):
    assert_hint("10.paged_requests", lambda: guess, f"you predicted {guess} requests", *fragments)


def test_paged_requests_verdicts():
    assert_correct("10.paged_requests", predicted_right)
    assert_hint("10.paged_requests", lambda: None, "as a number")
    assert_not_attempted("10.paged_requests", stub)
    assert_refused("10.paged_requests", predicted_with_library, "blocks_needed")


# -- 10.prefix_blocks (build) ---------------------------------------------------------------
class PrefixBlocks:
    def __init__(self, num_blocks, block_size):
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.blank = list(range(num_blocks))
        self.cached_free = []
        self.block_of, self.hash_of = {}, {}

    def hashes(self, tokens):
        out, parent = [], None
        for end in range(self.block_size, len(tokens) + 1, self.block_size):
            parent = hash((parent, tuple(tokens[end - self.block_size:end])))
            out.append(parent)
        return out

    def lookup(self, tokens):
        shared = []
        for h in self.hashes(tokens[:-1]):
            if h not in self.block_of:
                break
            shared.append(self.block_of[h])
        return shared

    def admit(self, tokens):
        shared = self.lookup(tokens)
        need = -(-len(tokens) // self.block_size) - len(shared)
        idle = sum(self.refs[b] == 0 for b in shared)
        if need > self.available() - idle:
            raise RuntimeError("out of KV blocks")
        for b in shared:
            if self.refs[b] == 0:
                self.cached_free.remove(b)
            self.refs[b] += 1
        table = shared + self.take_blocks(need)
        for h, b in zip(self.hashes(tokens), table):
            if h not in self.block_of and b not in self.hash_of:
                self.block_of[h], self.hash_of[b] = b, h
        return table, len(shared) * self.block_size

    def available(self):
        return len(self.blank) + len(self.cached_free)

    def take_blocks(self, n):
        return [self.take() for _ in range(n)]

    def take(self):
        if self.blank:
            b = self.blank.pop(0)
        else:
            b = self.cached_free.pop(0)
            self.forget(b)
        self.refs[b] = 1
        return b

    def forget(self, b):
        del self.block_of[self.hash_of.pop(b)]

    def release(self, table):
        for b in reversed(table):
            self.drop(b)

    def drop(self, b):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            (self.cached_free if b in self.hash_of else self.blank).append(b)


class ReleasesHeadFirst(PrefixBlocks):
    def release(self, table):
        for b in table:
            self.drop(b)


class EvictsNewest(PrefixBlocks):
    def take(self):
        if self.blank:
            b = self.blank.pop(0)
        else:
            b = self.cached_free.pop()
            self.forget(b)
        self.refs[b] = 1
        return b


class EvictsCachedFirst(PrefixBlocks):
    def take(self):
        if self.cached_free:
            b = self.cached_free.pop(0)
            self.forget(b)
        else:
            b = self.blank.pop(0)
        self.refs[b] = 1
        return b


class LeaksOnRefusal(PrefixBlocks):
    def available(self):
        return len(self.refs)                        # no check up front: take until it fails

    def take(self):
        if not self.blank and not self.cached_free:
            raise RuntimeError("out of KV blocks")
        return super().take()


class NeverEvicts(PrefixBlocks):
    def available(self):
        return len(self.blank)


class UnchainedHashes(PrefixBlocks):
    def hashes(self, tokens):
        return [hash(tuple(tokens[end - self.block_size:end]))
                for end in range(self.block_size, len(tokens) + 1, self.block_size)]


class CoversLastToken(PrefixBlocks):
    def lookup(self, tokens):
        shared = []
        for h in self.hashes(tokens):
            if h not in self.block_of:
                break
            shared.append(self.block_of[h])
        return shared


class NoReferenceCounts(PrefixBlocks):
    def drop(self, b):
        if self.refs[b] > 0:
            self.refs[b] = 0
            (self.cached_free if b in self.hash_of else self.blank).append(b)


class KeepsHashOnEviction(PrefixBlocks):
    def forget(self, b):
        self.hash_of.pop(b)                          # the hash -> block entry stays behind


class SharesPartialBlocks(PrefixBlocks):
    def hashes(self, tokens):
        out, parent = [], None
        for start in range(0, len(tokens), self.block_size):
            parent = hash((parent, tuple(tokens[start:start + self.block_size])))
            out.append(parent)
        return out


class ReturnsSharedBlockCount(PrefixBlocks):
    def admit(self, tokens):
        table, reused = super().admit(tokens)
        return table, reused // self.block_size


class UsesLibraryHashes(PrefixBlocks):
    def hashes(self, tokens):
        from lessons_lib.caching import block_hashes
        return block_hashes(tokens, self.block_size)


@pytest.mark.parametrize("answer, fragments", [
    (ReleasesHeadFirst, ["admit(A2 = S + a + [2], 13 tokens): reused 0 tokens, expected 8",
                         "release a table tail first"]),
    (EvictsNewest, ["reused 12 tokens, expected 8", "released longest ago"]),
    (EvictsCachedFirst, ["admit(A2 = S + a + [2], 13 tokens): reused 4 tokens, expected 12",
                         "evicted cached blocks while blank ones were free"]),
    (LeaksOnRefusal, ["admit(X (13 tokens), 13 tokens) refused", "admit(Y (5 tokens), 5 tokens): "
                      "raised RuntimeError", "Likely cause: a refused admit must take nothing"]),
    (NeverEvicts, ["admit(D (20 tokens), 20 tokens): raised RuntimeError", "may be evicted"]),
    (UnchainedHashes, ["shared block", "as the K/V of tokens [30, 31, 32, 33] after",
                       "chain each block's hash"]),
    (CoversLastToken, ["admit(W = S (8 tokens), 8 tokens): reused 8 of its 8 tokens", "tokens[:-1]"]),
    (NoReferenceCounts, ["still holds it", "count a reference per holder"]),
    (KeepsHashOnEviction, ["but it now holds", "forget its old hash"]),
    (SharesPartialBlocks, ["admit(A' = A + [9], 14 tokens): reused 16 tokens", "only full blocks"]),
    (ReturnsSharedBlockCount, ["returned reused = 3, expected 12", "number of shared blocks"]),
])
def test_prefix_blocks_wrong_answers(answer, fragments):
    assert_hint("10.prefix_blocks", answer, *fragments)


def test_prefix_blocks_verdicts():
    assert_correct("10.prefix_blocks", PrefixBlocks)
    assert_not_attempted("10.prefix_blocks", stub)
    assert_refused("10.prefix_blocks", UsesLibraryHashes, "block_hashes")


# -- 10.append_kv (stretch) -----------------------------------------------------------------
def append_right(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    block_size = pool_k.shape[1]
    n = k.shape[0]
    missing = -(-(seq_len + n) // block_size) - len(block_table)
    if missing > allocator.num_free:
        raise RuntimeError(f"{missing} blocks needed, {allocator.num_free} free")
    for _ in range(missing):
        block_table.append(allocator.allocate())
    for i in range(n):
        pos = seq_len + i
        block, slot = block_table[pos // block_size], pos % block_size
        pool_k[block, slot] = k[i]
        pool_v[block, slot] = v[i]
    return seq_len + n


def append_as_given(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    block_size = pool_k.shape[1]
    n = k.shape[0]
    while len(block_table) < (seq_len + n) // block_size:
        block_table.append(allocator.allocate())
    for i in range(n):
        pos = seq_len + i
        block, slot = block_table[pos % block_size], pos // block_size
        pool_k[block, slot] = k[i]
        pool_v[block, slot] = v[i]
    return seq_len + n


def append_swapped(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    block_size = pool_k.shape[1]
    missing = -(-(seq_len + k.shape[0]) // block_size) - len(block_table)
    if missing > allocator.num_free:
        raise RuntimeError("out of blocks")
    block_table.extend(allocator.allocate() for _ in range(missing))
    for i in range(k.shape[0]):
        pos = seq_len + i
        pool_k[block_table[pos % block_size], pos // block_size] = k[i]
        pool_v[block_table[pos % block_size], pos // block_size] = v[i]
    return seq_len + k.shape[0]


def append_leaks(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    block_size = pool_k.shape[1]
    while len(block_table) < -(-(seq_len + k.shape[0]) // block_size):
        block_table.append(allocator.allocate())     # raises midway when the pool runs out
    for i in range(k.shape[0]):
        pos = seq_len + i
        pool_k[block_table[pos // block_size], pos % block_size] = k[i]
        pool_v[block_table[pos // block_size], pos % block_size] = v[i]
    return seq_len + k.shape[0]


def append_new_block_every_call(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    block_size = pool_k.shape[1]
    for _ in range(k.shape[0] // block_size + 1):
        block_table.append(allocator.allocate())
    for i in range(k.shape[0]):
        pos = seq_len + i
        pool_k[block_table[pos // block_size], pos % block_size] = k[i]
        pool_v[block_table[pos // block_size], pos % block_size] = v[i]
    return seq_len + k.shape[0]


def append_values_from_keys(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    return append_right(pool_k, pool_v, allocator, block_table, seq_len, k, k)


def append_ignoring_seq_len(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    block_size = pool_k.shape[1]
    missing = -(-(seq_len + k.shape[0]) // block_size) - len(block_table)
    if missing > allocator.num_free:
        raise RuntimeError("out of blocks")
    block_table.extend(allocator.allocate() for _ in range(missing))
    for i in range(k.shape[0]):
        pool_k[block_table[i // block_size], i % block_size] = k[i]
        pool_v[block_table[i // block_size], i % block_size] = v[i]
    return seq_len + k.shape[0]


def append_to_a_copy(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    return append_right(pool_k, pool_v, allocator, list(block_table), seq_len, k, v)


def append_through_library(pool_k, pool_v, allocator, block_table, seq_len, k, v):
    from lessons_lib.caching import PagedSequenceCache
    PagedSequenceCache
    return append_right(pool_k, pool_v, allocator, block_table, seq_len, k, v)


@pytest.mark.parametrize("answer, fragments", [
    (append_as_given, ["prefill of 6 tokens", "raised IndexError", "had 1 block for 6 tokens", "not floor"]),
    (append_swapped, ["raised IndexError", "is a block index", "table[pos // block_size]"]),
    (append_leaks, ["a pool with 1 block free", "left 1 block taken", "a leak"]),
    (append_new_block_every_call, ["decode into the partly filled block", "need 2 blocks",
                                   "had room for 2 more tokens"]),
    (append_values_from_keys, ["position 0", "pool_v holds its key"]),
    (append_ignoring_seq_len, ["decode into the partly filled block", "position 0",
                               "an earlier token was overwritten", "start at position seq_len"]),
    (append_to_a_copy, ["2 blocks taken from the allocator", "block_table is still []", "in place"]),
])
def test_append_kv_wrong_answers(answer, fragments):
    assert_hint("10.append_kv", answer, *fragments)


def test_append_kv_verdicts():
    assert_correct("10.append_kv", append_right)
    assert_not_attempted("10.append_kv", stub)
    assert_refused("10.append_kv", append_through_library, "PagedSequenceCache")
