"""Causal self-attention written the way most model libraries write it: head counts as attributes.

nanoGPT's ``CausalSelfAttention`` keeps ``self.n_head``, gpt-fast's ``Attention`` keeps ``n_head`` and
``n_local_heads``, and reshapes with them: ``q.view(batch, seq, self.n_heads, self.head_dim)``.
Sharding such a module's projections by heads is not enough: on a rank that holds 2 of 4 heads the
view still asks for 4 and fails. The tiny LM (:mod:`.llama`) reads its head counts off the projected
tensors instead; this module is the other, common, kind, for lesson 12 to parallelise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validate import bad, check_int


class MultiHeadSelfAttention(nn.Module):
    """Causal grouped-query self-attention, no positions, head counts stored as ``n_heads``/``n_kv_heads``."""

    def __init__(self, dim: int = 64, n_heads: int = 4, n_kv_heads: int | None = None) -> None:
        super().__init__()
        check_int("dim", dim, low=1)
        check_int("n_heads", n_heads, low=1)
        n_kv_heads = n_heads if n_kv_heads is None else check_int("n_kv_heads", n_kv_heads, low=1)
        if dim % n_heads:
            raise bad("n_heads", n_heads, f"a divisor of dim={dim}")
        if n_heads % n_kv_heads:
            raise bad("n_kv_heads", n_kv_heads, f"a divisor of n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
