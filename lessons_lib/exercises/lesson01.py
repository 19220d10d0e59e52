"""Checkers for notebook 01 (why distribute)."""

import torch

from ..memory import LLAMA2_70B, LLAMA2_7B, kv_cache_bytes
from .check import Incorrect, exercise

_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


@exercise("01.kv_cache_bytes", "KV-cache bytes of a batch of sequences")
def check_kv_cache_bytes(candidate):
    cases = [(LLAMA2_7B, 1, 1, "bf16"), (LLAMA2_7B, 8, 4096, "bf16"), (LLAMA2_70B, 4, 32768, "bf16"),
             (LLAMA2_70B, 3, 1000, "fp32"), (LLAMA2_7B, 2, 77, "int8")]
    for shape, batch, context, dtype in cases:
        expected = kv_cache_bytes(shape, batch, context, dtype)
        got = candidate(shape.n_layers, shape.n_kv_heads, shape.head_dim, batch, context, _BYTES[dtype])
        if got != expected:
            hint = ""
            if got == expected * shape.n_heads / shape.n_kv_heads:
                hint = " You used the query heads; the cache holds only the KV heads (GQA)."
            elif got == expected / 2:
                hint = " Did you count both K and V?"
            raise Incorrect(f"{shape.name}, batch {batch}, context {context}, {dtype}: got {got}, "
                            f"expected {expected:.0f}.{hint}")
    # And against bytes measured on real tensors shaped like a cache.
    k = torch.zeros(2, 2, 5, 16)  # (batch, kv_heads, seq, head_dim), fp32
    measured = 3 * 2 * k.nelement() * k.element_size()  # 3 layers, K and V
    if candidate(3, 2, 16, 2, 5, 4) != measured:
        raise Incorrect(f"3 layers, 2 KV heads, head_dim 16, batch 2, 5 tokens, fp32: expected "
                        f"{measured} bytes, measured on real tensors")
    return "matches the formula and the bytes of real cache tensors"
