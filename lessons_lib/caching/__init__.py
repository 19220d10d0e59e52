"""Caching for inference: models in memory, the KV cache in pages, shared prompt prefixes."""

from .model_cache import POLICIES, ModelCache, module_bytes
from .paged_kv import (BlockAllocator, KVBlockPool, OutOfBlocksError, PagedSequenceCache,
                       blocks_needed, contiguous_attention, gather_kv, paged_attention)
from .prefix_cache import PrefixCache, block_hashes, prefill

__all__ = [
    "BlockAllocator", "KVBlockPool", "ModelCache", "OutOfBlocksError", "POLICIES",
    "PagedSequenceCache", "PrefixCache", "block_hashes", "blocks_needed", "contiguous_attention",
    "gather_kv", "module_bytes", "paged_attention", "prefill",
]
