"""Paged KV cache: fixed-size blocks, a free list, and a block table per sequence.

A contiguous KV cache reserves ``max_seq_len`` slots per sequence up front, because
nobody knows how long an answer will be; most of that memory is never used, and
what is freed leaves holes. PagedAttention (vLLM, Kwon et al. 2023) borrows the
operating system's answer: cut the cache into blocks of ``block_size`` tokens,
hand a sequence one block at a time, and keep a *block table* mapping the
sequence's logical block i to a physical block anywhere in the pool. Waste is at
most one partly filled block per sequence, and blocks can be shared between
sequences (the prefix cache, ``prefix_cache.py``).

Attention then *gathers* each sequence's keys and values through its block table.
The gathered tensors hold the same numbers as a contiguous cache, so the
attention output is the same (``paged_attention`` vs ``contiguous_attention``).
"""

from __future__ import annotations

import math
from collections import Counter, deque

import torch

from ..validate import bad, check_int


class OutOfBlocksError(RuntimeError):
    """The pool has no free block left: a scheduler would now preempt or queue a request."""


def check_block_size(block_size: int) -> int:
    return check_int("block_size", block_size, low=1,
                     why="tokens per block, e.g. 16 as vLLM defaults to, or 8, 32")


class BlockAllocator:
    """Hands out physical block ids from a free list and counts references to each.

    A block with more than one reference is shared (two sequences with the same
    prefix); it returns to the free list when its last reference is dropped.
    Every method that raises checks first and changes nothing: a refused request
    must not leak blocks that the next request then lacks.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        check_int("num_blocks", num_blocks, low=1)
        check_block_size(block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))   # lowest ids first
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self) -> int:
        """A free block id, now referenced once."""
        if not self.free_blocks:
            raise OutOfBlocksError(f"all {self.num_blocks} blocks of {self.block_size} tokens are in "
                                   "use: free a finished sequence, or make the pool larger")
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def take(self, block: int) -> None:
        """Allocate one particular free block (a prefix-cache hit on a block nobody holds)."""
        self._check_id(block)
        if self.ref_counts[block] != 0:
            raise bad("block", block, "a free block", "it is in use; use incref to share it")
        self.free_blocks.remove(block)
        self.ref_counts[block] = 1

    def incref(self, block: int) -> None:
        self._check_held(block)
        self.ref_counts[block] += 1

    def free(self, block: int) -> None:
        """Drop one reference; the block is free again when none is left."""
        self._check_held(block)
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)

    def free_all(self, blocks: list[int]) -> None:
        """Drop one reference per entry of ``blocks``, all or none: every entry is checked first."""
        for block, times in Counter(self._check_id(b) for b in blocks).items():
            if self.ref_counts[block] < times:
                raise bad("blocks", blocks, "blocks in use, each listed at most as often as it is "
                          "referenced", f"block {block} is listed {times} times but has "
                          f"{self.ref_counts[block]} references")
        for block in blocks:
            self.free(block)

    def _check_id(self, block: int) -> int:
        return check_int("block", block, low=0, high=self.num_blocks - 1,
                         why=f"a block id of this pool of {self.num_blocks}")

    def _check_held(self, block: int) -> None:
        if self.ref_counts[self._check_id(block)] == 0:
            raise bad("block", block, "an allocated block",
                      "it is free: only blocks in use can be shared or freed")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
    check_int("num_tokens", num_tokens, low=0)
    return -(-num_tokens // check_block_size(block_size))


class KVBlockPool:
    """The physical KV memory: per layer, keys and values of ``num_blocks`` blocks.

    ``k[layer]`` and ``v[layer]`` are (num_blocks, block_size, n_kv_heads, head_dim).
    """

    def __init__(self, num_blocks: int, block_size: int, n_layers: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32) -> None:
        for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            check_int(name, value, low=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise bad("dtype", dtype, "a floating-point torch.dtype, e.g. torch.float32")
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int) -> "KVBlockPool":
        return cls(num_blocks, block_size, config.n_layers, config.n_kv_heads, config.head_dim)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def gather_kv(pool_k: torch.Tensor, pool_v: torch.Tensor, block_table: list[int],
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values, (1, n_kv_heads, seq_len, head_dim), read through its block table."""
    table = torch.tensor(block_table, dtype=torch.long)
    k = pool_k[table].flatten(0, 1)[:seq_len]        # (seq_len, n_kv_heads, head_dim)
    v = pool_v[table].flatten(0, 1)[:seq_len]
    return k.transpose(0, 1)[None], v.transpose(0, 1)[None]


def contiguous_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``q_len`` positions; q (1, H, q_len, d), k/v (1, H_kv, L, d)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_len, total = q.shape[2], k.shape[2]
    causal = torch.arange(total)[None, :] <= torch.arange(total - q_len, total)[:, None]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def paged_attention(q: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                    block_table: list[int], seq_len: int) -> torch.Tensor:
    """Attention whose keys and values are gathered from the pool through ``block_table``."""
    k, v = gather_kv(pool_k, pool_v, block_table, seq_len)
    return contiguous_attention(q, k, v)


class PagedSequenceCache:
    """One sequence's paged KV cache, with the interface the tiny LM expects of a cache.

    ``model(ids, ..., cache=seq_cache)`` works unchanged: each attention layer calls
    ``seq_cache[layer].update(k, v)``, which writes the new keys and values into
    the sequence's blocks (allocating blocks as it fills) and returns everything
    stored so far, gathered through the block table. Batch 1 only.
    """

    def __init__(self, pool: KVBlockPool, block_table: list[int] | None = None,
                 num_cached: int = 0, allocate=None) -> None:
        self.pool = pool
        self.block_table = list(block_table or [])
        check_int("num_cached", num_cached, low=0, high=len(self.block_table) * pool.block_size,
                  why=f"the tokens already in its {len(self.block_table)} blocks of {pool.block_size}")
        # Where a new block comes from: the allocator, or a prefix cache that may evict.
        self._allocate = allocate or pool.allocator.allocate
        self.layer_lens = [num_cached] * len(pool.k)

    @property
    def seq_len(self) -> int:
        return self.layer_lens[0]

    def __len__(self) -> int:
        return len(self.layer_lens)

    def __getitem__(self, layer: int) -> "_PagedLayerView":
        return _PagedLayerView(self, layer)

    def free(self) -> None:
        """Return every block of this sequence (shared blocks just lose a reference)."""
        self.pool.allocator.free_all(self.block_table)
        self.block_table = []

    def _grow(self, num_tokens: int) -> None:
        """Blocks for ``num_tokens`` tokens in all, or OutOfBlocksError with nothing taken."""
        missing = blocks_needed(num_tokens, self.pool.block_size) - len(self.block_table)
        allocator = self.pool.allocator
        if missing > allocator.num_free:
            raise OutOfBlocksError(
                f"{num_tokens} tokens need {missing} more blocks of {self.pool.block_size} tokens, but "
                f"only {allocator.num_free} of {allocator.num_blocks} are free: free a finished "
                "sequence, or make the pool larger")
        taken = []
        try:
            for _ in range(missing):
                taken.append(self._allocate())
        except BaseException:
            allocator.free_all(taken)
            raise
        self.block_table += taken

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[0] != 1:
            raise bad("k", f"a tensor of batch {k.shape[0]}", "batch 1",
                      "a PagedSequenceCache holds one sequence")
        start, n_new = self.layer_lens[layer], k.shape[2]
        bs = self.pool.block_size
        self._grow(start + n_new)
        positions = torch.arange(start, start + n_new)
        blocks = torch.tensor(self.block_table)[positions // bs]
        offsets = positions % bs
        # (1, n_kv, n_new, d) -> (n_new, n_kv, d): one slot per token.
        self.pool.k[layer][blocks, offsets] = k[0].transpose(0, 1)
        self.pool.v[layer][blocks, offsets] = v[0].transpose(0, 1)
        self.layer_lens[layer] = start + n_new
        return gather_kv(self.pool.k[layer], self.pool.v[layer], self.block_table, start + n_new)


class _PagedLayerView:
    def __init__(self, seq: PagedSequenceCache, layer: int) -> None:
        self.seq, self.layer = seq, layer

    @property
    def seq_len(self) -> int:
        return self.seq.layer_lens[self.layer]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.seq._write(self.layer, k, v)
