"""The engine's KV memory: one allocator, a block table per request, prefix caching.

vLLM's design at teaching size. The pool's blocks are handed out by one
:class:`~lessons_lib.caching.paged_kv.BlockAllocator` (a free list and a reference count per
block). Each request owns a *block table*: its logical block i lives in physical block
``table[i]``. With prefix caching, every full block is also filed under the chained hash of the
tokens up to its end (:func:`~lessons_lib.caching.prefix_cache.block_hashes`), so a later
request with the same prefix shares those blocks instead of computing them. A freed block keeps
its contents and hash until its memory is needed; eviction takes the least recently freed one,
and a request's blocks are freed tail first so a prefix loses its end before its start.

Every method that can fail checks first and changes nothing: a request that cannot get its
blocks this step leaves the pool exactly as it found it.
"""

from __future__ import annotations

from ..caching.paged_kv import BlockAllocator, blocks_needed
from ..caching.prefix_cache import PrefixCache
from .request import Request


class BlockManager:
    """Block tables over one allocator, with optional prefix caching."""

    def __init__(self, allocator: BlockAllocator, enable_prefix_caching: bool = True) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.prefix_cache = PrefixCache(allocator) if enable_prefix_caching else None
        self.block_tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}     # full blocks already filed under a hash
        self.num_cached_tokens = 0                      # prompt tokens served from the cache, in all
        self.num_queried_tokens = 0                     # prompt tokens looked up, in all

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of the pool's blocks held by requests (cached free blocks count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens found in the cache over prompt tokens looked up (0 before any lookup)."""
        return self.num_cached_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def block_table(self, request_id: str) -> list[int]:
        return list(self.block_tables.get(request_id, []))

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The cached blocks of the longest cached prefix of the request's tokens (nothing is taken)."""
        if self.prefix_cache is None:
            return []
        return self.prefix_cache.lookup(request.all_token_ids, request.cache_salt)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens; False (nothing taken) if they do not fit.

        ``computed_blocks`` (from :meth:`get_computed_blocks`, for a request being admitted) are
        shared first: a cached block nobody holds leaves the free list, so it counts against the
        free blocks too.
        """
        computed_blocks = computed_blocks or []
        table = self.block_tables.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        missing = (blocks_needed(num_computed + num_new_tokens, self.block_size)
                   - len(table) - len(computed_blocks))
        unheld = sum(self.allocator.ref_counts[b] == 0 for b in computed_blocks)
        if missing > self.allocator.num_free - unheld:
            return False
        table = self.block_tables.setdefault(request.request_id, table)
        if computed_blocks:
            shared, _ = self.prefix_cache.match(request.all_token_ids, request.cache_salt)
            table.extend(shared)
        allocate = self.prefix_cache.allocate if self.prefix_cache is not None else self.allocator.allocate
        for _ in range(max(0, missing)):
            table.append(allocate())
        return True

    def note_lookup(self, request: Request, num_cached: int) -> None:
        """Count one admission's prompt tokens and how many of them came from the cache."""
        self.num_queried_tokens += len(request.prompt_token_ids)
        self.num_cached_tokens += min(num_cached, len(request.prompt_token_ids))

    def cache_full_blocks(self, request: Request) -> None:
        """File the request's newly filled blocks under their hashes, for later requests to share."""
        if self.prefix_cache is None:
            return
        full = request.num_computed_tokens // self.block_size
        if full > self._num_registered.get(request.request_id, 0):
            tokens = request.all_token_ids[:full * self.block_size]
            self.prefix_cache.register(tokens, self.block_tables[request.request_id], request.cache_salt)
            self._num_registered[request.request_id] = full

    def free(self, request: Request) -> None:
        """Return the request's blocks (shared ones lose a reference), tail first."""
        table = self.block_tables.pop(request.request_id, [])
        self._num_registered.pop(request.request_id, None)
        if self.prefix_cache is not None:
            self.prefix_cache.release(table)
        else:
            self.allocator.free_all(list(reversed(table)))
