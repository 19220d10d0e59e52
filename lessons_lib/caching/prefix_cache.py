"""Prefix caching: reuse the KV blocks of a prompt prefix that was already computed.

Chat and agent traffic repeats itself: every request of an application starts
with the same system prompt, and every turn of a conversation starts with the
previous turns. Their keys and values are the same every time (a token's K/V
depend only on the tokens before it), so computing them again is waste.

vLLM's automatic prefix caching identifies each *full* block by a hash of its
tokens chained to the hash of the block before it: equal hashes mean equal
prefixes, not just equal blocks. A new request looks up its blocks' hashes in
order, shares every block found (its reference count goes up) and prefills only
the tokens after them. When a request finishes its blocks are released, but a
released block keeps its contents and its hash until the memory is needed:
eviction takes free blocks only, least recently used first, so a block in use is
never evicted.
"""

from __future__ import annotations

import hashlib
import sys
from collections import deque

import torch

from ..validate import bad, check_int, check_token_ids
from .paged_kv import BlockAllocator, KVBlockPool, OutOfBlocksError, PagedSequenceCache, blocks_needed

def block_hashes(tokens, block_size: int = 16, salt: bytes | str = b"") -> list[str]:
    """Chained SHA-256 of each *full* block: hash i covers tokens[0 : (i+1)*block_size].

    Chaining makes a block's hash depend on everything before it, so equal hashes mean equal
    prefixes, as in vLLM's prefix caching. A partial last block has no hash: its keys and values
    are still being written. ``salt`` starts the chain, so equal tokens under different salts never
    share a block (vLLM's ``cache_salt``, one per tenant: lesson 08).

    The library's one block hash: the engine's block manager, the prefix cache, the routers'
    prefix-affinity policies and the simulator all call it.
    """
    check_int("block_size", block_size, low=1)
    if isinstance(salt, str):
        salt = salt.encode()
    if not isinstance(salt, bytes):
        raise bad("salt", salt, "bytes or a str (for example a tenant's name)")
    out, h = [], hashlib.sha256(salt).digest()
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = ",".join(str(int(t)) for t in tokens[start:start + block_size]).encode()
        h = hashlib.sha256(h + block).digest()
        out.append(h.hex())
    return out


class PrefixCache:
    """Block hashes over a :class:`BlockAllocator`, with LRU eviction of free cached blocks."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.block_of: dict[str, int] = {}     # hash -> physical block
        self.hash_of: dict[int, str] = {}      # physical block -> hash
        self.hits = self.misses = self.evictions = 0
        # ("stored" | "removed", block hash) in order: what a KV-aware router learns of this cache.
        # Bounded, so a cache nobody drains does not grow without end.
        self.events: deque[tuple[str, str]] = deque(maxlen=1 << 16)

    def allocate(self) -> int:
        """A block for new tokens: a never-cached free block if any, else evict the LRU free cached one."""
        free = self.allocator.free_blocks
        # The free list is in release order, so its first cached block is the least recently used.
        for block in free:
            if block not in self.hash_of:
                self.allocator.take(block)
                return block
        block = self.allocator.allocate()        # raises OutOfBlocksError when nothing is free
        if block in self.hash_of:
            digest = self.hash_of.pop(block)
            del self.block_of[digest]
            self.evictions += 1
            self.events.append(("removed", digest))
        return block

    def lookup(self, tokens: list[int], salt: bytes | str = b"") -> list[int]:
        """The cached blocks of the longest cached prefix of ``tokens``, without sharing them.

        The chain stops at the first block not cached: a prefix is reused only while
        every one of its blocks is still there. The last token is never covered, because
        the model must run on something to give the next-token logits.
        """
        blocks = []
        for digest in block_hashes(tokens[:len(tokens) - 1], self.block_size, salt):
            block = self.block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def match(self, tokens: list[int], salt: bytes | str = b"") -> tuple[list[int], int]:
        """Share the cached blocks of the longest cached prefix of ``tokens``.

        Returns ``(blocks, num_tokens)``; each block gains one reference.
        """
        blocks = self.lookup(tokens, salt)
        for block in blocks:
            if self.allocator.ref_counts[block] == 0:
                self.allocator.take(block)       # off the free list: no longer evictable
            else:
                self.allocator.incref(block)
        n_full = max(0, len(tokens) - 1) // self.block_size
        self.hits += len(blocks)
        self.misses += n_full - len(blocks)
        return blocks, len(blocks) * self.block_size

    def register(self, tokens: list[int], block_table: list[int], salt: bytes | str = b"") -> None:
        """Record the hashes of the full blocks of a computed sequence so later requests can share them."""
        for digest, block in zip(block_hashes(tokens, self.block_size, salt), block_table):
            if digest not in self.block_of and block not in self.hash_of:
                self.block_of[digest] = block
                self.hash_of[block] = digest
                self.events.append(("stored", digest))

    def release(self, block_table: list[int]) -> None:
        """A sequence is done: drop its references; cached blocks stay until evicted.

        The blocks go back to the free list tail first, as vLLM frees them: eviction takes the
        least recently freed block, so a prefix loses its last block before its first. Freed head
        first, one eviction would take block 0 and leave every later block of the prefix cached
        but unreachable (a lookup stops at the first missing block).
        """
        self.allocator.free_all(list(reversed(block_table)))

    def drain_events(self) -> list[tuple[str, str]]:
        """The events since the last call (a worker publishes them with its heartbeat)."""
        events = list(self.events)
        self.events.clear()
        return events

    @property
    def num_cached(self) -> int:
        return len(self.hash_of)


def _prompt_ids(ids, vocab_size: int) -> list[int]:
    """``ids`` as a list of ints, refused with its name if it is not one prompt of valid ids."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise bad("ids", ids, "one prompt: a list of ints or a 1-D tensor",
                      f"got a tensor of shape {tuple(ids.shape)}")
        return check_token_ids("ids", ids, vocab_size).tolist()
    return [int(i) for i in check_token_ids("ids", ids, vocab_size)]


def prefill(model, ids: list[int], pool: KVBlockPool, prefix_cache: PrefixCache | None = None,
            ) -> tuple[torch.Tensor, PagedSequenceCache, int]:
    """Run the prompt ``ids`` through ``model`` into paged KV blocks, reusing cached prefix blocks.

    Returns ``(logits of the computed tokens, the sequence's cache, tokens reused)``.
    Only ``len(ids) - reused`` tokens go through the model.

    All or nothing: a prompt that does not fit the free blocks raises
    :class:`OutOfBlocksError` before any block is taken, and a failure inside the
    model returns every block this call took.
    """
    ids = _prompt_ids(ids, getattr(getattr(model, "config", None), "vocab_size", sys.maxsize))
    if prefix_cache is not None and prefix_cache.allocator is not pool.allocator:
        raise bad("prefix_cache", prefix_cache, "a PrefixCache over pool.allocator",
                  "its blocks must be this pool's blocks")
    allocator = pool.allocator
    shared = [] if prefix_cache is None else prefix_cache.lookup(ids)
    # Shared blocks nobody holds are on the free list: sharing them uses up free blocks too.
    available = allocator.num_free - sum(allocator.ref_counts[b] == 0 for b in shared)
    missing = blocks_needed(len(ids), pool.block_size) - len(shared)
    if missing > available:
        raise OutOfBlocksError(
            f"a prompt of {len(ids)} tokens needs {missing} new blocks of {pool.block_size} tokens "
            f"({len(shared)} shared from the prefix cache), but only {available} of "
            f"{allocator.num_blocks} are free: free a finished sequence, or make the pool larger")
    if prefix_cache is None:
        blocks, reused, allocate = [], 0, None
    else:
        (blocks, reused), allocate = prefix_cache.match(ids), prefix_cache.allocate
    seq = PagedSequenceCache(pool, blocks, reused, allocate=allocate)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids[reused:]]),
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long), cache=seq)
    except BaseException:
        seq.free()
        raise
    if prefix_cache is not None:
        prefix_cache.register(ids, seq.block_table)
    return logits, seq, reused
